"""Everything that steers the XLA compiler, each trick written and justified once here.

torch's rounding is reproduced by telling XLA what not to do. Every trick
leaves values unchanged (it is an OR with zero bits, an exact division by
one, or a correctly rounded division); it only blocks a rewrite XLA would
otherwise make. Those specific to XLA:CPU (measured on this project's
machine, ``benchmarks/overhead.py``) are chosen by the platform the step is
lowered for, not by the host (`per_platform`, a primitive lowered per
platform), so a GPU/TPU program gets the plain operation:

- `opaque_zero`: an int32 zero the compiler cannot prove is zero (the
  step count shifted right by 31 bits), which the other tricks OR into bits;
- `hide` (all platforms): a constant the compiler cannot see, so XLA's
  algebraic simplifier cannot reassociate the error-free transformations of
  ``_float2`` (e.g. ``(a + 1) - 1 -> a``);
- `rounded` (all platforms): a product forced to be rounded before its
  next use, so XLA does not contract it into a fused multiply-add where torch
  rounds (XLA contracts ``a * b + c`` when ``a * b`` is the first operand);
- `divide_by_scalar` (CPU): XLA:CPU divides by a loop-invariant divisor
  by multiplying with its reciprocal, off by an ulp in about a third of cases;
- `computed_once` (CPU): XLA:CPU launches one kernel per scalar result
  (about a microsecond each) and inlines cheap scalar producers into every
  loop that broadcasts them;
- `materialized` (TPU): a value XLA:TPU must compute once, into memory, rather
  than recompute in a second kernel from what the first one wrote;
- `multi_output_fusion` (CPU): whether the opt-in
  ``XLA_FLAGS=--xla_backend_extra_options=xla_cpu_use_multi_output_fusion``
  is on, for the one-pass layout of ``_kernel._real_kernel``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.core import ShapedArray
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

from adamw_jax import _env, _tree

UINT = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint64}  # same-width bit patterns


def per_platform(
  cpu: Callable[..., Any],
  default: Callable[..., Any],
  *args: Any,
  out: Any,
  default_is_exact: bool = False,
  tpu: Callable[..., Any] | None = None,
  gpu: Callable[..., Any] | None = None,
) -> Any:
  """``cpu(*args)`` in a program lowered for XLA:CPU, ``default(*args)`` in any other.

  `tpu` and `gpu` (optional): the branches of programs lowered for a TPU and for
  an NVIDIA or AMD GPU (their own kernels, ``_accel``); `default` where not given.
  Inside such a kernel (`IN_KERNEL` held) every ``per_platform`` is `default` itself.

  The choice is made where the step is lowered, not where it is traced: one
  traced step compiles for CPU, GPU and TPU from any host, and only a CPU
  program gets the XLA:CPU tricks and the native kernel. `args` are pytrees
  (arrays are passed, anything else is closed over); both functions return a
  pytree shaped like `out` (of ``jax.ShapeDtypeStruct``: shapes and dtypes). On a mesh with
  Explicit axes the results are typed as `default` types them (sharding types included,
  `_typed`), whatever branch runs: a branch's own outputs need not carry them (a custom call's
  have none), and every platform's results are the XLA path's types. Typed without them, a
  jitted step's next call would compile again, and inside ``jax.set_mesh`` a result would be
  replicated: the step would all-gather it. Only the branch of
  the platform being lowered is traced, and only then. Under ``jax.vmap``
  each branch is vmapped. Derivatives are `default`'s, with the values of the
  platform's branch; where `default` computes the same values as `cpu` on a
  CPU too (`default_is_exact`), it alone is differentiated.
  """
  if IN_KERNEL.get():
    return default(*args)
  leaves, tree = jax.tree.flatten(args)
  is_array = [isinstance(x, jax.Array) for x in leaves]
  arrays = [x for x, a in zip(leaves, is_array) if a]
  out_leaves, out_tree = jax.tree.flatten(out)

  def flat(fn: Callable[..., Any]) -> Callable[..., list]:
    def run(*xs: Any) -> list:
      it = iter(xs)
      full = [next(it) if a else x for x, a in zip(leaves, is_array)]
      return jax.tree.leaves(fn(*jax.tree.unflatten(tree, full)))

    return run

  avals = _typed(out_leaves, arrays, flat(default))
  branches = {"cpu": flat(cpu), "default": flat(default)}
  branches |= {"tpu": None if tpu is None else flat(tpu), "gpu": None if gpu is None else flat(gpu)}
  results = _per_platform_p.bind(*arrays, **branches, out=avals, exact=default_is_exact)
  return jax.tree.unflatten(out_tree, results)


def _typed(out_leaves: list, arrays: list, default: Callable[..., list]) -> tuple:
  """The results' abstract values: `out_leaves`' shapes and dtypes, and on a mesh with Explicit
  axes the sharding types `default(*arrays)` gives them. Where the arguments of a result's shape
  are all laid out alike (FSDP), that layout, without tracing `default`."""
  if all(_tree.explicit_sharding(x) is None for x in arrays):
    return tuple(ShapedArray(o.shape, o.dtype) for o in out_leaves)
  shardings = []
  for o in out_leaves:
    alike = [_tree.explicit_sharding(x) for x in arrays if tuple(x.shape) == tuple(o.shape)]
    first = alike[0] if alike else None
    same = first is not None and all(
      s is not None and s.is_equivalent_to(first, len(o.shape)) for s in alike
    )
    shardings.append(first if same else None)
  if any(s is None for s in shardings):  # replicated parameters and a split state (ZeRO-1)
    shardings = [_tree.explicit_sharding(t) for t in jax.eval_shape(default, *arrays)]
  return tuple(
    ShapedArray(o.shape, o.dtype, sharding=s) for o, s in zip(out_leaves, shardings, strict=True)
  )


IN_KERNEL = _env.Flag("in_kernel")
"""Held while a kernel's body is traced (``_accel``): every :func:`per_platform` is its `default`."""


def _lower(which: str):
  def rule(ctx, *args, **params):
    branch = params[which] if params.get(which) is not None else params["default"]
    return mlir.lower_fun(branch, multiple_results=True)(ctx, *args)

  return rule


def _jvp(primals, tangents, *, cpu, default, out, exact, tpu, gpu):
  tangents = [ad.instantiate_zeros(t) for t in tangents]
  primals_out, tangents_out = jax.jvp(default, tuple(primals), tuple(tangents))
  if not exact:
    branches = {"cpu": cpu, "default": default, "tpu": tpu, "gpu": gpu}
    primals_out = _per_platform_p.bind(*primals, **branches, out=out, exact=exact)
  return primals_out, tangents_out


def _batch(args, dims, *, cpu, default, out, exact, tpu, gpu):
  """Each branch vmapped; an accelerator's own kernel gives way to `default` (``vmap`` of XLA)."""
  del tpu, gpu
  size = next(x.shape[d] for x, d in zip(args, dims) if d is not None)
  in_axes = tuple(dims)  # None: not mapped
  default = jax.vmap(default, in_axes=in_axes)
  out = _typed([ShapedArray((size, *o.shape), o.dtype) for o in out], list(args), default)
  params = {
    "cpu": jax.vmap(cpu, in_axes=in_axes),
    "default": default,
    "tpu": None,
    "gpu": None,
    "out": out,
    "exact": exact,
  }
  return _per_platform_p.bind(*args, **params), [0] * len(out)


_per_platform_p = Primitive("adamw_jax_per_platform")
_per_platform_p.multiple_results = True
_per_platform_p.def_abstract_eval(lambda *_, out, **__: list(out))
_per_platform_p.def_impl(
  lambda *args, **params: jax.jit(functools.partial(_per_platform_p.bind, **params))(*args)
)
mlir.register_lowering(_per_platform_p, _lower("default"))
mlir.register_lowering(_per_platform_p, _lower("cpu"), platform="cpu")
mlir.register_lowering(_per_platform_p, _lower("tpu"), platform="tpu")
for _gpu in ("cuda", "rocm"):
  mlir.register_lowering(_per_platform_p, _lower("gpu"), platform=_gpu)
ad.primitive_jvps[_per_platform_p] = _jvp
batching.primitive_batchers[_per_platform_p] = _batch


def opaque_zero(count: jax.Array) -> jax.Array:
  """0 for a non-negative int32 step count, but not provably so to the compiler."""
  return lax.shift_right_logical(count, jnp.int32(31))


def hide(x: jax.typing.ArrayLike, z: jax.Array) -> jax.Array:
  """`x` with its value hidden from the compiler (its bits OR the opaque zero `z`)."""
  x = jnp.asarray(x)
  utype = UINT[x.dtype.itemsize]
  return lax.bitcast_convert_type(lax.bitcast_convert_type(x, utype) | z.astype(utype), x.dtype)


@jax.custom_jvp
def rounded(x: jax.Array, z: jax.Array) -> jax.Array:
  """`x`, forced to be rounded to its dtype before any later use.

  Hiding the value hides the multiplication that produced `x` from the
  compiler, which could otherwise fuse it into a later addition.
  """
  return hide(x, z)


@rounded.defjvp
def _rounded_jvp(primals, tangents):
  x, z = primals
  return rounded(x, z), tangents[0]


SMALL = 1 << 15  # elements: below, a true division; above, a residual correction (measured)


def divide_by_scalar(a: jax.Array, b: jax.Array, z: jax.Array) -> jax.Array:
  """Correctly rounded ``a / b`` for a scalar `b`, as torch's ``tensor / scalar``.

  On XLA:CPU two ways back to the true quotient, equal bit for bit, each
  faster where it is used (``benchmarks/overhead.py``):

  - small arrays: OR-ing zero bits of `a` into `b` makes the divisor vary per
    element in the compiler's eyes, so a true division is emitted. It adds
    few operations, so XLA's cost model still counts the loop as memory-bound
    and does not split it across threads, which costs more than it saves
    below about 30,000 elements;
  - large arrays: the product with the reciprocal and one residual step
    (Markstein), cheaper per element than a vector division.
  """
  out = jax.ShapeDtypeStruct(a.shape, a.dtype)
  return per_platform(_divide_on_cpu, lambda a, b, z: a / b, a, b, z, out=out)


def _divide_on_cpu(a: jax.Array, b: jax.Array, z: jax.Array) -> jax.Array:
  utype = UINT[a.dtype.itemsize]
  if a.size < SMALL:
    zero_bits = lax.bitcast_convert_type(a, utype) & z.astype(utype)
    return a / lax.bitcast_convert_type(lax.bitcast_convert_type(b, utype) | zero_bits, a.dtype)
  inv_b = rounded(1 / b, z)
  # Capped so that inf / b stays inf (the residual of an infinite q0 is NaN);
  # NaN passes through. No finite sqrt(v) reaches the cap.
  q0 = jnp.minimum(a * inv_b, rounded(jnp.asarray(jnp.finfo(a.dtype).max, a.dtype), z))
  residual = a - q0 * b  # exact, as one FMA
  return residual * inv_b + q0


def computed_once(a: jax.Array, b: jax.Array | None, z: jax.Array):
  """Two per-step scalars, computed once in one kernel, outside the elementwise loops.

  On XLA:CPU the pair travels as one complex number (one kernel launch, not
  two). XLA does not inline an "expensive" producer into a broadcasting
  consumer, so the value ends with an exact division by a 1 the compiler
  cannot see; otherwise the double-word arithmetic would be repeated in every
  loop that broadcasts the scalar.
  """
  out = (
    jax.ShapeDtypeStruct(a.shape, a.dtype),
    None if b is None else jax.ShapeDtypeStruct(b.shape, b.dtype),
  )
  return per_platform(_packed_on_cpu, lambda a, b, z: (a, b), a, b, z, out=out)


def _packed_on_cpu(a: jax.Array, b: jax.Array | None, z: jax.Array):
  one = hide(jnp.ones([], a.dtype), z)
  if b is None:
    return a / one, None
  packed = lax.complex(a, b.astype(a.dtype))
  packed = packed / one.astype(packed.dtype)
  return jnp.real(packed), jnp.imag(packed).astype(b.dtype)


def materialized(x: jax.Array) -> jax.Array:
  """`x`; in a program lowered for a TPU, behind an optimization barrier (computed once, into memory).

  XLA:TPU splits a long elementwise step into two kernels where it sees fit, and the
  second may recompute everything from the first one's outputs (the remainder
  step's new parameter from the new moments: 12 bytes per parameter read again).
  A barrier makes `x` a value of its own, which the first kernel writes and the
  second reads. Elsewhere nothing changes.
  """
  out = jax.ShapeDtypeStruct(x.shape, x.dtype)
  identity = lambda x: x
  return per_platform(
    identity, identity, x, out=out, default_is_exact=True, tpu=lax.optimization_barrier
  )


def multi_output_fusion() -> bool:
  """Whether XLA's CPU multi-output fusion was switched on with ``XLA_FLAGS`` (for CPU programs only).

  Read when the update is traced; XLA reads its flags when the backend
  starts, so the flag must be set before jax is imported.
  """
  return _env.xla_cpu_multi_output_fusion()
