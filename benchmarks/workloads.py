"""The parameter trees timed by ``benchmarks.speed``: float32, fixed random values.

Each workload is a name and a function of a size ``scale`` (1 for the real
benchmark, small for ``--quick``) returning a dict pytree of NumPy arrays. The
gradients are a second tree of the same shapes, drawn once and kept fixed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


class Workload(NamedTuple):
  name: str
  shapes: Callable[[bool], dict]  # quick -> {path: shape} nested dict


def _one_leaf(quick: bool) -> dict:
  return {"w": (100_000 if quick else 16_000_000,)}


def transformer(d: int, ff: int, vocab: int, blocks: int) -> dict:
  """A decoder-only transformer's tree: an embedding and `blocks` blocks of 12 leaves."""
  block = {
    "ln1": {"scale": (d,), "bias": (d,)},
    "attn": {
      "qkv": {"kernel": (d, 3 * d), "bias": (3 * d,)},
      "out": {"kernel": (d, d), "bias": (d,)},
    },
    "ln2": {"scale": (d,), "bias": (d,)},
    "mlp": {"fc1": {"kernel": (d, ff), "bias": (ff,)}, "fc2": {"kernel": (ff, d), "bias": (d,)}},
  }
  tree = {f"block{i}": block for i in range(blocks)}
  tree["embed"] = {"embedding": (vocab, d)}
  return tree


def _transformer(quick: bool) -> dict:
  """:func:`transformer` with 6 blocks (73 leaves), d_model 512, MLP 2048, vocabulary 8192: 23.1M parameters."""
  return transformer(32, 128, 64, 1) if quick else transformer(512, 2048, 8192, 6)


def _many_leaves(quick: bool) -> dict:
  leaves, size = (20, 100) if quick else (2000, 1000)
  return {f"p{i:05d}": (size,) for i in range(leaves)}


class _Block(nn.Module):
  features: int
  strides: int

  @nn.compact
  def __call__(self, x, train: bool = False):
    norm = lambda: nn.BatchNorm(use_running_average=not train)
    y = nn.Conv(self.features, (3, 3), (self.strides, self.strides), use_bias=False)(x)
    y = nn.relu(norm()(y))
    y = norm()(nn.Conv(self.features, (3, 3), use_bias=False)(y))
    if self.strides != 1 or x.shape[-1] != self.features:
      x = norm()(nn.Conv(self.features, (1, 1), (self.strides, self.strides), use_bias=False)(x))
    return nn.relu(x + y)


class ResNet18(nn.Module):
  """ResNet-18 for 32x32 images (CIFAR-style stem), flax.linen."""

  width: int = 64
  stages: int = 4
  classes: int = 10

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(self.width, (3, 3), use_bias=False)(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train)(x))
    for stage in range(self.stages):
      for block in range(2):
        x = _Block(self.width * 2**stage, 2 if stage and not block else 1)(x, train)
    return nn.Dense(self.classes)(jnp.mean(x, axis=(1, 2)))


def _resnet(quick: bool) -> dict:
  """The ``params`` collection of a Flax ResNet-18 (62 leaves, 11.2M), by ``jax.eval_shape``."""
  model = ResNet18(width=8, stages=1) if quick else ResNet18()
  variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  return jax.tree.map(lambda s: tuple(s.shape), variables["params"])


WORKLOADS = (
  Workload("one 16M-element leaf", _one_leaf),
  Workload("transformer-like tree (73 leaves)", _transformer),
  Workload("2000 leaves x 1k", _many_leaves),
  Workload("Flax ResNet-18 params", _resnet),
)


def arrays(shapes: dict, seed: int, scale: float = 1.0) -> dict:
  """Random float32 NumPy arrays with the given shapes (a tree of shape tuples)."""
  rng = np.random.default_rng(seed)
  is_shape = lambda s: isinstance(s, tuple)
  return jax.tree.map(
    lambda s: (rng.standard_normal(s) * scale).astype(np.float32), shapes, is_leaf=is_shape
  )


def count(shapes: dict) -> tuple[int, int]:
  """(number of parameters, number of leaves)."""
  leaves = jax.tree.leaves(shapes, is_leaf=lambda s: isinstance(s, tuple))
  return sum(int(np.prod(s)) for s in leaves), len(leaves)
