"""The package's structure: imports point one way, and every module says first what it owns.

The import graph is read statically (``ast``) from ``adamw_jax/*.py``,
function-level imports included, so that a cycle hidden in a lazy import
(which works until someone moves it) fails here too.
"""

from __future__ import annotations

import ast
import pathlib
import re

import pytest

import adamw_jax

PACKAGE = pathlib.Path(adamw_jax.__file__).parent


def _name(path: pathlib.Path) -> str:
  """A module's name inside the package: ``_core``, ``sub._x``; a package's ``__init__``: ``sub``."""
  parts = path.relative_to(PACKAGE).with_suffix("").parts
  if parts[-1] == "__init__" and len(parts) > 1:
    parts = parts[:-1]
  return ".".join(parts)


FILES = {
  _name(p): p for p in sorted(PACKAGE.rglob("*.py")) if "__pycache__" not in p.parts
}  # sub-packages too
MODULES = sorted(FILES)
Graph = dict[str, set[str]]


def _target(parts: list[str], name: str | None, modules) -> str | None:
  """The module of the package that ``from <parts> import <name>`` (or ``import <parts>``) loads."""
  if parts[:1] != ["adamw_jax"]:
    return None
  inner = ".".join(parts[1:])
  if name is not None and (f"{inner}.{name}" if inner else name) in modules:
    return f"{inner}.{name}" if inner else name
  return inner or "__init__"


def imports(source: str, module: str = "_x", modules=None) -> set[str]:
  """The package's modules that `source` (the code of `module`) imports anywhere: at the top, in functions, under if."""
  modules = MODULES if modules is None else modules
  is_package = (
    module == "__init__"
    or f"{module}.__init__" in modules
    or any(m.startswith(f"{module}.") for m in modules)
  )
  here = ["adamw_jax", *([] if module == "__init__" else module.split("."))]
  if not is_package:
    here = here[:-1]  # a module's relative imports start from its package
  out: set[str] = set()
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.Import):
      out.update(
        t for a in node.names if (t := _target(a.name.split("."), None, modules)) is not None
      )
    elif isinstance(node, ast.ImportFrom):
      parts = (node.module or "").split(".") if node.module else []
      if node.level:  # relative: from . import x, from ._x import y, from .. import z
        parts = [*here[: len(here) - node.level + 1], *parts]
      out.update(t for a in node.names if (t := _target(parts, a.name, modules)) is not None)
  return out


def graph() -> Graph:
  return {m: imports(FILES[m].read_text(), m) - {m} for m in MODULES}


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


def test_sub_packages_are_walked_and_their_imports_resolved():
  modules = ["__init__", "_core", "sub", "sub._a", "sub._b"]
  assert imports("from . import _a\nfrom .. import _core\n", "sub._b", modules) == {
    "sub._a",
    "_core",
  }
  assert imports("from ._a import f\nimport adamw_jax.sub._b\n", "sub", modules) == {
    "sub._a",
    "sub._b",
  }
  assert imports("from adamw_jax.sub import _a\nfrom adamw_jax import sub\n", "_core", modules) == {
    "sub._a",
    "sub",
  }
  assert find_cycle({"_core": {"sub._a"}, "sub._a": {"_core"}}) == ["_core", "sub._a", "_core"]
  assert _name(PACKAGE / "sub" / "__init__.py") == "sub"
  assert _name(PACKAGE / "sub" / "_a.py") == "sub._a"


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
  doc = ast.get_docstring(ast.parse(FILES[module].read_text()))
  assert doc, f"{FILES[module]} has no docstring"
  first = doc.splitlines()[0]
  assert first.endswith(".") and len(first) <= 100, first


def test_only_env_reads_the_environment():
  """Environment switches are read in one module (``_env``), each documented once."""
  for module, path in FILES.items():
    if module == "_env":
      continue
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv", "putenv"):
        pytest.fail(f"{path.name}:{node.lineno} reads the environment; use adamw_jax._env")
      if isinstance(node, ast.ImportFrom) and node.module == "os":
        names = {a.name for a in node.names} & {"environ", "getenv"}
        assert not names, f"{path.name}:{node.lineno} imports {names} from os; use adamw_jax._env"


def test_the_layout_page_names_every_module_once():
  """docs/development.md's table of the package: one row per module, none missing or stale."""
  page = (PACKAGE.parent / "docs" / "development.md").read_text()
  table = page.split("## The package, by layer", 1)[1].split("\n## ", 1)[0]
  named = [
    name
    for line in table.splitlines()
    if line.startswith("| ") and not line.startswith("| layer")
    for name in re.findall(r"`([\w./]+\.(?:py|cc))`", line.split("|")[2])
  ]
  files = [str(p.relative_to(PACKAGE)) for p in FILES.values()]
  files += [str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.cc")]
  assert sorted(named) == sorted(files)
