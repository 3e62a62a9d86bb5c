"""The reference optimizers interop reads and writes: one adapter each, and which one a run is.

Each reference is one `adamw_jax._interop_adapter.Reference` subclass in a
module of its own; adding one is that module and its entry in `ADAPTERS`:

- ``torch.optim.AdamW`` / ``Adam``: torch's own state (`adamw_jax._interop_torch`);
- torchao's ``AdamW8bit`` / ``Adam8bit``: 8-bit moments (`adamw_jax._interop_torchao`);
- torch-optimi's ``AdamW`` / ``Adam``: debiased moments, Kahan compensation and a
  step per group (`adamw_jax._interop_optimi`).

Which optimizer a run comes from is told by the optimizer itself (its class),
or, for a state dict, by what the adapters find in it; a state dict that none
of the others claims is torch's.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from adamw_jax import _interop_adapter as _adapter
from adamw_jax import _interop_optimi, _interop_torch, _interop_torchao

Reference = _adapter.Reference

ADAPTERS: tuple[type[Reference], ...] = (
  _interop_torch.Torch,
  _interop_torchao.TorchAO,
  _interop_optimi.Optimi,
)
"""Every reference, in the order refusals name them; the first (torch's) takes any state dict."""


def of_optimizer(what: str, optimizer: Any) -> Reference:
  """The reference of a torch optimizer object; refuses the ones not supported."""
  for adapter in ADAPTERS:
    ref = adapter.of_optimizer(optimizer)
    if ref is not None:
      return ref
  names = [adapter.NAMES for adapter in ADAPTERS]
  hint = "".join(adapter.refusal_hint(optimizer) for adapter in ADAPTERS)
  raise TypeError(
    f"{what}: {_adapter.label(optimizer)} is not supported; only "
    f"{', '.join(names[:-1])} and {names[-1]} are{hint}."
  )


def of_state_dict(what: str, sd: Mapping) -> Reference:
  """The reference of a state dict: the first of the other adapters that claims it, else torch's."""
  for adapter in (*ADAPTERS[1:], ADAPTERS[0]):
    ref = adapter.of_state_dict(what, sd)
    if ref is not None:
      return ref
  raise AssertionError("torch's adapter takes any state dict")  # pragma: no cover
