"""The accelerator check: fidelity against torch on the same device, step timings, one report.

Run from the repository root:  python -m benchmarks.device   (at most 8 minutes; --quick: under a minute on CPU)

On whatever JAX sees first (GPU, TPU or CPU):

1. **Fidelity.** The configurations of the CPU fidelity table
   (``tests/torch_reference.py``: ``CASES + [CHAIN]``, float32, 200 steps) and
   a bfloat16-params case, run by adamw_jax and by torch.optim on the same
   gradients by ``adamw_jax.equivalence.compare_optimizers``, torch on the same
   device (torch on "cuda" when JAX's backend is a GPU and torch sees CUDA,
   on "cpu" otherwise). Each cell is the max abs difference of the final
   params from torch's single-tensor path (``foreach=False``) and the fraction
   that is bitwise equal; torch's own spread is ``foreach=True`` (CUDA only)
   and ``fused=True`` against the same reference.
2. **Speed.** One float32 AdamW step (lr 1e-3, weight decay 1e-2) of
   adamw_jax per-leaf, adamw_jax flat (``adamw_jax.flatten``),
   ``adamw_jax.fused_step``, ``optax.adamw`` (each
   jitted, params and state donated) and torch fused (on the same device
   only), on the workloads of ``benchmarks/workloads.py``: their CPU sizes on
   a CPU, scaled up to about 1B parameters on an accelerator. ms/step, GB/s at
   28 bytes per parameter (read p, g, m, v; write p, m, v) and the share of
   the device's peak bandwidth, where it is known.
3. **Report.** Writes ``benchmarks/results/device-<platform>.md`` (``--out``
   elsewhere) after each part, so a run that is stopped keeps what it has.

Each part stops starting work when its share of the time budget (``--budget``,
480 s) is spent; a watchdog writes the report and exits if the whole budget
runs out inside one step (a compile, say).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import math
import os
import pathlib
import platform
import statistics
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

from benchmarks import output

BYTES_PER_PARAM = 28  # read p, g, m, v; write p, m, v (float32)
FIDELITY_UNTIL = 0.35  # share of the budget after which the fidelity part starts no new case
SPEED_UNTIL = 0.85  # ... and the speed part no new method
METHODS = (
  "adamw_jax per-leaf",
  "adamw_jax flat",
  "adamw_jax fused_step",
  "optax.adamw",
  "torch fused",
)
TORCH_SPREAD = ("torch foreach", "torch fused")

# Peak memory bandwidth in GB/s by jax's device_kind (the longest matching prefix wins).
PEAK_GBPS = {
  "NVIDIA H200": 4800.0,
  "NVIDIA H100 80GB HBM3": 3350.0,
  "NVIDIA H100 PCIe": 2000.0,
  "NVIDIA A100-SXM4-80GB": 2039.0,
  "NVIDIA A100-SXM4-40GB": 1555.0,
  "NVIDIA B200": 8000.0,
  "TPU v4": 1200.0,
  "TPU v5 lite": 819.0,
  "TPU v5": 2765.0,
  "TPU v6 lite": 1640.0,
}


def peak_gbps(device_kind: str) -> float | None:
  """The known peak bandwidth of a device kind, or None."""
  keys = [k for k in PEAK_GBPS if device_kind.startswith(k)]
  return PEAK_GBPS[max(keys, key=len)] if keys else None


# ----------------------------------------------------------------------------- run state


@dataclasses.dataclass
class Budget:
  """Seconds allowed for the whole run, counted from its creation."""

  total_s: float
  start: float = dataclasses.field(default_factory=time.monotonic)

  def elapsed(self) -> float:
    return time.monotonic() - self.start

  def left(self, share: float = 1.0) -> float:
    """Seconds until `share` of the budget is spent (negative once it is)."""
    return share * self.total_s - self.elapsed()


@dataclasses.dataclass
class Results:
  """Everything the report shows; filled in as the parts run."""

  command: str
  quick: bool
  setup: dict[str, str]
  fidelity_steps: int
  fidelity: list[dict] = dataclasses.field(default_factory=list)
  speed: list[dict] = dataclasses.field(default_factory=list)
  notes: list[str] = dataclasses.field(default_factory=list)
  running: str = ""  # what is being run now, for the watchdog's note
  seconds: float = 0.0


def _setup(torch_device: str) -> dict[str, str]:
  import jax
  import jaxlib
  import optax
  import torch

  device = jax.devices()[0]
  return {
    "device_kind": device.device_kind,
    "platform": device.platform,
    "devices": str(jax.device_count()),
    "torch_device": f"cuda ({torch.cuda.get_device_name()})"
    if torch_device == "cuda"
    else torch_device,
    "python": platform.python_version(),
    "versions": (
      f"jax {jax.__version__}, jaxlib {jaxlib.__version__}, optax {optax.__version__}, "
      f"torch {torch.__version__}" + (f" (CUDA {torch.version.cuda})" if torch.version.cuda else "")
    ),
  }


def torch_device() -> str:
  """Where torch runs: "cuda" next to a JAX GPU when torch sees CUDA, else "cpu"."""
  import jax
  import torch

  return "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"


def attempt(fn: Callable[[], Any]) -> Any:
  """fn()'s result, or a "failed (...)" cell: one broken case or method must not lose the others."""
  try:
    return fn()
  except Exception as e:
    traceback.print_exc(file=sys.stderr)
    first = (str(e).strip().splitlines() or [""])[0][:120]
    return f"failed ({type(e).__name__}: {first})"


# ----------------------------------------------------------------------------- 1. fidelity


def fidelity_cases() -> list[tuple[Any, Any]]:
  """(case, dtype) for each row: the CPU table's configurations in float32, then bfloat16 params."""
  import jax.numpy as jnp
  import numpy as np

  from tests import torch_reference as ref

  rows = [(c, np.complex64 if c.complex else np.float32) for c in [*ref.CASES, ref.CHAIN]]
  return [*rows, (ref.Case("bfloat16 params"), jnp.bfloat16)]


def torch_spread_impls(device: str) -> tuple[str, ...]:
  """torch's other implementations, measured against its single-tensor one, on `device`."""
  return ("foreach", "fused") if device == "cuda" else ("fused",)


def _cell(diff) -> dict[str, float]:
  return {"diff": diff.max_abs, "bitwise": diff.bitwise}


def fidelity_row(case, dtype, steps: int, device: str) -> dict:
  """One configuration: ours and torch's other implementations against torch single-tensor.

  Measured by ``adamw_jax.equivalence.compare_optimizers`` (through
  ``tests/torch_reference.compare``), torch on `device`, JAX on its default device.
  """
  import numpy as np

  from tests import torch_reference as ref

  params, grads = ref.make_problem(dtype, steps)
  row: dict[str, Any] = {"name": case.name, "dtype": np.dtype(dtype).name}
  impls = torch_spread_impls(device)
  report = attempt(lambda: ref.compare(case, params, grads, steps, spread=impls, device=device))
  if isinstance(report, str):
    return {**row, "ours": report, **dict.fromkeys(TORCH_SPREAD, "n/a")}
  row["ours"] = _cell(report.params)
  for name in TORCH_SPREAD:
    impl = name.removeprefix("torch ")
    if impl not in impls:
      row[name] = f"not run on {device}"
    elif impl in report.spread:
      row[name] = _cell(report.spread[impl])
    elif case.complex and impl == "fused":
      row[name] = "n/a (no complex)"
    else:
      row[name] = f"failed ({report.skipped.get(impl, 'not run')[:120]})"
  return row


def run_fidelity(results: Results, device: str, budget: Budget, write: Callable[[], None]) -> None:
  """Part 1: appends a row per configuration until its share of the budget is spent, then writes."""
  for case, dtype in fidelity_cases():
    if budget.left(FIDELITY_UNTIL) <= 0:
      results.notes.append(f"Fidelity stopped at its time share before '{case.name}'.")
      break
    results.running = f"fidelity, {case.name}"
    results.fidelity.append(fidelity_row(case, dtype, results.fidelity_steps, device))
    print(
      f"  fidelity {case.name}: {_fidelity_cells(results.fidelity[-1])}",
      file=sys.stderr,
      flush=True,
    )
  write()


# ----------------------------------------------------------------------------- 2. speed


@dataclasses.dataclass(frozen=True)
class SpeedSettings:
  """Workload sizes and timing length of a tier: "quick", "cpu" or "accelerator"."""

  tier: str  # "quick", "cpu" or "accelerator"
  reps: int  # timed repetitions (the median is reported)
  rep_s: float  # about this many seconds of steps per repetition


def _accelerator_transformer() -> dict:
  """workloads.py's transformer tree at d_model 2048, MLP 8192, vocabulary 32768, 20 blocks (1.07B)."""
  from benchmarks import workloads

  return workloads.transformer(2048, 8192, 32768, 20)


def _accelerator_resnet() -> dict:
  """The params of workloads.py's ResNet-18 at 4x its width (256 channels first, 179M)."""
  import jax
  import jax.numpy as jnp

  from benchmarks import workloads

  variables = jax.eval_shape(
    workloads.ResNet18(width=256).init, jax.random.key(0), jnp.zeros((1, 32, 32, 3))
  )
  return jax.tree.map(lambda s: tuple(s.shape), variables["params"])


def speed_workloads(tier: str) -> list[tuple[str, dict]]:
  """(name, tree of shapes) per workload: workloads.py's (quick or full) on CPU, scaled up elsewhere."""
  from benchmarks import workloads

  if tier != "accelerator":
    return [(wl.name, wl.shapes(tier == "quick")) for wl in workloads.WORKLOADS]
  return [
    ("one 1B-element leaf", {"w": (1 << 30,)}),
    ("transformer-like tree (241 leaves)", _accelerator_transformer()),
    ("2000 leaves x 100k", {f"p{i:05d}": (100_000,) for i in range(2000)}),
    ("Flax ResNet-18 params, 4x wide", _accelerator_resnet()),
  ]


def _is_shape(x) -> bool:
  return isinstance(x, tuple)


def _jax_tree(shapes: dict, seed: int, scale: float):
  """Float32 N(0, scale^2) arrays of the given shapes, drawn on the default device."""
  import jax
  import jax.numpy as jnp

  from benchmarks import workloads

  leaves, treedef = jax.tree.flatten(shapes, is_leaf=_is_shape)
  # One draw for the whole tree, cut into leaves by one program (a draw per leaf compiled
  # once per shape: most of a --quick run).
  n, _ = workloads.count(shapes)
  flat = scale * jax.random.normal(jax.random.key(seed), (n,), jnp.float32)
  return jax.tree.unflatten(treedef, _cutter(tuple(leaves))(flat))


@functools.cache
def _cutter(shapes: tuple[tuple[int, ...], ...]) -> Callable:
  """A jitted function cutting a flat array into consecutive pieces of these shapes."""
  import jax

  sizes = [math.prod(s) for s in shapes]

  def cut(flat):
    starts = itertools.accumulate(sizes, initial=0)
    return [flat[a : a + n].reshape(s) for a, n, s in zip(starts, sizes, shapes)]

  return jax.jit(cut)


_SPEED_NAMES = {"adamw_jax fused_step": "adamw_jax fused"}  # this report's names -> speed.py's


def _jax_runner(method: str, shapes: dict) -> tuple[Callable[[int], float], float]:
  """A function timing k steps of one JAX method, and the seconds its step took to compile.

  The step is ``benchmarks/speed.py``'s (jitted, params and state donated), on
  trees drawn on the default device.
  """
  from benchmarks import speed

  params, grads = _jax_tree(shapes, 0, 1.0), _jax_tree(shapes, 1, 1e-2)
  run, _, compile_s = speed.jax_runner(_SPEED_NAMES.get(method, method), params, grads)
  return run, compile_s


def _torch_runner(shapes: dict, device: str) -> Callable[[int], float]:
  """A function timing k steps of torch.optim.AdamW(fused=True) on `device`."""
  import jax
  import torch

  gen = torch.Generator(device=device).manual_seed(0)
  shapes_list = jax.tree.leaves(shapes, is_leaf=_is_shape)
  params = [torch.nn.Parameter(torch.randn(s, generator=gen, device=device)) for s in shapes_list]
  for p in params:
    p.grad = 1e-2 * torch.randn(p.shape, generator=gen, device=device)
  opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-2, fused=True)
  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

  def run(k: int) -> float:
    sync()
    t0 = time.perf_counter()
    for _ in range(k):
      opt.step()
    sync()
    return (time.perf_counter() - t0) / k

  return run


def median_step_s(run: Callable[[int], float], settings: SpeedSettings) -> float:
  """Median seconds per step over `settings.reps` repetitions of about `settings.rep_s` each."""
  run(1)  # warm-up: first call, torch's state
  k = max(1, min(1000, round(settings.rep_s / max(run(1), 1e-6))))
  return statistics.median(run(k) for _ in range(settings.reps))


def _measure(
  method: str, shapes: dict, device: str, settings: SpeedSettings
) -> tuple[float, float | None]:
  """(seconds per step, compile seconds or None) of one method; its buffers go when it returns."""
  if method == "torch fused":
    return median_step_s(_torch_runner(shapes, device), settings), None
  run, compile_s = _jax_runner(method, shapes)
  return median_step_s(run, settings), compile_s


def _release(device: str) -> None:
  """Hands the memory of the last method back before the next one allocates."""
  import gc

  import torch

  gc.collect()
  if device == "cuda":
    torch.cuda.empty_cache()


def speed_row(name: str, shapes: dict, method: str, device: str, settings: SpeedSettings) -> dict:
  """One workload and method: ms/step, GB/s and (JAX) compile seconds, or why not."""
  import jax

  from benchmarks import workloads

  n, leaves = workloads.count(shapes)
  row: dict[str, Any] = {"workload": name, "params": n, "leaves": leaves, "method": method}
  if method == "torch fused" and {"cuda": "gpu"}.get(device, device) != jax.default_backend():
    return {**row, "skipped": f"n/a (torch runs on {device}, JAX on {jax.default_backend()})"}
  measured = attempt(lambda: _measure(method, shapes, device, settings))
  _release(device)
  if isinstance(measured, str):
    return {**row, "skipped": measured}
  seconds, compile_s = measured
  return {
    **row,
    "ms": 1e3 * seconds,
    "gbps": BYTES_PER_PARAM * n / seconds / 1e9,
    "compile_s": compile_s,
  }


def run_speed(
  results: Results, device: str, settings: SpeedSettings, budget: Budget, write: Callable[[], None]
) -> None:
  """Part 2: appends a row per workload and method until its share of the budget is spent; writes as it goes."""
  for name, shapes in speed_workloads(settings.tier):
    for method in METHODS:
      if budget.left(SPEED_UNTIL) <= 0:
        results.notes.append(f"Speed stopped at its time share before '{name}', {method}.")
        write()
        return
      results.running = f"speed, {name}, {method}"
      results.speed.append(speed_row(name, shapes, method, device, settings))
      print(
        f"  speed {name}, {method}: {_speed_cells(results.speed[-1], None)[0]} ms",
        file=sys.stderr,
        flush=True,
      )
    write()


# ----------------------------------------------------------------------------- 3. report


def _pair(cell: Any) -> str:
  return f"{cell['diff']:.2g} / {cell['bitwise']:.2%}" if isinstance(cell, dict) else str(cell)


def _spread_ratio(row: dict) -> str:
  """Our max difference over torch's own largest spread."""
  spreads = [row[m]["diff"] for m in TORCH_SPREAD if isinstance(row.get(m), dict)]
  if not isinstance(row["ours"], dict) or not spreads:
    return "n/a"
  ours, spread = row["ours"]["diff"], max(spreads)
  if spread > 0:
    return f"{ours / spread:.2f}"
  return "0 (both exact)" if ours == 0 else "inf"


def _fidelity_cells(row: dict) -> list[str]:
  return [
    row["name"],
    row["dtype"],
    _pair(row["ours"]),
    *(_pair(row[m]) for m in TORCH_SPREAD),
    _spread_ratio(row),
  ]


def _speed_cells(row: dict, fused_ms: float | None, peak: float | None = None) -> list[str]:
  """ms/step, GB/s, % of peak, x torch fused, compile s."""
  if "ms" not in row:
    return [row["skipped"], "n/a", "n/a", "n/a", "n/a"]
  compile_s = row["compile_s"]
  return [
    f"{row['ms']:.3f}",
    f"{row['gbps']:.1f}",
    f"{100 * row['gbps'] / peak:.1f} %" if peak else "unknown peak",
    f"{row['ms'] / fused_ms:.2f}x" if fused_ms else "n/a",
    f"{compile_s:.2f}" if compile_s is not None else "-",
  ]


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
  return [
    "| " + " | ".join(header) + " |",
    "|" + "---|" * len(header),
    *("| " + " | ".join(r) + " |" for r in rows),
  ]


def report(results: Results) -> str:
  """The markdown report of what has run so far."""
  s = results.setup
  peak = peak_gbps(s["device_kind"])
  lines = [
    f"# adamw_jax on {s['device_kind']} ({s['platform']})",
    "",
    f"`{results.command}` on {s['device_kind']} (JAX platform {s['platform']}, {s['devices']} device(s); "
    f"the first is used), torch on {s['torch_device']}; {s['versions']}; Python {s['python']}. "
    f"{results.seconds:.0f} s in all.",
    "",
  ]
  if results.quick:
    lines += [
      "**Quick smoke run**: few steps, tiny workloads (the names refer to the full sizes). "
      "These numbers mean nothing.",
      "",
    ]
  lines += [
    f"## Fidelity against torch on the same device ({results.fidelity_steps} steps)",
    "",
    "Each cell: max abs difference of the final params from torch's single-tensor path "
    "(`foreach=False`) on the same device and gradients / fraction bitwise equal. Float32 "
    "(complex64 for 'complex'); the bfloat16 row has bfloat16 params and moments. The last "
    "column is ours over torch's own largest spread (foreach, fused).",
    "",
  ]
  lines += _table(
    ["configuration", "dtype", "adamw_jax", *TORCH_SPREAD, "ours / torch spread"],
    [_fidelity_cells(r) for r in results.fidelity],
  )
  peak_text = f"{peak:,.0f} GB/s" if peak else "unknown"
  lines += [
    "",
    "## One AdamW step (float32)",
    "",
    "Median ms per step; JAX steps are jitted with params and state donated (update + "
    "`optax.apply_updates`, or `adamw_jax.fused_step`), torch's is `optimizer.step()`. GB/s "
    f"counts {BYTES_PER_PARAM} bytes per parameter (read p, g, m, v; write p, m, v). Peak "
    f"bandwidth of this device: {peak_text}.",
    "",
  ]
  fused_ms = {r["workload"]: r.get("ms") for r in results.speed if r["method"] == "torch fused"}
  lines += _table(
    [
      "workload",
      "params",
      "leaves",
      "method",
      "ms/step",
      "GB/s",
      "of peak",
      "x torch fused",
      "compile s",
    ],
    [
      [
        r["workload"],
        f"{r['params']:,}",
        f"{r['leaves']:,}",
        r["method"],
        *_speed_cells(r, fused_ms.get(r["workload"]), peak),
      ]
      for r in results.speed
    ],
  )
  if results.notes:
    lines += ["", "## Notes", "", *(f"- {n}" for n in results.notes)]
  return "\n".join(lines) + "\n"


def _start_watchdog(results: Results, budget: Budget, out: pathlib.Path) -> threading.Timer:
  """At the end of the budget: write what there is and exit, even from inside a compile."""

  def expire() -> None:
    results.notes.append(f"Stopped by the {budget.total_s:.0f} s budget during: {results.running}.")
    results.seconds = budget.elapsed()
    out.write_text(report(results))
    print(f"time budget spent; wrote {out}", file=sys.stderr, flush=True)
    os._exit(3)

  timer = threading.Timer(budget.left(), expire)
  timer.daemon = True
  timer.start()
  return timer


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
    "--quick", action="store_true", help="tiny sizes, few steps (a smoke run; seconds on CPU)"
  )
  parser.add_argument(
    "--out",
    type=pathlib.Path,
    default=None,
    help="report path (default benchmarks/results/device-<platform>.md; --quick: a temporary folder)",
  )
  parser.add_argument(
    "--budget", type=float, default=480.0, help="seconds for the whole run (default 480)"
  )
  args = parser.parse_args(argv)
  budget = Budget(args.budget)
  # JAX and torch share the accelerator: JAX takes memory as it needs it instead of 75 % upfront.
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  import jax

  device = torch_device()
  tier = "quick" if args.quick else ("cpu" if jax.default_backend() == "cpu" else "accelerator")
  settings = {
    "quick": SpeedSettings("quick", 2, 0.002),
    "cpu": SpeedSettings("cpu", 5, 0.1),
    "accelerator": SpeedSettings("accelerator", 5, 0.05),
  }[tier]
  out = (
    args.out or output.out_dir(None, args.quick, "device") / f"device-{jax.default_backend()}.md"
  )
  out.parent.mkdir(parents=True, exist_ok=True)
  command = "python -m benchmarks.device" + (" --quick" if args.quick else "")
  results = Results(command, args.quick, _setup(device), fidelity_steps=20 if args.quick else 200)

  def write() -> None:
    results.seconds = budget.elapsed()
    out.write_text(report(results))

  watchdog = _start_watchdog(results, budget, out)
  print(
    f"fidelity on {results.setup['device_kind']}, torch on {device}", file=sys.stderr, flush=True
  )
  run_fidelity(results, device, budget, write)
  print(f"speed ({tier} sizes)", file=sys.stderr, flush=True)
  run_speed(results, device, settings, budget, write)
  watchdog.cancel()
  write()
  print(report(results))
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
