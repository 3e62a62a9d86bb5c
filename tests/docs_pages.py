"""The pages whose code the tests run: README.md and docs/*.md, split into fenced blocks.

Every fenced block names its language (``python``, ``bash`` or ``text``).
tests/test_docs.py runs every ``python`` block, page by page, except those
after a marker comment on the line before the fence:

  <!-- docs-test: 8-devices -->     needs 8 devices: run by tests/sharded_checks.py instead
  <!-- docs-test: 2-processes -->   one program run as 2 jax.distributed processes: run by
                                    tests/multiprocess_checks.py instead

No other marker exists; test_docs fails on an unknown one.
"""

from __future__ import annotations

import dataclasses
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
LANGUAGES = ("python", "bash", "text")
EIGHT_DEVICES = "8-devices"
TWO_PROCESSES = "2-processes"
MARKERS = (EIGHT_DEVICES, TWO_PROCESSES)
_MARKER = re.compile(r"<!--\s*docs-test:\s*(.*?)\s*-->")
_HEADING = re.compile(r"(#{1,6}) (.*)")


@dataclasses.dataclass(frozen=True)
class Block:
  """One fenced block of a page."""

  page: pathlib.Path
  lang: str
  code: str
  line: int  # the opening fence's line, 1-based
  headings: tuple[str, ...]  # the titles of the headings it is under, outermost first
  marker: str | None  # the docs-test marker on the line before the fence
  right_after: bool  # only blank lines between it and the block before it

  @property
  def where(self) -> str:
    return f"{self.page.relative_to(ROOT)}:{self.line}"


def pages() -> list[pathlib.Path]:
  """README.md and every docs/*.md."""
  return [README, *sorted(DOCS.glob("*.md"))]


def page(name: str) -> pathlib.Path:
  """A page of docs/ by file name (``"flat.md"``)."""
  path = DOCS / name
  assert path.is_file(), f"no page {path}"
  return path


def blocks(path: pathlib.Path) -> list[Block]:
  """The fenced blocks of a page, in order."""
  lines = path.read_text().splitlines()
  found: list[Block] = []
  headings: list[tuple[int, str]] = []
  last_end = -2
  i = 0
  while i < len(lines):
    line = lines[i]
    heading = _HEADING.fullmatch(line)
    if heading:
      level = len(heading.group(1))
      headings = [h for h in headings if h[0] < level] + [(level, heading.group(2).strip())]
    elif line.startswith("```"):
      lang = line[3:].strip()
      end = i + 1
      while end < len(lines) and lines[end].strip() != "```":
        end += 1
      assert end < len(lines), f"{path.name}:{i + 1}: unclosed code block"
      marker = _MARKER.fullmatch(lines[i - 1].strip()) if i else None
      gap = lines[last_end + 1 : i] if found else ["x"]
      found.append(
        Block(
          page=path,
          lang=lang,
          code="\n".join(lines[i + 1 : end]) + "\n",
          line=i + 1,
          headings=tuple(h[1] for h in headings),
          marker=marker.group(1) if marker else None,
          right_after=not any(g.strip() for g in gap),
        )
      )
      last_end = end
      i = end
    i += 1
  return found


def section(path: pathlib.Path, title: str, lang: str | None = "python") -> list[Block]:
  """The blocks under the heading `title` (at any level), of language `lang` (None: all)."""
  chosen = [b for b in blocks(path) if title in b.headings and (lang is None or b.lang == lang)]
  assert chosen, f"no {lang or ''} block under {title!r} in {path.name}"
  return chosen
