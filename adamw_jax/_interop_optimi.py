"""The interop adapter of torch-optimi's ``AdamW`` / ``Adam``: debiased moments, Kahan, a group step.

``kahan_sum`` gives ``param_rounding="kahan"`` (its ``kahan_comp`` is the
``compensation``, bit for bit); ``decouple_lr`` gives ``decay_mode="paper"``
with ``peak_learning_rate`` its ``max_lr``. It keeps one ``step`` per param
group and *debiased* moments (``exp_avg = m / (1 - b1**t)``, ``exp_avg_sq =
v / (1 - b2**t)``, from its debiased betas), which are converted to and from
torch's biased ``m`` and ``v`` (one rounding to the moment's dtype each way).
Its step is torch's AdamW in another order of operations, so a run continues
close to optimi's, not bit for bit. A state dict is optimi's when a param
group has ``kahan_sum`` or ``beta1``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import jax.numpy as jnp
import numpy as np

from adamw_jax import _hyperparams, _layout
from adamw_jax import _interop_adapter as _adapter

IGNORED = ("params", "param_names", "foreach", "triton", "setup", "step")
"""torch-optimi's param-group keys that choose an implementation or hold the step count."""

_KNOWN = (
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
  *IGNORED,
)
_DEBIASED = ("exp_avg", "exp_avg_sq")


def torch_group(what: str, i: int, group: Mapping, ignore) -> tuple[dict, dict]:
  """(a torch-keyed param group, the extra keyword arguments) for optimi's group `group`.

  ``kahan_sum`` is read by `kahan`, once the parameters' dtypes are known.
  """
  where = f"{what}: param group {i}"
  for key in group:
    if key not in _KNOWN and key not in ignore:
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
  out = {
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
    out["param_names"] = group["param_names"]
  extra: dict[str, Any] = {}
  if group.get("decouple_lr"):
    peak = group.get("max_lr")
    extra.update(
      decay_mode="paper", peak_learning_rate=float(group["lr"] if peak is None else peak)
    )
  return out, extra


def step(group: Mapping) -> int:
  """optimi's step count of a group (0 before its first step)."""
  value = group.get("step") if group.get("setup") else None
  return 0 if value is None else int(value.item() if hasattr(value, "item") else value)


def kahan(group: Mapping, dtypes) -> bool:
  """Whether optimi compensates parameters of `dtypes`: a low-precision one, ``kahan_sum`` not False.

  (optimi keeps ``kahan_comp`` for bfloat16 and float16 parameters only.)
  """
  kahan_sum = group.get("kahan_sum")
  low = any(np.dtype(d) in (np.dtype(jnp.bfloat16), np.dtype(jnp.float16)) for d in dtypes)
  return low and (kahan_sum is None or bool(kahan_sum))


def debias(beta: float, step: int) -> float:
  """``1 - beta**step``: torch's moment is optimi's times this (1.0 at step 0)."""
  return 1.0 - float(beta) ** step if step else 1.0


def from_optimi_moment(x: np.ndarray, beta: float, step: int) -> np.ndarray:
  """optimi's debiased moment as torch's (``x * (1 - beta**t)``, one rounding to x's dtype)."""
  return (x.astype(np.float64) * debias(beta, step)).astype(x.dtype)


def to_optimi_moment(x: np.ndarray, beta: float, step: int) -> np.ndarray:
  """torch's moment as optimi's debiased one (``x / (1 - beta**t)``, one rounding)."""
  return (x.astype(np.float64) / debias(beta, step)).astype(x.dtype)


class Optimi(_adapter.Reference):
  """torch-optimi's ``AdamW`` / ``Adam`` (the optimizers and their state dicts)."""

  NAMES: ClassVar[str] = "optimi.AdamW / Adam"

  @classmethod
  def of_optimizer(cls, optimizer: Any) -> _adapter.Reference | None:
    module, name = type(optimizer).__module__, type(optimizer).__name__
    if module.startswith("optimi") and name in ("AdamW", "Adam"):
      return cls(_adapter.label(optimizer))
    return None

  @classmethod
  def of_state_dict(cls, what: str, sd: Mapping) -> _adapter.Reference | None:
    del what
    if any("kahan_sum" in g or "beta1" in g for g in sd["param_groups"]):
      return cls("optimi state dict")
    return None

  def read_groups(
    self, what: str, groups: Sequence[Mapping], ignore: Sequence[str]
  ) -> list[tuple[Mapping, dict]]:
    return [torch_group(what, i, g, ignore) for i, g in enumerate(groups)]

  def group_options(self, group: Mapping, dtypes: Sequence[Any]) -> dict:
    return {"param_rounding": "kahan"} if kahan(group, dtypes) else {}

  def group_step(self, group: Mapping) -> int | None:
    return step(group)

  def is_adamw(self, what: str, group: Mapping) -> bool:
    del what
    return bool(group[_hyperparams.TORCH_DECOUPLED])  # torch_group sets it

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
      return (reading.step or 0), moment, moment, (moment if amsgrad else None), None
    keys = _adapter.moment_keys(amsgrad)
    expected = {"exp_avg", "exp_avg_sq", "kahan_comp"}
    _adapter.check_keys(what, slot, state, expected, f"{self.label}, ", amsgrad)
    assert reading.step is not None  # optimi's group step
    out = []
    for key in keys:
      x = _adapter.full_moment(what, slot, key, state[key], leaf, self)
      if key in _DEBIASED:
        x = from_optimi_moment(x, reading.betas[0 if key == "exp_avg" else 1], reading.step)
      out.append(x)
    comp = state["kahan_comp"]  # None, or a uint8 placeholder (triton)
    if comp is not None and comp.is_floating_point():
      comp = _adapter.full_moment(what, slot, "kahan_comp", comp, leaf, self)
    else:
      comp = None
    return (reading.step, out[0], out[1], out[2] if amsgrad else None, comp)

  def check(self, what: str, slot: _layout.TorchParam, moments: Sequence, comp: Any) -> None:
    del comp  # optimi keeps one
    _adapter.refuse_8bit(what, slot, moments, self.label)

  def write(
    self,
    slot: _layout.TorchParam,
    count: int,
    moments: Mapping[str, Any],
    comp: Any,
    back: _adapter.Axes,
    group: dict,
  ) -> dict:
    del slot
    torch = _adapter.torch()
    entry: dict[str, Any] = {}
    for key, x in moments.items():
      if x is None:
        continue
      x = _adapter.permute(x, back)
      if key in _DEBIASED:
        beta: Any = group.get("beta1" if key == "exp_avg" else "beta2")
        x = to_optimi_moment(x, beta, count)
      entry[key] = _adapter.to_tensor(x)
    mu = moments["exp_avg"]
    if comp is None and kahan(group, [mu.dtype]):
      comp = np.zeros(mu.shape, mu.dtype)  # optimi compensates this one: from zero
    entry["kahan_comp"] = None if comp is None else _adapter.to_tensor(_adapter.permute(comp, back))
    group["step"], group["setup"] = torch.tensor(count, dtype=torch.int32), True
    return entry
