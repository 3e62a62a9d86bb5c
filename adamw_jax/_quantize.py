"""Block-wise 8-bit and 4-bit quantized moments: torchao's AdamW8bit and AdamW4bit state to the bit.

Dettmers et al., *8-bit Optimizers via Block-wise Quantization* (2110.02861),
as torchao writes it in plain PyTorch (``torchao/optim/quant_utils.py``,
``subclass_8bit.py``): a leaf of ``n`` elements, read row-major, is cut into
``n / block_size`` blocks of ``block_size`` consecutive elements; each block is
divided by its largest magnitude (its ``scale``, at least 1e-12) and every
element is stored as the uint8 index of the nearest entry of a 256-entry
dynamic-exponent map (signed for the first moment, unsigned for the second),
found by arithmetic on the value, as torchao's search finds it (`adamw_jax._qmap`).
Blocks never span two leaves (a flat buffer quantizes only leaves that are
whole numbers of blocks, packed end to end). As in torchao and bitsandbytes,
only leaves of at least `MIN_SIZE` elements whose size is a multiple of
the block size are quantized; the others keep full-precision moments. A
non-finite value poisons its block, as in torchao: a NaN makes the block's
scale NaN, an infinity makes it infinite, so the whole block reads back
non-finite ([Low-memory AdamW](low-memory.md), "Non-finite gradients").

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
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from adamw_jax import _env, _qmap, _tree

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
  """A 4-bit `QuantizedMoment` (torchao's ``OptimState4bit``): flat codes, two a byte."""

  __slots__ = ()


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


def _explicit_first_axis(x) -> tuple | None:
  """On a mesh with explicit axes: (mesh, mesh axes of `x`'s first axis); else None.

  There a reshape needs its output's sharding: a leaf is sharded along its
  first axis only (``_lowmem``), so the blocks are sharded along theirs.
  """
  sharding = _tree.explicit_sharding(x)
  if sharding is None:
    return None
  spec = tuple(sharding.spec)
  return sharding.mesh, (spec[0] if spec else None)


def _reshape(x: jax.Array, shape: tuple[int, ...], first: tuple | None) -> jax.Array:
  if first is None:
    return x.reshape(shape)
  mesh, axis = first
  return lax.reshape(
    x, shape, out_sharding=NamedSharding(mesh, P(axis, *(None,) * (len(shape) - 1)))
  )


def block_scales(blocks: jax.Array) -> jax.Array:
  """Each block's scale (blocks along the last axis): its largest magnitude, at least 1e-12.

  torchao's amax (and clip) propagate a NaN into the block's scale; XLA:CPU's max reduction
  drops it (measured), so it is said: a NaN anywhere in a block makes its scale NaN, its
  codes 0 (every comparison of the search is false), and so the whole block NaN when read.
  """
  scale = jnp.maximum(jnp.max(jnp.abs(blocks), axis=-1), jnp.float32(1e-12))
  nan = jnp.max(jnp.isnan(blocks).astype(jnp.float32), axis=-1) > 0
  return jnp.where(nan, jnp.float32(jnp.nan), scale)


def quantize_blocks(blocks: jax.Array, signed: bool, bits: int, zero=None):
  """``(codes, scales)`` of float32 `blocks` (blocks along the last axis), codes unpacked.

  `zero`: a uint32 zero the compiler cannot see (``_qmap.codes``).
  """
  scale = block_scales(blocks)
  return _qmap.codes(blocks / scale[..., None], signed, bits, zero), scale


FUSIBLE = _env.Flag("fusible")
"""Held: codes are read in forms XLA:GPU fuses into their consumer, the same values.

Codes looked up in the map (a gather from its 2**bits entries) instead of `_qmap.values`'
arithmetic, and nibbles split by shifts of a broadcast byte instead of a stack: with these,
an update read from quantized moments is one fusion with ``optax.apply_updates``; without,
XLA:GPU writes the values, or the codes, to memory first, as large as the leaf
(``_accel._split``). Not for kernels (Pallas takes no constants, Triton joins by a stack), nor
TPU (which gathers each element in a fusion of its own).
"""


def dequantize_blocks(codes: jax.Array, scale: jax.Array, signed: bool, bits: int):
  """``map[codes] * scale``: `codes` unpacked, blocks along the last axis, `scale` one a block."""
  if FUSIBLE.get():
    table = jnp.asarray(_qmap.quantization_map(signed, bits), jnp.float32)
    return table.at[codes].get(mode="promise_in_bounds") * scale[..., None]
  return _qmap.values(codes, signed, bits) * scale[..., None]


def pack(codes: jax.Array) -> jax.Array:
  """4-bit codes two a byte, ``(even << 4) | odd`` along the last axis, as torchao's.

  The pairs split off a trailing axis of two (not strided slices): Triton's split in a GPU
  kernel (``_accel``), as :func:`unpack`'s stack is its join.
  """
  even, odd = lax.unstack(codes.reshape(*codes.shape[:-1], codes.shape[-1] // 2, 2), axis=-1)
  return (even << 4) | odd


def unpack(packed: jax.Array) -> jax.Array:
  """The 4-bit codes of :func:`pack`'s bytes, along the last axis."""
  if FUSIBLE.get():
    codes = (packed[..., None] >> jnp.array([4, 0], packed.dtype)) & jnp.array(15, packed.dtype)
  else:
    codes = jnp.stack([packed >> 4, packed & 0b1111], axis=-1)
  return codes.reshape(*packed.shape[:-1], 2 * packed.shape[-1])


def quantize(x: jax.Array, block_size: int, signed: bool, bits: int = 8) -> QuantizedMoment:
  """`x` (float32) as a `QuantizedMoment`, torchao's ``copy_`` into its optimizer state.

  4-bit: each block's codes packed two a byte, ``(even << 4) | odd``, as torchao's.
  """
  first = _explicit_first_axis(x)
  blocks = _reshape(x.astype(jnp.float32), (x.size // block_size, block_size), first)
  codes, scale = quantize_blocks(blocks, signed, bits)
  if bits == 8:
    return QuantizedMoment(_reshape(codes, x.shape, first), scale)
  return PackedQuantizedMoment(_reshape(pack(codes), (x.size // 2,), first), scale)


def dequantize(q: QuantizedMoment, signed: bool, shape: tuple[int, ...] | None = None) -> jax.Array:
  """The float32 moment: ``qmap[codes] * scale``, block by block, as torchao's ``dequantize``.

  4-bit (a [`PackedQuantizedMoment`][adamw_jax.PackedQuantizedMoment]) codes are flat: `shape`
  is the leaf's (None: flat).
  """
  bits = 4 if isinstance(q, PackedQuantizedMoment) else 8
  first = _explicit_first_axis(q.codes)
  nblocks = q.scale.shape[0]
  codes = jnp.asarray(q.codes)
  if bits == 4:
    codes = unpack(_reshape(codes, (nblocks, codes.size // nblocks), first))
    shape = (2 * q.codes.size,) if shape is None else tuple(shape)
  else:
    codes = _reshape(codes, (nblocks, codes.size // nblocks), first)
    shape = q.codes.shape
  blocks = dequantize_blocks(codes, jnp.asarray(q.scale), signed, bits)
  return _reshape(blocks, shape, first)
