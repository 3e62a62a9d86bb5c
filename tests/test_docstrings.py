"""Every public function of adamw_jax has a runnable example in its docstring, and it runs."""

from __future__ import annotations

import doctest
import inspect

import pytest

import adamw_jax

FUNCTIONS = [name for name in adamw_jax.__all__ if inspect.isfunction(getattr(adamw_jax, name))]


def test_the_public_functions_are_found():
  assert {"adamw", "adam", "param_groups", "from_torch", "flatten"} <= set(FUNCTIONS)


@pytest.mark.parametrize("name", FUNCTIONS)
def test_docstring_example_runs(name):
  function = getattr(adamw_jax, name)
  tests = doctest.DocTestFinder(recurse=False).find(function, name, globs={})
  assert sum(len(t.examples) for t in tests), f"adamw_jax.{name} has no >>> example"
  report: list[str] = []
  runner = doctest.DocTestRunner()
  for test in tests:
    runner.run(test, out=report.append)
  assert runner.failures == 0, "".join(report)
