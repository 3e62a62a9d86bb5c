"""The documentation: every Python block of README.md and docs/*.md runs, the site builds, the versions agree.

Each page's ``python`` blocks run in order in one namespace (in a temporary
directory); a ``text`` block right after one is its exact output. Blocks
marked ``<!-- docs-test: 8-devices -->`` are run by tests/sharded_checks.py in
its 8-device subprocess, and only there; blocks marked
``<!-- docs-test: 2-processes -->`` by tests/multiprocess_checks.py in each of
its 2 ``jax.distributed`` processes, and only there; the pages of ``RUN_ELSEWHERE``
(docs/masks.md's recipes) by their own module, once. The site is built with
``python -m mkdocs build --strict`` (once, for every test that reads it), so a
broken link, anchor or API reference fails; its HTML is then read for what a
reader would see: reStructuredText or doctest leftovers, a Returns section
split into rows, a code block or table wider than the content column.
"""

from __future__ import annotations

import contextlib
import html
import importlib
import inspect
import io
import os
import pathlib
import re
import subprocess
import sys
import tomllib

import pytest

import adamw_jax
from tests import docs_pages, multiprocess_checks, sharded_checks
from tests.docs_pages import ROOT

# Pages whose python blocks are all run by a test module of their own, each recipe in a fresh
# namespace and with checks of its own (that module asserts it covers every block): run there only.
RUN_ELSEWHERE = {docs_pages.page("masks.md"): "tests/test_masks.py::test_docs_recipe"}
PAGES_WITH_CODE = [
  p
  for p in docs_pages.pages()
  if any(b.lang == "python" for b in docs_pages.blocks(p)) and p not in RUN_ELSEWHERE
]


def _name(path: pathlib.Path) -> str:
  return str(path.relative_to(ROOT))


def test_every_block_names_its_language_and_markers_are_known():
  for path in docs_pages.pages():
    for block in docs_pages.blocks(path):
      assert block.lang in docs_pages.LANGUAGES, (
        f"{block.where}: a code block must say python, bash or text, not {block.lang!r}"
      )
      assert block.marker in (None, *docs_pages.MARKERS), (
        f"{block.where}: unknown marker {block.marker!r}"
      )
      assert block.marker is None or block.lang == "python", (
        f"{block.where}: a marker on a {block.lang} block"
      )


def test_the_eight_device_blocks_are_exactly_those_sharded_checks_runs():
  marked = {
    (b.page, b.line)
    for p in docs_pages.pages()
    for b in docs_pages.blocks(p)
    if b.marker == docs_pages.EIGHT_DEVICES
  }
  assert marked, "no block is marked for 8 devices, but sharded_checks runs the Scaling out example"
  assert {(b.page, b.line) for b in sharded_checks.docs_blocks()} == marked
  assert "docs_scaling_out_example" in sharded_checks.CHECKS


def test_the_two_process_blocks_are_exactly_those_multiprocess_checks_runs():
  marked = {
    (b.page, b.line)
    for p in docs_pages.pages()
    for b in docs_pages.blocks(p)
    if b.marker == docs_pages.TWO_PROCESSES
  }
  assert marked, "no block is marked for 2 processes, but the Several hosts example is"
  assert {(b.page, b.line) for b in multiprocess_checks.docs_blocks()} == marked
  several_hosts = docs_pages.section(docs_pages.page("scaling-out.md"), "Several hosts")
  assert {(b.page, b.line) for b in several_hosts} <= marked
  assert multiprocess_checks.DOCS_CHECK not in multiprocess_checks.CHECKS  # run before them


def test_every_page_with_code_is_run():
  assert docs_pages.README in PAGES_WITH_CODE
  assert {p.name for p in [*PAGES_WITH_CODE, *RUN_ELSEWHERE]} >= {
    "getting-started.md",
    "masks.md",
    "migrating.md",
    "flat.md",
    "native.md",
    "bad-inputs.md",
    "paper-decay.md",
    "low-memory.md",
    "scaling-out.md",
  }


@pytest.mark.parametrize("path", PAGES_WITH_CODE, ids=_name)
def test_page_runs(path, tmp_path, monkeypatch):
  """The page's python blocks run in order in one namespace; a text block right after one is its output."""
  monkeypatch.chdir(tmp_path)  # examples may write files (a checkpoint)
  environ = dict(os.environ)  # examples may set variables (ADAMW_JAX_CHECKIFY)
  namespace: dict = {"__name__": f"docs:{_name(path)}"}
  blocks = docs_pages.blocks(path)
  ran = 0
  try:
    for i, block in enumerate(blocks):
      if block.lang != "python" or block.marker in docs_pages.MARKERS:
        continue
      out = io.StringIO()
      with contextlib.redirect_stdout(out):
        exec(compile(block.code, block.where, "exec"), namespace)
      ran += 1
      following = blocks[i + 1] if i + 1 < len(blocks) else None
      if following is not None and following.lang == "text" and following.right_after:
        assert out.getvalue() == following.code, (
          f"{block.where}: the output differs from {following.where}"
        )
  finally:
    os.environ.clear()
    os.environ.update(environ)
  assert ran or all(b.marker for b in blocks if b.lang == "python")


def test_the_quickstart_commands_are_those_of_ci():
  """The README's two commands; the site's are the same, and .ci/run runs the test command."""
  quickstart = docs_pages.section(docs_pages.README, "Quickstart", lang="bash")[0].code
  commands = [line.split("#")[0].strip() for line in quickstart.splitlines()]
  assert commands == [
    'pip install -e ".[demo]" && python -m adamw_jax.demo',
    'pip install -e ".[test]" && python -m pytest -q -n auto --dist loadfile',
  ]
  site = docs_pages.section(
    docs_pages.page("getting-started.md"), "Install and run the demo", lang="bash"
  )
  assert site[0].code == quickstart
  ci = [
    line.split("  #")[0].replace(" -q -e ", " -e ")
    for line in (ROOT / ".ci" / "run").read_text().splitlines()
    if line and not line.lstrip().startswith(("#", "echo "))
  ]
  # In a fresh venv of its own, activated before anything is installed: the README's demo
  # command, its test command, then the oldest supported versions' session (docs/versions.md).
  venv = ci.index('python -m venv "$venv"')
  activate = ci.index('source "$venv/bin/activate"')
  installs = [i for i, line in enumerate(ci) if "pip install" in line]
  assert venv < activate < installs[0]
  assert [ci[i] for i in installs] == commands
  assert ci[installs[-1] + 1 :] == ["bash .ci/oldest", "bash .ci/compiled"]


def test_the_readme_is_a_landing_page():
  assert len(docs_pages.README.read_text().splitlines()) <= 150


def test_the_api_reference_lists_every_public_name():
  listed = re.findall(r"^::: adamw_jax\.(\w+)$", docs_pages.page("api.md").read_text(), re.M)
  assert sorted(listed) == sorted(adamw_jax.__all__)


def _released_versions() -> list[str]:
  return re.findall(r"^## \[(\d+\.\d+\.\d+)\]", (ROOT / "CHANGELOG.md").read_text(), re.M)


def test_one_version():
  """pyproject reads the version from adamw_jax/_version.py; the changelog's newest release is it."""
  project = tomllib.loads((ROOT / "pyproject.toml").read_text())
  assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
  assert project["tool"]["setuptools"]["dynamic"]["version"] == {
    "attr": "adamw_jax._version.__version__"
  }
  assert re.fullmatch(r"\d+\.\d+\.\d+", adamw_jax.__version__)
  assert _released_versions()[0] == adamw_jax.__version__


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> subprocess.CompletedProcess:
  """The site, built once for the tests that read it: ``mkdocs build --strict`` into a temporary folder."""
  out = tmp_path_factory.mktemp("site")
  env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
  return subprocess.run(
    [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(out)],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )


def _built(site: subprocess.CompletedProcess) -> pathlib.Path:
  assert site.returncode == 0, site.stdout + site.stderr
  return pathlib.Path(site.args[-1])


def _pages(site: subprocess.CompletedProcess) -> dict[str, str]:
  """Every page of the built site (not the repository files it carries), by its folder."""
  root = _built(site)
  return {
    str(p.parent.relative_to(root)): p.read_text()
    for p in sorted(root.rglob("index.html"))
    if not p.relative_to(root).parts[0].startswith(("_repo", "assets", "search"))
  }


def test_site_builds_strict(site):
  """mkdocs build --strict: no warning (broken links, anchors, docstrings); the site shows the version."""
  root = _built(site)
  assert "WARNING" not in site.stderr, site.stderr
  home = (root / "index.html").read_text()
  assert f"<title>adamw_jax {adamw_jax.__version__}</title>" in home
  api = (root / "api" / "index.html").read_text()
  for name in adamw_jax.__all__:
    assert f'id="adamw_jax.{name}"' in api, name


def _text(fragment: str) -> str:
  return html.unescape(re.sub(r"<[^>]+>", "", fragment))


# What reStructuredText or doctest leaves on a page when a docstring is not Markdown.
RST = re.compile(
  r"\.\. (code-block|math|note|warning)::|:(math|class|func|meth|attr|mod|data|obj):`"
  r"|doctest:|^\s*={4,}(\s+={4,})+\s*$|\w::$",
  re.M,
)


def test_rst_is_recognised():
  for leftover in [
    ".. code-block:: python",
    "the decay :math:`\\lambda`",
    ".. math::",
    "see :func:`adamw`",
    "... # doctest: +ELLIPSIS",
    "=====  ====",
    "the parameters::",
  ]:
    assert RST.search(leftover), leftover
  assert not RST.search("`a::b` and 'x' == 'y'; optax.MaskedNode()")


def test_no_page_shows_restructured_text_or_doctest_markers(site):
  """Every docstring and page is rendered as Markdown: no rST role, directive, table or doctest flag."""
  found = [
    f"{page}: {m.group(0)!r}"
    for page, text in _pages(site).items()
    for m in RST.finditer(_text(re.sub(r"<(pre|code)[\s>].*?</\1>", "", text, flags=re.S)))
  ]
  found += [
    f"{page}: {m.group(0)!r} in a code block"
    for page, text in _pages(site).items()
    for m in re.finditer(r"doctest:|\.\. code-block::", _text(text))
  ]
  assert not found, "\n".join(found)


def _returned_values(path: str) -> int:
  """How many values the function at `path` (``adamw_jax.name[.method]``) returns: a tuple's length, or 1."""
  obj, name = adamw_jax, "adamw_jax"
  for part in path.split(".")[1:]:
    name = f"{name}.{part}"
    obj = getattr(obj, part) if hasattr(obj, part) else importlib.import_module(name)
  annotation = str(inspect.signature(obj).return_annotation)
  if not annotation.startswith("tuple[") or "..." in annotation:
    return 1
  depth, count = 0, 1
  for char in annotation[len("tuple[") : -1]:
    depth += char in "[("
    depth -= char in "])"
    count += char == "," and depth == 0
  return count


def test_returned_values_are_counted():
  assert _returned_values("adamw_jax.adamw") == 1
  assert _returned_values("adamw_jax.from_torch") == 2
  assert _returned_values("adamw_jax.split_master") == 2
  assert _returned_values("adamw_jax.fused_step") == 2


def test_each_returns_table_has_a_row_per_returned_value(site):
  """A Returns section is not split into a row per docstring line, and a tuple's has one per value."""
  api = (_built(site) / "api" / "index.html").read_text()
  functions = re.split(r'<div class="doc doc-object doc-function">', api)[1:]
  assert len(functions) >= len(adamw_jax.__all__) // 2
  checked = tuples = 0
  for function in functions:
    path = re.search(r'<h\d id="(adamw_jax\.[\w.]+)"', function).group(1)
    returns = re.search(r"Returns:</span></p>\s*<ul>(.*?)</ul>", function, re.S)
    if returns is None:
      continue
    rows = returns.group(1).count("<li")
    assert rows == _returned_values(path), f"{path}: {rows} rows in its Returns table"
    checked += 1
    tuples += rows > 1
  assert checked >= 10
  assert tuples >= 3, "from_torch, split_master and fused_step return tuples"


# The layout (docs/stylesheets/site.css, Material's sizes) in a 1280 px window: the content
# column is the window (or the grid, if narrower) less the navigation sidebar (12.1 rem; the
# page's contents are in it, mkdocs.yml: toc.integrate) and 1.2 rem margins, 1 rem = 20 px;
# code is set at 0.85 x 0.8 rem in a monospace font, about 0.6 em a character; table cells
# are padded 0.9375 em on each side at 0.64 rem (code at 0.8 of that), and their text, code
# included, wraps only between words (site.css), so a table is at least as wide as the
# longest word of each of its columns.
WINDOW = 1280
REM = 20
CODE_CHAR = 0.85 * 0.8 * REM * 0.6
TABLE_CHAR = 0.64 * REM * 0.6  # a generous average for text; a code character is wider
CELL_PADDING = 2 * 0.9375 * 0.64 * REM


def _column_px() -> float:
  css = (ROOT / "docs" / "stylesheets" / "site.css").read_text()
  grid = float(re.search(r"\.md-grid\s*{[^}]*max-width:\s*(\d+)px", css).group(1))
  assert "toc.integrate" in (ROOT / "mkdocs.yml").read_text()
  return min(grid, WINDOW) - 12.1 * REM - 2 * 1.2 * REM


def test_the_layout_is_the_sites():
  """Every page loads site.css, which widens the column and lets what is wider scroll in its own box."""
  css = (ROOT / "docs" / "stylesheets" / "site.css").read_text()
  assert _column_px() >= 900
  assert re.search(r"table:not\(\[class\]\)\s*{[^}]*overflow-x:\s*auto", css)
  assert re.search(r"\.language-text[^{]*pre[^{]*{[^}]*white-space:\s*pre-wrap", css)


def _widest_line(block: str) -> int:
  return max((len(line) for line in _text(block).splitlines()), default=0)


def test_code_blocks_and_tables_fit_the_content_column(site):
  """No code block (other than wrapped text) or table is wider than the content column."""
  column = _column_px()
  too_wide = []
  blocks = 0
  for page, text in _pages(site).items():
    assert "stylesheets/site.css" in text, f"{page} does not load site.css"
    for m in re.finditer(r'<div class="language-(\w+) highlight">(.*?)</pre>', text, re.S):
      blocks += 1
      width = _widest_line(m.group(2)) * CODE_CHAR
      if m.group(1) != "text" and width > column:
        too_wide.append(f"{page}: a {m.group(1)} block {width:.0f} px wide")
    for m in re.finditer(r'<div class="doc-signature highlight">(.*?)</pre>', text, re.S):
      if _widest_line(m.group(1)) * CODE_CHAR > column:
        too_wide.append(f"{page}: a signature {_widest_line(m.group(1))} characters wide")
    for table in re.findall(r"<table>(.*?)</table>", text, re.S):
      widths: dict[int, float] = {}
      for row in re.findall(r"<tr[^>]*>(.*?)</tr>", table, re.S):
        for i, cell in enumerate(re.findall(r"<t[dh][^>]*>(.*?)</t[dh]>", row, re.S)):
          codes = [
            w for c in re.findall(r"<code>(.*?)</code>", cell, re.S) for w in _text(c).split()
          ]
          prose = _text(re.sub(r"<code>.*?</code>", " ", cell, flags=re.S)).split()
          longest = max(
            [len(w) * CODE_CHAR * 0.8 for w in codes] + [len(w) * TABLE_CHAR for w in prose],
            default=0,
          )
          widths[i] = max(widths.get(i, 0.0), longest + CELL_PADDING)
      if sum(widths.values()) > column:
        head = _text(table).split()[:6]
        too_wide.append(
          f"{page}: a table at least {sum(widths.values()):.0f} px wide ({' '.join(head)} ...)"
        )
  assert blocks > 50, f"only {blocks} code blocks found: has the HTML changed?"
  assert not too_wide, f"the content column is {column:.0f} px:\n" + "\n".join(too_wide)
