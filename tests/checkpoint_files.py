"""The files of a checkpoint, and how the tests damage them (shared by the checkpoint tests).

A checkpoint (format 3) is orbax's ``StandardCheckpointHandler`` item: the
arrays in an OCDBT database (``manifest.ocdbt``, ``ocdbt.process_<i>/`` with
its ``d/`` data files, one database per saving process, and ``d/`` for the
merged b-tree), ``_METADATA`` (the tree, with our description as its custom
metadata), ``_sharding``, ``array_metadatas/``, and the step's
``_CHECKPOINT_METADATA``.
"""

from __future__ import annotations

import json
import pathlib
import zlib

import jax
import numpy as np


def data_files(path: pathlib.Path) -> list[pathlib.Path]:
  """The files of the arrays' OCDBT databases (tensorstore's chunks and b-tree nodes)."""
  return sorted(p for p in path.rglob("*") if p.is_file() and p.parent.name == "d")


def all_files(path: pathlib.Path) -> list[pathlib.Path]:
  return sorted(p for p in path.rglob("*") if p.is_file())


def truncate(file: pathlib.Path) -> None:
  data = file.read_bytes()
  file.write_bytes(data[: len(data) // 2])


def flip(file: pathlib.Path, at: float = 0.5) -> None:
  """Flips one bit of the byte at fraction `at` of the file."""
  data = bytearray(file.read_bytes())
  data[min(int(len(data) * at), len(data) - 1)] ^= 0x10
  file.write_bytes(bytes(data))


def description(path: pathlib.Path) -> dict:
  return json.loads((path / "_METADATA").read_text())["custom_metadata"]


def rewrite(path: pathlib.Path, meta: dict, *, crc: bool = True) -> None:
  """Writes `meta` as the description, with its CRC recomputed (as a writer would)."""
  meta = {k: v for k, v in meta.items() if k != "checksum"}
  if crc:
    meta["checksum"] = zlib.crc32(json.dumps(meta, sort_keys=True).encode())
  whole = json.loads((path / "_METADATA").read_text())
  (path / "_METADATA").write_text(json.dumps({**whole, "custom_metadata": meta}))


def bitwise_equal(a, b) -> bool:
  """Same structure, dtypes and bits (typed PRNG keys compared by their data)."""
  if jax.tree.structure(a) != jax.tree.structure(b):
    return False
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      x, y = jax.random.key_data(x), jax.random.key_data(y)
    if x.dtype != y.dtype or x.shape != y.shape:
      return False
    if np.asarray(x).tobytes() != np.asarray(y).tobytes():
      return False
  return True


def rewrite_legacy(path: pathlib.Path, meta: dict) -> None:
  """Writes `meta` as a format 2 checkpoint's description (its ``adamw_jax`` item), CRC recomputed."""
  meta = {k: v for k, v in meta.items() if k != "checksum"}
  meta["checksum"] = zlib.crc32(json.dumps(meta, sort_keys=True).encode())
  (path / "adamw_jax" / "metadata").write_text(json.dumps(meta))
