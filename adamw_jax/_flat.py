"""Flat buffers: parameters (and so gradients and moments) in one 1-D array per dtype.

``flatten(params)`` packs the leaves of a pytree into one buffer per dtype (per
dtype and decay group when given a mask) and returns a [`FlatParams`][adamw_jax.FlatParams], a
pytree whose children are those buffers. Every optax transform therefore runs
on a handful of large arrays instead of many small ones: one kernel launch per
buffer, one output per buffer, and compile time that does not grow with the
number of leaves. Inside the loss, [`FlatParams.view`][adamw_jax.FlatParams.view] gives back the
model's pytree (slices and reshapes); its gradient is again a ``FlatParams``,
built by writing each leaf's gradient into its place in the buffer (a
``jax.custom_vjp``), not by summing one zero-padded copy per leaf.

Weight-decay masks are written for the model's tree. A mask given to a
transform (``adamw_jax.adamw(mask=...)``, ``add_decayed_weights``, ``masked``)
is resolved on that tree and then per buffer; a buffer that would hold decayed
and non-decayed leaves raises an error asking for the same mask in
``flatten(params, mask=...)``, which keeps the two groups in separate buffers.

Leaves whose sharding spans several devices without being fully replicated
are not packed: each stays a child of its own, with its shape and sharding.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.core
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax import tree_util as jtu

from adamw_jax import _hyperparams, _quantize, _tree


class Slot(NamedTuple):
  """Where one leaf of the model's tree lives: child `child` of the FlatParams.

  `start` is its offset in a packed 1-D buffer, or None when the child is the
  leaf itself (a sharded leaf, kept as is).
  """

  child: int
  start: int | None
  shape: tuple[int, ...]


class Layout:
  """The static part of a `FlatParams`: the model's treedef and each leaf's slot.

  Hashed once: jit hashes the pytree aux data on every call.
  """

  __slots__ = ("_hash", "_key", "members", "names", "paths", "slots", "treedef")

  def __init__(
    self, treedef, slots: tuple[Slot, ...], names: tuple[str, ...], paths: tuple[str, ...]
  ):
    self.treedef = treedef
    self.slots = slots  # one per leaf of the model's tree, in tree order
    self.names = names  # one per child: its key in key paths ('float32', 'w/kernel', ...)
    self.paths = paths  # one per leaf: its '/'-joined path, for messages
    members: list[list[int]] = [[] for _ in names]
    for i, slot in enumerate(slots):
      members[slot.child].append(i)
    self.members = tuple(tuple(m) for m in members)  # per child: its leaves, in tree order
    self._key = (treedef, slots, names)
    self._hash = hash(self._key)

  def __hash__(self) -> int:
    return self._hash

  def __eq__(self, other) -> bool:
    return self is other or (
      isinstance(other, Layout) and self._hash == other._hash and self._key == other._key
    )

  def __repr__(self) -> str:
    return f"Layout({len(self.slots)} leaves in children {list(self.names)})"

  def difference(self, other: Layout) -> tuple[str, str]:
    """The first difference from `other`, as one phrase for each side (for error messages).

    Two layouts can have the same buffer names and sizes and still pack
    different trees: messages show the model's leaves where they part.
    """
    mine, theirs = dict(zip(self.paths, self.slots)), dict(zip(other.paths, other.slots))
    only_a = [p for p in mine if p not in theirs]
    only_b = [p for p in theirs if p not in mine]
    if only_a or only_b:
      return _packing(only_a), _packing(only_b)
    for path, a in mine.items():
      b = theirs[path]
      if a.shape != b.shape:
        return (
          f"its leaf {_tree.where(path)} has shape {a.shape}",
          f"its leaf {_tree.where(path)} has shape {b.shape}",
        )
      if a != b or self.names[a.child] != other.names[b.child]:
        return _placed(path, a, self.names), _placed(path, b, other.names)
    return f"packing the model tree {self.treedef}", f"packing {other.treedef}"


def _packing(paths: list[str]) -> str:
  if not paths:
    return "packing no leaf the other lacks"
  return f"packing {_tree.describe_paths(paths, limit=3)}, which the other does not"


def _placed(path: str, slot: Slot, names: tuple[str, ...]) -> str:
  if slot.start is None:
    return f"its leaf {_tree.where(path)} is a child of its own"
  return f"its leaf {_tree.where(path)} is in buffer '{names[slot.child]}' at offset {slot.start}"


@jtu.register_pytree_with_keys_class
class FlatParams(_tree.ResolvesMasks):
  """A model's parameters packed into a few flat buffers; a pytree of those buffers.

  Build it with [`flatten`][adamw_jax.flatten]. Its children (``.buffers``) are one
  1-D array per dtype (per dtype and decay group if ``flatten`` had a mask),
  plus any sharded leaf kept whole; its static aux data is the `Layout`.
  ``jax.tree.map``, ``optax.apply_updates`` and every optax transform treat it
  as any pytree, so gradients, updates and optimizer moments of a
  ``FlatParams`` are ``FlatParams`` with the same layout.

  - `view`: the model's pytree, differentiable (gradients come out flat);
  - `pack`: a pytree shaped like the model (e.g. gradients computed on
    the tree) packed with this layout.
  """

  __slots__ = ("buffers", "layout")

  def __init__(self, buffers, layout: Layout):
    self.buffers = tuple(buffers)
    self.layout = layout

  def tree_flatten_with_keys(self):
    return [(jtu.DictKey(name), b) for name, b in zip(self.layout.names, self.buffers)], self.layout

  @classmethod
  def tree_unflatten(cls, layout, buffers):
    return cls(buffers, layout)

  def __repr__(self) -> str:
    kids = ", ".join(
      f"{n}: {getattr(b, 'dtype', '?')}{list(getattr(b, 'shape', ()))}"
      for n, b in zip(self.layout.names, self.buffers)
    )
    return f"FlatParams({len(self.layout.slots)} leaves in {{{kids}}})"

  def view(self):
    """The model's pytree: each leaf a slice of its buffer, reshaped.

    Use it inside the loss, ``loss(flat) = f(flat.view(), batch)``:
    ``jax.grad`` of it w.r.t. ``flat`` is a ``FlatParams`` whose buffers are
    the gradients, each leaf's written into its place in one pass. Reverse
    mode only (``jax.grad``, ``jax.vjp``); forward mode (``jax.jvp``,
    ``jax.jacfwd``) is not supported.
    """
    return self.layout.treedef.unflatten(_view(self.layout, self.buffers))

  def pack(self, tree) -> FlatParams:
    """`tree` (same structure, shapes and dtypes as the model) packed with this layout."""
    treedef = self.layout.treedef
    if jax.tree.structure(tree) != treedef:
      _tree.check_same_structure(
        tree,
        treedef.unflatten([0] * treedef.num_leaves),
        "the tree",
        "the flattened parameters",
        what="FlatParams.pack",
      )
    leaves = treedef.flatten_up_to(tree)
    for path, leaf, slot, buffer in zip(
      self.layout.paths,
      leaves,
      self.layout.slots,
      (self.buffers[s.child] for s in self.layout.slots),
    ):
      where = _tree.where(path)
      if np.shape(leaf) != slot.shape:
        raise ValueError(
          f"FlatParams.pack: the leaf at {where} has shape {np.shape(leaf)}, "
          f"the flattened parameter has shape {slot.shape}."
        )
      if jnp.result_type(leaf) != buffer.dtype:
        raise TypeError(
          f"FlatParams.pack: the leaf at {where} has dtype {jnp.result_type(leaf)}, "
          f"the flattened parameter has dtype {buffer.dtype}; cast it first."
        )
    return FlatParams(_pack(self.layout, leaves), self.layout)

  def shapes(self):
    """The model's pytree with a ``jax.ShapeDtypeStruct`` per leaf (no data)."""
    return self.layout.treedef.unflatten(
      [
        jax.ShapeDtypeStruct(s.shape, jnp.result_type(self.buffers[s.child]))
        for s in self.layout.slots
      ]
    )

  def resolve_mask(self, mask: _tree.MaskOrFn, *, what: str) -> FlatParams:
    """A mask written for the model's tree, as one bool per child.

    Raises ValueError if a child holds leaves the mask decays and leaves it
    does not: pass the same mask to [`flatten`][adamw_jax.flatten] to keep them apart.
    """
    resolved = _tree.resolve_mask(mask, self.shapes(), what=what)
    leaf_mask = self.layout.treedef.flatten_up_to(resolved)
    per_child = []
    for child, name in enumerate(self.layout.names):
      members = self.layout.members[child]
      values = {leaf_mask[i] for i in members}
      if len(values) > 1:
        on = next(self.layout.paths[i] for i in members if leaf_mask[i])
        off = next(self.layout.paths[i] for i in members if not leaf_mask[i])
        raise ValueError(
          f"{what}: the mask decays some but not all of the leaves packed into the "
          f"flat buffer '{name}' (e.g. '{on}' is decayed, '{off}' is not); flatten "
          "the parameters with the same mask, adamw_jax.flatten(params, mask=mask), "
          "so that decayed and non-decayed leaves get separate buffers."
        )
      per_child.append(values.pop() if values else True)
    return FlatParams(per_child, self.layout)


def _slice(buffer: jax.Array, slot: Slot) -> jax.Array:
  if slot.start is None:
    return buffer
  size = int(np.prod(slot.shape, dtype=np.int64))
  return lax.slice(buffer, (slot.start,), (slot.start + size,)).reshape(slot.shape)


def _is_concrete(x) -> bool:
  return isinstance(x, (np.ndarray, jax.Array)) and not isinstance(x, jax.core.Tracer)


def _on_explicit_mesh(x) -> bool:
  """Traced on a mesh with explicit axes, where shardings are part of the types.

  There ``dynamic_update_slice`` requires the update's sharding to equal the
  buffer's, which a gradient's need not (and the custom VJP's backward is
  traced before the gradient's sharding is known).
  """
  return isinstance(x, jax.core.Tracer) and _tree.explicit_sharding(x) is not None


def _concatenate(parts) -> jax.Array:
  """`parts` (of one dtype) raveled and joined into one 1-D array.

  Traced, each part is written in place into a zero buffer: one pass and no
  temporaries. XLA's CPU concatenation instead materialises every operand
  and slows with their number (several times slower for a 300-leaf gradient).
  Concrete arrays are joined on the host and put back where the first one
  was: XLA compiles a concatenation of n operands in about 1.5 ms per operand
  (15 s for 10,000 leaves), numpy takes milliseconds.
  """
  if any(_on_explicit_mesh(x) for x in parts):
    return jnp.concatenate([jnp.ravel(x) for x in parts])
  if not all(_is_concrete(x) for x in parts):
    out = jnp.zeros((sum(np.size(x) for x in parts),), jnp.result_type(parts[0]))
    offset = 0
    for x in parts:
      out = lax.dynamic_update_slice(out, jnp.ravel(x), (offset,))
      offset += np.size(x)
    return out
  host = np.concatenate([np.ravel(np.asarray(x)) for x in parts])
  return jax.device_put(host, getattr(parts[0], "sharding", None))


def _pack(layout: Layout, leaves) -> list[jax.Array]:
  """One array per child: the leaves of each packed buffer raveled and joined."""
  out = []
  for _child, members in enumerate(layout.members):
    if len(members) == 1 and layout.slots[members[0]].start is None:
      out.append(leaves[members[0]])
    else:
      out.append(_concatenate([leaves[i] for i in members]))
  return out


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _view(layout: Layout, buffers) -> list[jax.Array]:
  return [_slice(buffers[s.child], s) for s in layout.slots]


def _view_fwd(layout: Layout, buffers):
  return _view(layout, buffers), None


def _view_bwd(layout: Layout, _, cotangents):
  # The transpose of the slices, written as what it is: each leaf's cotangent
  # stored into its place in the buffer, not one zero-padded copy per leaf
  # summed (the default transpose: 100x slower for 300 leaves, benchmarks/flat.py).
  return (tuple(_pack(layout, cotangents)),)


_view.defvjp(_view_fwd, _view_bwd)


def _sharding(leaf):
  """The sharding of a concrete array, or None (under a trace)."""
  return None if isinstance(leaf, jax.core.Tracer) else leaf.sharding


def flatten(
  params: Any, *, mask: _tree.MaskOrFn | None = None, moment_block_size: int | None = None
) -> FlatParams:
  """`params` packed into one flat buffer per dtype: a [`FlatParams`][adamw_jax.FlatParams].

  >>> import jax.numpy as jnp, adamw_jax
  >>> flat = adamw_jax.flatten({"b": jnp.zeros(3), "w": jnp.ones((2, 3))})
  >>> flat
  FlatParams(2 leaves in {float32: float32[9]})
  >>> flat.view()["w"].shape  # the model's tree, inside the loss
  (2, 3)
  >>> adamw_jax.flatten({"b": jnp.zeros(3), "w": jnp.ones((64, 64))}, moment_block_size=256)
  FlatParams(2 leaves in {float32: float32[3], float32/8bit: float32[4096]})

  Args:
    params: the model's parameters, a pytree of floating-point or complex arrays.
    mask: optional weight-decay mask for `params` (a bool pytree or prefix of
      it, or a callable such as [`decay_mask`][adamw_jax.decay_mask]). Decayed and
      non-decayed leaves then go to separate buffers, so that the same mask
      given to ``adamw_jax.adamw`` applies to whole buffers. It only groups the
      leaves: which are decayed is still decided by the transform's ``mask``.
    moment_block_size: for ``adamw(moment_bits=8 or 4, moment_block_size=...)``:
      the leaves that get 8-bit moments (at least 4096 elements, a multiple of
      the block size) go to buffers of their own (``"<dtype>/8bit"``), where
      every leaf starts on a block boundary, so that no block spans two
      leaves and the flat step is the per-leaf step bit for bit. Without it,
      8-bit moments take a packed buffer only if all or none of its leaves
      would have them.

  Leaves sharded over several devices (not fully replicated) are not packed:
  each stays a child of its own, with its shape and sharding. Fully replicated
  leaves on several devices are packed with each other, by sharding.

  Returns:
    A [`FlatParams`][adamw_jax.FlatParams]; ``flat.view()`` gives the model's pytree back.
  """
  _tree.check_params(params, "flatten")
  if moment_block_size is not None:
    _hyperparams.check("moment_block_size", moment_block_size)
    moment_block_size = int(moment_block_size)
  path_leaves, treedef = jtu.tree_flatten_with_path(params)
  paths = tuple(_tree.path_str(p) for p, _ in path_leaves)
  leaves = [jnp.asarray(leaf) for _, leaf in path_leaves]
  decayed = (
    [None] * len(leaves)
    if mask is None
    else treedef.flatten_up_to(_tree.resolve_mask(mask, params, what="flatten"))
  )
  groups: dict[Any, int] = {}
  names: list[str] = []
  sizes: list[int] = []
  slots = []
  for path, leaf, on in zip(paths, leaves, decayed):
    sharding = _sharding(leaf)
    if sharding is not None and len(sharding.device_set) > 1 and not sharding.is_fully_replicated:
      slots.append(Slot(len(names), None, leaf.shape))
      names.append(path)
      sizes.append(0)
      continue
    # One buffer per dtype, decay group, placement (device or replicated sharding) and, with a
    # block size, whether the leaf gets 8-bit moments.
    eight = moment_block_size is not None and _quantize.quantizes(leaf.shape, moment_block_size)
    key = (leaf.dtype, on, sharding, eight)
    if key not in groups:
      groups[key] = len(names)
      name = (
        leaf.dtype.name
        + ("" if on is None else "/decayed" if on else "/not_decayed")
        + ("/8bit" if eight else "")
      )
      names.append(name if name not in names else f"{name}/{len(names)}")
      sizes.append(0)
    child = groups[key]
    slots.append(Slot(child, sizes[child], leaf.shape))
    sizes[child] += leaf.size
  layout = Layout(treedef, tuple(slots), tuple(names), paths)
  return FlatParams(_pack(layout, leaves), layout)
