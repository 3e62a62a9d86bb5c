"""Low-memory AdamW: the options ``param_rounding`` and ``moment_bits`` and their state.

With ``param_rounding="stochastic"`` or ``"kahan"`` a bfloat16 parameter's
step is computed in float32 (torch's arithmetic, the one kernel ``_kernel``)
and written back to bfloat16 by :mod:`adamw_jax._lowprec`; with
``moment_bits=8`` (or ``4``) the moments of large leaves are stored 8-bit
(4-bit) block-wise quantized (:mod:`adamw_jax._quantize`) and dequantized to
float32 for the step. Leaves that use neither go through the same pure-JAX kernel exactly as
without the options. These leaves never use the native CPU kernel. The state
is a :class:`LowMemoryAdamState`, used only when an option is on.

Layout: a quantization block is ``block_size`` consecutive elements of one
leaf in row-major order, so blocks never span leaves; a ``FlatParams`` buffer
gets quantized moments only if all its leaves would (``flatten(...,
moment_block_size=)`` packs them apart), else none or, mixed, it is refused.

Sharding: a leaf with quantized moments may be sharded along its first axis
into shards of whole blocks; its 8-bit codes are then sharded like it, its
4-bit codes (flat, two a byte, a block's bytes its own) and its scales (one
per block) along their one axis as its rows. :func:`init` refuses a
leaf whose shards would split a block (sharded along another axis, or into
shards whose sizes are not multiples of the block size) where it sees the
sharding: a concrete leaf, or a traced one on a mesh with explicit axes.
Under ``jit`` on a mesh with automatic axes it cannot; XLA then moves the
blocks between devices, and the numbers are the unsharded ones.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple, cast

import jax
import jax.core
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental.shard_alike import shard_alike
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from adamw_jax import _flat, _hyperparams, _kernel, _lowprec, _quantize, _scalars, _steer, _tree


class LowMemoryAdamState(NamedTuple):
  """State of ``adamw``/``adam``/``scale_by_adam`` with ``param_rounding`` or ``moment_bits``.

  Attributes:
    count: int32 step count, as :class:`adamw_jax.ScaleByAdamState`'s.
    mu, nu, nu_max: the moments as in ``ScaleByAdamState``; with
      ``moment_bits=8`` or ``4`` a leaf of at least 4096 elements (a multiple
      of the block size) holds a :class:`adamw_jax.QuantizedMoment` instead
      (4-bit: its subclass ``PackedQuantizedMoment``, flat codes two a byte).
    key: with ``param_rounding="stochastic"``: the raw uint32[2] PRNG key of
      the next step's rounding (split once per step), else None.
    compensation: with ``param_rounding="kahan"``: one buffer per leaf, in the
      parameter's dtype for bfloat16/float16 leaves, ``optax.MaskedNode()``
      for the others; else None.
  """

  count: jax.Array  # pyright: ignore[reportIncompatibleMethodOverride]  # shadows tuple.count
  mu: Any
  nu: Any
  nu_max: Any
  key: jax.Array | None
  compensation: Any


@dataclasses.dataclass(frozen=True)
class Options:
  """The low-memory options of one transform, already checked (``_hyperparams``)."""

  param_rounding: str = "nearest"
  rounding_seed: int = 0
  moment_bits: int | None = None
  moment_block_size: int = 256

  @classmethod
  def of(cls, s: _hyperparams.Settings) -> Options:
    """From a transform's checked settings; None: the default."""
    seed, block = s.rounding_seed, s.moment_block_size
    return cls(
      s.param_rounding,
      0 if seed is None else int(seed),
      s.moment_bits,
      _hyperparams.default_block_size(s.moment_bits) if block is None else int(block),
    )

  @property
  def enabled(self) -> bool:
    return self.param_rounding != "nearest" or self.moment_bits is not None

  def quantized(self, x) -> bool:
    return self.moment_bits is not None and _quantize.quantizes(np.shape(x), self.moment_block_size)

  def rounds(self, p) -> bool:
    """Whether the parameter `p` is written by stochastic rounding or with Kahan compensation."""
    if p is None or self.param_rounding == "nearest":
      return False
    if self.param_rounding == "stochastic":
      return jnp.dtype(p.dtype) == jnp.bfloat16
    return _lowprec.is_low_precision(p.dtype)


def _check_leaf(options: Options, path: str, p, name: str) -> None:
  at = _tree.where(path)
  if options.moment_bits is not None and jnp.iscomplexobj(p):
    raise ValueError(
      f"{name}: moment_bits={options.moment_bits} quantizes real moments; the "
      f"parameter at {at} is {p.dtype} (keep complex leaves in a param group "
      "without moment_bits)"
    )
  if options.param_rounding == "stochastic" and jnp.dtype(p.dtype) == jnp.float16:
    raise ValueError(
      f"{name}: param_rounding='stochastic' rounds to bfloat16; the parameter at "
      f"{at} is float16 (use param_rounding='kahan' for float16)"
    )
  if options.quantized(p):
    _check_shards(p, options.moment_block_size, at, name)


def _split_error(p, block_size: int, at: str, name: str, traced: bool) -> ValueError:
  return ValueError(
    f"{name}: the parameter at {at} (shape {p.shape}) is sharded so that a shard "
    f"splits a block of moment_block_size={block_size} elements (a block is "
    f"{block_size} consecutive elements of the leaf in row-major order); shard it along its "
    "first axis only, into shards of a multiple of the block size, or choose another "
    "block size" + (" (seen in the traced sharding of a mesh with explicit axes)" if traced else "")
  )


def _check_shards(p, block_size: int, at: str, name: str) -> None:
  """Refuses a sharded leaf whose shards would split a quantization block.

  Concrete leaves by their sharding; traced ones on a mesh with explicit axes
  by their sharding type. Under ``jit`` on a mesh with automatic axes the
  sharding is not known here: XLA then moves what a split block needs between
  devices (the numbers are the unsharded ones; tests/sharded_checks.py).
  """
  row = int(np.prod(p.shape[1:], dtype=np.int64))
  if isinstance(p, jax.core.Tracer):
    sharding = jax.typeof(p).sharding
    if not any(t == jax.sharding.AxisType.Explicit for t in sharding.mesh.axis_types):
      return
    spec = tuple(sharding.spec)
    axes = lambda entry: (
      () if entry is None else ((entry,) if isinstance(entry, str) else tuple(entry))
    )
    if any(axes(e) for e in spec[1:]):
      raise _split_error(p, block_size, at, name, True)
    shards = int(
      np.prod([sharding.mesh.shape[a] for a in axes(spec[0])] if spec else [], dtype=np.int64)
    )
    if shards > 1 and ((p.shape[0] // shards) * row % block_size or p.shape[0] % shards):
      raise _split_error(p, block_size, at, name, True)
    return
  sharding = getattr(p, "sharding", None)
  if sharding is None or len(sharding.device_set) == 1:
    return
  for index in sharding.devices_indices_map(p.shape).values():
    rows = range(p.shape[0])[index[0]] if p.ndim else range(1)
    whole = all(range(n)[s] == range(n) for n, s in zip(p.shape[1:], index[1:]))
    if not whole or (rows.start * row) % block_size or (len(rows) * row) % block_size:
      raise _split_error(p, block_size, at, name, False)


def _buffer_quantized(options: Options, flat: _flat.FlatParams, child: int, name: str) -> bool:
  """Whether a FlatParams buffer gets quantized moments: as its leaves would, all or none of them.

  A buffer whose leaves all get them holds them end to end, each a multiple of
  the block size, so its blocks are theirs; one with leaves of both kinds is
  refused (its blocks would span leaves and quantize leaves that per leaf keep
  full precision).
  """
  layout, block = flat.layout, options.moment_block_size
  members = layout.members[child]
  if len(members) == 1 and layout.slots[members[0]].start is None:  # a leaf kept whole
    return options.quantized(flat.buffers[child])
  eight = [i for i in members if _quantize.quantizes(layout.slots[i].shape, block)]
  if eight and len(eight) < len(members):
    full = next(i for i in members if i not in eight)
    size = lambda i: int(np.prod(layout.slots[i].shape, dtype=np.int64))
    raise ValueError(
      f"{name}: the flat buffer '{layout.names[child]}' packs leaves that get "
      f"{options.moment_bits}-bit moments "
      f"({_tree.where(layout.paths[eight[0]])}, {size(eight[0])} elements) and leaves that "
      f"keep full-precision ones ({_tree.where(layout.paths[full])}, {size(full)} elements: "
      f"fewer than {_quantize.MIN_SIZE} or not a multiple of moment_block_size={block}), so "
      "its blocks would span leaves; flatten the parameters with "
      f"adamw_jax.flatten(params, moment_block_size={block}), which packs the two kinds "
      "into separate buffers"
    )
  return bool(eight)


def _quantized_leaves(options: Options, params, name: str) -> list[bool]:
  """For each leaf of `params` (``jax.tree.leaves`` order): whether it gets quantized moments."""
  if options.moment_bits is None:
    return [False] * len(jax.tree.leaves(params))
  out = []
  for node in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, _flat.FlatParams)):
    if not isinstance(node, _flat.FlatParams):
      out.append(options.quantized(node))
      continue
    for child, buffer in enumerate(node.buffers):
      if jax.tree.leaves(buffer):  # not a MaskedNode (another group's buffer)
        out.append(_buffer_quantized(options, node, child, name))
  return out


def _zeros_like(p, dtype):
  z = jnp.zeros_like(p, dtype=dtype)
  return shard_alike(p, z)[1] if isinstance(p, jax.core.Tracer) else z


def _blocks_sharding(sharding, ndim: int):
  """The sharding of a leaf's per-block scales, from the leaf's: its first axis's, or None."""
  if isinstance(sharding, jax.sharding.SingleDeviceSharding):
    return sharding
  if isinstance(sharding, jax.sharding.NamedSharding):
    spec = tuple(sharding.spec) + (None,) * (ndim - len(sharding.spec))
    return NamedSharding(sharding.mesh, P(spec[0] if ndim else None))
  if sharding.is_fully_replicated:
    return NamedSharding(jax.sharding.Mesh(list(sharding.device_set), ("_",)), P())
  return None


def _quantized_zeros(p, block_size: int, bits: int) -> _quantize.QuantizedMoment:
  """The zero quantized moment of `p`, its codes sharded like `p` and its scales along the blocks.

  4-bit codes are flat, sharded as the scales (a shard's blocks are its bytes).

  A leaf may be sharded along its first axis only (:func:`_check_shards`), so
  each shard holds whole blocks and the scales (one per block, in row-major
  order) split along their one axis as the leaf along its first. Traced on a
  mesh with automatic axes, both are computed from the parameter (the sharding
  propagates); with explicit axes, from its sharding type.
  """
  q = _quantize.zeros(p, block_size, bits)
  if not isinstance(p, jax.core.Tracer):
    target = _blocks_sharding(p.sharding, p.ndim) if hasattr(p, "sharding") else None
    put = lambda x: x if target is None else jax.device_put(x, target)
    codes = _zeros_like(p, jnp.uint8) if bits == 8 else put(q.codes)
    return q._replace(codes=codes, scale=put(q.scale))
  sharding = jax.typeof(p).sharding
  if any(t == jax.sharding.AxisType.Explicit for t in sharding.mesh.axis_types):
    blocks = _blocks_sharding(sharding, p.ndim)
    codes = _zeros_like(p, jnp.uint8) if bits == 8 else jax.sharding.reshard(q.codes, blocks)
    return q._replace(codes=codes, scale=jax.sharding.reshard(q.scale, blocks))
  # Zeros computed from the parameter, so laid out as it is (the codes) and as its blocks (the
  # scales, +0.0 from a reduction of each block), not constants shard_alike'd: equal constants
  # of other leaves (their moments of the same shape) are one value to the partitioner, which
  # then gives them all one sharding.
  codes = (jnp.isnan(p) & jnp.isinf(p)).astype(jnp.uint8)
  if bits == 4:
    codes = jnp.max(codes.reshape(-1, 2), axis=1)
  anchor = jnp.max(p.reshape(-1, block_size).astype(jnp.float32), axis=1)
  return q._replace(codes=codes, scale=jnp.abs(jnp.where(jnp.isfinite(anchor), anchor, 0.0)) * 0.0)


def init(
  options: Options,
  params,
  *,
  name: str,
  amsgrad: bool,
  moment_dtype: Callable[[Any, Any], Any],
  mu_dtype,
  nu_dtype,
) -> LowMemoryAdamState:
  """The zero state: quantized zeros where :meth:`Options.quantized`, else as ScaleByAdamState's."""
  for path, p in _tree.flatten_params(params)[0]:
    _check_leaf(options, path, p, name)

  def moment(p, requested, quantized: bool):
    if quantized:
      return _quantized_zeros(p, options.moment_block_size, cast(int, options.moment_bits))
    return _zeros_like(p, moment_dtype(p.dtype, requested))

  def compensation(p):
    return _zeros_like(p, p.dtype) if options.rounds(p) else optax.MaskedNode()

  leaves, treedef = jax.tree.flatten(params)
  quantized = _quantized_leaves(options, params, name)
  each = lambda requested: treedef.unflatten(
    [moment(p, requested, q) for p, q in zip(leaves, quantized)]
  )
  mu, nu = each(mu_dtype), each(nu_dtype)
  nu_max = each(nu_dtype) if amsgrad else None
  key = (
    jax.random.PRNGKey(options.rounding_seed) if options.param_rounding == "stochastic" else None
  )
  comp = jax.tree.map(compensation, params) if options.param_rounding == "kahan" else None
  return LowMemoryAdamState(jnp.zeros([], jnp.int32), mu, nu, nu_max, key, comp)


def _load(x, signed: bool, shape: tuple[int, ...]):
  if isinstance(x, _quantize.QuantizedMoment):
    return _quantize.dequantize(x, signed, shape)
  return x


def _store(new, old, block_size: int, signed: bool, bits: int | None):
  if isinstance(old, _quantize.QuantizedMoment):
    return _quantize.quantize(new, block_size, signed, cast(int, bits))
  return new.astype(old.dtype)


def _flatten_like(treedef, tree, what: str, name: str) -> list:
  try:
    return treedef.flatten_up_to(tree)
  except (ValueError, TypeError) as e:
    raise ValueError(
      f"{name}: the updates and the optimizer state ({what}) differ in tree structure: {e}"
    ) from None


class Step(NamedTuple):
  """What one transform's step needs from ``_core``, fixed when the transform is built."""

  name: str
  writes_params: bool  # a learning rate is given: the update is new_param - param
  needs_params: bool  # nonzero weight decay
  decoupled: bool
  amsgrad: bool
  maximize: bool
  mask: Any
  coefficients: Callable  # (count, new_count, dtype) -> (Coefficients, decay)


def _leaf(
  options: Options,
  s: Step,
  scalars_for: Callable,
  g,
  m,
  v,
  vm,
  p,
  comp,
  key,
  decayed: bool,
  *,
  with_params: bool,
  fused: bool,
):
  """One leaf: (update or new parameter, m, v, vm, compensation)."""
  block, bits, shape = options.moment_block_size, options.moment_bits, tuple(g.shape)
  m_f, v_f = _load(m, True, shape), _load(v, False, shape)
  vm_f = None if vm is None else _load(vm, False, shape)
  rounds = options.rounds(p)
  if rounds:
    wide = lambda x: x.astype(jnp.float32)
    g_c, m_f, v_f, p_c = wide(g), wide(m_f), wide(v_f), wide(p)  # p: a rounded leaf's
    vm_f = None if vm_f is None else wide(vm_f)
  else:
    g_c, p_c = g, p
  parts = [x for x in (g_c, m_f, v_f, p_c if (with_params or rounds) else None) if x is not None]
  c, decay, z = scalars_for(_scalars.scalar_dtype(jnp.result_type(*parts)))
  decay = decay if decayed else None
  kw: dict[str, Any] = {
    "z": z,
    "maximize": s.maximize,
    "l2": None if s.decoupled else decay,
    "decay": decay if s.decoupled else None,
  }
  if rounds:
    new32, m_n, v_n, vm_n = _kernel.adam_leaf(g_c, m_f, v_f, vm_f, p_c, c, **kw)
    if options.param_rounding == "stochastic":
      new_p = _lowprec.stochastic_round_bf16(new32, key)
    else:
      new_p, comp = _lowprec.kahan_write(p, comp, new32 - p_c)
    out = new_p if fused else new_p - p
  else:
    out, m_n, v_n, vm_n = _kernel.adam_leaf(
      g_c, m_f, v_f, vm_f, p_c if with_params else None, c, **kw
    )
    if with_params:
      out = out - p
    if fused:
      out = optax.apply_updates(p, out)
  vm_n = None if vm is None else _store(vm_n, vm, block, False, bits)
  return (
    out,
    _store(m_n, m, block, True, bits),
    _store(v_n, v, block, False, bits),
    vm_n,
    comp,
  )


def functions(options: Options, s: Step):
  """``(update, step)`` of the transform: optax's update and the fused step."""
  kahan = options.param_rounding == "kahan"

  def check(updates, state, params, fused: bool) -> None:
    if not isinstance(state, LowMemoryAdamState):
      raise TypeError(
        f"{s.name}: the optimizer state is a {type(state).__name__}, not the "
        "LowMemoryAdamState this transform's init makes"
      )
    if s.needs_params or options.param_rounding != "nearest" or fused:
      _tree.check_params_given(updates, params, what=s.name)
    if params is not None:
      _tree.check_same_structure(updates, params, "updates", "params", what=s.name)

  @functools.partial(jax.jit, static_argnames=("fused",))
  def compute(updates, state: LowMemoryAdamState, params, fused: bool):
    decay_mask = (
      jax.tree.map(lambda _: True, updates)
      if s.mask is None or params is None
      else _tree.resolve_mask(s.mask, params, what=s.name)
    )
    with_params = s.writes_params and params is not None and s.needs_params
    count, new_count = state.count, cast(jax.Array, optax.safe_increment(state.count))
    z = _steer.opaque_zero(new_count)
    cache: dict[Any, Any] = {}

    def scalars_for(dtype):  # (Coefficients, decay, opaque zero)
      if dtype not in cache:
        cache[dtype] = (*s.coefficients(count, new_count, dtype), z)
      return cache[dtype]

    treedef = jax.tree.structure(updates)
    flat = lambda tree, what: _flatten_like(treedef, tree, what, s.name)
    n = treedef.num_leaves
    g_l, m_l, v_l = flat(updates, "updates"), flat(state.mu, "mu"), flat(state.nu, "nu")
    vm_l = flat(state.nu_max, "nu_max") if s.amsgrad else [None] * n
    p_l = flat(params, "params") if params is not None else [None] * n
    c_l = flat(state.compensation, "compensation") if kahan else [None] * n
    d_l = flat(decay_mask, "mask")
    key, step_key = (None, None) if state.key is None else jax.random.split(state.key)
    results = []
    for i, (g, m, v, vm, p, comp, decayed) in enumerate(zip(g_l, m_l, v_l, vm_l, p_l, c_l, d_l)):
      leaf_key = None if step_key is None else jax.random.fold_in(step_key, i)
      results.append(
        _leaf(
          options,
          s,
          scalars_for,
          g,
          m,
          v,
          vm,
          p,
          comp,
          leaf_key,
          bool(decayed),
          with_params=with_params,
          fused=fused,
        )
      )
    cols = (
      [treedef.unflatten(list(col)) for col in zip(*results)]
      if results
      else ([params if fused else updates, state.mu, state.nu, state.nu_max, state.compensation])
    )
    out, mu, nu, nu_max, comp = cols
    return out, LowMemoryAdamState(
      new_count, mu, nu, nu_max if s.amsgrad else None, key, comp if kahan else None
    )

  def update_fn(updates, state, params=None):
    check(updates, state, params, fused=False)
    return compute(updates, state, params, fused=False)

  def step_fn(grads, state, params):
    if not s.writes_params:
      raise TypeError(f"{s.name}: the fused step needs a learning rate (scale_by_adam has none)")
    check(grads, state, params, fused=True)
    return compute(grads, state, params, fused=True)

  return update_fn, step_fn
