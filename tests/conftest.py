"""The suite's order: the longest files first.

The README's test command runs a file per worker at a time (``-n auto --dist
loadfile``), handing files out in the order they are collected. Alphabetical
order left the longest (the 8-device sharded checks) to start last, alone on
one core while the other idled; starting the longest first packs the files on
the cores the CI machine has. The order changes no result.
"""

from __future__ import annotations

import pytest

# Roughly longest first (seconds on CI's 2 cores; a file not listed runs after these).
LONGEST = (
  "test_sharding.py",
  "test_notebooks.py",
  "test_native_lowmem.py",
  "test_multiprocess.py",
  "test_checkpoint_faults.py",
  "test_fidelity.py",
  "test_docs.py",
  "test_lowmem.py",
  "test_platforms.py",
  "test_native.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
  rank = {name: i for i, name in enumerate(LONGEST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(LONGEST)))  # stable: file order kept
