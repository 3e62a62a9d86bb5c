"""The Adam-family gradient transformation behind ``scale_by_adam``, ``adamw`` and ``adam``.

The math and every deliberate difference from torch and optax are written
once, in the README ("The math", "Differences from torch and optax"); this
module wires the hyperparameters, the state, the per-step scalars and the two
twin kernels (``_kernel``, pure JAX; ``_native``, the CPU kernel) together.
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import tree_util as jtu
from jax.experimental import checkify
from jax.experimental.shard_alike import shard_alike

from adamw_jax import _float2 as f2
from adamw_jax import _hyperparams, _kernel, _native, _steer, _steps, _tree
from adamw_jax._tree import check_params

Scalar = Union[float, jax.Array]
ScalarOrSchedule = Union[float, jax.Array, Callable[[jax.Array], jax.Array]]


class ScaleByAdamState(NamedTuple):
  """State of ``scale_by_adam``, ``adamw`` and ``adam``, field for field torch's.

  Attributes:
    count: int32 number of steps taken (torch's ``state["step"]``); saturates
      at 2**31 - 1 instead of wrapping.
    mu: first moment, one leaf per parameter (torch's ``exp_avg``).
    nu: raw second moment, not bias-corrected (torch's ``exp_avg_sq``). For a
      complex parameter its real and imaginary parts hold the second moments
      of the real and imaginary parts, exactly as ``view_as_real`` in torch.
    nu_max: running maximum of ``nu`` when ``amsgrad=True`` (torch's
      ``max_exp_avg_sq``), else None.
  """

  count: jax.Array
  mu: Any
  nu: Any
  nu_max: Any


def _scalar_dtype(dtype) -> jnp.dtype:
  """The dtype the per-step scalars are computed in for a leaf of `dtype`."""
  real = jnp.finfo(dtype).dtype
  return jnp.dtype(jnp.float64) if real == jnp.float64 else jnp.dtype(jnp.float32)


def _is_number(value: Any) -> bool:
  return isinstance(value, (int, float, np.floating, np.integer))


def _f2_of(value: Any, dtype, z: jax.Array) -> f2.F2:
  """A hyperparameter (Python float: kept to double precision; array: as is) as F2."""
  if _is_number(value):
    return f2.constant(float(value), dtype, z)
  return f2.from_array(jnp.asarray(value).astype(dtype))


def _one_minus(value: Any, dtype, z: jax.Array) -> f2.F2:
  if _is_number(value):
    return f2.constant(1.0 - float(value), dtype, z)  # exact in double for value >= 0.5
  return f2.sub(f2.constant(1.0, dtype, z), _f2_of(value, dtype, z))


def _bias_correction(beta: Any, t: jax.Array, dtype, z: jax.Array) -> f2.F2:
  """``1 - beta**t`` to double precision, as torch computes it in Python."""
  if _is_number(beta):
    if float(beta) == 0.0:
      return f2.constant(1.0, dtype, z)
    if jnp.dtype(dtype) == jnp.float64:  # float64 pairs: exp(t * double log) falls short
      return f2.one_minus_power(float(beta), t, dtype, z)
    log_beta = f2.constant(math.log(float(beta)), dtype, z)
  else:  # traced (e.g. optax.inject_hyperparams): log in double words
    log_beta = f2.log(_f2_of(beta, dtype, z), z)
  return f2.one_minus_exp_times(log_beta, t, z)


def _is_zero(value: Any) -> bool:
  return _is_number(value) and float(value) == 0.0


def _needs_params(weight_decay: Any) -> bool:
  return not _is_zero(weight_decay)


def _moment_dtype(param_dtype, requested) -> jnp.dtype:
  if requested is None:
    return jnp.dtype(param_dtype)
  if jnp.issubdtype(param_dtype, jnp.complexfloating):
    return jnp.promote_types(requested, jnp.complex64)
  return jnp.dtype(requested)


def _rounded_number(value: Any, dtype, traced: Optional[Callable[[], jax.Array]]) -> jax.Array:
  """A scalar torch computes in Python: a literal when `value` is a Python number."""
  if _is_number(value):
    return np.asarray(float(value), dtype)
  return traced()


def _paper_decay(lr: Any, peak: Any, wd: Any, dtype, z: jax.Array) -> jax.Array:
  """``1 - (lr / peak) * wd``, Loshchilov & Hutter's ``1 - eta_t * lambda``, rounded once.

  `peak` None: the learning rate is constant and its own peak, eta_t = 1.
  Python numbers are combined in double precision (as torch's ``1 - lr*wd``);
  otherwise in double words, with a Python-float peak first rounded as the
  scheduled lr is, so that eta_t = 1 exactly where the schedule peaks.
  """
  one = f2.constant(1.0, dtype, z)
  if peak is None:
    return _rounded_number(1.0 - float(wd) if _is_number(wd) else None, dtype,
                           lambda: f2.round_(f2.sub(one, _f2_of(wd, dtype, z))))
  if _is_number(lr) and _is_number(peak) and _is_number(wd):
    return _rounded_number(1.0 - float(lr) / float(peak) * float(wd), dtype, None)
  if _is_number(peak) and not _is_number(lr):
    peak = jnp.asarray(float(peak), jnp.result_type(lr))
  eta = f2.div(_f2_of(lr, dtype, z), _f2_of(peak, dtype, z))
  return f2.round_(f2.sub(one, f2.mul(eta, _f2_of(wd, dtype, z))))


class AdamUpdate:
  """The ``update`` function of an Adam-family transform, which also knows its fused step.

  Calling it is optax's ``update(updates, state, params=None, **extra_args)``
  (the extra arguments, e.g. a loss ``value`` meant for another transform of a
  chain, are ignored); :meth:`step` is :func:`adamw_jax.fused_step`.
  """

  def __init__(self, update: Callable, step: Callable):
    self._update, self._step = update, step

  def __call__(self, updates: Any, state: ScaleByAdamState, params: Any = None, **extra_args):
    del extra_args
    return self._update(updates, state, params)

  def step(self, grads: Any, state: ScaleByAdamState, params: Any):
    return self._step(grads, state, params)


def _leaf_dtype(p) -> jnp.dtype:
  """A parameter's dtype; a Python float counts as a float32 scalar, as in optax."""
  return jnp.dtype(jnp.result_type(p))


def _describe_value(x: Any) -> str:
  if hasattr(x, "dtype") and hasattr(x, "shape"):
    return f"{jnp.dtype(x.dtype).name}{list(np.shape(x))}"
  return f"the {type(x).__name__} {x!r}"


def check_count(count: Any, what: str) -> None:
  """The state's step count must be an integer scalar, and not negative.

  The dtype and shape are checked when the step is traced. The value is
  checked here only when it is a Python or NumPy integer (free to read); a
  jax.Array is checked inside the step by ``checkify.debug_check``
  (:func:`_check_count_traced`), as reading it here would cost a device round
  trip per step.
  """
  integer = (isinstance(count, (int, np.integer)) and not isinstance(count, bool)) or (
      hasattr(count, "dtype") and jnp.issubdtype(count.dtype, jnp.integer))
  if not integer or np.ndim(count) != 0:
    raise TypeError(
        f"{what}: the state's count must be an integer scalar (int32: the number of steps "
        f"taken, torch's step), got {_describe_value(count)}; give a converted or edited "
        "state count=jnp.asarray(step, jnp.int32).")
  if isinstance(count, (int, np.integer, np.ndarray)) and int(count) < 0:
    raise ValueError(f"{what}: the state's count is {int(count)}; it must be >= 0 (the number "
                     "of steps taken).")


def _check_count_traced(count: jax.Array, what: str) -> None:
  checkify.debug_check(count >= 0, f"{what}: the state's count is {{}}; it must be >= 0 (the "
                       "number of steps taken)", count)


def scheduled(hp_name: str, value: Any, count: jax.Array, what: str) -> Any:
  """A hyperparameter at step `count`: a schedule's value (checked as a traced value), or itself."""
  if not callable(value):
    return value
  try:
    out = value(count)
  except (jax.errors.ConcretizationTypeError, jax.errors.TracerIntegerConversionError) as e:
    raise TypeError(
        f"{what}: the {hp_name} schedule cannot be traced ({type(e).__name__}): it is called "
        "with the step count as a traced array inside the compiled step, so it must not turn "
        "it into a Python value (use jnp.where or optax.join_schedules, not Python's if).") from e
  _hyperparams.check_traced(hp_name, out, ", the schedule's value at count {}", count)
  return out


def _warn_if_eps_vanishes(params: Any, eps: Any, moment_dtypes: tuple, what: str) -> None:
  """Warns when `eps` rounds to 0 in a leaf's compute dtype (float16: eps < 3e-8)."""
  x = _hyperparams.concrete("eps", eps)
  if not x:
    return
  for path, p in jtu.tree_flatten_with_path(params)[0]:
    dtype = jnp.result_type(_leaf_dtype(p), *(d for d in moment_dtypes if d is not None))
    if jnp.issubdtype(dtype, jnp.floating) and np.asarray(x, dtype) == 0:
      warnings.warn(
          f"{what}: eps={x} rounds to 0 in {jnp.dtype(dtype).name} (the parameter at "
          f"{_tree.where(path)}): where a gradient is zero the step is 0/0 and the parameter "
          "becomes NaN, as in torch's (non-fused) AdamW. Use eps >= 6e-8 (e.g. 1e-4 for "
          "float16), or float32 moments (mu_dtype=nu_dtype=jnp.float32).",
          UserWarning, stacklevel=4)
      return


def _pure_leaf(g, m, v, vm, p, c: _kernel.Coefficients, decay, *, maximize: bool,
               decoupled: bool, with_params: bool, fused: bool, moments=None):
  """One leaf through the pure-JAX kernel: (update, or new parameter if `fused`, m, v, vm).

  `moments`: the new (m, v, vm), already computed by the native kernel.
  """
  out, m, v, vm = _kernel.adam_leaf(
      g, m, v, vm, p if with_params else None, c,
      maximize=maximize,
      l2=None if decoupled else decay,
      decay=decay if decoupled else None, moments=moments)
  if with_params:
    # torch's new parameter, as an update: exact when new and old parameters
    # are within a factor of two of each other, so p + update lands on it.
    out = out - p
  if fused:
    out = optax.apply_updates(p, out)
  return out, m, v, vm


def _native_group(c: _kernel.Coefficients, decay, group: list[tuple], cdtype, *,
                  mode: _native.Mode, kind: _native.Decay, amsgrad: bool, maximize: bool,
                  decoupled: bool, with_params: bool, fused: bool) -> list[tuple]:
  """Leaves ``(g, m, v, vm, p)`` of compute dtype `cdtype` through one native call.

  The same results bit for bit as :func:`_pure_leaf` on each (``tests/test_native.py``);
  derivatives (``jax.jvp``, ``jax.grad``) are the pure kernel's.
  """
  real = jnp.finfo(cdtype).dtype
  fields = (c.one_minus_b1, c.b2, c.one_minus_b2, c.bc2_sqrt, c.eps,
            0.0 if c.eps_root is None else c.eps_root, c.step_size,
            0.0 if decay is None else decay, -1.0 if maximize else 1.0)
  scalars = jnp.stack([jnp.asarray(x).astype(real) for x in fields])
  moments_only = mode == _native.Mode.MOMENTS
  with_p = mode != _native.Mode.STEP and (not moments_only or kind == _native.Decay.L2)
  per_leaf = 3 + amsgrad + with_p

  def unflatten(flat):
    leaves = []
    for k in range(0, len(flat), per_leaf):
      g, m, v, *rest = flat[k:k + per_leaf]
      vm = rest.pop(0) if amsgrad else None
      leaves.append((g, m, v, vm, rest[0] if with_p else None))
    return leaves

  @jax.custom_jvp
  def run(scalars, z, *flat):
    del z
    leaves = unflatten(flat)
    as_c = lambda x: None if x is None else x.astype(cdtype)  # noqa: E731
    outs = _native.call(scalars, [(g, as_c(m), as_c(v), as_c(vm), p) for g, m, v, vm, p in leaves],
                        mode=mode, decay=kind, amsgrad=amsgrad)
    back = []
    for (_, m, v, vm, _), (o, m_new, v_new, vm_new) in zip(leaves, outs):
      back += ([] if moments_only else [o]) + [m_new.astype(m.dtype), v_new.astype(v.dtype)]
      back += [] if vm is None else [vm_new.astype(vm.dtype)]
    return tuple(back)

  def pure(scalars, z, *flat):
    s = [scalars[k] for k in range(len(fields))]
    coeffs = _kernel.Coefficients(
        one_minus_b1=s[0], b2=s[1], one_minus_b2=s[2], bc2_sqrt=s[3], eps=s[4],
        eps_root=None if c.eps_root is None else s[5], step_size=s[6], opaque_zero=z)
    back = []
    for g, m, v, vm, p in unflatten(flat):
      o, m, v, vm = _pure_leaf(g, m, v, vm, p, coeffs, None if decay is None else s[7],
                               maximize=maximize, decoupled=decoupled,
                               with_params=with_params and with_p, fused=fused)
      back += ([] if moments_only else [o]) + [m, v] + ([] if vm is None else [vm])
    return tuple(back)

  run.defjvp(lambda primals, tangents: jax.jvp(pure, primals, tangents))
  flat = [x for g, m, v, vm, p in group
          for x in (g, m, v) + ((vm,) if amsgrad else ()) + ((p,) if with_p else ())]
  out = run(scalars, c.opaque_zero, *flat)
  step = (not moments_only) + 2 + amsgrad
  return [((None,) if moments_only else ()) + tuple(out[k:k + step]) + (() if amsgrad else (None,))
          for k in range(0, len(out), step)]


def adam_transform(
    *,
    name: str,
    learning_rate: Optional[ScalarOrSchedule],
    b1: Scalar,
    b2: Scalar,
    eps: Scalar,
    eps_root: Scalar,
    weight_decay: ScalarOrSchedule,
    decoupled: bool,
    amsgrad: bool,
    maximize: bool,
    mask: Optional[_tree.MaskOrFn],
    mu_dtype: Any,
    nu_dtype: Any,
    decay_mode: str = "torch",
    peak_learning_rate: Optional[Scalar] = None,
    direction_only: bool = False,
) -> optax.GradientTransformationExtraArgs:
  """One Adam-family transform.

  With ``direction_only`` (and ``learning_rate=None``) it returns the
  bias-corrected Adam direction (``scale_by_adam``); otherwise it returns
  ``new_param - param`` for the full torch step (lr, weight decay and all), so
  that ``optax.apply_updates`` reproduces torch's parameters. `decoupled`
  selects AdamW's ``p *= 1 - lr*wd`` over Adam's L2 term ``g += wd * p``;
  `mask` limits weight decay to some leaves. ``decay_mode="paper"`` makes the
  decay ``p *= 1 - (lr/peak)*wd`` (``_paper``).
  """
  checked = _hyperparams.checked(
      name, decoupled=decoupled, optional=("learning_rate",) if direction_only else (),
      learning_rate=learning_rate, b1=b1, b2=b2, eps=eps,
      weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize, mask=mask,
      eps_root=eps_root, mu_dtype=mu_dtype, nu_dtype=nu_dtype, decay_mode=decay_mode,
      peak_learning_rate=peak_learning_rate)
  mu_dtype, nu_dtype = checked["mu_dtype"], checked["nu_dtype"]
  amsgrad, maximize = checked["amsgrad"], checked["maximize"]
  needs_params = _needs_params(weight_decay)

  def init_fn(params):
    check_params(params, name)
    if mask is not None:
      _tree.check_mask(mask, params, what=name)
    _warn_if_eps_vanishes(params, eps, (mu_dtype, nu_dtype), name)

    def zeros(p, requested):
      z = jnp.zeros_like(p, dtype=_moment_dtype(_leaf_dtype(p), requested))
      if isinstance(p, jax.core.Tracer):
        # Under jit the zeros would not depend on p and lose its sharding
        # (jax-ml/jax#16080, optax.adamw too): tie them to p's sharding. Eager
        # zeros_like already keeps it, without a compile per leaf shape.
        z = shard_alike(p, z)[1]
      return z

    mu = jax.tree.map(lambda p: zeros(p, mu_dtype), params)
    nu = jax.tree.map(lambda p: zeros(p, nu_dtype), params)
    nu_max = jax.tree.map(lambda p: zeros(p, nu_dtype), params) if amsgrad else None
    return ScaleByAdamState(jnp.zeros([], jnp.int32), mu, nu, nu_max)

  def coefficients(lr: Any, wd: Any, new_count: jax.Array, dtype):
    """The step's scalars in `dtype`, for the learning rate and weight decay at this step."""
    z = _steer.opaque_zero(new_count)
    const = lambda x: _f2_of(x, dtype, z)  # noqa: E731
    one = f2.constant(1.0, dtype, z)
    bias_correction = lambda beta: _bias_correction(beta, new_count, dtype, z)  # noqa: E731
    lr_number = lr is None or _is_number(lr)
    row = bc2 = None  # bc2: 1 - b2**t in double words, computed only where needed
    if dtype == jnp.float64:
      # torch rounds every Python operation to a double: do the same (after a
      # correctly rounded beta**t, as Python's pow gives).
      bc1 = f2.from_array(1 - f2.round_(f2.sub(one, bias_correction(b1))))
      bc2 = f2.from_array(1 - f2.round_(f2.sub(one, bias_correction(b2))))
      numerator = jnp.ones([], dtype) if lr is None else -jnp.asarray(lr, dtype)
      step_size = numerator / bc1.hi
      bc2_sqrt = jnp.sqrt(bc2.hi)
    else:
      # Python-number betas: torch's own Python scalars, read from a table (_steps).
      if _is_number(b1) and _is_number(b2):
        row = _steps.lookup(b1, b2, lr if lr_number else None, new_count, dtype,
                            scheduled=not lr_number)
      if row is not None and lr_number:
        step_size = row[0]
      else:
        bc1 = bias_correction(b1) if row is None else f2.F2(row[0], row[1])
        if lr is None:
          step_size = f2.round_(f2.div(one, bc1))
        else:
          step_size = f2.round_(f2.neg(f2.div(const(lr), bc1)))
      if row is None:
        bc2 = bias_correction(b2)
        bc2_sqrt = f2.round_(f2.sqrt(bc2))
      else:
        bc2_sqrt = row[-1]
    if not needs_params:
      decay = None
    elif not decoupled:
      decay = _rounded_number(wd, dtype, lambda: f2.round_(const(wd)))
    elif decay_mode == "paper":
      decay = _paper_decay(lr, peak_learning_rate, wd, dtype, z)
    elif _is_number(lr) and _is_number(wd):
      decay = _rounded_number(1.0 - float(lr) * float(wd), dtype, None)  # torch: 1 - lr*wd in Python
    else:
      decay = f2.round_(f2.sub(one, f2.mul(const(lr), const(wd))))
    if row is None or not lr_number or not (decay is None or isinstance(decay, np.ndarray)):
      step_size, decay = _steer.computed_once(step_size, decay, z)
    if row is None:
      bc2_sqrt, _ = _steer.computed_once(bc2_sqrt, None, z)
    if bc2 is None and not _is_zero(eps_root):
      bc2 = bias_correction(b2)
    c = _kernel.Coefficients(
        one_minus_b1=_rounded_number(
            1.0 - float(b1) if _is_number(b1) else None, dtype,
            lambda: f2.round_(_one_minus(b1, dtype, z))),
        b2=_rounded_number(b2, dtype, lambda: f2.round_(const(b2))),
        one_minus_b2=_rounded_number(
            1.0 - float(b2) if _is_number(b2) else None, dtype,
            lambda: f2.round_(_one_minus(b2, dtype, z))),
        bc2_sqrt=bc2_sqrt,
        eps=_rounded_number(eps, dtype, lambda: f2.round_(const(eps))),
        eps_root=None if _is_zero(eps_root) else f2.round_(f2.mul(const(eps_root), bc2)),
        step_size=step_size,
        opaque_zero=z,
    )
    return c, decay

  def check_update_args(updates, state, params) -> None:
    check_count(state.count, name)
    _tree.check_same_structure(updates, state.mu, "updates", "optimizer state (mu)", what=name)
    if needs_params:
      _tree.check_params_given(updates, params, what=name)

  def update_fn(updates, state, params=None):
    check_update_args(updates, state, params)
    return compute(updates, state, params, fused=False, native=_native.enabled())

  def step_fn(grads, state, params):
    if learning_rate is None:
      raise TypeError(f"{name}: the fused step needs a learning rate (scale_by_adam has none)")
    check_update_args(grads, state, params)
    _tree.check_same_structure(grads, params, "grads", "params", what=name)
    return compute(grads, state, params, fused=True, native=_native.enabled())

  # Compiled even when called eagerly: op-by-op execution would not fuse the
  # moment updates into torch's multiply-adds and would round differently.
  @functools.partial(jax.jit, static_argnames=("fused", "native"))
  def compute(updates, state, params, fused: bool, native: bool):
    decay_mask = (
        jax.tree.map(lambda _: True, updates) if mask is None or params is None
        else _tree.resolve_mask(mask, params, what=name))
    # Without weight decay the step (s*m)/d is already torch's p_new - p.
    with_params = learning_rate is not None and params is not None and needs_params
    count = state.count
    _check_count_traced(count, name)
    new_count = optax.safe_increment(count)
    lr = None if learning_rate is None else scheduled("learning_rate", learning_rate, count, name)
    wd = scheduled("weight_decay", weight_decay, count, name)
    cache: dict[Any, tuple[_kernel.Coefficients, Any]] = {}
    how = dict(maximize=maximize, decoupled=decoupled, with_params=with_params, fused=fused)

    def scalars_for(dtype):
      if dtype not in cache:
        cache[dtype] = coefficients(lr, wd, new_count, dtype)
      return cache[dtype]

    def leaf(g, m, v, vm, p, decayed):
      """The pure-JAX kernel: (update, or new parameter when fused, m, v, vm)."""
      c, decay = scalars_for(_scalar_dtype(jnp.result_type(g, m, v, *(() if p is None else (p,)))))
      return _pure_leaf(g, m, v, vm, p, c, decay if decayed else None, **how)

    treedef = jax.tree.structure(updates)
    g_l = treedef.flatten_up_to(updates)
    m_l = treedef.flatten_up_to(state.mu)
    v_l = treedef.flatten_up_to(state.nu)
    vm_l = treedef.flatten_up_to(state.nu_max) if amsgrad else [None] * len(g_l)
    p_l = treedef.flatten_up_to(params) if params is not None else [None] * len(g_l)
    d_l = treedef.flatten_up_to(decay_mask)
    results: list[Any] = [None] * len(g_l)
    groups: dict[tuple[Any, bool, _native.Mode], list[int]] = {}
    for i, args in enumerate(zip(g_l, m_l, v_l, vm_l, p_l, d_l)):
      g, m, v, vm, p, decayed = args
      p_read = p if (with_params or fused) else None
      cdtype = jnp.result_type(g, m, v, *(() if p_read is None else (p_read,)))
      if (native and cdtype == g.dtype
          and _native.serves(g, p_read, l2=needs_params and not decoupled and decayed)):
        mode = _native.mode(g, m, v, vm, fused=fused, with_params=with_params)
        groups.setdefault((cdtype, bool(decayed), mode), []).append(i)
      else:
        results[i] = leaf(*args)
    calls = [(key, members[k:k + _native.LEAVES_PER_CALL]) for key, members in groups.items()
             for k in range(0, len(members), _native.LEAVES_PER_CALL)]
    for (cdtype, decayed, mode), indices in calls:
      c, decay = scalars_for(_scalar_dtype(cdtype))
      decay = decay if (decayed and needs_params) else None
      kind = (_native.Decay.NONE if decay is None
              else _native.Decay.DECOUPLED if decoupled else _native.Decay.L2)
      if mode == _native.Mode.MOMENTS and kind == _native.Decay.DECOUPLED:
        kind = _native.Decay.NONE  # the decoupled decay is in the parameter's step
      group = [(g_l[i], m_l[i], v_l[i], vm_l[i], p_l[i]) for i in indices]
      outs = _native_group(c, decay, group, cdtype, mode=mode, kind=kind, amsgrad=amsgrad, **how)
      for i, (out, m, v, vm) in zip(indices, outs):
        if mode == _native.Mode.MOMENTS:  # the parameter's step, fused with apply_updates
          out, m, v, vm = _pure_leaf(g_l[i], m_l[i], v_l[i], vm_l[i], p_l[i], c, decay,
                                     moments=(m, v, vm), **how)
        results[i] = (out, m, v, vm)
    out, mu, nu, nu_max = (treedef.unflatten(list(col)) for col in zip(*results)) if results else (
        updates if not fused else params, state.mu, state.nu, state.nu_max)
    new_state = ScaleByAdamState(new_count, mu, nu, nu_max if amsgrad else None)
    return out, new_state

  return optax.GradientTransformationExtraArgs(init_fn, AdamUpdate(update_fn, step_fn))

