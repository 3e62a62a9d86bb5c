"""What does faithfulness cost? adamw_jax.adamw next to a plain formulation of the same math.

Run from the repository root:  python -m benchmarks.overhead

One process, interleaved repetitions, medians, donated buffers. "plain" is
AdamW written the obvious way in jnp (torch's decay order and bias
corrections in float32, no rounding control): the same memory traffic and
the same number of outputs as ours, so the difference is the price of
reproducing torch's rounding (per-step double-word scalars, FMA control,
the corrected division). optax.adamw is shown for reference. Writes
benchmarks/results/overhead.md.
"""

from __future__ import annotations

import argparse
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import adamw_jax
from benchmarks import output

OUT = output.RESULTS / "overhead.md"


def plain_adamw(lr=1e-3, b1=0.9, b2=0.999, eps=1e-8, wd=1e-2) -> optax.GradientTransformation:
  """The same AdamW step with no attention to rounding."""

  def init(params):
    zeros = lambda: jax.tree.map(jnp.zeros_like, params)
    return (jnp.zeros([], jnp.int32), zeros(), zeros())

  def update(g, state, p):
    count, m, v = state
    count = count + 1
    t = count.astype(jnp.float32)
    m = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, m, g)
    v = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * g * g, v, g)
    step = lr / (1 - b1**t)
    bc2_sqrt = jnp.sqrt(1 - b2**t)
    new_p = jax.tree.map(
      lambda p, m, v: p * (1 - lr * wd) - step * m / (jnp.sqrt(v) / bc2_sqrt + eps), p, m, v
    )
    return jax.tree.map(lambda a, b: a - b, new_p, p), (count, m, v)

  return optax.GradientTransformation(init, update)


def _stepper(tx, n: int):
  params = {"w": jnp.asarray(np.random.default_rng(0).standard_normal(n), jnp.float32)}
  grads = {"w": jnp.asarray(np.random.default_rng(1).standard_normal(n) * 1e-2, jnp.float32)}
  state = tx.init(params)

  def step(p, s, g):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  step = jax.jit(step, donate_argnums=(0, 1))
  box = [params, state]

  def run(k: int) -> float:
    t0 = time.perf_counter()
    for _ in range(k):
      box[0], box[1] = step(box[0], box[1], grads)
    jax.block_until_ready(box[0])
    return (time.perf_counter() - t0) / k

  run(3)
  return run


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
    "--sizes", type=int, nargs="*", default=[10_000, 100_000, 1_000_000, 16_000_000]
  )
  parser.add_argument("--reps", type=int, default=15)
  args = parser.parse_args(argv)
  txs = {
    "adamw_jax.adamw": adamw_jax.adamw,
    "plain": plain_adamw,
    "optax.adamw": lambda: optax.adamw(1e-3, weight_decay=1e-2),
  }
  lines = [
    "# Cost of fidelity: one AdamW step, float32, one leaf",
    "",
    f"`python -m benchmarks.overhead` on {platform.machine()}, {jax.device_count()} CPU device(s), "
    f"jax {jax.__version__}; medians of {args.reps} interleaved repetitions (µs per step).",
    "",
    "| params | adamw_jax.adamw | plain (same math) | optax.adamw | ours / plain |",
    "|---|---|---|---|---|",
  ]
  for n in args.sizes:
    runners = {name: _stepper(make(), n) for name, make in txs.items()}
    inner = min(1000, max(1, int(2e7 // n)))
    times = {name: [] for name in runners}
    for _ in range(args.reps):
      for name, run in runners.items():
        times[name].append(run(inner))
    med = {name: float(np.median(v)) * 1e6 for name, v in times.items()}
    row = (
      f"| {n:,} | {med['adamw_jax.adamw']:.1f} | {med['plain']:.1f} | {med['optax.adamw']:.1f} | "
      f"{med['adamw_jax.adamw'] / med['plain']:.2f} |"
    )
    lines.append(row)
    print(row, flush=True)
  OUT.parent.mkdir(parents=True, exist_ok=True)
  OUT.write_text("\n".join(lines) + "\n")
  print(f"wrote {OUT}")


if __name__ == "__main__":
  main()
