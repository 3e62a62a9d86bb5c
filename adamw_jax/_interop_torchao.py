"""The interop adapter of torchao's ``AdamW8bit`` / ``Adam8bit``: torch's state with 8-bit moments.

``moment_bits=8`` with ``moment_block_size`` its ``block_size``, and
``param_rounding="stochastic"`` where its ``bf16_stochastic_round`` is on.
Those are attributes of the optimizer, not keys of its param groups, so a
state dict alone does not say them: pass the optimizer. Its ``exp_avg``,
``exp_avg_sq`` (``max_exp_avg_sq``) of leaves that quantize are
``OptimState8bit`` tensors whose ``codes`` and ``scale`` are a
[`QuantizedMoment`][adamw_jax.QuantizedMoment]'s, bit for bit; the rest of its
state is torch's (`adamw_jax._interop_torch`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np

from adamw_jax import _interop_adapter as _adapter
from adamw_jax import _interop_torch, _layout, _quantize


def from_8bit(
  what: str, where: str, key: str, x: Any, block_size: int
) -> _quantize.QuantizedMoment:
  """A torchao ``OptimState8bit`` as a `QuantizedMoment` (its codes and scales)."""
  codes, scale = x.codes.detach().cpu().numpy(), x.scale.detach().cpu().numpy()
  signed = key == "exp_avg"
  if bool(x.signed) != signed:
    raise ValueError(
      f"{what}: {where} has a {'signed' if x.signed else 'unsigned'} {key}; "
      f"torchao's {key} is {'signed' if signed else 'unsigned'}."
    )
  if scale.size == 0 or codes.size // scale.size != block_size:
    raise ValueError(
      f"{what}: {where} has {key} in blocks of {codes.size // max(scale.size, 1)} "
      f"elements, but the optimizer's block_size is {block_size}."
    )
  return _quantize.QuantizedMoment(codes, scale.astype(np.float32))


def to_8bit(q: _quantize.QuantizedMoment, signed: bool, dtype):
  """A `QuantizedMoment` as torchao's ``OptimState8bit`` (appearance dtype `dtype`)."""
  torch = _adapter.torch()
  from torchao.optim.subclass_8bit import (
    OptimState8bit,
    get_qmap_signed,
    get_qmap_unsigned,
  )

  qmap = torch.tensor(get_qmap_signed() if signed else get_qmap_unsigned(), dtype=torch.float32)
  codes = torch.from_numpy(np.array(q.codes, np.uint8, order="C"))
  scale = torch.from_numpy(np.array(q.scale, np.float32, order="C"))
  return OptimState8bit(codes, scale, qmap, signed, dtype=dtype)


def _transposed(slot: _layout.TorchParam) -> bool:
  return slot.axes is not None and list(slot.axes) != sorted(slot.axes)


class TorchAO(_interop_torch.Torch):
  """torchao's ``AdamW8bit`` / ``Adam8bit`` (the optimizers: their state dicts lack settings)."""

  NAMES: ClassVar[str] = "torchao.optim.AdamW8bit / Adam8bit"
  TAKES_REMAINDER: ClassVar[bool] = False

  @classmethod
  def of_optimizer(cls, optimizer: Any) -> _adapter.Reference | None:
    module, name = type(optimizer).__module__, type(optimizer).__name__
    if not (module.startswith("torchao.optim") and name in ("AdamW8bit", "Adam8bit")):
      return None
    block = int(optimizer.block_size)
    rounding = "stochastic" if optimizer.bf16_stochastic_round else "nearest"
    return cls(
      _adapter.label(optimizer),
      bool(optimizer.is_adamw),
      {"moment_bits": 8, "moment_block_size": block, "param_rounding": rounding},
    )

  @classmethod
  def of_state_dict(cls, what: str, sd: Mapping) -> _adapter.Reference | None:
    """None; a state dict with torchao's 8-bit moments is refused (the optimizer holds settings)."""
    if any(
      _adapter.is_8bit_state(v)
      for s in sd["state"].values()
      if isinstance(s, Mapping)
      for v in s.values()
    ):
      raise ValueError(
        f"{what}: the state dict holds torchao OptimState8bit moments; torchao "
        "keeps block_size, bf16_stochastic_round and AdamW-or-Adam on the optimizer, "
        "not in the state dict: pass the torchao optimizer itself."
      )
    return None

  @classmethod
  def refusal_hint(cls, optimizer: Any) -> str:
    if not type(optimizer).__module__.startswith("torchao"):
      return ""
    return (
      " (of torchao's optimizers only AdamW8bit and Adam8bit: 4-bit and FP8 moments are "
      "not implemented)"
    )

  def is_adamw(self, what: str, group: Mapping) -> bool:
    del what, group
    assert self.decoupled is not None  # the optimizer's is_adamw
    return self.decoupled

  def note(self) -> str:
    return f"{self.label}, "

  def moment(self, what: str, slot: _layout.TorchParam, key: str, value, leaf) -> Any:
    shape = np.shape(leaf)
    if not (_adapter.is_8bit_state(value) and self.quantizes(shape)):
      return super().moment(what, slot, key, value, leaf)  # full precision, or refused
    if _transposed(slot):
      raise ValueError(
        f"{what}: {slot.label()} maps to {slot.path!r} with axes {slot.axes}; an "
        "8-bit moment's blocks are consecutive elements in torch's layout and "
        "cannot be transposed: keep the torch layout for this leaf."
      )
    assert self.block_size is not None  # torchao's
    q = from_8bit(what, slot.label(), key, value, self.block_size)
    if q.codes.shape != shape:
      raise ValueError(
        f"{what}: {slot.label()} has {key} of shape {q.codes.shape}, but the JAX "
        f"leaf {slot.path!r} has shape {shape}."
      )
    return q

  def check(self, what: str, slot: _layout.TorchParam, moments: Sequence, comp: Any) -> None:
    quantized = [m for m in moments if isinstance(m, _quantize.QuantizedMoment)]
    for q in quantized:
      block = q.codes.size // q.scale.size
      if block != self.block_size:
        raise ValueError(
          f"{what}: the JAX state of {slot.path!r} has 8-bit moments in blocks of "
          f"{block}, but the torchao optimizer's block_size is {self.block_size}."
        )
      if _transposed(slot):
        raise ValueError(
          f"{what}: {slot.label()} maps to {slot.path!r} with axes {slot.axes}; "
          "8-bit blocks cannot be transposed: keep the torch layout for this leaf."
        )
    plain = [m for m in moments if m is not None and not isinstance(m, _quantize.QuantizedMoment)]
    if plain and self.quantizes(_adapter.shape(plain[0])):
      raise ValueError(
        f"{what}: the JAX state of {slot.path!r} has full-precision moments, but "
        f"{self.label} keeps 8-bit ones for a parameter of shape "
        f"{_adapter.shape(plain[0])}; make the transform with moment_bits=8, "
        f"moment_block_size={self.block_size}."
      )
    _adapter.refuse_compensation(what, slot, comp, self.label)

  def write_moment(self, x: Any, key: str, back: _adapter.Axes) -> Any:
    if isinstance(x, _quantize.QuantizedMoment):
      return to_8bit(x, key == "exp_avg", _adapter.torch().float32)
    return super().write_moment(x, key, back)
