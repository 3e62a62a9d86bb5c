"""How close to PyTorch? Writes benchmarks/results/fidelity.md (the tables of docs/fidelity.md).

Run from the repository root:  python -m benchmarks.fidelity

Every number is measured against torch.optim.AdamW/Adam with foreach=False
(torch's single-tensor CPU path), on the same gradients, by the public
``adamw_jax.equivalence.compare_optimizers``: the equivalence table
of tests/test_fidelity.py (200 steps) and the reference workload (100,000
params, 1000 steps), in float32 and float64, for adamw_jax, torch's fused
kernel and optax.adamw.
"""

from __future__ import annotations

import platform

import jax
import numpy as np
import optax
import torch

from benchmarks import output
from tests import torch_reference as ref

OUT = output.RESULTS / "fidelity.md"


def _fmt(diff: float, bits: float) -> str:
  return f"{diff:.2g} / {bits:.2%}"


def equivalence_table(steps: int = 200) -> list[str]:
  rows = [
    "| configuration | ours: max abs diff / bitwise | torch fused: max abs diff / bitwise | ratio ours/fused | float64 max rel diff |",
    "|---|---|---|---|---|",
  ]
  for case in [*ref.CASES, ref.CHAIN]:
    dtype32 = np.complex64 if case.complex else np.float32
    params, grads = ref.make_problem(dtype32, steps)
    report = ref.compare(case, params, grads, steps)
    d, b = report.params.max_abs, report.params.bitwise
    if "fused" not in report.spread:  # complex: torch's fused kernel has none
      fused_cell, yard = "n/a (no complex)", float(np.spacing(np.float32(report.params.scale)))
      ratio = f"{d / yard:.2f} (vs 1 ulp)"
    else:
      fd, fb = report.spread["fused"].max_abs, report.spread["fused"].bitwise
      fused_cell = _fmt(fd, fb)
      ratio = f"{d / fd:.2f}" if fd > 0 else ("0 (both exact)" if d == 0 else "inf")
    with jax.enable_x64(True):
      p64, g64 = ref.make_problem(np.complex128 if case.complex else np.float64, steps)
      report64 = ref.compare(case, p64, g64, steps, spread=())
      rel = ref.max_rel_of(leaf.params for leaf in report64.leaves)
    rows.append(f"| {case.name} | {_fmt(d, b)} | {fused_cell} | {ratio} | {rel:.1e} |")
    print(rows[-1], flush=True)
  return rows


def reference_table() -> list[str]:
  rows = ["| float | adamw_jax.adamw | torch fused | optax.adamw |", "|---|---|---|---|"]
  case = ref.Case("reference")
  for dtype in (np.float32, np.float64):
    with jax.enable_x64(dtype == np.float64):
      params, grads, steps = ref.reference_workload()
      params = {k: v.astype(dtype) for k, v in params.items()}
      g = lambda t: {k: v.astype(dtype) for k, v in grads(t).items()}
      ours = ref.compare(case, params, g, steps)
      plain = ref.compare(case, params, g, steps, optax.adamw(1e-3, weight_decay=1e-2), spread=())
      cells = [
        _fmt(d.max_abs, d.bitwise) for d in (ours.params, ours.spread["fused"], plain.params)
      ]
    rows.append(f"| {np.dtype(dtype).name} | " + " | ".join(cells) + " |")
    print(rows[-1], flush=True)
  return rows


def main() -> None:
  header = [
    "# How close to PyTorch?",
    "",
    f"Measured by `python -m benchmarks.fidelity` on {platform.machine()} "
    f"({torch.backends.cpu.get_cpu_capability()}), torch {torch.__version__}, jax {jax.__version__}, "
    f"optax {optax.__version__}. Reference: torch.optim.AdamW/Adam with foreach=False.",
    "",
    "## Reference workload (100,000 params, 1000 steps): max abs diff / bitwise-equal fraction",
    "",
  ]
  body = [
    *reference_table(),
    "",
    "## Equivalence table (float32, 200 steps; last column float64)",
    "",
  ]
  body += equivalence_table()
  OUT.parent.mkdir(parents=True, exist_ok=True)
  OUT.write_text("\n".join(header + body) + "\n")
  print(f"wrote {OUT}")


if __name__ == "__main__":
  main()
