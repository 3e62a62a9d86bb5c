"""``fused_update``: ``nnx.Optimizer.update`` through ``fused_step``, for Flax NNX loops."""

from __future__ import annotations

from typing import Any

from adamw_jax._fused import fused_step


def fused_update(optimizer: Any, model: Any, grads: Any) -> None:
  """``optimizer.update(model, grads)`` for an ``nnx.Optimizer``, by [`fused_step`][adamw_jax.fused_step].

  The same parameters, optimizer state and step count bit for bit as
  ``nnx.Optimizer.update`` (which is ``tx.update`` + ``optax.apply_updates``
  on the model's ``wrt`` state), written into `model` and `optimizer` as it
  writes them; the model's other state (BatchNorm statistics, dropout RNG
  counts) is the forward pass's, untouched here. ``optimizer.tx`` is any
  transform ``fused_step`` serves (``adamw``, ``adam``, ``clipped``,
  ``optax.MultiSteps`` around them). It returns nothing (the fused step has
  no separate updates to return). Call it inside ``nnx.jit``, as
  ``optimizer.update``.

  Args:
    optimizer: an ``nnx.Optimizer`` of `model`.
    model: the NNX module whose ``optimizer.wrt`` variables are updated.
    grads: the gradients, from ``nnx.grad`` (as for ``optimizer.update``).

  Example:
    >>> import jax.numpy as jnp, adamw_jax
    >>> from flax import nnx
    >>> model = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
    >>> optimizer = nnx.Optimizer(model, adamw_jax.adamw(1e-3), wrt=nnx.Param)
    >>> loss_fn = lambda model, x: (model(x) ** 2).mean()
    >>> @nnx.jit
    ... def train_step(model, optimizer, x):
    ...   grads = nnx.grad(loss_fn)(model, x)
    ...   adamw_jax.fused_update(optimizer, model, grads)  # was: optimizer.update(model, grads)
    >>> train_step(model, optimizer, jnp.ones((4, 2)))
    >>> int(optimizer.step[...])
    1
  """
  from flax import nnx

  if not isinstance(optimizer, nnx.Optimizer):
    raise TypeError(
      f"fused_update: optimizer must be an nnx.Optimizer, got {type(optimizer).__name__}; "
      "outside NNX call adamw_jax.fused_step(tx, grads, state, params)"
    )
  graph = getattr(optimizer, "graph", None)
  params = nnx.as_pure(nnx.state(model, optimizer.wrt, graph=graph))
  grads = nnx.as_pure(nnx.state(grads, optimizer.wrt, graph=graph))
  opt_state = nnx.as_pure(optimizer.opt_state)
  new_params, new_opt_state = fused_step(optimizer.tx, grads, opt_state, params)
  nnx.update(model, new_params)
  nnx.update(optimizer.opt_state, nnx.state(new_opt_state, graph=graph))
  optimizer.step[...] += 1
