"""The environment switches (``adamw_jax/_env.py``): values, refusals, and their one documentation."""

from __future__ import annotations

import jax.numpy as jnp
import pytest

import adamw_jax
from adamw_jax import _env, _hyperparams, _native
from tests import docs_pages


@pytest.mark.parametrize("switch", _env.SWITCHES, ids=lambda s: s.name)
@pytest.mark.parametrize(
  ("value", "expected"),
  [(None, "default"), ("", "default"), (" ", "default"), ("0", False), ("1", True)],
)
def test_values(switch, value, expected, monkeypatch):
  if value is None:
    monkeypatch.delenv(switch.name, raising=False)
  else:
    monkeypatch.setenv(switch.name, value)
  assert _env.on(switch) is (switch.default if expected == "default" else expected)


@pytest.mark.parametrize("switch", _env.SWITCHES, ids=lambda s: s.name)
@pytest.mark.parametrize("value", ["true", "yes", "2", "off", "-1", "01"])
def test_other_values_are_refused_naming_the_variable(switch, value, monkeypatch):
  monkeypatch.setenv(switch.name, value)
  with pytest.raises(ValueError, match=rf"{switch.name}='{value}': expected 1 \(on\) or 0 \(off\)"):
    _env.on(switch)


@pytest.mark.parametrize("switch", _env.SWITCHES, ids=lambda s: s.name)
def test_a_bad_value_stops_the_step_where_it_is_read(switch, monkeypatch):
  """Refused when the step is traced, not turned silently into the default."""
  monkeypatch.setenv(switch.name, "true")
  params = {"w": jnp.ones(3)}
  tx = adamw_jax.adamw(1e-3)
  state = tx.init(params)
  with pytest.raises(ValueError, match=switch.name):
    tx.update(params, state, params)


def test_the_readers_use_the_switches(monkeypatch):
  monkeypatch.setenv(_env.CHECKIFY.name, "1")
  assert _hyperparams.traced_checks()
  monkeypatch.setenv(_env.CHECKIFY.name, "0")
  assert not _hyperparams.traced_checks()
  monkeypatch.setenv(_env.NATIVE.name, "0")
  assert not _native.enabled()
  monkeypatch.setenv(_env.XLA_FLAGS, f"--xla_backend_extra_options={_env.MULTI_OUTPUT_FUSION_FLAG}")
  assert _env.xla_cpu_multi_output_fusion()
  monkeypatch.setenv(_env.XLA_FLAGS, "")
  assert not _env.xla_cpu_multi_output_fusion()


def test_the_api_reference_documents_each_switch_once():
  """The table of docs/api.md lists exactly the variables read, with their defaults."""
  section = docs_pages.page("api.md").read_text().split("## Environment switches", 1)[1]
  rows = [
    [cell.strip() for cell in line.strip("|").split("|")]
    for line in section.split("\n## ", 1)[0].splitlines()
    if line.startswith("| `")
  ]
  documented = {row[0].strip("`"): row[1].strip("`") for row in rows}
  assert documented == {
    **{s.name: str(int(s.default)) for s in _env.SWITCHES},
    _env.XLA_FLAGS: "",
  }
