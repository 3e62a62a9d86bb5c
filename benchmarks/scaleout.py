"""Scale-out: FSDP and ZeRO-1 train steps with adamw_jax.adamw on 1, 2, 4 and 8 devices.

Run from the repository root:  python -m benchmarks.scaleout

There is no accelerator here: the devices are virtual CPU devices
(``--xla_force_host_platform_device_count``), which must be set before jax is
imported, so each device count runs in its own process. Inside a process the
two layouts alternate rep by rep, and each reported time is the median over
the reps of the mean time of a few steps, with donated buffers.

- FSDP: parameters and optimizer state split on their largest axis; the batch
  is split over the same devices and the weights are all-gathered for the
  forward/backward (ZeRO-3 style).
- ZeRO-1: parameters replicated, optimizer state split (``out_shardings``).

"train step" is forward/backward plus the update; "update" is the optimizer
update plus ``optax.apply_updates`` alone, on gradients laid out like the
parameters. State bytes are counted from the arrays' ``addressable_shards``.
All virtual devices share the same 2 CPU cores, so more devices do not make
anything faster here: the times show what partitioning costs, not a speed-up.
Writes benchmarks/results/scaleout.md.
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

from benchmarks import output

OUT = output.RESULTS / "scaleout.md"
DEVICE_COUNTS = (1, 2, 4, 8)
LAYOUTS = ("FSDP", "ZeRO-1")
AXIS = "fsdp"
MARKER = "SCALEOUT "


def child(reps: int, steps: int) -> dict:
  """One device count (whatever this process was started with): every layout, interleaved."""
  import flax.linen as nn
  import jax
  import numpy as np
  import optax
  from jax.sharding import AxisType, NamedSharding
  from jax.sharding import PartitionSpec as P

  import adamw_jax

  class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.relu(nn.Dense(1024)(x))
      x = nn.relu(nn.Dense(1024)(x))
      return nn.Dense(256)(x)

  n = jax.device_count()
  mesh = jax.make_mesh((n,), (AXIS,), axis_types=(AxisType.Auto,))
  replicated = NamedSharding(mesh, P())

  def split_largest_axis(x):
    for axis in sorted(range(x.ndim), key=lambda a: -x.shape[a]):
      if x.shape[axis] % n == 0:
        return NamedSharding(mesh, P(*(AXIS if a == axis else None for a in range(x.ndim))))
    return replicated

  rng = np.random.default_rng(0)
  x = jax.device_put(
    rng.standard_normal((64, 256)).astype(np.float32), NamedSharding(mesh, P(AXIS))
  )
  y = jax.device_put(rng.integers(0, 256, 64).astype(np.int32), NamedSharding(mesh, P(AXIS)))
  params = jax.tree.map(np.asarray, MLP().init(jax.random.key(0), x[:1])["params"])  # host copies
  tx = adamw_jax.adamw(1e-3, weight_decay=0.1, mask=adamw_jax.decay_mask)

  def train_step(params, state, x, y):
    def loss_fn(p):
      p = jax.lax.with_sharding_constraint(p, replicated)
      logits = MLP().apply({"params": p}, x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    grads = jax.grad(loss_fn)(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  def update(grads, state, params):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  state_split = jax.tree.map(split_largest_axis, jax.eval_shape(tx.init, params))
  param_split = jax.tree.map(split_largest_axis, params)
  layouts = {}
  for layout in LAYOUTS:
    p_sh = param_split if layout == "FSDP" else jax.tree.map(lambda _: replicated, params)
    p = jax.device_put(params, p_sh)
    # FSDP: init follows the params' sharding; ZeRO-1: split by out_shardings.
    s = jax.jit(tx.init)(p) if layout == "FSDP" else jax.jit(tx.init, out_shardings=state_split)(p)
    out = (p_sh, state_split)
    fns = {
      "train": jax.jit(train_step, out_shardings=out, donate_argnums=(0, 1)),
      "update": jax.jit(update, out_shardings=out, donate_argnums=(1, 2)),
    }
    grads = jax.device_put(jax.tree.map(lambda a: a * 1e-3, params), p_sh)
    layouts[layout] = {"params": p, "state": s, "grads": grads, "fns": fns}

  def run(layout: str, kind: str) -> float:
    lay = layouts[layout]
    fn = lay["fns"][kind]
    start = time.perf_counter()
    for _ in range(steps):
      if kind == "train":
        lay["params"], lay["state"] = fn(lay["params"], lay["state"], x, y)
      else:
        lay["params"], lay["state"] = fn(lay["grads"], lay["state"], lay["params"])
    jax.block_until_ready((lay["params"], lay["state"]))
    return (time.perf_counter() - start) / steps

  for layout in LAYOUTS:  # compile and warm up
    for kind in ("train", "update"):
      run(layout, kind)
  times = {(layout, kind): [] for layout in LAYOUTS for kind in ("train", "update")}
  for _ in range(reps):
    for key in times:
      times[key].append(run(*key))

  result = {"devices": n, "params": sum(a.size for a in jax.tree.leaves(params)), "layouts": {}}
  for layout in LAYOUTS:
    state = layouts[layout]["state"]
    per_device = dict.fromkeys(jax.devices(), 0)
    total = 0
    for leaf in jax.tree.leaves(state):
      total += leaf.nbytes
      for shard in leaf.addressable_shards:
        per_device[shard.device] += shard.data.nbytes
    result["layouts"][layout] = {
      "train_ms": float(np.median(times[(layout, "train")])) * 1e3,
      "update_ms": float(np.median(times[(layout, "update")])) * 1e3,
      "state_bytes_total": total,
      "state_bytes_per_device": max(per_device.values()),
    }
  return result


def run_child(devices: int, reps: int, steps: int) -> dict:
  env = dict(os.environ)
  env["XLA_FLAGS"] = (
    env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}"
  ).strip()
  env["JAX_PLATFORMS"] = "cpu"
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "benchmarks.scaleout",
      "--child",
      "--reps",
      str(reps),
      "--steps",
      str(steps),
    ],
    cwd=pathlib.Path(__file__).resolve().parents[1],
    env=env,
    capture_output=True,
    text=True,
    check=False,
  )
  lines = [line for line in proc.stdout.splitlines() if line.startswith(MARKER)]
  if proc.returncode != 0 or len(lines) != 1:
    raise RuntimeError(f"{devices} devices: exit {proc.returncode}\n{proc.stderr[-3000:]}")
  return json.loads(lines[0][len(MARKER) :])


def table(results: list[dict]) -> str:
  rows = [
    "| devices | layout | train step (ms) | update (ms) | state bytes per device | of total |",
    "|---|---|---|---|---|---|",
  ]
  for r in results:
    for layout, m in r["layouts"].items():
      rows.append(
        f"| {r['devices']} | {layout} | {m['train_ms']:.2f} | {m['update_ms']:.2f} | "
        f"{m['state_bytes_per_device']:,} | {m['state_bytes_total']:,} |"
      )
  return "\n".join(rows)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--reps", type=int, default=15)
  parser.add_argument("--steps", type=int, default=5, help="steps per timed rep")
  parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    print(MARKER + json.dumps(child(args.reps, args.steps)))
    return
  results = [run_child(n, args.reps, args.steps) for n in DEVICE_COUNTS]
  md = "\n".join(
    [
      "# Scale-out: FSDP and ZeRO-1 with adamw_jax.adamw",
      "",
      f"`python -m benchmarks.scaleout` (reps={args.reps}, steps per rep={args.steps}); "
      f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
      f"Python {platform.python_version()}.",
      "",
      f"A Flax MLP 256-1024-1024-256 ({results[0]['params']:,} parameters), batch 64, "
      "float32. Times are medians over interleaved reps of the mean of a few steps.",
      "",
      table(results),
      "",
      "**These are virtual CPU devices sharing the same 2 CPU cores**: the times show",
      "what partitioning costs, not a speed-up;",
      "on real devices each would run its part in parallel. State bytes (mu, nu and the",
      "step count) are exact: the largest per-device share, from `addressable_shards`.",
      "The 4-byte step count is replicated, so the share is total/devices + 4 bytes",
      "(with 1 device, the total).",
      "",
    ]
  )
  OUT.parent.mkdir(parents=True, exist_ok=True)
  OUT.write_text(md)
  print(md)


if __name__ == "__main__":
  main()
