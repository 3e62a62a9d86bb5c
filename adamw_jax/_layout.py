"""Which torch parameter is which pytree leaf: by order, or by name through a mapping.

A mapping takes a torch parameter name (``named_parameters()``) to a
'/'-joined pytree path, or to ``(path, axes)`` when the layouts differ (torch
array -> JAX array is ``np.transpose(x, axes)``). [`flax_layout`][adamw_jax.flax_layout] is the
ready one for Flax models.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from adamw_jax import _tree

Axes = tuple[int, ...] | None
Target = str | tuple[str, Axes]
Mapper = Mapping[str, Target] | Callable[[str], Target]
Rename = Mapping[str, str] | Callable[[str], str]  # torch module name -> Flax module path


@dataclasses.dataclass(frozen=True)
class TorchParam:
  """One torch parameter: its state-dict index, name, group and pytree leaf."""

  index: int
  name: str | None
  group: int
  path: str
  axes: Axes  # torch array -> JAX array is np.transpose(x, axes); None: as is

  def label(self) -> str:
    return f"torch parameter {self.index}" + (f" ({self.name!r})" if self.name else "")


def _module_candidates(module: str) -> list[str]:
  parts = module.split(".") if module else []
  out = ["/".join(parts)]
  if len(parts) > 1:
    out.append("/".join([*parts[:-2], "_".join(parts[-2:])]))  # Linen: layers.0 -> layers_0
  return out


def flax_layout(params: Any, rename: Rename | None = None) -> Callable[[str], tuple[str, Axes]]:
  """A mapping from torch parameter names to the leaves of a Flax (Linen or NNX) model.

  ``"<module>.weight"`` goes to the module's ``kernel``, ``scale`` or
  ``embedding``, whichever `params` has at ``<module>`` (dots become
  slashes: ``encoder.fc1.weight`` -> ``encoder/fc1/kernel``; ``layers.0`` is
  also tried as Linen's ``layers_0``); every other name keeps its attribute
  (``fc1.bias`` -> ``fc1/bias``). Layouts:

  | torch | Flax | axes (torch -> Flax) |
  |---|---|---|
  | `Linear.weight` `(out, in)` | `Dense.kernel` | `(in, out)` |
  | `Conv1d/2d/3d.weight` `(O, I, *spatial)` | `Conv.kernel` | `(*spatial, I, O)` |
  | `LayerNorm/BatchNorm/...weight` | `scale` | as is |
  | `Embedding.weight` | `embedding` | as is |

  ``ConvTranspose`` and fused attention projections have other layouts: map
  them with your own function (see [`from_torch`][adamw_jax.from_torch]).

  >>> import jax.numpy as jnp, adamw_jax
  >>> params = {"fc": {"kernel": jnp.zeros((3, 2)), "bias": jnp.zeros(2)}}
  >>> mapping = adamw_jax.flax_layout(params)
  >>> mapping("fc.weight"), mapping("fc.bias")  # torch's (out, in) weight is Flax's (in, out) kernel
  (('fc/kernel', (1, 0)), ('fc/bias', None))

  Args:
    params: the JAX parameters (a dict, a Linen ``params`` tree or an
      ``nnx.State``).
    rename: torch module name -> Flax module path, for modules named
      differently (a mapping, or a callable); e.g. ``{"features.0": "conv1"}``.

  Returns:
    ``name -> (path, axes)``, for the `mapping` argument of [`from_torch`][adamw_jax.from_torch]
    and [`to_torch_state_dict`][adamw_jax.to_torch_state_dict].
  """
  paths = dict(_tree.flatten_params(params)[0])

  def renamed(module: str) -> list[str]:
    if rename is None:
      return _module_candidates(module)
    new = rename.get(module, module) if isinstance(rename, Mapping) else rename(module)
    return [new] if new != module else _module_candidates(module)

  def mapping(name: str) -> tuple[str, Axes]:
    module, _, attr = name.rpartition(".")
    candidates = renamed(module)
    for base in candidates:
      prefix = f"{base}/" if base else ""
      if attr == "weight":
        for child in ("kernel", "scale", "embedding"):
          leaf = paths.get(prefix + child)
          if leaf is not None:
            ndim = np.ndim(leaf)
            axes = (*tuple(range(2, ndim)), 1, 0) if child == "kernel" and ndim >= 2 else None
            return prefix + child, axes
      elif prefix + attr in paths:
        return prefix + attr, None
    wanted = "kernel, scale or embedding" if attr == "weight" else repr(attr)
    raise ValueError(
      f"flax_layout: no Flax leaf for the torch parameter {name!r}: looked for {wanted} under "
      f"{' and '.join(repr(c or '<root>') for c in candidates)}; the parameter paths are "
      f"{_tree.describe_paths(paths, limit=12)}. Pass rename= for modules named differently."
    )

  return mapping


def apply_mapping(mapping: Mapper | None, name: str) -> tuple[str, Axes]:
  if mapping is None:
    target: Any = name.replace(".", "/")
  elif isinstance(mapping, Mapping):
    if name not in mapping:
      raise ValueError(f"the mapping has no entry for the torch parameter {name!r}.")
    target = mapping[name]
  else:
    target = mapping(name)
  if isinstance(target, str):
    return target, None
  path, axes = target
  return path, None if axes is None else tuple(int(a) for a in axes)


def param_names(
  what: str, names: Any, mapping: Mapper | None, groups: Sequence[Mapping], tensors
) -> list[str | None]:
  """Each torch parameter's name, in state-dict order (None when matching by order).

  Without `names`, a `mapping` takes the names torch stores in the state dict
  (``param_names``, when the optimizer was built from ``named_parameters()``).
  """
  count = sum(len(g["params"]) for g in groups)
  if names is None:
    if mapping is None:
      return [None] * count
    if not all("param_names" in g for g in groups):
      raise ValueError(
        f"{what}: mapping= needs the torch parameter names: pass names= (the "
        "torch module, or a list of names), or build the optimizer from "
        "model.named_parameters() so that its state dict has them."
      )
    return [n for g in groups for n in g["param_names"]]
  if callable(getattr(names, "named_parameters", None)):  # a torch.nn.Module
    if tensors is None:
      raise TypeError(
        f"{what}: names=<module> needs the optimizer itself (its parameters are "
        "matched to the module's by identity), not its state_dict()."
      )
    by_id = {id(p): n for n, p in names.named_parameters()}
    missing = [i for i, t in enumerate(tensors) if id(t) not in by_id]
    if missing:
      raise ValueError(
        f"{what}: torch parameter {missing[0]} of the optimizer is not a parameter "
        "of the module given as names=."
      )
    return [by_id[id(t)] for t in tensors]
  names = list(names)
  if len(names) != count or not all(isinstance(n, str) for n in names):
    raise ValueError(
      f"{what}: names= must be {count} strings (one per torch parameter, in the "
      f"optimizer's order), got {len(names)} items."
    )
  return names


def match(
  what: str,
  groups: Sequence[Mapping],
  names: list[str | None],
  leaves: Mapping[str, tuple],
  mapping: Mapper | None,
) -> list[TorchParam]:
  """Pairs each torch parameter with a leaf; every leaf exactly once."""
  indices = [(gi, i) for gi, g in enumerate(groups) for i in g["params"]]
  paths = list(leaves)
  if names[0] is None and indices:
    if len(indices) != len(paths):
      raise ValueError(
        f"{what}: the torch optimizer has {len(indices)} parameters and the JAX params have "
        f"{len(paths)} leaves; matched by order they must be as many (pass names= and "
        "mapping= to match by name)."
      )
    return [TorchParam(i, None, gi, path, None) for (gi, i), path in zip(indices, paths)]
  slots, taken = [], {}
  for (gi, i), name in zip(indices, names):
    assert name is not None  # matched by name: param_names gives every name
    try:
      path, axes = apply_mapping(mapping, name)
    except ValueError as e:
      raise ValueError(f"{what}: {e}") from e
    if path not in leaves:
      close = difflib.get_close_matches(path, paths, n=1)
      hint = (
        f" (did you mean {close[0]!r}?)"
        if close
        else f"; the paths are {_tree.describe_paths(paths, limit=12)}"
      )
      raise ValueError(
        f"{what}: the torch parameter {name!r} maps to {path!r}, which is not a "
        f"leaf of the JAX params{hint}."
      )
    if path in taken:
      raise ValueError(
        f"{what}: the torch parameters {taken[path]!r} and {name!r} both map to the leaf {path!r}."
      )
    taken[path] = name
    slots.append(TorchParam(i, name, gi, path, axes))
  left = [p for p in paths if p not in taken]
  if left:
    raise ValueError(
      f"{what}: no torch parameter maps to the JAX leaf {left[0]!r}"
      + (f" (and {len(left) - 1} more)" if len(left) > 1 else "")
      + "; the optimizer must hold every leaf of the params."
    )
  return slots
