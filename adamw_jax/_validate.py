"""Hyperparameter checks made when a transform is built, with torch-style messages."""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

_RULES: dict[str, tuple[Callable[[float], bool], str]] = {
    "learning_rate": (lambda x: x >= 0, "must be >= 0"),
    "b1": (lambda x: 0 <= x < 1, "must be in [0, 1)"),
    "b2": (lambda x: 0 <= x < 1, "must be in [0, 1)"),
    "eps": (lambda x: x >= 0, "must be >= 0"),
    "eps_root": (lambda x: x >= 0, "must be >= 0"),
    "weight_decay": (lambda x: x >= 0, "must be >= 0"),
    "peak_learning_rate": (lambda x: 0 < x < math.inf, "must be > 0 and finite"),
}

_LABEL = {
    "learning_rate": "Invalid learning_rate",
    "b1": "Invalid beta parameter at index 0 (b1)",
    "b2": "Invalid beta parameter at index 1 (b2)",
    "eps": "Invalid epsilon value (eps)",
    "eps_root": "Invalid eps_root value",
    "weight_decay": "Invalid weight_decay value",
    "peak_learning_rate": "Invalid peak_learning_rate",
}


def _concrete_scalar(value: Any, name: str) -> Optional[float]:
  """The value as a float if it is known now, None if it is traced."""
  if isinstance(value, bool) or (hasattr(value, "dtype") and np.dtype(value.dtype) == np.bool_):
    raise TypeError(f"{_LABEL[name]}: expected a number, got the boolean {value!r}")
  if isinstance(value, (int, float, np.integer, np.floating)):
    return float(value)
  if isinstance(value, (np.ndarray, jax.Array)):
    if np.ndim(value) != 0:
      raise ValueError(f"{_LABEL[name]}: expected a scalar, got an array of shape {np.shape(value)}")
    if not jnp.issubdtype(value.dtype, jnp.floating) and not jnp.issubdtype(value.dtype, jnp.integer):
      raise TypeError(f"{_LABEL[name]}: expected a real number, got dtype {value.dtype}")
    try:
      return float(value)
    except jax.errors.ConcretizationTypeError:
      return None  # traced, e.g. under optax.inject_hyperparams or jax.grad
  raise TypeError(f"{_LABEL[name]}: expected a number or a schedule, got {type(value).__name__}")


def check(name: str, value: Any) -> None:
  """Raises ValueError if a hyperparameter given as a number (or schedule at step 0) is invalid."""
  ok, rule = _RULES[name]
  if callable(value):
    try:
      first = value(jnp.zeros([], jnp.int32))
    except Exception:  # noqa: BLE001 - a schedule we cannot evaluate eagerly is checked nowhere else
      return
    x = _concrete_scalar(first, name)
    if x is not None and (math.isnan(x) or not ok(x)):
      raise ValueError(f"{_LABEL[name]}: the schedule returns {x} at step 0 ({rule})")
    return
  x = _concrete_scalar(value, name)
  if x is not None and (math.isnan(x) or not ok(x)):
    raise ValueError(f"{_LABEL[name]}: {x} ({rule})")


def check_dtype(name: str, dtype: Any) -> Optional[jnp.dtype]:
  """A moment dtype given by the user: None or a floating or complex dtype."""
  if dtype is None:
    return None
  dt = jnp.dtype(dtype)
  if not jnp.issubdtype(dt, jnp.inexact):
    raise ValueError(f"Invalid {name}: {dt} (must be a floating-point dtype)")
  return dt
