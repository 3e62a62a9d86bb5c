"""``adamw`` and ``adam``: torch.optim.AdamW and torch.optim.Adam as optax transforms."""

from __future__ import annotations

from typing import Any, Optional

import optax

from adamw_jax import _core, _tree


def adamw(
    learning_rate: _core.ScalarOrSchedule = 1e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: _core.ScalarOrSchedule = 1e-2,
    *,
    amsgrad: bool = False,
    maximize: bool = False,
    mask: Optional[_tree.MaskOrFn] = None,
    eps_root: float = 0.0,
    mu_dtype: Optional[Any] = None,
    nu_dtype: Optional[Any] = None,
    decay_mode: str = "torch",
    peak_learning_rate: Optional[float] = None,
) -> optax.GradientTransformation:
  r"""AdamW with the semantics, defaults and rounding of ``torch.optim.AdamW``.

  This docstring is the one place the math and the differences from torch and
  optax are written down (the README repeats the tables).

  **Math.** With gradient :math:`g_t`, step :math:`t = 1, 2, \dots`, learning
  rate :math:`\eta_t` (the schedule evaluated at ``count = t - 1``) and weight
  decay :math:`\lambda`:

  .. math::

     g_t &\leftarrow -g_t \quad\text{if maximize} \\
     \theta &\leftarrow \theta\,(1 - \eta_t\lambda) \quad\text{(decoupled decay, first)} \\
     m_t &= \beta_1 m_{t-1} + (1-\beta_1)\,g_t \\
     v_t &= \beta_2 v_{t-1} + (1-\beta_2)\,g_t^2 \\
     \hat v_t &= \max(\hat v_{t-1}, v_t) \text{ if amsgrad else } v_t \\
     \theta &\leftarrow \theta - \frac{\eta_t}{1-\beta_1^t}\;
        \frac{m_t}{\sqrt{\hat v_t + \epsilon_{root}(1-\beta_2^t)}/\sqrt{1-\beta_2^t} + \epsilon}

  Complex parameters are treated as pairs of reals (torch's ``view_as_real``):
  :math:`g^2` is taken per real and imaginary part.

  **The paper's decay** (``decay_mode="paper"``). Loshchilov & Hutter
  (Algorithm 2) write the learning rate as :math:`\alpha\,\eta_t`, a fixed
  base rate times a schedule multiplier, and decay by :math:`\eta_t\lambda`,
  *not* by :math:`\alpha\eta_t\lambda` as torch, optax and apex do. With
  :math:`\hat\eta` = ``peak_learning_rate`` (the paper's :math:`\alpha`) the
  decay line above becomes

  .. math::

     \theta \leftarrow \theta\,\bigl(1 - (\eta_t/\hat\eta)\,\lambda\bigr),

  so :math:`\lambda` is a per-step fraction at the peak (``weight_decay=1e-2``
  removes 1 % of a weight per step there, whatever the learning rate). The
  paper reports that the best :math:`\lambda` then does not move when the
  learning rate is tuned; for Adam on a small problem
  (``notebooks/02_adam_vs_adamw.ipynb``) torch's form does that and this one
  does not. The multiplier follows the schedule: decay weakens as the lr
  anneals, as in torch. The peak is not derived from the schedule (an optax
  schedule has no known maximum): a constant ``learning_rate`` is its own peak (the factor is
  :math:`1 - \lambda` at every step, even for a traced lr, e.g. under
  ``jax.vmap`` over learning rates); a schedule needs ``peak_learning_rate``,
  normally its maximum (a larger lr gives :math:`\eta_t/\hat\eta > 1`).
  Under ``optax.inject_hyperparams`` a schedule reaches ``adamw`` as a number
  per step, which would make it its own peak: pass ``peak_learning_rate``
  there too. :math:`1 - (\eta_t/\hat\eta)\lambda` is computed to double
  precision and rounded once; a Python-float peak is first rounded as the
  scheduled lr is, so the factor is exactly the rounded :math:`1 - \lambda`
  where the schedule peaks. With a constant lr :math:`\alpha` this is torch's
  decay with ``weight_decay`` :math:`\lambda/\alpha`. See also
  :func:`normalized_weight_decay` and :func:`warm_restarts` (AdamWR).

  **Rounding.** Each operation is rounded as torch's single-tensor CPU path
  (``foreach=False``) rounds it: the moment updates as fused multiply-adds
  (``lerp_``, ``addcmul_``), ``p * (1 - lr*wd)`` rounded on its own,
  ``p + (s*m)/d``, and the scalars ``1 - b**t``, ``lr / (1 - b1**t)``,
  ``sqrt(1 - b2**t)`` and ``1 - lr*wd`` computed to double precision from
  Python-float hyperparameters and rounded once, as torch computes them in
  Python. The update returned is ``new_param - param`` so that
  ``optax.apply_updates`` lands on torch's parameters. The one operation we do
  not copy is torch's square root: torch takes it from MKL, which is not
  correctly rounded for ~0.7 % of inputs; we take the correctly rounded one, as
  torch's fused kernel does. Measured closeness: README, "How close to PyTorch?".

  **Differences from torch.optim.AdamW** (all deliberate):

  - ``learning_rate`` may be an optax schedule ``count -> lr``; it plays the
    role of a torch LR scheduler stepped once per optimizer step (``count`` 0
    for the first step), and decay uses the scheduled lr, as in torch.
  - Hyperparameters passed as traced arrays (``optax.inject_hyperparams``,
    ``jax.grad`` w.r.t. the lr) are rounded to the parameter dtype first;
    Python floats keep double precision, as in torch.
  - ``mask`` replaces param groups with ``weight_decay=0``; ``mu_dtype`` and
    ``nu_dtype`` have no torch equivalent; ``eps_root`` (default 0) is optax's.
  - The step count is an int32 that saturates at 2**31 - 1.

  **Differences from optax.adamw:** torch's defaults (``weight_decay=1e-2``,
  optax has 1e-4); decay multiplies the parameter before the Adam step
  (optax adds ``wd * p`` to the Adam direction and then scales by ``lr``);
  ``amsgrad`` is offered and takes the maximum of the raw ``v``, bias-correcting
  it afterwards (``optax.adamw`` has no AMSGrad; ``optax.amsgrad`` by default
  maximises the bias-corrected ``v_hat``); ``maximize`` and complex parameters
  as torch; ``nesterov`` is not offered; invalid
  hyperparameters raise ``ValueError`` when the transform is built; a mask that
  does not match the params raises an error naming the path.

  Args:
    learning_rate: a non-negative float, or a schedule ``count -> lr``.
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
      written for the model's tree (README, "Flat buffers").
    eps_root: added to the bias-corrected second moment inside the square root.
    mu_dtype: dtype of the first moment (default: the parameter's).
    nu_dtype: dtype of the second moment (default: the parameter's).
    decay_mode: ``"torch"`` (default): decay by ``1 - lr_t * weight_decay``;
      ``"paper"``: by ``1 - (lr_t / peak_learning_rate) * weight_decay``, the
      paper's Algorithm 2 (above).
    peak_learning_rate: with ``decay_mode="paper"`` only: the lr at which the
      decay is ``weight_decay`` itself (> 0). Required for a schedule; for a
      constant lr it defaults to the lr.

  Returns:
    An ``optax.GradientTransformation`` with state :class:`ScaleByAdamState`.

  References:
    Loshchilov & Hutter, *Decoupled Weight Decay Regularization*, ICLR 2019.
    Kingma & Ba, *Adam: A Method for Stochastic Optimization*, ICLR 2015.
    Reddi et al., *On the Convergence of Adam and Beyond* (AMSGrad), ICLR 2018.
    ``torch.optim.AdamW`` (PyTorch 2.13).
  """
  return _core.adam_transform(
      name="adamw", learning_rate=learning_rate, b1=b1, b2=b2, eps=eps, eps_root=eps_root,
      weight_decay=weight_decay, decoupled=True, amsgrad=amsgrad, maximize=maximize,
      mask=mask, mu_dtype=mu_dtype, nu_dtype=nu_dtype, decay_mode=decay_mode,
      peak_learning_rate=peak_learning_rate)


def adam(
    learning_rate: _core.ScalarOrSchedule = 1e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: _core.ScalarOrSchedule = 0.0,
    *,
    amsgrad: bool = False,
    maximize: bool = False,
    mask: Optional[_tree.MaskOrFn] = None,
    eps_root: float = 0.0,
    mu_dtype: Optional[Any] = None,
    nu_dtype: Optional[Any] = None,
) -> optax.GradientTransformation:
  r"""Adam with the semantics, defaults and rounding of ``torch.optim.Adam``.

  Weight decay is an L2 term added to the gradient before the moments
  (``g <- g + weight_decay * param``, after negation when ``maximize``): the
  "Adam + L2" that Loshchilov & Hutter compare AdamW against. Everything else
  (math, rounding, differences from torch and optax) is as documented in
  :func:`adamw`; the arguments mean the same, with ``weight_decay`` defaulting
  to 0 as in torch.
  """
  return _core.adam_transform(
      name="adam", learning_rate=learning_rate, b1=b1, b2=b2, eps=eps, eps_root=eps_root,
      weight_decay=weight_decay, decoupled=False, amsgrad=amsgrad, maximize=maximize,
      mask=mask, mu_dtype=mu_dtype, nu_dtype=nu_dtype)
