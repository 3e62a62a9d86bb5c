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

A program lowered for a TPU computes the rows instead (`lookup`'s `series`):
XLA:TPU reads a table row into device memory, and one such value makes the
program keep its buffer of small temporaries, about 30 KiB per kernel of the
step (4.5 MiB for 24 leaves under FSDP), where scalar arithmetic stays in the
scalar unit's own memory. The series is within 2**-46 of the exact value; a row
where the exact value lies within 2**-40 of a rounding boundary of the dtype, or
where torch's Python arithmetic rounds differently (`disagreements`), is taken
from the table by comparisons with the step count, so the TPU's row is the
table's.
"""

from __future__ import annotations

import decimal
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from adamw_jax import _steer

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


Series = Callable[[jax.Array], tuple[jax.Array, ...]]  # t >= 1 -> a row without the table
_MARGIN = decimal.Decimal(2) ** -40  # relative distance to a rounding boundary the series keeps


def _rows(b1: float, b2: float, scheduled: bool, dtype) -> int | None:
  """The table's last row (see `_table`), or None when the table would exceed ``MAX_BYTES``."""
  rows = max(rows_until_one(float(b1)), rows_until_one(float(b2)))
  if (rows + 1) * (3 if scheduled else 2) * jnp.dtype(dtype).itemsize > MAX_BYTES:
    return None
  return rows


def lookup(
  b1: float,
  b2: float,
  lr: float | None,
  t: jax.Array,
  dtype,
  *,
  scheduled: bool,
  series: Series | None = None,
) -> tuple[jax.Array, ...] | None:
  """Row ``min(t, rows)`` of the table (see `_table`) as scalars, or None when it would be too long.

  `series` (optional): the same row computed in double words, ``series(t)`` for ``t >= 1``,
  which a program lowered for a TPU uses instead (`without_table`).
  """
  rows = _rows(b1, b2, scheduled, dtype)
  if rows is None:
    return None
  table = _table(
    float(b1), float(b2), None if lr is None else float(lr), scheduled, rows, jnp.dtype(dtype).name
  )
  row = jnp.minimum(t, rows)

  def read(row: jax.Array) -> tuple[jax.Array, ...]:
    # One 1-D constant per column: a (rows, 2) table would be padded to 128 columns by TPU's
    # tiling (18.5 MiB per device for betas 0.9/0.999); 1-D columns are their own size.
    return tuple(jnp.asarray(np.ascontiguousarray(column))[row] for column in table.T)

  if series is None:
    return read(row)
  tpu = functools.partial(
    without_table, b1, b2, lr, dtype=dtype, scheduled=scheduled, series=series
  )
  out = (jax.ShapeDtypeStruct((), dtype),) * table.shape[1]
  return _steer.per_platform(read, read, row, out=out, tpu=tpu)


def without_table(
  b1: float, b2: float, lr: float | None, row: jax.Array, *, dtype, scheduled: bool, series: Series
) -> tuple[jax.Array, ...]:
  """`lookup`'s row ``row <= rows`` from `series`, the table's own where they may differ.

  With a scheduled lr the pair ``1 - b1**t`` is the series' own (hi, lo), not the
  table's split of torch's double: either is within 2**-46 of the exact value, and
  the step's division by it is in double words.
  """
  values = list(series(jnp.maximum(row, 1)))
  lr = None if lr is None else float(lr)
  for at, column, value in disagreements(b1, b2, lr, scheduled, jnp.dtype(dtype).name):
    values[column] = jnp.where(row == at, np.asarray(value, dtype), values[column])
  return tuple(values)


@functools.lru_cache(maxsize=64)
def disagreements(
  b1: float, b2: float, lr: float | None, scheduled: bool, dtype_name: str
) -> tuple[tuple[int, int, float], ...]:
  """(row, column, table value) where the series may not round to the table's value.

  Listed: the rows where the table's value is not the exact value rounded to
  `dtype_name` (torch's Python arithmetic rounds more than once), or where the
  exact value lies within ``_MARGIN`` (relative) of a rounding boundary. Every row is
  first placed in double precision (within 2**-50); the few near a boundary are
  decided in 40-digit decimal arithmetic from the exact doubles. The series (within
  2**-46 of the exact value, measured at every row of three configurations in
  ``tests/test_fidelity.py``) rounds to the table's value at every other row. The
  pair of a scheduled lr is not compared (see `without_table`).
  """
  rows = _rows(b1, b2, scheduled, dtype_name)
  assert rows is not None
  table = _table(b1, b2, lr, scheduled, rows, dtype_name)
  t = np.arange(1, rows + 1, dtype=np.float64)
  with np.errstate(divide="ignore"):
    bc1, bc2 = -np.expm1(t * np.log(b1)), -np.expm1(t * np.log(b2))
    estimates = {table.shape[1] - 1: np.sqrt(bc2)}
    if not scheduled:
      estimates[0] = 1 / bc1 if lr is None else -(lr / bc1)
  out = []
  for column, estimate in sorted(estimates.items()):
    rounded = table[1:, column]
    near = np.zeros(rows, bool)
    for direction in (-np.inf, np.inf):
      boundary = (rounded.astype(np.float64) + np.nextafter(rounded, direction)) / 2
      gap = (estimate - boundary) * np.sign(rounded.astype(np.float64) - boundary)
      near |= gap <= abs(estimate) * float(_MARGIN + decimal.Decimal(2) ** -48)
    for i in np.flatnonzero(near):
      if not _rounds_clearly(_exact(b1, b2, lr, int(i) + 1, column, table.shape[1]), rounded[i]):
        out.append((int(i) + 1, column, float(rounded[i])))
  return tuple(sorted(out))


_CONTEXT = decimal.Context(prec=40)


def _exact(b1: float, b2: float, lr: float | None, t: int, column: int, columns: int):
  """Row `t`'s value in `column` (the step size or sqrt(1 - b2**t)) to 40 digits."""
  ctx, one = _CONTEXT, decimal.Decimal(1)
  if column == columns - 1:
    return ctx.sqrt(ctx.subtract(one, ctx.power(decimal.Decimal(b2), t)))
  step = ctx.divide(
    one if lr is None else decimal.Decimal(lr),
    ctx.subtract(one, ctx.power(decimal.Decimal(b1), t)),
  )
  return step if lr is None else -step


def _rounds_clearly(exact: decimal.Decimal, rounded: np.floating) -> bool:
  """Whether `exact` rounds to `rounded`, at least ``_MARGIN`` (relative) from either boundary."""
  ctx = _CONTEXT
  margin = ctx.multiply(abs(exact), _MARGIN)
  for neighbour in (np.nextafter(rounded, -np.inf), np.nextafter(rounded, np.inf)):
    boundary = ctx.divide(decimal.Decimal(float(rounded)) + decimal.Decimal(float(neighbour)), 2)
    gap = ctx.subtract(exact, boundary) * (1 if rounded > neighbour else -1)
    if gap <= margin:  # near the boundary, or beyond it
      return False
  return True
