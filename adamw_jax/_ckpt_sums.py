"""Checksums of a checkpoint's arrays that every process computes alike, however they are sharded.

A leaf's checksum is two sums, modulo 2**32, of its bits read as 32-bit words,
each word multiplied by an odd weight drawn from its position (a hash of its
flat index, one hash per sum). Under ``jax.jit`` such a sum over a sharded
array is each device's partial sum over the shard it holds, added across the
devices and processes: every byte is read where it lives, every replicated
byte counted once, and the result is the same integer in any process count
and any sharding, so that the sums saved by 2 processes are checked by 1 or 4
restoring into other shardings. A changed word changes each sum by its
difference times an odd weight, which is never 0 modulo 2**32: one changed
word (a flipped byte anywhere) is always caught; several, unless both sums
happen to cancel (about 1 in 2**64 for random damage).

Format 2 checkpoints carry a CRC-32 per fully addressable leaf instead
(:func:`crc32`), still checked on restore.
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

_SEEDS = (0x9E3779B9, 0x7F4A7C15)  # one per sum: two independent position hashes


def _fmix32(h: jax.Array) -> jax.Array:
  """MurmurHash3's 32-bit finalizer: every input bit flips each output bit with probability 1/2."""
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * jnp.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def _words(x: jax.Array) -> jax.Array:
  """The bits of `x` as uint32 words (narrower elements zero-extended, wider ones split)."""
  if jnp.issubdtype(x.dtype, jnp.complexfloating):
    x = jnp.stack([jnp.real(x), jnp.imag(x)], axis=-1)
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  bits = jnp.dtype(x.dtype).itemsize * 8
  if jnp.issubdtype(x.dtype, jnp.integer) and jnp.iinfo(x.dtype).bits < bits:
    bits = jnp.iinfo(x.dtype).bits  # int4 / uint4: itemsize 1, 4 bits
  unsigned = {4: jnp.uint4, 8: jnp.uint8, 16: jnp.uint16, 32: jnp.uint32, 64: jnp.uint32}
  if bits not in unsigned:
    raise TypeError(f"no checksum for dtype {x.dtype} ({bits} bits)")
  return lax.bitcast_convert_type(x, unsigned[bits]).astype(jnp.uint32)


def _sums(x: jax.Array) -> jax.Array:
  """The two position-keyed sums of one array, as uint32[2]."""
  words = _words(x)
  index = jnp.zeros(words.shape, jnp.uint32)
  for axis, size in enumerate(words.shape):  # the flat (C-order) index, modulo 2**32
    index = index * jnp.uint32(size) + lax.broadcasted_iota(jnp.uint32, words.shape, axis)
  return jnp.stack(
    [jnp.sum(words * (_fmix32(index ^ jnp.uint32(s)) | 1), dtype=jnp.uint32) for s in _SEEDS]
  )


@functools.lru_cache(maxsize=64)
def _summer(devices: tuple[Any, ...]) -> Callable[[list[jax.Array]], list[jax.Array]]:
  """The sums of a list of arrays on `devices`, compiled, replicated to all of them."""
  replicated = NamedSharding(Mesh(np.array(devices), ("all",)), P())
  return jax.jit(lambda xs: [_sums(x) for x in xs], out_shardings=replicated)


def _devices(x) -> tuple[Any, ...]:
  sharding = getattr(x, "sharding", None)
  if sharding is None:  # a NumPy array: where jnp.asarray puts it, in this process
    return (jax.local_devices()[0],)
  return tuple(sorted(sharding.device_set, key=lambda d: d.id))


def sums(leaves: Sequence[Any]) -> list[str]:
  """Each array's checksum as 16 hex digits; every process gets the same ones.

  Called by every process with the same leaves (collectives run across
  processes); leaves on the same devices share one compiled computation.
  """
  groups: dict[tuple[Any, ...], list[int]] = {}
  for i, x in enumerate(leaves):
    groups.setdefault(_devices(x), []).append(i)
  out = [""] * len(leaves)
  for devices, members in groups.items():
    arrays = [
      jax.device_put(leaves[i], devices[0]) if len(devices) == 1 else leaves[i] for i in members
    ]
    results = _summer(devices)(arrays)
    for i, result in zip(members, results):
      pair = np.asarray(result.addressable_shards[0].data)
      out[i] = f"{int(pair[0]):08x}{int(pair[1]):08x}"
  return out


def crc32(x) -> int | None:
  """CRC-32 of an array's bytes in C order (format 2); None where this process does not hold all of it."""
  if not getattr(x, "is_fully_addressable", True):
    return None
  data = np.ascontiguousarray(np.asarray(x)).reshape(-1).view(np.uint8)
  # numpy's stubs give ndarray the buffer protocol (__buffer__) only for Python >= 3.12.
  return zlib.crc32(data)  # pyright: ignore[reportArgumentType]
