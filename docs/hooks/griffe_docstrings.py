"""A griffe extension for the API reference: examples as code, private aliases expanded.

The docstrings are Markdown (Google style). They keep their ``>>>`` examples
in the text, where doctest (tests/test_docstrings.py) runs them; in Markdown a
``>>>`` line would be a block quote, so each example run (up to the next blank
line) is fenced as ``pycon``, without doctest's ``# doctest:`` directives.

A Returns section is one value however many lines it takes (mkdocs.yml:
``returns_multiple_items: false``), except in a function annotated to return a
tuple of fixed length: there it lists one ``name: description`` item per value,
each typed by its element of the annotation.

Signatures name the package's private type aliases (``_hyperparams.ScalarOrSchedule``,
``_tree.MaskOrFn``, ...), which the reference does not list: each is replaced
by what it stands for, and private base classes are left out.
"""

from __future__ import annotations

import dataclasses
import re

import griffe

_DIRECTIVE = re.compile(r"\s*# doctest:.*$")
_PACKAGE = "adamw_jax"


def fence_examples(text: str) -> str:
  """Each run of lines from a ``>>>`` line to the next blank line, fenced as ``pycon``."""
  out: list[str] = []
  lines = text.splitlines()
  i = 0
  while i < len(lines):
    line = lines[i]
    if line.lstrip().startswith(">>>"):
      indent = line[: len(line) - len(line.lstrip())]
      out.append(f"{indent}```pycon")
      while i < len(lines) and lines[i].strip():
        shown = _DIRECTIVE.sub("", lines[i])
        if shown.strip() != "...":  # a continuation line that only carried a directive
          out.append(shown)
        i += 1
      out.append(f"{indent}```")
      continue
    out.append(line)
    i += 1
  return "\n".join(out)


def _private(path: str) -> bool:
  parts = path.split(".")
  return parts[0] == _PACKAGE and any(p.startswith("_") for p in parts[1:])


def _alias_value(expr: object, pkg: griffe.Module) -> griffe.Expr | None:
  """What a private type alias named by `expr` stands for, or None."""
  if not isinstance(expr, griffe.ExprName | griffe.ExprAttribute):
    return None
  path = expr.canonical_path
  if not _private(path):
    return None
  try:
    target = pkg.modules_collection[path]
  except (KeyError, griffe.AliasResolutionError):
    return None
  while isinstance(target, griffe.Alias):
    target = target.final_target
  if (
    isinstance(target, griffe.Attribute)
    and isinstance(target.value, griffe.Expr)
    and target.name[:1].isupper()
    and not target.name.isupper()  # a type, not a constant
  ):
    return target.value
  return None


def expand(expr: object, pkg: griffe.Module, depth: int = 0) -> object:
  """`expr` with every private type alias replaced by its value (recursively)."""
  if depth > 8:
    return expr
  value = _alias_value(expr, pkg)
  if value is not None:
    return expand(value, pkg, depth + 1)
  if isinstance(expr, griffe.Expr) and dataclasses.is_dataclass(expr):
    changes = {}
    for field in dataclasses.fields(expr):
      if field.name == "parent":
        continue
      old = getattr(expr, field.name)
      if isinstance(old, griffe.Expr):
        new = expand(old, pkg, depth)
      elif isinstance(old, list):
        new = [expand(v, pkg, depth) for v in old]
      else:
        continue
      if new is not old:
        changes[field.name] = new
    if changes:
      return dataclasses.replace(expr, **changes)
  return expr


class TupleReturns(griffe.Docstring):
  """A docstring whose Returns section lists one item per value, whatever options it is given.

  mkdocstrings sets every docstring's parsing options from mkdocs.yml again
  before rendering it; this keeps ``returns_multiple_items`` on through that.
  """

  @property
  def parser_options(self) -> dict:  # type: ignore[override]
    return {**self._options, "returns_multiple_items": True}

  @parser_options.setter
  def parser_options(self, options: dict) -> None:
    self._options = options


class DocstringExamples(griffe.Extension):
  """Fences every docstring's examples before it is parsed; expands private aliases."""

  def on_object(self, *, obj: griffe.Object, **kwargs: object) -> None:
    if obj.docstring is not None:
      obj.docstring.value = fence_examples(obj.docstring.value)

  def on_package(self, *, pkg: griffe.Module, **kwargs: object) -> None:
    if pkg.name != _PACKAGE:
      return
    for obj in _public(pkg):
      if isinstance(obj, griffe.Function):
        for parameter in obj.parameters:
          parameter.annotation = expand(parameter.annotation, pkg)
        obj.returns = expand(obj.returns, pkg)
        if obj.docstring is not None and tuple_length(obj.returns):
          d = obj.docstring
          obj.docstring = TupleReturns(
            d.value,
            lineno=d.lineno,
            endlineno=d.endlineno,
            parent=d.parent,
            parser=d.parser,
            parser_options=d.parser_options,
          )
      elif isinstance(obj, griffe.Attribute):
        obj.annotation = expand(obj.annotation, pkg)
      elif isinstance(obj, griffe.Class):
        obj.bases = [b for b in obj.bases if not _private(getattr(b, "canonical_path", ""))]


def tuple_length(annotation: object) -> int:
  """n for ``tuple[X1, ..., Xn]``; 0 for anything else (``tuple[X, ...]``, a bare ``tuple``)."""
  if not (
    isinstance(annotation, griffe.ExprSubscript)
    and isinstance(annotation.left, griffe.ExprName | griffe.ExprAttribute)
    and annotation.left.canonical_path in ("tuple", "typing.Tuple")
  ):
    return 0
  elements = annotation.slice
  elements = elements.elements if isinstance(elements, griffe.ExprTuple) else [elements]
  if any(str(e) == "..." for e in elements):
    return 0
  return len(elements)


def _public(pkg: griffe.Module) -> list[griffe.Object]:
  """The objects the reference shows: the package's exports and their public members."""
  found: list[griffe.Object] = []
  todo = [pkg[name] for name in pkg.exports or ()]
  while todo:
    obj = todo.pop()
    while isinstance(obj, griffe.Alias):
      obj = obj.final_target
    if any(obj is seen for seen in found):
      continue
    found.append(obj)
    if isinstance(obj, griffe.Class):
      todo += [m for name, m in obj.members.items() if not name.startswith("_")]
  return found
