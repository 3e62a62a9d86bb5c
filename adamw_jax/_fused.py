"""``fused_step``: update + ``optax.apply_updates`` in one pass, as torch's ``optimizer.step()``.

It serves the transforms made by ``adamw``/``adam``, ``clipped`` (the chain
``clip_by_global_norm`` then the optimizer) and ``optax.MultiSteps`` around
either; why these and how: [the fused step](native.md#the-fused-step).
"""

from __future__ import annotations

from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from adamw_jax import _core

_SERVED = (
  "adamw_jax.adamw, adamw_jax.adam, adamw_jax.clipped(...) or optax.MultiSteps around one of them"
)


def _multi_steps_of(tx: Any) -> optax.MultiSteps | None:
  """The ``optax.MultiSteps`` behind `tx`: itself, or its ``gradient_transformation()``."""
  if isinstance(tx, optax.MultiSteps):
    return tx
  owner = getattr(getattr(tx, "update", None), "__self__", None)
  return owner if isinstance(owner, optax.MultiSteps) else None


def _adam_update(tx: Any, what: str) -> _core.AdamUpdate:
  update = getattr(tx, "update", None)
  if not isinstance(update, _core.AdamUpdate):
    raise TypeError(
      f"fused_step: {what} must be made by {_SERVED} (not another chain, wrapper or "
      f"optimizer); got a transform whose update is {update!r}. For "
      "optax.chain(optax.clip_by_global_norm(c), tx) build the same chain (same init, update "
      "and state) with adamw_jax.clipped(tx, c); for other transforms use tx.update "
      "followed by optax.apply_updates."
    )
  return update


def fused_step(
  tx: optax.GradientTransformation, grads: Any, state: Any, params: Any
) -> tuple[Any, Any]:
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
    tx: a transform made by [`adamw`][adamw_jax.adamw], [`adam`][adamw_jax.adam]
      or [`clipped`][adamw_jax.clipped], or an ``optax.MultiSteps`` (or its
      ``gradient_transformation()``) around one of them. Other chains and
      wrappers are refused (``TypeError``): [the fused step](native.md#the-fused-step).
    grads: the gradients, a tree like `params`.
    state: ``tx``'s state.
    params: the parameters.

  Returns:
    new_params: the parameters after the step (in `params`' buffers when donated).
    new_state: `tx`'s state after the step.

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
  multi = _multi_steps_of(tx)
  if multi is not None:
    return _multi_step(multi, grads, state, params)
  return _adam_update(tx, "tx").step(grads, state, params)


def _multi_step(ms: optax.MultiSteps, grads: Any, state: Any, params: Any) -> tuple:
  """``MultiSteps``' step: its own ``update`` for the bookkeeping, the fused step when it emits.

  ``ms.update`` runs with the probe (`_core.AdamUpdate`), so that its inner
  optimizer returns ``(averaged gradient, 1.0)`` unchanged, which MultiSteps
  multiplies by its emit flag (1 when it emits). Its new state's counters,
  accumulator and skip state are then MultiSteps' own, and the inner state is
  the old one (``where(emit, old, old)``). ``should_skip_update_fn`` skipped
  the step when it did not emit and its ``mini_step`` did not move (a step
  that accumulates moves it: ``(m + 1) % k != m`` for ``k > 1``). Then, as
  MultiSteps' ``update`` + ``optax.apply_updates`` would:

  - it emits: the inner optimizer's fused step on the averaged gradient;
  - it accumulates: ``params + 0 * update``, the update of the inner optimizer
    on the running average, as MultiSteps computes it on every step (a
    parameter of -0.0 becomes +0.0 unless the update is negative, and a
    non-finite update makes the parameter NaN);
  - it skipped: ``params + 0.0`` (a -0.0 becomes +0.0).
  """
  inner = ms.inner_opt
  _adam_update(inner, "the optimizer inside optax.MultiSteps")
  if params is None:
    raise TypeError("fused_step: params are required (the step writes them)")
  probed, new_state = ms.update(grads, state, params, **{_core.AdamUpdate.PROBE: True})
  averaged, flag = cast(tuple, probed)
  emitted = flag != 0
  skipped = jnp.logical_and(jnp.logical_not(emitted), new_state.mini_step == state.mini_step)

  def emit(params, old_inner, averaged, acc):
    del acc
    return fused_step(inner, averaged, old_inner, params)

  def accumulate(params, old_inner, averaged, acc):
    del averaged
    updates, _ = inner.update(optax.tree.cast_like(acc, grads), old_inner, params)
    updates = jax.tree.map(lambda u: emitted * u, updates)  # MultiSteps' emit * update
    added = optax.apply_updates(params, updates)
    kept = jax.tree.map(lambda p, a: jnp.where(skipped, _plus_zero(p), a), params, added)
    return kept, old_inner

  operands = (params, state.inner_opt_state, averaged, new_state.acc_grads)
  new_params, new_inner = lax.cond(emitted, emit, accumulate, *operands)
  return new_params, new_state._replace(inner_opt_state=new_inner)


def _plus_zero(p: jax.Array) -> jax.Array:
  """``p + 0.0`` (``optax.apply_updates`` of MultiSteps' zeros), spelled so that XLA keeps it.

  XLA simplifies ``p + 0`` with a known zero to ``p``, which keeps a -0.0
  that the addition turns into +0.0.
  """
  if jnp.iscomplexobj(p):
    return lax.complex(_plus_zero(jnp.real(p)), _plus_zero(jnp.imag(p)))
  return jnp.where(p == 0, jnp.zeros_like(p), p)


def clipped(
  tx: optax.GradientTransformation, max_norm: float
) -> optax.GradientTransformationExtraArgs:
  """``optax.chain(optax.clip_by_global_norm(max_norm), tx)``, which ``fused_step`` serves.

  The same ``init``, ``update`` and state as that chain (a state of one is a
  state of the other, checkpoints included), for `tx` made by
  [`adamw`][adamw_jax.adamw] or [`adam`][adamw_jax.adam]. Its fused step
  scales the gradients by optax's ``clip_by_global_norm`` (one global norm,
  one scale per element) and then takes `tx`'s fused step on them: bit for
  bit ``update`` + ``optax.apply_updates``. A chain built by ``optax.chain``
  keeps its parts to itself, so ``fused_step`` cannot recognize it: [the
  fused step](native.md#the-fused-step).

  Args:
    tx: a transform made by ``adamw`` or ``adam``.
    max_norm: the largest global norm of the gradients, a number > 0.

  Example:
    >>> import jax.numpy as jnp, optax, adamw_jax
    >>> tx = adamw_jax.clipped(adamw_jax.adamw(1e-3), max_norm=1.0)
    >>> params, grads = {"w": jnp.ones(3)}, {"w": jnp.full(3, 5.0)}
    >>> state = tx.init(params)
    >>> updates, _ = tx.update(grads, state, params)
    >>> new_params, state = adamw_jax.fused_step(tx, grads, state, params)
    >>> bool((new_params["w"] == optax.apply_updates(params, updates)["w"]).all())
    True
  """
  inner = _adam_update(tx, "clipped's tx")
  if isinstance(max_norm, (bool, np.bool_)) or not (
    isinstance(max_norm, (int, float, np.integer, np.floating))
    or (hasattr(max_norm, "dtype") and np.ndim(max_norm) == 0)
  ):
    raise TypeError(f"clipped: max_norm must be a real number > 0, got {max_norm!r}")
  try:
    value = float(max_norm)
  except jax.errors.ConcretizationTypeError:
    value = 1.0  # traced (e.g. under jit): as optax, unchecked
  if not value > 0:
    raise ValueError(
      f"clipped: Invalid max_norm: {max_norm} (the largest global norm of the gradients, "
      "must be > 0)"
    )
  clip = optax.clip_by_global_norm(max_norm)
  chain = optax.chain(clip, tx)

  def step(grads, state, params):
    if not (isinstance(state, tuple) and len(state) == 2):
      raise TypeError(
        "clipped: the optimizer state must be the pair (clip_by_global_norm's, tx's) that "
        f"its init makes, got {type(state).__name__}"
      )
    clip_state, tx_state = state
    grads, clip_state = clip.update(grads, clip_state, params)
    new_params, tx_state = inner.step(grads, tx_state, params)
    return new_params, (clip_state, tx_state)

  return optax.GradientTransformationExtraArgs(chain.init, _core.AdamUpdate(chain.update, step))
