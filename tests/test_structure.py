"""The package's structure: imports point one way, and every module says first what it owns.

The import graph is read statically (``ast``) from ``adamw_jax/*.py``,
function-level imports included, so that a cycle hidden in a lazy import
(which works until someone moves it) fails here too.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

import adamw_jax

PACKAGE = pathlib.Path(adamw_jax.__file__).parent
MODULES = sorted(p.stem for p in PACKAGE.glob("*.py"))
Graph = dict[str, set[str]]


def _target(parts: list[str], name: str | None) -> str | None:
  """The module of the package that ``from <parts> import <name>`` (or ``import <parts>``) loads."""
  if parts[:1] != ["adamw_jax"]:
    return None
  if len(parts) > 1:
    return parts[1]
  return name if name in MODULES else "__init__"


def imports(source: str) -> set[str]:
  """The package's modules that `source` imports anywhere: at the top, in functions, under if."""
  out: set[str] = set()
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.Import):
      out.update(t for a in node.names if (t := _target(a.name.split("."), None)) is not None)
    elif isinstance(node, ast.ImportFrom):
      parts = (node.module or "").split(".") if node.module else []
      if node.level:  # relative: from . import x, from ._x import y
        parts = ["adamw_jax", *parts]
      out.update(t for a in node.names if (t := _target(parts, a.name)) is not None)
  return out


def graph() -> Graph:
  return {m: imports((PACKAGE / f"{m}.py").read_text()) - {m} for m in MODULES}


def find_cycle(edges: Graph) -> list[str] | None:
  """A cycle of `edges` as a list of nodes (first == last), or None."""
  state: dict[str, int] = {}  # 1: on the path, 2: done
  path: list[str] = []

  def visit(node: str) -> list[str] | None:
    state[node] = 1
    path.append(node)
    for nxt in sorted(edges.get(node, ())):
      if state.get(nxt) == 1:
        return [*path[path.index(nxt) :], nxt]
      if nxt not in state and (found := visit(nxt)) is not None:
        return found
    path.pop()
    state[node] = 2
    return None

  for node in sorted(edges):
    if node not in state and (found := visit(node)) is not None:
      return found
  return None


def test_find_cycle_finds_lazy_and_long_cycles():
  lazy = imports(
    "import jax\nfrom adamw_jax import _flat\n"
    "def f():\n  from adamw_jax import _core\n  import adamw_jax._tree\n"
  )
  assert lazy == {"_flat", "_core", "_tree"}
  assert imports("from adamw_jax import adamw\nfrom . import _rules\n") == {"__init__", "_rules"}
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_imports_point_one_way():
  cycle = find_cycle(graph())
  assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_only_the_package_init_and_the_demo_import_the_package_itself():
  for module, targets in graph().items():
    if "__init__" in targets:
      assert module == "demo", f"{module} imports adamw_jax itself; import the submodule"


@pytest.mark.parametrize("module", MODULES)
def test_every_module_says_in_its_first_line_what_it_owns(module):
  doc = ast.get_docstring(ast.parse((PACKAGE / f"{module}.py").read_text()))
  assert doc, f"adamw_jax/{module}.py has no docstring"
  first = doc.splitlines()[0]
  assert first.endswith(".") and len(first) <= 100, first
