"""torch's per-step Python scalars, tabulated once per configuration.

``torch.optim.AdamW`` computes ``1 - beta**t``, ``lr / (1 - b1**t)`` and
``(1 - b2**t) ** 0.5`` in Python doubles at every step. With Python-number
betas these are functions of the step count alone, and constant from the step
where ``1 - beta**t`` rounds to 1 (t = 356 for 0.9, 37,412 for 0.999). Up to
there they are tabulated here with the very same Python arithmetic, so the step
reads one row instead of evaluating double-word series: the same numbers as
torch's (no series error, no double rounding), at the cost of a table lookup.
Betas closer to 1 (a table over ``MAX_BYTES``) and traced betas use
the double-word series of ``_float2``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

MAX_BYTES = 1 << 20  # the table's size in the compiled program (float32 pairs: betas <= 0.9997)


def rows_until_one(beta: float) -> int:
  """The first step t with ``1 - beta**t == 1`` in double precision (constant after)."""
  lo, hi = 1, 1 << 31
  while lo < hi:  # 1 - beta**t rounds up to 1 monotonically in t
    mid = (lo + hi) // 2
    if 1.0 - beta**mid == 1.0:
      hi = mid
    else:
      lo = mid + 1
  return lo


@functools.lru_cache(maxsize=64)
def _table(
  b1: float, b2: float, lr: float | None, scheduled: bool, rows: int, dtype_name: str
) -> np.ndarray:
  """``table[t]`` for t in [0, rows]; row 0 is a copy of row 1 (t = 0 never occurs).

  Columns: torch's ``value=-step_size`` (``-(lr / (1 - b1**t))``; ``1 / bc1``
  without lr) and ``bias_correction2 ** 0.5``; for a scheduled lr, known only
  when traced, ``1 - b1**t`` as a pair (hi, lo) instead of the step size.
  """
  dtype = np.dtype(dtype_name)
  out = np.empty((rows + 1, 3 if scheduled else 2), dtype)
  for t in range(1, rows + 1):
    bc1, bc2 = 1.0 - b1**t, 1.0 - b2**t  # torch: 1 - beta ** step, in Python
    if scheduled:
      hi = dtype.type(bc1)
      out[t, :2] = hi, dtype.type(bc1 - float(hi))
    else:
      out[t, 0] = dtype.type(1.0 / bc1 if lr is None else -(lr / bc1))
    out[t, -1] = dtype.type(bc2**0.5)
  out[0] = out[1]
  return out


def lookup(
  b1: float, b2: float, lr: float | None, t: jax.Array, dtype, *, scheduled: bool
) -> jax.Array | None:
  """Row ``min(t, rows)`` of the table (see `_table`), or None when it would be too long."""
  rows = max(rows_until_one(float(b1)), rows_until_one(float(b2)))
  if (rows + 1) * (3 if scheduled else 2) * jnp.dtype(dtype).itemsize > MAX_BYTES:
    return None
  table = _table(
    float(b1), float(b2), None if lr is None else float(lr), scheduled, rows, jnp.dtype(dtype).name
  )
  # One 1-D constant per column: a (rows, 2) table would be padded to 128 columns by TPU's
  # tiling (18.5 MiB per device for betas 0.9/0.999); 1-D columns are their own size.
  row = jnp.minimum(t, rows)
  return jnp.stack([jnp.asarray(np.ascontiguousarray(column))[row] for column in table.T], axis=-1)
