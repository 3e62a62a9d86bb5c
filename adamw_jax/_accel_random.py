"""A bfloat16 leaf written by stochastic rounding, stepped by one Pallas kernel per TPU.

Compiled for a TPU v5e, XLA splits that step (threefry's bits, the float32 step, the rounding)
into two kernels for some leaves, which read the gradient and moments twice (16.1 B/param for
a floor of 14 under FSDP, 18.8 on one device), and keeps each leaf's key and the handles of
its own copies into VMEM in device memory (12.8 MiB, 8 % of the state). Here each tile of
whole rows is read once and written once. Its bits are the XLA path's: an element's are
threefry of its flat index in the leaf, as ``jax.random.bits`` draws them
(`adamw_jax._lowprec.random_bits` with a `adamw_jax._lowprec.TileKey`), so the step is the
XLA path's bit for bit (``tests/test_accel_random.py`` runs the kernel in Pallas' interpreter,
on one device and sharded, and compares). A GPU needs none: XLA fuses the step into one kernel
there (14.0 B/param).

The leaf as ``(rows, columns)``, its last axis (a multiple of 128) the columns (a flat leaf:
rows of 128), ``rows`` a multiple of 16 (bfloat16's tiles); tiles of whole rows, stepped 16
rows by at most 512 columns at a time. Other leaves keep the XLA path. On a mesh the kernel runs on each
device's rows (``_pallas.on_mesh``): a device's first element is its index along the
axes that split the leaf's first axis times its elements.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from adamw_jax import _lowprec, _moments, _pallas, _steer, _writes

_GROUP = 16  # rows a step of the kernel's loop (bfloat16 tiles)
_CHUNK = 512  # the most columns a step of its loop (threefry's values held in vector registers)


class Spec(NamedTuple):
  """What one leaf's kernel is, fixed when the step is traced."""

  writer: _writes.Writer
  how: _writes.How  # its z is replaced by the kernel's
  decayed: bool
  eps_root: bool
  signs: tuple[bool, ...]  # of the moments (mu, nu, and nu_max)


def eligible(writer: _writes.Writer, how: _writes.How, g, moments, p, buffer) -> bool:
  """Whether a leaf may take the kernel: the fused step, stochastic rounding of bfloat16
  parameters, plain moments. (An update leaves the kernel to be added by ``optax.apply_updates``,
  which XLA cannot fuse into it: XLA's own step moves as few bytes then.)"""
  floats = [g, *moments]
  return (
    how.fused
    and writer.uses_key
    and p is not None
    and buffer is None
    and jnp.dtype(p.dtype) == jnp.bfloat16
    and not any(map(_moments.is_quantized, moments))
    and all(jnp.issubdtype(x.dtype, jnp.floating) and x.dtype.itemsize <= 4 for x in floats)
  )


def _view(shape: tuple[int, ...]) -> tuple[int, int]:
  """A leaf of `shape` as ``(rows, columns)``: its last axis the columns; a flat leaf, rows of 128
  (the free view of a flat bfloat16 array of whole 16-row tiles on a TPU)."""
  n = math.prod(shape)
  return (n // 128, 128) if len(shape) < 2 else (n // shape[-1], shape[-1])


def _takes(shape: tuple[int, ...]) -> bool:
  """Whether the kernel takes one device's leaf of `shape`."""
  rows, columns = _view(shape)
  if rows * columns != math.prod(shape) or columns % 128 or rows == 0:
    return False
  tile = _pallas.tile8(rows, columns)
  return rows % _GROUP == 0 and tile % _GROUP == 0 and rows * columns < 2**32


def _body(spec: Spec, n: int):
  def kernel(floats, z, key, first, g, p, *rest):
    moments, out, new = rest[:n], rest[n], rest[n + 1 :]
    tile, columns = g.shape
    chunk = math.gcd(columns, _CHUNK)
    chunks = columns // chunk
    c, decay = _pallas.unpack_scalars(floats, spec.eps_root, spec.decayed)
    how = spec.how._replace(z=z[0])
    key = (key[0], key[1])
    first = first[0] + pl.program_id(0) * (tile * columns)  # int32 wraps as the index does
    shape = (_GROUP, chunk)

    def one(i, carry):
      r0 = pl.multiple_of(lax.div(i, chunks) * _GROUP, _GROUP)
      c0 = pl.multiple_of(lax.rem(i, chunks) * chunk, chunk)
      at = (pl.ds(r0, _GROUP), pl.ds(c0, chunk))
      loaded = [_moments.load(x[at], s, shape) for x, s in zip(moments, spec.signs)]
      m, v, vm = (*loaded, None)[:3]
      tile_key = _lowprec.TileKey(key, first + r0 * columns + c0, columns)
      inside = contextlib.nullcontext() if _pallas.INTERPRET.get() else _steer.IN_KERNEL.held()
      with inside:
        o, *stepped, _ = spec.writer.step(g[at], m, v, vm, p[at], c, decay, None, tile_key, how)
      out[at] = o.astype(out.dtype)
      for ref, x, old, s in zip(new, stepped, moments, spec.signs):
        ref[at] = _moments.store(x, old[at], s)
      return carry

    lax.fori_loop(0, (tile // _GROUP) * chunks, one, 0)

  return kernel


@functools.partial(jax.jit, static_argnames=("spec", "interpret"))
def _local(spec: Spec, arrays: dict[str, Any], interpret: bool = False):
  """The kernel on one device's rows of the leaf, viewed as ``(rows, columns)`` and back."""
  g, p, moments = arrays["g"], arrays["p"], arrays["moments"]
  shape = tuple(g.shape)
  rows, columns = _view(shape)
  as2 = lambda x: x.reshape(rows, columns)
  tile = _pallas.tile8(rows, columns)
  data = pl.BlockSpec((tile, columns), lambda i: (i, 0))
  scalar = pl.BlockSpec(memory_space=pltpu.SMEM)
  leaf = [as2(g), as2(p), *map(as2, moments)]
  if not interpret:  # in HBM (the note at `_pallas.TPU_VMEM`)
    leaf = [pltpu.with_memory_space_constraint(x, pltpu.HBM) for x in leaf]
  n = len(moments)
  aliases = {6 + i: 1 + i for i in range(n)} | ({5: 0} if spec.how.fused else {})
  outs = pl.pallas_call(
    _body(spec, n),
    interpret=pltpu.InterpretParams() if interpret else False,
    grid=(rows // tile,),
    in_specs=[scalar] * 4 + [data] * len(leaf),
    out_specs=[data] * (1 + n),
    out_shape=[jax.ShapeDtypeStruct((rows, columns), p.dtype)]
    + [jax.ShapeDtypeStruct((rows, columns), x.dtype) for x in moments],
    input_output_aliases=aliases,
    compiler_params=pltpu.CompilerParams(vmem_limit_bytes=_pallas.TPU_VMEM),
  )(arrays["floats"], arrays["z"], arrays["key"], arrays["first"], *leaf)
  return [x.reshape(shape) for x in outs]


def _step(spec: Spec, arrays: dict[str, Any]) -> list | None:
  """The kernel on the leaf's mesh (each device's rows); None where it does not take them."""
  interpret = _pallas.INTERPRET.get()

  def run(a, index):
    first = jnp.reshape(index * math.prod(a["g"].shape), (1,)).astype(jnp.int32)  # wraps
    return _local(spec, a | {"first": first}, interpret)

  return _pallas.on_mesh(arrays, {"floats", "z", "key"}, _takes, run)


def leaf(spec: Spec, through: Callable, g, moments, p, buffer, c, decay, z, key):
  """One leaf stochastically rounded: `through` (the XLA path) but in a TPU program, the kernel.

  `through`: ``(g, moments, p, buffer, c, decay, z, key) -> (out, moments, buffer)``; `key`:
  the leaf's raw uint32[2] key.
  """
  args = (g, list(moments), p, buffer, c, decay, z, key)
  spec = spec._replace(how=spec.how._replace(z=None))

  def tpu(g, moments, p, buffer, c, decay, z, key):
    floats, z1 = _pallas.pack_scalars(c, decay, z)
    arrays = {"g": g, "p": p, "moments": moments, "floats": floats, "z": z1, "key": key}
    result = _step(spec, arrays)
    if result is None:
      return through(g, moments, p, buffer, c, decay, z, key)
    return result[0], result[1:], buffer

  like = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype)
  out = (like(p), [like(x) for x in moments], None)  # the new parameter, the moments
  return _steer.per_platform(through, through, *args, out=out, tpu=tpu)
