"""A griffe extension for the API reference: docstring examples as code, Sphinx roles as code.

The docstrings keep their ``>>>`` examples in the text, where doctest
(tests/test_docstrings.py) runs them; in Markdown a ``>>>`` line would be a
block quote, so each example run (up to the next blank line) is fenced as
``pycon``. ``:class:`X``` and ``:func:`X``` become plain code.
"""

from __future__ import annotations

import re

import griffe

_ROLE = re.compile(r":(?:class|func|meth|attr|mod|data|obj):`~?([^`]+)`")


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
        out.append(lines[i])
        i += 1
      out.append(f"{indent}```")
      continue
    out.append(line)
    i += 1
  return "\n".join(out)


class DocstringExamples(griffe.Extension):
  """Rewrites every docstring before it is parsed."""

  def on_object(self, *, obj: griffe.Object, **kwargs: object) -> None:
    if obj.docstring is not None:
      obj.docstring.value = _ROLE.sub(r"`\1`", fence_examples(obj.docstring.value))
