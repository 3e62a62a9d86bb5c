"""The flat path's own costs: flatten, compiling the update, memory, the gradient through view().

Run from the repository root:  python -m benchmarks.flat   (a few minutes on 2 cores)

Prints, for 10,000 float32 leaves of 100 elements: the time of ``flatten`` and
of an eager ``pack``, the lower + compile time of the donated jitted step
(``adamw`` update + ``optax.apply_updates``) on the FlatParams next to the same
step on a one-leaf tree of the same size, and that step's memory analysis.
Then, for 300 leaves of distinct sizes (1,000 to 3,990 elements), the compile
time and the median run time of ``jax.grad`` of a loss through ``flat.view()``
(the custom VJP that writes each gradient in place), through plain slices (the
default transpose: one zero-padded copy per leaf, summed) and on the tree.
Timings are wall-clock on a shared machine; run times are interleaved medians.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import adamw_jax


def _seconds(fn):
  start = time.perf_counter()
  out = fn()
  jax.block_until_ready(out)
  return time.perf_counter() - start, out


def _step_compile(tx, params, grads):
  state = tx.init(params)

  def step(p, s, g):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  seconds, compiled = _seconds(
    lambda: jax.jit(step, donate_argnums=(0, 1)).lower(params, state, grads).compile()
  )
  return seconds, compiled.memory_analysis()


def update_costs(leaves: int = 10_000, size: int = 100) -> None:
  tree = {f"l{i:05d}": jnp.full((size,), 0.5, jnp.float32) for i in range(leaves)}
  t_flatten, flat = _seconds(lambda: adamw_jax.flatten(tree))
  t_pack, grads = _seconds(lambda: flat.pack(tree))
  tx = adamw_jax.adamw(1e-3, weight_decay=1e-2)
  t_flat, mem = _step_compile(tx, flat, grads)
  one = adamw_jax.flatten({"w": jnp.full((leaves * size,), 0.5, jnp.float32)})
  t_one, _ = _step_compile(adamw_jax.adamw(1e-3, weight_decay=2e-2), one, one)
  mb = 1e6
  print(f"| {leaves} leaves x {size} | flatten {t_flatten:.2f} s | eager pack {t_pack:.2f} s |")
  print(
    f"| jitted step, lower + compile | FlatParams {t_flat:.2f} s "
    f"| one-leaf tree, same size {t_one:.2f} s |"
  )
  print(
    f"| memory of the donated step | arguments {mem.argument_size_in_bytes / mb:.1f} MB | "
    f"outputs {mem.output_size_in_bytes / mb:.1f} MB "
    f"(aliased {mem.alias_size_in_bytes / mb:.1f} MB) | "
    f"temporaries {mem.temp_size_in_bytes} bytes |"
  )


def gradient_costs(leaves: int = 300) -> None:
  tree = {f"l{i:05d}": jnp.full((1000 + 10 * i,), 0.5, jnp.float32) for i in range(leaves)}
  flat = adamw_jax.flatten(tree)

  def loss(t):
    return sum(jnp.sum(jnp.sin(x) * x) for x in jax.tree.leaves(t))

  def sliced(f):  # the view without its custom VJP
    return f.layout.treedef.unflatten(
      [
        jax.lax.slice(f.buffers[0], (s.start,), (s.start + int(np.prod(s.shape)),)).reshape(s.shape)
        for s in f.layout.slots
      ]
    )

  runs = {
    "flat.view() (custom VJP)": (lambda f: loss(f.view()), flat),
    "plain slices (default transpose)": (lambda f: loss(sliced(f)), flat),
    "the tree": (loss, tree),
  }
  compiled, compile_s = {}, {}
  for name, (fn, arg) in runs.items():
    compile_s[name], compiled[name] = _seconds(lambda: jax.jit(jax.grad(fn)).lower(arg).compile())
    jax.block_until_ready(compiled[name](arg))
  times = {name: [] for name in runs}
  for _ in range(15):  # interleaved, so that load from other processes hits all alike
    for name, (_, arg) in runs.items():
      times[name].append(_seconds(lambda: compiled[name](arg))[0])
  print(
    f"\n| gradient, {leaves} leaves | compile s | run ms (median of 15, interleaved) "
    "| temporaries MB |"
  )
  print("|---|---|---|---|")
  for name in runs:
    temp = compiled[name].memory_analysis().temp_size_in_bytes / 1e6
    print(f"| {name} | {compile_s[name]:.1f} | {1e3 * np.median(times[name]):.2f} | {temp:.1f} |")


if __name__ == "__main__":
  update_costs()
  gradient_costs()
