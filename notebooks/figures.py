"""Regenerates the figures the docs show (notebooks/images/) by executing the notebooks.

    python notebooks/figures.py                      # every notebooks/*.ipynb
    python notebooks/figures.py 04_low_memory.ipynb  # only these

A cell whose metadata names an image (``# %% image="images/01_quickstart.png"`` in
the paired percent script) is the one whose inline PNG becomes that file: the
notebooks save nothing themselves. Each notebook runs in a fresh python3 kernel
with notebooks/ as working directory, as tests/test_notebooks.py runs it.
"""

from __future__ import annotations

import argparse
import base64
import pathlib

import nbformat
from nbclient import NotebookClient

HERE = pathlib.Path(__file__).resolve().parent
CELL_TIMEOUT = 300  # seconds per cell: generous, the machine may be shared


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


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("notebooks", nargs="*", help="notebooks/*.ipynb to run (default: all)")
  args = parser.parse_args()
  paths = [HERE / pathlib.Path(n).name for n in args.notebooks] or sorted(HERE.glob("*.ipynb"))
  for path in paths:
    for name, png in marked_images(execute(path)).items():
      target = path.parent / name
      target.parent.mkdir(parents=True, exist_ok=True)
      target.write_bytes(png)
      print(f"{path.name}: wrote {target.relative_to(HERE.parent)}")


if __name__ == "__main__":
  main()
