"""The adapter one reference optimizer is to interop (detect, read, check, write), and its arrays.

`from_torch` and `to_torch_state_dict` (`adamw_jax._interop`) do what every
reference shares: the param groups' hyperparameters, which torch parameter is
which leaf, the step counts, the adamw_jax state filled or read. What differs
between references is one `Reference` subclass each, in a module of its own,
listed once in `adamw_jax._references`:

- **detect**: `of_optimizer` and `of_state_dict` tell whether an optimizer
  (or a state dict) is this reference's, and read the settings it keeps
  outside its param groups;
- **read**: `read_groups` gives each param group with torch's keys and the
  keyword arguments of ``adamw`` / ``adam`` it adds, `group_options` those that
  depend on the parameters' dtypes, `is_adamw` whether its weight decay is
  decoupled, and `read` one parameter's state as ``(step, mu, nu, nu_max,
  compensation)`` in the layout of its JAX leaf;
- **check**: `check` refuses JAX state that the optimizer has no place for;
- **write**: `write` gives one parameter's state-dict entry.

The array conversions they share are here: torch tensors to numpy and back
(bfloat16 included), a layout's axes, and one full-precision moment read with
the checks whose errors name the parameter and its leaf.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import jax.numpy as jnp
import numpy as np

from adamw_jax import _layout, _quantize

Axes = _layout.Axes


def torch():
  """The torch module, or an error that says how to install it."""
  try:
    import torch
  except ImportError as e:  # pragma: no cover - torch is in the test extra
    raise ImportError(
      "adamw_jax.from_torch / to_torch_state_dict need PyTorch: pip install 'adamw_jax[torch]'."
    ) from e
  return torch


def label(optimizer: Any) -> str:
  """An optimizer's class, as messages name it: ``module.Name``."""
  return f"{type(optimizer).__module__}.{type(optimizer).__name__}"


# --------------------------------------------------------------------------
# Arrays
# --------------------------------------------------------------------------


def to_numpy(t) -> np.ndarray:
  t = t.detach().cpu()
  if t.dtype == torch().bfloat16:
    return t.view(torch().int16).numpy().view(jnp.bfloat16)
  return t.numpy()


def to_tensor(x):
  x = np.array(x, order="C")  # a copy torch owns (np.ascontiguousarray would make 0-d 1-d)
  if x.dtype == jnp.bfloat16:
    return torch().from_numpy(x.view(np.int16)).view(torch().bfloat16)
  return torch().from_numpy(x)


def inverse(axes: Axes) -> Axes:
  return None if axes is None else tuple(int(a) for a in np.argsort(axes))


def permute(x: np.ndarray, axes: Axes) -> np.ndarray:
  return x if axes is None else np.transpose(x, axes)


def is_8bit_state(x: Any) -> bool:
  """A torchao ``OptimState8bit`` (told by its attributes: torchao need not be imported)."""
  return all(hasattr(x, a) for a in ("codes", "scale", "qmap", "signed"))


def shape(x) -> tuple[int, ...]:
  """A moment's shape: an array's, or a quantized moment's codes'."""
  return tuple(x.codes.shape if isinstance(x, _quantize.QuantizedMoment) else np.shape(x))


def moment_keys(amsgrad: bool) -> tuple[str, ...]:
  """torch's names of a parameter's moments."""
  return ("exp_avg", "exp_avg_sq", "max_exp_avg_sq") if amsgrad else ("exp_avg", "exp_avg_sq")


# --------------------------------------------------------------------------
# The adapter
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Reading:
  """What reading one torch parameter's state needs beyond the state: from its group."""

  amsgrad: bool
  step: int | None  # the group's step count, where the reference keeps one per group
  betas: tuple[float, float]


@dataclasses.dataclass(frozen=True)
class Reference(abc.ABC):
  """One reference optimizer's state format, as read from one optimizer (or state dict).

  Attributes:
    label: the optimizer's class, for messages.
    decoupled: AdamW (True) or Adam (False) when the optimizer says it, else None.
    options: keyword arguments of ``adamw`` / ``adam`` every group gets
      (torchao's ``moment_bits``, ``moment_block_size``, ``param_rounding``).
  """

  NAMES: ClassVar[str]
  """The optimizers this adapter reads, as the refusal of any other lists them."""
  TAKES_REMAINDER: ClassVar[bool] = False
  """Whether ``from_torch(..., param_rounding="remainder")`` continues its run."""

  label: str
  decoupled: bool | None = None
  options: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  @property
  def block_size(self) -> int | None:
    return self.options.get("moment_block_size")

  def quantizes(self, shape: tuple[int, ...]) -> bool:
    """Whether a leaf of `shape` gets 8-bit moments."""
    return self.block_size is not None and _quantize.quantizes(shape, self.block_size)

  def zeros(self, shape: tuple[int, ...], dtype) -> Any:
    """A moment before the first step: zeros, or a quantized moment of zero codes and scales."""
    if not self.quantizes(shape):
      return np.zeros(shape, dtype)
    assert self.block_size is not None  # quantizes says so
    blocks = np.zeros((int(np.prod(shape)) // self.block_size,), np.float32)
    return _quantize.QuantizedMoment(np.zeros(shape, np.uint8), blocks)

  # -- detect ----------------------------------------------------------------

  @classmethod
  @abc.abstractmethod
  def of_optimizer(cls, optimizer: Any) -> Reference | None:
    """The reference of a torch optimizer object, or None if it is not this adapter's."""

  @classmethod
  def of_state_dict(cls, what: str, sd: Mapping) -> Reference | None:
    """The reference of a state dict, or None if it is not this adapter's (the default)."""
    del what, sd
    return None

  @classmethod
  def refusal_hint(cls, optimizer: Any) -> str:
    """What the refusal of an unsupported `optimizer` adds (say, its sibling that is read)."""
    del optimizer
    return ""

  # -- read ------------------------------------------------------------------

  def read_groups(
    self, what: str, groups: Sequence[Mapping], ignore: Sequence[str]
  ) -> list[tuple[Mapping, dict]]:
    """Each param group with torch's keys, and the keyword arguments it adds to ``adamw``."""
    del what, ignore
    return [(g, dict(self.options)) for g in groups]

  def group_options(self, group: Mapping, dtypes: Sequence[Any]) -> dict:
    """More keyword arguments of param group `group`, whose leaves have `dtypes`."""
    del group, dtypes
    return {}

  def group_step(self, group: Mapping) -> int | None:
    """The step count of param group `group`, where the reference keeps one per group."""
    del group
    return None

  @abc.abstractmethod
  def is_adamw(self, what: str, group: Mapping) -> bool:
    """Whether the torch-keyed param group `group` decouples weight decay (AdamW)."""

  @abc.abstractmethod
  def read(
    self, what: str, slot: _layout.TorchParam, state: Mapping | None, leaf: Any, reading: Reading
  ) -> tuple:
    """(step, mu, nu, nu_max, compensation) of one parameter's state, in the layout of `leaf`."""

  # -- check and write -------------------------------------------------------

  @abc.abstractmethod
  def check(self, what: str, slot: _layout.TorchParam, moments: Sequence, comp: Any) -> None:
    """Refuses JAX state this optimizer has no place for (8-bit moments, a compensation)."""

  @abc.abstractmethod
  def write(
    self,
    slot: _layout.TorchParam,
    count: int,
    moments: Mapping[str, Any],
    comp: Any,
    back: Axes,
    group: dict,
  ) -> dict:
    """One parameter's state-dict entry (`group` is the state dict's own, to update).

    `moments` are torch's names to the JAX moments (None: AMSGrad off), `back`
    the axes to torch's layout, `count` the step and `comp` the compensation.
    """


# --------------------------------------------------------------------------
# What adapters share
# --------------------------------------------------------------------------


def check_keys(
  what: str, slot: _layout.TorchParam, state: Mapping, expected: set[str], note: str, amsgrad: bool
) -> None:
  """Refuses a parameter's state whose keys are not `expected` (`note`: which optimizer's)."""
  if set(state) != expected:
    extra, missing = sorted(set(state) - expected), sorted(expected - set(state))
    raise ValueError(
      f"{what}: the state of {slot.label()} has keys {sorted(state)}; expected "
      f"{sorted(expected)} ("
      + note
      + f"amsgrad={amsgrad})"
      + (f"; unexpected {extra}" if extra else "")
      + (f"; missing {missing}" if missing else "")
      + "."
    )


def full_moment(
  what: str, slot: _layout.TorchParam, key: str, value, leaf, ref: Reference
) -> np.ndarray:
  """One full-precision moment of one torch parameter, in the layout and dtype of `leaf`.

  Refuses an 8-bit moment where the leaf keeps full-precision ones, and the
  other way round.
  """
  shape, dtype = np.shape(leaf), jnp.result_type(leaf)
  quantized, is_8bit = ref.quantizes(shape), is_8bit_state(value)
  if quantized != is_8bit:
    raise ValueError(
      f"{what}: {slot.label()} has {'an 8-bit' if is_8bit else 'a full-precision'} {key}, but "
      f"the JAX leaf {slot.path!r} (shape {shape}) "
      f"{'gets 8-bit moments' if quantized else 'keeps full-precision moments'} "
      f"with moment_block_size={ref.block_size} (>= {_quantize.MIN_SIZE} elements, a "
      "multiple of the block size)."
    )
  x = permute(to_numpy(value), slot.axes)
  if x.shape != shape:
    hint = (
      " Linear / Conv weights need a transposed layout: pass names= and "
      "mapping=adamw_jax.flax_layout(params)."
      if slot.axes is None and len(shape) >= 2 and sorted(x.shape) == sorted(shape)
      else ""
    )
    raise ValueError(
      f"{what}: {slot.label()} has {key} of shape {x.shape}"
      + (f" (after axes {slot.axes})" if slot.axes else "")
      + f", but the JAX leaf {slot.path!r} has shape {shape}.{hint}"
    )
  if x.dtype != dtype:
    raise ValueError(
      f"{what}: {slot.label()} has {key} of dtype {x.dtype}, but the JAX leaf "
      f"{slot.path!r} has dtype {dtype}; cast the params to {x.dtype} first."
    )
  return x


def refuse_8bit(what: str, slot: _layout.TorchParam, moments: Sequence, target: str) -> None:
  """Refuses 8-bit JAX moments for a `target` optimizer that keeps full-precision ones."""
  if any(isinstance(m, _quantize.QuantizedMoment) for m in moments):
    raise ValueError(
      f"{what}: the JAX state of {slot.path!r} has 8-bit moments "
      f"(moment_bits=8), which {target} cannot hold; load it into "
      "torchao.optim.AdamW8bit / Adam8bit."
    )


def refuse_compensation(what: str, slot: _layout.TorchParam, comp: Any, target: str) -> None:
  """Refuses a JAX Kahan compensation for a `target` optimizer that keeps none."""
  if comp is not None:
    raise ValueError(
      f"{what}: the JAX state of {slot.path!r} has a Kahan compensation "
      f"(param_rounding='kahan'), which {target} cannot hold; load it into "
      "optimi.AdamW / Adam with kahan_sum=True."
    )
