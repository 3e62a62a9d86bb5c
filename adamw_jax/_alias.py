"""``adamw`` and ``adam``: torch.optim.AdamW and torch.optim.Adam as optax transforms."""

from __future__ import annotations

from typing import Any

import optax

from adamw_jax import _core, _hyperparams, _tree


def adamw(
  learning_rate: _hyperparams.ScalarOrSchedule = 1e-3,
  b1: float = 0.9,
  b2: float = 0.999,
  eps: float = 1e-8,
  weight_decay: _hyperparams.ScalarOrSchedule = 1e-2,
  *,
  amsgrad: bool = False,
  maximize: bool = False,
  mask: _tree.MaskOrFn | None = None,
  eps_root: float = 0.0,
  mu_dtype: Any | None = None,
  nu_dtype: Any | None = None,
  decay_mode: str = "torch",
  peak_learning_rate: float | None = None,
  param_rounding: str = "nearest",
  rounding_seed: int | None = None,
  moment_bits: int | None = None,
  moment_block_size: int | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""AdamW with the semantics, defaults and rounding of ``torch.optim.AdamW``.

  Each step decays the decayed parameters by ``1 - lr_t * weight_decay``
  first, then takes torch's Adam step, rounding every operation as torch's
  single-tensor CPU path does. The update returned is ``new_param - param``,
  so ``optax.apply_updates`` lands on torch's parameters:

  >>> import jax.numpy as jnp, optax, adamw_jax
  >>> params = {"w": jnp.array([1.0, -2.0])}
  >>> tx = adamw_jax.adamw(learning_rate=0.1, weight_decay=0.5)
  >>> state = tx.init(params)
  >>> updates, state = tx.update({"w": jnp.array([0.5, 0.5])}, state, params)
  >>> print(optax.apply_updates(params, updates)["w"])  # 0.95 * p - 0.1
  [ 0.85 -2.  ]

  The math, the rounding and every deliberate difference from torch and
  optax are written once, in the documentation: ``docs/math.md`` (the math
  and the differences from torch and optax), ``docs/fidelity.md`` (how close
  to PyTorch) and, for ``decay_mode="paper"``, ``docs/paper-decay.md``.

  Args:
    learning_rate: a non-negative float, or a schedule ``count -> lr`` (torch's
      LR scheduler, stepped once per step; ``count`` 0 for the first step).
    b1: decay rate of the first moment, in [0, 1) (torch ``betas[0]``).
    b2: decay rate of the second moment, in [0, 1) (torch ``betas[1]``).
    eps: added outside the square root (torch's ``eps``).
    weight_decay: decoupled weight decay coefficient (float or schedule),
      multiplied by the learning rate as in torch (by the learning rate
      relative to its peak with ``decay_mode="paper"``). Default 1e-2, as torch.
    amsgrad: torch's AMSGrad variant.
    maximize: maximise the objective instead of minimising it.
    mask: which leaves are decayed: a bool pytree (full, or a prefix of the
      params), or a callable ``params -> mask``. All leaves get the Adam step.
      For parameters kept in flat buffers (:func:`adamw_jax.flatten`) it is
      written for the model's tree (``docs/flat.md``).
    eps_root: added to the bias-corrected second moment inside the square root.
    mu_dtype: dtype of the first moment (default: the parameter's).
    nu_dtype: dtype of the second moment (default: the parameter's).
    decay_mode: ``"torch"`` (default): decay by ``1 - lr_t * weight_decay``;
      ``"paper"``: by ``1 - (lr_t / peak_learning_rate) * weight_decay``, the
      paper's Algorithm 2.
    peak_learning_rate: with ``decay_mode="paper"`` only: the lr at which the
      decay is ``weight_decay`` itself (> 0). Required for a schedule; for a
      constant lr it defaults to the lr.
    param_rounding: how a bfloat16 (or float16) parameter is written:
      ``"nearest"`` (default, as torch), ``"stochastic"`` (bfloat16 only:
      computed in float32, rounded up or down without bias, torchao's
      ``bf16_stochastic_round``), ``"kahan"`` (a compensation buffer in the
      state keeps what rounding lost, torch-optimi's ``kahan_sum``) or
      ``"remainder"`` (bfloat16 only: an int16 remainder in the state makes the
      parameter a float32 master weight exactly, stepped as float32 AdamW
      steps it, bit for bit; moments float32 unless given; the update is
      float32; :func:`adamw_jax.master_params`). Leaves of other dtypes are
      written as with ``"nearest"``. See ``docs/low-memory.md``.
    rounding_seed: the seed of the PRNG key in the state, with ``"stochastic"``
      (None: 0).
    moment_bits: ``8``: moments of leaves of at least 4096 elements (a multiple
      of the block size) stored 8-bit block-wise quantized, torchao's
      ``AdamW8bit``; ``4``: 4-bit, two codes a byte, torchao's ``AdamW4bit``;
      None (default): full precision.
    moment_block_size: elements per quantization block (None: torchao's
      ``block_size``, 256 for 8-bit, 128 for 4-bit; even for 4-bit). With ``optax.inject_hyperparams`` pass ``moment_bits``,
      ``moment_block_size`` and ``rounding_seed`` in ``static_args``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state
    :class:`ScaleByAdamState` (``update`` accepts and ignores extra keyword
    arguments, such as a chain's ``value=loss``).

  Raises:
    ValueError, TypeError: an invalid hyperparameter, when the transform is
      built (a schedule is checked at step 0), with torch's wording; at
      ``init``, parameters that are not floating-point or complex arrays and a
      mask that does not match them, naming the path. Values known only inside
      the compiled step (``optax.inject_hyperparams``, later values of a
      schedule) are checked under ``jax.experimental.checkify``
      (``docs/bad-inputs.md``).

  References:
    Loshchilov & Hutter, *Decoupled Weight Decay Regularization*, ICLR 2019.
    Kingma & Ba, *Adam: A Method for Stochastic Optimization*, ICLR 2015.
    Reddi et al., *On the Convergence of Adam and Beyond* (AMSGrad), ICLR 2018.
    ``torch.optim.AdamW`` (PyTorch 2.13).
  """
  return _core.adam_transform(
    _hyperparams.Settings.of(
      "adamw",
      decoupled=True,
      learning_rate=learning_rate,
      b1=b1,
      b2=b2,
      eps=eps,
      weight_decay=weight_decay,
      amsgrad=amsgrad,
      maximize=maximize,
      mask=mask,
      eps_root=eps_root,
      mu_dtype=mu_dtype,
      nu_dtype=nu_dtype,
      decay_mode=decay_mode,
      peak_learning_rate=peak_learning_rate,
      param_rounding=param_rounding,
      rounding_seed=rounding_seed,
      moment_bits=moment_bits,
      moment_block_size=moment_block_size,
    )
  )


def adam(
  learning_rate: _hyperparams.ScalarOrSchedule = 1e-3,
  b1: float = 0.9,
  b2: float = 0.999,
  eps: float = 1e-8,
  weight_decay: _hyperparams.ScalarOrSchedule = 0.0,
  *,
  amsgrad: bool = False,
  maximize: bool = False,
  mask: _tree.MaskOrFn | None = None,
  eps_root: float = 0.0,
  mu_dtype: Any | None = None,
  nu_dtype: Any | None = None,
  param_rounding: str = "nearest",
  rounding_seed: int | None = None,
  moment_bits: int | None = None,
  moment_block_size: int | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Adam with the semantics, defaults and rounding of ``torch.optim.Adam``.

  Weight decay is an L2 term added to the gradient before the moments
  (``g <- g + weight_decay * param``, after negation when ``maximize``): the
  "Adam + L2" that Loshchilov & Hutter compare AdamW against. Everything else
  is as :func:`adamw`; the arguments mean the same, with ``weight_decay``
  defaulting to 0 as in torch.

  >>> import jax.numpy as jnp, optax, adamw_jax
  >>> params = {"w": jnp.array([1.0, -2.0])}
  >>> tx = adamw_jax.adam(learning_rate=0.1, weight_decay=0.5)
  >>> updates, _ = tx.update({"w": jnp.array([0.5, 0.5])}, tx.init(params), params)
  >>> print(optax.apply_updates(params, updates)["w"])  # p - 0.1 * sign(g + 0.5 * p)
  [ 0.90000004 -1.9       ]
  """
  return _core.adam_transform(
    _hyperparams.Settings.of(
      "adam",
      decoupled=False,
      learning_rate=learning_rate,
      b1=b1,
      b2=b2,
      eps=eps,
      weight_decay=weight_decay,
      amsgrad=amsgrad,
      maximize=maximize,
      mask=mask,
      eps_root=eps_root,
      mu_dtype=mu_dtype,
      nu_dtype=nu_dtype,
      param_rounding=param_rounding,
      rounding_seed=rounding_seed,
      moment_bits=moment_bits,
      moment_block_size=moment_block_size,
    )
  )
