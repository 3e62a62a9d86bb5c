"""Regenerates what the docs show of the notebooks' runs (their figures and text outputs) by executing them.

    python notebooks/figures.py                      # every notebooks/*.ipynb
    python notebooks/figures.py 04_low_memory.ipynb  # only these

A cell whose metadata names an image (``# %% image="images/01_quickstart.png"`` in
the paired percent script) is the one whose inline PNG becomes that file: the
notebooks save nothing themselves. The text each code cell printed or returned
goes to ``outputs/<name>.json`` (``text_outputs``), which the site shows
under the cell (docs/hooks/site.py); the ``.ipynb`` stays without outputs. Each
notebook runs in a fresh python3 kernel with notebooks/ as working directory, as
tests/test_notebooks.py runs it.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import pathlib
import re

import nbformat
from nbclient import NotebookClient

HERE = pathlib.Path(__file__).resolve().parent
CELL_TIMEOUT = 300  # seconds per cell: generous, the machine may be shared
OUTPUTS = "outputs"  # notebooks/outputs/<name>.json: the text outputs the site shows


def execute(path: pathlib.Path) -> nbformat.NotebookNode:
  """The executed notebook; raises CellExecutionError at the first failing cell."""
  nb = nbformat.read(path, as_version=4)
  NotebookClient(
    nb,
    timeout=CELL_TIMEOUT,
    kernel_name="python3",
    resources={"metadata": {"path": str(path.parent)}},
  ).execute()
  return nb


def marked_images(nb: nbformat.NotebookNode) -> dict[str, bytes]:
  """{image metadata: the PNG its cell displayed} of an executed notebook.

  Raises ValueError where a marked cell is not code or did not display exactly one PNG.
  """
  images = {}
  for i, cell in enumerate(nb.cells):
    name = cell.metadata.get("image")
    if name is None:
      continue
    outputs = cell.get("outputs", [])
    pngs = [o.data["image/png"] for o in outputs if "image/png" in o.get("data", {})]
    if cell.cell_type != "code" or len(pngs) != 1:
      raise ValueError(f"cell {i} (image={name!r}) displayed {len(pngs)} PNGs, not one")
    images[name] = base64.b64decode(pngs[0])
  return images


def source_sha256(source: str) -> str:
  """The key of a code cell's outputs: its source's SHA-256 (docs/hooks/site.py computes it too)."""
  return hashlib.sha256(source.encode()).hexdigest()


def text_outputs(nb: nbformat.NotebookNode) -> dict:
  """What a reader sees under each code cell of an executed notebook, in order.

  ``{"cells": [{"source_sha256": ..., "outputs": [{"text": ...} or {"image": ...}]}]}``,
  one entry per code cell: each run of stdout chunks as one text, the
  ``text/plain`` of each result or display that is not a figure, and where a
  marked cell displayed its figure, the image's name (the PNG is in images/).
  Standard error is left out: it holds warnings that depend on the machine (no
  GPU found, a deprecation), not the notebook's results.
  """
  cells = []
  for cell in nb.cells:
    if cell.cell_type != "code":
      continue
    outputs: list[dict] = []
    printing = False  # the last output was stdout: the next stdout chunk continues it
    for output in cell.get("outputs", []):
      data = output.get("data", {})
      if output.output_type == "stream":
        if output.name == "stdout" and printing:
          outputs[-1]["text"] += output.text
        elif output.name == "stdout":
          outputs.append({"text": output.text})
        printing = output.name == "stdout" or printing
        continue
      printing = False
      if "image/png" in data and cell.metadata.get("image"):
        outputs.append({"image": cell.metadata["image"]})
      elif "text/plain" in data and not any(k.startswith("image/") for k in data):
        outputs.append({"text": data["text/plain"]})
    for out in outputs:
      if "text" in out:
        out["text"] = out["text"].rstrip("\n")
    cells.append({"source_sha256": source_sha256(cell.source), "outputs": outputs})
  return {"cells": cells}


_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def words(outputs: dict) -> list:
  """`text_outputs` without its numbers: the words of each output, cell by cell.

  Two runs of a notebook agree in these on any machine; the numbers (timings, the
  last bits of a loss, which of two close runs won) may not.
  """
  return [
    (
      cell["source_sha256"],
      [
        re.findall(r"[^\W\d]+", _NUMBER.sub(" ", out["text"])) if "text" in out else out
        for out in cell["outputs"]
      ],
    )
    for cell in outputs["cells"]
  ]


def outputs_path(notebook: pathlib.Path) -> pathlib.Path:
  return notebook.parent / OUTPUTS / (notebook.stem + ".json")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("notebooks", nargs="*", help="notebooks/*.ipynb to run (default: all)")
  args = parser.parse_args()
  paths = [HERE / pathlib.Path(n).name for n in args.notebooks] or sorted(HERE.glob("*.ipynb"))
  for path in paths:
    nb = execute(path)
    for name, png in marked_images(nb).items():
      target = path.parent / name
      target.parent.mkdir(parents=True, exist_ok=True)
      target.write_bytes(png)
      print(f"{path.name}: wrote {target.relative_to(HERE.parent)}")
    target = outputs_path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(text_outputs(nb), indent=1, ensure_ascii=False) + "\n")
    print(f"{path.name}: wrote {target.relative_to(HERE.parent)}")


if __name__ == "__main__":
  main()
