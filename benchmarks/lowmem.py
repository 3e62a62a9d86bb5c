"""How fast is each low-memory option's step? The fused step beside torch's fused float32 AdamW.

Run from the repository root:  python -m benchmarks.lowmem   (a few minutes; --quick: seconds)

A side-by-side check for issue 24 (item 2), until the speed benchmark gains its own section:
per option (float32; bfloat16 moments; 8-bit and 4-bit moments; bfloat16 parameters written
to nearest, by stochastic rounding or with Kahan compensation) and workload (one 16M-element
leaf, the transformer-like tree of ``benchmarks/workloads.py``), ``adamw_jax.fused_step``
jitted with parameters and state donated, with the native kernel and (``--pure``) with
``ADAMW_JAX_NATIVE=0``, against ``torch.optim.AdamW(fused=True)`` on float32 parameters (and,
``--torchao``, torchao's ``AdamW8bit``/``AdamW4bit`` for the 8-bit and 4-bit rows). Each
repetition runs every method once in a fresh random order, each after a 20 ms pause; the
table gives medians, the ratio to torch fused, the option's byte floor (bytes per parameter
a step must move) over torch's 28, and the bandwidth at that floor.
"""

from __future__ import annotations

import argparse
import gc
import os
import time
from typing import Any, NamedTuple

import numpy as np

from benchmarks import workloads

PAUSE_S = 0.02


class Option(NamedTuple):
  name: str
  kwargs: dict
  param_dtype: str  # "float32" or "bfloat16"
  floor: float  # bytes per parameter a step reads and writes, at least
  torchao: str | None = None  # the torchao optimizer of the same state, if any


def _options() -> list[Option]:
  import jax.numpy as jnp

  bf16 = jnp.bfloat16
  return [
    Option("float32", {}, "float32", 28),
    Option("bf16 moments", {"mu_dtype": bf16, "nu_dtype": bf16}, "float32", 20),
    Option("8-bit moments", {"moment_bits": 8}, "float32", 16 + 8 / 256, "AdamW8bit"),
    Option("4-bit moments", {"moment_bits": 4}, "float32", 14 + 8 / 128, "AdamW4bit"),
    Option("bf16 params, nearest", {}, "bfloat16", 14),
    Option("bf16 params, stochastic", {"param_rounding": "stochastic"}, "bfloat16", 14),
    Option("bf16 params, kahan", {"param_rounding": "kahan"}, "bfloat16", 18),
  ]


def _jax_runner(option: Option, params_np: Any, grads_np: Any, native: bool):
  import jax
  import jax.numpy as jnp

  import adamw_jax

  os.environ["ADAMW_JAX_NATIVE"] = "1" if native else "0"
  dtype = jnp.dtype(option.param_dtype)
  params = jax.tree.map(lambda x: jnp.asarray(x, dtype), params_np)
  grads = jax.tree.map(lambda x: jnp.asarray(x, dtype), grads_np)
  tx = adamw_jax.adamw(1e-3, weight_decay=1e-2, **option.kwargs)
  state = tx.init(params)
  step = jax.jit(lambda p, s, g: adamw_jax.fused_step(tx, g, s, p), donate_argnums=(0, 1))
  compiled = step.lower(params, state, grads).compile()
  os.environ.pop("ADAMW_JAX_NATIVE")
  box = [params, state]

  def run(k: int) -> float:
    t0 = time.perf_counter()
    for _ in range(k):
      box[0], box[1] = compiled(box[0], box[1], grads)
    jax.block_until_ready(box[0])
    return (time.perf_counter() - t0) / k

  return run


def _torch_runner(params_np: Any, grads_np: Any, kind: str):
  import jax
  import torch

  params = [torch.nn.Parameter(torch.from_numpy(p.copy())) for p in jax.tree.leaves(params_np)]
  for p, g in zip(params, jax.tree.leaves(grads_np)):
    p.grad = torch.from_numpy(g)
  if kind == "fused":
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-2, fused=True)
  else:
    import torchao.optim

    opt = getattr(torchao.optim, kind)(params, lr=1e-3, weight_decay=1e-2)
  opt.step()

  def run(k: int) -> float:
    t0 = time.perf_counter()
    for _ in range(k):
      opt.step()
    return (time.perf_counter() - t0) / k

  return run


def _time(runners: dict, reps: int, target_s: float) -> dict[str, float]:
  gc.collect()
  gc.freeze()
  inner = {}
  for name, run in runners.items():
    run(1)
    inner[name] = max(1, min(200, round(target_s / max(run(1), 1e-6))))
  times: dict[str, list[float]] = {name: [] for name in runners}
  rng = np.random.default_rng(0)
  for _ in range(reps):
    for name in rng.permutation(list(runners)):
      time.sleep(PAUSE_S)
      times[name].append(runners[name](inner[name]))
  gc.unfreeze()
  return {name: float(np.median(t)) for name, t in times.items()}


def main(argv: list[str] | None = None) -> list[dict]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="small workloads, few repetitions")
  parser.add_argument("--pure", action="store_true", help="also the pure-JAX kernel")
  parser.add_argument("--torchao", action="store_true", help="also torchao's 8-bit and 4-bit")
  parser.add_argument("--reps", type=int, default=None)
  parser.add_argument("--only", default=None, help="options whose name contains this")
  args = parser.parse_args(argv)
  reps = args.reps or (3 if args.quick else 9)
  target_s = 0.01 if args.quick else 0.15
  rows = []
  for workload in workloads.WORKLOADS[:2]:
    shapes = workload.shapes(args.quick)
    n, leaves = workloads.count(shapes)
    params_np = workloads.arrays(shapes, seed=0)
    grads_np = workloads.arrays(shapes, seed=1, scale=1e-2)
    options = [o for o in _options() if args.only is None or args.only in o.name]
    runners = {"torch fused": _torch_runner(params_np, grads_np, "fused")}
    for option in options:
      runners[option.name] = _jax_runner(option, params_np, grads_np, native=True)
      if args.pure:
        runners[option.name + ", pure"] = _jax_runner(option, params_np, grads_np, native=False)
      if args.torchao and option.torchao:
        runners[option.torchao] = _torch_runner(params_np, grads_np, option.torchao)
    medians = _time(runners, reps, target_s)
    torch_s = medians["torch fused"]
    print(f"\n{workload.name}: {n / 1e6:.1f}M parameters, {leaves} leaves; torch fused "
          f"{torch_s * 1e3:.2f} ms ({28 * n / torch_s / 1e9:.1f} GB/s at 28 B/param)")
    print("| option | floor B/param | floor / 28 | ms | / torch fused | GB/s at floor |"
          + (" pure / torch |" if args.pure else "") + (" torchao / ours |" if args.torchao else ""))
    print("|---|---|---|---|---|---|" + ("---|" if args.pure else "") + ("---|" if args.torchao else ""))
    for option in options:
      t = medians[option.name]
      row = {
        "workload": workload.name,
        "option": option.name,
        "ms": t * 1e3,
        "ratio": t / torch_s,
        "floor": option.floor,
        "gbps": option.floor * n / t / 1e9,
      }
      line = (f"| {option.name} | {option.floor:.2f} | {option.floor / 28:.2f} | {t * 1e3:.2f} | "
              f"{t / torch_s:.2f}x | {row['gbps']:.1f} |")
      if args.pure:
        row["pure_ratio"] = medians[option.name + ", pure"] / torch_s
        line += f" {row['pure_ratio']:.2f}x |"
      if args.torchao:
        other = medians.get(option.torchao or "")
        line += f" {other / t:.1f}x |" if other else " |"
      print(line)
      rows.append(row)
  return rows


if __name__ == "__main__":
  main()
