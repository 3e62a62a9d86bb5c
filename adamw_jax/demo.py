"""Train a small CNN on scikit-learn's digits with ``adamw_jax.adamw``.

Run ``python -m adamw_jax.demo`` (``--help`` lists the options). It shows, as a
user would write them:

- a Flax CNN (two 3x3 SiLU convolutions with 16 and 32 channels, 2x2 average
  pooling, a Dense head) on the 8x8 digit images, pixels scaled to [0, 1], with a
  fixed stratified 80/20 train/validation split (seed 0);
- ``adamw_jax.adamw`` (torch's AdamW as an optax transform) with a learning-rate
  schedule, linear warmup from 0 to ``--lr`` over the first 10 % of the steps
  then cosine decay to ``--lr / 100``, and a weight-decay mask that decays the
  conv and Dense kernels but never the biases;
- the hyperparameters: a peak lr of 1e-2 is high for Adam but fine for so small a
  model, and reaches ~98 % validation accuracy in 10 short epochs. AdamW's decay
  is decoupled and, as in torch, scaled by the scheduled lr: each step multiplies
  a kernel by ``1 - lr_t * weight_decay``, so the decay alone shrinks the kernels
  by ``exp(-weight_decay * sum(lr_t))`` over the run, about 10 % for the default
  5e-2 (sum(lr_t) = 2.2): mild, as suits so small a model. It is neither an L2
  coefficient nor optax.adamw's ``weight_decay``;
- a jitted train step, validation accuracy in one jitted call, and a per-epoch
  table of the lr, the train loss and the validation accuracy.

``--compare-torch`` builds the same CNN with ``torch.nn`` from the very same
initial weights and trains it with ``torch.optim.AdamW`` (two param groups for
the mask, ``LambdaLR`` for the schedule) on the same batches in the same order,
and prints both curves side by side and the largest parameter difference.
It stays at float32 rounding (~1e-7): XLA and torch round the convolutions
differently. (SiLU rather than ReLU keeps it there: with ReLU, a unit whose input
is within rounding of 0 can be on in one run and off in the other, after which
the parameters drift apart, to ~1e-2 by the end, while the curves stay the same.)
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, cast

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from tqdm import tqdm

import adamw_jax

Params = Any


class CNN(nn.Module):
  """Conv(16, 3x3) - SiLU - Conv(32, 3x3) - SiLU - AvgPool(2x2) - Dense(10), on NHWC input."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = nn.silu(nn.Conv(16, (3, 3), padding="SAME")(x))
    x = nn.silu(nn.Conv(32, (3, 3), padding="SAME")(x))
    x = nn.avg_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape((x.shape[0], -1))  # flattened in (height, width, channel) order
    return nn.Dense(10)(x)


def decay_mask(params: Params) -> Params:
  """True for the leaves that get weight decay: the kernels (named 'kernel', ndim >= 2)."""
  return jax.tree_util.tree_map_with_path(
    lambda path, p: path[-1].key == "kernel" and p.ndim >= 2, params
  )


def load_data() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """Digits as (N, 8, 8, 1) float32 in [0, 1], split 80/20, stratified, seed 0."""
  digits: Any = load_digits()  # a Bunch (sklearn infers Bunch | tuple: return_X_y is False)
  images = (digits.images / 16.0).astype(np.float32)[..., None]
  labels = digits.target.astype(np.int32)
  x_tr, x_val, y_tr, y_val = cast(
    list[np.ndarray],
    train_test_split(images, labels, test_size=0.2, stratify=labels, random_state=0),
  )  # arrays in, arrays out
  return x_tr, y_tr, x_val, y_val


def batches(n: int, batch_size: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
  """Indices of one epoch's shuffled batches; the last partial batch is dropped."""
  order = rng.permutation(n)
  for start in range(0, n - batch_size + 1, batch_size):
    yield order[start : start + batch_size]


def positive(text: str) -> int:
  if int(text) < 1:
    raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
  return int(text)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(
    prog="python -m adamw_jax.demo", description=(__doc__ or "").split("\n")[0]
  )
  p.add_argument("--epochs", type=positive, default=10, help="number of epochs (default: 10)")
  p.add_argument("--batch-size", type=positive, default=32, help="batch size (default: 32)")
  p.add_argument("--lr", type=float, default=1e-2, help="peak learning rate (default: 1e-2)")
  p.add_argument(
    "--weight-decay",
    type=float,
    default=5e-2,
    help="AdamW weight decay, kernels only (default: 5e-2)",
  )
  p.add_argument("--seed", type=int, default=0, help="init and shuffling seed (default: 0)")
  p.add_argument(
    "--compare-torch",
    action="store_true",
    help="also train the same CNN with torch.optim.AdamW and compare",
  )
  p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
  return p.parse_args(argv)


def torch_layout(params: Params) -> dict[str, np.ndarray]:
  """Flax params under torch names and layouts: HWIO conv -> OIHW, Dense (in, out) -> (out, in)."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    layer, kind = path[-2].key, path[-1].key
    a = np.asarray(leaf)
    if kind == "kernel":
      a = a.transpose(3, 2, 0, 1) if a.ndim == 4 else a.T
    out[f"{layer}.{'weight' if kind == 'kernel' else 'bias'}"] = a
  return out


class TorchRun:
  """The same CNN, optimizer, mask and schedule in torch, from the same initial weights."""

  def __init__(self, params: Params, lr_at: Callable[[int], float], weight_decay: float):
    import torch  # only --compare-torch needs torch

    torch.set_num_threads(1)  # the model is tiny: extra threads cost more than they save
    tnn = torch.nn

    class TorchCNN(tnn.Module):
      def __init__(self) -> None:
        super().__init__()
        self.Conv_0 = tnn.Conv2d(1, 16, 3, padding=1)  # named as the Flax modules
        self.Conv_1 = tnn.Conv2d(16, 32, 3, padding=1)
        self.Dense_0 = tnn.Linear(4 * 4 * 32, 10)

      def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: NCHW
        x = tnn.functional.silu(self.Conv_1(tnn.functional.silu(self.Conv_0(x))))
        x = tnn.functional.avg_pool2d(x, 2)
        return self.Dense_0(x.permute(0, 2, 3, 1).flatten(1))  # flattened as Flax: (h, w, c)

    self.torch = torch
    self.model = TorchCNN()
    self.model.load_state_dict(
      {k: torch.from_numpy(a.copy()) for k, a in torch_layout(params).items()}
    )
    decayed = torch_layout(decay_mask(params))  # the same mask, under torch's names
    named = list(self.model.named_parameters())
    groups = [
      {"params": [p for n, p in named if decayed[n]], "weight_decay": weight_decay},
      {"params": [p for n, p in named if not decayed[n]], "weight_decay": 0.0},
    ]
    # foreach=False (torch's CPU default) is the path adamw_jax follows op for op.
    # LambdaLR: lr = 1.0 * lr_at(t) for the t-th step, as optax's count.
    self.opt = torch.optim.AdamW(groups, lr=1.0, foreach=False)
    self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_at)

  def _nchw(self, x: np.ndarray) -> Any:
    return self.torch.from_numpy(x.transpose(0, 3, 1, 2).copy())

  def step(self, x: np.ndarray, y: np.ndarray) -> float:
    loss = self.torch.nn.functional.cross_entropy(
      self.model(self._nchw(x)), self.torch.from_numpy(y).long()
    )
    self.opt.zero_grad()
    loss.backward()
    self.opt.step()
    self.sched.step()
    return loss.item()

  def accuracy(self, x: np.ndarray, y: np.ndarray) -> float:
    with self.torch.no_grad():
      return float((self.model(self._nchw(x)).argmax(1).numpy() == y).mean())

  def max_abs_diff(self, params: Params) -> float:
    theirs = {k: v.detach().numpy() for k, v in self.model.state_dict().items()}
    return max(float(np.abs(a - theirs[k]).max()) for k, a in torch_layout(params).items())


def main(argv: Sequence[str] | None = None) -> float:
  """Trains the CNN, prints the per-epoch table and returns the final validation accuracy."""
  args = parse_args(argv)
  t0 = time.perf_counter()
  x_tr, y_tr, x_val, y_val = load_data()
  steps_per_epoch = len(x_tr) // args.batch_size
  total_steps = args.epochs * steps_per_epoch
  if total_steps < 2:
    sys.exit(f"--epochs x (train images // --batch-size) must be at least 2, got {total_steps}")

  model = CNN()
  params = jax.jit(model.init)(jax.random.key(args.seed), jnp.zeros((1, 8, 8, 1)))["params"]
  schedule = optax.warmup_cosine_decay_schedule(
    init_value=0.0,
    peak_value=args.lr,
    warmup_steps=max(1, total_steps // 10),
    decay_steps=total_steps,
    end_value=args.lr / 100,
  )
  optimizer = adamw_jax.adamw(schedule, weight_decay=args.weight_decay, mask=decay_mask)
  opt_state = optimizer.init(params)
  # The lr of step t (t = 0, 1, ...). Jitted, as inside the optimizer: evaluated op by op,
  # the schedule differs from its jitted value by one float32 ulp at some steps.
  jit_schedule = jax.jit(schedule)

  def lr_at(t: int) -> float:
    return float(jit_schedule(t))

  torch_run: TorchRun | None = None
  if args.compare_torch:
    try:
      torch_run = TorchRun(params, lr_at, args.weight_decay)
    except ImportError as e:
      print(
        f"--compare-torch needs PyTorch, which cannot be imported ({e}); "
        "install it with: pip install 'adamw_jax[torch]'",
        file=sys.stderr,
      )
      raise SystemExit(2) from e

  def loss_fn(params: Params, x: jax.Array, y: jax.Array) -> jax.Array:
    logits = cast(jax.Array, model.apply({"params": params}, x))  # not (out, state): no mutable=
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  @jax.jit
  def train_step(params: Params, opt_state: Any, x: jax.Array, y: jax.Array):
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  @jax.jit
  def accuracy(params: Params, x: jax.Array, y: jax.Array) -> jax.Array:
    return (cast(jax.Array, model.apply({"params": params}, x)).argmax(-1) == y).mean()

  columns = ["epoch", "lr", "train loss", "val acc"]
  if torch_run is not None:
    columns = [
      "epoch",
      "lr",
      "loss jax",
      "loss torch",
      "val acc jax",
      "val acc torch",
      "max |dparam|",
    ]
  header = " | ".join(f"{c:>9}" for c in columns)  # columns are at least 9 wide
  print(
    f"digits: {len(x_tr)} train / {len(x_val)} validation images, "
    f"epochs: {args.epochs} x {steps_per_epoch} steps of batch {args.batch_size}"
  )
  print(header + "\n" + "-" * len(header))

  rng = np.random.default_rng(args.seed)
  bar = tqdm(total=total_steps, disable=args.no_progress, unit="step", leave=False)
  val_acc = 0.0
  for epoch in range(1, args.epochs + 1):
    losses: list[jax.Array] = []
    torch_losses: list[float] = []
    for idx in batches(len(x_tr), args.batch_size, rng):
      params, opt_state, loss = train_step(params, opt_state, x_tr[idx], y_tr[idx])
      losses.append(loss)
      if torch_run is not None:
        torch_losses.append(torch_run.step(x_tr[idx], y_tr[idx]))
      bar.update()
    val_acc = float(accuracy(params, x_val, y_val))
    cells = [
      f"{epoch}",
      f"{lr_at(epoch * steps_per_epoch - 1):.2e}",
      f"{float(jnp.mean(jnp.stack(losses))):.4f}",
    ]
    if torch_run is None:
      cells += [f"{val_acc:.4f}"]
    else:
      cells += [
        f"{np.mean(torch_losses):.4f}",
        f"{val_acc:.4f}",
        f"{torch_run.accuracy(x_val, y_val):.4f}",
        f"{torch_run.max_abs_diff(params):.1e}",
      ]
    bar.write(" | ".join(f"{c:>{max(9, len(h))}}" for c, h in zip(cells, columns)), file=sys.stdout)
  bar.close()

  print(f"final validation accuracy: {val_acc:.4f}")
  if torch_run is not None:
    print(f"max |param difference| JAX vs torch: {torch_run.max_abs_diff(params):.3e}")
    print("(float32 rounding: XLA and torch sum the convolutions in different orders)")
  print(f"total wall time: {time.perf_counter() - t0:.1f} s")
  return val_acc


if __name__ == "__main__":
  main()
