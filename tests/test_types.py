"""The package type-checks: pyright, configured by pyproject.toml's [tool.pyright], finds no error."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_pyright_finds_no_error():
  # --pythonpath: resolve imports (jax, optax, flax, ...) in this interpreter's environment.
  # PYRIGHT_PYTHON_IGNORE_WARNINGS: no look-up of a newer pyright on PyPI.
  env = {**os.environ, "PYRIGHT_PYTHON_IGNORE_WARNINGS": "1"}
  proc = subprocess.run(
    [sys.executable, "-m", "pyright", "--pythonpath", sys.executable],
    cwd=ROOT,
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stdout[-12000:]
  assert "0 errors" in proc.stdout, proc.stdout[-12000:]
