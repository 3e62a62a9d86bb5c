"""The speed benchmark's smoke run writes a well-formed report (no timing assertions)."""

from __future__ import annotations

import re
import tempfile

import pytest

from benchmarks import output, speed, workloads

_RATIO = r"\d+\.\d\dx"
_NUMBER = r"\d+\.\d+"


def _table_rows(md: str, heading: str) -> list[list[str]]:
  section = md.split(heading, 1)[1].split("\n## ", 1)[0]
  rows = [line for line in section.splitlines() if line.startswith("| ")]
  return [
    [cell.strip() for cell in row.strip("|").split("|")] for row in rows[1:]
  ]  # skip the header


def test_quick_run_writes_tables_and_plot(tmp_path):
  speed.main(["--quick", "--out", str(tmp_path)])
  md = (tmp_path / "speed.md").read_text()
  names = [wl.name for wl in workloads.WORKLOADS]
  for variant in speed.VARIANTS:
    rows = _table_rows(md, f"## Ratio to torch fused, {variant}")
    assert [row[0] for row in rows] == names
    for row in rows:
      assert len(row) == 3 + len(speed.METHODS)
      assert all(re.fullmatch(_RATIO, cell) for cell in row[3:]), row
      assert row[-1] == "1.00x"  # torch fused against itself
  details = _table_rows(md, "## Details")
  assert len(details) == len(speed.VARIANTS) * len(names) * len(speed.METHODS)
  for row in details:
    assert all(re.fullmatch(_NUMBER, cell) for cell in row[3:]), row
    assert float(row[-1]) >= 0.99, row  # never below the params + grads + moments minimum
  compiles = _table_rows(md, "## Compile time")
  assert [row[0] for row in compiles] == ["20", "30"]  # the quick many-leaves workload, then fresh
  assert all(re.fullmatch(r"\d+\.\d\d s", cell) for cell in compiles[0][1:-1]), compiles
  assert compiles[0][-1] == "not run"  # apply_updates alone: in fresh processes only
  assert all(re.fullmatch(r"\d+\.\d\d s", cell) for cell in compiles[1][1:]), compiles
  goals = _table_rows(md, "## Goals")
  assert len(goals) == len(speed.GOALS) + 2 + 2, goals  # + compile times + memory
  assert all(row[-1] in ("yes", "no") for row in goals), goals
  assert (tmp_path / "speed.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_quick_run_never_writes_the_committed_results(tmp_path, monkeypatch):
  monkeypatch.setenv("TMPDIR", str(tmp_path))
  monkeypatch.setattr(tempfile, "tempdir", None)  # read TMPDIR again
  quick = output.out_dir(None, True, "speed")
  assert (
    quick.is_dir() and quick.parent == tmp_path and quick.name.startswith("adamw_jax-speed-quick")
  )
  assert output.out_dir(None, False, "speed") == output.RESULTS
  assert output.out_dir(tmp_path / "a" / "b", True, "speed") == tmp_path / "a" / "b"
  assert (tmp_path / "a" / "b").is_dir()


def test_compile_past_the_timeout_is_reported_as_such():
  results = speed._run_compiles("", ["optax.adamw:2000"], timeout=0.5, startup=0.0)
  assert results == {"optax.adamw:2000": "> 0.5 s"}


def test_memory_benchmark_quick_run(tmp_path):
  """benchmarks.memory --quick: every setting on both tasks; the table, the JSON and the plot."""
  from benchmarks import memory

  rows = memory.main(["--quick", "--out", str(tmp_path)])
  assert [r["setting"] for r in rows] == [s.name for s in memory.SETTINGS] * 2
  by = {(r["task"], r["setting"]): r for r in rows}
  for task in ("digits CNN", "transformer LM"):
    assert by[(task, "fp32")]["state_bytes_per_param"] == pytest.approx(8.0, abs=0.01)  # + count
    assert by[(task, "bf16 plain")]["state_bytes_per_param"] == pytest.approx(4.0, abs=0.01)
    assert by[(task, "fp32 + 8-bit moments")]["state_bytes_per_param"] < 2.6
    four = by[(task, "fp32 + 4-bit moments")]["state_bytes_per_param"]
    assert four < by[(task, "fp32 + 8-bit moments")]["state_bytes_per_param"]
  assert (tmp_path / "memory.png").stat().st_size > 0
  assert "| bf16 + Kahan |" in (tmp_path / "memory.md").read_text()


def test_lowmem_benchmark_quick_run(tmp_path):
  """benchmarks.lowmem --quick: every option per-leaf and fused, and every peer, on both workloads."""
  from benchmarks import lowmem

  rows = lowmem.main(["--quick", "--reps", "1", "--out", str(tmp_path)])
  methods = [f"{o.name}, {k}" for o in lowmem.OPTIONS for k in ("per-leaf", "fused")]
  methods += list(lowmem.PEERS)
  for workload in dict.fromkeys(r["workload"] for r in rows):
    mine = {r["method"]: r for r in rows if r["workload"] == workload}
    assert list(mine) == methods
    measured = {m: r for m, r in mine.items() if "skipped" not in r}
    assert set(mine) - set(measured) <= {m for m in methods if "remainder" in m}, mine
    assert measured["torch fused fp32"]["ratio"] == 1.0
    for r in measured.values():
      assert r["ms"] > 0 and r["bytes_per_param"] > 0 and r["gbps"] > 0
  md = (tmp_path / "lowmem.md").read_text()
  assert md.count("| fp32, fused |") == 2
