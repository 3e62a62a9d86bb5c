"""Writes the tutorial notebooks (without outputs) and, with --images, regenerates their figures.

    python notebooks/build.py            # rewrite the four notebooks from the cells below
    python notebooks/build.py --images   # also execute them with SAVE_IMAGES=1, which saves
                                         # the figures the docs show into notebooks/images/

The cells live here, as Python strings, so that the notebooks stay reviewable
as code and are stored without stale outputs; CI (tests/test_notebooks.py)
executes every notebooks/*.ipynb, so an edit made in Jupyter still gets run.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import textwrap

import nbformat
from nbformat import v4

HERE = pathlib.Path(__file__).resolve().parent


def md(text: str):
  return v4.new_markdown_cell(textwrap.dedent(text).strip())


def code(text: str):
  return v4.new_code_cell(textwrap.dedent(text).strip())


QUICKSTART = [
  md("""
    # AdamW in Flax, step for step with PyTorch

    This notebook trains a small CNN on scikit-learn's 8×8 digits with
    `adamw_jax.adamw` — a weight-decay mask, a warmup-cosine learning-rate
    schedule, a jitted train step — and trains **the same CNN in PyTorch from the
    very same initial weights** with `torch.optim.AdamW`, on the same batches.
    The two loss curves lie on top of each other, and the parameters stay equal
    up to float32 rounding.

    The model, data split and torch twin come from `adamw_jax.demo`
    (`python -m adamw_jax.demo --compare-torch` is the script version).
    Runs in well under a minute on 2 CPU cores.
    """),
  code("""
    import os
    import time

    import jax
    import jax.numpy as jnp
    import matplotlib.pyplot as plt
    import numpy as np
    import optax

    import adamw_jax
    from adamw_jax import demo

    t_start = time.perf_counter()
    x_tr, y_tr, x_val, y_val = demo.load_data()  # (N, 8, 8, 1) in [0, 1]; stratified 80/20 split
    print(f"train {x_tr.shape}, validation {x_val.shape}")
    """),
  md("""
    ## Model, mask, schedule, optimizer

    `demo.CNN` is two 3×3 SiLU convolutions (16 and 32 channels), 2×2 average
    pooling and a Dense head. Decay the kernels, not the biases: that is the
    default rule of `adamw_jax.decay_mask`, and `describe_mask` prints what it
    decided, so a wrong mask is visible before training rather than after.
    """),
  code("""
    model = demo.CNN()
    params = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))["params"]

    mask = adamw_jax.decay_mask(params)   # kernels: decayed; biases: not
    print(adamw_jax.describe_mask(params, mask))
    """),
  code("""
    EPOCHS, BATCH, PEAK_LR, WEIGHT_DECAY = 8, 32, 1e-2, 5e-2
    steps_per_epoch = len(x_tr) // BATCH
    total_steps = EPOCHS * steps_per_epoch

    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=PEAK_LR, warmup_steps=total_steps // 10,
        decay_steps=total_steps, end_value=PEAK_LR / 100)
    tx = adamw_jax.adamw(schedule, weight_decay=WEIGHT_DECAY, mask=mask)  # torch's AdamW
    opt_state = tx.init(params)


    def loss_fn(params, x, y):
      logits = model.apply({"params": params}, x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


    @jax.jit
    def train_step(params, opt_state, x, y):
      loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
      updates, opt_state = tx.update(grads, opt_state, params)  # params: needed for the decay
      return optax.apply_updates(params, updates), opt_state, loss


    @jax.jit
    def accuracy(params, x, y):
      return (model.apply({"params": params}, x).argmax(-1) == y).mean()
    """),
  md("""
    ## The torch twin

    `demo.TorchRun` builds the same CNN with `torch.nn`, loads **our initial
    weights** into it (convolution kernels transposed from HWIO to OIHW), and
    makes `torch.optim.AdamW` with two param groups — the decayed kernels and the
    undecayed biases, from the same mask rule — and a `LambdaLR` giving torch the
    very float32 learning rates our schedule gives JAX.
    """),
  code("""
    assert jax.tree.all(jax.tree.map(lambda a, b: a == b, mask, demo.decay_mask(params))), \\
        "TorchRun's param groups must be built from the same mask"
    jit_schedule = jax.jit(schedule)  # the lr of step t, exactly as inside the optimizer
    torch_run = demo.TorchRun(params, lambda t: float(jit_schedule(t)), WEIGHT_DECAY)
    print("max |param difference| at the start:", torch_run.max_abs_diff(params))
    """),
  md("## Train both on the same batches"),
  code("""
    rng = np.random.default_rng(0)
    history = {"loss_jax": [], "loss_torch": [], "acc_jax": [], "acc_torch": [], "max_diff": []}
    for epoch in range(1, EPOCHS + 1):
      for idx in demo.batches(len(x_tr), BATCH, rng):
        params, opt_state, loss = train_step(params, opt_state, x_tr[idx], y_tr[idx])
        history["loss_jax"].append(float(loss))
        history["loss_torch"].append(torch_run.step(x_tr[idx], y_tr[idx]))
      history["acc_jax"].append(float(accuracy(params, x_val, y_val)))
      history["acc_torch"].append(torch_run.accuracy(x_val, y_val))
      history["max_diff"].append(torch_run.max_abs_diff(params))
      print(f"epoch {epoch}: loss {np.mean(history['loss_jax'][-steps_per_epoch:]):.4f} (jax) "
            f"{np.mean(history['loss_torch'][-steps_per_epoch:]):.4f} (torch)   "
            f"val acc {history['acc_jax'][-1]:.4f} / {history['acc_torch'][-1]:.4f}   "
            f"max |dparam| {history['max_diff'][-1]:.1e}")
    """),
  code("""
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    steps = np.arange(1, total_steps + 1)
    axes[0].plot(steps, history["loss_torch"], lw=3, alpha=0.4, label="torch.optim.AdamW")
    axes[0].plot(steps, history["loss_jax"], lw=1, label="adamw_jax.adamw")
    axes[0].set(xlabel="step", ylabel="train loss (batch)", yscale="log", title="Training loss")
    axes[0].legend()
    epochs = np.arange(1, EPOCHS + 1)
    axes[1].plot(epochs, history["acc_torch"], "o-", lw=3, alpha=0.4, label="torch")
    axes[1].plot(epochs, history["acc_jax"], ".-", label="jax")
    axes[1].set(xlabel="epoch", ylabel="validation accuracy", title="Validation accuracy")
    axes[1].legend()
    axes[2].semilogy(epochs, history["max_diff"], "o-", color="C3")
    axes[2].set(xlabel="epoch", ylabel="max |param_jax - param_torch|",
                title="Parameter difference", ylim=(1e-9, 1e-3))
    fig.tight_layout()
    if os.environ.get("SAVE_IMAGES"):  # set by notebooks/build.py --images
      os.makedirs("images", exist_ok=True)
      fig.savefig("images/01_quickstart.png", dpi=60)
    plt.show()
    print(f"total time {time.perf_counter() - t_start:.1f} s")
    """),
  md("""
    ## What this shows

    * Same initial weights, same batches, same schedule: the JAX and PyTorch
      curves coincide, and the parameters differ by about float32 rounding
      (~1e-7 here). That residue comes from the convolutions, which XLA and
      PyTorch sum in different orders, not from the optimizer: on identical
      gradients `adamw_jax.adamw` lands on torch's parameters
      (docs/fidelity.md, "How close to PyTorch?").
    * The decay is torch's: each step multiplies a decayed kernel by
      `1 - lr_t * weight_decay`. For the paper's form, where the decay does not
      scale with the base learning rate, see `decay_mode="paper"` and
      `02_adam_vs_adamw.ipynb`.
    """),
]


ADAM_VS_ADAMW = [
  md("""
    # Adam + L2 vs AdamW: is the best weight decay decoupled from the learning rate?

    Loshchilov & Hutter's central claim (*Decoupled Weight Decay
    Regularization*, ICLR 2019, Fig. 2): with Adam and an L2 penalty the best
    weight decay depends on the learning rate (the good region of the
    learning-rate × weight-decay grid is a diagonal), while with decoupled
    decay (AdamW) the two can be tuned separately (the good region is a
    rectangle). This notebook runs that experiment small, **three ways**:

    1. **Adam + L2** — `adamw_jax.adam(lr, weight_decay=wd)`: `g += wd·θ` before the moments;
    2. **AdamW, torch's form** — `adamw_jax.adamw(lr, weight_decay=wd)`: `θ *= 1 - lr_t·wd`;
    3. **AdamW, the paper's form** — `decay_mode="paper"`: `θ *= 1 - η_t·λ`, where
       `η_t = lr_t / peak lr` is the schedule multiplier: the base lr does not scale the decay.

    **Setup.** An MLP (64 → 128 → 10, ReLU) on 400 digits, **30 % of whose
    labels are replaced by random ones** so that regularization matters (on the
    clean digits every setting scores about the same and weight decay has
    nothing to show), validated on the other 1,397 clean digits. 40 epochs of
    batch 40 (400 steps), cosine schedule to 0, kernels decayed, biases not.
    Each grid is 6 learning rates × 6 weight decays × 3 seeds (initialization
    and batch order), all 108 runs trained at once: `jax.vmap` over
    hyperparameters passed as arrays, which our transforms accept.
    """),
  code("""
    import os
    import time

    import jax
    import jax.numpy as jnp
    import matplotlib.pyplot as plt
    import numpy as np
    import optax
    from sklearn.datasets import load_digits

    import adamw_jax

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
    print(f"{N_TRAIN} training digits, {np.mean(y_noisy != Y[order[:N_TRAIN]]):.0%} mislabeled; "
          f"{len(x_val)} clean validation digits")
    """),
  code("""
    HIDDEN, BATCH, EPOCHS, SEEDS = 128, 40, 40, 3
    STEPS = EPOCHS * N_TRAIN // BATCH
    MASK = {"hidden": {"kernel": True, "bias": False}, "out": {"kernel": True, "bias": False}}


    def init(key):
      k1, k2 = jax.random.split(key)
      return {"hidden": {"kernel": jax.random.normal(k1, (64, HIDDEN)) / 8,
                         "bias": jnp.zeros(HIDDEN)},
              "out": {"kernel": jax.random.normal(k2, (HIDDEN, 10)) / HIDDEN**0.5,
                      "bias": jnp.zeros(10)}}


    def predict(p, x):
      h = jax.nn.relu(x @ p["hidden"]["kernel"] + p["hidden"]["bias"])
      return h @ p["out"]["kernel"] + p["out"]["bias"]


    def loss_fn(p, x, y):
      return optax.softmax_cross_entropy_with_integer_labels(predict(p, x), y).mean()


    # The batch order of each seed: STEPS x BATCH indices, the same for every grid point.
    batch_rng = np.random.default_rng(1)
    BATCHES = jnp.asarray(np.stack([
        np.concatenate([batch_rng.permutation(N_TRAIN) for _ in range(EPOCHS)])
        .reshape(STEPS, BATCH) for _ in range(SEEDS)]))


    def optimizer(method, lr, wd):
      # lr and wd are traced scalars here (one grid point under vmap).
      schedule = lambda count: lr * 0.5 * (1 + jnp.cos(jnp.pi * count / STEPS))  # noqa: E731
      if method == "Adam + L2":
        return adamw_jax.adam(schedule, weight_decay=wd, mask=MASK)
      if method == "AdamW (torch)":
        return adamw_jax.adamw(schedule, weight_decay=wd, mask=MASK)
      return adamw_jax.adamw(schedule, weight_decay=wd, mask=MASK,
                             decay_mode="paper", peak_learning_rate=lr)


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
      \"\"\"Validation error, shape (len(lrs), len(wds), SEEDS): every run at once.\"\"\"
      f = lambda lr, wd, seed: validation_error(method, lr, wd, seed)  # noqa: E731
      f = jax.vmap(jax.vmap(jax.vmap(f, (None, None, 0)), (None, 0, None)), (0, None, None))
      return np.asarray(jax.jit(f)(jnp.asarray(lrs, jnp.float32), jnp.asarray(wds, jnp.float32),
                                   jnp.arange(SEEDS)))
    """),
  md("""
    The weight-decay axes differ because the coefficients mean different things:
    an L2 coefficient, torch's `wd` (per-step decay `lr_t·wd`) and the paper's
    `λ` (per-step decay `η_t·λ`, i.e. `λ = lr·wd` at the peak). Each range is
    3 decades in half-decade steps, placed to contain the optimum.
    """),
  code("""
    LRS = 10.0 ** np.arange(-3.5, -0.9, 0.5)                  # 3.2e-4 ... 1e-1
    WDS = {"Adam + L2": 10.0 ** np.arange(-4.0, -1.4, 0.5),     # L2 coefficient
           "AdamW (torch)": 10.0 ** np.arange(-1.5, 1.1, 0.5),  # torch's weight_decay
           "AdamW (paper)": 10.0 ** np.arange(-3.5, -0.9, 0.5)}  # the paper's lambda
    errors = {}
    for method, wds in WDS.items():
      t = time.perf_counter()
      errors[method] = grid(method, LRS, wds)
      print(f"{method}: {errors[method].size} runs in {time.perf_counter() - t:.1f} s")
    """),
  code("""
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6), layout="constrained")
    for ax, (method, err) in zip(axes, errors.items()):
      mean = 100 * err.mean(-1)
      im = ax.imshow(mean.T, origin="lower", cmap="viridis_r", vmin=7, vmax=30, aspect="auto")
      for i in range(len(LRS)):
        for j in range(len(WDS[method])):
          ax.text(i, j, f"{mean[i, j]:.0f}", ha="center", va="center", fontsize=8,
                  color="white" if mean[i, j] > 18 else "black")
        best = np.argmin(mean[i])
        ax.add_patch(plt.Rectangle((i - 0.5, best - 0.5), 1, 1, fill=False, ec="red", lw=2))
      ax.set_xticks(range(len(LRS)), [f"{v:.0e}" for v in LRS], rotation=45)
      ax.set_yticks(range(len(WDS[method])), [f"{v:.0e}" for v in WDS[method]])
      ax.set(xlabel="peak learning rate", title=method,
             ylabel={"Adam + L2": "L2 coefficient", "AdamW (torch)": "weight_decay",
                     "AdamW (paper)": "λ"}[method])
    fig.colorbar(im, ax=axes, label=f"validation error (%), mean of {SEEDS} seeds", shrink=0.9)
    fig.suptitle("Red: the best weight decay for each learning rate")
    if os.environ.get("SAVE_IMAGES"):  # set by notebooks/build.py --images
      os.makedirs("images", exist_ok=True)
      fig.savefig("images/02_adam_vs_adamw.png", dpi=55, bbox_inches="tight")
    plt.show()
    """),
  md("""
    ## Reading the grids

    A decoupled optimum shows as red boxes in **one row**: the same weight
    decay is best whatever the learning rate. Argmins are noisy where a row is
    flat, so the test below asks the practical question instead: over the
    learning rates that come within 3 points of the best error (the ones anyone
    would pick), is there **one** weight decay that is near-best for all of
    them? Its *regret* is the largest loss, over those learning rates, against
    tuning the decay separately for each; compare it with the seed-to-seed
    noise, the standard deviation over seeds at those learning rates.
    """),
  code("""
    for method, err in errors.items():
      mean = 100 * err.mean(-1)
      good = mean.min(axis=1) <= mean.min() + 3
      regret = (mean[good] - mean[good].min(axis=1, keepdims=True)).max(axis=0)
      j = np.argmin(regret)
      noise = 100 * err[good].std(-1, ddof=1).mean()
      best_wd = ", ".join(f"{lr:.0e}: {WDS[method][k]:.0e}" for lr, k in
                          zip(LRS[good], np.argmin(mean[good], axis=1)))
      print(f"{method}: best error {mean.min():.1f} %; best decay per good lr: {best_wd}\\n"
            f"    one decay for all {good.sum()} good lrs: {WDS[method][j]:.0e}, "
            f"regret {regret[j]:.1f} points (seed noise {noise:.1f})")
    print(f"total time {time.perf_counter() - t_start:.1f} s")
    """),
  md("""
    ## What this small experiment shows — and what it cannot

    The numbers above are regenerated on every execution; these remarks were
    written from them (three seeds, CPU, deterministic) and hold for the
    figure in the docs (getting-started.md).

    * **AdamW in torch's form is decoupled here.** One `weight_decay` (1) is
      within seed noise of the best for every good learning rate: tune the lr,
      keep the decay.
    * **The paper's form couples them back, for Adam.** Its best λ climbs with
      the learning rate, a decade per decade — a diagonal, and no single λ
      serves all good learning rates (the regret is several times the noise).
      The reason is simple: Adam's step has size ≈ lr whatever the gradient
      scale, so a decay `λ·θ` balances it at a weight norm ∝ lr/λ, and keeping
      that norm requires λ ∝ lr — which is torch's `lr·wd`. For SGD, whose step
      scales with the gradient, and for weights made scale-invariant by
      BatchNorm (as in the paper's ResNets), the balance is different; this
      experiment says nothing about those.
    * **Adam + L2 is not diagonal at this scale either:** one L2 coefficient
      also serves all good learning rates, and its best error is as good as
      AdamW's. The paper's coupling for Adam + L2 and its generalization gap
      between Adam and AdamW do not show on this problem.
    * **The limits.** One small MLP, one small data set with synthetic label
      noise, 400 steps, three seeds, half-decade grids: a one-cell move of the
      optimum is within what the seeds change. It shows how the
      parametrization of the decay moves the optimum on this problem; it does
      not test the paper's claims on its ResNets and CIFAR-10, nor how the
      findings change with model size, data or training length.

    `decay_mode="paper"` exists so that the paper's form can be tested like
    this on your own problem; on this one, torch's form is the one to tune.
    """),
]


MIGRATION = [
  md("""
    # Moving a training run from PyTorch to JAX, optimizer state and all

    Porting a model to JAX usually means restarting optimisation: the weights can be
    copied, but Adam's moments and step count stay behind, and the first steps with
    fresh moments are large ones. `adamw_jax.from_torch` carries the optimizer over:
    `torch.optim.AdamW`'s `step`, `exp_avg`, `exp_avg_sq` (and `max_exp_avg_sq`) become
    the state of the equivalent `adamw_jax` transform, param groups included.

    This notebook trains a small CNN on scikit-learn's 8×8 digits with `torch.optim.AdamW`,
    moves it half-way to an identical Flax NNX model, finishes in JAX, and plots the
    loss against a run that stayed in PyTorch (and against a JAX run that restarted the
    optimizer from scratch). At the end it goes back: `adamw_jax.to_torch_state_dict`.
    """),
  code("""
    import os

    import jax
    import jax.numpy as jnp
    import matplotlib.pyplot as plt
    import numpy as np
    import optax
    import torch
    from flax import nnx
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    import adamw_jax

    torch.manual_seed(0)
    torch.set_num_threads(1)  # the tensors are tiny: threads cost more than they save
    """),
  md("""
    ## Data: the digits, 80/20 split, pixels in [0, 1]
    """),
  code("""
    digits = load_digits()
    x_train, x_val, y_train, y_val = train_test_split(
        (digits.images / 16.0).astype(np.float32), digits.target, test_size=0.2,
        stratify=digits.target, random_state=0)
    BATCH, STEPS, SWITCH = 128, 300, 150
    rng = np.random.default_rng(0)
    batches = [rng.choice(len(x_train), BATCH, replace=False) for _ in range(STEPS)]  # the same for every run
    print(x_train.shape, x_val.shape)
    """),
  md("""
    ## Train in PyTorch for 150 steps

    Two param groups, the usual recipe: weights decayed, biases not. The model flattens
    in NHWC order (`permute` before `flatten`) so that its `Linear` sees the features
    in the order Flax's `reshape` gives them: that is model code, not optimizer state.
    """),
  code("""
    class TorchCNN(torch.nn.Module):
      def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 8, kernel_size=3, padding=1)
        self.fc = torch.nn.Linear(8 * 8 * 8, 64)
        self.head = torch.nn.Linear(64, 10)

      def forward(self, x):                                     # x: (N, 1, 8, 8)
        h = torch.nn.functional.silu(self.conv(x))
        h = h.permute(0, 2, 3, 1).flatten(1)                    # NHWC order, as Flax
        return self.head(torch.nn.functional.silu(self.fc(h)))


    torch_model = TorchCNN()
    decay = [p for n, p in torch_model.named_parameters() if n.endswith("weight")]
    no_decay = [p for n, p in torch_model.named_parameters() if n.endswith("bias")]
    torch_opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=3e-3)

    xt_train, yt_train = torch.tensor(x_train[:, None]), torch.tensor(y_train)


    def torch_step(model, opt, t):
      idx = torch.tensor(batches[t])
      opt.zero_grad()
      loss = torch.nn.functional.cross_entropy(model(xt_train[idx]), yt_train[idx])
      loss.backward()
      opt.step()
      return loss.item()


    torch_losses = [torch_step(torch_model, torch_opt, t) for t in range(SWITCH)]
    print(f"step {SWITCH}: loss {torch_losses[-1]:.4f}")
    """),
  md("""
    ## Move to Flax NNX

    The same architecture in Flax. `adamw_jax.flax_layout` maps torch names to Flax
    paths and layouts: `conv.weight` (O, I, H, W) → `conv/kernel` (H, W, I, O),
    `fc.weight` (out, in) → `fc/kernel` (in, out), biases as they are. We use it for the
    weights here, and `from_torch` uses it for the moments.
    """),
  code("""
    class FlaxCNN(nnx.Module):
      def __init__(self, rngs):
        self.conv = nnx.Conv(1, 8, kernel_size=(3, 3), padding="SAME", rngs=rngs)
        self.fc = nnx.Linear(8 * 8 * 8, 64, rngs=rngs)
        self.head = nnx.Linear(64, 10, rngs=rngs)

      def __call__(self, x):                                    # x: (N, 8, 8, 1)
        h = nnx.silu(self.conv(x)).reshape(x.shape[0], -1)
        return self.head(nnx.silu(self.fc(h)))


    flax_model = FlaxCNN(nnx.Rngs(0))
    template = nnx.as_pure(nnx.state(flax_model, nnx.Param))   # the paths and shapes to fill
    mapping = adamw_jax.flax_layout(template)

    torch_weights = {}
    for name, p in torch_model.named_parameters():
      path, axes = mapping(name)
      print(f"{name:12s} {str(tuple(p.shape)):16s} -> {path:12s} axes {axes}")
      torch_weights[path] = p.detach().numpy().transpose(axes) if axes else p.detach().numpy()

    def path_of(keys):
      return "/".join(str(k.key) for k in keys)


    params = jax.tree_util.tree_map_with_path(lambda k, _: jnp.asarray(torch_weights[path_of(k)]), template)
    nnx.update(flax_model, params)

    x_check = x_val[:64]
    gap = np.max(np.abs(np.asarray(flax_model(jnp.asarray(x_check[..., None])))
                        - torch_model(torch.tensor(x_check[:, None])).detach().numpy()))
    print(f"max |flax logits - torch logits| = {gap:.2e}")
    """),
  md("""
    Now the optimizer. `names=torch_model` names the optimizer's parameters (matched by
    identity); the two torch param groups become an `adamw_jax.param_groups` transform
    with groups `group0` and `group1`, each holding its own moments and step count.
    """),
  code("""
    tx, opt_state = adamw_jax.from_torch(torch_opt, params, names=torch_model, mapping=mapping)
    for group, inner in opt_state.inner_states.items():
      print(group, "step", int(inner.inner_state.count))
    print("exp_avg of fc.weight, transposed, equals mu of fc/kernel:",
          np.array_equal(torch_opt.state[torch_model.fc.weight]["exp_avg"].numpy().T,
                         np.asarray(opt_state.inner_states["group0"].inner_state.mu["fc"]["kernel"])))

    optimizer = nnx.Optimizer(flax_model, tx, wrt=nnx.Param)
    nnx.update(optimizer.opt_state, nnx.state(opt_state))      # put torch's moments in
    """),
  md("""
    ## Finish in JAX, and the two references
    """),
  code("""
    xj_train, yj_train = jnp.asarray(x_train[..., None]), jnp.asarray(y_train)


    @nnx.jit
    def jax_step(model, optimizer, idx):
      def loss_fn(m):
        logits = m(xj_train[idx])
        return optax.softmax_cross_entropy_with_integer_labels(logits, yj_train[idx]).mean()
      loss, grads = nnx.value_and_grad(loss_fn)(model)
      optimizer.update(model, grads)
      return loss


    # A copy restarting the optimizer from zero (what a port usually does), before we train.
    restart_model = nnx.clone(flax_model)
    restart_opt = nnx.Optimizer(restart_model, tx, wrt=nnx.Param)

    jax_losses = [float(jax_step(flax_model, optimizer, jnp.asarray(batches[t])))
                  for t in range(SWITCH, STEPS)]
    restart_losses = [float(jax_step(restart_model, restart_opt, jnp.asarray(batches[t])))
                      for t in range(SWITCH, STEPS)]
    reference_losses = torch_losses + [torch_step(torch_model, torch_opt, t) for t in range(SWITCH, STEPS)]
    print(f"final loss: torch all the way {reference_losses[-1]:.4f}, moved to JAX {jax_losses[-1]:.4f}, "
          f"JAX with a fresh optimizer {restart_losses[-1]:.4f}")
    """),
  code("""
    steps = np.arange(1, STEPS + 1)
    reference = np.array(reference_losses)
    fig, (ax, ax_gap) = plt.subplots(1, 2, figsize=(12, 4))
    ax.plot(steps, reference, label="PyTorch all the way", color="C0", lw=2.5, alpha=0.6)
    ax.plot(steps[SWITCH:], jax_losses, label="moved to JAX at step 150, with optimizer state",
            color="C1", lw=1.2)
    ax.plot(steps[SWITCH:], restart_losses, label="moved to JAX, optimizer restarted", color="C3",
            lw=1, ls="--")
    ax.axvline(SWITCH, color="gray", lw=0.8, ls=":")
    ax.set(xlabel="step", ylabel="train loss (batch of 128)", yscale="log",
           title="Digits CNN: AdamW in PyTorch, then adamw_jax")
    ax.legend()
    gap = lambda losses: np.abs(np.array(losses) - reference[SWITCH:]) + 1e-12  # noqa: E731
    ax_gap.plot(steps[SWITCH:], gap(jax_losses), color="C1", label="with optimizer state")
    ax_gap.plot(steps[SWITCH:], gap(restart_losses), color="C3", ls="--", label="optimizer restarted")
    ax_gap.set(xlabel="step", ylabel="|loss - PyTorch's loss|", yscale="log",
               title="Distance from the run that stayed in PyTorch")
    ax_gap.legend()
    plt.tight_layout()
    if os.environ.get("SAVE_IMAGES"):  # set by notebooks/build.py --images
      os.makedirs("images", exist_ok=True)
      fig.savefig("images/03_pytorch_to_jax.png", dpi=60, bbox_inches="tight")
    plt.show()
    """),
  code("""
    def accuracy_jax(model):
      return float(jnp.mean(jnp.argmax(model(jnp.asarray(x_val[..., None])), -1) == y_val))


    def accuracy_torch(model):
      with torch.no_grad():
        return float((model(torch.tensor(x_val[:, None])).argmax(-1).numpy() == y_val).mean())


    print(f"validation accuracy: PyTorch {accuracy_torch(torch_model):.3f}, moved to JAX "
          f"{accuracy_jax(flax_model):.3f}, JAX restarted {accuracy_jax(restart_model):.3f}")
    print("largest |moved - torch| over the losses of steps 151-300:",
          f"{np.max(np.abs(np.array(jax_losses) - np.array(reference_losses[SWITCH:]))):.2e}")
    """),
  md("""
    The JAX continuation follows the PyTorch run (the two frameworks round the
    convolution and the matrix products differently, so the curves agree to float32
    rounding, not bit for bit; given the same gradients the optimizer itself is bitwise
    torch's, see `tests/test_interop.py`). The run with a restarted optimizer is another
    run: its moments start from zero and its bias correction from step 1, it bumps right
    after the switch and then goes its own way, its loss ~1e-2 away from the PyTorch run's
    instead of float32 rounding (~1e-7) away.

    ## And back to PyTorch

    `to_torch_state_dict` writes a state dict that `load_state_dict` accepts: give it the
    torch optimizer that is to continue (here a fresh one over a fresh model with the
    same groups) and the same `names` / `mapping`.
    """),
  code("""
    final = {path_of(k): np.asarray(v) for k, v in
             jax.tree_util.tree_flatten_with_path(nnx.as_pure(nnx.state(flax_model, nnx.Param)))[0]}
    back_model = TorchCNN()
    with torch.no_grad():
      for name, p in back_model.named_parameters():
        path, axes = mapping(name)
        p.copy_(torch.tensor(final[path].transpose(np.argsort(axes)) if axes else final[path]))
    back_opt = torch.optim.AdamW(
        [{"params": [p for n, p in back_model.named_parameters() if n.endswith("weight")], "weight_decay": 0.05},
         {"params": [p for n, p in back_model.named_parameters() if n.endswith("bias")], "weight_decay": 0.0}],
        lr=3e-3)
    back_opt.load_state_dict(adamw_jax.to_torch_state_dict(back_opt, optimizer.opt_state, names=back_model,
                                                           mapping=mapping))
    print("torch step counts:", sorted({s["step"].item() for s in back_opt.state.values()}))
    print(f"validation accuracy back in torch: {accuracy_torch(back_model):.3f}")
    """),
]


LOW_MEMORY = [
  md("""
    # bfloat16 parameters that still learn, and 8-bit moments

    A bfloat16 parameter written round-to-nearest drops every update smaller
    than half its ulp (2⁻⁹ of its size): with a small learning rate, plain
    bf16 AdamW stops moving. This notebook fits a least-squares problem with
    AdamW in float32, in plain bfloat16, and with the two cures —
    `param_rounding="stochastic"` (torchao's stochastic rounding) and
    `param_rounding="kahan"` (torch-optimi's Kahan sums) — and with 8-bit
    block-wise quantized moments (`moment_bits=8`, torchao's `AdamW8bit`).
    """),
  code("""
    import os
    import jax, jax.numpy as jnp, numpy as np, optax
    import matplotlib.pyplot as plt
    import adamw_jax

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
    """),
  md("""
    Plain bfloat16 stalls once the steps fall below half an ulp; the cures track float32.
    """),
  code("""
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, (curve, _) in runs.items():
      ax.semilogy(curve, label=name)
    ax.set(xlabel="step", ylabel="training loss", title="bf16 AdamW: the stall and its cures")
    ax.legend()
    if os.environ.get("SAVE_IMAGES"):
      fig.savefig("images/04_low_memory.png", dpi=110, bbox_inches="tight")
    plt.show()
    fp32, plain = runs["fp32"][0][-1], runs["bf16 plain"][0][-1]
    assert plain > 2 * fp32, "plain bf16 should stall"
    for name in ("bf16 + stochastic rounding", "bf16 + Kahan", "fp32 + 8-bit moments"):
      assert runs[name][0][-1] < 2 * fp32 + 1e-3, name
    """),
]


def write(name: str, cells) -> pathlib.Path:
  nb = v4.new_notebook(
    cells=cells,
    metadata={
      "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
      "language_info": {"name": "python"},
    },
  )
  path = HERE / name
  nbformat.write(nb, path)
  return path


def execute(path: pathlib.Path) -> None:
  from nbclient import NotebookClient

  nb = nbformat.read(path, as_version=4)
  os.environ["SAVE_IMAGES"] = "1"
  NotebookClient(
    nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(HERE)}}
  ).execute()
  for cell in nb.cells:  # print what the notebook printed (its figures are in images/)
    for out in cell.get("outputs", []):
      if out.get("name") == "stdout":
        print(out["text"], end="")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument(
    "--images",
    action="store_true",
    help="execute the notebooks and save their figures to notebooks/images/",
  )
  args = parser.parse_args()
  paths = [
    write("01_quickstart.ipynb", QUICKSTART),
    write("02_adam_vs_adamw.ipynb", ADAM_VS_ADAMW),
    write("03_pytorch_to_jax.ipynb", MIGRATION),
    write("04_low_memory.ipynb", LOW_MEMORY),
  ]
  for path in paths:
    print(f"wrote {path.relative_to(HERE.parent)}")
    if args.images:
      execute(path)


if __name__ == "__main__":
  main()
