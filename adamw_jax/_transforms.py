"""The chainable building blocks: ``scale_by_adam``, ``add_decayed_weights``, ``masked``.

Chained as ``optax.chain(scale_by_adam(), add_decayed_weights(wd),
optax.scale_by_learning_rate(lr))`` they give AdamW, but one ulp-level rounding
differs from torch at each of the three joins; [`adamw`][adamw_jax.adamw] runs the
same kernel in one piece and reproduces torch's rounding
([Fidelity](fidelity.md)).
"""

from __future__ import annotations

from typing import Any, NamedTuple, cast

import jax
import jax.numpy as jnp
import optax

from adamw_jax import _core, _hyperparams, _scalars, _tree


def scale_by_adam(
  b1: float = 0.9,
  b2: float = 0.999,
  eps: float = 1e-8,
  eps_root: float = 0.0,
  *,
  amsgrad: bool = False,
  maximize: bool = False,
  mu_dtype: Any | None = None,
  nu_dtype: Any | None = None,
  moment_bits: int | None = None,
  moment_block_size: int | None = None,
) -> optax.GradientTransformationExtraArgs:
  """Rescale updates by Adam's bias-corrected moments, in torch's arithmetic.

  Returns ``m_hat / (sqrt(v_hat + eps_root) + eps)`` (not yet multiplied by
  ``-learning_rate``), computed as ``(m / (1 - b1**t)) / (sqrt(v) /
  sqrt(1 - b2**t) + eps)`` with torch's rounding. ``amsgrad`` takes the running
  maximum of the raw second moment before bias correction, as torch does;
  ``maximize`` negates the gradient first. The state is a
  [`ScaleByAdamState`][adamw_jax.ScaleByAdamState]. The math: [the math](math.md).

  >>> import jax.numpy as jnp, adamw_jax
  >>> tx = adamw_jax.scale_by_adam()
  >>> grads = {"w": jnp.array([0.5, -2.0])}
  >>> direction, state = tx.update(grads, tx.init(grads))
  >>> print(direction["w"].round(6), int(state.count))  # m_hat / sqrt(v_hat): the sign at step 1
  [ 1. -1.] 1

  Args:
    b1: exponential decay rate of the first moment, in [0, 1).
    b2: exponential decay rate of the second moment, in [0, 1).
    eps: added to the denominator outside the square root (torch's eps).
    eps_root: added to the bias-corrected second moment inside the square root
      (0 in torch; optax's ``eps_root``).
    amsgrad: use the running maximum of the second moment (torch's AMSGrad).
    maximize: ascend instead of descend (negates the gradient first).
    mu_dtype: dtype of the first moment (default: the parameter's dtype).
    nu_dtype: dtype of the second moment (default: the parameter's dtype).
    moment_bits: ``8`` or ``4``: block-wise quantized moments, as [`adamw`][adamw_jax.adamw]'s.
    moment_block_size: elements per quantization block.
  """
  return _core.adam_transform(
    _hyperparams.Settings.of(
      "scale_by_adam",
      decoupled=True,
      direction_only=True,
      learning_rate=None,
      b1=b1,
      b2=b2,
      eps=eps,
      weight_decay=0.0,
      amsgrad=amsgrad,
      maximize=maximize,
      mask=None,
      eps_root=eps_root,
      mu_dtype=mu_dtype,
      nu_dtype=nu_dtype,
      moment_bits=moment_bits,
      moment_block_size=moment_block_size,
    )
  )


class AddDecayedWeightsState(NamedTuple):
  """State of `add_decayed_weights`: the step count, for weight-decay schedules."""

  count: jax.Array  # pyright: ignore[reportIncompatibleMethodOverride]  # shadows tuple.count


def add_decayed_weights(
  weight_decay: _hyperparams.ScalarOrSchedule = 1e-2,
  mask: _tree.MaskOrFn | None = None,
) -> optax.GradientTransformationExtraArgs:
  """Add ``weight_decay * param`` to the updates (decoupled weight decay when chained after Adam).

  >>> import jax.numpy as jnp, adamw_jax
  >>> params = {"w": jnp.array([1.0, -2.0])}
  >>> tx = adamw_jax.add_decayed_weights(0.5)
  >>> updates, _ = tx.update({"w": jnp.zeros(2)}, tx.init(params), params)
  >>> print(updates["w"])
  [ 0.5 -1. ]

  Args:
    weight_decay: a non-negative float, or a schedule ``count -> weight_decay``
      (count starts at 0, as in optax).
    mask: which leaves are decayed: a bool pytree with the structure of the
      params (or a prefix of it), or a callable ``params -> such a pytree``.
      Leaves that are not decayed pass through unchanged. A mask that does not
      match the params raises an error naming the first mismatching path, at
      ``init`` already.
  """
  _hyperparams.check("weight_decay", weight_decay)
  name = "add_decayed_weights"

  def init_fn(params):
    if mask is not None:
      _tree.check_mask(mask, params, what=name)
    return AddDecayedWeightsState(jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None, **extra_args) -> tuple[Any, Any]:
    del extra_args  # optax's contract: accepted, and ignored here
    if updates is None:  # nothing to decay: None, as optax's (its count moves for a schedule)
      if params is None:
        _tree.check_params_given(updates, params, what=name)  # raises: no params
      if not callable(weight_decay):
        return None, state
      return None, AddDecayedWeightsState(cast(jax.Array, optax.safe_increment(state.count)))
    _tree.check_params_given(updates, params, what=name)
    wd = (
      _scalars.scheduled("weight_decay", weight_decay, state.count, name)
      if callable(weight_decay)
      else weight_decay
    )
    decayed = (
      jax.tree.map(lambda _: True, params)
      if mask is None
      else _tree.resolve_mask(mask, params, what=name)
    )

    def leaf(u, p, on):
      if not on:
        return u
      return (jnp.asarray(wd, u.dtype) * p + u).astype(u.dtype)

    new = jax.tree.map(leaf, updates, params, decayed)
    return new, AddDecayedWeightsState(cast(jax.Array, optax.safe_increment(state.count)))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def masked(
  inner: optax.GradientTransformation, mask: _tree.MaskOrFn
) -> optax.GradientTransformationExtraArgs:
  """Apply `inner` only to the leaves selected by `mask`; the others pass through unchanged.

  Like ``optax.masked`` (which it wraps), but the mask is checked against the
  params at ``init`` and against the updates on every trace: a mask that is
  not a bool pytree with the updates' structure (or a prefix of it), or a
  callable returning one, raises an error naming the first mismatching path
  and the keys of both trees there. As ``optax.masked``'s, the state holds one
  ``optax.MaskedNode`` for each unselected node of a prefix mask.

  >>> import jax.numpy as jnp, optax, adamw_jax
  >>> params = {"b": jnp.ones(2), "w": jnp.ones(2)}
  >>> tx = adamw_jax.masked(optax.scale(-1.0), {"b": False, "w": True})
  >>> updates, _ = tx.update(params, tx.init(params))
  >>> print(updates["b"], updates["w"])
  [1. 1.] [-1. -1.]

  Args:
    inner: the transformation to apply to the selected leaves.
    mask: a bool pytree (full or prefix of the params), or a callable
      ``params -> mask``.
  """
  what = "masked"

  def resolved(tree):
    return _tree.resolve_mask(mask, tree, what=what, broadcast=False)

  tx = optax.masked(inner, resolved)

  def init_fn(params):
    _tree.check_mask(mask, params, what=what)
    return tx.init(params)

  return optax.GradientTransformationExtraArgs(init_fn, tx.update)
