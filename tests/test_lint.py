"""The code is linted and formatted: ruff, configured by pyproject.toml's [tool.ruff], finds nothing."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
  "args",
  [("check", "--no-cache", "."), ("format", "--check", "--no-cache", ".")],
  ids=["check", "format"],
)
def test_ruff_is_clean(args):
  proc = subprocess.run(
    [sys.executable, "-m", "ruff", *args],
    cwd=ROOT,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, f"ruff {' '.join(args)}:\n{proc.stdout[-12000:]}"
