"""The suite's order: the longest files first.

The README's test command runs a file per worker at a time (``-n auto --dist
loadfile``), handing files out in the order they are collected. Alphabetical
order left the longest (the 8-device sharded checks) to start last, alone on
one core while the other idled; starting the longest first packs the files on
the cores the CI machine has. The order changes no result.
"""

from __future__ import annotations

import pytest

# Longest first (the files' seconds on CI's 2 cores, measured; a file not listed runs after
# these, in collection order: the small ones last, so that the two workers finish together).
LONGEST = (
  "test_native_lowmem.py",
  "test_native.py",
  "test_sharding.py",
  "test_accel.py",
  "test_benchmarks.py",
  "test_notebooks.py",
  "test_remainder.py",
  "test_lowmem.py",
  "test_accel_random.py",
  "test_fidelity.py",
  "test_properties.py",
  "test_optax_ported.py",
  "test_docs.py",
  "test_masks.py",
  "test_demo.py",
  "test_fused_wrappers.py",
  "test_bad_inputs.py",
  "test_platforms.py",
  "test_checkpoint.py",
  "test_hyperparams.py",
  "test_flat.py",
  "test_checkpoint_faults.py",
  "test_dropin.py",
  "test_integration.py",
  "test_device.py",
  "test_one_pass.py",
  "test_multiprocess.py",
  "test_interop.py",
  "test_qmap.py",
  "test_types.py",
  "test_equivalence.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
  rank = {name: i for i, name in enumerate(LONGEST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(LONGEST)))  # stable: file order kept
