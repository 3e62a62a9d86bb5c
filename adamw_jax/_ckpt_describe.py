"""What a checkpoint says about its state, and the comparison with a target that names what differs.

The description is JSON: every leaf's path, shape and dtype (``None`` and
``optax.MaskedNode`` included, so AMSGrad and parameter groups show; a typed
PRNG key as ``key<fry>``, its implementation kept), the pytree node types
(the treedef, and each node's class by module and name), the whole layout of
every :class:`~adamw_jax.FlatParams` (which the treedef's text abbreviates),
an optional user ``config``, and a CRC-32 of the description itself.
"""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import tree_util as jtu

from adamw_jax import _tree
from adamw_jax._flat import FlatParams

FORMAT = 3
READS = (1, 2, 3)  # 1: no CRCs; 2: a CRC-32 per fully addressable leaf; 3: sums, keys, layouts


def is_empty(x) -> bool:
  return x is None or isinstance(x, optax.MaskedNode)


def is_key(x) -> bool:
  """A typed PRNG key array (``jax.random.key``), concrete or abstract."""
  return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def _describe_leaf(x) -> str:
  if x is None:
    return "None"
  if isinstance(x, optax.MaskedNode):
    return "MaskedNode"
  if is_key(x):
    return f"{x.dtype}{list(np.shape(x))}"
  dtype = np.dtype(x.dtype) if hasattr(x, "dtype") else np.result_type(x)
  return f"{dtype.name}{list(np.shape(x))}"


def key(path) -> str:
  return _tree.path_str(path) or "<root>"


def leaves(tree) -> list[tuple[str, Any]]:
  """(path, leaf) for every leaf of a state, None and MaskedNode included."""
  return [(key(p), x) for p, x in jtu.tree_flatten_with_path(tree, is_leaf=is_empty)[0]]


def _node_types(treedef) -> list[str]:
  """The classes of the tree's nodes, by module and name, each once, in tree order."""
  out: list[str] = []

  def visit(node) -> None:
    data = node.node_data()
    if data is None:
      return
    name = f"{data[0].__module__}.{data[0].__qualname__}"
    if name not in out:
      out.append(name)
    for child in node.children():
      visit(child)

  visit(treedef)
  return out


def _layout(flat: FlatParams) -> dict[str, Any]:
  layout = flat.layout
  return {
    "leaves": {
      path: [layout.names[s.child], s.start, list(s.shape)]
      for path, s in zip(layout.paths, layout.slots)
    },
    "treedef": str(layout.treedef),
  }


def describe(tree) -> dict[str, Any]:
  """The description a checkpoint stores of `tree` (no CRC, checksums or config)."""
  treedef = jax.tree.structure(tree, is_leaf=is_empty)
  nodes = jtu.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, FlatParams))[0]
  return {
    "format": FORMAT,
    "leaves": {p: _describe_leaf(x) for p, x in leaves(tree)},
    "structure": str(treedef),
    "node_types": _node_types(treedef),
    "layouts": {key(p): _layout(x) for p, x in nodes if isinstance(x, FlatParams)},
  }


def self_crc(meta: Mapping[str, Any]) -> int:
  """CRC-32 of the description without its own CRC, as JSON with sorted keys."""
  rest = {k: v for k, v in meta.items() if k != "checksum"}
  return zlib.crc32(json.dumps(rest, sort_keys=True).encode())


# --------------------------------------------------------------------------
# The config: JSON values only, checked where they are given
# --------------------------------------------------------------------------


def _check_json(value, where: str, who: str) -> None:
  if value is None or isinstance(value, (bool, int, str)):
    return
  if isinstance(value, float):
    if not math.isfinite(value):
      raise ValueError(
        f"{who}: config{where} is {value!r}, which JSON cannot hold and which never equals "
        "itself: give a finite number, or a string such as 'nan'."
      )
    return
  if isinstance(value, (list, tuple)):
    for i, item in enumerate(value):
      _check_json(item, f"{where}[{i}]", who)
    return
  if isinstance(value, Mapping):
    for k, item in value.items():
      if not isinstance(k, str):
        raise TypeError(f"{who}: config{where} has the key {k!r}: JSON keys are strings.")
      _check_json(item, f"{where}[{k!r}]", who)
    return
  kind = type(value)
  name = "jax.Array" if isinstance(value, jax.Array) else f"{kind.__module__}.{kind.__qualname__}"
  if hasattr(value, "dtype"):
    name += f" ({value.dtype}{list(np.shape(value))}: convert it, e.g. float(x) or x.tolist())"
  raise TypeError(
    f"{who}: config{where} is a {name}; a config holds JSON values: None, bool, int, float, "
    "str, lists and dicts."
  )


def config_json(config: Mapping[str, Any] | None, who: str) -> dict[str, Any] | None:
  """`config` as JSON reads it back (tuples become lists), after checking that JSON can hold it."""
  if config is None:
    return None
  if not isinstance(config, Mapping):
    raise TypeError(f"{who}: config must be a dict of JSON values, not {type(config).__name__}.")
  _check_json(config, "", who)
  return json.loads(json.dumps(dict(config)))


def compare_config(saved: Mapping | None, given: Mapping | None, directory: str, who: str) -> None:
  given = config_json(given, who)
  if given is None:
    return
  what = f"{who}: the checkpoint at {directory!r} was saved with another config"
  if saved is None:
    raise ValueError(f"{what}: it has none, and config={given!r} was given.")
  for k in sorted(set(saved) | set(given)):
    if saved.get(k, "<missing>") != given.get(k, "<missing>"):
      raise ValueError(
        f"{what}: {k!r} is {saved.get(k, '<missing>')!r} in the checkpoint "
        f"and {given.get(k, '<missing>')!r} here."
      )


# --------------------------------------------------------------------------
# Comparing a checkpoint's description with the target's
# --------------------------------------------------------------------------


def _groups(leaves: Mapping[str, str]) -> list[str]:
  """The param_groups (optax.partition) group names of a described state."""
  out = []
  for path in leaves:
    parts = path.split("/")
    for i, part in enumerate(parts[:-1]):
      if part == "inner_states" and parts[i + 1] not in out:
        out.append(parts[i + 1])
  return out


def _amsgrad_off(a: Mapping[str, str], b: Mapping[str, str]) -> list[str]:
  """Paths of an Adam state's nu_max that is None in `a` and holds arrays in `b`."""
  return sorted(
    p
    for p, d in a.items()
    if p.split("/")[-1] == "nu_max" and d == "None" and any(q.startswith(p + "/") for q in b)
  )


def _under(a: Mapping[str, str], b: Mapping[str, str]) -> str | None:
  """The prefix under which `b` holds every leaf of `a` (a state inside a chain, say), if any."""
  first = next(iter(a))
  for path in b:
    if path.endswith("/" + first):
      prefix = path[: -len(first)]
      if all(b.get(prefix + p) == d for p, d in a.items()):
        return prefix
  return None


def _structure_hint(saved: Mapping[str, Any], wanted: Mapping[str, Any]) -> str:
  a, b = saved["leaves"], wanted["leaves"]
  ga, gb = _groups(a), _groups(b)
  if ga != gb:
    describe_groups = lambda g: f"param groups {g}" if g else "no param groups"
    return f" (the checkpoint has {describe_groups(ga)}, the target {describe_groups(gb)})"
  if off := _amsgrad_off(b, a):
    return f" (AMSGrad: the checkpoint has {off[0]!r}, the target has it None)"
  if off := _amsgrad_off(a, b):
    return f" (AMSGrad: the target has {off[0]!r}, the checkpoint has it None)"
  if a and (prefix := _under(a, b)):
    return (
      f" (the target holds a state like the checkpoint's under {prefix!r}, inside a chain or "
      "inject_hyperparams: restore into that part of the target, or save the whole state)"
    )
  if b and (prefix := _under(b, a)):
    return f" (the checkpoint holds a state like the target under {prefix!r})"
  types_a, types_b = saved.get("node_types"), wanted["node_types"]
  if types_a is not None and types_a != types_b:
    only_a = [t for t in types_a if t not in types_b]
    only_b = [t for t in types_b if t not in types_a]
    return (
      f" (the state of another transform: node types only in the checkpoint: {only_a}, "
      f"only in the target: {only_b})"
    )
  return ""


def _compare_layouts(saved: Mapping[str, Any], wanted: Mapping[str, Any], what: str) -> None:
  """Every FlatParams of the target has the layout of the checkpoint's, compared whole."""
  for node, mine in wanted.items():
    theirs = saved.get(node)
    if theirs is None:  # the leaves and node types already matched: cannot happen
      raise ValueError(f"{what}: the checkpoint has no FlatParams layout at {node!r}.")
    a, b = theirs["leaves"], mine["leaves"]
    where = f"the FlatParams at {node!r} packs another model tree"
    for path in [*a, *(p for p in b if p not in a)]:
      if path not in a or path not in b:
        side = "checkpoint's" if path in a else "target's"
        raise ValueError(f"{what}: {where}: leaf {path!r} is only in the {side}.")
      if a[path] != b[path]:
        raise ValueError(
          f"{what}: {where}: leaf {path!r} is {_slot(a[path])} in the checkpoint and "
          f"{_slot(b[path])} in the target."
        )
    if list(a) != list(b) or theirs["treedef"] != mine["treedef"]:
      raise ValueError(
        f"{what}: {where}: the same leaves, in another order or other node types:\n"
        f"  checkpoint: {theirs['treedef']}\n  target:     {mine['treedef']}"
      )


def _slot(slot: list) -> str:
  buffer, start, shape = slot
  if start is None:
    return f"a child of its own ({buffer!r}), shape {shape}"
  return f"in buffer {buffer!r} at offset {start}, shape {shape}"


def compare(saved: Mapping[str, Any], wanted: Mapping[str, Any], directory: str, who: str) -> None:
  """Raises ValueError naming the first difference between two descriptions."""
  what = f"{who}: the checkpoint at {directory!r} does not fit the target"
  a, b = saved["leaves"], wanted["leaves"]
  only_saved = [p for p in a if p not in b]
  only_target = [p for p in b if p not in a]
  if only_saved or only_target:
    lines = [f"  only in the checkpoint: {p!r} ({a[p]})" for p in only_saved[:4]]
    lines += [f"  only in the target: {p!r} ({b[p]})" for p in only_target[:4]]
    more = len(only_saved) + len(only_target) - len(lines)
    raise ValueError(
      f"{what}: different tree structure{_structure_hint(saved, wanted)}:\n"
      + "\n".join(lines)
      + (f"\n  ... and {more} more" if more > 0 else "")
    )
  for path in b:
    if a[path] != b[path]:
      kind = "dtype" if a[path].split("[")[1:] == b[path].split("[")[1:] else "shape"
      raise ValueError(
        f"{what}: different {kind} at {path!r}: the checkpoint has {a[path]}, the target {b[path]}."
      )
  if saved["structure"] != wanted["structure"]:
    raise ValueError(
      f"{what}: same leaves, different pytree node types:\n"
      f"  checkpoint: {saved['structure']}\n  target:     {wanted['structure']}"
    )
  if saved.get("layouts") is not None or wanted["layouts"]:
    _compare_layouts(saved.get("layouts") or {}, wanted["layouts"], what)
