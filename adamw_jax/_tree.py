"""Pytrees of parameters: their paths, boxes and masks, and checks whose errors name the path.

Messages name a place in a tree with `where` (the quoted '/'-joined
path, or "the root") and list example paths with `describe_paths`, so
that they read the same across the package.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.core
import jax.numpy as jnp
import numpy as np
import optax
from jax import tree_util as jtu

MaskOrFn = Any | Callable[[Any], Any]
KeyPath = tuple[Any, ...]


def is_box(x) -> bool:
  """A wrapper around one parameter: an ``nnx.Variable`` (e.g. ``nnx.Param``) or a Linen box.

  Linen boxes are ``flax.core.meta.AxisMetadata`` such as ``nn.Partitioned``.
  Both are pytree nodes whose single child is the array (key path ``.../value``);
  masks and path rules treat them as the parameter itself. Checked through
  ``sys.modules``, so Flax is not imported here: if it is not loaded, no box
  can exist.
  """
  nnx_vars = sys.modules.get("flax.nnx.variablelib")
  if nnx_vars is not None:
    kinds = tuple(
      k
      for k in (vars(nnx_vars).get("Variable"), vars(nnx_vars).get("VariableState"))
      if isinstance(k, type)
    )
    if kinds and isinstance(x, kinds):
      return True
  meta = sys.modules.get("flax.core.meta")
  return meta is not None and isinstance(x, meta.AxisMetadata)


def unbox(x):
  """The value inside a box (see `is_box`); anything else unchanged."""
  if not is_box(x):
    return x
  if hasattr(x, "get_value"):  # nnx.Variable (flax >= 0.12)
    return x.get_value()
  if hasattr(x, "unbox"):  # Linen AxisMetadata
    return x.unbox()
  return x.value  # older nnx.VariableState


def unbox_all(tree):
  """`tree` with every box replaced by its value (``nnx.as_pure`` for any pytree)."""
  return jax.tree.map(unbox, tree, is_leaf=is_box)


def flatten_params(tree) -> tuple[list[tuple[str, Any]], Any]:
  """The parameters of `tree` as ('/'-joined path, unboxed leaf) pairs, and the treedef.

  Boxes (``nnx.Param``, ``nn.Partitioned``) count as leaves, so their paths do
  not end in '/value', and ``treedef.unflatten`` puts one value in the place of
  each box: a tree that is a prefix both of the boxed tree and of its pure form.
  """
  flat, treedef = jtu.tree_flatten_with_path(tree, is_leaf=is_box)
  return [(path_str(path), unbox(leaf)) for path, leaf in flat], treedef


def key_str(key) -> str:
  """One path entry as text: a dict key, attribute name or sequence index."""
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def path_str(path) -> str:
  """A key path as '/'-joined text ('' is the root)."""
  return "/".join(key_str(k) for k in path)


def where(path: str | KeyPath) -> str:
  """A place in a tree, for messages: the quoted '/'-joined path, or "the root"."""
  if not path:
    return "the root"
  return f"'{path if isinstance(path, str) else path_str(path)}'"


def describe_paths(paths: Iterable[str], limit: int = 8) -> str:
  """The first `limit` of `paths`, quoted, and how many there are in all if more, for messages."""
  paths = list(paths)
  shown = ", ".join(repr(p) for p in paths[:limit])
  return shown + (f", ... ({len(paths)} in all)" if len(paths) > limit else "")


def _is_array_like(x) -> bool:
  """An array, a NumPy scalar or a Python number: a leaf with a dtype."""
  return (hasattr(x, "dtype") and hasattr(x, "shape")) or isinstance(
    x, (int, float, complex, np.generic)
  )


def leaf_dtype(p) -> jnp.dtype:
  """A parameter's dtype; a Python float counts as a float32 scalar, as in optax."""
  return jnp.dtype(jnp.result_type(p))


def check_params(params: Any, what: str) -> None:
  """Parameters must be floating or complex arrays (a Python float counts as a float32 scalar).

  ``None`` and ``optax.MaskedNode`` are empty nodes, not leaves: they stay as they are.
  """
  for path, leaf in jtu.tree_flatten_with_path(params)[0]:
    if not _is_array_like(leaf):
      raise TypeError(
        f"{what}: the parameter at {where(path)} is a {type(leaf).__name__}, not an array; "
        "parameters must be floating-point or complex arrays (keep other values out of "
        "the tree given to the optimizer)."
      )
    dtype = jnp.result_type(leaf)
    if not jnp.issubdtype(dtype, jnp.inexact):
      raise TypeError(
        f"{what}: the parameter at {where(path)} has dtype {dtype}"
        + (f" (a Python {type(leaf).__name__})" if isinstance(leaf, (bool, int)) else "")
        + "; Adam needs "
        "floating-point or complex parameters (cast integer parameters, or mask "
        "them out of the optimizer with optax.partition / optax.set_to_zero)."
      )


def check_params_given(
  updates: Any, params: Any, *, what: str, why: str = "weight decay needs the parameters"
) -> None:
  """The step reads the parameters (`why`): they must be given, shaped like the updates."""
  if params is None:
    raise ValueError(f"{what}: {why}; call update(updates, state, params) with params.")
  check_same_structure(updates, params, "updates", "params", what=what)


def _children(node):
  """The immediate children of a pytree node as (key, child) pairs, or None for a leaf.

  An empty node (``{}``, ``()``, ``None``, ``optax.MaskedNode()``) is a node without children.
  """
  flat, treedef = jtu.tree_flatten_with_path(node, is_leaf=lambda x: x is not node)
  if jtu.treedef_is_leaf(treedef) and treedef.num_leaves == 1:
    return None
  return [(path[0], child) for path, child in flat], treedef


def _node_keys(node, detail: str = "") -> str:
  kids = _children(node)
  if kids is None:
    return f"a leaf of type {type(node).__name__}"
  return f"{type(node).__name__} with keys {[key_str(k) for k, _ in kids[0]]}{detail}"


def _aux_difference(a_def, b_def) -> tuple[str, str]:
  """How two nodes of one type and the same keys differ in their static data, for messages.

  Node data with a ``difference(other)`` method (a [`FlatParams`][adamw_jax.FlatParams]
  layout) says it in words; any other is shown as its repr.
  """
  a_aux, b_aux = a_def.node_data()[1], b_def.node_data()[1]
  if type(a_aux) is type(b_aux) and hasattr(a_aux, "difference"):
    a_text, b_text = a_aux.difference(b_aux)
  else:
    a_text, b_text = (f"node data {_short(repr(x))}" for x in (a_aux, b_aux))
  return f" ({a_text})", f" ({b_text})"


def _short(text: str, limit: int = 200) -> str:
  return text if len(text) <= limit else text[:limit] + "..."


def _mapping_items(node, items):
  """Children of a mapping node keyed by their key text (for mapping-tolerant matching)."""
  return {key_str(k): (k, child) for k, child in items}


def _alike_mappings(a, b, a_items, b_items) -> bool:
  """Two mappings of different types (dict, FrozenDict, nnx.State) with the same keys."""
  return (
    isinstance(a, Mapping)
    and isinstance(b, Mapping)
    and sorted(key_str(k) for k, _ in a_items) == sorted(key_str(k) for k, _ in b_items)
  )


def first_mismatch(prefix, tree, path=(), *, prefix_ok: bool = True, mappings_alike: bool = False):
  """The path and description where `prefix` stops being a (prefix of) `tree`.

  Returns None when `prefix` matches. With ``prefix_ok=False`` the two trees
  must have the same structure all the way down to their leaves. With
  ``mappings_alike=True`` a mapping matches a mapping of another type with the
  same keys (a dict mask for FrozenDict or ``nnx.State`` parameters).
  """
  p_kids = _children(prefix)
  t_kids = _children(tree)
  if p_kids is None:
    if t_kids is None or prefix_ok:
      return None
    return path, _node_keys(prefix), _node_keys(tree)
  if t_kids is None:
    return path, _node_keys(prefix), _node_keys(tree)
  (p_items, p_def), (t_items, t_def) = p_kids, t_kids
  p_keys = [key_str(k) for k, _ in p_items]
  t_keys = [key_str(k) for k, _ in t_items]
  if mappings_alike and _alike_mappings(prefix, tree, p_items, t_items):
    t_by_key = _mapping_items(tree, t_items)
    pairs = [(key, p_child, t_by_key[key_str(key)][1]) for key, p_child in p_items]
  elif (
    p_keys == t_keys
    and p_def.node_data() != t_def.node_data()
    and (p_def.node_data()[0] is t_def.node_data()[0])
  ):
    a_detail, b_detail = _aux_difference(p_def, t_def)
    return path, _node_keys(prefix, a_detail), _node_keys(tree, b_detail)
  elif p_def.node_data() != t_def.node_data() or p_keys != t_keys:
    return path, _node_keys(prefix), _node_keys(tree)
  else:
    pairs = [(key, p_child, t_child) for (key, p_child), (_, t_child) in zip(p_items, t_items)]
  for key, p_child, t_child in pairs:
    found = first_mismatch(
      p_child, t_child, (*path, key), prefix_ok=prefix_ok, mappings_alike=mappings_alike
    )
    if found is not None:
      return found
  return None


def check_same_structure(a, b, a_name: str, b_name: str, *, what: str) -> None:
  """Raises ValueError naming the first path where `a` and `b` differ in structure or shape."""
  if jax.tree.structure(a) == jax.tree.structure(b):
    for (path, x), y in zip(jtu.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
      if np.shape(x) != np.shape(y):
        raise ValueError(
          f"{what}: {a_name} and {b_name} differ in shape at {where(path)}: "
          f"{a_name} has shape {np.shape(x)}, {b_name} has shape {np.shape(y)}."
        )
    return
  found = first_mismatch(a, b, prefix_ok=False)
  if found is None:  # same keys but different node types deeper down
    raise ValueError(
      f"{what}: {a_name} and {b_name} have different tree structures:\n"
      f"  {a_name}: {jax.tree.structure(a)}\n  {b_name}: {jax.tree.structure(b)}"
    )
  path, a_desc, b_desc = found
  raise ValueError(
    f"{what}: {a_name} and {b_name} differ in tree structure at {where(path)}: "
    f"{a_name} has {a_desc}, {b_name} has {b_desc}."
  )


def _is_bool(x) -> bool:
  return isinstance(x, (bool, np.bool_)) or (
    hasattr(x, "dtype") and np.shape(x) == () and np.dtype(x.dtype) == np.bool_
  )


def is_mask_fn(mask) -> bool:
  """Whether a mask is a callable ``params -> mask`` rather than a mask pytree.

  A pytree node that happens to be callable (an Equinox module of booleans, say)
  is a mask, not a function: only callables without boolean leaves are called.
  """
  return callable(mask) and not any(_is_bool(x) for x in jax.tree.leaves(mask))


def expand_prefix(
  prefix,
  tree,
  *,
  what: str,
  noun: str,
  leaf_ok: Callable[[Any], bool],
  leaf_error: Callable[[Any, str], str],
  broadcast: bool = True,
) -> Any:
  """A prefix of `tree` (a mask or a label tree) broadcast to the full structure of `tree`.

  With `broadcast` False it stays a prefix (one leaf for each of its leaves),
  with the node types of `tree`, as ``optax.masked`` takes it.

  Boxes in `prefix` (``nnx.Param(True)``, from ``jax.tree.map`` over an
  ``nnx.State``) count as their values, so a prefix built from boxed
  parameters also matches their pure form and vice versa; mappings match
  mappings of another type with the same keys. The result has the node types of
  `tree`. Errors name the first mismatching path and both trees' keys there.
  """
  prefix = unbox_all(prefix)
  found = first_mismatch(prefix, tree, mappings_alike=True)
  if found is not None:
    path, p_desc, t_desc = found
    raise ValueError(
      f"{what}: the {noun} does not match the parameters at {where(path)}: "
      f"the {noun} has {p_desc}, the parameters have {t_desc}."
    )

  def expand(path, p, subtree):
    p_kids = _children(p)
    if p_kids is None:
      if not leaf_ok(p):
        raise TypeError(f"{what}: {leaf_error(p, where(path))}")
      return jax.tree.map(lambda _: p, subtree) if broadcast else p
    t_kids = _children(subtree)
    assert t_kids is not None  # a node of the prefix is one of the tree (first_mismatch)
    t_items, t_def = t_kids
    if isinstance(p, Mapping) and isinstance(subtree, Mapping):
      p_by_key = _mapping_items(p, p_kids[0])
      kids = [expand((*path, k), p_by_key[key_str(k)][1], child) for k, child in t_items]
    else:
      kids = [
        expand((*path, k), p_child, child) for (k, child), (_, p_child) in zip(t_items, p_kids[0])
      ]
    return t_def.unflatten(kids)

  return expand((), prefix, tree)


class ResolvesMasks:
  """A pytree that resolves masks written for another tree itself: `FlatParams`.

  A base class here, so that this module needs nothing from the ones that
  build on it: imports point one way.
  """

  __slots__ = ()

  def resolve_mask(self, mask: MaskOrFn, *, what: str) -> Any:
    raise NotImplementedError


def resolve_mask(mask: MaskOrFn, tree, *, what: str, broadcast: bool = True) -> Any:
  """A mask (bool pytree, prefix of `tree`, or callable) as a full bool pytree like `tree`.

  Boxes in the mask (``nnx.Param(True)``) count as their values and mappings
  match mappings of another type with the same keys (see `expand_prefix`).
  Errors name the first mismatching path and both trees' keys there. For a
  `ResolvesMasks` tree (a ``FlatParams``) the mask is written for the
  model's tree and the tree resolves it itself (per buffer, see
  [`FlatParams.resolve_mask`][adamw_jax.FlatParams.resolve_mask]). With `broadcast` False a
  prefix mask stays a prefix (`expand_prefix`).
  """
  if isinstance(tree, ResolvesMasks):
    return tree.resolve_mask(mask, what=what)
  if is_mask_fn(mask):
    mask = mask(tree)

  def leaf_error(m, place):
    return f"mask leaves must be booleans, got {type(m).__name__} {m!r} at {place}."

  expanded = expand_prefix(
    mask, tree, what=what, noun="mask", leaf_ok=_is_bool, leaf_error=leaf_error, broadcast=broadcast
  )
  return jtu.tree_map_with_path(lambda path, m: _static_bool(m, path, what), expanded)


def _static_bool(flag, path: KeyPath, what: str) -> bool:
  """A mask leaf as a Python bool; a traced one cannot be (which leaves decay is static)."""
  if isinstance(flag, jax.core.Tracer):
    raise TypeError(
      f"{what}: the mask at {where(path)} is a traced boolean ({flag.aval.str_short()}), "
      "but which leaves are decayed must be known when the step is traced: give Python or "
      "NumPy booleans (or concrete arrays), computed from the parameters' paths, shapes "
      "or dtypes (e.g. adamw_jax.decay_mask), not from their values, and close over the "
      "mask instead of passing it to jax.jit as an argument."
    )
  return bool(flag)


@functools.cache
def _placeholder_type() -> type:
  """The type of the stand-in that ``optax.tree.map_params`` passes to ``init``.

  Found through that public function itself: it calls ``init`` with the
  stand-in, whose type is recorded here.
  """
  seen: list[type] = []

  def init(params):
    seen.append(type(params))
    return ()

  optax.tree.map_params(init, lambda x: x, ())
  return seen[0]


def is_params_placeholder(params: Any) -> bool:
  """Whether ``init`` was given ``optax.tree.map_params``'s stand-in for the parameters.

  It has no leaves and stands for any parameter tree: a mask is not checked
  against it, as ``optax.masked`` does not mask it.
  """
  return isinstance(params, _placeholder_type())


def check_mask(mask: MaskOrFn, params: Any, *, what: str) -> None:
  """Resolves `mask` for `params` as an update will, to raise the update's errors at ``init``.

  First on the parameters as given (boxes such as ``nnx.Param`` unboxed, as
  ``nnx.Optimizer`` passes pure arrays to ``update``); then on traced ones
  (under ``jax.eval_shape``, which computes nothing), as the update resolves
  the mask inside its trace, so that a callable reading the parameters'
  values fails here with the update's message. ``optax.tree.map_params``'s
  stand-in for the parameters (:func:`is_params_placeholder`) is let through.
  """
  if is_params_placeholder(params):
    return
  pure = unbox_all(params)
  resolve_mask(mask, pure, what=what)
  trace_like_update(lambda tree: resolve_mask(mask, tree, what=what), pure)


def trace_like_update(check: Callable[[Any], Any], params: Any) -> None:
  """Runs `check` on traced `params` (under ``jax.eval_shape``: nothing is computed)."""

  def traced(tree) -> None:
    check(tree)

  jax.eval_shape(traced, params)


def explicit_sharding(x):
  """`x`'s sharding where its mesh has Explicit axes (then part of its type), else None.

  `x`: an array, traced or not, or a ``jax.ShapeDtypeStruct``.
  """
  if isinstance(x, jax.ShapeDtypeStruct):
    sharding = x.sharding
  else:
    sharding = getattr(jax.typeof(x), "sharding", None)
  mesh = getattr(sharding, "mesh", None)
  if mesh is None or not any(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types):
    return None
  return sharding
