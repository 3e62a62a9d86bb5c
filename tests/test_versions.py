"""The supported range is the tested one: pyproject.toml's floors equal CI's oldest pins.

``.ci/oldest`` installs exactly the versions of ``.ci/oldest.txt`` (the
dependencies) and ``.ci/oldest-build.txt`` (the build requirements) and runs
the bit-faithful tests on them; these checks keep pyproject.toml from claiming
a floor that CI does not run (docs/versions.md).
"""

from __future__ import annotations

import pathlib
import re
import tomllib

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = pathlib.Path(__file__).resolve().parents[1]
CI = ROOT / ".ci"


def _pyproject() -> dict:
  return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _pins(name: str) -> dict[str, str]:
  """``name==version`` lines of a constraints file (comments and blank lines skipped)."""
  pins = {}
  for line in (CI / name).read_text().splitlines():
    line = line.split("#", 1)[0].strip()
    if line:
      req = Requirement(line)
      (spec,) = req.specifier
      assert spec.operator == "==", line
      pins[canonicalize_name(req.name)] = spec.version
  return pins


def _floors(requirements: list[str]) -> dict[str, str]:
  """The floor of each requirement, which must be a single ``>=``."""
  floors = {}
  for line in requirements:
    req = Requirement(line)
    (spec,) = req.specifier  # one bound only: a floor, no cap
    assert spec.operator == ">=", line
    floors[canonicalize_name(req.name)] = spec.version
  return floors


def _same(floors: dict[str, str], pins: dict[str, str]) -> None:
  assert floors.keys() == pins.keys()
  for name, floor in floors.items():
    assert floor == pins[name], (name, floor, pins[name])  # written alike, too
    assert Version(floor) == Version(pins[name])


def test_dependency_floors_are_the_oldest_pins():
  pins = _pins("oldest.txt")
  torch = pins.pop("torch")
  _same(_floors(_pyproject()["project"]["dependencies"]), pins)
  # torch, the tests' reference, is pinned at both ends.
  assert _pyproject()["project"]["optional-dependencies"]["torch"] == [f"torch=={torch}"]


def test_build_floors_are_the_oldest_build_pins():
  _same(_floors(_pyproject()["build-system"]["requires"]), _pins("oldest-build.txt"))
  # The kernel is built against the jaxlib it runs on at the oldest end.
  assert _pins("oldest-build.txt")["jaxlib"] == _pins("oldest.txt")["jaxlib"]


def test_ci_runs_the_oldest_session_on_existing_tests():
  script = (CI / "oldest").read_text()
  tests = re.findall(r"tests/test_\w+\.py", script.split("TESTS=(", 1)[1].split(")", 1)[0])
  assert tests, "no test files in .ci/oldest's TESTS"
  for path in tests:
    assert (ROOT / path).is_file(), path
  assert "bash .ci/oldest" in (CI / "run").read_text()
