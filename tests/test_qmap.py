"""Codes by arithmetic (``adamw_jax/_qmap.py``) against torchao 0.18.0's binary search of its map.

Every code and every value bit for bit: each map entry's value from the formula;
each float32 within 512 ulps of an entry or of a midpoint between two entries
(where the decision is delicate), a sweep of every 4099th float32 bit pattern,
random values in the map's range and the special values. All 2**32 bit patterns:
``python -m tests.test_qmap`` (about four minutes a map on two cores).
"""

from __future__ import annotations

import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torchao.optim import quant_utils

from adamw_jax import _qmap

MAPS = [(True, 8), (False, 8), (True, 4), (False, 4)]
ids = [f"{'signed' if s else 'unsigned'}-{b}bit" for s, b in MAPS]


def _search(x: np.ndarray, signed: bool, bits: int) -> np.ndarray:
  """torchao's codes: its binary search of its map (``quantize_{8,4}bit_with_qmap``)."""
  qmap = torch.tensor(_qmap.quantization_map(signed, bits))
  search = quant_utils.quantize_8bit_with_qmap if bits == 8 else quant_utils.quantize_4bit_with_qmap
  return search(torch.from_numpy(x), qmap).numpy()


@jax.jit(static_argnames=("signed", "bits"))
def _codes(x, signed: bool, bits: int):
  return _qmap.codes(x, signed, bits)


def _mismatches(x: np.ndarray, signed: bool, bits: int) -> np.ndarray:
  return np.nonzero(np.asarray(_codes(x, signed, bits)) != _search(x, signed, bits))[0]


@pytest.mark.parametrize("signed, bits", MAPS, ids=ids)
def test_each_codes_value_is_the_maps(signed, bits):
  qmap = _qmap.quantization_map(signed, bits)
  ours = np.asarray(_qmap.values(jnp.arange(2**bits, dtype=jnp.uint8), signed, bits))
  np.testing.assert_array_equal(ours.view(np.uint32), qmap.view(np.uint32))


@pytest.mark.parametrize("signed, bits", MAPS, ids=ids)
def test_codes_near_every_entry_and_midpoint_are_the_searchs(signed, bits):
  qmap = _qmap.quantization_map(signed, bits).astype(np.float64)
  middle = (qmap[1:] + qmap[:-1]) / 2
  # The midpoints rounded to float32 both ways, and every entry, of either sign.
  points = np.concatenate([qmap, np.nextafter(middle, -2), np.nextafter(middle, 2)])
  points = np.concatenate([points, -points]).astype(np.float32)
  patterns = points.view(np.int32)[:, None] + np.arange(-512, 513, dtype=np.int32)
  x = np.unique(patterns.view(np.float32))
  bad = _mismatches(x, signed, bits)
  assert bad.size == 0, (x[bad][:8], np.asarray(_codes(x[bad][:8], signed, bits)))


@pytest.mark.parametrize("signed, bits", MAPS, ids=ids)
def test_codes_over_a_sweep_of_all_floats_and_the_special_values_are_the_searchs(signed, bits):
  rng = np.random.default_rng(0)
  special = [np.nan, -np.nan, np.inf, -np.inf, 0.0, -0.0, 1.0, -1.0, 2.0, -2.0, 1e-40, -1e-40]
  x = np.concatenate(
    [
      np.arange(0, 2**32, 4099, dtype=np.uint64).astype(np.uint32).view(np.float32),
      rng.uniform(-1, 1, 2**20).astype(np.float32),
      (rng.uniform(-1, 1, 2**20) * 10.0 ** rng.uniform(-8, 0, 2**20)).astype(np.float32),
      np.array(special, np.float32),
      np.array([0x7FC00001, 0xFFC00001, 0x7F800001], np.uint32).view(np.float32),  # other NaNs
    ]
  )
  bad = _mismatches(x, signed, bits)
  assert bad.size == 0, (x[bad][:8], np.asarray(_codes(x[bad][:8], signed, bits)))


def test_the_bounds_are_torchs_linspace_at_every_size_the_maps_use():
  for n in (1, 2, 4, 8, 16, 32, 64, 128):
    theirs = torch.linspace(0.1, 1, n + 1).numpy()
    ours = np.asarray(_qmap._bound(jnp.arange(0, 257, 256 // n, dtype=jnp.int32)))
    np.testing.assert_array_equal(ours.view(np.uint32), theirs.view(np.uint32))


def all_floats(signed: bool, bits: int, chunk: int = 2**24) -> int:
  """Mismatches with the search over every float32 bit pattern."""
  bad = 0
  for start in range(0, 2**32, chunk):
    x = np.arange(start, start + chunk, dtype=np.uint64).astype(np.uint32).view(np.float32)
    bad += _mismatches(x, signed, bits).size
  return bad


if __name__ == "__main__":
  for signed, bits in MAPS:
    start = time.perf_counter()
    n = all_floats(signed, bits)
    print(
      f"{'signed' if signed else 'unsigned'} {bits}-bit: {n} mismatches in 2**32 float32s "
      f"({time.perf_counter() - start:.0f} s)"
    )
    if n:
      sys.exit(1)
