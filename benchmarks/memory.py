"""Low-memory AdamW: state bytes per parameter, step time and final loss / accuracy.

``python -m benchmarks.memory [--quick] [--out DIR]`` trains two small real
models with seven optimizer settings and writes ``memory.md``, ``memory.json``
and ``memory.png`` to ``benchmarks/results/``:

- the digits CNN of :mod:`adamw_jax.demo` (scikit-learn's 8x8 digits),
- a 2-layer transformer LM on a generated corpus (a fixed random Markov chain
  over 32 tokens), next-token cross-entropy;

for: float32 parameters and moments; bfloat16 parameters and moments written
round-to-nearest ("bf16 plain"); the same with ``param_rounding="stochastic"``,
``"kahan"`` and ``"remainder"`` (bfloat16 parameters whose int16 remainders make
them the float32 masters exactly, float32 moments); float32 parameters with ``moment_bits=8`` and ``4``. The forward pass
runs in float32 (bfloat16 is the storage of parameters and moments), so the
differences are the optimizer's writes alone. A few minutes on 2 CPU cores;
``--quick`` (a test runs it: one epoch of 10 batches) in about a minute.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import adamw_jax
from adamw_jax import demo
from benchmarks import output


class Setting(NamedTuple):
  name: str
  dtype: Any
  options: dict


SETTINGS = (
  Setting("fp32", jnp.float32, {}),
  Setting("bf16 plain", jnp.bfloat16, {}),
  Setting("bf16 + stochastic rounding", jnp.bfloat16, {"param_rounding": "stochastic"}),
  Setting("bf16 + Kahan", jnp.bfloat16, {"param_rounding": "kahan"}),
  Setting("bf16 + remainders (exact fp32 masters)", jnp.bfloat16, {"param_rounding": "remainder"}),
  Setting("fp32 + 8-bit moments", jnp.float32, {"moment_bits": 8}),
  Setting("fp32 + 4-bit moments", jnp.float32, {"moment_bits": 4}),
)


class Task(NamedTuple):
  name: str
  init: Callable[[jax.Array], Any]  # key -> float32 params
  loss: Callable[[Any, Any], jax.Array]  # (float32 params, batch) -> loss
  batches: Callable[[int], list]  # epoch -> batches
  evaluate: Callable[[Any], dict]  # float32 params -> metrics
  lr: float
  epochs: int


def _digits_task(quick: bool) -> Task:
  x_tr, y_tr, x_val, y_val = demo.load_data()
  model = demo.CNN()

  def loss(params, batch):
    x, y = batch
    return optax.softmax_cross_entropy_with_integer_labels(model.apply(params, x), y).mean()

  def batches(epoch):
    rng = np.random.default_rng(epoch)
    chosen = [(x_tr[i], y_tr[i]) for i in demo.batches(len(x_tr), 32, rng)]
    return chosen[:10] if quick else chosen  # --quick: a smoke run, the numbers mean nothing

  @jax.jit  # compiled once for every setting: the parameters are float32 here
  def evaluate_logits(params):
    return model.apply(params, x_val)

  def evaluate(params):
    logits = evaluate_logits(params)
    return {
      "val_loss": float(optax.softmax_cross_entropy_with_integer_labels(logits, y_val).mean()),
      "val_acc": float((logits.argmax(-1) == y_val).mean()),
    }

  return Task(
    "digits CNN",
    lambda key: model.init(key, x_tr[:1]),
    loss,
    batches,
    evaluate,
    lr=3e-4,
    epochs=1 if quick else 5,
  )


class _LM(nn.Module):
  vocab: int = 32
  d: int = 64
  layers: int = 2

  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(self.vocab, self.d)(tokens) + self.param(
      "pos", nn.initializers.normal(0.02), (tokens.shape[-1], self.d)
    )
    mask = nn.make_causal_mask(tokens)
    for _ in range(self.layers):
      x = x + nn.SelfAttention(num_heads=4, qkv_features=self.d)(nn.LayerNorm()(x), mask=mask)
      h = nn.Dense(4 * self.d)(nn.LayerNorm()(x))
      x = x + nn.Dense(self.d)(nn.gelu(h))
    return nn.Dense(self.vocab)(nn.LayerNorm()(x))


def _corpus(n_tokens: int, vocab: int = 32, seed: int = 0) -> np.ndarray:
  """A fixed random Markov chain: each token has 3 likely successors (entropy ~1.2 nats)."""
  rng = np.random.default_rng(seed)
  logits = rng.standard_normal((vocab, vocab))
  logits[np.arange(vocab)[:, None], rng.integers(0, vocab, (vocab, 3))] += 4.0
  probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  out = np.empty(n_tokens, np.int32)
  out[0] = 0
  u = rng.random(n_tokens)
  cdf = probs.cumsum(-1)
  for t in range(1, n_tokens):
    out[t] = min(int(np.searchsorted(cdf[out[t - 1]], u[t])), vocab - 1)
  return out


def _lm_task(quick: bool) -> Task:
  seq, batch = 32, 16
  tokens = _corpus(8_000 if quick else 60_000)
  train, val = tokens[:-4096], tokens[-4096:]
  model = _LM()

  def loss(params, batch_tokens):
    logits = model.apply(params, batch_tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch_tokens[:, 1:]).mean()

  def batches(epoch):
    rng = np.random.default_rng(100 + epoch)
    starts = rng.integers(0, len(train) - seq - 1, (10 if quick else 300, batch))
    return [np.stack([train[s : s + seq + 1] for s in row]) for row in starts]

  windows = np.stack([val[s : s + seq + 1] for s in range(0, len(val) - seq - 1, seq)])
  val_loss = jax.jit(lambda params: loss(params, windows))  # compiled once for every setting

  def evaluate(params):
    return {"val_loss": float(val_loss(params))}

  return Task(
    "transformer LM",
    lambda key: model.init(key, train[None, :seq]),
    loss,
    batches,
    evaluate,
    lr=3e-4,
    epochs=1 if quick else 3,
  )


def _state_bytes(state) -> int:
  return sum(int(x.nbytes) for x in jax.tree.leaves(state))


def _run(task: Task, setting: Setting) -> dict:
  params32 = task.init(jax.random.PRNGKey(0))
  params = jax.tree.map(lambda p: p.astype(setting.dtype), params32)
  n = sum(int(p.size) for p in jax.tree.leaves(params))
  tx = adamw_jax.adamw(task.lr, weight_decay=1e-2, **setting.options)
  state = tx.init(params)
  bytes_per_param = _state_bytes(state) / n

  @jax.jit
  def train_step(params, state, batch):
    wide = lambda p: jax.tree.map(lambda x: x.astype(jnp.float32), p)
    loss, grads = jax.value_and_grad(lambda p: task.loss(wide(p), batch))(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  @jax.jit
  def optimizer_step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  curve = []
  for epoch in range(task.epochs):
    losses = []
    for batch in task.batches(epoch):
      params, state, loss = train_step(params, state, batch)
      losses.append(float(loss))
    metrics = task.evaluate(jax.tree.map(lambda x: x.astype(jnp.float32), params))
    curve.append({"epoch": epoch + 1, "train_loss": float(np.mean(losses)), **metrics})
  grads = jax.tree.map(lambda p: jnp.full_like(p, 1e-3), params)
  jax.block_until_ready(optimizer_step(params, state, grads))
  times = []
  for _ in range(5 if len(task.batches(0)) < 50 else 20):
    start = time.perf_counter()
    jax.block_until_ready(optimizer_step(params, state, grads))
    times.append(time.perf_counter() - start)
  return {
    "task": task.name,
    "setting": setting.name,
    "params": n,
    "state_bytes_per_param": bytes_per_param,
    "step_ms": 1e3 * float(np.median(times)),
    "curve": curve,
    "final": curve[-1],
  }


def _table(rows: list[dict]) -> str:
  lines = []
  for task in dict.fromkeys(r["task"] for r in rows):
    mine = [r for r in rows if r["task"] == task]
    fp32 = next(r for r in mine if r["setting"] == "fp32")["final"]
    acc = "val_acc" in fp32
    lines += [
      f"### {task} ({mine[0]['params']:,} parameters, {len(mine[0]['curve'])} epochs)",
      "",
      "| setting | state bytes / param | optimizer step (ms) | final val loss | gap to fp32 |"
      + (" val accuracy |" if acc else ""),
      "|---|---|---|---|---|" + ("---|" if acc else ""),
    ]
    for r in mine:
      f = r["final"]
      lines.append(
        f"| {r['setting']} | {r['state_bytes_per_param']:.2f} | {r['step_ms']:.2f} | "
        f"{f['val_loss']:.4f} | {f['val_loss'] - fp32['val_loss']:+.4f} |"
        + (f" {f['val_acc']:.3f} |" if acc else "")
      )
    lines.append("")
  return "\n".join(lines)


def _plot(rows: list[dict], path: Path) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  tasks = list(dict.fromkeys(r["task"] for r in rows))
  fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4))
  for ax, task in zip(np.atleast_1d(axes), tasks):
    for r in (r for r in rows if r["task"] == task):
      ax.plot(
        [c["epoch"] for c in r["curve"]],
        [c["val_loss"] for c in r["curve"]],
        marker="o",
        label=f"{r['setting']} ({r['state_bytes_per_param']:.1f} B/param)",
      )
    ax.set(title=task, xlabel="epoch", ylabel="validation loss")
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv: Sequence[str] | None = None) -> list[dict]:
  p = argparse.ArgumentParser(
    prog="python -m benchmarks.memory", description=__doc__.split("\n")[0]
  )
  p.add_argument("--quick", action="store_true", help="fewer epochs and batches (a test runs it)")
  p.add_argument(
    "--out",
    type=Path,
    help="output directory (default benchmarks/results/; --quick: a temporary one)",
  )
  args = p.parse_args(argv)
  rows = []
  for task in (_digits_task(args.quick), _lm_task(args.quick)):
    for setting in SETTINGS:
      rows.append(_run(task, setting))
      f = rows[-1]["final"]
      print(
        f"{task.name:15s} {setting.name:28s} {rows[-1]['state_bytes_per_param']:5.2f} B/param "
        f"{rows[-1]['step_ms']:7.2f} ms  val loss {f['val_loss']:.4f}"
        + (f"  acc {f['val_acc']:.3f}" if "val_acc" in f else ""),
        flush=True,
      )
  out = output.out_dir(args.out, args.quick, "memory")
  (out / "memory.json").write_text(json.dumps(rows, indent=1))
  (out / "memory.md").write_text(
    "# Low-memory AdamW: `python -m benchmarks.memory`\n\n" + _table(rows)
  )
  _plot(rows, out / "memory.png")
  print(f"wrote {out / 'memory.md'}, memory.json and memory.png")
  return rows


if __name__ == "__main__":
  main()
