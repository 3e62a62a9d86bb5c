"""torchao's 8-bit and 4-bit quantization maps, and codes found by arithmetic: no table, no search.

**The maps** (torchao's ``create_dynamic_map``, bitsandbytes' dynamic map; ``subclass_8bit``,
``subclass_4bit``). A dynamic map of ``D`` decades (8-bit: 7; 4-bit signed: 3) holds
``0``, ``1.0`` and positive entries ``P(i, k)``; decade ``i = 0 .. D-1`` holds
``n_i = 2**(i + u)`` of them (``u = 0`` signed, ``1`` unsigned):

```text
P(i, k) = fl(s_i * fl(B[k * w_i] + B[(k + 1) * w_i]) / 2),   k = 0 .. n_i - 1,
s_i = float32(10.0 ** (i - D + 1)),   w_i = 256 / n_i,
```

``fl`` a float32 rounding. ``B[0 .. 256]`` is ``torch.linspace(0.1, 1, 257)`` in float32
(torch steps from both ends, each value rounded once), exactly:

```text
B[j] = float32(I_j) * 2**-31,   I_j = 214748368 + 7549747 * j          (j < 128)
                                 I_j = 2**31 - 7549747 * (256 - j)       (j >= 128)
```

(``0.1f = 214748368 * 2**-31``; ``fl(1 - 0.1f) / 256 = 7549747 * 2**-31``; ``I_j`` is an
unsigned 32-bit integer, its conversion to float32 rounds to nearest even.) Every
``linspace(0.1, 1, n + 1)`` the maps use (``n`` a power of two) is ``B[0 :: 256 / n]``.
Codes, in ascending order of value, with ``M`` positive entries below 1 (``2**u * (2**D - 1)``):

- signed (``M`` = 127 or 7): ``0 .. M-1`` are ``-P`` from the largest to the smallest,
  ``M`` is 0, ``M+1 .. 2M`` the ``P`` from the smallest, ``2M+1`` is 1.0;
- unsigned 8-bit (``M`` = 254): ``0`` is 0, ``1 .. M`` the ``P``, ``M+1`` is 1.0;
- unsigned 4-bit: linear, code ``c`` is ``(c + 1) / 16`` (no zero).

**The decision** is torchao's (``quantize_8bit_with_qmap``): with ``c`` the largest code whose
value is ``<= x`` (0 if none) and ``up = min(c + 1, last)``, the code is ``up`` if
``fl(x - map[c]) >= fl((map[up] - map[c]) * 0.5)``, else ``c``; NaN gives 0.

**How a code is found** (`codes`), for a float32 ``x`` (a dynamic map):

1. ``a = |x|``; the decade ``d`` = (number of decades whose first entry ``P(i, 0)`` is
   ``<= a``) - 1: ``D`` comparisons with constants; ``d = -1`` below the first entry.
2. A guess of the entry just below ``a`` in its decade, from the map's linear spacing:
   ``k = floor(a * n_d / (0.9 * s_d) - n_d / 9 - 0.5)``, clamped to ``[0, n_d - 1]`` (any
   rounding: it is a guess). It is that entry's index except within a tiny distance of
   an entry (about ``n_d * 2**-22`` of a spacing), where it may be one off.
3. Its two neighbours, computed by the formula above (no table): ``lo = P(d, k)``,
   ``hi = P(d, k + 1)``, or the next decade's first entry (1.0 after the last decade)
   when ``k = n_d - 1``; below the first entry, ``lo = 0`` and ``hi = P(0, 0)``.
4. The decision, ``h = fl((hi - lo) * 0.5)``, ``j`` the rank of ``lo`` among the
   positive entries (0 for ``lo = 0``): for ``x >= 0`` the code of ``lo`` plus
   ``[fl(a - lo) >= h]``; for ``x < 0`` the neighbours are ``-hi`` and ``-lo``: signed,
   ``max(M - j - 1 + [fl(x + hi) >= h], 0)``; unsigned, 0. NaN: 0.

Where the guess of step 2 is one off, ``a`` lies a tiny fraction of a spacing from an entry,
so far from the midpoint that either pair of neighbours decides that entry's code: the codes
are the search's for every float32 (``tests/test_qmap.py`` compares them with the search's
over every float32 in [-1, 1] near an entry or a midpoint and a dense sweep of the rest, and,
with ``ADAMW_JAX_TEST_ALL_FLOATS=1``, over all 2**32 bit patterns). A twin in another
language may take ``lo`` and ``hi`` from a table of the map instead of the formula: the
decision of step 4 is the same, so are the codes. The linear 4-bit map needs no guess:
``k = floor(16 x) - 1`` is exact.

A code's value (`values`) is the same formula. Every operation is exact or one
float32 rounding; the rounded products (``s_i * mean``) are hidden from the compiler before
they are subtracted, so that no fused multiply-add rounds them differently on any platform.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

_LOW, _STEP = 214748368, 7549747  # B[j] = I_j * 2**-31 (module docstring)
_SCALE = np.float32(2.0**-31)


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


class _Dynamic(NamedTuple):
  """A dynamic map's shape (module docstring) and its per-decade constants."""

  signed: bool
  decades: int  # D
  u: int  # decade i holds 2**(i + u) entries
  scales: tuple[np.float32, ...]  # s_i
  firsts: tuple[np.float32, ...]  # P(i, 0), then 1.0

  @property
  def positives(self) -> int:  # M, the positive entries below 1
    return 2**self.u * (2**self.decades - 1)

  @property
  def zero(self) -> int:  # the code of 0
    return self.positives if self.signed else 0


def _bound_np(j: np.ndarray) -> np.ndarray:
  j = j.astype(np.int64)
  low, high = _LOW + _STEP * j, 2**31 - _STEP * (256 - j)
  return np.where(j < 128, low, high).astype(np.uint32).astype(np.float32) * _SCALE


def _dynamic(signed: bool, decades: int) -> _Dynamic:
  u = 0 if signed else 1
  scales = tuple(np.float32(10.0 ** (i - decades + 1)) for i in range(decades))
  firsts = []
  for i, s in enumerate(scales):
    w = 256 // 2 ** (i + u)
    firsts.append(np.float32(s * ((_bound_np(np.array(0)) + _bound_np(np.array(w))) / 2)))
  return _Dynamic(signed, decades, u, scales, (*firsts, np.float32(1.0)))


def _bound(j: jax.Array) -> jax.Array:
  """``B[j]`` (module docstring) for ``0 <= j <= 256``, exactly (any larger `j`: some value).

  The two ends' integers differ by 48: ``2**31 - 7549747 (256 - j) = 214748416 + 7549747 j``.
  """
  j = j.astype(jnp.uint32)
  i = _LOW + _STEP * j + jnp.where(j >= 128, jnp.uint32(48), jnp.uint32(0))
  return i.astype(jnp.float32) * _SCALE


def opaque_zero() -> jax.Array:
  """A uint32 zero the compiler cannot see through (an optimization barrier)."""
  return lax.optimization_barrier(jnp.zeros((), jnp.uint32))


def _opaque(x: jax.Array, zero: jax.Array) -> jax.Array:
  """`x`, its value hidden from the compiler (OR with a `zero` it cannot see): rounded where it stands.

  A product passed through here cannot be contracted with a later subtraction into a fused
  multiply-add, which would round once where torchao rounds twice.
  """
  return lax.bitcast_convert_type(lax.bitcast_convert_type(x, jnp.uint32) | zero, jnp.float32)


def _pick(reached: list[jax.Array], table, dtype) -> jax.Array:
  """``table[i]`` for the last ``i`` with ``reached[i]`` (``table[0]`` if none), by selects."""
  out = jnp.asarray(table[0], dtype)
  for i in range(1, len(table)):
    out = jnp.where(reached[i], jnp.asarray(table[i], dtype), out)
  return out


def _dynamic_codes(x: jax.Array, m: _Dynamic, zero: jax.Array) -> jax.Array:
  a = jnp.abs(x)
  reached = [a >= f for f in m.firsts[: m.decades]]  # decade i's first entry reached
  d = _pick(reached, range(m.decades), jnp.int32)  # the decade (0 below the first)
  s = _pick(reached, m.scales, jnp.float32)
  n = jnp.left_shift(1, d + m.u)  # entries in the decade
  # The guess (any rounding): k = floor(a * n / (0.9 s) - n / 9 - 0.5), clamped.
  inv = [np.float32(2 ** (i + m.u) / (0.9 * f)) for i, f in enumerate(m.scales)]
  guess = a * _pick(reached, inv, jnp.float32) - (
    n.astype(jnp.float32) * jnp.float32(1 / 9) + jnp.float32(0.5)
  )
  guess = jnp.clip(guess, 0.0, float(2 ** (m.decades - 1 + m.u)))
  k = jnp.minimum(jnp.floor(guess).astype(jnp.int32), n - 1)
  shift = 8 - d - m.u
  bounds = [_bound((k + i) << shift) for i in range(3)]
  lo = _opaque(s * ((bounds[0] + bounds[1]) * jnp.float32(0.5)), zero)
  hi = _opaque(s * ((bounds[1] + bounds[2]) * jnp.float32(0.5)), zero)
  following = _pick(reached, m.firsts[1:], jnp.float32)  # the next decade's first entry, or 1.0
  hi = jnp.where(k == n - 1, following, hi)
  below = jnp.logical_not(reached[0])
  lo = jnp.where(below, jnp.float32(0.0), lo)
  hi = jnp.where(below, jnp.float32(m.firsts[0]), hi)
  j = jnp.where(below, 0, n - 2**m.u + 1 + k)  # the rank of lo
  half = (hi - lo) * jnp.float32(0.5)
  positive = m.zero + j + (a - lo >= half).astype(jnp.int32)
  if not m.signed:
    return jnp.where(x >= 0, positive, 0)
  negative = jnp.maximum(m.zero - j - 1 + (x + hi >= half).astype(jnp.int32), 0)
  return jnp.where(x >= 0, positive, jnp.where(x < 0, negative, 0))


def _linear_codes(x: jax.Array) -> jax.Array:
  """The unsigned 4-bit map ``(c + 1) / 16``: the entry below is exact, no guess."""
  k = jnp.clip(jnp.floor(jnp.clip(x, 0.0, 2.0) * 16).astype(jnp.int32) - 1, 0, 14)
  lo = (k + 1).astype(jnp.float32) * jnp.float32(1 / 16)
  return jnp.where(x >= jnp.float32(1 / 16), k + (x - lo >= jnp.float32(1 / 32)), 0)


_MAPS = {
  (True, 8): _dynamic(True, 7),
  (False, 8): _dynamic(False, 7),
  (True, 4): _dynamic(True, 3),
}


def codes(x: jax.Array, signed: bool, bits: int = 8, zero: jax.Array | None = None) -> jax.Array:
  """The uint8 code of each float32 of `x` in torchao's map (module docstring): the search's, exactly.

  `zero`: a uint32 zero the compiler cannot see (default :func:`opaque_zero`).
  """
  x = jnp.asarray(x, jnp.float32)
  if (signed, bits) not in _MAPS:
    return _linear_codes(x).astype(jnp.uint8)
  zero = opaque_zero() if zero is None else zero
  out = _dynamic_codes(x, _MAPS[signed, bits], zero)
  return out.astype(jnp.uint8)


def values(c: jax.Array, signed: bool, bits: int = 8) -> jax.Array:
  """The float32 value of each code of `c` (any integer dtype) in torchao's map, ``map[c]``."""
  c = jnp.asarray(c).astype(jnp.int32)
  if (signed, bits) not in _MAPS:
    return (c + 1).astype(jnp.float32) * jnp.float32(1 / 16)
  m = _MAPS[signed, bits]
  j = jnp.abs(c - m.zero)  # rank among the positive entries; 0 for 0, M + 1 for 1.0
  t = jnp.clip(j, 1, m.positives) - 1 + 2**m.u  # 2**(d + u) + k
  top = (lax.bitcast_convert_type(t.astype(jnp.float32), jnp.int32) >> 23) - 127  # floor(log2 t)
  k = t - jnp.left_shift(1, top)
  s = _pick([top - m.u >= i for i in range(m.decades)], m.scales, jnp.float32)
  value = s * ((_bound(k << (8 - top)) + _bound((k + 1) << (8 - top))) * jnp.float32(0.5))
  value = jnp.where(j == 0, jnp.float32(0.0), jnp.where(j > m.positives, jnp.float32(1.0), value))
  return jnp.where(c < m.zero, -value, value)
