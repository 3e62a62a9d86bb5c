"""Scale-out with jax.sharding: FSDP, ZeRO-1 and data parallel on 8 virtual CPU devices.

The device count is fixed when jax initialises its backend, so the checks
(tests/sharded_checks.py) run in one subprocess started with
``XLA_FLAGS=--xla_force_host_platform_device_count=8``; it reports every check
as JSON and each check is one test here, so a failure is named. If the
subprocess fails, every test fails.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

from tests import sharded_checks

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def results() -> dict:
  env = dict(os.environ)
  env["XLA_FLAGS"] = (
    env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={sharded_checks.N}"
  ).strip()
  env["JAX_PLATFORMS"] = "cpu"
  proc = subprocess.run(
    [sys.executable, "-m", "tests.sharded_checks"],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=900,
    check=False,
  )
  lines = [line for line in proc.stdout.splitlines() if line.startswith(sharded_checks.MARKER)]
  if proc.returncode != 0 or len(lines) != 1:
    pytest.fail(
      f"the sharding subprocess failed (exit {proc.returncode}):\n"
      f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    )
  return json.loads(lines[0][len(sharded_checks.MARKER) :])


def test_every_check_ran(results):
  assert set(results) == set(sharded_checks.CHECKS)


@pytest.mark.parametrize("name", list(sharded_checks.CHECKS))
def test_sharded(results, name):
  result = results.get(name)
  assert result is not None, f"{name} did not report"
  assert result["ok"], result["detail"]


def test_checks_cover_the_issue():
  """The table has AMSGrad, masks, a bf16 leaf and a global reduction; every layout is checked.

  8-bit moments: whole-block shards (eager and jit, both mesh kinds), block-splitting
  shardings refused where init sees them, and computed right under jit where it cannot.
  """
  names = set(sharded_checks.CHECKS)
  for family in (
    "fsdp_init",
    "fsdp_step",
    "fsdp_update_hlo",
    "zero1",
    "data_parallel",
    "lowmem_8bit_sharded",
    "lowmem_8bit_split_refused",
    "lowmem_8bit_split_auto_jit",
  ):
    assert any(n.startswith(family + "[") for n in names), family
  assert {
    "fsdp_init[amsgrad_bf16_leaf-auto-jit]",
    "fsdp_init[amsgrad_bf16_leaf-explicit-jit]",
    "fsdp_init[amsgrad_bf16_leaf-auto-eager]",
    "fsdp_step[decay_mask_schedule]",
    "fsdp_step[amsgrad_bf16_leaf]",
    "fsdp_update_hlo[clip_by_global_norm-auto]",
    "docs_scaling_out_example",
  } <= names
  assert any(c.bf16_leaf for c in sharded_checks.CONFIGS.values())
  assert any(c.global_reduction for c in sharded_checks.CONFIGS.values())


def test_collective_detection():
  """The HLO scan finds collectives in instruction position, and nothing in a plain update."""
  hlo = (
    "%all-reduce.3 = f32[] all-reduce(f32[] %x), replica_groups={}, to_apply=%sum\n"
    "%ag = f32[8]{0} all-gather-start(f32[1]{0} %p), dimensions={0}\n"
    '%m = f32[4]{0} multiply(f32[4]{0} %a, f32[4]{0} %b), metadata={op_name="all-gather"}\n'
  )
  assert sharded_checks.collectives_in(hlo) == ["all-gather", "all-reduce"]
  assert sharded_checks.collectives_in(hlo.splitlines()[2]) == []
