"""The documentation: every Python block of README.md and docs/*.md runs, the site builds, the versions agree.

Each page's ``python`` blocks run in order in one namespace (in a temporary
directory); a ``text`` block right after one is its exact output. Blocks
marked ``<!-- docs-test: 8-devices -->`` are run by tests/sharded_checks.py in
its 8-device subprocess, and only there; blocks marked
``<!-- docs-test: 2-processes -->`` by tests/multiprocess_checks.py in each of
its 2 ``jax.distributed`` processes, and only there. The site is built with
``python -m mkdocs build --strict``, so a broken link, anchor or API
reference fails.
"""

from __future__ import annotations

import contextlib
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

PAGES_WITH_CODE = [
  p for p in docs_pages.pages() if any(b.lang == "python" for b in docs_pages.blocks(p))
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
  assert {p.name for p in PAGES_WITH_CODE} >= {
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
    'pip install -e ".[test]" && python -m pytest -q',
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


def test_site_builds_strict(tmp_path):
  """mkdocs build --strict: no warning (broken links, anchors, docstrings); the site shows the version."""
  env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
  proc = subprocess.run(
    [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert "WARNING" not in proc.stderr, proc.stderr
  home = (tmp_path / "site" / "index.html").read_text()
  assert f"<title>adamw_jax {adamw_jax.__version__}</title>" in home
  api = (tmp_path / "site" / "api" / "index.html").read_text()
  for name in adamw_jax.__all__:
    assert f'id="adamw_jax.{name}"' in api, name
