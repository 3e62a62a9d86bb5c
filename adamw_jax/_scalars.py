"""Per-step scalars: torch's Python-double arithmetic for one step, one function per strategy.

torch computes ``1 - beta**t``, ``lr / bc1``, ``sqrt(bc2)`` and ``1 - lr*wd``
in Python doubles and rounds them to the parameter dtype once. Here that
arithmetic runs inside the jitted step, by one of three strategies:

- `_float64`: float64 leaves, every operation rounded to a double as
  Python rounds it;
- `_tabulated`: Python-number betas (and lr), torch's own Python
  scalars read from a table (``_steps``);
- `_double_word`: everything else (traced betas, steps beyond the
  table), in double-word arithmetic (``_float2``) to double precision.

`coefficients` picks one and returns the kernel's
`adamw_jax._kernel.Coefficients` and the decay factor (or L2 term).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np

from adamw_jax import _float2 as f2
from adamw_jax import _hyperparams, _kernel, _steer, _steps
from adamw_jax._hyperparams import ScalarOrSchedule, Settings, is_number, is_zero


def scalar_dtype(dtype) -> jnp.dtype:
  """The dtype the per-step scalars are computed in for a leaf of `dtype`."""
  real = jnp.finfo(dtype).dtype
  return jnp.dtype(jnp.float64) if real == jnp.float64 else jnp.dtype(jnp.float32)


def _f2_of(value: Any, dtype, z: jax.Array) -> f2.F2:
  """A hyperparameter (Python float: kept to double precision; array: as is) as F2."""
  if is_number(value):
    return f2.constant(float(value), dtype, z)
  return f2.from_array(jnp.asarray(value).astype(dtype))


def _one_minus(value: Any, dtype, z: jax.Array) -> f2.F2:
  if is_number(value):
    return f2.constant(1.0 - float(value), dtype, z)  # exact in double for value >= 0.5
  return f2.sub(f2.constant(1.0, dtype, z), _f2_of(value, dtype, z))


def _bias_correction(beta: Any, t: jax.Array, dtype, z: jax.Array) -> f2.F2:
  """``1 - beta**t`` to double precision, as torch computes it in Python."""
  if is_number(beta):
    if float(beta) == 0.0:
      return f2.constant(1.0, dtype, z)
    if jnp.dtype(dtype) == jnp.float64:  # float64 pairs: exp(t * double log) falls short
      return f2.one_minus_power(float(beta), t, dtype, z)
    log_beta = f2.constant(math.log(float(beta)), dtype, z)
  else:  # traced (e.g. optax.inject_hyperparams): log in double words
    b = _f2_of(beta, dtype, z)
    # A traced beta of (nearly) 0: 1 - beta**t is 1 in double, as for a number 0 above; the
    # log (-inf for 0, overflowing exp(-log) below 2**-60) is taken of a stand-in instead.
    tiny = b.hi < np.asarray(2.0**-60, b.hi.dtype)
    safe = f2.F2(jnp.where(tiny, jnp.ones_like(b.hi) / 2, b.hi), jnp.where(tiny, 0, b.lo))
    out = f2.one_minus_exp_times(f2.log(safe, z), t, z)
    return f2.F2(jnp.where(tiny, jnp.ones_like(out.hi), out.hi), jnp.where(tiny, 0, out.lo))
  return f2.one_minus_exp_times(log_beta, t, z)


def _rounded_number(value: Any, dtype, traced: Callable[[], jax.Array] | None) -> jax.Array:
  """A scalar torch computes in Python: a literal when `value` is a Python number."""
  if is_number(value):
    # A NumPy constant, folded into the jitted step as a literal (there, an Array's stand-in).
    return cast(jax.Array, np.asarray(float(value), dtype))
  assert traced is not None  # None only with a number
  return traced()


def _step_size(lr: Any, bc1: f2.F2, dtype, z: jax.Array) -> jax.Array:
  """``-lr / (1 - b1**t)`` (``1 / (1 - b1**t)`` without an lr), rounded once."""
  one = f2.constant(1.0, dtype, z)
  if lr is None:
    return f2.round_(f2.div(one, bc1))
  return f2.round_(f2.neg(f2.div(_f2_of(lr, dtype, z), bc1)))


def _float64(cfg: Settings, lr: Any, t: jax.Array, dtype, z: jax.Array):
  """(step size, sqrt(1 - b2**t), 1 - b2**t) for float64 leaves, as Python rounds them.

  torch rounds every Python operation to a double: so does this, after a
  correctly rounded ``beta**t`` (as Python's pow gives).
  """
  one = f2.constant(1.0, dtype, z)
  bc1 = f2.from_array(1 - f2.round_(f2.sub(one, _bias_correction(cfg.b1, t, dtype, z))))
  bc2 = f2.from_array(1 - f2.round_(f2.sub(one, _bias_correction(cfg.b2, t, dtype, z))))
  numerator = jnp.ones([], dtype) if lr is None else -jnp.asarray(lr, dtype)
  return numerator / bc1.hi, jnp.sqrt(bc2.hi), bc2


def _tabulated(cfg: Settings, lr: Any, t: jax.Array, dtype, z: jax.Array):
  """(step size, sqrt(1 - b2**t)) from torch's own Python scalars (``_steps``), or None.

  None when a beta is not a Python number or `t` is beyond the table. With a
  scheduled (traced) lr the table gives ``1 - b1**t`` as a double word.
  """
  if not (is_number(cfg.b1) and is_number(cfg.b2)):
    return None
  lr_number = lr is None or is_number(lr)
  row = _steps.lookup(
    float(cfg.b1),
    float(cfg.b2),
    lr if lr_number else None,
    t,
    dtype,
    scheduled=not lr_number,
    series=functools.partial(_series_row, cfg, lr if lr_number else None, not lr_number, dtype),
  )
  if row is None:
    return None
  step_size = row[0] if lr_number else _step_size(lr, f2.F2(row[0], row[1]), dtype, z)
  return step_size, row[-1]


def _series_row(cfg: Settings, lr: Any, scheduled: bool, dtype, t: jax.Array):
  """`_tabulated`'s table row at step ``t >= 1`` in double words (``_steps.lookup``'s series)."""
  z = _steer.opaque_zero(t)
  bc1 = _bias_correction(cfg.b1, t, dtype, z)
  bc2_sqrt = f2.round_(f2.sqrt(_bias_correction(cfg.b2, t, dtype, z)))
  if scheduled:
    return bc1.hi, bc1.lo, bc2_sqrt
  return _step_size(lr, bc1, dtype, z), bc2_sqrt


def _double_word(cfg: Settings, lr: Any, t: jax.Array, dtype, z: jax.Array):
  """(step size, sqrt(1 - b2**t), 1 - b2**t) in double words, rounded once each."""
  step_size = _step_size(lr, _bias_correction(cfg.b1, t, dtype, z), dtype, z)
  bc2 = _bias_correction(cfg.b2, t, dtype, z)
  return step_size, f2.round_(f2.sqrt(bc2)), bc2


def _paper_decay(lr: Any, peak: Any, wd: Any, dtype, z: jax.Array) -> jax.Array:
  """``1 - (lr / peak) * wd``, Loshchilov & Hutter's ``1 - eta_t * lambda``, rounded once.

  `peak` None: the learning rate is constant and its own peak, eta_t = 1.
  Python numbers are combined in double precision (as torch's ``1 - lr*wd``);
  otherwise in double words, with a Python-float peak first rounded as the
  scheduled lr is, so that eta_t = 1 exactly where the schedule peaks.
  """
  one = f2.constant(1.0, dtype, z)
  if peak is None:
    return _rounded_number(
      1.0 - float(wd) if is_number(wd) else None,
      dtype,
      lambda: f2.round_(f2.sub(one, _f2_of(wd, dtype, z))),
    )
  if is_number(lr) and is_number(peak) and is_number(wd):
    return _rounded_number(1.0 - float(lr) / float(peak) * float(wd), dtype, None)
  if is_number(peak) and not is_number(lr):
    peak = jnp.asarray(float(peak), jnp.result_type(lr))
  eta = f2.div(_f2_of(lr, dtype, z), _f2_of(peak, dtype, z))
  return f2.round_(f2.sub(one, f2.mul(eta, _f2_of(wd, dtype, z))))


def _decay(cfg: Settings, lr: Any, wd: Any, dtype, z: jax.Array) -> jax.Array | None:
  """AdamW's factor ``1 - lr*wd`` (or the paper's), Adam's L2 coefficient, or None."""
  if not cfg.needs_params:
    return None
  if not cfg.decoupled:
    return _rounded_number(wd, dtype, lambda: f2.round_(_f2_of(wd, dtype, z)))
  if cfg.decay_mode == "paper":
    return _paper_decay(lr, cfg.peak_learning_rate, wd, dtype, z)
  if is_number(lr) and is_number(wd):
    return _rounded_number(1.0 - float(lr) * float(wd), dtype, None)  # torch: 1 - lr*wd in Python
  one = f2.constant(1.0, dtype, z)
  return f2.round_(f2.sub(one, f2.mul(_f2_of(lr, dtype, z), _f2_of(wd, dtype, z))))


def scheduled(hp_name: str, value: ScalarOrSchedule, count: jax.Array, what: str) -> Any:
  """A hyperparameter at step `count`: a schedule's value (checked as a traced value), or itself."""
  if not callable(value):
    return value
  try:
    out = value(count)
  except (jax.errors.ConcretizationTypeError, jax.errors.TracerIntegerConversionError) as e:
    raise TypeError(
      f"{what}: the {hp_name} schedule cannot be traced ({type(e).__name__}): it is called "
      "with the step count as a traced array inside the compiled step, so it must not turn "
      "it into a Python value (use jnp.where or optax.join_schedules, not Python's if)."
    ) from e
  _hyperparams.check_traced(hp_name, out, ", the schedule's value at count {}", count)
  return out


def schedules_at(cfg: Settings, count: jax.Array) -> tuple[Any, Any]:
  """The learning rate (None without one) and weight decay of the step from `count`."""
  lr = (
    None
    if cfg.learning_rate is None
    else scheduled("learning_rate", cfg.learning_rate, count, cfg.name)
  )
  return lr, scheduled("weight_decay", cfg.weight_decay, count, cfg.name)


def at_count(cfg: Settings, count: jax.Array, new_count: jax.Array, dtype):
  """`coefficients` with the schedules evaluated at `count` (`schedules_at`)."""
  return coefficients(cfg, *schedules_at(cfg, count), new_count, dtype)


def coefficients(cfg: Settings, lr: Any, wd: Any, new_count: jax.Array, dtype):
  """One step's (`Coefficients`, decay) for leaves computed in `dtype`.

  `lr` and `wd` are this step's learning rate (None for the unscaled
  direction) and weight decay, schedules already evaluated; `new_count` is
  the step number ``t`` of the bias corrections.
  """
  z = _steer.opaque_zero(new_count)
  tabulated = None if dtype == jnp.float64 else _tabulated(cfg, lr, new_count, dtype, z)
  if tabulated is not None:
    (step_size, bc2_sqrt), bc2 = tabulated, None
  else:
    strategy = _float64 if dtype == jnp.float64 else _double_word
    step_size, bc2_sqrt, bc2 = strategy(cfg, lr, new_count, dtype, z)
  decay = _decay(cfg, lr, wd, dtype, z)
  lr_number = lr is None or is_number(lr)
  if tabulated is None or not lr_number or not (decay is None or isinstance(decay, np.ndarray)):
    step_size, decay = _steer.computed_once(step_size, decay, z)
  if tabulated is None:
    bc2_sqrt, _ = _steer.computed_once(bc2_sqrt, None, z)
  if bc2 is None and not is_zero(cfg.eps_root):
    bc2 = _bias_correction(cfg.b2, new_count, dtype, z)
  b1, b2 = cfg.b1, cfg.b2
  c = _kernel.Coefficients(
    one_minus_b1=_rounded_number(
      1.0 - float(b1) if is_number(b1) else None, dtype, lambda: f2.round_(_one_minus(b1, dtype, z))
    ),
    b2=_rounded_number(b2, dtype, lambda: f2.round_(_f2_of(b2, dtype, z))),
    one_minus_b2=_rounded_number(
      1.0 - float(b2) if is_number(b2) else None, dtype, lambda: f2.round_(_one_minus(b2, dtype, z))
    ),
    bc2_sqrt=bc2_sqrt,
    eps=_rounded_number(cfg.eps, dtype, lambda: f2.round_(_f2_of(cfg.eps, dtype, z))),
    eps_root=None
    if is_zero(cfg.eps_root)
    else f2.round_(f2.mul(_f2_of(cfg.eps_root, dtype, z), cast(f2.F2, bc2))),
    step_size=step_size,
  )
  return c, decay
