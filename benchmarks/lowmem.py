"""Low-memory AdamW's step on the CPU: each option next to torch's fp32 step and the peers.

Run from the repository root:  python -m benchmarks.lowmem   (a few minutes; --quick: seconds)

In one process, interleaved repetitions in a random order with pauses
(``benchmarks/timing.py``), medians: one AdamW step (lr 1e-3, weight decay
1e-2, fixed random gradients) of each low-memory option of ``adamw_jax.adamw``,
per-leaf (jitted ``update`` + ``optax.apply_updates``) and fused
(``adamw_jax.fused_step``), parameters and state donated; next to torch's fused
fp32 ``AdamW`` (the reference of the ratios), torchao's ``AdamW8bit`` and
``AdamW4bit`` and torch-optimi's ``AdamW(kahan_sum=True)`` on bfloat16
parameters, on the 16M-element leaf and the transformer tree of
``benchmarks/workloads.py``. For each: ms per step, the bytes per parameter a
step must move (read the parameters, gradients and state, write the parameters
and state, at their dtypes), the effective bandwidth at those bytes, and the
ratio to torch fused fp32 against the floor's ratio (its bytes / 28).
On the CPU the options run on the native low-memory kernel; ``--pure`` adds each
option's fused step compiled with ``ADAMW_JAX_NATIVE=0`` (the pure-JAX kernel) and
``--only TEXT`` keeps the options whose name contains TEXT.
``--bound`` asks instead whether each fused step is bound by memory or by compute: one
process per option pinned to one core, CPU time a step on a 16M-element leaf (its arrays
in DRAM) and on a 262,144-element leaf (in the caches), both per 16M elements; a step that
takes as long with its arrays in the caches is bound by its arithmetic, not its bytes.
Full runs write ``benchmarks/results/lowmem.md`` (``--bound``: ``lowmem_bound.md``);
``--quick`` a folder of its own.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any, NamedTuple

from benchmarks import output, timing

FP32_BYTES = 28  # read p, g, m, v; write p, m, v (float32)


class Option(NamedTuple):
  name: str
  kwargs: dict  # of adamw_jax.adamw (jnp dtypes as names, resolved when built)
  param_dtype: str


OPTIONS = (
  Option("fp32", {}, "float32"),
  Option("bf16 params, nearest", {}, "bfloat16"),
  Option("bf16 moments", {"mu_dtype": "bfloat16", "nu_dtype": "bfloat16"}, "float32"),
  Option("8-bit moments", {"moment_bits": 8}, "float32"),
  Option("4-bit moments", {"moment_bits": 4}, "float32"),
  Option(
    "bf16 params + stochastic rounding",
    {"mu_dtype": "bfloat16", "nu_dtype": "bfloat16", "param_rounding": "stochastic"},
    "bfloat16",
  ),
  Option(
    "bf16 params + Kahan",
    {"mu_dtype": "bfloat16", "nu_dtype": "bfloat16", "param_rounding": "kahan"},
    "bfloat16",
  ),
  Option("bf16 params + remainder", {"param_rounding": "remainder"}, "bfloat16"),
)
PEERS = ("torch fused fp32", "torchao AdamW8bit", "torchao AdamW4bit", "optimi AdamW Kahan bf16")


def _workloads(quick: bool) -> list[tuple[str, dict]]:
  from benchmarks import workloads

  by_name = {wl.name: wl for wl in workloads.WORKLOADS}
  return [(name, by_name[name].shapes(quick)) for name in list(by_name)[:2]]


def _jax_runner(option: Option, fused: bool, params_np: Any, grads_np: Any, native: bool = True):
  """(run(k) -> seconds per step, bytes a step moves) of one option, jitted and donated.

  `native` False: compiled with ``ADAMW_JAX_NATIVE=0``, the pure-JAX kernel.
  """
  import jax
  import jax.numpy as jnp
  import optax

  import adamw_jax

  kwargs = {k: (jnp.dtype(v) if k.endswith("_dtype") else v) for k, v in option.kwargs.items()}
  tx = adamw_jax.adamw(1e-3, weight_decay=1e-2, **kwargs)
  dtype = jnp.dtype(option.param_dtype)
  params = jax.tree.map(lambda x: jnp.asarray(x, dtype), params_np)
  grads = jax.tree.map(lambda x: jnp.asarray(x, dtype), grads_np)
  state = tx.init(params)

  def step(p, s, g):
    if fused:
      return adamw_jax.fused_step(tx, g, s, p)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  saved = os.environ.get("ADAMW_JAX_NATIVE")
  os.environ["ADAMW_JAX_NATIVE"] = "1" if native else "0"  # read when the step is traced
  try:
    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, state, grads).compile()
  finally:
    if saved is None:
      os.environ.pop("ADAMW_JAX_NATIVE")
    else:
      os.environ["ADAMW_JAX_NATIVE"] = saved
  nbytes = lambda tree: sum(x.nbytes for x in jax.tree.leaves(tree) if x.ndim > 0)
  moved = 2 * nbytes(params) + nbytes(grads) + 2 * nbytes(state)
  run = timing.donated_step(compiled, params, state, grads)
  return run, moved


def _torch_runner(peer: str, params_np: Any, grads_np: Any):
  import jax
  import torch

  dtype = torch.bfloat16 if "bf16" in peer else torch.float32
  as_t = lambda a: torch.from_numpy(a.copy()).to(dtype)
  params = [torch.nn.Parameter(as_t(p)) for p in jax.tree.leaves(params_np)]
  for p, g in zip(params, jax.tree.leaves(grads_np)):
    p.grad = as_t(g)
  if peer == "torch fused fp32":
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-2, fused=True)
  elif peer.startswith("torchao"):
    from torchao.optim import AdamW4bit, AdamW8bit

    cls = AdamW8bit if "8bit" in peer else AdamW4bit
    opt = cls(params, lr=1e-3, weight_decay=1e-2)
  else:
    import optimi

    opt = optimi.AdamW(params, lr=1e-3, weight_decay=1e-2, kahan_sum=True)
  opt.step()  # creates the state (and compiles torchao's step)

  def state_bytes() -> int:
    total = 0
    for s in opt.state.values():
      for v in s.values():
        if isinstance(v, torch.Tensor) and v.ndim > 0:
          inner = [getattr(v, a) for a in ("codes", "scale", "qmap") if hasattr(v, a)]
          total += sum(t.numel() * t.element_size() for t in inner) or v.numel() * v.element_size()
    return total

  p_bytes = sum(p.numel() * p.element_size() for p in params)
  moved = 3 * p_bytes + 2 * state_bytes()  # read p, g, state; write p, state

  def run(k: int) -> float:
    t0 = time.perf_counter()
    for _ in range(k):
      opt.step()
    return (time.perf_counter() - t0) / k

  return run, moved


def measure(quick: bool, reps: int, pure: bool = False, only: str | None = None) -> list[dict]:
  import numpy as np

  from benchmarks import workloads

  rows = []
  for name, shapes in _workloads(quick):
    n, _ = workloads.count(shapes)
    params_np = workloads.arrays(shapes, seed=0)
    grads_np = workloads.arrays(shapes, seed=1, scale=1e-2)
    runners: dict[str, Callable[[int], float]] = {}
    moved: dict[str, int] = {}
    skipped: dict[str, str] = {}
    makers: dict[str, Callable[[], tuple]] = {}
    for option in OPTIONS:
      if only is not None and only not in option.name:
        continue
      for fused in (False, True):
        key = f"{option.name}, {'fused' if fused else 'per-leaf'}"
        makers[key] = lambda o=option, f=fused: _jax_runner(o, f, params_np, grads_np)
      if pure:
        key = f"{option.name}, fused, pure-JAX kernel"
        makers[key] = lambda o=option: _jax_runner(o, True, params_np, grads_np, native=False)
    for peer in PEERS:
      makers[peer] = lambda p=peer: _torch_runner(p, params_np, grads_np)
    for key, make in makers.items():
      try:
        runners[key], moved[key] = make()
      except Exception as e:  # an option this version lacks, a peer that fails: reported
        skipped[key] = f"{type(e).__name__}: {e}".splitlines()[0][:120]
    times = timing.interleaved(runners, reps, 0.005 if quick else 0.05)
    reference = float(np.median(times["torch fused fp32"]))
    for key in makers:
      row: dict[str, Any] = {"workload": name, "params": n, "method": key}
      if key in skipped:
        rows.append({**row, "skipped": skipped[key]})
        continue
      t = float(np.median(times[key]))
      rows.append(
        {
          **row,
          "ms": 1e3 * t,
          "bytes_per_param": moved[key] / n,
          "gbps": moved[key] / t / 1e9,
          "ratio": t / reference,
          "floor_ratio": moved[key] / n / FP32_BYTES,
        }
      )
    print(f"  {name}: done", file=sys.stderr, flush=True)
  return rows


def report(rows: list[dict], command: str, reps: int) -> str:
  import jax
  import torch

  lines = [
    "# Low-memory AdamW on the CPU: `" + command + "`",
    "",
    f"{platform.processor() or platform.machine()}, jax {jax.__version__}, torch "
    f"{torch.__version__} ({torch.get_num_threads()} threads); medians of {reps} interleaved "
    "repetitions. Ratio: time / torch fused fp32's on the same workload; floor: the bytes a "
    "step must move / 28 (fp32's), the ratio a step at the memory bandwidth would reach.",
  ]
  for workload in dict.fromkeys(r["workload"] for r in rows):
    mine = [r for r in rows if r["workload"] == workload]
    lines += [
      "",
      f"## {workload} ({mine[0]['params']:,} parameters)",
      "",
      "| method | ms/step | bytes/param | GB/s | ratio to torch fused fp32 | floor |",
      "|---|---|---|---|---|---|",
    ]
    for r in mine:
      if "skipped" in r:
        lines.append(f"| {r['method']} | not run: {r['skipped']} | | | | |")
      else:
        lines.append(
          f"| {r['method']} | {r['ms']:.2f} | {r['bytes_per_param']:.1f} | {r['gbps']:.1f} "
          f"| {r['ratio']:.2f}x | {r['floor_ratio']:.2f}x |"
        )
  return "\n".join(lines) + "\n"


BOUND_SIZES = (16_000_000, 262_144)  # in DRAM; in the caches (whole 8- and 4-bit blocks)


def _one_core(name: str, n: int, steps: int) -> float:
  """CPU seconds per step of one option's fused step (or torch fused fp32) on an `n`-element leaf,
  in this process, pinned to one core before JAX or torch start their threads."""
  os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
  import numpy as np

  rng = np.random.default_rng(0)
  params_np = {"w": rng.standard_normal(n, dtype=np.float32)}
  grads_np = {"w": (rng.standard_normal(n, dtype=np.float32) * 1e-2).astype(np.float32)}
  if name in PEERS:
    import torch

    torch.set_num_threads(1)
    run, _ = _torch_runner(name, params_np, grads_np)
  else:
    option = next(o for o in OPTIONS if o.name == name)
    run, _ = _jax_runner(option, True, params_np, grads_np)
  run(2)
  t0 = time.process_time()
  run(steps)
  return (time.process_time() - t0) / steps


def bound(quick: bool) -> list[dict]:
  """Each option's fused step on one core, its arrays in DRAM and in the caches (`--bound`)."""
  sizes = (409_600, 32_768) if quick else BOUND_SIZES
  rows = []
  for name in ["torch fused fp32", *(o.name for o in OPTIONS)]:
    row: dict[str, Any] = {"method": name}
    for n in sizes:
      steps = max(3, (2 if quick else 20) * sizes[0] // n)
      code = f"from benchmarks import lowmem; print(lowmem._one_core({name!r}, {n}, {steps}))"
      done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False
      )
      if done.returncode != 0:
        row["skipped"] = (done.stderr.strip().splitlines() or ["failed"])[-1][:120]
        break
      row[n] = float(done.stdout.split()[-1]) * sizes[0] / n  # per sizes[0] elements
    rows.append(row)
    print(f"  {name}: {json.dumps(row)}", file=sys.stderr, flush=True)
  return rows


def bound_report(rows: list[dict], command: str, sizes: tuple[int, int]) -> str:
  big, small = sizes
  lines = [
    "# Low-memory AdamW on one core: bound by bytes or by arithmetic? `" + command + "`",
    "",
    f"{platform.processor() or platform.machine()}; one process per method, pinned to one "
    f"core; CPU time of one fused step, per {big:,} elements, on a leaf of {big:,} elements "
    f"(its arrays in DRAM) and of {small:,} (in the caches). Where the two are equal the "
    "step is bound by its arithmetic: fewer bytes cannot make it faster.",
    "",
    f"| method | one core, {big:,} elements (ms) | in the caches (ms per {big:,}) | "
    "cached / DRAM | ratio to torch fused fp32 (DRAM) |",
    "|---|---|---|---|---|",
  ]
  reference = next((r[big] for r in rows if r["method"] == "torch fused fp32" and big in r), None)
  for r in rows:
    if "skipped" in r:
      lines.append(f"| {r['method']} | not run: {r['skipped']} | | | |")
      continue
    ratio = f"{r[big] / reference:.2f}x" if reference else ""
    lines.append(
      f"| {r['method']} | {1e3 * r[big]:.1f} | {1e3 * r[small]:.1f} | "
      f"{r[small] / r[big]:.2f} | {ratio} |"
    )
  return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="small workloads, few repetitions")
  parser.add_argument("--reps", type=int, default=None, help="repetitions (default 9; quick 2)")
  parser.add_argument("--out", type=pathlib.Path, help="output directory")
  parser.add_argument("--pure", action="store_true", help="also each fused step on the pure kernel")
  parser.add_argument("--only", default=None, help="only the options whose name contains this")
  parser.add_argument("--bound", action="store_true", help="memory- or compute-bound, one core")
  args = parser.parse_args(argv)
  if args.bound:
    rows = bound(args.quick)
    sizes = (409_600, 32_768) if args.quick else BOUND_SIZES
    md = bound_report(rows, "python -m benchmarks.lowmem --bound" + " --quick" * args.quick, sizes)
    out = output.out_dir(args.out, args.quick, "lowmem")
    (out / "lowmem_bound.md").write_text(md)
    print(md)
    print(f"wrote {out / 'lowmem_bound.md'}")
    return rows
  reps = args.reps or (2 if args.quick else 9)
  rows = measure(args.quick, reps, pure=args.pure, only=args.only)
  flags = ["--quick"] * args.quick + ["--pure"] * args.pure
  flags += [f"--only '{args.only}'"] if args.only else []
  command = " ".join(["python -m benchmarks.lowmem", *flags])
  md = report(rows, command, reps)
  out = output.out_dir(args.out, args.quick, "lowmem")
  (out / "lowmem.md").write_text(md)
  print(md)
  print(f"wrote {out / 'lowmem.md'}")
  return rows


if __name__ == "__main__":
  main()
