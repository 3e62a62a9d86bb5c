"""The low-memory references in ``from_torch`` / ``to_torch_state_dict``: torchao and torch-optimi.

Which optimizer a run comes from is told by the optimizer itself (its class),
or, for a state dict, by its param groups' keys:

- ``torch.optim.AdamW`` / ``Adam``: the plain state (`adamw_jax._interop`).
- torchao's ``AdamW8bit`` / ``Adam8bit`` (``torchao.optim``): ``moment_bits=8``
  with ``moment_block_size`` its ``block_size``, and
  ``param_rounding="stochastic"`` where its ``bf16_stochastic_round`` is on.
  Those are attributes of the optimizer, not keys of its param groups, so a
  state dict alone does not say them: pass the optimizer. Its ``exp_avg``,
  ``exp_avg_sq`` (``max_exp_avg_sq``) of leaves that quantize are
  ``OptimState8bit`` tensors whose ``codes`` and ``scale`` are a
  [`QuantizedMoment`][adamw_jax.QuantizedMoment]'s, bit for bit.
- torch-optimi's ``AdamW`` / ``Adam``: ``kahan_sum`` gives
  ``param_rounding="kahan"`` (its ``kahan_comp`` is the ``compensation``,
  bit for bit); ``decouple_lr`` gives ``decay_mode="paper"`` with
  ``peak_learning_rate`` its ``max_lr``. It keeps one ``step`` per param
  group and *debiased* moments (``exp_avg = m / (1 - b1**t)``, ``exp_avg_sq =
  v / (1 - b2**t)``, from its debiased betas), which are converted to and
  from torch's biased ``m`` and ``v`` (one rounding to the moment's dtype each
  way). Its step is torch's AdamW in another order of operations, so a run
  continues close to optimi's, not bit for bit.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from adamw_jax import _hyperparams, _quantize

TORCH, TORCHAO, OPTIMI = "torch", "torchao", "optimi"

OPTIMI_IGNORED = ("params", "param_names", "foreach", "triton", "setup", "step")
"""torch-optimi's param-group keys that choose an implementation or hold the step count."""


@dataclasses.dataclass(frozen=True)
class Reference:
  """Which optimizer a torch state belongs to, and the low-memory options that follow from it.

  Attributes:
    kind: ``"torch"``, ``"torchao"`` or ``"optimi"``.
    label: the optimizer's class, for messages.
    decoupled: AdamW (True) or Adam (False) when the optimizer says it, else None.
    options: keyword arguments of ``adamw`` / ``adam`` every group gets
      (torchao's ``moment_bits``, ``moment_block_size``, ``param_rounding``).
  """

  kind: str
  label: str
  decoupled: bool | None = None
  options: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  @property
  def block_size(self) -> int | None:
    return self.options.get("moment_block_size")


PLAIN_TORCH = Reference(TORCH, "torch.optim.AdamW / Adam")


def _label(optimizer: Any) -> str:
  return f"{type(optimizer).__module__}.{type(optimizer).__name__}"


def of_optimizer(what: str, optimizer: Any) -> Reference:
  """The reference of a torch optimizer object; refuses the ones not supported."""
  import torch

  label = _label(optimizer)
  module, name = type(optimizer).__module__, type(optimizer).__name__
  if isinstance(optimizer, torch.optim.Adam):
    return Reference(TORCH, label)
  if module.startswith("torchao.optim") and name in ("AdamW8bit", "Adam8bit"):
    block = int(optimizer.block_size)
    rounding = "stochastic" if optimizer.bf16_stochastic_round else "nearest"
    return Reference(
      TORCHAO,
      label,
      bool(optimizer.is_adamw),
      {"moment_bits": 8, "moment_block_size": block, "param_rounding": rounding},
    )
  if module.startswith("optimi") and name in ("AdamW", "Adam"):
    return Reference(OPTIMI, label)
  hint = (
    " (of torchao's optimizers only AdamW8bit and Adam8bit: 4-bit and FP8 moments are "
    "not implemented)"
    if module.startswith("torchao")
    else ""
  )
  raise TypeError(
    f"{what}: {label} is not supported; only torch.optim.AdamW / Adam, "
    f"torchao.optim.AdamW8bit / Adam8bit and optimi.AdamW / Adam are{hint}."
  )


def is_8bit_state(x: Any) -> bool:
  """A torchao ``OptimState8bit`` (told by its attributes: torchao need not be imported)."""
  return all(hasattr(x, a) for a in ("codes", "scale", "qmap", "signed"))


def of_state_dict(what: str, sd: Mapping) -> Reference:
  """The reference of a state dict: torch-optimi's by its keys; torchao's is refused."""
  if any(
    is_8bit_state(v) for s in sd["state"].values() if isinstance(s, Mapping) for v in s.values()
  ):
    raise ValueError(
      f"{what}: the state dict holds torchao OptimState8bit moments; torchao "
      "keeps block_size, bf16_stochastic_round and AdamW-or-Adam on the optimizer, "
      "not in the state dict: pass the torchao optimizer itself."
    )
  if any("kahan_sum" in g or "beta1" in g for g in sd["param_groups"]):
    return Reference(OPTIMI, "optimi state dict")
  return Reference(TORCH, "torch state dict")


# --------------------------------------------------------------------------
# torch-optimi's param groups
# --------------------------------------------------------------------------


def optimi_group(what: str, i: int, group: Mapping, ignore) -> tuple[dict, dict]:
  """(a torch-keyed param group, the extra keyword arguments) for optimi's group `group`.

  ``kahan_sum`` is read by `optimi_kahan`, once the parameters' dtypes are known.
  """
  where = f"{what}: param group {i}"
  known = {
    "lr",
    "beta1",
    "beta2",
    "eps",
    "weight_decay",
    "decouple_wd",
    "decouple_lr",
    "max_lr",
    "kahan_sum",
    "gradient_release",
    *OPTIMI_IGNORED,
  }
  for key in group:
    if key not in known and key not in ignore:
      raise ValueError(
        f"{where} has the setting {key!r}={group[key]!r}, which torch-optimi's "
        "AdamW / Adam do not have and adamw_jax does not model. If it does not "
        f"change the update, pass ignore=({key!r},)."
      )
  if group.get("gradient_release"):
    raise ValueError(
      f"{where} has gradient_release=True: optimi then keeps a step per "
      "parameter and steps in the backward pass; from_torch reads optimi's "
      "optimizer step (gradient_release=False)."
    )
  torch_group = {
    "params": group["params"],
    "lr": group["lr"],
    "betas": (group["beta1"], group["beta2"]),
    "eps": group["eps"],
    "weight_decay": group["weight_decay"],
    "amsgrad": False,
    "maximize": False,
    _hyperparams.TORCH_DECOUPLED: bool(group.get("decouple_wd") or group.get("decouple_lr")),
  }
  if "param_names" in group:
    torch_group["param_names"] = group["param_names"]
  extra: dict[str, Any] = {}
  if group.get("decouple_lr"):
    peak = group.get("max_lr")
    extra.update(
      decay_mode="paper", peak_learning_rate=float(group["lr"] if peak is None else peak)
    )
  return torch_group, extra


def optimi_step(group: Mapping) -> int:
  """optimi's step count of a group (0 before its first step)."""
  step = group.get("step") if group.get("setup") else None
  return 0 if step is None else int(step.item() if hasattr(step, "item") else step)


def debias(beta: float, step: int) -> float:
  """``1 - beta**step``: torch's moment is optimi's times this (1.0 at step 0)."""
  return 1.0 - float(beta) ** step if step else 1.0


def from_optimi_moment(x: np.ndarray, beta: float, step: int) -> np.ndarray:
  """optimi's debiased moment as torch's (``x * (1 - beta**t)``, one rounding to x's dtype)."""
  return (x.astype(np.float64) * debias(beta, step)).astype(x.dtype)


def to_optimi_moment(x: np.ndarray, beta: float, step: int) -> np.ndarray:
  """torch's moment as optimi's debiased one (``x / (1 - beta**t)``, one rounding)."""
  return (x.astype(np.float64) / debias(beta, step)).astype(x.dtype)


# --------------------------------------------------------------------------
# torchao's 8-bit moments
# --------------------------------------------------------------------------


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
  import torch
  from torchao.optim.subclass_8bit import (
    OptimState8bit,
    get_qmap_signed,
    get_qmap_unsigned,
  )

  qmap = torch.tensor(get_qmap_signed() if signed else get_qmap_unsigned(), dtype=torch.float32)
  codes = torch.from_numpy(np.array(q.codes, np.uint8, order="C"))
  scale = torch.from_numpy(np.array(q.scale, np.float32, order="C"))
  return OptimState8bit(codes, scale, qmap, signed, dtype=dtype)


def optimi_kahan(group: Mapping, dtypes) -> bool:
  """Whether optimi compensates parameters of `dtypes`: a low-precision one, ``kahan_sum`` not False.

  (optimi keeps ``kahan_comp`` for bfloat16 and float16 parameters only.)
  """
  kahan = group.get("kahan_sum")
  low = any(np.dtype(d) in (np.dtype(jnp.bfloat16), np.dtype(jnp.float16)) for d in dtypes)
  return low and (kahan is None or bool(kahan))
