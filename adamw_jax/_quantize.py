"""Block-wise 8-bit and 4-bit quantized moments: torchao's AdamW8bit and AdamW4bit state to the bit.

Dettmers et al., *8-bit Optimizers via Block-wise Quantization* (2110.02861),
as torchao writes it in plain PyTorch (``torchao/optim/quant_utils.py``,
``subclass_8bit.py``): a leaf of ``n`` elements, read row-major, is cut into
``n / block_size`` blocks of ``block_size`` consecutive elements; each block is
divided by its largest magnitude (its ``scale``, at least 1e-12) and every
element is stored as the uint8 index of the nearest entry of a 256-entry
dynamic-exponent map (signed for the first moment, unsigned for the second).
Blocks never span two leaves (a flat buffer quantizes only leaves that are
whole numbers of blocks, packed end to end). As in torchao and bitsandbytes,
only leaves of at least :data:`MIN_SIZE` elements whose size is a multiple of
the block size are quantized; the others keep full-precision moments. A
non-finite value poisons its block, as in torchao: a NaN makes the block's
scale NaN, an infinity makes it infinite, so the whole block reads back
non-finite (``docs/low-memory.md``, "Non-finite gradients").

4-bit (2309.01507, torchao's ``subclass_4bit.py``): the same blocks and
rounding with a 16-entry map (signed: the dynamic map with 3 exponent bits;
unsigned: ``linspace(0, 1, 17)[1:]``, no zero), two codes a byte (the even
element in the high nibble), the codes a flat uint8 array of ``n / 2`` bytes
as torchao's. A block is an even number of elements, so a byte never spans
two blocks and a shard of whole blocks is a shard of whole bytes.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

MIN_SIZE = 4096
"""Leaves smaller than this keep full-precision moments (bitsandbytes' and torchao's threshold)."""


class QuantizedMoment(NamedTuple):
  """One moment of one leaf, block-wise quantized (torchao's ``OptimState8bit``/``OptimState4bit``).

  Attributes:
    codes: uint8 indices into the quantization map: 8-bit, the leaf's shape;
      4-bit, flat, two a byte (``n / 2`` bytes for ``n`` elements).
    scale: float32, one per block (8-bit: ``codes.size // scale.size`` is the
      block size; 4-bit: ``2 * codes.size // scale.size``).
  """

  codes: jax.Array | np.ndarray  # numpy on the host, in from_torch / to_torch_state_dict
  scale: jax.Array | np.ndarray


class PackedQuantizedMoment(QuantizedMoment):
  """A 4-bit :class:`QuantizedMoment` (torchao's ``OptimState4bit``): flat codes, two a byte."""

  __slots__ = ()


def _linspace(start: float, end: float, steps: int) -> np.ndarray:
  """``torch.linspace`` in float32 on the CPU: fused multiply-adds from both ends to the middle."""
  start32, end32 = np.float32(start), np.float32(end)
  step = np.float64(np.float32((end32 - start32) / np.float32(steps - 1)))
  i = np.arange(steps)
  low = (np.float64(start32) + step * i).astype(np.float32)  # exact product: one rounding, an FMA's
  high = (np.float64(end32) - step * (steps - i - 1)).astype(np.float32)
  return np.where(i < steps // 2, low, high).astype(np.float32)


def dynamic_map(signed: bool, max_exponent_bits: int = 7, total_bits: int = 8) -> np.ndarray:
  """The sorted float32 values of bitsandbytes' dynamic map, as torchao's ``create_dynamic_map``."""
  data: list[np.ndarray] = []
  non_sign_bits = total_bits - 1
  assert non_sign_bits == max_exponent_bits  # torchao's maps: no "additional items"
  for i in range(max_exponent_bits):
    items = 2 ** (i + non_sign_bits - max_exponent_bits + (0 if signed else 1)) + 1
    bounds = _linspace(0.1, 1.0, items)
    means = ((bounds[:-1] + bounds[1:]) / np.float32(2.0)).astype(np.float32)
    scaled = (np.float32(10.0 ** (-(max_exponent_bits - 1) + i)) * means).astype(np.float32)
    data += [scaled] + ([-scaled] if signed else [])
  out = np.sort(np.concatenate([*data, np.array([0.0, 1.0], np.float32)]))
  assert out.size == 2**total_bits
  return out


def quantization_map(signed: bool, bits: int = 8) -> np.ndarray:
  """torchao's map for `bits` (8: ``subclass_8bit``'s; 4: ``subclass_4bit``'s)."""
  if bits == 8:
    return dynamic_map(signed)
  if signed:
    return dynamic_map(True, 3, 4)
  return _linspace(0.0, 1.0, 17)[1:]  # linear, no zero


_MAPS = {
  (signed, bits): quantization_map(signed, bits) for signed in (True, False) for bits in (8, 4)
}


def quantizes(shape: tuple[int, ...], block_size: int) -> bool:
  """Whether a leaf of `shape` gets quantized moments (torchao's rule)."""
  n = int(np.prod(shape, dtype=np.int64))
  return n >= MIN_SIZE and n % block_size == 0


def zeros(x: jax.Array, block_size: int, bits: int = 8) -> QuantizedMoment:
  """The quantized zero moment for a leaf like `x` (codes 0 and scales 0, as torchao's)."""
  kind = QuantizedMoment if bits == 8 else PackedQuantizedMoment
  return kind(
    jnp.zeros(x.shape if bits == 8 else (x.size // 2,), jnp.uint8),
    jnp.zeros((x.size // block_size,), jnp.float32),
  )


def _lookup(qmap: jax.Array, codes: jax.Array) -> jax.Array:
  """``qmap[codes]``; on a mesh with explicit axes, sharded as `codes` (a gather needs it said)."""
  if _explicit_first_axis(codes) is None:
    return qmap[codes]
  return qmap.at[codes].get(out_sharding=jax.typeof(codes).sharding)


def _codes(x: jax.Array, qmap: jax.Array) -> jax.Array:
  """torchao's ``quantize_{8,4}bit_with_qmap``: branchless binary search, then round to nearest."""
  top = qmap.shape[0] // 2
  codes = jnp.where(x >= qmap[top], top, 0)
  half = top // 2
  while half:
    codes = codes + jnp.where(x >= _lookup(qmap, codes + half), half, 0)
    half //= 2
  up = jnp.minimum(codes + 1, qmap.shape[0] - 1)
  down_value, up_value = _lookup(qmap, codes), _lookup(qmap, up)
  codes = jnp.where(x - down_value >= (up_value - down_value) * 0.5, up, codes)
  return codes.astype(jnp.uint8)


def _explicit_first_axis(x) -> tuple | None:
  """On a mesh with explicit axes: (mesh, mesh axes of `x`'s first axis); else None.

  There a reshape needs its output's sharding: a leaf is sharded along its
  first axis only (``_lowmem``), so the blocks are sharded along theirs.
  """
  sharding = getattr(jax.typeof(x), "sharding", None)
  mesh = getattr(sharding, "mesh", None)
  if mesh is None or not any(t == AxisType.Explicit for t in mesh.axis_types):
    return None
  assert sharding is not None  # it has a mesh
  spec = tuple(sharding.spec)
  return mesh, (spec[0] if spec else None)


def _reshape(x: jax.Array, shape: tuple[int, ...], first: tuple | None) -> jax.Array:
  if first is None:
    return x.reshape(shape)
  mesh, axis = first
  return lax.reshape(
    x, shape, out_sharding=NamedSharding(mesh, P(axis, *(None,) * (len(shape) - 1)))
  )


def quantize(x: jax.Array, block_size: int, signed: bool, bits: int = 8) -> QuantizedMoment:
  """`x` (float32) as a :class:`QuantizedMoment`, torchao's ``copy_`` into its optimizer state.

  4-bit: each block's codes packed two a byte, ``(even << 4) | odd``, as torchao's.
  """
  first = _explicit_first_axis(x)
  blocks = _reshape(x.astype(jnp.float32), (x.size // block_size, block_size), first)
  scale = jnp.maximum(jnp.max(jnp.abs(blocks), axis=-1), jnp.float32(1e-12))
  # torchao's amax (and clip) propagate a NaN into the block's scale; XLA:CPU's max reduction
  # drops it (measured), so it is said: a NaN anywhere in a block makes its scale NaN, its
  # codes 0 (every comparison of the search is false), and so the whole block NaN when read.
  scale = jnp.where(jnp.any(jnp.isnan(blocks), axis=-1), jnp.float32(jnp.nan), scale)
  codes = _codes(blocks / scale[:, None], jnp.asarray(_MAPS[signed, bits]))
  if bits == 8:
    return QuantizedMoment(_reshape(codes, x.shape, first), scale)
  packed = (codes[:, 0::2] << 4) | codes[:, 1::2]
  return PackedQuantizedMoment(_reshape(packed, (x.size // 2,), first), scale)


def dequantize(q: QuantizedMoment, signed: bool, shape: tuple[int, ...] | None = None) -> jax.Array:
  """The float32 moment: ``qmap[codes] * scale``, block by block, as torchao's ``dequantize``.

  4-bit (a :class:`PackedQuantizedMoment`) codes are flat: `shape` is the leaf's (None: flat).
  """
  bits = 4 if isinstance(q, PackedQuantizedMoment) else 8
  first = _explicit_first_axis(q.codes)
  nblocks = q.scale.shape[0]
  codes = jnp.asarray(q.codes)
  if bits == 4:
    pairs = _reshape(codes, (nblocks, codes.size // nblocks), first)
    codes = jnp.stack([pairs >> 4, pairs & 0b1111], axis=-1)
    codes = _reshape(codes, (nblocks, 2 * pairs.shape[1]), first)
    shape = (2 * q.codes.size,) if shape is None else tuple(shape)
  else:
    shape = q.codes.shape
  values = _lookup(jnp.asarray(_MAPS[signed, bits]), codes.astype(jnp.int32))
  blocks = _reshape(values, (nblocks, values.size // nblocks), first)
  return _reshape(blocks * q.scale[:, None], shape, first)
