"""Low-precision parameter writes: stochastic rounding to bfloat16 and Kahan-compensated sums.

A bfloat16 parameter written by round-to-nearest loses every update smaller
than half its ulp (2**-9 relative), so a small learning rate stops moving it.
Two cures, both given the new parameter computed in float32:

- `stochastic_round_bf16` rounds up or down with probabilities that make
  the written value unbiased (torchao's ``_fp32_to_bf16_sr``: the low 16 bits of
  the float32 word against 16 random bits).
- `kahan_write` keeps the part of the update the bfloat16 parameter could
  not hold in a compensation buffer of the parameter's dtype and adds it back
  at the next step (torch-optimi's ``kahan_sum=True``, operation for operation).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend.random import threefry2x32_p

from adamw_jax import _tree

LOW_PRECISION = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
"""The parameter dtypes Kahan compensation applies to (torch-optimi's)."""


def is_low_precision(dtype) -> bool:
  return jnp.dtype(dtype) in LOW_PRECISION


class TileKey(NamedTuple):
  """A leaf's key for a 2-D tile of it (a kernel's, ``_accel_random``): the tile's element
  ``(r, c)`` is the leaf's flat element ``first + r * row_stride + c``, and draws its bits."""

  key: Any  # the leaf's raw uint32[2] key
  first: Any  # int32 scalars (the flat index modulo 2**32; leaves of fewer than 2**32 elements)
  row_stride: Any


def random_bits(
  key: jax.Array | TileKey, shape: tuple[int, ...], sharding: Any = None
) -> jax.Array:
  """``jax.random.bits(key, shape, uint32)``, typed with `sharding` (on a mesh with Explicit axes;
  typed replicated, each device would draw the whole leaf's bits); for a `TileKey`, the leaf's
  bits at the tile's elements: threefry of each element's flat index, as ``jax.random.bits``
  draws them."""
  if not isinstance(key, TileKey):
    return jax.random.bits(key, shape, jnp.uint32, out_sharding=sharding)
  rows = lax.broadcasted_iota(jnp.int32, shape, 0)
  columns = lax.broadcasted_iota(jnp.int32, shape, 1)
  index = key.first + rows * key.row_stride + columns  # int32 wraps as uint32 does
  lo = lax.bitcast_convert_type(index, jnp.uint32)
  k = key.key
  bits1, bits2 = threefry2x32_p.bind(k[0], k[1], jnp.zeros_like(lo), lo)
  return bits1 ^ bits2


def stochastic_round_bf16(x: jax.Array, key: jax.Array | TileKey) -> jax.Array:
  """float32 `x` to bfloat16, rounded away from zero with probability (low 16 bits) / 2**16.

  ``E[result] = x`` for every finite `x` whose rounding up stays finite;
  infinities and NaNs are converted as by ``astype``. `key`: a raw uint32[2] PRNG key (or
  a `TileKey`: `x` a tile of the leaf).
  """
  x = x.astype(jnp.float32)
  bits = lax.bitcast_convert_type(x, jnp.uint32)
  noise = random_bits(key, x.shape, _tree.explicit_sharding(x)) >> 16
  truncated = bits & jnp.uint32(0xFFFF0000)
  up = noise < (bits & jnp.uint32(0xFFFF))
  rounded = jnp.where(up, truncated + jnp.uint32(0x10000), truncated)
  out = lax.bitcast_convert_type(rounded, jnp.float32).astype(jnp.bfloat16)
  return jnp.where(jnp.isfinite(x), out, x.astype(jnp.bfloat16))


def kahan_write(param: jax.Array, compensation: jax.Array, update: jax.Array):
  """``param + update`` with Kahan compensation: ``(new_param, new_compensation)``.

  torch-optimi's steps, each rounded to the parameter's dtype:

  ```text
  c <- c + u;  p' <- p + c;  c <- c + (p - p')
  ```

  `update` (float32) is the whole change torch's step makes to the parameter,
  weight decay included.
  """
  dtype = param.dtype
  wide = lambda x: x.astype(jnp.float32)
  c = (wide(compensation) + update.astype(jnp.float32)).astype(dtype)
  new = (wide(param) + wide(c)).astype(dtype)
  lost = (wide(param) - wide(new)).astype(dtype)
  return new, (wide(c) + wide(lost)).astype(dtype)
