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
# # Moving a training run from PyTorch to JAX, optimizer state and all
#
# Porting a model to JAX usually means restarting optimisation: the weights can be
# copied, but Adam's moments and step count stay behind, and the first steps with
# fresh moments are large ones. `adamw_jax.from_torch` carries the optimizer over:
# `torch.optim.AdamW`'s `step`, `exp_avg`, `exp_avg_sq` (and `max_exp_avg_sq`) become
# the state of the equivalent `adamw_jax` transform, param groups included.
#
# This notebook trains a small CNN on scikit-learn's 8×8 digits with `torch.optim.AdamW`,
# moves it half-way to an identical Flax NNX model, finishes in JAX, and plots the
# loss against a run that stayed in PyTorch (and against a JAX run that restarted the
# optimizer from scratch). At the end it goes back: `adamw_jax.to_torch_state_dict`.

# %%
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

plt.rcParams["figure.dpi"] = 60  # the resolution of images/03_pytorch_to_jax.png (the docs show it)

torch.manual_seed(0)
torch.set_num_threads(1)  # the tensors are tiny: threads cost more than they save

# %% [markdown]
# ## Data: the digits, 80/20 split, pixels in [0, 1]

# %%
digits = load_digits()
x_train, x_val, y_train, y_val = train_test_split(
  (digits.images / 16.0).astype(np.float32),
  digits.target,
  test_size=0.2,
  stratify=digits.target,
  random_state=0,
)
BATCH, STEPS, SWITCH = 128, 300, 150
rng = np.random.default_rng(0)
# the same batches for every run
batches = [rng.choice(len(x_train), BATCH, replace=False) for _ in range(STEPS)]
print(x_train.shape, x_val.shape)


# %% [markdown]
# ## Train in PyTorch for 150 steps
#
# Two param groups, the usual recipe: weights decayed, biases not. The model flattens
# in NHWC order (`permute` before `flatten`) so that its `Linear` sees the features
# in the order Flax's `reshape` gives them: that is model code, not optimizer state.


# %%
class TorchCNN(torch.nn.Module):
  def __init__(self):
    super().__init__()
    self.conv = torch.nn.Conv2d(1, 8, kernel_size=3, padding=1)
    self.fc = torch.nn.Linear(8 * 8 * 8, 64)
    self.head = torch.nn.Linear(64, 10)

  def forward(self, x):  # x: (N, 1, 8, 8)
    h = torch.nn.functional.silu(self.conv(x))
    h = h.permute(0, 2, 3, 1).flatten(1)  # NHWC order, as Flax
    return self.head(torch.nn.functional.silu(self.fc(h)))


torch_model = TorchCNN()
decay = [p for n, p in torch_model.named_parameters() if n.endswith("weight")]
no_decay = [p for n, p in torch_model.named_parameters() if n.endswith("bias")]
torch_opt = torch.optim.AdamW(
  [{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}], lr=3e-3
)

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


# %% [markdown]
# ## Move to Flax NNX
#
# The same architecture in Flax. `adamw_jax.flax_layout` maps torch names to Flax
# paths and layouts: `conv.weight` (O, I, H, W) → `conv/kernel` (H, W, I, O),
# `fc.weight` (out, in) → `fc/kernel` (in, out), biases as they are. We use it for the
# weights here, and `from_torch` uses it for the moments.


# %%
class FlaxCNN(nnx.Module):
  def __init__(self, rngs):
    self.conv = nnx.Conv(1, 8, kernel_size=(3, 3), padding="SAME", rngs=rngs)
    self.fc = nnx.Linear(8 * 8 * 8, 64, rngs=rngs)
    self.head = nnx.Linear(64, 10, rngs=rngs)

  def __call__(self, x):  # x: (N, 8, 8, 1)
    h = nnx.silu(self.conv(x)).reshape(x.shape[0], -1)
    return self.head(nnx.silu(self.fc(h)))


flax_model = FlaxCNN(nnx.Rngs(0))
template = nnx.as_pure(nnx.state(flax_model, nnx.Param))  # the paths and shapes to fill
mapping = adamw_jax.flax_layout(template)

torch_weights = {}
for name, p in torch_model.named_parameters():
  path, axes = mapping(name)
  print(f"{name:12s} {tuple(p.shape)!s:16s} -> {path:12s} axes {axes}")
  torch_weights[path] = p.detach().numpy().transpose(axes) if axes else p.detach().numpy()


def path_of(keys):
  return "/".join(str(k.key) for k in keys)


params = jax.tree_util.tree_map_with_path(
  lambda k, _: jnp.asarray(torch_weights[path_of(k)]), template
)
nnx.update(flax_model, params)

x_check = x_val[:64]
gap = np.max(
  np.abs(
    np.asarray(flax_model(jnp.asarray(x_check[..., None])))
    - torch_model(torch.tensor(x_check[:, None])).detach().numpy()
  )
)
print(f"max |flax logits - torch logits| = {gap:.2e}")

# %% [markdown]
# Now the optimizer. `names=torch_model` names the optimizer's parameters (matched by
# identity); the two torch param groups become an `adamw_jax.param_groups` transform
# with groups `group0` and `group1`, each holding its own moments and step count.

# %%
tx, opt_state = adamw_jax.from_torch(torch_opt, params, names=torch_model, mapping=mapping)
for group, inner in opt_state.inner_states.items():
  print(group, "step", int(inner.inner_state.count))
print(
  "exp_avg of fc.weight, transposed, equals mu of fc/kernel:",
  np.array_equal(
    torch_opt.state[torch_model.fc.weight]["exp_avg"].numpy().T,
    np.asarray(opt_state.inner_states["group0"].inner_state.mu["fc"]["kernel"]),
  ),
)

optimizer = nnx.Optimizer(flax_model, tx, wrt=nnx.Param)
nnx.update(optimizer.opt_state, nnx.state(opt_state))  # put torch's moments in

# %% [markdown]
# ## Finish in JAX, and the two references

# %%
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

jax_losses = [
  float(jax_step(flax_model, optimizer, jnp.asarray(batches[t]))) for t in range(SWITCH, STEPS)
]
restart_losses = [
  float(jax_step(restart_model, restart_opt, jnp.asarray(batches[t]))) for t in range(SWITCH, STEPS)
]
reference_losses = torch_losses + [
  torch_step(torch_model, torch_opt, t) for t in range(SWITCH, STEPS)
]
print(
  f"final loss: torch all the way {reference_losses[-1]:.4f}, moved to JAX {jax_losses[-1]:.4f}, "
  f"JAX with a fresh optimizer {restart_losses[-1]:.4f}"
)

# %% image="images/03_pytorch_to_jax.png"
steps = np.arange(1, STEPS + 1)
reference = np.array(reference_losses)
fig, (ax, ax_gap) = plt.subplots(1, 2, figsize=(12, 4))
ax.plot(steps, reference, label="PyTorch all the way", color="C0", lw=2.5, alpha=0.6)
ax.plot(
  steps[SWITCH:],
  jax_losses,
  label="moved to JAX at step 150, with optimizer state",
  color="C1",
  lw=1.2,
)
ax.plot(
  steps[SWITCH:],
  restart_losses,
  label="moved to JAX, optimizer restarted",
  color="C3",
  lw=1,
  ls="--",
)
ax.axvline(SWITCH, color="gray", lw=0.8, ls=":")
ax.set(
  xlabel="step",
  ylabel="train loss (batch of 128)",
  yscale="log",
  title="Digits CNN: AdamW in PyTorch, then adamw_jax",
)
ax.legend()
gap = lambda losses: np.abs(np.array(losses) - reference[SWITCH:]) + 1e-12
ax_gap.plot(steps[SWITCH:], gap(jax_losses), color="C1", label="with optimizer state")
ax_gap.plot(steps[SWITCH:], gap(restart_losses), color="C3", ls="--", label="optimizer restarted")
ax_gap.set(
  xlabel="step",
  ylabel="|loss - PyTorch's loss|",
  yscale="log",
  title="Distance from the run that stayed in PyTorch",
)
ax_gap.legend()
plt.tight_layout()
plt.show()


# %%
def accuracy_jax(model):
  return float(jnp.mean(jnp.argmax(model(jnp.asarray(x_val[..., None])), -1) == y_val))


def accuracy_torch(model):
  with torch.no_grad():
    return float((model(torch.tensor(x_val[:, None])).argmax(-1).numpy() == y_val).mean())


print(
  f"validation accuracy: PyTorch {accuracy_torch(torch_model):.3f}, moved to JAX "
  f"{accuracy_jax(flax_model):.3f}, JAX restarted {accuracy_jax(restart_model):.3f}"
)
print(
  "largest |moved - torch| over the losses of steps 151-300:",
  f"{np.max(np.abs(np.array(jax_losses) - np.array(reference_losses[SWITCH:]))):.2e}",
)

# %% [markdown]
# The JAX continuation follows the PyTorch run (the two frameworks round the
# convolution and the matrix products differently, so the curves agree to float32
# rounding, not bit for bit; given the same gradients the optimizer itself is bitwise
# torch's, see `tests/test_interop.py`). The run with a restarted optimizer is another
# run: its moments start from zero and its bias correction from step 1, it bumps right
# after the switch and then goes its own way, its loss ~1e-2 away from the PyTorch run's
# instead of float32 rounding (~1e-7) away.
#
# ## And back to PyTorch
#
# `to_torch_state_dict` writes a state dict that `load_state_dict` accepts: give it the
# torch optimizer that is to continue (here a fresh one over a fresh model with the
# same groups) and the same `names` / `mapping`.

# %%
final = {
  path_of(k): np.asarray(v)
  for k, v in jax.tree_util.tree_flatten_with_path(nnx.as_pure(nnx.state(flax_model, nnx.Param)))[0]
}
back_model = TorchCNN()
with torch.no_grad():
  for name, p in back_model.named_parameters():
    path, axes = mapping(name)
    p.copy_(torch.tensor(final[path].transpose(np.argsort(axes)) if axes else final[path]))
back_opt = torch.optim.AdamW(
  [
    {
      "params": [p for n, p in back_model.named_parameters() if n.endswith("weight")],
      "weight_decay": 0.05,
    },
    {
      "params": [p for n, p in back_model.named_parameters() if n.endswith("bias")],
      "weight_decay": 0.0,
    },
  ],
  lr=3e-3,
)
back_opt.load_state_dict(
  adamw_jax.to_torch_state_dict(back_opt, optimizer.opt_state, names=back_model, mapping=mapping)
)
print("torch step counts:", sorted({s["step"].item() for s in back_opt.state.values()}))
print(f"validation accuracy back in torch: {accuracy_torch(back_model):.3f}")
