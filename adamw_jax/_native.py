"""The native CPU kernel (``_native.cc``): loading it, when it serves, and calling it.

The C++ kernel is the twin of `adamw_jax._kernel.adam_leaf`: the same
operations in the same order with the same roundings, in one pass over memory
for any number of leaves (one XLA custom call per group of leaves, so a tree
of 10,000 leaves adds one operation to the compiled step, not 10,000 loops).
``tests/test_native.py`` checks it bit for bit against the pure-JAX kernel on
every configuration of the fidelity table.

It serves a leaf when all of these hold, and the pure-JAX kernel does otherwise:

- the extension was built (``pip install`` compiles it; if that failed,
  importing adamw_jax warns once, naming the cause) and ``ADAMW_JAX_NATIVE``
  is not ``0`` (``_env``);
- the step is lowered for the CPU (``_steer.per_platform``: the same traced
  step lowered for a GPU or TPU gets the pure kernel) and JAX sees one device
  (sharded arrays would be gathered around a custom call);
- the gradient and parameter are float32, float64, complex64 or complex128
  and of one dtype (moments in another dtype, e.g. ``mu_dtype=jnp.bfloat16``,
  are converted around the call exactly as the pure kernel converts them);
  not for Adam's L2 term on complex leaves, which torch adds in complex
  arithmetic.

Under ``jax.grad``/``jax.jvp`` the derivative is the pure kernel's; under
``jax.vmap`` the call runs once per batch element.
"""

from __future__ import annotations

import ctypes
import enum
import importlib.util
import pathlib
import warnings
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from adamw_jax import _env, _kernel, _steer

TARGET = "adamw_jax_adam_step"
LOWMEM_TARGET = "adamw_jax_lowmem_step"  # the low-memory options' kernel (_native_lowmem)
_DTYPES = frozenset(map(jnp.dtype, (jnp.float32, jnp.float64, jnp.complex64, jnp.complex128)))


class Mode(enum.IntEnum):
  """What the kernel writes in place of the parameter's result (``_native.cc``)."""

  STEP = 0  # (s * m) / d, the parameter not read
  UPDATE = 1  # new parameter - parameter: the optax update
  FUSED = 2  # parameter + UPDATE, in place: update + optax.apply_updates
  FUSED_STEP = 3  # parameter + STEP, in place
  MOMENTS = 4  # the moments only (the parameter read for Adam's L2 term alone)


class Decay(enum.IntEnum):
  NONE = 0
  DECOUPLED = 1  # p * (1 - lr*wd)
  L2 = 2  # g + wd * p


def _load() -> str | None:
  """Registers the kernel with XLA. Returns None, or why it is not available."""
  spec = importlib.util.find_spec("adamw_jax._native_lib")
  if spec is None or spec.origin is None:
    error = pathlib.Path(__file__).with_name("_native_lib.error")
    if error.exists():
      return "its build failed: " + error.read_text().splitlines()[0]
    return "the extension adamw_jax._native_lib was not built"
  try:
    library = ctypes.CDLL(spec.origin)
    for target, symbol in (
      (TARGET, library.AdamwJaxAdamStep),
      (LOWMEM_TARGET, library.AdamwJaxLowmemStep),
    ):
      jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(symbol), platform="cpu")
  except (OSError, AttributeError, RuntimeError, ValueError) as e:
    return f"{spec.origin} could not be loaded: {e}"
  return None


UNAVAILABLE = _load()
if UNAVAILABLE is not None:
  warnings.warn(
    f"adamw_jax: the native CPU kernel is not available ({UNAVAILABLE}); "
    "the pure-JAX kernel is used.",
    RuntimeWarning,
    stacklevel=2,
  )


def enabled() -> bool:
  """Whether the native kernel may be used for the step being traced."""
  return UNAVAILABLE is None and _env.on(_env.NATIVE) and jax.device_count() == 1


def serves(grad: jax.Array, param: jax.Array | None, l2: bool) -> bool:
  """Whether the kernel computes this leaf (given `enabled`)."""
  dtype = jnp.dtype(grad.dtype)
  if dtype not in _DTYPES or (param is not None and jnp.dtype(param.dtype) != dtype):
    return False
  return not (l2 and jnp.issubdtype(dtype, jnp.complexfloating))


# Leaves from this size on get Mode.MOMENTS in an update (not in a fused step).
# A native update writes into a fresh buffer, which XLA's CPU runtime allocates
# for every step; above glibc's mmap threshold the OS maps and zero-fills it
# each time (a page fault per 4 KiB: 3x slower on a 16M-element leaf, measured
# with `perf stat -e page-faults`). With the moments native and the step in XLA,
# fused into optax.apply_updates, nothing the size of a leaf is allocated.
MOMENTS_FROM = 1 << 16


# Leaves per custom call. XLA's compile time grows faster than linearly with
# the operands of one aliased custom call: a 2,000-leaf step compiled in 212 s
# as one call, in 4.2 s / 4.9 s / 7.4 s with 16 / 64 / 256 leaves per call
# (this machine), against 3.9 s for the floor of any optax update
# (optax.apply_updates and one operation per moment; benchmarks/speed.py).
# Fewer calls run faster: the fused step on the 73-leaf transformer tree took
# 1.15x torch fused's time in 3 calls, 1.07x in one.
LEAVES_PER_CALL = 128


def mode(
  g: jax.Array,
  m: jax.Array,
  v: jax.Array,
  vm: jax.Array | None,
  *,
  fused: bool,
  with_params: bool,
) -> Mode:
  """The native mode for one leaf that the kernel `serves`."""
  if fused:
    return Mode.FUSED if with_params else Mode.FUSED_STEP
  if (
    g.size >= MOMENTS_FROM
    and not jnp.issubdtype(g.dtype, jnp.complexfloating)
    and all(x.dtype == g.dtype for x in (m, v) + (() if vm is None else (vm,)))
  ):
    return Mode.MOMENTS
  return Mode.UPDATE if with_params else Mode.STEP


def call(
  scalars: jax.Array, leaves: Sequence[tuple], *, mode: Mode, decay: Decay, amsgrad: bool
) -> list[tuple]:
  """One kernel call over `leaves`, each ``(g, m, v, vm, p)`` in one compute dtype.

  `scalars` holds, in the compute dtype's real type: 1 - b1, b2, 1 - b2,
  sqrt(1 - b2**t), eps, eps_root * (1 - b2**t) (or 0), the step size, the
  decay factor or L2 coefficient (or 0) and the gradient's sign. `vm` is None
  unless `amsgrad`; `p` is None where the mode does not read it. Returns
  ``(out, m, v, vm)`` per leaf, `out` being the parameter in the fused modes
  and None in ``Mode.MOMENTS``. The moments (and the parameter, when fused) are
  updated in place where XLA can reuse their buffers (donated or intermediate).
  """
  operands, results, aliases = [scalars], [], {}
  has_out = mode != Mode.MOMENTS
  for g, m, v, vm, p in leaves:
    in_place = [x for x in (m, v, vm) if x is not None]
    first = len(operands)
    operands += [g, *in_place] + ([] if p is None else [p])
    if has_out:
      out_like = p if mode in (Mode.FUSED, Mode.FUSED_STEP) else g
      assert out_like is not None  # the fused modes read the parameter
      if out_like is p:
        aliases[len(operands) - 1] = len(results)
      results.append(jax.ShapeDtypeStruct(out_like.shape, out_like.dtype))
    for k, _x in enumerate(in_place):
      aliases[first + 1 + k] = len(results) + k
    results += [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in in_place]
  flat = jax.ffi.ffi_call(TARGET, results, input_output_aliases=aliases, vmap_method="sequential")(
    *operands, mode=int(mode), decay=int(decay), amsgrad=bool(amsgrad)
  )
  per_leaf = has_out + 2 + amsgrad
  return [
    ((None,) if not has_out else ())
    + tuple(flat[i : i + per_leaf])
    + ((None,) if not amsgrad else ())
    for i in range(0, len(flat), per_leaf)
  ]


def scalar_fields(c: _kernel.Coefficients, decay: Any, maximize: bool) -> tuple:
  """The step's scalars in the order both native kernels read them (``_native_common.h``)."""
  return (
    c.one_minus_b1,
    c.b2,
    c.one_minus_b2,
    c.bc2_sqrt,
    c.eps,
    0.0 if c.eps_root is None else c.eps_root,
    c.step_size,
    0.0 if decay is None else decay,
    -1.0 if maximize else 1.0,
  )


def group(
  c: _kernel.Coefficients,
  decay,
  group: list[tuple],
  cdtype,
  *,
  z: jax.Array,
  mode: Mode,
  kind: Decay,
  amsgrad: bool,
  maximize: bool,
  decoupled: bool,
  with_params: bool,
  fused: bool,
) -> list[tuple]:
  """Leaves ``(g, m, v, vm, p)`` of compute dtype `cdtype` through one native call.

  `z` is the step's opaque zero, for the pure kernel of the derivatives.

  The same results bit for bit as `adamw_jax._kernel.optax_leaf` on each (``tests/test_native.py``);
  derivatives (``jax.jvp``, ``jax.grad``) are the pure kernel's.
  """
  real = jnp.finfo(cdtype).dtype
  fields = scalar_fields(c, decay, maximize)
  scalars = jnp.stack([jnp.asarray(x).astype(real) for x in fields])
  moments_only = mode == Mode.MOMENTS
  with_p = mode != Mode.STEP and (not moments_only or kind == Decay.L2)
  per_leaf = 3 + amsgrad + with_p

  def unflatten(flat):
    leaves = []
    for k in range(0, len(flat), per_leaf):
      g, m, v, *rest = flat[k : k + per_leaf]
      vm = rest.pop(0) if amsgrad else None
      leaves.append((g, m, v, vm, rest[0] if with_p else None))
    return leaves

  @jax.custom_jvp
  def run(scalars, z, *flat):
    del z
    leaves = unflatten(flat)
    as_c = lambda x: None if x is None else x.astype(cdtype)
    outs = call(
      scalars,
      [(g, as_c(m), as_c(v), as_c(vm), p) for g, m, v, vm, p in leaves],
      mode=mode,
      decay=kind,
      amsgrad=amsgrad,
    )
    back = []
    for (_, m, v, vm, _), (o, m_new, v_new, vm_new) in zip(leaves, outs):
      back += ([] if moments_only else [o]) + [m_new.astype(m.dtype), v_new.astype(v.dtype)]
      back += [] if vm is None else [vm_new.astype(vm.dtype)]
    return tuple(back)

  def pure(scalars, z, *flat):
    s = [scalars[k] for k in range(len(fields))]
    coeffs = _kernel.Coefficients(
      one_minus_b1=s[0],
      b2=s[1],
      one_minus_b2=s[2],
      bc2_sqrt=s[3],
      eps=s[4],
      eps_root=None if c.eps_root is None else s[5],
      step_size=s[6],
    )
    back = []
    for g, m, v, vm, p in unflatten(flat):
      o, m, v, vm = _kernel.optax_leaf(
        g,
        m,
        v,
        vm,
        p,
        coeffs,
        None if decay is None else s[7],
        z=z,
        maximize=maximize,
        decoupled=decoupled,
        with_params=with_params and with_p,
        fused=fused,
      )
      back += ([] if moments_only else [o]) + [m, v] + ([] if vm is None else [vm])
    return tuple(back)

  run.defjvp(lambda primals, tangents: jax.jvp(pure, primals, tangents))
  flat = [
    x
    for g, m, v, vm, p in group
    for x in (g, m, v) + ((vm,) if amsgrad else ()) + ((p,) if with_p else ())
  ]
  # The native call in a CPU program; the same leaves through the pure kernel in any other.
  shapes = jax.eval_shape(run, scalars, z, *flat)  # one custom call traced: cheap
  out = _steer.per_platform(run, pure, scalars, z, *flat, out=shapes, default_is_exact=True)
  step = (not moments_only) + 2 + amsgrad
  return [
    ((None,) if moments_only else ()) + tuple(out[k : k + step]) + (() if amsgrad else (None,))
    for k in range(0, len(out), step)
  ]
