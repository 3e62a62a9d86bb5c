"""Loshchilov & Hutter's helpers: the paper's normalized weight decay and warm restarts (AdamWR).

*Decoupled Weight Decay Regularization* (ICLR 2019) decays by ``eta_t * lambda``
(Algorithm 2, line 12), where ``eta_t`` is the schedule multiplier and the base
learning rate ``alpha`` does not enter; torch, optax and apex decay by
``lr_t * lambda = alpha * eta_t * lambda``. ``adamw(..., decay_mode="paper")``
gives the paper's form ([the paper's decay](paper-decay.md)); this module adds the
paper's normalized weight decay and warm restarts (AdamWR, built on optax
schedules), both from its appendix.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import optax


def _positive(name: str, value: Any, integer: bool) -> float:
  kind = numbers.Integral if integer else numbers.Real
  if isinstance(value, bool) or not isinstance(value, kind):
    what = "an integer" if integer else "a number"
    raise TypeError(f"Invalid {name}: expected {what}, got {value!r}")
  if not 0 < float(value) < math.inf:
    raise ValueError(f"Invalid {name}: {value} (must be > 0 and finite)")
  return float(value)


def normalized_weight_decay(
  lambda_norm: float, batch_size: int, dataset_size: int, epochs: float
) -> float:
  """The paper's normalized weight decay: `λ = λ_norm·√(b / (B·T))`.

  Loshchilov & Hutter (appendix) make the best weight decay independent of
  the length of the run by fixing `λ_norm` instead of `λ`: with batch size
  `b`, `B` training points and `T` epochs, there are `B·T / b` steps, and `λ`
  shrinks as the square root of their number. With warm restarts, `T` is the
  length `T_i` of the current period, in epochs.

  >>> import adamw_jax
  >>> lam = adamw_jax.normalized_weight_decay(0.05, batch_size=128, dataset_size=50_000, epochs=100)
  >>> round(lam, 8)  # 0.05 * sqrt(128 / (50_000 * 100)), for adamw(..., decay_mode="paper")
  0.00025298

  Args:
    lambda_norm: the normalized weight decay (>= 0); the paper's best values
      for its CIFAR-10 ResNets were around 0.025 to 0.05.
    batch_size: the batch size `b` (a positive integer).
    dataset_size: the number of training points `B` (a positive integer).
    epochs: the number of epochs `T` (> 0; fractions allowed).

  Returns:
    `λ`, a Python float, to pass as `weight_decay` to
    `adamw(..., decay_mode="paper")`: the paper's `λ` is not multiplied by
    the learning rate.
  """
  if isinstance(lambda_norm, bool) or not isinstance(lambda_norm, numbers.Real):
    raise TypeError(f"Invalid lambda_norm: expected a number, got {lambda_norm!r}")
  if not 0 <= float(lambda_norm) < math.inf:
    raise ValueError(f"Invalid lambda_norm: {lambda_norm} (must be >= 0 and finite)")
  b = _positive("batch_size", batch_size, integer=True)
  n = _positive("dataset_size", dataset_size, integer=True)
  t = _positive("epochs", epochs, integer=False)
  return float(lambda_norm) * math.sqrt(b / (n * t))


def warm_restarts(
  peak_value: float,
  first_period: int,
  period_mult: float = 2.0,
  *,
  num_periods: int,
  min_value: float = 0.0,
) -> optax.Schedule:
  """Cosine annealing with warm restarts (SGDR; with AdamW, the paper's AdamWR).

  Period `i = 0, 1, …` lasts `T_i = T_0·mⁱ` steps (rounded half up); within
  it, after `t` steps,

  ```text
  lr_t = min + ½·(peak - min)·(1 + cos(π·t / T_i)),
  ```

  so every period starts at the peak again. Built with ``optax.sgdr_schedule``
  (``optax.join_schedules`` of cosine decays). After the last period the
  schedule stays at `min_value`. Loshchilov & Hutter restart at epoch
  boundaries and update the multiplier every batch, as here when the periods
  are whole numbers of epochs (in steps).

  For the paper's decay, pass the same peak:
  ``adamw(warm_restarts(alpha, ...), weight_decay=lam, decay_mode="paper",
  peak_learning_rate=alpha)`` decays by `η_t·λ` with the paper's multiplier
  `η_t = lr_t / alpha ∈ [min / alpha, 1]`.

  >>> import adamw_jax
  >>> schedule = adamw_jax.warm_restarts(1e-3, first_period=10, num_periods=2)  # 10 steps, then 20
  >>> [round(float(schedule(t)), 6) for t in (0, 5, 10, 20, 30)]
  [0.001, 0.0005, 0.001, 0.0005, 0.0]

  Args:
    peak_value: the learning rate at the start of every period (> 0).
    first_period: `T_0`, the length of the first period in steps.
    period_mult: `m ≥ 1`, the factor by which each period is longer than the
      one before (the paper's `T_mult`; 2 in its experiments).
    num_periods: how many periods the schedule has.
    min_value: the learning rate at the end of every period, in [0, peak].

  Returns:
    An optax schedule ``count -> lr``.
  """
  peak = _positive("peak_value", peak_value, integer=False)
  first = int(_positive("first_period", first_period, integer=True))
  count = int(_positive("num_periods", num_periods, integer=True))
  mult = _positive("period_mult", period_mult, integer=False)
  if mult < 1:
    raise ValueError(f"Invalid period_mult: {period_mult} (must be >= 1)")
  if isinstance(min_value, bool) or not isinstance(min_value, numbers.Real):
    raise TypeError(f"Invalid min_value: expected a number, got {min_value!r}")
  if not 0 <= float(min_value) <= peak:
    raise ValueError(f"Invalid min_value: {min_value} (must be in [0, peak_value={peak_value}])")
  periods = [max(1, math.floor(first * mult**i + 0.5)) for i in range(count)]  # half up
  return optax.sgdr_schedule(
    [
      {
        "init_value": peak,
        "peak_value": peak,
        "warmup_steps": 0,
        "decay_steps": n,
        "end_value": float(min_value),
      }
      for n in periods
    ]
  )
