# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.7
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # bfloat16 parameters that still learn, and 8-bit moments
#
# A bfloat16 parameter written round-to-nearest drops every update smaller
# than half its ulp (2⁻⁹ of its size): with a small learning rate, plain
# bf16 AdamW stops moving. This notebook fits a least-squares problem with
# AdamW in float32, in plain bfloat16, and with the two cures —
# `param_rounding="stochastic"` (torchao's stochastic rounding) and
# `param_rounding="kahan"` (torch-optimi's Kahan sums) — and with 8-bit
# block-wise quantized moments (`moment_bits=8`, torchao's `AdamW8bit`).

# %%
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax

import adamw_jax

plt.rcParams["figure.dpi"] = 110  # the resolution of images/04_low_memory.png (the docs show it)

rng = np.random.default_rng(0)
X = jnp.asarray(rng.standard_normal((512, 64)), jnp.float32)
w_true = jnp.asarray(rng.standard_normal((64, 128)), jnp.float32)
Y = X @ w_true
w0 = jnp.asarray(rng.standard_normal((64, 128)), jnp.float32)  # 8192 weights: quantizable


def loss(w):
  return jnp.mean((X @ w.astype(jnp.float32) - Y) ** 2)


def train(dtype, steps=600, **options):
  tx = adamw_jax.adamw(3e-3, weight_decay=0.0, **options)
  params = {"w": w0.astype(dtype)}
  state = tx.init(params)

  @jax.jit
  def step(params, state):
    grads = jax.grad(lambda p: loss(p["w"]))(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  curve = []
  for _ in range(steps):
    params, state = step(params, state)
    curve.append(float(loss(params["w"])))
  return np.array(curve), state


runs = {
  "fp32": train(jnp.float32),
  "bf16 plain": train(jnp.bfloat16),
  "bf16 + stochastic rounding": train(jnp.bfloat16, param_rounding="stochastic"),
  "bf16 + Kahan": train(jnp.bfloat16, param_rounding="kahan"),
  "fp32 + 8-bit moments": train(jnp.float32, moment_bits=8),
}
for name, (curve, state) in runs.items():
  nbytes = sum(x.nbytes for x in jax.tree.leaves(state)) / w0.size
  print(f"{name:28s} final loss {curve[-1]:9.5f}   state {nbytes:.2f} bytes/param")

# %% [markdown]
# Plain bfloat16 stalls once the steps fall below half an ulp; the cures track float32.

# %% image="images/04_low_memory.png"
fig, ax = plt.subplots(figsize=(7, 4))
for name, (curve, _) in runs.items():
  ax.semilogy(curve, label=name)
ax.set(xlabel="step", ylabel="training loss", title="bf16 AdamW: the stall and its cures")
ax.legend()
plt.show()
fp32, plain = runs["fp32"][0][-1], runs["bf16 plain"][0][-1]
assert plain > 2 * fp32, "plain bf16 should stall"
for name in ("bf16 + stochastic rounding", "bf16 + Kahan", "fp32 + 8-bit moments"):
  assert runs[name][0][-1] < 2 * fp32 + 1e-3, name
