"""The native twin of the low-memory options (``_native_lowmem.cc``): which leaves, and the call.

The one step (``_core``) gives the native kernel a leaf whose moments are
bfloat16/float16 or block-wise quantized (``moment_bits``), whose parameter
is bfloat16/float16, or whose parameter is written by stochastic rounding,
with Kahan compensation or with its master's remainder (``param_rounding``); :func:`compute_dtype` says which
(the plain kernel, ``_native``, keeps the leaves whose arrays are all of one
float32/float64/complex dtype). The kernel computes what the leaf's hooks
compute (``_moments.load``, the writer's step in ``_writes``,
``_moments.store``) bit for bit, in one pass over memory, for all the leaves
of a group in one XLA custom call; ``tests/test_native.py`` checks it against
the pure kernel on every option and configuration. It is served as the plain
kernel is (``_native.enabled``: a CPU program with one device; in a GPU or TPU
program the same leaves get the pure hooks).

Stochastic rounding reads the bits ``jax.random.bits`` would draw from the
leaf's key, generated in the kernel (threefry2x32), so the results and the
state's key are the pure kernel's: a run may switch between the kernels, or
resume from a checkpoint, and stay bitwise the same.

Quantized moments are found from the value's bits (``_native_quantize.h``): one
entry of a bucket table per map made here (:func:`bucket_table`) and one comparison.
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from adamw_jax import _kernel, _native, _qmap, _quantize, _steer

F32, BF16, F16 = map(jnp.dtype, (jnp.float32, jnp.bfloat16, jnp.float16))
_STORED = (F32, BF16, F16)
_COMPUTE = {F32: 0, BF16: 1, F16: 2}  # _native_lowp.h's DType


class Writer(enum.IntEnum):
  """How the kernel writes the parameter (``_native_lowmem.cc``; ``_writes``' writers)."""

  NEAREST = 0
  STOCHASTIC = 1
  KAHAN = 2
  REMAINDER = 3


WRITERS = {
  "nearest": Writer.NEAREST,
  "stochastic": Writer.STOCHASTIC,
  "kahan": Writer.KAHAN,
  "remainder": Writer.REMAINDER,
}
_BUFFERED = (Writer.KAHAN, Writer.REMAINDER)  # a buffer per leaf in the state

# Per-leaf flags (``_native_lowmem.cc``).
_HAS_PARAM, _QUANTIZED, _HAS_BUFFER, _HAS_KEY = 1, 2, 4, 8


def _quantized(x) -> bool:
  return isinstance(x, _quantize.QuantizedMoment)


def compute_dtype(g, m, v, vm, p, writer: str) -> jnp.dtype | None:
  """The dtype the kernel computes the leaf in, or None when it does not serve the leaf.

  `p` is the parameter the step computes with (``_kernel.optax_leaf``'s: the
  nearest writer reads it only with weight decay); quantized moments are
  float32 to the step. Served: float32, bfloat16 and float16 arrays, computed
  in float32 by the stochastic and Kahan writers and in the arrays' promoted
  dtype by the nearest one; not a leaf whose arrays are all float32 and
  full precision (the plain kernel's).
  """
  moments = [x for x in (m, v, vm) if x is not None]
  arrays = [g, *(x for x in moments if not _quantized(x)), *(() if p is None else (p,))]
  if any(jnp.dtype(x.dtype) not in _STORED for x in arrays):
    return None
  if writer != "nearest":
    return F32
  dtypes = [jnp.dtype(x.dtype) for x in arrays]
  if all(d == F32 for d in dtypes) and not any(map(_quantized, moments)):
    return None
  dtypes += [F32] * any(map(_quantized, moments))
  cdtype = jnp.dtype(jnp.result_type(*dtypes))
  return cdtype if cdtype in _STORED else None


def mode(writer: str, *, fused: bool, with_params: bool) -> _native.Mode:
  """The kernel's mode for a leaf it serves (no ``Mode.MOMENTS``: the moments it stores are not
  the step's). The remainder writer steps its float32 master in the nearest writer's modes."""
  if writer not in ("nearest", "remainder"):
    return _native.Mode.FUSED if fused else _native.Mode.UPDATE
  if fused:
    return _native.Mode.FUSED if with_params else _native.Mode.FUSED_STEP
  return _native.Mode.UPDATE if with_params else _native.Mode.STEP


def _order(x: np.ndarray) -> np.ndarray:
  """float32 -> int64 preserving the order of the floats (-0.0 just below 0.0): a negative
  float's magnitude bits complemented, as ``_native_quantize.h`` reads a negative bucket."""
  s = np.asarray(x, np.float32).view(np.int32).astype(np.int64)
  return np.where(s < 0, -(s & 0x7FFFFFFF) - 1, s)


def _from_order(k: np.ndarray) -> np.ndarray:
  k = np.asarray(k, np.int64)
  return np.where(k < 0, (-k - 1) | 0x80000000, k).astype(np.uint32).view(np.float32)


def thresholds(qmap: np.ndarray) -> np.ndarray:
  """t_i (as :func:`_order` keys): the least float32 y whose code is above i, i = 0 .. K-2.

  The pure kernel's decision (``_native_quantize.h``): with i the floor index of y, the code
  is i + 1 when ``f32(y - map[i]) >= f32(f32(map[i+1] - map[i]) * 0.5)``; for a fixed i that
  never turns false as y grows, so each t_i is found by bisection between map[i] and map[i+1].
  """
  qmap = np.asarray(qmap, np.float32)
  lo, hi = qmap[:-1], qmap[1:]
  half = ((hi - lo) * np.float32(0.5)).astype(np.float32)
  below, above = _order(lo), _order(hi)  # the decision is false at map[i], true at map[i+1]
  while np.any(above - below > 1):
    mid = (below + above) // 2
    up = (_from_order(mid) - lo).astype(np.float32) >= half
    below, above = np.where(up, below, mid), np.where(up, mid, above)
  return above


def bucket_table(qmap: np.ndarray, e_lo: int, mbits: int) -> tuple[np.ndarray, int]:
  """The bucket table of `qmap` (``_native_quantize.h``) and the most thresholds in one bucket.

  A bucket is a sign and the magnitude's bits >> (23 - mbits) clamped to
  [(e_lo << mbits) - 1, 127 << mbits]: below 2**(e_lo - 127) one bucket, from 1.0 up one
  bucket (neither may hold a threshold). Entries: the negative buckets from the largest
  magnitude down, then the positive ones up; each ``(b << 23) | (w - 1)``, b the thresholds
  below the bucket, w the position of the one in it among its floats in increasing order
  (``2**(23 - mbits)``: none).
  """
  t = np.sort(thresholds(qmap))
  if np.any(_from_order(t) == 0):
    raise AssertionError("a threshold at zero")
  shift = 23 - mbits
  q = np.arange((e_lo << mbits) - 1, (127 << mbits) + 1, dtype=np.int64)
  sides, most = [], 0
  for negative in (True, False):
    if negative:
      first, last = -((q + 1) << shift), -(q << shift) - 1
      first[-1], last[0] = -(1 << 31), -1  # merged: from 1.0 up, below 2**(e_lo - 127)
    else:
      first, last = q << shift, ((q + 1) << shift) - 1
      first[0], last[-1] = 0, (1 << 31) - 1
    below = np.searchsorted(t, first, side="right")
    inside = np.searchsorted(t, last, side="right") - below
    if inside[0] or inside[-1]:
      raise AssertionError("a threshold in a merged bucket")
    most = max(most, int(inside.max()))
    w = np.where(inside > 0, t[np.minimum(below, t.size - 1)] - first, 1 << shift)
    entries = (below << 23) | (w - 1)
    sides.append(entries[::-1] if negative else entries)
  return np.concatenate(sides).astype(np.uint32), most


@functools.cache
def maps(bits: int) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray], tuple]:
  """(signed map, its table), (unsigned map, its table), (e_lo, mbits, e_lo, mbits) for `bits`.

  e_lo: two binades below the map's smallest magnitude; mbits: the fewest that leave at most
  one threshold a bucket.
  """
  out, params = [], []
  for signed in (True, False):
    qmap = np.asarray(_qmap.quantization_map(signed, bits), np.float32)
    smallest = float(np.abs(qmap[qmap != 0]).min())
    e_lo = int(np.floor(np.log2(smallest))) + 127 - 1
    for mbits in range(1, 12):
      table, most = bucket_table(qmap, e_lo, mbits)
      if most <= 1:
        break
    else:
      raise AssertionError(f"no bucket table for the {bits}-bit map")
    out.append((qmap, table))
    params += [e_lo, mbits]
  return out[0], out[1], tuple(params)


def out_struct(g, p, mode: _native.Mode, writer: Writer) -> jax.ShapeDtypeStruct:
  """The kernel's first result for a leaf: the new parameter, or the update (the gradient's
  dtype for ``Mode.STEP``; float32 for the remainder writer, as ``_remainder.update``)."""
  in_place = mode in (_native.Mode.FUSED, _native.Mode.FUSED_STEP)
  if writer == Writer.REMAINDER and not in_place:
    return jax.ShapeDtypeStruct(p.shape, F32)
  like = g if mode == _native.Mode.STEP else p
  assert like is not None  # the parameter is read where it is written
  return jax.ShapeDtypeStruct(like.shape, like.dtype)


def call(
  scalars: jax.Array,
  leaves: Sequence[tuple],
  *,
  mode: _native.Mode,
  decay: _native.Decay,
  amsgrad: bool,
  writer: Writer,
  cdtype,
) -> list[tuple]:
  """One kernel call over `leaves`, each ``(g, m, v, vm, p, buffer, key)``.

  A moment is an array or a :class:`~adamw_jax.QuantizedMoment`; `p` is None
  where the mode and writer do not read it; `buffer` (Kahan's compensation, the remainders)
  and `key` (stochastic rounding's, raw uint32[2]) are None where the writer
  has none (the remainder writer's int16 remainders are its `buffer`). Returns ``(out, m, v, vm, buffer)`` per leaf, `out` in the
  parameter's dtype (the gradient's for ``Mode.STEP``). The state, and the
  parameter in the fused modes, are updated in place where XLA can reuse
  their buffers.
  """
  bits = next(
    (
      8 if type(x) is _quantize.QuantizedMoment else 4
      for leaf in leaves
      for x in leaf[1:4]
      if _quantized(x)
    ),
    0,
  )
  operands: list[Any] = [scalars]
  qparams: tuple = (0, 0, 0, 0)
  if bits:
    signed, unsigned, qparams = maps(bits)
    operands += [jnp.asarray(a) for a in (*signed, *unsigned)]
  results: list[jax.ShapeDtypeStruct] = []
  aliases: dict[int, int] = {}
  flags = []
  in_place = mode in (_native.Mode.FUSED, _native.Mode.FUSED_STEP)

  def updated(x) -> None:
    operands.append(x)
    results.append(jax.ShapeDtypeStruct(x.shape, x.dtype))
    aliases[len(operands) - 1] = len(results) - 1

  for g, m, v, vm, p, buffer, key in leaves:
    operands.append(g)
    if p is not None:
      operands.append(p)
      if in_place:
        aliases[len(operands) - 1] = len(results)
    results.append(out_struct(g, p, mode, writer))
    for x in (m, v) + ((vm,) if amsgrad else ()):
      for part in (x.codes, x.scale) if _quantized(x) else (x,):
        updated(part)
    if buffer is not None:
      updated(buffer)
    if key is not None:
      operands.append(key)
    flags.append(
      (p is not None) * _HAS_PARAM
      + _quantized(m) * _QUANTIZED
      + (buffer is not None) * _HAS_BUFFER
      + (key is not None) * _HAS_KEY
    )
  flat = iter(
    jax.ffi.ffi_call(
      _native.LOWMEM_TARGET, results, input_output_aliases=aliases, vmap_method="sequential"
    )(
      *operands,
      mode=int(mode),
      decay=int(decay),
      amsgrad=bool(amsgrad),
      writer=int(writer),
      compute=_COMPUTE[jnp.dtype(cdtype)],
      small=_steer.SMALL,
      bits=bits,
      qparams=np.asarray(qparams, np.int64),
      flags=np.asarray(flags, np.int64),
    )
  )

  def moment(like):
    if like is None:
      return None
    return type(like)(next(flat), next(flat)) if _quantized(like) else next(flat)

  back = []
  for _, m, v, vm, _, buffer, _ in leaves:
    out = next(flat)
    m, v = moment(m), moment(v)
    vm = moment(vm) if amsgrad else None
    back.append((out, m, v, vm, None if buffer is None else next(flat)))
  return back


def group(
  c: _kernel.Coefficients,
  decay,
  leaves: list[tuple],
  pure: Callable[[tuple, tuple, jax.Array], tuple],
  cdtype,
  *,
  z: jax.Array,
  mode: _native.Mode,
  kind: _native.Decay,
  amsgrad: bool,
  writer: Writer,
  maximize: bool,
) -> list[tuple]:
  """Leaves ``(g, m, v, vm, p, buffer, key)`` through one native call (in a CPU program).

  `pure(leaf, (c, decay), z)` is the pure step of a leaf, ``(out, m, v, vm,
  buffer)``, from the scalars and opaque zero it is given: what a GPU or TPU
  program computes, and the derivative. `buffer` is the leaf's in
  the state (Kahan's compensation, the remainders; passed through by the other writers) and
  `key` its PRNG key (stochastic rounding; else None). `c` and `decay` are the
  step's scalars (``_scalars.coefficients``), rounded here to `cdtype` as the
  pure kernel rounds them. The same results bit for bit as `pure`
  (``tests/test_native.py``).
  """
  fields = _native.scalar_fields(c, decay, maximize)
  scalars = jnp.stack([jnp.asarray(x).astype(cdtype).astype(F32) for x in fields])
  reads_p = writer != Writer.NEAREST or mode != _native.Mode.STEP

  def native(scalars, z, leaves, coefficients):
    del z, coefficients
    own = [
      (
        g,
        m,
        v,
        vm if amsgrad else None,
        p if reads_p else None,
        buffer if writer in _BUFFERED else None,
        key if writer == Writer.STOCHASTIC else None,
      )
      for g, m, v, vm, p, buffer, key in leaves
    ]
    outs = call(scalars, own, mode=mode, decay=kind, amsgrad=amsgrad, writer=writer, cdtype=cdtype)
    return [
      (out, m, v, vm, buffer if writer in _BUFFERED else leaf[5])
      for (out, m, v, vm, buffer), leaf in zip(outs, leaves)
    ]

  def default(scalars, z, leaves, coefficients):
    del scalars
    return [pure(leaf, coefficients, z) for leaf in leaves]

  like = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype)
  shapes = [
    (
      out_struct(g, p, mode, writer),
      *jax.tree.map(like, (m, v, vm if amsgrad else None, buffer)),
    )
    for g, m, v, vm, p, buffer, _ in leaves
  ]
  return _steer.per_platform(
    native, default, scalars, z, leaves, (c, decay), out=shapes, default_is_exact=True
  )
