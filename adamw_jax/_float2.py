"""Double-word ("float-float") scalar arithmetic for torch's Python-double math.

torch computes AdamW's per-step scalars (``1 - beta**step``, ``lr / bc1``,
``sqrt(bc2)``, ``1 - lr * wd``) in Python doubles and only then rounds them to
the parameter dtype. Inside a jitted JAX step the step count is traced and, by
default, float64 is unavailable, so these scalars are evaluated here as
unevaluated sums ``hi + lo`` of two numbers of the working dtype (about 48
significant bits for float32, 106 for float64) and rounded once at the end.

Every product is formed from operands split by bit masking into halves whose
products are exact, so the results do not depend on whether the compiler
contracts multiply-adds. These helpers are only used on scalars (or on small
batches of them under ``vmap``): their cost is a few dozen scalar operations
per step. See the "How close to PyTorch?" section of the README.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

_UINT = {2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint64}


class F2(NamedTuple):
  """The value ``hi + lo`` with ``|lo| <= ulp(hi) / 2``."""

  hi: jax.Array
  lo: jax.Array


def hide(x: jax.Array, opaque_zero: jax.Array) -> jax.Array:
  """`x` with its value hidden from the compiler (bits OR a runtime zero).

  XLA's algebraic simplifier reassociates sums with literal constants, e.g.
  ``(a + 1) - 1 -> a``, which silently breaks error-free transformations; a
  constant the compiler cannot see is left alone.
  """
  x = jnp.asarray(x)
  utype = _UINT[x.dtype.itemsize]
  return lax.bitcast_convert_type(
      lax.bitcast_convert_type(x, utype) | opaque_zero.astype(utype), x.dtype)


def constant(x: float, dtype, opaque_zero: jax.Array) -> F2:
  """A Python float (a double) as a double-word constant of `dtype`, hidden from the compiler."""
  hi = np.asarray(x, dtype)
  lo = np.asarray(x - float(hi), dtype)
  return F2(hide(hi, opaque_zero), hide(lo, opaque_zero))


def from_array(x: jax.Array) -> F2:
  """A value already in the working dtype (for example a traced lr)."""
  return F2(x, jnp.zeros_like(x))


def round_(x: F2) -> jax.Array:
  """The working-dtype number nearest to ``hi + lo``."""
  return x.hi + x.lo


def _two_sum(a, b):
  s = a + b
  bb = s - a
  return s, (a - (s - bb)) + (b - bb)


def _fast_two_sum(a, b):
  s = a + b
  return s, b - (s - a)


def _split(a):
  """`a` as hi + lo where hi, lo each have at most half the significand bits."""
  dtype = a.dtype
  nbits = jnp.finfo(dtype).nmant + 1  # 24 for float32, 53 for float64
  width = jnp.finfo(dtype).bits
  drop = nbits - nbits // 2
  mask = ((1 << width) - 1) ^ ((1 << drop) - 1)
  utype = _UINT[jnp.dtype(dtype).itemsize]
  bits = lax.bitcast_convert_type(a, utype)
  hi = lax.bitcast_convert_type(bits & jnp.asarray(mask, utype), dtype)
  return hi, a - hi


def _two_prod(a, b):
  """``a * b`` as p + e to about twice the working precision.

  The four partial products of the halves are exact, so neither the order of
  the sums nor any multiply-add contraction by the compiler changes the result.
  """
  ah, al = _split(a)
  bh, bl = _split(b)
  s, e1 = _two_sum(ah * bh, ah * bl)
  s, e2 = _two_sum(s, al * bh)
  return _fast_two_sum(s, (e1 + e2) + al * bl)


def add(x: F2, y: F2) -> F2:
  s, e = _two_sum(x.hi, y.hi)
  t, f = _two_sum(x.lo, y.lo)
  e = e + t
  s, e = _fast_two_sum(s, e)
  e = e + f
  return F2(*_fast_two_sum(s, e))


def neg(x: F2) -> F2:
  return F2(-x.hi, -x.lo)


def sub(x: F2, y: F2) -> F2:
  return add(x, neg(y))


def mul(x: F2, y: F2) -> F2:
  p, e = _two_prod(x.hi, y.hi)
  e = e + (x.hi * y.lo + x.lo * y.hi)
  return F2(*_fast_two_sum(p, e))


def _newton_steps(dtype) -> int:
  return 5 if jnp.dtype(dtype) == jnp.float64 else 4


def _reciprocal(y: jax.Array) -> jax.Array:
  """About ``1 / y`` (to the working precision) for y > 0, from multiplies and adds only.

  XLA keeps each division or square root in a kernel of its own; these scalars
  should cost one kernel per step, so the double-word code avoids both. The
  initial guess comes from the exponent bits; each Newton step squares the error.
  """
  dtype = y.dtype
  utype = _UINT[jnp.dtype(dtype).itemsize]
  magic = 0x7EF311C3 if dtype == jnp.float32 else 0x7FDE623822FC16E6
  r = lax.bitcast_convert_type(jnp.asarray(magic, utype) - lax.bitcast_convert_type(y, utype), dtype)
  for _ in range(_newton_steps(dtype)):
    r = r * (2 - y * r)
  return r


def _rsqrt(x: jax.Array) -> jax.Array:
  """About ``1 / sqrt(x)`` for x > 0, from multiplies and adds only (see _reciprocal)."""
  dtype = x.dtype
  utype = _UINT[jnp.dtype(dtype).itemsize]
  magic = 0x5F3759DF if dtype == jnp.float32 else 0x5FE6EB50C7B537A9
  r = lax.bitcast_convert_type(
      jnp.asarray(magic, utype) - (lax.bitcast_convert_type(x, utype) >> 1), dtype)
  for _ in range(_newton_steps(dtype)):
    r = r * (1.5 - 0.5 * x * r * r)
  return r


def div(x: F2, y: F2) -> F2:
  """``x / y`` for y > 0: a reciprocal estimate and three residual corrections."""
  r = _reciprocal(y.hi)
  q1 = x.hi * r
  e = sub(x, mul(F2(q1, jnp.zeros_like(q1)), y))
  q2 = e.hi * r
  e = sub(e, mul(F2(q2, jnp.zeros_like(q2)), y))
  q3 = e.hi * r
  return add(F2(*_fast_two_sum(q1, q2)), F2(q3, jnp.zeros_like(q3)))


def reciprocal(x: jax.Array, opaque_zero: jax.Array) -> jax.Array:
  """The working-dtype number nearest to ``1 / x`` for x > 0 (correctly rounded).

  Rounding a double-word quotient can land on the wrong side of a near-tie
  (1 / (1 - 2**-24) is one); the neighbours are compared by exact residuals.
  """
  q = round_(div(constant(1.0, x.dtype, opaque_zero), from_array(x)))
  best, best_err = q, None
  for cand in (jnp.nextafter(q, jnp.zeros_like(q)), q, jnp.nextafter(q, jnp.full_like(q, jnp.inf))):
    p, e = _two_prod(cand, x)
    err = jnp.abs((hide(jnp.ones_like(p), opaque_zero) - p) - e)
    if best_err is None:
      best, best_err = cand, err
    else:
      better = err < best_err
      best, best_err = jnp.where(better, cand, best), jnp.where(better, err, best_err)
  return best


def sqrt(x: F2) -> F2:
  """Square root of a positive value: Newton from an rsqrt estimate, corrected in double words."""
  r = _rsqrt(x.hi)
  s = x.hi * r
  residual = sub(x, mul(F2(s, jnp.zeros_like(s)), F2(s, jnp.zeros_like(s))))
  s, e = _fast_two_sum(s, residual.hi * (0.5 * r))
  residual = sub(x, mul(F2(s, e), F2(s, e)))
  return F2(*_fast_two_sum(s, e + residual.hi * (0.5 * r)))


_LN2 = 0.6931471805599453094172321214581766
_TAYLOR_TERMS = 15  # |r| <= ln(2)/2: the next term is below 1e-19


def _exact_int(t: jax.Array, dtype) -> F2:
  """A non-negative int32 as hi + lo, both exact in `dtype` (float32 holds 24 bits)."""
  t = jnp.asarray(t, jnp.int32)
  hi = (t >> 12) << 12
  return F2(hi.astype(dtype), (t - hi).astype(dtype))


def _exp2_int(k: jax.Array, dtype) -> jax.Array:
  """``2**k`` for an integer-valued `k` in the normal range, built exactly from bits."""
  info = jnp.finfo(dtype)
  utype = _UINT[jnp.dtype(dtype).itemsize]
  biased = (k.astype(jnp.int32) + (info.maxexp - 1)).astype(utype)
  return lax.bitcast_convert_type(biased << info.nmant, dtype)


def one_minus_exp(x: F2, opaque_zero: jax.Array) -> F2:
  """``1 - exp(x)`` for ``x <= 88``, to ~1e-14 relative accuracy (``-expm1(x)``).

  Range reduction ``x = k ln2 + r``, ``|r| <= ln2 / 2``, and a Taylor series of
  ``expm1(r)`` in double-word arithmetic; ``2**k`` is built exactly from bits.
  """
  dtype = x.hi.dtype
  const = lambda v: constant(v, dtype, opaque_zero)  # noqa: E731
  # Beyond -60, 1 - e**x is 1 to well past double precision.
  big = x.hi < -60
  x = F2(jnp.where(big, jnp.asarray(-60, dtype), x.hi), jnp.where(big, jnp.zeros_like(x.lo), x.lo))
  k = jnp.round(x.hi * jnp.asarray(1 / _LN2, dtype))
  r = sub(x, mul(F2(k, jnp.zeros_like(k)), const(_LN2)))
  # expm1(r) = r * sum_i r**i / (i + 1)!
  poly = const(1.0 / math.factorial(_TAYLOR_TERMS + 1))
  for i in range(_TAYLOR_TERMS - 1, -1, -1):
    poly = add(mul(poly, r), const(1.0 / math.factorial(i + 1)))
  expm1_r = mul(poly, r)
  # 1 - 2**k (1 + expm1_r) = (1 - 2**k) - 2**k expm1_r.
  two_k = _exp2_int(k, dtype)
  scaled = F2(expm1_r.hi * two_k, expm1_r.lo * two_k)
  one = hide(jnp.ones_like(two_k), opaque_zero)
  return sub(F2(*_two_sum(one, -two_k)), scaled)


def log(b: F2, opaque_zero: jax.Array) -> F2:
  """``log(b)`` for ``0 < b`` (not too close to 0): one Newton step in double words.

  From ``y0 = log(b.hi)`` (working precision), ``y1 = y0 + b * exp(-y0) - 1``
  doubles the number of correct bits.
  """
  y0 = jnp.log(b.hi)
  em1 = neg(one_minus_exp(F2(-y0, jnp.zeros_like(y0)), opaque_zero))  # exp(-y0) - 1
  correction = add(sub(b, constant(1.0, b.hi.dtype, opaque_zero)), mul(b, em1))
  return add(F2(y0, jnp.zeros_like(y0)), correction)


def one_minus_exp_times(log_base: F2, exponent: jax.Array, opaque_zero: jax.Array) -> F2:
  """``1 - exp(exponent * log_base)``, i.e. ``1 - base**exponent``, for log_base <= 0."""
  t = _exact_int(exponent, log_base.hi.dtype)
  x = add(mul(F2(t.hi, jnp.zeros_like(t.hi)), log_base),
          mul(F2(t.lo, jnp.zeros_like(t.lo)), log_base))
  return one_minus_exp(x, opaque_zero)
