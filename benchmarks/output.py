"""Where a benchmark writes: the committed results for a full run, a folder of its own for --quick."""

from __future__ import annotations

import pathlib
import tempfile

RESULTS = pathlib.Path(__file__).parent / "results"  # the full runs' results, committed


def out_dir(out: pathlib.Path | None, quick: bool, name: str) -> pathlib.Path:
  """`out` if given; else ``benchmarks/results/`` for a full run, a new temporary folder for a quick one.

  A ``--quick`` run (a smoke run: tiny sizes, numbers that mean nothing) never
  overwrites the committed results of a full run; it says where it wrote.
  """
  if out is None:
    out = pathlib.Path(tempfile.mkdtemp(prefix=f"adamw_jax-{name}-quick-")) if quick else RESULTS
  out.mkdir(parents=True, exist_ok=True)
  return out
