"""How a leaf's moments are held in the state: full precision, or block-wise quantized, and checked.

The one step (``_core``) reads each leaf's moments with `load` and
writes them back with `store`: a full-precision moment passes as it is;
a [`QuantizedMoment`][adamw_jax.QuantizedMoment] (``moment_bits=8`` or ``4``,
`adamw_jax._quantize`) is dequantized to float32 for the step and
requantized after. `zeros` makes either kind, `quantized_leaves`
says which leaves get quantized moments (torchao's rule, and per buffer for a
``FlatParams``), and `check_layout` refuses a state whose moments were
made with other options than the transform's.

Layout: a quantization block is ``block_size`` consecutive elements of one
leaf in row-major order, so blocks never span leaves; a ``FlatParams`` buffer
gets quantized moments only if all its leaves would (``flatten(...,
moment_block_size=)`` packs them apart), else none or, mixed, it is refused.

Sharding: a leaf with quantized moments may be sharded along its first axis
into shards of whole blocks; its 8-bit codes are then sharded like it, its
4-bit codes (flat, two a byte, a block's bytes its own) and its scales (one
per block) along their one axis as its rows. `check_shards` refuses a
leaf whose shards would split a block (sharded along another axis, or into
shards whose sizes are not multiples of the block size) where it sees the
sharding: a concrete leaf, or a traced one on a mesh with explicit axes.
Under ``jit`` on a mesh with automatic axes it cannot; XLA then moves the
blocks between devices, and the numbers are the unsharded ones.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.core
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from adamw_jax import _flat, _quantize, _tree


class Quantization(NamedTuple):
  """Block-wise quantized moments: ``moment_bits`` and ``moment_block_size``."""

  bits: int
  block_size: int

  def applies(self, x) -> bool:
    """Whether a leaf like `x` gets quantized moments (torchao's rule: its size)."""
    return _quantize.quantizes(np.shape(x), self.block_size)

  def options(self) -> str:
    return f"moment_bits={self.bits}, moment_block_size={self.block_size}"

  def describe(self) -> str:
    return f"{self.bits}-bit in blocks of {self.block_size} ({self.options()})"


def is_quantized(x) -> bool:
  return isinstance(x, _quantize.QuantizedMoment)


def quantization_of(x) -> Quantization | None:
  """The bits and block size a state's moment was made with; None for a full-precision one."""
  if not is_quantized(x):
    return None
  packed = isinstance(x, _quantize.PackedQuantizedMoment)
  size = (2 if packed else 1) * int(np.size(x.codes))
  return Quantization(4 if packed else 8, size // max(int(np.size(x.scale)), 1))


def zeros(p, dtype) -> jax.Array:
  """A full-precision zero moment (or buffer) of `dtype` for the parameter `p`, sharded as `p`."""
  if isinstance(p, jax.core.Tracer):
    # Under jit, zeros that do not depend on p lose its sharding (jax-ml/jax#16080, optax.adamw
    # too). Tied to p by shard_alike, the equal zero constants of two leaves of one shape are one
    # value to the partitioner, which gave them one sharding (a replicated leaf's moments took a
    # split one's, on a mesh with automatic axes). Zeros computed from p are laid out as p.
    # Eager zeros_like already keeps p's sharding, without a compile per leaf shape.
    zero = jnp.isnan(p) & jnp.isinf(p)  # False everywhere, NaN and infinity included
    return zero.astype(dtype)
  return jnp.zeros_like(p, dtype=dtype)


def placed_as(x: jax.Array, params) -> jax.Array:
  """A state's scalar (the count, the key) placed as the concrete `params` all are: on their one
  device, or replicated on their one mesh; as it is where they are uncommitted, mixed or traced.

  A jitted step's first call then takes its inputs placed as its outputs, which its next calls
  take: an uncommitted count beside committed parameters (optax's) costs a second compile.
  """
  leaves = jax.tree.leaves(params)
  concrete = lambda p: isinstance(p, jax.Array) and not isinstance(p, jax.core.Tracer)
  if not leaves or not all(concrete(p) and p.committed for p in leaves):
    return x  # traced, uncommitted or host arrays: jit places them
  shardings = {p.sharding for p in leaves}
  one = next(iter(shardings))
  if len(shardings) == 1 and isinstance(one, jax.sharding.SingleDeviceSharding):
    return jax.device_put(x, one)
  meshes = {getattr(s, "mesh", None) for s in shardings}
  mesh = next(iter(meshes))
  if len(meshes) == 1 and isinstance(mesh, jax.sharding.Mesh):
    return jax.device_put(x, NamedSharding(mesh, P()))
  return x


def load(x, signed: bool, shape: tuple[int, ...]):
  """A moment as the step reads it: float32 for a quantized one, else as stored."""
  if is_quantized(x):
    return _quantize.dequantize(x, signed, shape)
  return x


def store(new, old, signed: bool):
  """The step's new moment `new` stored as `old` is: requantized, or in `old`'s dtype."""
  q = quantization_of(old)
  if q is not None:
    return _quantize.quantize(new, q.block_size, signed, q.bits)
  return new.astype(old.dtype)


def _blocks_sharding(sharding, ndim: int):
  """The sharding of a leaf's per-block scales, from the leaf's: its first axis's, or None."""
  if isinstance(sharding, jax.sharding.SingleDeviceSharding):
    return sharding
  if isinstance(sharding, jax.sharding.NamedSharding):
    spec = tuple(sharding.spec) + (None,) * (ndim - len(sharding.spec))
    return NamedSharding(sharding.mesh, P(spec[0] if ndim else None))
  if sharding.is_fully_replicated:
    return NamedSharding(jax.sharding.Mesh(list(sharding.device_set), ("_",)), P())
  return None


def quantized_zeros(p, q: Quantization) -> _quantize.QuantizedMoment:
  """The zero quantized moment of `p`, its codes sharded like `p` and its scales along the blocks.

  4-bit codes are flat, sharded as the scales (a shard's blocks are its bytes).

  A leaf may be sharded along its first axis only (`check_shards`), so
  each shard holds whole blocks and the scales (one per block, in row-major
  order) split along their one axis as the leaf along its first. Traced on a
  mesh with automatic axes, both are computed from the parameter (the sharding
  propagates); with explicit axes, from its sharding type.
  """
  block_size, bits = q.block_size, q.bits
  zero = _quantize.zeros(p, block_size, bits)
  if not isinstance(p, jax.core.Tracer):
    target = _blocks_sharding(p.sharding, p.ndim) if hasattr(p, "sharding") else None
    put = lambda x: x if target is None else jax.device_put(x, target)
    if isinstance(target, jax.sharding.SingleDeviceSharding):
      # On p's device, committed to it only if p is (as zeros_like): committed codes and scales
      # beside uncommitted params would make a jitted step's second call a second compile.
      put = lambda x: jnp.zeros_like(p, dtype=x.dtype, shape=x.shape)
    codes = zeros(p, jnp.uint8) if bits == 8 else put(zero.codes)
    return zero._replace(codes=codes, scale=put(zero.scale))
  sharding = _tree.explicit_sharding(p)
  if sharding is not None:
    blocks = _blocks_sharding(sharding, p.ndim)
    codes = zeros(p, jnp.uint8) if bits == 8 else jax.sharding.reshard(zero.codes, blocks)
    return zero._replace(codes=codes, scale=jax.sharding.reshard(zero.scale, blocks))
  # Zeros computed from the parameter, so laid out as it is (the codes) and as its blocks (the
  # scales, +0.0 from a reduction of each block), not constants shard_alike'd: equal constants
  # of other leaves (their moments of the same shape) are one value to the partitioner, which
  # then gives them all one sharding.
  codes = (jnp.isnan(p) & jnp.isinf(p)).astype(jnp.uint8)
  if bits == 4:
    codes = jnp.max(codes.reshape(-1, 2), axis=1)
  anchor = jnp.max(p.reshape(-1, block_size).astype(jnp.float32), axis=1)
  return zero._replace(
    codes=codes, scale=jnp.abs(jnp.where(jnp.isfinite(anchor), anchor, 0.0)) * 0.0
  )


def _split_error(p, block_size: int, at: str, name: str, traced: bool) -> ValueError:
  return ValueError(
    f"{name}: the parameter at {at} (shape {p.shape}) is sharded so that a shard "
    f"splits a block of moment_block_size={block_size} elements (a block is "
    f"{block_size} consecutive elements of the leaf in row-major order); shard it along its "
    "first axis only, into shards of a multiple of the block size, or choose another "
    "block size" + (" (seen in the traced sharding of a mesh with explicit axes)" if traced else "")
  )


def check_shards(p, block_size: int, at: str, name: str) -> None:
  """Refuses a sharded leaf whose shards would split a quantization block.

  Concrete leaves by their sharding; traced ones on a mesh with explicit axes
  by their sharding type. Under ``jit`` on a mesh with automatic axes the
  sharding is not known here: XLA then moves what a split block needs between
  devices (the numbers are the unsharded ones; tests/sharded_checks.py).
  """
  row = int(np.prod(p.shape[1:], dtype=np.int64))
  if isinstance(p, jax.core.Tracer):
    sharding = _tree.explicit_sharding(p)
    if sharding is None:
      return
    spec = tuple(sharding.spec)
    axes = lambda entry: (
      () if entry is None else ((entry,) if isinstance(entry, str) else tuple(entry))
    )
    if any(axes(e) for e in spec[1:]):
      raise _split_error(p, block_size, at, name, True)
    shards = int(
      np.prod([sharding.mesh.shape[a] for a in axes(spec[0])] if spec else [], dtype=np.int64)
    )
    if shards > 1 and ((p.shape[0] // shards) * row % block_size or p.shape[0] % shards):
      raise _split_error(p, block_size, at, name, True)
    return
  sharding = getattr(p, "sharding", None)
  if sharding is None or len(sharding.device_set) == 1:
    return
  for index in sharding.devices_indices_map(p.shape).values():
    rows = range(p.shape[0])[index[0]] if p.ndim else range(1)
    whole = all(range(n)[s] == range(n) for n, s in zip(p.shape[1:], index[1:]))
    if not whole or (rows.start * row) % block_size or (len(rows) * row) % block_size:
      raise _split_error(p, block_size, at, name, False)


def _buffer_quantized(q: Quantization, flat: _flat.FlatParams, child: int, name: str) -> bool:
  """Whether a FlatParams buffer gets quantized moments: as its leaves would, all or none of them.

  A buffer whose leaves all get them holds them end to end, each a multiple of
  the block size, so its blocks are theirs; one with leaves of both kinds is
  refused (its blocks would span leaves and quantize leaves that per leaf keep
  full precision).
  """
  layout, block = flat.layout, q.block_size
  members = layout.members[child]
  if len(members) == 1 and layout.slots[members[0]].start is None:  # a leaf kept whole
    return q.applies(flat.buffers[child])
  quantized = [i for i in members if _quantize.quantizes(layout.slots[i].shape, block)]
  if quantized and len(quantized) < len(members):
    full = next(i for i in members if i not in quantized)
    size = lambda i: int(np.prod(layout.slots[i].shape, dtype=np.int64))
    raise ValueError(
      f"{name}: the flat buffer '{layout.names[child]}' packs leaves that get "
      f"{q.bits}-bit moments "
      f"({_tree.where(layout.paths[quantized[0]])}, {size(quantized[0])} elements) and leaves "
      f"that keep full-precision ones ({_tree.where(layout.paths[full])}, {size(full)} "
      f"elements: fewer than {_quantize.MIN_SIZE} or not a multiple of moment_block_size="
      f"{block}), so its blocks would span leaves; flatten the parameters with "
      f"adamw_jax.flatten(params, moment_block_size={block}), which packs the two kinds "
      "into separate buffers"
    )
  return bool(quantized)


def quantized_leaves(q: Quantization | None, tree, name: str) -> list[bool]:
  """For each leaf of `tree` (params or updates, ``jax.tree.leaves`` order): quantized moments?"""
  if q is None:
    return [False] * len(jax.tree.leaves(tree))
  out = []
  for node in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, _flat.FlatParams)):
    if not isinstance(node, _flat.FlatParams):
      out.append(q.applies(node))
      continue
    for child, buffer in enumerate(node.buffers):
      if jax.tree.leaves(buffer):  # not a MaskedNode (another group's buffer)
        out.append(_buffer_quantized(q, node, child, name))
  return out


def shapes(moments, *likes) -> Any:
  """`moments` with each quantized moment as a ``jax.ShapeDtypeStruct`` of its leaf's shape.

  For checking a state's moments against the updates as any tree. 8-bit codes
  have the leaf's shape; 4-bit codes are flat, so a 4-bit moment stands for
  the leaf at its place in the first of `likes` (the parameters, the updates)
  of the moments' structure, when their sizes agree; else for a flat leaf.
  """

  def stand_in(x):
    if not is_quantized(x):
      return x
    q = quantization_of(x)
    assert q is not None  # quantized
    return jax.ShapeDtypeStruct(
      np.shape(x.codes) if q.bits == 8 else (2 * int(np.size(x.codes)),), jnp.float32
    )

  view = jax.tree.map(stand_in, moments, is_leaf=is_quantized)
  treedef = jax.tree.structure(view)
  like = next((t for t in likes if t is not None and jax.tree.structure(t) == treedef), None)
  if like is None:
    return view
  return treedef.unflatten(
    [
      jax.ShapeDtypeStruct(np.shape(u), jnp.float32)
      if isinstance(m, _quantize.PackedQuantizedMoment) and np.size(u) == 2 * np.size(m.codes)
      else v
      for m, u, v in zip(
        treedef.flatten_up_to(moments), jax.tree.leaves(like), jax.tree.leaves(view)
      )
    ]
  )


def _describe(q: Quantization | None, x) -> str:
  if q is not None:
    return q.describe()
  dtype = getattr(x, "dtype", None)
  return "full precision" + ("" if dtype is None else f" ({jnp.dtype(dtype).name})")


def check_layout(
  q: Quantization | None, moments, updates, expected: list[bool] | None, field: str, name: str
) -> None:
  """Refuses a state's moments (the field `field`) not held as this transform holds them.

  `expected`: for each leaf of `updates`, whether this transform quantizes its
  moments (`quantized_leaves`); None: none. A quantized moment must have this
  transform's bits and block size; a state made with other options would be
  read in other blocks (or maps) and converted silently.
  """
  treedef = jax.tree.structure(updates)
  if not any(expected or ()) and jax.tree.structure(moments) == treedef:
    return  # full precision throughout, as expected
  try:
    leaves = treedef.flatten_up_to(moments)
  except (ValueError, TypeError) as e:
    raise ValueError(
      f"{name}: the updates and the optimizer state ({field}) differ in tree structure: {e}"
    ) from None
  paths = [path for path, _ in jax.tree_util.tree_flatten_with_path(updates)[0]]
  for i, (path, x) in enumerate(zip(paths, leaves)):
    have, want = quantization_of(x), q if expected is not None and expected[i] else None
    if have != want:
      raise ValueError(
        f"{name}: the optimizer state's {field} at {_tree.where(path)} is "
        f"{_describe(have, x)}, but this transform holds it {_describe(want, None)}; a state "
        "is read with the options that made it: give the transform its own init's state, "
        "or build it with the state's options"
      )
