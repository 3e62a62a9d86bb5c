"""mkdocs hooks: the package's version in the site name, the README as the home page, repository files.

The home page (``docs/index.md``) is the README, with its links into ``docs/``
made relative to the site.

The pages link files outside ``docs/`` as ``../path`` (so the links also work
when the Markdown is read in the repository); these hooks copy each such file
into the site under ``_repo/`` and point the link there. A link to a file that
does not exist is a warning, which ``mkdocs build --strict`` turns into an error.

Each notebook (``notebooks/*.ipynb``, stored without outputs) is a page of the
site, ``notebooks/<name>.md``: its Markdown cells as they are, its code cells
as code, and under each code cell what it printed and the figure it drew, as
``notebooks/figures.py`` saved them when it last ran the notebook
(``notebooks/outputs/<name>.json``, the PNGs in ``notebooks/images/``). Outputs
saved for another version of a cell's code are a warning. A page's link to the
``.ipynb`` goes to that page.
"""

from __future__ import annotations

import ast
import hashlib
import json
import logging
import pathlib
import re

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.structure.files import File, Files
from mkdocs.structure.pages import Page

ROOT = pathlib.Path(__file__).resolve().parents[2]
REPO_PREFIX = "_repo/"
NOTEBOOKS = "notebooks/"
OUTPUTS = "outputs"  # notebooks/outputs/<name>.json, written by notebooks/figures.py
_LINK = re.compile(r"\]\(\.\./([^)#\s]+)(#[^)\s]*)?\)")
log = logging.getLogger("mkdocs.hooks.site")


def package_version() -> str:
  """``__version__`` from ``adamw_jax/_version.py``, read without importing the package."""
  tree = ast.parse((ROOT / "adamw_jax" / "_version.py").read_text())
  for node in tree.body:
    if isinstance(node, ast.Assign) and any(
      getattr(t, "id", None) == "__version__" for t in node.targets
    ):
      return ast.literal_eval(node.value)
  raise RuntimeError("adamw_jax/_version.py defines no __version__")


def on_config(config: MkDocsConfig) -> MkDocsConfig:
  version = package_version()
  config.site_name = f"{config.site_name} {version}"
  config.extra["version"] = version
  return config


def on_files(files: Files, config: MkDocsConfig) -> Files:
  """Adds every repository file a page links as ``../path`` to the site, under ``_repo/``."""
  docs = pathlib.Path(config.docs_dir)
  targets: set[str] = set()
  for page in docs.glob("*.md"):
    targets.update(m.group(1) for m in _LINK.finditer(page.read_text()))
  for target in sorted(targets):
    path = ROOT / target
    if path.is_file() and ROOT in path.resolve().parents:
      files.append(File.generated(config, REPO_PREFIX + target, abs_src_path=str(path)))
  for notebook in sorted((ROOT / NOTEBOOKS).glob("*.ipynb")):
    for source in [notebook, *_notebook_images(notebook)]:
      target = REPO_PREFIX + str(source.relative_to(ROOT))
      if files.get_file_from_path(target) is None:
        files.append(File.generated(config, target, abs_src_path=str(source)))
    page = NOTEBOOKS + notebook.stem + ".md"
    files.append(File.generated(config, page, content=notebook_markdown(notebook)))
  return files


def _cells(notebook: pathlib.Path) -> list[dict]:
  return json.loads(notebook.read_text())["cells"]


def _notebook_images(notebook: pathlib.Path) -> list[pathlib.Path]:
  images = [c.get("metadata", {}).get("image") for c in _cells(notebook)]
  return [notebook.parent / image for image in images if image]


def _fenced(text: str, lang: str) -> str:
  fence = "`" * max(3, 1 + max((len(r) for r in re.findall(r"`+", text)), default=0))
  return f"{fence}{lang}\n{text}\n{fence}"


def saved_outputs(notebook: pathlib.Path) -> list[list[dict]] | None:
  """The outputs ``notebooks/figures.py`` saved for each code cell, or None where they are stale.

  Stale: no file, or a cell's code is not the code that made them (its SHA-256 differs).
  """
  path = notebook.parent / OUTPUTS / (notebook.stem + ".json")
  if not path.is_file():
    return None
  saved = json.loads(path.read_text())["cells"]
  code = ["".join(c["source"]) for c in _cells(notebook) if c["cell_type"] == "code"]
  sha = [hashlib.sha256(source.encode()).hexdigest() for source in code]
  if sha != [cell["source_sha256"] for cell in saved]:
    return None
  return [cell["outputs"] for cell in saved]


def notebook_markdown(notebook: pathlib.Path) -> str:
  """The notebook as a page: Markdown cells, code cells fenced, each followed by its saved outputs."""
  up = "../" + REPO_PREFIX + NOTEBOOKS
  outputs = saved_outputs(notebook)
  if outputs is None:
    log.warning(
      "notebooks/%s/%s.json is missing or stale: run python notebooks/figures.py %s",
      OUTPUTS,
      notebook.stem,
      notebook.name,
    )
  parts = []
  code_cells = 0
  for cell in _cells(notebook):
    source = "".join(cell["source"]).strip("\n")
    if cell["cell_type"] == "markdown":
      parts.append(source)
    elif cell["cell_type"] == "code":
      parts.append(_fenced(source, "python"))
      shown = outputs[code_cells] if outputs is not None else []
      code_cells += 1
      for out in shown:
        if "text" in out:
          parts.append(_fenced(out["text"], "text"))
        else:
          parts.append(f"![The figure this cell draws]({up}{out['image']})")
  script = notebook.with_suffix(".py").name
  parts.append(
    f"*The notebook: [{notebook.name}]({up}{notebook.name}) (stored without outputs; "
    f"`{script}` is its jupytext script). The outputs shown under its cells are those "
    f"of its last run by `notebooks/figures.py` (`notebooks/{OUTPUTS}/{notebook.stem}.json` "
    "and the figure in `notebooks/images/`): timings and the last digits may differ "
    "on your machine.*"
  )
  return "\n\n".join(parts) + "\n"


def readme_for_site() -> str:
  """The README, its links into ``docs/`` (and to the changelog) made relative to the site."""
  text = (ROOT / "README.md").read_text()
  return re.sub(r"\]\(docs/", "](", text).replace("](CHANGELOG.md)", "](changelog.md)")


def on_page_markdown(markdown: str, page: Page, config: MkDocsConfig, files: Files) -> str:
  if page.file.src_uri == "index.md":
    markdown = readme_for_site()

  def repoint(m: re.Match) -> str:
    target, anchor = m.group(1), m.group(2) or ""
    if target.startswith(NOTEBOOKS) and target.endswith(".ipynb"):
      rendered = target.removesuffix(".ipynb") + ".md"
      if files.get_file_from_path(rendered) is not None:
        return f"]({rendered}{anchor})"
    if files.get_file_from_path(REPO_PREFIX + target) is None:
      log.warning(
        "%s links ../%s, which is not a file of the repository", page.file.src_uri, target
      )
      return m.group(0)
    return f"]({REPO_PREFIX}{target}{anchor})"

  if page.file.src_uri.startswith(NOTEBOOKS):  # made here, its links already into the site
    return markdown
  return _LINK.sub(repoint, markdown)
