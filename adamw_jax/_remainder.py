"""Exact float32 master weights as a bfloat16 parameter and a 16-bit remainder.

A float32 master weight ``m`` (its bits ``M``, a uint32) is held as

- the bfloat16 parameter ``b`` the model computes with: ``m`` rounded to
  nearest, **ties away from zero** (:func:`split`), and
- the remainder ``r``: the low 16 bits of ``M``, read as an int16.

Why ties away from zero: with ``hi = M >> 16`` and ``lo = M & 0xFFFF`` (on the
magnitude; the sign bit rides along), rounding up means ``b = hi + 1`` where
``lo >= 0x8000``, else ``b = hi``, so ``M = (b << 16) + (lo - 0x10000)`` or
``(b << 16) + lo``: the remainder ``lo - 0x10000`` lies in ``[-0x8000, -1]``
exactly when ``b`` was rounded up, and ``lo`` in ``[0, 0x7FFF]`` when not. Both
are ``lo`` modulo 2**16, so the remainder *is* the low 16 bits, and its sign
says which way ``b`` was rounded: :func:`combine` gives back ``M`` exactly as
``((b - (r < 0)) << 16) | (r & 0xFFFF)``. Every bfloat16 value has exactly
2**16 masters (``hi = b`` with ``lo < 0x8000``, ``hi = b - 1`` with ``lo >=
0x8000``). Round-to-nearest-*even* cannot do this in 16 bits: an even ``b``
would have 65,537 masters (``lo = 0x8000`` on both sides). So ``b`` differs
from ``m.astype(bfloat16)`` only for masters exactly halfway between two
bfloat16 values whose lower neighbour is even: there ``b`` is the odd one,
away from zero.

The carry of ``hi + 1`` runs into the exponent where it must: a master just
below a power of two rounds up to it, and the largest finite masters (from
``0x7F7F8000``) round up to bfloat16's infinity while the master stays finite.
Zeros and subnormals are split like any other bits. A NaN master (magnitude
above ``0x7F800000``) gets a NaN parameter: ``b = hi | 0x40`` (bfloat16's
quiet bit), ``r = lo``, and :func:`combine` of a NaN parameter is ``(b << 16)
| lo``: a quiet NaN comes back bit for bit, a signalling one quieted (as any
arithmetic would).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

_U32 = jnp.uint32
_SIGN32, _MAG32 = 0x80000000, 0x7FFFFFFF
_INF32 = 0x7F800000
_MAG16, _INF16, _QUIET16 = 0x7FFF, 0x7F80, 0x0040


def split(master: jax.Array) -> tuple[jax.Array, jax.Array]:
  """A float32 master as ``(bfloat16 parameter, int16 remainder)``: exactly, see the module."""
  bits = lax.bitcast_convert_type(master.astype(jnp.float32), _U32)
  magnitude = bits & _U32(_MAG32)
  hi, lo = magnitude >> 16, bits & _U32(0xFFFF)
  nan = magnitude > _U32(_INF32)
  up = (lo >= _U32(0x8000)).astype(_U32)
  # hi + up <= 0x7F80 (infinity) for every non-NaN magnitude: the sign bit is never reached.
  rounded = jnp.where(nan, hi | _U32(_QUIET16), hi + up)
  param = ((bits & _U32(_SIGN32)) >> 16) | rounded
  return _bf16(param), _int16(lo)


def _nan16(bits: jax.Array) -> jax.Array:
  return (bits & _U32(_MAG16)) > _U32(_INF16)


def combine(param: jax.Array, remainder: jax.Array) -> jax.Array:
  """The float32 master of a bfloat16 parameter and its int16 remainder (:func:`split`'s inverse).

  A pair :func:`split` cannot make, a zero parameter with a negative remainder
  (a magnitude rounded up is at least one), gives the zero: a borrow from the
  sign bit would make a NaN.
  """
  b = lax.bitcast_convert_type(param.astype(jnp.bfloat16), jnp.uint16).astype(_U32)
  r = lax.bitcast_convert_type(remainder.astype(jnp.int16), jnp.uint16).astype(_U32)
  down = (r >= _U32(0x8000)) & ~_nan16(b)  # b was rounded up from the master: hi = b - 1
  zero = (b & _U32(_MAG16)) == _U32(0)
  hi = jnp.where(down & ~zero, b - _U32(1), b)
  low = jnp.where(down & zero, _U32(0), r)
  return lax.bitcast_convert_type((hi << 16) | low, jnp.float32)


def update(param: jax.Array, new_param: jax.Array) -> jax.Array:
  """The float32 update that ``optax.apply_updates(param, update)`` turns into `new_param`.

  optax computes ``(param + update).astype(param.dtype)``: a bfloat16 `param`
  promoted to float32, one float32 addition, then a cast to bfloat16 that
  rounds to nearest even. The update is ``d = f32(new_param) - f32(param)``,
  one float32 subtraction. Whenever that subtraction is exact, ``param + d``
  is exactly ``new_param``, a float32 value (the addition does not round) and
  a bfloat16 one (the cast does not round): optax lands on it.

  When is it exact? (1) For any two bfloat16 values whose exponents differ by
  at most 15, or either zero: write them ``P * 2**i`` and ``N * 2**j``, integer
  significands below ``2**8``; the difference is an integer below ``2**(9 +
  |i - j|)`` times ``2**min(i, j)``, within float32's 24 bits (not below its
  normal range, which XLA:CPU flushes to zero, for parameters above
  ``2**-118``; no overflow below ``2**127``). (2) For the steps float32
  AdamW takes, in all cases but one: its new master is ``m' = m + u`` (``u =
  new - m`` rounded, optax's and our float32 arithmetic), so if the master
  shrinks by more than ``2**15`` (``m`` in ``[2**E, 2**(E+1))``, ``u`` near
  ``-m``), the addition is exact and ``m'`` is a multiple of the finer ulp of
  ``m`` and ``u``. If ``|u| < 2**E``, that is ``2**(E-24)``, but then ``m <
  2**E + |m'|``, the parameter is ``2**E`` and ``|d| < 2**E``: exact. Else
  ``m'``, and its bfloat16 parameter, are multiples of ``2**(E-23)``, and so
  is ``d``, of magnitude below ``2**(E+1)``: exact. The one case left: the
  parameter is ``2**(E+1)`` (``m`` just below it, rounded up) and ``m'``
  across zero, an odd multiple of ``2**(E-23)`` below ``2**(E-15)``: ``d``
  needs 25 bits (from ``2**(E-15)`` on, ``m'`` rounds to a multiple of ``2**(E-22)``). E.g. ``m = 1 - 2**-24`` (parameter 1.0) and ``u = -1``:
  ``m' = -2**-24``, but ``d`` rounds to -1 and optax writes 0. Such an
  ``m'`` has at most 8 significant bits, so its remainder is 0 and the master
  becomes the parameter optax writes: one float32 ulp of the old parameter
  off. ``fused_step`` writes the parameter itself, exact in every case.
  """
  return new_param.astype(jnp.float32) - param.astype(jnp.float32)


def _bf16(bits: jax.Array) -> jax.Array:
  return lax.bitcast_convert_type(bits.astype(jnp.uint16), jnp.bfloat16)


def _int16(bits: jax.Array) -> jax.Array:
  return lax.bitcast_convert_type(bits.astype(jnp.uint16), jnp.int16)
