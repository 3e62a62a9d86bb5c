"""The accelerator check's quick run on CPU writes every table with numbers (no timing assertions)."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import jax

from benchmarks import device, output, workloads

ROOT = pathlib.Path(__file__).resolve().parent.parent
_PAIR = r"(\d+(\.\d+)?(e[+-]\d+)?) / \d+\.\d\d%"  # max abs diff / bitwise fraction
_NUMBER = r"\d+\.\d+"


def _table_rows(md: str, heading: str) -> list[list[str]]:
  section = md.split(heading, 1)[1].split("\n## ", 1)[0]
  rows = [line for line in section.splitlines() if line.startswith("| ")]
  return [
    [cell.strip() for cell in row.strip("|").split("|")] for row in rows[1:]
  ]  # skip the header


def _quick_run(tmp_path: pathlib.Path) -> str:
  """As a curious user runs it, without --out: the report goes to a folder of its own."""
  env = {
    **os.environ,
    "JAX_PLATFORMS": "cpu",
    "CUDA_VISIBLE_DEVICES": "",
    "PYTHONPATH": str(ROOT),
    "TMPDIR": str(tmp_path),
  }
  committed = {p: p.stat().st_mtime_ns for p in output.RESULTS.iterdir()}
  proc = subprocess.run(
    [sys.executable, "-m", "benchmarks.device", "--quick"],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-4000:]
  out = pathlib.Path(proc.stdout.strip().splitlines()[-1].removeprefix("wrote "))
  assert out.parent.parent == tmp_path and out.name == "device-cpu.md", out  # not results/
  assert {p: p.stat().st_mtime_ns for p in output.RESULTS.iterdir()} == committed
  return out.read_text()


def test_quick_run_writes_every_table(tmp_path):
  md = _quick_run(tmp_path)
  assert md.startswith("# adamw_jax on cpu (cpu)")
  for name in ("jax", "jaxlib", "torch"):
    assert re.search(rf"\b{name} \d+\.\d+", md), name
  assert "failed" not in md

  fidelity = _table_rows(md, "## Fidelity against torch")
  assert [row[0] for row in fidelity] == [c.name for c, _ in device.fidelity_cases()]
  for name, _dtype, ours, foreach, fused, ratio in fidelity:
    assert re.fullmatch(_PAIR, ours), (name, ours)
    assert foreach == "not run on cpu"  # torch's foreach path is CUDA's
    if name == "complex":
      assert fused == "n/a (no complex)"
    else:
      assert re.fullmatch(_PAIR, fused), (name, fused)
      assert re.fullmatch(r"\d+\.\d\d|0 \(both exact\)|inf", ratio), (name, ratio)
  assert fidelity[-1][:2] == ["bfloat16 params", "bfloat16"]

  speed = _table_rows(md, "## One AdamW step")
  expected = [(wl.name, m) for wl in workloads.WORKLOADS for m in device.METHODS]
  assert [(row[0], row[3]) for row in speed] == expected
  for row in speed:
    ms, gbps, of_peak, ratio, compile_s = row[4:]
    assert re.fullmatch(_NUMBER, ms) and re.fullmatch(_NUMBER, gbps), row
    assert float(ms) > 0 and of_peak == "unknown peak", row
    assert re.fullmatch(r"\d+\.\d\dx", ratio), row
    assert re.fullmatch(_NUMBER, compile_s) if row[3] != "torch fused" else compile_s == "-", row


def test_fused_step_is_timed():
  """``adamw_jax.fused_step`` rows are timed through its documented signature."""
  assert "adamw_jax fused_step" in device.METHODS
  settings = device.SpeedSettings("quick", reps=2, rep_s=0.001)
  row = device.speed_row("tiny", {"w": (64,), "b": (3,)}, "adamw_jax fused_step", "cpu", settings)
  assert row["ms"] > 0 and row["gbps"] > 0 and row["compile_s"] > 0, row


def test_spent_budget_stops_each_part_with_a_note(tmp_path):
  results = device.Results("test", True, device._setup("cpu"), fidelity_steps=2)
  spent = device.Budget(0.0)
  writes = []
  device.run_fidelity(results, "cpu", spent, lambda: writes.append("fidelity"))
  device.run_speed(
    results, "cpu", device.SpeedSettings("quick", 1, 0.001), spent, lambda: writes.append("speed")
  )
  assert results.fidelity == [] and results.speed == []
  assert writes == ["fidelity", "speed"]
  assert any("Fidelity stopped" in n for n in results.notes)
  assert any("Speed stopped" in n for n in results.notes)
  md = device.report(results)
  assert "## Notes" in md and jax.devices()[0].device_kind in md
