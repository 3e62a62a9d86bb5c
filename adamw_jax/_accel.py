"""A leaf with quantized moments stepped by one kernel per device on TPU and GPU: each block once.

The step of a leaf with 8-bit (or 4-bit) moments reads its gradient, parameter, codes and
scales and writes its parameter, codes and scales; a block's new scale is the largest
magnitude of its new moments, which the codes then divide. XLA fuses that diamond
(elementwise, reduce, elementwise on the same block) on neither accelerator: compiled for TPU
v5e it writes the new moments to memory, reduces them and reads them back (8-bit: 116 B/param
where the floor is 16, and relayouts of the scales to every element; 4-bit: 45 B/param where
it is 14, with temporaries 27 times the state), for H100 it computes them twice (40 B/param).
Here the step of such a leaf is one Pallas kernel instead, lowered for the platform
(``_steer.per_platform``): each tile of whole blocks is read once, its moments dequantized,
stepped by the one kernel (``_kernel``, through the leaf's writer, ``_writes``), reduced per
block and quantized (``_quantize``), and written once. Its body is the XLA path's own
functions on a tile, so the numbers are the XLA path's (``tests/test_accel.py`` runs both
kernels on the CPU in Pallas' interpreter and compares them bit for bit).

- TPU (Mosaic): the leaf as ``(rows, columns)`` (its last axis the columns, the others the rows;
  a free view when the rows are tile-aligned), the columns a whole number of blocks, tiles of
  whole rows. Scales are flat arrays, whose free views on a TPU are rows of 128: the kernel
  takes them so where each tile's are whole rows of that view, and lays them out as the leaf's
  rows in VMEM (`_accel_nibbles.Nibbles`), else as ``(rows, columns / block_size)`` (a copy XLA
  makes). 4-bit codes are flat too, taken as rows of 128 bytes; blocks of 128, the columns 128
  or a multiple of 256 that divides or is divided by 16384 (a flat leaf: rows of 128). 8-bit
  codes of a flat leaf of one row are taken flat (`_codes_view`).
- GPU (Triton): the leaf as ``(blocks, block_size)`` (free on a GPU), tiles of 2 blocks (4-bit
  codes ``(blocks, block_size / 2)``, split and joined in the tile); blocks of a power of two.

A GPU's update (not the fused step, nor Adam's L2 decay) is split (`_split`): XLA computes it
elementwise from the old codes, in the fusion of its consumer (``optax.apply_updates``), and
the kernel writes the moments alone. A kernel's update would be an array in memory between
the two, as large as the leaf (compiled for H100: 28.1 B/param and 64 MiB of temporaries on one
device for 8-bit moments, against 22.1 and none split). A TPU keeps the whole kernel: XLA:TPU
lays each block's scale out to every element in memory.

Leaves the kernel does not take (stochastic rounding, which draws its bits with
``jax.random``, complex or float64 leaves, shapes outside the lists above) take the
XLA path; so does every leaf under ``jax.vmap``.

Sharding: a kernel runs on one device's rows (``jax.shard_map``). On a mesh with explicit axes
the leaf's own sharding of its first axis is used; on a mesh with automatic axes it is not
known when the step is traced, and the update of such a leaf is computed sharded along its
first axis over every mesh axis (the layout FSDP gives it, ``docs/scaling-out.md``), the
devices' shards then laid out as the step's outputs ask (gathered for a replicated leaf).
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple, cast

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

from adamw_jax import _accel_nibbles, _kernel, _pallas, _quantize, _steer, _writes

_GPU_BLOCKS = 2  # blocks a GPU tile (a power of two)
_TPU_COLUMNS = 8192  # the widest flat view of a TPU kernel


class Spec(NamedTuple):
  """What one leaf's kernel is, fixed when the step is traced."""

  block_size: int
  bits: int  # 8, or 4: two codes a byte, flat (``_quantize.PackedQuantizedMoment``)
  moments: tuple[bool, ...]  # for mu, nu (and nu_max): signed
  writer: _writes.Writer
  how: _writes.How  # its z is replaced by the kernel's
  decayed: bool
  has_params: bool
  has_buffer: bool
  eps_root: bool
  out_dtype: Any
  # The moments alone (`_moments_only`, a GPU's kernel only): no out or buffer is written, and
  # the parameter and buffer the writer's step takes are zeros of these dtypes (None: none).
  moments_only: bool = False
  stand_ins: tuple[Any, Any] = (None, None)


def eligible(writer: _writes.Writer) -> bool:
  """Whether a leaf with quantized moments takes this module's paths (a writer without keys)."""
  return not writer.uses_key


def _kernel_takes(g, moments, p) -> bool:
  """Whether the kernel may take the leaf: float leaves."""
  dtypes = [g.dtype] + ([] if p is None else [p.dtype])
  return all(jnp.issubdtype(d, jnp.floating) and jnp.dtype(d).itemsize <= 4 for d in dtypes)


# ---------------------------------------------------------------- the tile


def _tile(spec: Spec, floats, z, g, p, buffer, codes, scales):
  """One tile's step: values and codes ``(blocks, block_size)`` (4-bit: unpacked), scales ``(blocks,)``.

  Returns ``(out, buffer, [(codes, scales) of each new moment])``, codes unpacked.
  """
  zero = z.astype(jnp.uint32)
  if spec.moments_only:  # moments that read neither (`leaf`); the out computed here is dropped
    p_dtype, buffer_dtype = spec.stand_ins
    p = None if p_dtype is None else jnp.zeros(g.shape, p_dtype)
    buffer = None if buffer_dtype is None else jnp.zeros(g.shape, buffer_dtype)
  moments = [
    _quantize.dequantize_blocks(k, s, signed, spec.bits)
    for k, s, signed in zip(codes, scales, spec.moments)
  ]
  c, decay = _pallas.unpack_scalars(floats, spec.eps_root, spec.decayed)
  how = spec.how._replace(z=z)
  m, v = moments[0], moments[1]
  vm = moments[2] if len(moments) > 2 else None
  # Compiled, the body takes each platform choice's `default` (what XLA does on that platform);
  # interpreted on a CPU (the tests), XLA:CPU's own branches, as the XLA path there.
  inside = contextlib.nullcontext() if _pallas.INTERPRET.get() else _steer.IN_KERNEL.held()
  with inside:
    out, m, v, vm, buffer = spec.writer.step(g, m, v, vm, p, c, decay, buffer, None, how)
  new = [m, v] + ([vm] if vm is not None else [])
  quantized = [
    _quantize.quantize_blocks(x, signed, spec.bits, zero) for x, signed in zip(new, spec.moments)
  ]
  return out.astype(spec.out_dtype), buffer, quantized


class _Refs(NamedTuple):
  floats: Any
  z: Any
  g: Any
  p: Any
  buffer: Any
  codes: list
  scales: list
  out: Any
  new_buffer: Any
  new_codes: list
  new_scales: list


def _refs(spec: Spec, n: int, refs) -> _Refs:
  """The kernel's refs by name: (floats, z, g, [p], [buffer], codes..., scales...), then outputs."""
  floats, z, g, *rest = refs
  p = rest.pop(0) if spec.has_params else None
  buffer = rest.pop(0) if spec.has_buffer else None
  codes, scales = rest[:n], rest[n : 2 * n]
  rest = rest[2 * n :]
  out = None if spec.moments_only else rest.pop(0)
  new_buffer = rest.pop(0) if spec.has_buffer else None
  return _Refs(floats, z, g, p, buffer, codes, scales, out, new_buffer, rest[:n], rest[n:])


def _gpu_body(spec: Spec, n: int):
  """GPU: a tile of whole blocks ``(blocks, block_size)``, its scales ``(blocks,)``, at once.

  4-bit codes ``(blocks, block_size / 2)``, unpacked and packed in the tile (``_quantize``'s
  :func:`~adamw_jax._quantize.unpack` and :func:`~adamw_jax._quantize.pack`: Triton's join
  and split).
  """
  unpack = _quantize.unpack if spec.bits == 4 else (lambda k: k)
  pack = _quantize.pack if spec.bits == 4 else (lambda k: k)

  def kernel(*refs):
    r = _refs(spec, n, refs)
    load = lambda ref: None if ref is None else ref[...]
    out, buffer, quantized = _tile(
      spec,
      r.floats,
      r.z[0],
      load(r.g),
      load(r.p),
      load(r.buffer),
      [unpack(k[...]) for k in r.codes],
      [load(s) for s in r.scales],
    )
    if r.out is not None:
      r.out[...] = out
    if r.new_buffer is not None:
      r.new_buffer[...] = buffer
    for (k, s), kr, sr in zip(quantized, r.new_codes, r.new_scales):
      kr[...] = pack(k)
      sr[...] = s

  return kernel


def _tpu_body(spec: Spec, n: int, group: int, flat_scales: bool):
  """TPU: a tile of rows ``(rows, columns)``, stepped `group` rows by one block at a time.

  uint8 codes are read and written whole (32-row tiles), through an int32 copy in VMEM; the
  rest, and the scales ``(rows, columns / block_size)``, `group` rows at a time, a block's
  scales picked out of their rows by a lane mask (a sum with zeros: exact, NaN kept).
  `flat_scales` (always with 4-bit codes): the scales come as their flat array's rows of 128
  and are laid out as the tile's rows in VMEM (`_accel_nibbles.Nibbles`).
  """
  bs = spec.block_size
  nibbles = spec.bits == 4
  extra = n * (1 + int(nibbles) + int(flat_scales))

  def kernel(*refs):
    r = _refs(spec, n, refs[: len(refs) - extra])
    scratch = refs[len(refs) - extra :]
    wide = scratch[:n]
    packed = list(scratch[n : 2 * n]) if nibbles else []  # 4-bit: the codes' int32 copy
    held = list(scratch[len(scratch) - n :]) if flat_scales else []  # the scales as rows
    rows, columns = r.g.shape
    blocks = columns // bs
    lay = _accel_nibbles.Nibbles(rows, columns, bs)
    for i, (w, k) in enumerate(zip(wide, r.codes)):
      if nibbles:  # codes laid out as the leaf's rows (`_accel_nibbles.Nibbles`)
        packed[i][...] = k[...].astype(jnp.int32)
        lay.unpack(packed[i], w)
      else:
        w[...] = k[...].astype(jnp.int32).reshape(w.shape)
    scales_in, scales_out = r.scales, r.new_scales
    if flat_scales:
      for s, h in zip(r.scales, held):
        lay.scales_in(s, h)
      scales_in, scales_out = held, held
    lanes = jax.lax.broadcasted_iota(jnp.int32, (group, scales_in[0].shape[1]), 1)

    def one(i, carry):
      # One group of rows: a static first row (Mosaic proves a bfloat16 row pair aligned).
      first = 0 if rows == group else pl.multiple_of(jax.lax.div(i, blocks) * group, group)
      at = pl.ds(first, group)
      b = jax.lax.rem(i, blocks)
      cols = pl.ds(pl.multiple_of(b * bs, bs), bs)
      load = lambda ref: None if ref is None else ref[at, cols]
      mine = lanes == b
      picked = [jnp.sum(jnp.where(mine, s[at, :], 0.0), axis=1) for s in scales_in]
      out, buffer, quantized = _tile(
        spec,
        r.floats,
        r.z[0],
        load(r.g),
        load(r.p),
        load(r.buffer),
        [load(w) for w in wide],
        picked,
      )
      r.out[at, cols] = out
      if r.new_buffer is not None:
        r.new_buffer[at, cols] = buffer
      for (k, s), w, sr in zip(quantized, wide, scales_out):
        w[at, cols] = k.astype(jnp.int32)
        sr[at, :] = jnp.where(mine, s[:, None], sr[at, :])
      return carry

    jax.lax.fori_loop(0, (rows // group) * blocks, one, 0)
    for i, (w, k) in enumerate(zip(wide, r.new_codes)):
      if nibbles:
        lay.pack(w, packed[i])
        k[...] = packed[i][...].astype(jnp.uint8)
      else:
        k[...] = w[...].astype(jnp.uint8).reshape(k.shape)
    if flat_scales:
      for h, s in zip(held, r.new_scales):
        lay.scales_out(h, s)

  return kernel


# ---------------------------------------------------------------- the two lowerings


def _call(spec: Spec, target: str, interpret: bool, floats, z, g, p, buffer, codes, scales):
  """One device's kernel on its rows (flat arrays already viewed as the target wants)."""
  n = len(codes)
  bs = spec.block_size
  leaf = [g] + ([p] if spec.has_params else []) + ([buffer] if spec.has_buffer else [])
  if target == "tpu":
    rows, columns = g.shape
    assert not spec.moments_only  # a GPU's alone (`_split`)
    narrow = any(jnp.dtype(x.dtype).itemsize < 4 for x in leaf) or spec.out_dtype.itemsize < 4
    tile = _tpu_rows(spec, rows, columns, 16 if narrow else 8)
    assert tile is not None  # `_takes`
    data = pl.BlockSpec((tile, columns), lambda i: (i, 0))
    coded = data if codes[0].ndim == 2 else pl.BlockSpec(codes[0].shape, lambda i: (0,))
    per_block = pl.BlockSpec((tile, columns // bs), lambda i: (i, 0))
    scratch = [pltpu.VMEM((tile, columns), jnp.int32) for _ in range(n)]
    flat_scales = scales[0].shape != (rows, columns // bs)  # `_view`
    if spec.bits == 4:  # flat codes (`_accel_nibbles.Nibbles`)
      coded = pl.BlockSpec((tile * columns // 256, 128), lambda i: (i, 0))
      scratch += [pltpu.VMEM((tile * columns // 256, 128), jnp.int32) for _ in range(n)]
    if flat_scales:
      per_block = pl.BlockSpec(
        scales[0].shape if rows == 1 else (tile * columns // bs // 128, 128), lambda i: (i, 0)
      )
      held = (tile, max(columns // bs, 128))
      scratch += [pltpu.VMEM(held, jnp.float32) for _ in range(n)]
    scalar = pl.BlockSpec(memory_space=pltpu.SMEM)
    grid = (rows // tile,)
    params = pltpu.CompilerParams(vmem_limit_bytes=_pallas.TPU_VMEM)
    group = min(16 if narrow else 8, tile)
    body = _tpu_body(spec, n, group, flat_scales)
  else:
    blocks = g.shape[0]
    tile = math.gcd(blocks, _GPU_BLOCKS)
    data = pl.BlockSpec((tile, bs), lambda i: (i, 0))
    coded = pl.BlockSpec((tile, bs * spec.bits // 8), lambda i: (i, 0))
    per_block = pl.BlockSpec((tile,), lambda i: (i,))
    scalar = pl.BlockSpec((8,), lambda i: (0,))
    grid = (blocks // tile,)
    params = pltriton.CompilerParams(num_warps=8)
    body = _gpu_body(spec, n)
    scratch = []
  z_spec = scalar if target == "tpu" else pl.BlockSpec((1,), lambda i: (0,))
  in_specs = [scalar, z_spec] + [data] * len(leaf) + [coded] * n + [per_block] * n
  written = 0 if spec.moments_only else 1 + int(spec.has_buffer)  # out, buffer
  out_specs = [data] * written + [coded] * n + [per_block] * n
  out_shape = (
    ([] if spec.moments_only else [jax.ShapeDtypeStruct(g.shape, spec.out_dtype)])
    + ([jax.ShapeDtypeStruct(g.shape, buffer.dtype)] if spec.has_buffer else [])
    + [jax.ShapeDtypeStruct(k.shape, jnp.uint8) for k in codes]
    + [jax.ShapeDtypeStruct(s.shape, jnp.float32) for s in scales]
  )
  first_code = 2 + len(leaf)
  aliases = {first_code + i: written + i for i in range(2 * n)}
  if spec.has_buffer:
    aliases[2 + len(leaf) - 1] = 1
  if spec.has_params and jnp.dtype(p.dtype) == jnp.dtype(spec.out_dtype) and spec.how.fused:
    aliases[3] = 0
  arrays = (*leaf, *codes, *scales)
  if target == "tpu" and not interpret:  # in HBM (the note at `_pallas.TPU_VMEM`)
    arrays = tuple(pltpu.with_memory_space_constraint(x, pltpu.HBM) for x in arrays)
  return pl.pallas_call(
    body,
    interpret=(pltpu.InterpretParams() if target == "tpu" else True) if interpret else False,
    grid=grid,
    in_specs=in_specs,
    out_specs=out_specs,
    out_shape=out_shape,
    input_output_aliases=aliases,
    compiler_params=params,
    scratch_shapes=scratch,
  )(floats, z, *arrays)


def _tpu_rows(spec: Spec, rows: int, columns: int, group: int) -> int | None:
  """Rows a TPU tile: a divisor of `rows`, a multiple of 32 (uint8 tiles) unless all of them.

  4-bit: its codes and scales whole rows of their views (`_accel_nibbles.Nibbles`): ``tile * columns`` a
  multiple of 8 rows of 16384 scales, and of `group`; None where no tile fits.
  """
  most = max(1, _pallas.TPU_TILE_BYTES // (4 * columns))
  if spec.bits == 4:
    if rows == 1:
      return 1 if columns * 4 <= 4 * _pallas.TPU_TILE_BYTES else None
    unit = math.lcm(group, max(1, 8 * 16384 // columns))
    tile = unit
    while tile * 2 <= most and rows % (tile * 2) == 0:
      tile *= 2
    if rows % tile == 0 and tile * columns * 4 <= 4 * _pallas.TPU_TILE_BYTES:
      return tile
    whole = rows * columns % 16384 == 0 and rows % group == 0
    return rows if whole and rows * columns * 4 <= 4 * _pallas.TPU_TILE_BYTES else None
  return _pallas.tile8(rows, columns)


# ---------------------------------------------------------------- one device, then the mesh


def _view(target: str, leaf_shape: tuple[int, ...], block_size: int, bits: int = 8):
  """(the 2-D view of a device's leaf, of its scales) the target's kernel takes.

  GPU: ``(blocks, block_size)`` (4-bit codes: ``(blocks, block_size / 2)``, `_codes_view`).
  TPU: ``(rows, last axis)`` when the last axis holds whole
  blocks and lanes (free when the rows are whole tiles), else ``(n / width, width)``,
  `width` a power-of-two number of blocks (XLA relayouts such a leaf, and back).
  """
  n = math.prod(leaf_shape)
  if target != "tpu":
    return (n // block_size, block_size), (n // block_size,)
  if bits == 4:  # `_accel_nibbles.Nibbles`: the leaf's rows, or rows of 128 (a flat leaf, free)
    if n % 16384 and n < 16384:  # a small leaf as one row (XLA copies it, and its scales)
      return (1, n), (1, n // 128)
    columns = leaf_shape[-1] if len(leaf_shape) >= 2 else 128
    return (n // columns, columns), (n // 16384, 128)
  columns = leaf_shape[-1] if leaf_shape else 1
  if len(leaf_shape) < 2 or columns % block_size or columns % 128:
    columns = block_size
    while columns * 2 <= _TPU_COLUMNS and n % (columns * 2) == 0:
      columns *= 2
  rows, q = n // columns, columns // block_size
  # Flat scales come as their free view, rows of 128, when each tile's are whole 8-row tiles of
  # it (or one tile takes them all) and a scale row holds whole rows of the leaf (or the
  # reverse); else as ``(rows, q)``, which XLA relays out (8 lanes of 128 for blocks of 256 in
  # 2048 columns: 16 times their bytes) and back.
  tile = _pallas.tile8(rows, columns)
  whole = tile * q % 1024 == 0 or (tile == rows and rows * q % 128 == 0)
  if (128 % q == 0 or q % 128 == 0) and whole:
    return (rows, columns), (rows * q // 128, 128)
  return (rows, columns), (rows, q)


def _codes_view(spec: Spec, target: str, shape2: tuple[int, int], ndim: int) -> tuple[int, ...]:
  """The view of a moment's codes beside the leaf's `shape2` (the leaf `ndim`-dimensional):
  4-bit, half its columns (TPU: rows of 128 bytes, `_accel_nibbles.Nibbles`). TPU, 8-bit
  codes of a flat leaf of one row: as they are (a row of bytes is not their free view: XLA
  would relay them out, and back, in temporaries), made a row in the kernel."""
  rows, columns = shape2
  if spec.bits == 4 and target == "tpu":
    return (rows * columns // 256, 128)
  if target == "tpu" and rows == 1 and ndim == 1:
    return (columns,)
  return (rows, columns * spec.bits // 8)


def _takes(spec: Spec, target: str, leaf_shape: tuple[int, ...]) -> bool:
  """Whether `target`'s kernel takes one device's leaf of `leaf_shape` (a tile that fits).

  GPU: Triton's tiles are powers of two (a block of `block_size`, 4-bit codes of half).
  """
  block_size = spec.block_size
  if target != "tpu":
    return block_size & (block_size - 1) == 0
  (rows, columns), _ = _view(target, leaf_shape, block_size, spec.bits)
  if spec.bits == 4:
    lanes = columns == 128 or (
      columns % 256 == 0 and (rows == 1 or 16384 % columns == 0 or columns % 16384 == 0)
    )
    return block_size == 128 and lanes and _tpu_rows(spec, rows, columns, 16) is not None
  tile = _tpu_rows(spec, rows, columns, 8)
  return (
    columns % 128 == 0 and tile is not None and tile * columns * 4 <= 4 * _pallas.TPU_TILE_BYTES
  )


@functools.partial(jax.jit, static_argnames=("spec", "target", "interpret"))
def _local(spec: Spec, target: str, arrays: dict[str, Any], interpret: bool = False):
  """The kernel on one device's arrays of the leaf: viewed, stepped, viewed back.

  Jitted: leaves of one shape (the layers of a model) share one traced and lowered kernel.
  """
  g = arrays["g"]
  leaf_shape = tuple(g.shape)
  shape2, scale_shape = _view(target, leaf_shape, spec.block_size, spec.bits)
  as2 = lambda x: None if x is None else x.reshape(shape2)
  codes = [k.reshape(_codes_view(spec, target, shape2, g.ndim)) for k in arrays["codes"]]
  scales = [s.reshape(scale_shape) for s in arrays["scales"]]
  outs = _call(
    spec,
    target,
    interpret,
    arrays["floats"],
    arrays["z"],
    as2(g),
    as2(arrays.get("p")),
    as2(arrays.get("buffer")),
    codes,
    scales,
  )
  rest = list(outs)
  out = None if spec.moments_only else rest.pop(0)
  new_buffer = rest.pop(0) if spec.has_buffer else None
  n = len(codes)
  return {
    **({} if out is None else {"out": out.reshape(leaf_shape)}),
    "codes": [k.reshape(arrays["codes"][0].shape) for k in rest[:n]],
    "scales": [s.reshape(-1) for s in rest[n:]],
    **({} if new_buffer is None else {"buffer": new_buffer.reshape(leaf_shape)}),
  }


def step(spec: Spec, target: str, arrays: dict[str, Any]) -> dict[str, Any] | None:
  """One leaf's step on its mesh: the kernel on each device's rows; None where it does not take them."""
  interpret = _pallas.INTERPRET.get()

  def takes(shape):
    return _takes(spec, target, shape) and math.prod(shape) % spec.block_size == 0

  def run(a, index):
    return _local(spec=spec, target=target, arrays=a, interpret=interpret)

  return _pallas.on_mesh(arrays, {"floats", "z"}, takes, run)


@functools.cache
def _out_dtype(spec: Spec, g, p, buffer, moments: int):
  """The dtype of the writer's `out` for these dtypes (its step traced on scalars, once)."""
  scalar = lambda dtype: None if dtype is None else jax.ShapeDtypeStruct((), dtype)
  f32 = jnp.dtype(jnp.float32)
  fields: list[Any] = [  # abstract values, traced by eval_shape
    None if f == "eps_root" and not spec.eps_root else scalar(f32)
    for f in _kernel.Coefficients._fields
  ]
  c = _kernel.Coefficients(*fields)

  def out(g, m, v, vm, p, c, decay, buffer, z):
    how = spec.how._replace(z=z)
    return spec.writer.step(g, m, v, vm, p, c, decay, buffer, None, how)[0]

  vm = scalar(f32) if moments > 2 else None
  decay = scalar(f32) if spec.decayed else None
  p = p if spec.has_params else None
  args = (scalar(g), scalar(f32), scalar(f32), vm, scalar(p), c, decay, scalar(buffer))
  return jax.eval_shape(out, *args, scalar(jnp.dtype(jnp.int32))).dtype


def _split(spec: Spec, target: str) -> bool:
  """Whether the update is XLA's and the kernel writes the moments alone (`_moments_only`).

  A kernel's update (not the fused step's new parameter) is an array in memory between the
  kernel and its consumer (``optax.apply_updates``), as large as the leaf: for H100, XLA instead
  computes it elementwise from the old codes (``_quantize.FUSIBLE``), in its consumer's fusion.
  Not for TPU, whose XLA lays each block's scale out to every element in memory; nor with
  Adam's L2 decay, whose moments read the parameter.
  """
  l2 = spec.decayed and not spec.how.decoupled
  return target == "gpu" and not spec.how.fused and not l2


def _moments_only(spec: Spec, p, buffer) -> Spec:
  """`spec` writing the moments alone: the parameter and buffer stand in as zeros in the tile."""
  dtypes = (p.dtype if spec.has_params else None, buffer.dtype if spec.has_buffer else None)
  return spec._replace(moments_only=True, has_params=False, has_buffer=False, stand_ins=dtypes)


def _update(through: Callable, g, moments, p, buffer, c, decay, z):
  """`through`'s update and buffer on each device's rows, as the kernel's (its moments unused)."""
  arrays = {"g": g, "moments": moments, "p": p, "buffer": buffer, "scalars": (c, decay, z)}

  def run(a, index):
    with _quantize.FUSIBLE.held():
      out, _, new_buffer = through(a["g"], a["moments"], a["p"], a["buffer"], *a["scalars"])
    return out, new_buffer

  mapped = _pallas.on_mesh(arrays, {"scalars"}, lambda shape: True, run)
  assert mapped is not None  # takes every device's rows the kernel takes
  return mapped


def leaf(spec: Spec, through: Callable, g, moments, p, buffer, c, decay, z):
  """One leaf with quantized moments: `through` on a CPU (and where no kernel takes it), else the kernel.

  `through`: the XLA path, ``(g, moments, p, buffer, c, decay, z) -> (out, moments, buffer)``;
  `moments`: the leaf's quantized mu, nu (and nu_max); `z`: the step's opaque zero.
  """
  args = (g, list(moments), p, buffer, c, decay, z)
  if not _kernel_takes(g, moments, p) or not (buffer is None or isinstance(buffer, jax.Array)):
    return through(*args)  # complex or float64 leaves, a masked-out buffer
  spec = spec._replace(how=spec.how._replace(z=None))
  dtype = lambda x: None if x is None else jnp.dtype(x.dtype)
  spec = spec._replace(out_dtype=_out_dtype(spec, dtype(g), dtype(p), dtype(buffer), len(moments)))

  def kernel(target: str):
    split = _split(spec, target)
    spec_k = _moments_only(spec, p, buffer) if split else spec

    def run(g, moments, p, buffer, c, decay, z):
      floats, z1 = _pallas.pack_scalars(c, decay, z)
      arrays: dict[str, Any] = {"g": g, "floats": floats, "z": z1}
      arrays |= {"codes": [q.codes for q in moments], "scales": [q.scale for q in moments]}
      if spec_k.has_params:
        arrays["p"] = p
      if spec_k.has_buffer:
        arrays["buffer"] = buffer
      result = step(spec_k, target, arrays)
      if result is None:
        return through(g, moments, p, buffer, c, decay, z)
      kind = type(moments[0])  # QuantizedMoment, or PackedQuantizedMoment (4-bit)
      qs = [kind(k, s) for k, s in zip(result["codes"], result["scales"])]
      if split:
        out, new_buffer = _update(through, g, moments, p, buffer, c, decay, z)
      else:
        out, new_buffer = result["out"], result.get("buffer", buffer)
      return out, qs, new_buffer

    return run

  like = lambda x: cast(Any, None if x is None else jax.ShapeDtypeStruct(np.shape(x), x.dtype))
  out = (
    jax.ShapeDtypeStruct(np.shape(g), spec.out_dtype),
    [type(q)(like(q.codes), like(q.scale)) for q in moments],
    like(buffer),
  )
  return _steer.per_platform(through, through, *args, out=out, tpu=kernel("tpu"), gpu=kernel("gpu"))
