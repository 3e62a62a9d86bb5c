"""The interop adapters' registry: each reference optimizer is told by exactly one adapter.

``adamw_jax._references.ADAPTERS`` is the one list of references; detection,
the refusal of any other optimizer and its list of what is supported all come
from it (a new reference is one module and its entry there).
"""

from __future__ import annotations

import inspect
from typing import Any, ClassVar

import optimi
import pytest
import torch
from torchao.optim import Adam8bit, AdamW4bit, AdamW8bit

import adamw_jax
from adamw_jax import _interop_optimi, _interop_torch, _interop_torchao, _references


def _params():
  return [torch.nn.Parameter(torch.zeros(8))]


# optimizer class, the adapter that reads it, AdamW (True) or Adam (False)
OPTIMIZERS = [
  (torch.optim.AdamW, _interop_torch.Torch, True),
  (torch.optim.Adam, _interop_torch.Torch, False),
  (AdamW8bit, _interop_torchao.TorchAO, True),
  (Adam8bit, _interop_torchao.TorchAO, False),
  (optimi.AdamW, _interop_optimi.Optimi, None),
  (optimi.Adam, _interop_optimi.Optimi, None),
]


def test_every_adapter_is_registered_once_and_complete():
  assert len(set(_references.ADAPTERS)) == len(_references.ADAPTERS)
  assert {a for _, a, _ in OPTIMIZERS} == set(_references.ADAPTERS)
  for adapter in _references.ADAPTERS:
    assert not inspect.isabstract(adapter), adapter


@pytest.mark.parametrize(("cls", "adapter", "adamw"), OPTIMIZERS, ids=lambda x: str(x)[:40])
def test_each_optimizer_is_detected_by_exactly_its_own_adapter(cls, adapter, adamw):
  optimizer = cls(_params(), lr=1e-3)
  claims = [a for a in _references.ADAPTERS if a.of_optimizer(optimizer) is not None]
  assert claims == [adapter]
  ref = _references.of_optimizer("from_torch", optimizer)
  assert type(ref) is adapter and ref.label.endswith(cls.__name__)
  if adamw is not None:  # the optimizer's class says it (optimi: its param groups do)
    assert ref.decoupled is adamw


def test_state_dicts_are_told_by_their_keys_torchs_by_default():
  plain = torch.optim.AdamW(_params()).state_dict()
  assert type(_references.of_state_dict("from_torch", plain)) is _interop_torch.Torch
  sd = optimi.AdamW(_params(), lr=1e-3).state_dict()
  assert type(_references.of_state_dict("from_torch", sd)) is _interop_optimi.Optimi


@pytest.mark.parametrize(
  ("cls", "match"),
  [
    (
      torch.optim.SGD,
      r"^from_torch: torch\.optim\.sgd\.SGD is not supported; only torch\.optim\.AdamW / "
      r"Adam, torchao\.optim\.AdamW8bit / Adam8bit and optimi\.AdamW / Adam are\.$",
    ),
    (AdamW4bit, r"are \(of torchao's optimizers only AdamW8bit and Adam8bit: 4-bit and FP8"),
  ],
)
def test_an_unknown_optimizer_is_refused_naming_every_adapter(cls, match):
  with pytest.raises(TypeError, match=match):
    adamw_jax.from_torch(cls(_params(), lr=1e-3), [torch.zeros(8).numpy()])


class _SGD(_interop_torch.Torch):
  """A stand-in adapter: what a new reference adds (here only its detection)."""

  NAMES: ClassVar[str] = "torch.optim.SGD"

  @classmethod
  def of_optimizer(cls, optimizer: Any):
    return cls("sgd") if isinstance(optimizer, torch.optim.SGD) else None


def test_a_registered_adapter_is_detected_and_listed(monkeypatch):
  sgd, rprop = torch.optim.SGD(_params(), lr=1e-3), torch.optim.Rprop(_params())
  monkeypatch.setattr(_references, "ADAPTERS", (*_references.ADAPTERS, _SGD))
  assert type(_references.of_optimizer("from_torch", sgd)) is _SGD
  with pytest.raises(TypeError, match=r"optimi\.AdamW / Adam and torch\.optim\.SGD are\.$"):
    _references.of_optimizer("from_torch", rprop)
  # from_torch goes through the registry: SGD's param groups are then read as torch's
  with pytest.raises(ValueError, match=r"param group 0 has the setting 'momentum'=0"):
    adamw_jax.from_torch(sgd, [torch.zeros(8).numpy()])
