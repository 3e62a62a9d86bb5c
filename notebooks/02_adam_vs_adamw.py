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
# # Adam + L2 vs AdamW: is the best weight decay decoupled from the learning rate?
#
# Loshchilov & Hutter's central claim (*Decoupled Weight Decay
# Regularization*, ICLR 2019, Fig. 2): with Adam and an L2 penalty the best
# weight decay depends on the learning rate (the good region of the
# learning-rate × weight-decay grid is a diagonal), while with decoupled
# decay (AdamW) the two can be tuned separately (the good region is a
# rectangle). This notebook runs that experiment small, **three ways**:
#
# 1. **Adam + L2** — `adamw_jax.adam(lr, weight_decay=wd)`: `g += wd·θ` before the moments;
# 2. **AdamW, torch's form** — `adamw_jax.adamw(lr, weight_decay=wd)`: `θ *= 1 - lr_t·wd`;
# 3. **AdamW, the paper's form** — `decay_mode="paper"`: `θ *= 1 - η_t·λ`, where
#    `η_t = lr_t / peak lr` is the schedule multiplier: the base lr does not scale the decay.
#
# **Setup.** An MLP (64 → 128 → 10, ReLU) on 400 digits, **30 % of whose
# labels are replaced by random ones** so that regularization matters (on the
# clean digits every setting scores about the same and weight decay has
# nothing to show), validated on the other 1,397 clean digits. 40 epochs of
# batch 40 (400 steps), cosine schedule to 0, kernels decayed, biases not.
# Each grid is 6 learning rates × 6 weight decays × 3 seeds (initialization
# and batch order), all 108 runs trained at once: `jax.vmap` over
# hyperparameters passed as arrays, which our transforms accept.

# %%
import time

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax
from sklearn.datasets import load_digits

import adamw_jax

plt.rcParams["figure.dpi"] = 55  # the resolution of images/02_adam_vs_adamw.png (the docs show it)

t_start = time.perf_counter()
digits = load_digits()
X = (digits.data / 16.0).astype(np.float32)
Y = digits.target.astype(np.int32)
rng = np.random.default_rng(0)
order = rng.permutation(len(X))
N_TRAIN, NOISE = 400, 0.3
y_noisy = Y[order[:N_TRAIN]].copy()
flip = rng.random(N_TRAIN) < NOISE
y_noisy[flip] = rng.integers(0, 10, flip.sum())  # may redraw the true label
x_tr, y_tr = jnp.asarray(X[order[:N_TRAIN]]), jnp.asarray(y_noisy)
x_val, y_val = jnp.asarray(X[order[N_TRAIN:]]), jnp.asarray(Y[order[N_TRAIN:]])
print(
  f"{N_TRAIN} training digits, {np.mean(y_noisy != Y[order[:N_TRAIN]]):.0%} mislabeled; "
  f"{len(x_val)} clean validation digits"
)

# %%
HIDDEN, BATCH, EPOCHS, SEEDS = 128, 40, 40, 3
STEPS = EPOCHS * N_TRAIN // BATCH
MASK = {"hidden": {"kernel": True, "bias": False}, "out": {"kernel": True, "bias": False}}


def init(key):
  k1, k2 = jax.random.split(key)
  return {
    "hidden": {"kernel": jax.random.normal(k1, (64, HIDDEN)) / 8, "bias": jnp.zeros(HIDDEN)},
    "out": {"kernel": jax.random.normal(k2, (HIDDEN, 10)) / HIDDEN**0.5, "bias": jnp.zeros(10)},
  }


def predict(p, x):
  h = jax.nn.relu(x @ p["hidden"]["kernel"] + p["hidden"]["bias"])
  return h @ p["out"]["kernel"] + p["out"]["bias"]


def loss_fn(p, x, y):
  return optax.softmax_cross_entropy_with_integer_labels(predict(p, x), y).mean()


# The batch order of each seed: STEPS x BATCH indices, the same for every grid point.
batch_rng = np.random.default_rng(1)
BATCHES = jnp.asarray(
  np.stack(
    [
      np.concatenate([batch_rng.permutation(N_TRAIN) for _ in range(EPOCHS)]).reshape(STEPS, BATCH)
      for _ in range(SEEDS)
    ]
  )
)


def optimizer(method, lr, wd):
  # lr and wd are traced scalars here (one grid point under vmap).
  schedule = lambda count: lr * 0.5 * (1 + jnp.cos(jnp.pi * count / STEPS))
  if method == "Adam + L2":
    return adamw_jax.adam(schedule, weight_decay=wd, mask=MASK)
  if method == "AdamW (torch)":
    return adamw_jax.adamw(schedule, weight_decay=wd, mask=MASK)
  return adamw_jax.adamw(
    schedule, weight_decay=wd, mask=MASK, decay_mode="paper", peak_learning_rate=lr
  )


def validation_error(method, lr, wd, seed):
  params = init(jax.random.key(seed))
  tx = optimizer(method, lr, wd)

  def step(carry, idx):
    params, state = carry
    grads = jax.grad(loss_fn)(params, x_tr[idx], y_tr[idx])
    updates, state = tx.update(grads, state, params)
    return (optax.apply_updates(params, updates), state), None

  (params, _), _ = jax.lax.scan(step, (params, tx.init(params)), BATCHES[seed])
  return (predict(params, x_val).argmax(-1) != y_val).mean()


def grid(method, lrs, wds):
  """Validation error, shape (len(lrs), len(wds), SEEDS): every run at once."""
  f = lambda lr, wd, seed: validation_error(method, lr, wd, seed)
  f = jax.vmap(jax.vmap(jax.vmap(f, (None, None, 0)), (None, 0, None)), (0, None, None))
  return np.asarray(
    jax.jit(f)(jnp.asarray(lrs, jnp.float32), jnp.asarray(wds, jnp.float32), jnp.arange(SEEDS))
  )


# %% [markdown]
# The weight-decay axes differ because the coefficients mean different things:
# an L2 coefficient, torch's `wd` (per-step decay `lr_t·wd`) and the paper's
# `λ` (per-step decay `η_t·λ`, i.e. `λ = lr·wd` at the peak). Each range is
# 3 decades in half-decade steps, placed to contain the optimum.

# %%
LRS = 10.0 ** np.arange(-3.5, -0.9, 0.5)  # 3.2e-4 ... 1e-1
WDS = {
  "Adam + L2": 10.0 ** np.arange(-4.0, -1.4, 0.5),  # L2 coefficient
  "AdamW (torch)": 10.0 ** np.arange(-1.5, 1.1, 0.5),  # torch's weight_decay
  "AdamW (paper)": 10.0 ** np.arange(-3.5, -0.9, 0.5),
}  # the paper's lambda
errors = {}
for method, wds in WDS.items():
  t = time.perf_counter()
  errors[method] = grid(method, LRS, wds)
  print(f"{method}: {errors[method].size} runs in {time.perf_counter() - t:.1f} s")

# %% image="images/02_adam_vs_adamw.png"
fig, axes = plt.subplots(1, 3, figsize=(15, 4.6), layout="constrained")
for ax, (method, err) in zip(axes, errors.items()):
  mean = 100 * err.mean(-1)
  im = ax.imshow(mean.T, origin="lower", cmap="viridis_r", vmin=7, vmax=30, aspect="auto")
  for i in range(len(LRS)):
    for j in range(len(WDS[method])):
      ax.text(
        i,
        j,
        f"{mean[i, j]:.0f}",
        ha="center",
        va="center",
        fontsize=8,
        color="white" if mean[i, j] > 18 else "black",
      )
    best = np.argmin(mean[i])
    ax.add_patch(plt.Rectangle((i - 0.5, best - 0.5), 1, 1, fill=False, ec="red", lw=2))
  ax.set_xticks(range(len(LRS)), [f"{v:.0e}" for v in LRS], rotation=45)
  ax.set_yticks(range(len(WDS[method])), [f"{v:.0e}" for v in WDS[method]])
  ax.set(
    xlabel="peak learning rate",
    title=method,
    ylabel={"Adam + L2": "L2 coefficient", "AdamW (torch)": "weight_decay", "AdamW (paper)": "λ"}[
      method
    ],
  )
fig.colorbar(im, ax=axes, label=f"validation error (%), mean of {SEEDS} seeds", shrink=0.9)
fig.suptitle("Red: the best weight decay for each learning rate")
plt.show()

# %% [markdown]
# ## Reading the grids
#
# A decoupled optimum shows as red boxes in **one row**: the same weight
# decay is best whatever the learning rate. Argmins are noisy where a row is
# flat, so the test below asks the practical question instead: over the
# learning rates that come within 3 points of the best error (the ones anyone
# would pick), is there **one** weight decay that is near-best for all of
# them? Its *regret* is the largest loss, over those learning rates, against
# tuning the decay separately for each; compare it with the seed-to-seed
# noise, the standard deviation over seeds at those learning rates.

# %%
for method, err in errors.items():
  mean = 100 * err.mean(-1)
  good = mean.min(axis=1) <= mean.min() + 3
  regret = (mean[good] - mean[good].min(axis=1, keepdims=True)).max(axis=0)
  j = np.argmin(regret)
  noise = 100 * err[good].std(-1, ddof=1).mean()
  best_wd = ", ".join(
    f"{lr:.0e}: {WDS[method][k]:.0e}" for lr, k in zip(LRS[good], np.argmin(mean[good], axis=1))
  )
  print(
    f"{method}: best error {mean.min():.1f} %; best decay per good lr: {best_wd}\n"
    f"    one decay for all {good.sum()} good lrs: {WDS[method][j]:.0e}, "
    f"regret {regret[j]:.1f} points (seed noise {noise:.1f})"
  )
print(f"total time {time.perf_counter() - t_start:.1f} s")

# %% [markdown]
# ## What this small experiment shows — and what it cannot
#
# The numbers above are regenerated on every execution; these remarks were
# written from them (three seeds, CPU, deterministic) and hold for the
# figure in the docs (getting-started.md).
#
# * **AdamW in torch's form is decoupled here.** One `weight_decay` (1) is
#   within seed noise of the best for every good learning rate: tune the lr,
#   keep the decay.
# * **The paper's form couples them back, for Adam.** Its best λ climbs with
#   the learning rate, a decade per decade — a diagonal, and no single λ
#   serves all good learning rates (the regret is several times the noise).
#   The reason is simple: Adam's step has size ≈ lr whatever the gradient
#   scale, so a decay `λ·θ` balances it at a weight norm ∝ lr/λ, and keeping
#   that norm requires λ ∝ lr — which is torch's `lr·wd`. For SGD, whose step
#   scales with the gradient, and for weights made scale-invariant by
#   BatchNorm (as in the paper's ResNets), the balance is different; this
#   experiment says nothing about those.
# * **Adam + L2 is not diagonal at this scale either:** one L2 coefficient
#   also serves all good learning rates, and its best error is as good as
#   AdamW's. The paper's coupling for Adam + L2 and its generalization gap
#   between Adam and AdamW do not show on this problem.
# * **The limits.** One small MLP, one small data set with synthetic label
#   noise, 400 steps, three seeds, half-decade grids: a one-cell move of the
#   optimum is within what the seeds change. It shows how the
#   parametrization of the decay moves the optimum on this problem; it does
#   not test the paper's claims on its ResNets and CIFAR-10, nor how the
#   findings change with model size, data or training length.
#
# `decay_mode="paper"` exists so that the paper's form can be tested like
# this on your own problem; on this one, torch's form is the one to tune.
