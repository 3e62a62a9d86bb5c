"""The Adam-family gradient transformation behind ``scale_by_adam``, ``adamw`` and ``adam``.

The math and every deliberate difference from torch and optax are written
once, in [the math](math.md) (the math, the differences from torch and optax); this
module wires the hyperparameters, the state, the per-step scalars and the two
twin kernels (``_kernel``, pure JAX; ``_native``, the CPU kernel) together, in
one step loop for every option: the low-memory ones (``_lowmem``) only choose
per leaf how its moments are held (``_moments``) and its parameter written
(``_writes``), so every check, mask, group, flat-buffer and sharding rule is
the default path's.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple, cast

import jax
import jax.core
import jax.numpy as jnp
import numpy as np
import optax
from jax import tree_util as jtu
from jax.experimental import checkify

from adamw_jax import (
  _accel,
  _accel_random,
  _hyperparams,
  _kernel,
  _lowmem,
  _moments,
  _native,
  _native_lowmem,
  _quantize,
  _scalars,
  _steer,
  _tree,
  _writes,
)
from adamw_jax._tree import check_params


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

  count: jax.Array  # pyright: ignore[reportIncompatibleMethodOverride]  # shadows tuple.count
  mu: Any
  nu: Any
  nu_max: Any


def _moment_dtype(param_dtype, requested, default=None) -> jnp.dtype:
  """A moment's dtype: `requested`, else `default` (a writer's), else the parameter's."""
  if requested is None:
    return jnp.dtype(param_dtype if default is None else default)
  if jnp.issubdtype(param_dtype, jnp.complexfloating):
    return jnp.promote_types(requested, jnp.complex64)
  return jnp.dtype(requested)


class AdamUpdate:
  """The ``update`` function of an Adam-family transform, which also knows its fused step.

  Calling it is optax's ``update(updates, state, params=None, **extra_args)``
  (the extra arguments, e.g. a loss ``value`` meant for another transform of a
  chain, are ignored); `step` is [`fused_step`][adamw_jax.fused_step].

  One extra argument is this package's own: ``fused_step`` on an
  ``optax.MultiSteps`` runs the wrapper's public ``update`` with
  ``PROBE=True``, and the inner update then returns, instead of its step,
  ``(updates, 1.0)`` with its state unchanged: MultiSteps multiplies both by
  its emit flag, which tells ``fused_step`` whether to take the fused step on
  the averaged gradient it also hands back (``_fused``).
  """

  PROBE = "_adamw_jax_fused_probe"

  def __init__(self, update: Callable, step: Callable):
    self._update, self._step = update, step

  def __call__(self, updates: Any, state: optax.OptState, params: Any = None, **extra_args):
    if extra_args.get(self.PROBE) is True:
      return (updates, jnp.ones([], jnp.float32)), state
    return self._update(updates, state, params)

  def step(self, grads: Any, state: optax.OptState, params: Any):
    return self._step(grads, state, params)


def _describe_value(x: Any) -> str:
  if hasattr(x, "dtype") and hasattr(x, "shape"):
    return f"{jnp.dtype(x.dtype).name}{list(np.shape(x))}"
  return f"the {type(x).__name__} {x!r}"


def check_count(count: Any, what: str) -> None:
  """The state's step count must be an integer scalar, and not negative.

  The dtype and shape are checked when the step is traced. The value is
  checked here only when it is a Python or NumPy integer (free to read); a
  jax.Array is checked inside the step by ``checkify.debug_check``
  (`_check_count_traced`), as reading it here would cost a device round
  trip per step.
  """
  integer = (hasattr(count, "dtype") and jnp.issubdtype(count.dtype, jnp.integer)) or (
    isinstance(count, (int, np.integer)) and not isinstance(count, bool)
  )
  if not integer or np.ndim(count) != 0:
    raise TypeError(
      f"{what}: the state's count must be an integer scalar (int32: the number of steps "
      f"taken, torch's step), got {_describe_value(count)}; give a converted or edited "
      "state count=jnp.asarray(step, jnp.int32)."
    )
  if isinstance(count, (int, np.integer, np.ndarray)) and int(count) < 0:
    raise ValueError(
      f"{what}: the state's count is {int(count)}; it must be >= 0 (the number of steps taken)."
    )


def _check_count_traced(count: jax.Array, what: str) -> None:
  if not _hyperparams.traced_checks():
    return
  checkify.debug_check(
    count >= 0,
    f"{what}: the state's count is {{}}; it must be >= 0 (the number of steps taken)",
    count,
  )


def _compute_dtypes(params, quantized: list[bool], options: _lowmem.Options, requested) -> list:
  """Each leaf's compute dtype: a writer's own, float32 with quantized moments, else promoted."""
  out = []
  for p, q in zip(jax.tree.leaves(params), quantized):
    writer = options.writer(p)
    moments = (
      (jnp.float32,) if q else tuple(writer.moments_in if d is None else d for d in requested)
    )
    moments = tuple(d for d in moments if d is not None)
    own = writer.computes_in
    out.append(
      jnp.dtype(own) if own is not None else jnp.result_type(_tree.leaf_dtype(p), *moments)
    )
  return out


def _warn_if_eps_vanishes(params: Any, eps: Any, dtypes: list, hint: str, what: str) -> None:
  """Warns when `eps` rounds to 0 in a leaf's compute dtype (float16: eps < 3e-8)."""
  x = _hyperparams.concrete("eps", eps)
  if not x:
    return
  for (path, _), dtype in zip(jtu.tree_flatten_with_path(params)[0], dtypes):
    if jnp.issubdtype(dtype, jnp.floating) and np.asarray(x, dtype) == 0:
      warnings.warn(
        f"{what}: eps={x} rounds to 0 in {jnp.dtype(dtype).name} (the parameter at "
        f"{_tree.where(path)}): where a gradient is zero the step is 0/0 and the parameter "
        f"becomes NaN, as in torch's (non-fused) AdamW. Use eps >= 6e-8 (e.g. 1e-4 for "
        f"float16){hint}.",
        UserWarning,
        stacklevel=4,
      )
      return


def _eps_hint(options: _lowmem.Options) -> str:
  q = options.quantization
  if q is None:
    return ", or float32 moments (mu_dtype=nu_dtype=jnp.float32)"
  return (
    f": with moment_bits={q.bits} a leaf of fewer than {_quantize.MIN_SIZE} elements (or not "
    f"a multiple of moment_block_size={q.block_size}) keeps moments of its own dtype and is "
    "computed in it, as in torch's AdamW"
  )


def adam_transform(s: _hyperparams.Settings) -> optax.GradientTransformationExtraArgs:
  """One Adam-family transform, from its checked settings (`Settings`).

  With ``s.direction_only`` (and no learning rate) it returns the
  bias-corrected Adam direction (``scale_by_adam``); otherwise it returns
  ``new_param - param`` for the full torch step (lr, weight decay and all), so
  that ``optax.apply_updates`` reproduces torch's parameters. ``s.decoupled``
  selects AdamW's ``p *= 1 - lr*wd`` over Adam's L2 term ``g += wd * p``;
  ``s.mask`` limits weight decay to some leaves. ``decay_mode="paper"`` makes
  the decay ``p *= 1 - (lr/peak)*wd`` (``_paper``). The low-memory options
  (``_lowmem``) choose per leaf how its moments are held (``_moments``) and
  its parameter written (``_writes``), in this one step.
  """
  name, learning_rate, mask, amsgrad = s.name, s.learning_rate, s.mask, s.amsgrad
  decoupled, maximize, needs_params = s.decoupled, s.maximize, s.needs_params
  mu_dtype, nu_dtype = s.mu_dtype, s.nu_dtype
  options = _lowmem.Options.of(s)
  quantization = options.quantization
  state_type = _lowmem.LowMemoryAdamState if options.enabled else ScaleByAdamState
  rounding_reads = _writes.WRITERS[options.param_rounding].reads_params

  def init_fn(params):
    check_params(params, name)
    if mask is not None:
      _tree.check_mask(mask, params, what=name)
    _lowmem.check_leaves(options, params, name)
    quantized = _moments.quantized_leaves(quantization, params, name)
    dtypes = _compute_dtypes(params, quantized, options, (mu_dtype, nu_dtype))
    _warn_if_eps_vanishes(params, s.eps, dtypes, _eps_hint(options), name)
    leaves, treedef = jax.tree.flatten(params)

    def moments(requested):
      return treedef.unflatten(
        [
          _moments.quantized_zeros(p, quantization)
          if quantization is not None and q
          else _moments.zeros(
            p, _moment_dtype(_tree.leaf_dtype(p), requested, options.writer(p).moments_in)
          )
          for p, q in zip(leaves, quantized)
        ]
      )

    mu, nu = moments(mu_dtype), moments(nu_dtype)
    nu_max = moments(nu_dtype) if amsgrad else None
    count = _moments.placed_as(jnp.zeros([], jnp.int32), params)
    if not options.enabled:
      return ScaleByAdamState(count, mu, nu, nu_max)
    state = _lowmem.init_state(options, params, count, mu, nu, nu_max)
    if state.key is not None:
      state = state._replace(key=_moments.placed_as(state.key, params))
    # optax's OptState (ArrayTree) has no None, which a pytree node may be (state.key).
    return cast(optax.OptState, state)

  def check_update_args(updates, state, params) -> None:
    if not isinstance(state, state_type):
      raise TypeError(
        f"{name}: the optimizer state is a {type(state).__name__}, not the "
        f"{state_type.__name__} this transform's init makes"
      )
    check_count(state.count, name)
    # 4-bit codes are flat: they stand for the parameters' (or the updates') leaf of their size.
    mu = _moments.shapes(state.mu, params, updates) if options.enabled else state.mu
    _tree.check_same_structure(updates, mu, "updates", "optimizer state (mu)", what=name)
    if needs_params:
      _tree.check_params_given(updates, params, what=name)
    elif rounding_reads and learning_rate is not None:
      why = f"param_rounding={options.param_rounding!r} writes the parameters"
      _tree.check_params_given(updates, params, what=name, why=why)
    elif params is not None:
      _tree.check_same_structure(updates, params, "updates", "params", what=name)
    _lowmem.check_state(options, state, updates, params, amsgrad=amsgrad, name=name)

  def run(updates, state, params, fused: bool):
    """The compiled step; what it reads of the environment is static (a retrace when it changes)."""
    checks = _hyperparams.traced_checks()
    return compute(updates, state, params, fused=fused, native=_native.enabled(), checks=checks)

  def update_fn(updates, state, params=None):
    check_update_args(updates, state, params)
    return run(updates, state, params, fused=False)

  def step_fn(grads, state, params):
    if learning_rate is None:
      raise TypeError(f"{name}: the fused step needs a learning rate (scale_by_adam has none)")
    check_update_args(grads, state, params)
    _tree.check_same_structure(grads, params, "grads", "params", what=name)
    return run(grads, state, params, fused=True)

  # Compiled even when called eagerly: op-by-op execution would not fuse the
  # moment updates into torch's multiply-adds and would round differently.
  @functools.partial(jax.jit, static_argnames=("fused", "native", "checks"))
  def compute(updates, state, params, fused: bool, native: bool, checks: bool):
    del checks  # read again by the checks themselves; a static argument so that it retraces
    decay_mask = (
      jax.tree.map(lambda _: True, updates)
      if mask is None or params is None
      else _tree.resolve_mask(mask, params, what=name)
    )
    # Without weight decay the step (s*m)/d is already torch's p_new - p.
    with_params = learning_rate is not None and params is not None and needs_params
    count = state.count
    _check_count_traced(count, name)
    new_count = cast(jax.Array, optax.safe_increment(count))  # typed ArrayLike, is an Array
    z = _steer.opaque_zero(new_count)
    lr, wd = _scalars.schedules_at(s, count)
    cache: dict[Any, tuple[_kernel.Coefficients, Any]] = {}
    how = _writes.How(z, maximize, decoupled, with_params, fused)

    def scalars_for(dtype):
      if dtype not in cache:
        cache[dtype] = _scalars.coefficients(s, lr, wd, new_count, dtype)
      return cache[dtype]

    def leaf(g, m, v, vm, p, decayed, buffer, key, writer: _writes.Writer, scalars=None, how=how):
      """One leaf through its hooks: moments loaded, the writer's step, moments stored.

      `scalars`: the step's (coefficients, decay) for its dtype, and `how`, when the leaf is
      traced apart from the step (the native call's pure branch); else the step's own.
      """
      signs = (True, False, False)
      moments = [x for x in (m, v, vm) if x is not None]
      if scalars is None:
        held = [jnp.float32 if _moments.is_quantized(x) else x for x in moments[:2]]
        dtype = jnp.result_type(g, *held, *(() if p is None else (p,)))
        scalars = scalars_for(_scalars.scalar_dtype(dtype))
      c, decay = scalars
      decay = decay if decayed else None

      def through(g, moments, p, buffer, c, decay, z, key=key):
        """The hooks in XLA: moments loaded, the writer's step, moments stored."""
        loaded = [_moments.load(x, signed, np.shape(g)) for x, signed in zip(moments, signs)]
        m_c, v_c, vm_c = (*loaded, None)[:3]
        out, *new, buffer = writer.step(
          g, m_c, v_c, vm_c, p, c, decay, buffer, key, how._replace(z=z)
        )
        stored = [_moments.store(x, old, signed) for x, old, signed in zip(new, moments, signs)]
        return out, stored, buffer

      if all(map(_moments.is_quantized, moments)) and _accel.eligible(writer):
        spec = _accel.Spec(
          block_size=cast(_moments.Quantization, quantization).block_size,
          bits=cast(_moments.Quantization, quantization).bits,
          moments=signs[: len(moments)],
          writer=writer,
          how=how,
          decayed=decay is not None,
          has_params=p is not None and (how.with_params or how.fused or writer.reads_params),
          has_buffer=buffer is not None,
          eps_root=c.eps_root is not None,
          out_dtype=None,
        )
        out, stored, buffer = _accel.leaf(spec, through, g, moments, p, buffer, c, decay, how.z)
      elif _accel_random.eligible(writer, how, g, moments, p, buffer):
        spec = _accel_random.Spec(
          writer, how, decay is not None, c.eps_root is not None, signs[: len(moments)]
        )
        args = (g, moments, p, buffer, c, decay, how.z, key)
        out, stored, buffer = _accel_random.leaf(spec, through, *args)
      else:
        out, stored, buffer = through(g, moments, p, buffer, c, decay, how.z)
      stored = [*stored, None][:3]
      return out, stored[0], stored[1], stored[2], buffer

    treedef = jax.tree.structure(updates)
    n = treedef.num_leaves
    g_l = treedef.flatten_up_to(updates)
    m_l = treedef.flatten_up_to(state.mu)
    v_l = treedef.flatten_up_to(state.nu)
    vm_l = treedef.flatten_up_to(state.nu_max) if amsgrad else [None] * n
    p_l = treedef.flatten_up_to(params) if params is not None else [None] * n
    d_l = treedef.flatten_up_to(decay_mask)
    field = options.buffer_field
    b_l = treedef.flatten_up_to(getattr(state, field)) if field else [None] * n
    new_key, step_key = jax.random.split(state.key) if options.stochastic else (None, None)
    results: list[Any] = [None] * n
    groups: dict[tuple, list[int]] = {}
    keys: list[Any] = [None] * n

    def native_group(g, m, v, vm, p, decayed, writer: _writes.Writer) -> tuple | None:
      """The key of the native call that computes this leaf, or None (the pure hooks)."""
      p_read = p if (with_params or fused) else None
      rounding = writer.param_rounding
      # The nearest writer computes with the parameter only with weight decay (optax_leaf).
      cdtype = _native_lowmem.compute_dtype(
        g, m, v, vm, p if writer.reads_params or with_params else None, rounding
      )
      if cdtype is not None:
        mode = _native_lowmem.mode(rounding, fused=fused, with_params=with_params)
        return (_native_lowmem, cdtype, bool(decayed), mode, rounding)
      plain = writer is _writes.NEAREST and not any(map(_moments.is_quantized, (m, v, vm)))
      if not plain:
        return None
      cdtype = jnp.result_type(g, m, v, *(() if p_read is None else (p_read,)))
      l2 = needs_params and not decoupled and decayed
      if cdtype != g.dtype or not _native.serves(g, p_read, l2=l2):
        return None
      mode = _native.mode(g, m, v, vm, fused=fused, with_params=with_params)
      return (_native, cdtype, bool(decayed), mode, "nearest")

    for i, (g, m, v, vm, p, decayed, buffer) in enumerate(zip(g_l, m_l, v_l, vm_l, p_l, d_l, b_l)):
      writer = options.writer(p)
      if writer.uses_key:
        keys[i] = jax.random.fold_in(cast(jax.Array, step_key), i)
      key = native_group(g, m, v, vm, p, decayed, writer) if native else None
      if key is None:
        results[i] = leaf(g, m, v, vm, p, decayed, buffer, keys[i], writer)
      else:
        groups.setdefault(key, []).append(i)
    calls = [
      (key, members[k : k + _native.LEAVES_PER_CALL])
      for key, members in groups.items()
      for k in range(0, len(members), _native.LEAVES_PER_CALL)
    ]
    for (module, cdtype, decayed, mode, rounding), indices in calls:
      c, decay = scalars_for(_scalars.scalar_dtype(cdtype))
      decay = decay if (decayed and needs_params) else None
      kind = (
        _native.Decay.NONE
        if decay is None
        else _native.Decay.DECOUPLED
        if decoupled
        else _native.Decay.L2
      )
      if module is _native_lowmem:
        writer = _writes.WRITERS[rounding]
        own = [(g_l[i], m_l[i], v_l[i], vm_l[i], p_l[i], b_l[i], keys[i]) for i in indices]

        def pure(args, scalars, z, decayed=decayed, writer=writer):
          g, m, v, vm, p, buffer, key = args
          return leaf(g, m, v, vm, p, decayed, buffer, key, writer, scalars, how._replace(z=z))

        outs = _native_lowmem.group(
          c,
          decay,
          own,
          pure,
          cdtype,
          z=z,
          mode=mode,
          kind=kind,
          amsgrad=amsgrad,
          writer=_native_lowmem.WRITERS[rounding],
          maximize=maximize,
        )
        for i, result in zip(indices, outs):
          results[i] = result
        continue
      if mode == _native.Mode.MOMENTS and kind == _native.Decay.DECOUPLED:
        kind = _native.Decay.NONE  # the decoupled decay is in the parameter's step
      leaves = [(g_l[i], m_l[i], v_l[i], vm_l[i], p_l[i]) for i in indices]
      outs = _native.group(
        c, decay, leaves, cdtype, mode=mode, kind=kind, amsgrad=amsgrad, **how._asdict()
      )
      for i, (out, m, v, vm) in zip(indices, outs):
        if mode == _native.Mode.MOMENTS:  # the parameter's step, fused with apply_updates
          out, m, v, vm = _kernel.optax_leaf(
            g_l[i], m_l[i], v_l[i], vm_l[i], p_l[i], c, decay, moments=(m, v, vm), **how._asdict()
          )
        results[i] = (out, m, v, vm, b_l[i])
    out, mu, nu, nu_max, buffers = (
      (treedef.unflatten(list(col)) for col in zip(*results))
      if results
      else (updates if not fused else params, state.mu, state.nu, state.nu_max, None)
    )
    nu_max = nu_max if amsgrad else None
    if not options.enabled:
      return out, ScaleByAdamState(new_count, mu, nu, nu_max)
    new = _lowmem.LowMemoryAdamState(new_count, mu, nu, nu_max, new_key, None)
    if field is not None:
      new = new._replace(**{field: buffers if results else getattr(state, field)})
    return out, new

  return optax.GradientTransformationExtraArgs(init_fn, AdamUpdate(update_fn, step_fn))
