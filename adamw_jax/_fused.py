"""``fused_step``: update + ``optax.apply_updates`` in one pass, as torch's ``optimizer.step()``."""

from __future__ import annotations

from typing import Any

import optax

from adamw_jax import _core


def fused_step(
  tx: optax.GradientTransformation, grads: Any, state: _core.ScaleByAdamState, params: Any
) -> tuple[Any, _core.ScaleByAdamState]:
  """One optimizer step in place: returns ``(new_params, new_state)``.

  The same results bit for bit as ``updates, state = tx.update(grads, state,
  params); params = optax.apply_updates(params, updates)``, but on the CPU the
  native kernel reads and writes each of params, grads and moments once (28
  bytes per float32 parameter, as torch's fused AdamW) instead of also writing
  the updates and reading them back. Jit the training step with the
  parameters and optimizer state donated (``donate_argnums``), parameters
  first, so that they are updated in their own buffers (``jit`` pairs donated
  inputs with same-shaped outputs in order). Elsewhere (GPU, TPU, several devices, or
  ``ADAMW_JAX_NATIVE=0``) it is exactly ``update`` followed by
  ``optax.apply_updates``.

  Args:
    tx: a transform made by [`adamw`][adamw_jax.adamw] or [`adam`][adamw_jax.adam]
      (not a chain: the step is the whole optimizer).
    grads: the gradients, a tree like `params`.
    state: ``tx``'s state.
    params: the parameters.

  Example:
    >>> import jax, jax.numpy as jnp, optax, adamw_jax
    >>> tx = adamw_jax.adamw(1e-3)
    >>> params = {"w": jnp.ones(3)}
    >>> grads = {"w": jnp.full(3, 0.5)}
    >>> state = tx.init(params)
    >>> updates, _ = tx.update(grads, state, params)
    >>> expected = optax.apply_updates(params, updates)
    >>> # params and state donated, in the order of the results:
    >>> step = jax.jit(lambda p, s, g: adamw_jax.fused_step(tx, g, s, p), donate_argnums=(0, 1))
    >>> params, state = step(params, state, grads)
    >>> bool((params["w"] == expected["w"]).all())
    True
  """
  update = getattr(tx, "update", None)
  if not isinstance(update, _core.AdamUpdate):
    raise TypeError(
      "fused_step: tx must be made by adamw_jax.adamw or adamw_jax.adam (not a chain, "
      f"a wrapper or another optimizer); got a transform whose update is {update!r}. "
      "For other transforms use tx.update followed by optax.apply_updates."
    )
  return update.step(grads, state, params)
