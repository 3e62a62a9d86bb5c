"""The interop adapter of ``torch.optim.AdamW`` / ``Adam``: torch's own state, per parameter.

torch keeps, per parameter, ``step`` (a float tensor), ``exp_avg``,
``exp_avg_sq`` and (AMSGrad) ``max_exp_avg_sq``; a param group's
``decoupled_weight_decay`` (or, in an older torch, the optimizer's class) tells
AdamW from Adam. A state dict that no other adapter claims is read as torch's.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import jax.numpy as jnp
import numpy as np

from adamw_jax import _hyperparams, _layout
from adamw_jax import _interop_adapter as _adapter


def step_of(what: str, slot: _layout.TorchParam, value) -> int:
  """torch's ``step`` of one parameter as a whole number, or an error naming the parameter."""
  step = float(value.item() if hasattr(value, "item") else value)
  if not math.isfinite(step) or step != int(step) or not 0 <= step <= 2**31 - 1:
    raise ValueError(
      f"{what}: {slot.label()} has step {step}; expected a whole number of steps in [0, 2**31 - 1]."
    )
  return int(step)


class Torch(_adapter.Reference):
  """``torch.optim.AdamW`` / ``Adam`` (and their state dicts)."""

  NAMES: ClassVar[str] = "torch.optim.AdamW / Adam"
  TAKES_REMAINDER: ClassVar[bool] = True

  @classmethod
  def of_optimizer(cls, optimizer: Any) -> _adapter.Reference | None:
    torch = _adapter.torch()
    if not isinstance(optimizer, torch.optim.Adam):
      return None
    return cls(_adapter.label(optimizer), isinstance(optimizer, torch.optim.AdamW))

  @classmethod
  def of_state_dict(cls, what: str, sd: Mapping) -> _adapter.Reference | None:
    del what, sd
    return cls("torch state dict")

  def is_adamw(self, what: str, group: Mapping) -> bool:
    if _hyperparams.TORCH_DECOUPLED in group:
      return bool(group[_hyperparams.TORCH_DECOUPLED])
    if self.decoupled is None:
      raise ValueError(
        f"{what}: the state dict has no 'decoupled_weight_decay' (an older torch): "
        "pass the optimizer itself, which tells AdamW from Adam."
      )
    return self.decoupled

  def note(self) -> str:
    """How the error about a parameter's state keys names the optimizer: torch needs no name."""
    return ""

  def moment(self, what: str, slot: _layout.TorchParam, key: str, value, leaf) -> Any:
    """One moment of one parameter, in the layout and dtype of `leaf`."""
    return _adapter.full_moment(what, slot, key, value, leaf, self)

  def read(
    self,
    what: str,
    slot: _layout.TorchParam,
    state: Mapping | None,
    leaf: Any,
    reading: _adapter.Reading,
  ) -> tuple:
    amsgrad = reading.amsgrad
    if not state:
      moment = self.zeros(np.shape(leaf), jnp.result_type(leaf))
      return 0, moment, moment, (moment if amsgrad else None), None
    keys = _adapter.moment_keys(amsgrad)
    _adapter.check_keys(what, slot, state, {"step", *keys}, self.note(), amsgrad)
    out = [self.moment(what, slot, key, state[key], leaf) for key in keys]
    step = step_of(what, slot, state["step"])
    return (step, out[0], out[1], out[2] if amsgrad else None, None)

  def check(self, what: str, slot: _layout.TorchParam, moments: Sequence, comp: Any) -> None:
    _adapter.refuse_8bit(what, slot, moments, self.label)
    _adapter.refuse_compensation(what, slot, comp, self.label)

  def write_moment(self, x: Any, key: str, back: _adapter.Axes) -> Any:
    """One JAX moment as the tensor the optimizer keeps."""
    del key
    return _adapter.to_tensor(_adapter.permute(x, back))

  def write(
    self,
    slot: _layout.TorchParam,
    count: int,
    moments: Mapping[str, Any],
    comp: Any,
    back: _adapter.Axes,
    group: dict,
  ) -> dict:
    del slot, comp, group
    torch = _adapter.torch()
    entry: dict[str, Any] = {"step": torch.tensor(float(count), dtype=torch.float32)}
    for key, x in moments.items():
      if x is not None:
        entry[key] = self.write_moment(x, key, back)
    return entry
