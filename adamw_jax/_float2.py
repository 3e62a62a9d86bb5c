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
per step. See [Fidelity](fidelity.md) ("How close to PyTorch?").
"""

from __future__ import annotations

import decimal
import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from adamw_jax import _steer


class F2(NamedTuple):
  """The value ``hi + lo`` with ``|lo| <= ulp(hi) / 2``."""

  hi: jax.Array
  lo: jax.Array


def constant(x: float, dtype, opaque_zero: jax.Array) -> F2:
  """A Python float (a double) as a double-word constant of `dtype`, hidden from the compiler."""
  hi = np.asarray(x, dtype)
  lo = np.asarray(x - float(hi), dtype)
  return F2(_steer.hide(hi, opaque_zero), _steer.hide(lo, opaque_zero))


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
  utype = _steer.UINT[jnp.dtype(dtype).itemsize]
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


def _rsqrt(x: jax.Array) -> jax.Array:
  """About ``1 / sqrt(x)`` for x > 0, from multiplies and adds only.

  A square root whose input is shared with other scalar code makes XLA split
  the scalars into more kernels (measured); a division of one value does not.
  The initial guess comes from the exponent bits; each Newton step squares the
  error.
  """
  dtype = x.dtype
  utype = _steer.UINT[jnp.dtype(dtype).itemsize]
  magic = 0x5F3759DF if dtype == jnp.float32 else 0x5FE6EB50C7B537A9
  r = lax.bitcast_convert_type(
    jnp.asarray(magic, utype) - (lax.bitcast_convert_type(x, utype) >> 1), dtype
  )
  for _ in range(_newton_steps(dtype)):
    r = r * (1.5 - 0.5 * x * r * r)
  return r


def div(x: F2, y: F2) -> F2:
  """``x / y`` for y > 0: a working-precision reciprocal and two residual corrections."""
  r = 1 / y.hi
  q1 = x.hi * r
  e = sub(x, mul(F2(q1, jnp.zeros_like(q1)), y))
  q2 = e.hi * r
  e = sub(e, mul(F2(q2, jnp.zeros_like(q2)), y))
  q3 = e.hi * r
  return add(F2(*_fast_two_sum(q1, q2)), F2(q3, jnp.zeros_like(q3)))


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
  utype = _steer.UINT[jnp.dtype(dtype).itemsize]
  biased = (k.astype(jnp.int32) + (info.maxexp - 1)).astype(utype)
  return lax.bitcast_convert_type(biased << info.nmant, dtype)


def one_minus_exp(x: F2, opaque_zero: jax.Array) -> F2:
  """``1 - exp(x)`` for ``x <= 88``, to ~1e-14 relative accuracy (``-expm1(x)``).

  Range reduction ``x = k ln2 + r``, ``|r| <= ln2 / 2``, and a Taylor series of
  ``expm1(r)`` in double-word arithmetic; ``2**k`` is built exactly from bits.
  """
  dtype = x.hi.dtype
  const = lambda v: constant(v, dtype, opaque_zero)
  # Beyond -60, 1 - e**x is 1 to well past double precision.
  big = x.hi < -60
  x = F2(jnp.where(big, jnp.asarray(-60, dtype), x.hi), jnp.where(big, jnp.zeros_like(x.lo), x.lo))
  k = jnp.round(x.hi * jnp.asarray(1 / _LN2, dtype))
  r = sub(x, mul(F2(k, jnp.zeros_like(k)), const(_LN2)))
  # expm1(r) = r * sum_i r**i / (i + 1)!
  out = (jax.ShapeDtypeStruct(r.hi.shape, dtype),) * 2
  series = _steer.per_platform(_unrolled, _rolled, r, opaque_zero, out=out, tpu=_scalar_unrolled)
  expm1_r = mul(F2(*series), r)
  # 1 - 2**k (1 + expm1_r) = (1 - 2**k) - 2**k expm1_r.
  two_k = _exp2_int(k, dtype)
  scaled = F2(expm1_r.hi * two_k, expm1_r.lo * two_k)
  one = _steer.hide(jnp.ones_like(two_k), opaque_zero)
  return sub(F2(*_two_sum(one, -two_k)), scaled)


def _taylor_coefficients(dtype, opaque_zero: jax.Array) -> F2:
  """``1 / (i + 1)!`` for i = 0 .. _TAYLOR_TERMS as double words (index i), hidden."""
  exact = np.array([1.0 / math.factorial(i + 1) for i in range(_TAYLOR_TERMS + 1)])
  hi = exact.astype(dtype)
  lo = (exact - hi.astype(np.float64)).astype(dtype)
  return F2(_steer.hide(hi, opaque_zero), _steer.hide(lo, opaque_zero))


def _horner_step(poly: F2, r: F2, c: F2) -> F2:
  return add(mul(poly, r), c)


def _horner(r: F2, coefficient: Callable[[int], F2]) -> F2:
  """``sum_i coefficient(i) r**i`` over i = 0 .. _TAYLOR_TERMS by Horner's rule, unrolled."""
  poly = coefficient(_TAYLOR_TERMS)
  for i in range(_TAYLOR_TERMS - 1, -1, -1):
    poly = _horner_step(poly, r, coefficient(i))
  return poly


def _unrolled(r: F2, opaque_zero: jax.Array) -> F2:
  """``sum_i r**i / (i + 1)!`` by Horner's rule, unrolled (XLA:CPU: no loop to run)."""
  c = _taylor_coefficients(r.hi.dtype, opaque_zero)
  return _horner(r, lambda i: F2(c.hi[i], c.lo[i]))


def _scalar_unrolled(r: F2, opaque_zero: jax.Array) -> F2:
  """The same steps with each coefficient a scalar of its own (TPU).

  XLA:TPU runs scalar arithmetic on its scalar unit, out of device memory; a vector of
  coefficients (as `_unrolled` hides them), or a loop's carry (`_rolled`), is computed
  by a vector kernel into device memory instead, and any such value makes the program
  keep a temporary buffer of about 30 KiB per kernel of the step (issue 25).
  """
  return _horner(r, lambda i: constant(1.0 / math.factorial(i + 1), r.hi.dtype, opaque_zero))


def _rolled(r: F2, opaque_zero: jax.Array) -> F2:
  """The same steps in a loop: XLA:GPU's fusion passes take minutes over the unrolled series.

  (``optax.inject_hyperparams(adamw)`` has four such series, for traced betas: its
  H100 compile took 90-115 s unrolled.)
  """
  c = _taylor_coefficients(r.hi.dtype, opaque_zero)

  def body(j, poly):
    i = _TAYLOR_TERMS - 1 - j
    return _horner_step(poly, r, F2(c.hi[i], c.lo[i]))

  last = F2(*(jnp.broadcast_to(x[_TAYLOR_TERMS], r.hi.shape) for x in c))
  return lax.fori_loop(0, _TAYLOR_TERMS, body, last)


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
  x = add(
    mul(F2(t.hi, jnp.zeros_like(t.hi)), log_base), mul(F2(t.lo, jnp.zeros_like(t.lo)), log_base)
  )
  return one_minus_exp(x, opaque_zero)


_CHUNK_BITS = 8  # the step count is read 8 bits at a time: tables of 256 rows
_NEGLIGIBLE = decimal.Decimal(2) ** -60  # 1 - x rounds to 1 in double for x below 2**-54


@functools.lru_cache(maxsize=64)
def _power_table(beta: float, dtype_name: str) -> np.ndarray:
  """``table[i, j] = (B.hi, B.lo, (1 - B).hi, (1 - B).lo)`` for ``B = beta**(j << 8 i)``.

  Computed in 60-digit decimal arithmetic from the exact double `beta`, each
  value then split into a pair of `dtype` numbers. Chunks i from the first
  whose smallest power ``beta**(1 << 8 i)`` is below 2**-60 on are left out:
  for such counts ``1 - beta**t`` is 1, in double precision as here.
  """
  dtype = np.dtype(dtype_name)
  ctx = decimal.Context(prec=60)
  beta_exact = decimal.Decimal(beta)

  def pair(v: decimal.Decimal) -> list:
    hi = dtype.type(float(v))
    return [hi, dtype.type(float(ctx.subtract(v, decimal.Decimal(float(hi)))))]

  chunks = []
  for i in range(32 // _CHUNK_BITS):
    base = ctx.power(beta_exact, 1 << (_CHUNK_BITS * i))
    if i > 0 and base < _NEGLIGIBLE:
      break
    rows, power = [], decimal.Decimal(1)
    for _ in range(1 << _CHUNK_BITS):
      rows.append(pair(power) + pair(ctx.subtract(1, power)))
      power = ctx.multiply(power, base)
    chunks.append(rows)
  return np.asarray(chunks, dtype)


def one_minus_power(beta: float, t: jax.Array, dtype, opaque_zero: jax.Array) -> F2:
  """``1 - beta**t`` for a Python float ``0 < beta < 1`` and an int32 count ``t >= 0``.

  ``beta**t`` is the product of tabulated powers, one per 8-bit chunk of `t`
  (one row read per chunk, no series). The complement is accumulated as
  ``1 - P B = (1 - P) + P (1 - B)``, a sum of non-negative terms, so it keeps
  its relative accuracy however close to 0 it is. Table entries are exact to
  the pair's precision and each chunk adds a few such errors: the worst
  measured over all counts below 10**5 and 3000 random ones up to 2**31 is
  2**-45.8 for float32 pairs and 2**-103.8 for float64 pairs, betas 0.01 to
  1 - 1e-9 (counts past the table give exactly 1, within 2**-60 of the true
  value; torch's double is 1 there too).

  Used for float64 pairs, where ``one_minus_exp_times`` is limited by the
  double-precision log of beta (about 1 in 1000 of its ``1 - beta**t`` then
  round to a different double than Python's; none did in 2 x 10**5 counts
  here). Float32 pairs keep the series: inside the step the table reads
  measured slower at 10k parameters.
  """
  table = _power_table(float(beta), jnp.dtype(dtype).name)
  t = jnp.asarray(t, jnp.int32)
  mask = (1 << _CHUNK_BITS) - 1
  rows = [jnp.asarray(chunk)[(t >> (_CHUNK_BITS * i)) & mask] for i, chunk in enumerate(table)]
  power, rest = F2(rows[0][0], rows[0][1]), F2(rows[0][2], rows[0][3])
  for i, row in enumerate(rows[1:], 1):
    rest = add(rest, mul(power, F2(row[2], row[3])))
    if i + 1 < len(rows):
      power = mul(power, F2(row[0], row[1]))
  if len(rows) * _CHUNK_BITS < 31:  # counts beyond the table: beta**t < 2**-60
    beyond = t >= (1 << (_CHUNK_BITS * len(rows)))
    rest = F2(
      jnp.where(beyond, _steer.hide(jnp.ones([], dtype), opaque_zero), rest.hi),
      jnp.where(beyond, jnp.zeros([], dtype), rest.lo),
    )
  return rest
