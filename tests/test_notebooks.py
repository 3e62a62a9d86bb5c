"""Executes every notebooks/*.ipynb top to bottom; an error in any cell fails its test.

One test per notebook, so a notebook added to notebooks/ is picked up without
editing this file. Each runs in a fresh python3 (ipykernel) kernel with
notebooks/ as working directory, as a reader would run it; without
SAVE_IMAGES the notebooks do not overwrite the figures the docs show
(``python notebooks/build.py --images`` regenerates those).
"""

from __future__ import annotations

import pathlib

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError
from nbformat import v4

NOTEBOOKS = sorted((pathlib.Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
CELL_TIMEOUT = 300  # seconds per cell: generous, the machine may be shared


def run_notebook(path: pathlib.Path) -> nbformat.NotebookNode:
  """The executed notebook; raises CellExecutionError at the first failing cell."""
  nb = nbformat.read(path, as_version=4)
  NotebookClient(
    nb,
    timeout=CELL_TIMEOUT,
    kernel_name="python3",
    resources={"metadata": {"path": str(path.parent)}},
  ).execute()
  return nb


def test_there_are_notebooks():
  assert {"01_quickstart.ipynb", "02_adam_vs_adamw.ipynb"} <= {p.name for p in NOTEBOOKS}


def test_notebooks_are_stored_without_outputs():
  for path in NOTEBOOKS:
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    stale = [
      i
      for i, c in enumerate(nb.cells)
      if c.cell_type == "code" and (c.get("outputs") or c.get("execution_count"))
    ]
    assert not stale, f"{path.name}: cells {stale} have stored outputs; clear them"


def test_a_failing_cell_fails(tmp_path):
  """The runner itself: an exception in a cell is an error, not an output."""
  path = tmp_path / "broken.ipynb"
  nbformat.write(
    v4.new_notebook(
      cells=[v4.new_code_cell("x = 1"), v4.new_code_cell("raise ValueError('boom')")]
    ),
    path,
  )
  with pytest.raises(CellExecutionError, match="boom"):
    run_notebook(path)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path: pathlib.Path, monkeypatch):
  monkeypatch.delenv("SAVE_IMAGES", raising=False)
  try:
    nb = run_notebook(path)
  except CellExecutionError as e:
    pytest.fail(f"{path.name}: a cell failed:\n{e}", pytrace=False)
  outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
  assert not [o for o in outputs if o.get("output_type") == "error"]
  assert any("image/png" in o.get("data", {}) for o in outputs), f"{path.name}: no inline plot"
