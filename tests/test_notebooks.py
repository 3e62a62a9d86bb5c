"""The tutorial notebooks: paired with their percent scripts, stored clean, and they run.

Each notebook is a jupytext percent script, notebooks/<name>.py (the source to edit
and review), paired with notebooks/<name>.ipynb (what readers open), which is stored
without outputs; ``jupytext --sync notebooks/<name>.py`` rewrites the one from the
other. Every notebooks/*.ipynb is executed top to bottom, one test per notebook, so
a notebook added to notebooks/ is picked up without editing this file. Each runs in
a fresh python3 (ipykernel) kernel with notebooks/ as working directory, as a reader
would run it; the cells marked with an image (the figures the docs show, which
``python notebooks/figures.py`` writes to notebooks/images/) must display one.
"""

from __future__ import annotations

import pathlib

import jupytext
import nbformat
import pytest
from nbclient.exceptions import CellExecutionError
from nbformat import v4

from notebooks.figures import execute, marked_images

HERE = pathlib.Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(HERE.glob("*.ipynb"))


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


def _cells(nb) -> list[tuple[str, str, str | None]]:
  return [(c.cell_type, c.source, c.metadata.get("image")) for c in nb.cells]


def test_notebooks_match_their_percent_scripts():
  """An edit to the .ipynb or the .py without the other fails here."""
  scripts = {p.stem for p in HERE.glob("*.py") if p.read_text().startswith("# ---\n# jupyter:")}
  assert scripts == {p.stem for p in NOTEBOOKS}, "each notebook is an .ipynb and a .py"
  for path in NOTEBOOKS:
    nb = nbformat.read(path, as_version=4)
    assert nb.metadata.get("jupytext", {}).get("formats") == "ipynb,py:percent", path.name
    script = path.with_suffix(".py")
    assert _cells(nb) == _cells(jupytext.read(script)), (
      f"{path.name} and {script.name} differ: edit {script.name}, then "
      f"`jupytext --sync notebooks/{script.name}` (or the other way round)"
    )


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
    execute(path)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path: pathlib.Path):
  try:
    nb = execute(path)
  except CellExecutionError as e:
    pytest.fail(f"{path.name}: a cell failed:\n{e}", pytrace=False)
  outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
  assert not [o for o in outputs if o.get("output_type") == "error"]
  assert any("image/png" in o.get("data", {}) for o in outputs), f"{path.name}: no inline plot"
  # the figures the docs show: each marked cell displays its PNG (marked_images raises if not)
  images = marked_images(nb)
  assert all(png.startswith(b"\x89PNG") for png in images.values())
  assert all((HERE / name).is_file() for name in images), "a marked image is not in images/"
