"""How fast is one AdamW step? adamw_jax (per-leaf and flat) next to optax.adamw and torch.

Run from the repository root:  python -m benchmarks.speed   (about 10 minutes; --quick: seconds)

Times, side by side in one process with interleaved repetitions and medians,
one float32 AdamW step (lr 1e-3, weight decay 1e-2) of

- ``adamw_jax.adamw`` on the model's tree (per-leaf: the default, with the
  native CPU kernel; and with ``ADAMW_JAX_NATIVE=0``, the pure-JAX kernel), on
  one flat buffer (``adamw_jax.flatten``), and ``optax.adamw``: each step is one
  jitted ``update`` + ``optax.apply_updates`` with the parameters and optimizer
  state donated and fixed random gradients;
- ``adamw_jax.fused_step`` (update and apply in one native pass), jitted and
  donated the same way;
- ``torch.optim.AdamW(foreach=True)`` and ``(fused=True)``: ``optimizer.step()``
  with ``.grad`` set,

on the workloads of ``benchmarks/workloads.py`` (after setting every method up,
the live objects are frozen out of Python's garbage collector, ``gc.freeze``:
otherwise each JAX step of the 2000-leaf tree rescans every method's 8,000
arrays), each timed repetition after a 20 ms pause (torch's OpenMP threads
spin for milliseconds after a step and would slow whatever runs next). It
reports ms/step, the
effective bandwidth (28 bytes per parameter: read p, g, m, v and write p, m, v),
the ratio to torch fused and the peak memory over the params + grads + moments
minimum; then the compile time of the jitted step for 2,000 leaves (the
2000 x 1k workload) and 10,000 leaves (a fresh process each, with a timeout).
Everything runs twice, in fresh processes: with XLA's default flags and with
the opt-in ``XLA_FLAGS=--xla_backend_extra_options=xla_cpu_use_multi_output_fusion``.
Writes ``benchmarks/results/speed.md`` and ``speed.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import select
import subprocess
import sys
import time
from typing import Any

from benchmarks import output, timing

FLAG = "--xla_backend_extra_options=xla_cpu_use_multi_output_fusion"
VARIANTS = {"default": "", "multi-output fusion": FLAG}
METHODS = (
  "adamw_jax per-leaf",
  "adamw_jax fused",
  "adamw_jax per-leaf, pure JAX",
  "adamw_jax flat",
  "optax.adamw",
  "torch foreach",
  "torch fused",
)
JAX_METHODS = METHODS[:5]
PURE = "adamw_jax per-leaf, pure JAX"  # ADAMW_JAX_NATIVE=0 while it is traced
BYTES_PER_PARAM = 28  # read p, g, m, v; write p, m, v (float32)
MINIMUM_PER_PARAM = 16  # p, g, m, v resident


# ----------------------------------------------------------------------------- workers (subprocesses)


def _jax_tx(method: str):
  import optax

  import adamw_jax

  if method == "optax.adamw":
    return optax.adamw(1e-3, weight_decay=1e-2)
  return adamw_jax.adamw(1e-3, weight_decay=1e-2)


def _jax_setup(method: str, params_np: Any, grads_np: Any):
  """The donating jitted step and its initial (params, state, grads) for one JAX method."""
  import jax
  import optax

  import adamw_jax

  tx = _jax_tx(method)
  params, grads = jax.device_put(params_np), jax.device_put(grads_np)
  if method == "adamw_jax flat":
    params = adamw_jax.flatten(params)
    grads = params.pack(grads)
  state = tx.init(params)

  def step(p, s, g):
    if method == "adamw_jax fused":
      return adamw_jax.fused_step(tx, g, s, p)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  return jax.jit(step, donate_argnums=(0, 1)), params, state, grads


def _compile(method: str, step, *args):
  """Traces, lowers and compiles `step`; the pure-JAX column with the native kernel off."""
  from adamw_jax import _env

  saved = os.environ.get(_env.NATIVE.name)
  os.environ[_env.NATIVE.name] = "0" if method == PURE else "1"
  try:
    return step.lower(*args).compile()
  finally:
    os.environ.pop(_env.NATIVE.name)
    if saved is not None:
      os.environ[_env.NATIVE.name] = saved


def jax_runner(method: str, params_np: Any, grads_np: Any):
  """(run(k) -> seconds per step, peak memory, compile seconds) of one JAX method; also ``benchmarks.device``'s."""

  step, params, state, grads = _jax_setup(method, params_np, grads_np)
  t0 = time.perf_counter()
  compiled = _compile(method, step, params, state, grads)
  compile_s = time.perf_counter() - t0
  stats = compiled.memory_analysis()
  peak = getattr(stats, "peak_memory_in_bytes", 0) or (
    stats.argument_size_in_bytes
    + stats.output_size_in_bytes
    - stats.alias_size_in_bytes
    + stats.temp_size_in_bytes
  )
  run = timing.donated_step(compiled, params, state, grads)
  return run, peak, compile_s


def _torch_runner(method: str, params_np: Any, grads_np: Any):
  import jax
  import torch
  from torch.profiler import ProfilerActivity, profile

  params = [torch.nn.Parameter(torch.from_numpy(p.copy())) for p in jax.tree.leaves(params_np)]
  for p, g in zip(params, jax.tree.leaves(grads_np)):
    p.grad = torch.from_numpy(g)  # shared, read-only
  kind = {"torch foreach": {"foreach": True}, "torch fused": {"fused": True}}[method]
  opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-2, **kind)
  opt.step()  # creates the state
  with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
    opt.step()
  allocated = sum(max(0, e.self_cpu_memory_usage) for e in prof.key_averages())
  n = sum(p.numel() for p in params)

  def run(k: int) -> float:
    t0 = time.perf_counter()
    for _ in range(k):
      opt.step()
    return (time.perf_counter() - t0) / k

  return run, MINIMUM_PER_PARAM * n + allocated, None


def _time_workload(shapes: dict, reps: int, target_s: float) -> dict:
  import numpy as np

  from benchmarks import workloads

  n, _ = workloads.count(shapes)
  params_np = workloads.arrays(shapes, seed=0)
  grads_np = workloads.arrays(shapes, seed=1, scale=1e-2)
  runners, peaks, compile_s, skipped = {}, {}, {}, {}
  for method in METHODS:
    make = jax_runner if method in JAX_METHODS else _torch_runner
    try:
      runners[method], peaks[method], compile_s[method] = make(method, params_np, grads_np)
    except AttributeError as e:  # adamw_jax.flatten not available
      skipped[method] = str(e)
  times = timing.interleaved(runners, reps, target_s)
  del runners
  out = {}
  fused = float(np.median(times["torch fused"]))
  for method in METHODS:
    if method in skipped:
      out[method] = {"skipped": skipped[method]}
      continue
    t = float(np.median(times[method]))
    out[method] = {
      "ms": t * 1e3,
      "gbps": BYTES_PER_PARAM * n / t / 1e9,
      "ratio": t / fused,
      "memory": peaks[method] / (MINIMUM_PER_PARAM * n),
      "compile_s": compile_s[method],
    }
  return out


def _timings_worker(quick: bool, reps: int) -> dict:
  import jax
  import optax
  import torch

  from benchmarks import workloads

  rows = []
  for wl in workloads.WORKLOADS:
    shapes = wl.shapes(quick)
    n, leaves = workloads.count(shapes)
    rows.append(
      {
        "name": wl.name,
        "params": n,
        "leaves": leaves,
        "results": _time_workload(shapes, reps, 0.005 if quick else 0.04),
      }
    )
    print(
      f"  {wl.name}: "
      + ", ".join(f"{m} {r['ratio']:.2f}x" for m, r in rows[-1]["results"].items() if "ratio" in r),
      file=sys.stderr,
      flush=True,
    )
  return {
    "versions": f"jax {jax.__version__}, optax {optax.__version__}, torch {torch.__version__}",
    "torch_threads": torch.get_num_threads(),
    "reps": reps,
    "workloads": rows,
  }


APPLY_ONLY = "floor: apply_updates + 1 op per moment"  # what any optax AdamW step compiles at least


def _compile_worker(jobs: list[str]) -> None:
  """Prints one JSON line per ``method:leaves`` job: seconds to trace, lower and compile the step."""
  import jax
  import numpy as np
  import optax

  for job in jobs:
    method, leaves = job.rsplit(":", 1)
    tree = {f"p{i:05d}": np.zeros(1000, np.float32) for i in range(int(leaves))}
    try:
      if method == APPLY_ONLY:

        def floor(p, s, g):  # two state leaves per parameter, in and out, and apply_updates
          return optax.apply_updates(p, g), jax.tree.map(lambda x: x + 1, s)

        step = jax.jit(floor, donate_argnums=(0, 1))
        args: tuple = (jax.device_put(tree), jax.device_put((tree, tree)), jax.device_put(tree))
      else:
        step, *args = _jax_setup(method, tree, tree)
      t0 = time.perf_counter()
      _compile(method, step, *args)
      result: Any = time.perf_counter() - t0
    except AttributeError as e:
      result = f"n/a ({e})"
    print(json.dumps({"job": job, "seconds": result}), flush=True)


# ----------------------------------------------------------------------------- orchestration


def _env(flags: str) -> dict:
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  if flags:
    env["XLA_FLAGS"] = flags
  return env


def _worker_cmd(*args: str) -> list[str]:
  return [sys.executable, "-m", "benchmarks.speed", "--worker", *args]


def _start_timings(flags: str, quick: bool, reps: int) -> subprocess.Popen:
  cmd = _worker_cmd("timings", "--reps", str(reps), *(["--quick"] if quick else []))
  root = pathlib.Path(__file__).resolve().parent.parent
  return subprocess.Popen(cmd, env=_env(flags), cwd=root, stdout=subprocess.PIPE, text=True)


def _finish_timings(proc: subprocess.Popen) -> dict:
  out, _ = proc.communicate()
  if proc.returncode:
    raise RuntimeError(f"timing worker failed with exit code {proc.returncode}")
  return json.loads(out.strip().splitlines()[-1])


def _run_compiles(
  flags: str, jobs: list[str], timeout: float, startup: float = 15.0
) -> dict[str, Any]:
  """Compile times by job; a job that runs past `timeout` is killed and reported as "> timeout"."""
  root = pathlib.Path(__file__).resolve().parent.parent
  results: dict[str, Any] = {}
  pending = list(jobs)
  while pending:
    proc = subprocess.Popen(
      _worker_cmd("compile", *pending), env=_env(flags), cwd=root, stdout=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + timeout + startup  # + the imports of a fresh process
    while pending:
      ready, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
      line = proc.stdout.readline() if ready else ""
      if not line:
        proc.kill()
        proc.wait()
        if ready:  # the worker died
          raise RuntimeError(f"compile worker failed on {pending[0]}")
        results[pending.pop(0)] = f"> {timeout:g} s"
        break
      record = json.loads(line)
      results[record["job"]] = record["seconds"]
      pending.remove(record["job"])
      deadline = time.monotonic() + timeout
    else:
      proc.wait()
  return results


def _machine() -> str:
  model = platform.processor() or platform.machine()
  try:
    out = subprocess.run(["lscpu"], stdout=subprocess.PIPE, text=True, check=True).stdout
    info = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    model = info.get("Model name", model).strip()
  except (OSError, subprocess.CalledProcessError):
    pass
  return f"{model}, {os.cpu_count()} cores, {platform.machine()}"


def _fmt_seconds(value: Any) -> str:
  return f"{value:.2f} s" if isinstance(value, float) else str(value)


def report(data: dict) -> str:
  """The markdown report of one run (`data` as collected by :func:`collect`)."""
  lines = [
    "# One AdamW step: adamw_jax, optax and torch on CPU",
    "",
    f"`{data['command']}` on {data['machine']}; {data['versions']} "
    f"(torch threads: {data['torch_threads']}). Float32, medians of {data['reps']} "
    "interleaved repetitions (a random order each) in one process; JAX steps are one jitted update + "
    "`optax.apply_updates` with donated params and state. GB/s counts 28 bytes per "
    "parameter; memory is the peak over the params + grads + moments minimum "
    "(JAX: `compiled.memory_analysis()`; torch: that minimum plus every byte "
    "allocated inside one `step()`, from `torch.profiler`).",
    "",
  ]
  if data["quick"]:
    lines += [
      "**Quick smoke run**: tiny workloads (the names refer to the full sizes), two "
      "repetitions, processes running concurrently. These numbers mean nothing.",
      "",
    ]
  methods = METHODS
  lines += [
    "## Goals (default XLA flags; per workload, in the order of the tables below)",
    "",
    *goals(data),
    "",
  ]
  for variant, measured in data["timings"].items():
    flags = VARIANTS[variant]
    lines += [
      f"## Ratio to torch fused, {variant}"
      + (f" (`XLA_FLAGS={flags}`)" if flags else " XLA flags"),
      "",
      "| workload | params | leaves | " + " | ".join(methods) + " |",
      "|---|---|---|" + "---|" * len(methods),
    ]
    for wl in measured["workloads"]:
      cells = [
        f"{r['ratio']:.2f}x" if "ratio" in r else "n/a" for r in (wl["results"][m] for m in methods)
      ]
      lines.append(
        f"| {wl['name']} | {wl['params']:,} | {wl['leaves']:,} | " + " | ".join(cells) + " |"
      )
    lines.append("")
  lines += [
    "## Details",
    "",
    "| flags | workload | method | ms/step | GB/s | × torch fused | peak memory / minimum |",
    "|---|---|---|---|---|---|---|",
  ]
  for variant, measured in data["timings"].items():
    for wl in measured["workloads"]:
      for m in methods:
        r = wl["results"][m]
        if "ms" not in r:
          lines.append(f"| {variant} | {wl['name']} | {m} | n/a | n/a | n/a | n/a |")
          continue
        lines.append(
          f"| {variant} | {wl['name']} | {m} | {r['ms']:.2f} | {r['gbps']:.1f} | "
          f"{r['ratio']:.2f} | {r['memory']:.2f} |"
        )
  many = data["timings"]["default"]["workloads"][2]
  lines += [
    "",
    "## Compile time of the jitted step, default flags",
    "",
    "Seconds to trace, lower and compile the donating jitted step (update + apply_updates) "
    f"for a dict of float32 leaves. {many['leaves']:,} leaves: the '{many['name']}' "
    "workload, measured while setting up its timing. More leaves (1,000 elements each): "
    "a fresh process per measurement; one still running after the timeout is stopped "
    'and reported as "> timeout". '
    "The last column is the floor of any AdamW step under optax's contract: "
    "`optax.apply_updates` and one elementwise operation per moment (two state "
    "leaves per parameter), jitted with params and state donated.",
    "",
    "| leaves | " + " | ".join((*JAX_METHODS, APPLY_ONLY)) + " |",
    "|---|" + "---|" * (len(JAX_METHODS) + 1),
  ]
  cells = [_fmt_seconds(many["results"][m].get("compile_s", "n/a")) for m in JAX_METHODS]
  lines.append(f"| {many['leaves']:,} | " + " | ".join(cells) + " | not run |")
  for leaves in data["compile_leaves"]:
    cells = [
      _fmt_seconds(data["compiles"].get(f"{m}:{leaves}", "not run"))
      for m in (*JAX_METHODS, APPLY_ONLY)
    ]
    lines.append(f"| {leaves:,} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


GOALS = (  # (goal, method, peer, limit) on the ratio of medians, every workload
  (
    "per-leaf adamw (update + apply_updates) <= 0.95x optax.adamw",
    "adamw_jax per-leaf",
    "optax.adamw",
    0.95,
  ),
  ("fused step <= 1.0x torch fused", "adamw_jax fused", "torch fused", 1.0),
  ("fused step <= 0.9x torch fused (the real goal)", "adamw_jax fused", "torch fused", 0.9),
)


def goals(data: dict) -> list[str]:
  """The issue's goals, met or not, with the numbers of this run (default flags)."""
  wls = data["timings"]["default"]["workloads"]
  rows = ["| goal | measured | met |", "|---|---|---|"]
  for goal, method, peer, limit in GOALS:
    ratios = [wl["results"][method]["ms"] / wl["results"][peer]["ms"] for wl in wls]
    rows.append(
      f"| {goal} | "
      + ", ".join(f"{r:.2f}x" for r in ratios)
      + f" | {'yes' if max(ratios) <= limit else 'no'} |"
    )
  many = wls[2]  # the many-leaves workload
  ours, theirs = (many["results"][m]["compile_s"] for m in ("adamw_jax per-leaf", "optax.adamw"))
  rows.append(
    f"| per-leaf compile, {many['leaves']:,} leaves <= 1/10 of optax's | {ours:.2f} s vs {theirs:.2f} s "
    f"({ours / theirs:.2f}) | {'yes' if ours <= theirs / 10 else 'no'} |"
  )
  for leaves in data["compile_leaves"]:
    got = data["compiles"].get(f"adamw_jax per-leaf:{leaves}")
    met = "yes" if isinstance(got, float) and got <= 5.0 else "no"
    rows.append(
      f"| per-leaf compile, {leaves:,} leaves <= 5 s | {_fmt_seconds(got)} (optax: "
      f"{_fmt_seconds(data['compiles'].get(f'optax.adamw:{leaves}'))}) | {met} |"
    )
  for method in ("adamw_jax per-leaf", "adamw_jax fused"):
    mem = [wl["results"][method]["memory"] for wl in wls]
    rows.append(
      f"| {method}: memory with donation <= 1.1x the minimum | "
      + ", ".join(f"{m:.2f}" for m in mem)
      + f" | {'yes' if max(mem) <= 1.1 else 'no'} |"
    )
  return rows


def plot(data: dict, path: pathlib.Path) -> None:
  """Grouped bars of the ratio to torch fused, one panel per flag setting, one above the other.

  9 inches wide at 110 dpi, about the docs' content column, so its labels are read at size.
  """
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import numpy as np

  variants = list(data["timings"])
  fig, axes = plt.subplots(
    len(variants), 1, figsize=(9, 3.6 * len(variants) + 0.8), sharey=True, squeeze=False
  )
  shown = [m for m in METHODS if m != "torch fused"]
  for ax, variant in zip(axes[:, 0], variants):
    wls = data["timings"][variant]["workloads"]
    x = np.arange(len(wls))
    width = 0.8 / len(shown)
    for i, m in enumerate(shown):
      ratios = [wl["results"][m].get("ratio", np.nan) for wl in wls]
      ax.bar(x + (i - (len(shown) - 1) / 2) * width, ratios, width, label=m)
    ax.axhline(1.0, color="k", lw=1, ls="--", label="torch fused = 1")
    ax.set_yscale("log")
    ax.set_xticks(x, [wl["name"].replace(" (", "\n(") for wl in wls], fontsize=8)
    ax.set_title(f"{variant} XLA flags" if variant == "default" else f"XLA {variant} (opt-in)")
    ax.set_ylabel("time / torch fused (lower is faster)")
    ax.grid(axis="y", which="both", alpha=0.3)
  handles, labels = axes[0][0].get_legend_handles_labels()
  fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8)
  fig.suptitle(f"One AdamW step, float32 — {data['machine']}", fontsize=10)
  fig.tight_layout(rect=(0, 0.07, 1, 1))
  fig.savefig(path, dpi=110)
  plt.close(fig)


def collect(quick: bool, reps: int, compile_leaves: list[int], timeout: float) -> dict:
  data: dict[str, Any] = {
    "command": "python -m benchmarks.speed" + (" --quick" if quick else ""),
    "quick": quick,
    "machine": _machine(),
    "compile_leaves": compile_leaves,
    "timings": {},
    "compiles": {},
  }
  # Sequential, except in a quick (smoke) run, whose timings mean nothing anyway.
  procs = {}
  for variant, flags in VARIANTS.items():
    print(f"{variant}: timing steps", file=sys.stderr, flush=True)
    procs[variant] = _start_timings(flags, quick, reps)
    if not quick:
      data["timings"][variant] = _finish_timings(procs[variant])
  # Compile times with the default flags only (minutes per variant for the per-leaf updates).
  print("compile times", file=sys.stderr, flush=True)
  jobs = [f"{m}:{n}" for n in compile_leaves for m in (*JAX_METHODS, APPLY_ONLY)]
  data["compiles"] = _run_compiles("", jobs, timeout)
  for variant, proc in procs.items():
    if variant not in data["timings"]:
      data["timings"][variant] = _finish_timings(proc)
  first = data["timings"]["default"]
  data.update(versions=first["versions"], torch_threads=first["torch_threads"], reps=first["reps"])
  return data


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
    "--quick", action="store_true", help="tiny workloads and few repetitions (smoke run)"
  )
  parser.add_argument(
    "--reps", type=int, default=None, help="interleaved repetitions (default 25; quick 2)"
  )
  parser.add_argument(
    "--compile-timeout",
    type=float,
    default=45.0,
    help="seconds before a compile-time measurement is reported as '> N s'",
  )
  parser.add_argument(
    "--out",
    type=pathlib.Path,
    help="directory for speed.md and speed.png (default benchmarks/results/; --quick: a temporary one)",
  )
  parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  reps = args.reps or (2 if args.quick else 25)
  if args.worker and args.worker[0] == "timings":
    print(json.dumps(_timings_worker(args.quick, reps)))
    return
  if args.worker and args.worker[0] == "compile":
    _compile_worker(args.worker[1:])
    return
  leaves = [30] if args.quick else [10_000]
  data = collect(args.quick, reps, leaves, args.compile_timeout)
  out = output.out_dir(args.out, args.quick, "speed")
  (out / "speed.md").write_text(report(data))
  (out / "speed.json").write_text(json.dumps(data, indent=1))
  plot(data, out / "speed.png")
  print(report(data))
  print(f"wrote {out / 'speed.md'} and speed.png")


if __name__ == "__main__":
  main()
