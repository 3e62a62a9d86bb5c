"""The tutorial notebooks: paired with their percent scripts, stored clean, and they run.

Each notebook is a jupytext percent script, notebooks/<name>.py (the source to edit
and review), paired with notebooks/<name>.ipynb (what readers open), which is stored
without outputs; ``jupytext --sync notebooks/<name>.py`` rewrites the one from the
other. Every notebooks/*.ipynb is executed top to bottom, one test per notebook, so
a notebook added to notebooks/ is picked up without editing this file. Each runs in
a fresh python3 (ipykernel) kernel with notebooks/ as working directory, as a reader
would run it; the cells marked with an image (the figures the docs show, which
``python notebooks/figures.py`` writes to notebooks/images/) must display one.
What the site shows under each cell, notebooks/outputs/<name>.json (written by
the same command), must be from the notebook's current code, and a run must
print the same words (numbers may differ: timings, the last bits of a loss).
"""

from __future__ import annotations

import json
import pathlib

import jupytext
import nbformat
import pytest
from nbclient.exceptions import CellExecutionError
from nbformat import v4

from notebooks.figures import (
  execute,
  marked_images,
  outputs_path,
  source_sha256,
  text_outputs,
  words,
)

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


def _saved(path: pathlib.Path) -> dict:
  return json.loads(outputs_path(path).read_text())


def test_the_saved_outputs_are_from_the_notebooks_code():
  """notebooks/outputs/<name>.json holds one entry per code cell, made by that cell's code."""
  for path in NOTEBOOKS:
    assert outputs_path(path).is_file(), (
      f"no saved outputs: python notebooks/figures.py {path.name}"
    )
    code = [c.source for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"]
    assert [c["source_sha256"] for c in _saved(path)["cells"]] == [
      source_sha256(s) for s in code
    ], (
      f"{path.name}: a cell's code changed since its outputs were saved: python notebooks/figures.py {path.name}"
    )
  assert {p.name for p in outputs_path(NOTEBOOKS[0]).parent.iterdir()} == {
    outputs_path(p).name for p in NOTEBOOKS
  }, "a saved output whose notebook is gone"


def test_text_outputs_and_their_words():
  """What is kept of a run: stdout runs joined, plain results, the marked figure; not stderr."""
  nb = v4.new_notebook(
    cells=[
      v4.new_code_cell(
        "print(1)",
        outputs=[
          v4.new_output("stream", name="stdout", text="loss 1.5e-03\n"),
          v4.new_output("stream", name="stderr", text="a warning\n"),
          v4.new_output("stream", name="stdout", text="done in 12.0 s\n"),
          v4.new_output("display_data", data={"image/png": "", "text/plain": "<Figure>"}),
          v4.new_output("execute_result", data={"text/plain": "True"}, execution_count=1),
        ],
        metadata={"image": "images/x.png"},
      ),
      v4.new_code_cell("x = 1"),
    ]
  )
  saved = text_outputs(nb)
  assert saved == {
    "cells": [
      {
        "source_sha256": source_sha256("print(1)"),
        "outputs": [
          {"text": "loss 1.5e-03\ndone in 12.0 s"},
          {"image": "images/x.png"},
          {"text": "True"},
        ],
      },
      {"source_sha256": source_sha256("x = 1"), "outputs": []},
    ]
  }
  assert words(saved)[0][1][0] == ["loss", "done", "in", "s"]
  other = json.loads(json.dumps(saved).replace("12.0", "9.75").replace("1.5e-03", "-2e+01"))
  assert words(other) == words(saved)
  assert words(json.loads(json.dumps(saved).replace("True", "False"))) != words(saved)


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
  # what the site shows under the cells: the words this run printed (not its numbers)
  assert words(text_outputs(nb)) == words(_saved(path)), (
    f"{path.name} printed other words than notebooks/outputs/{path.stem}.json holds: "
    f"python notebooks/figures.py {path.name}"
  )
