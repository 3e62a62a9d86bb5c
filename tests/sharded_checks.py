"""Sharding checks on 8 virtual CPU devices, run in a subprocess by tests/test_sharding.py.

The device count is fixed when jax first initialises its backend, so these run
in their own process (started with ``XLA_FLAGS=--xla_force_host_platform_device_count=8``);
importing this module has no side effects, so the test can read ``CHECKS``.
By hand, from the repository root::

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m tests.sharded_checks [name ...]

prints one line ``RESULTS {json}``: for every check, whether it passed, what it
measured, and the traceback when it failed. Exits non-zero only if the checks
could not run at all (e.g. not 8 devices).
"""

from __future__ import annotations

import contextlib
import functools
import json
import re
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import adamw_jax
from tests import docs_pages

MARKER = "RESULTS "
N = 8
AXIS = "fsdp"
COLLECTIVES = ("all-gather", "all-reduce", "collective-permute", "reduce-scatter", "all-to-all")
_COLLECTIVE_OP = re.compile(r"\s(" + "|".join(COLLECTIVES) + r")(-start)?\(")


# --------------------------------------------------------------------------
# Model, data and sharding rules
# --------------------------------------------------------------------------


class MLP(nn.Module):
  """Small (compiles fast); every parameter has an axis divisible by 8, so ZeRO-1 splits all."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(64)(x))
    return nn.Dense(16)(x)


def batch(seed: int):
  rng = np.random.default_rng(seed)
  return (
    jnp.asarray(rng.standard_normal((32, 24)), jnp.float32),
    jnp.asarray(rng.integers(0, 16, 32), jnp.int32),
  )


def init_params(bf16_leaf: bool):
  params = MLP().init(jax.random.key(0), batch(0)[0])["params"]
  if bf16_leaf:  # mixed dtypes: one kernel in bfloat16
    params = {
      **params,
      "Dense_0": {**params["Dense_0"], "kernel": params["Dense_0"]["kernel"].astype(jnp.bfloat16)},
    }
  return params


def loss_fn(params, x, y):
  logits = MLP().apply({"params": params}, x)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def largest_axis_spec(shape) -> P:
  """Split the largest axis that divides evenly over the mesh; replicate if none does."""
  for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
    if shape[axis] % N == 0:
      return P(*(AXIS if a == axis else None for a in range(len(shape))))
  return P()


def mesh_of(kind: str):
  axis_type = {"auto": AxisType.Auto, "explicit": AxisType.Explicit}[kind]
  return jax.make_mesh((N,), (AXIS,), axis_types=(axis_type,))


def split_shardings(tree, mesh):
  return jax.tree.map(lambda x: NamedSharding(mesh, largest_axis_spec(np.shape(x))), tree)


def one_device(tree):
  return jax.device_put(tree, jax.devices()[0])


# --------------------------------------------------------------------------
# The configurations
# --------------------------------------------------------------------------


class Config(NamedTuple):
  make: Callable[[], optax.GradientTransformation]
  bf16_leaf: bool = False
  global_reduction: bool = False  # the transform needs a cross-device reduction


CONFIGS = {
  "decay_mask_schedule": Config(
    lambda: adamw_jax.adamw(
      optax.linear_schedule(1e-2, 1e-3, 10), weight_decay=0.1, mask=adamw_jax.decay_mask
    )
  ),
  "amsgrad_bf16_leaf": Config(
    lambda: adamw_jax.adamw(1e-2, weight_decay=0.1, amsgrad=True), bf16_leaf=True
  ),
  "chain_mu_bf16_maximize": Config(
    lambda: optax.chain(
      adamw_jax.scale_by_adam(mu_dtype=jnp.bfloat16, maximize=True),
      adamw_jax.add_decayed_weights(1e-2, mask=adamw_jax.decay_mask),
      optax.scale_by_learning_rate(-1e-2),
    )
  ),
  "clip_by_global_norm": Config(
    lambda: optax.chain(optax.clip_by_global_norm(0.5), adamw_jax.adamw(1e-2)),
    global_reduction=True,
  ),
}

CHECKS: dict[str, Callable[[], str]] = {}


def check(name: str):
  def register(fn):
    CHECKS[name] = fn
    return fn

  return register


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------


def train_step(tx, compute=None):
  """Forward/backward and the optimizer update.

  `compute`: the sharding of the forward/backward (replicated here: FSDP
  all-gathers the weights, exactly; the gradients come out whole and each device
  updates its slice). Left to the compiler, it may split the batch instead and
  sum the gradients across devices in another order than one device does.
  """

  def step(params, state, x, y):
    def loss_of(p):
      if compute is not None:
        p = jax.lax.with_sharding_constraint(p, compute)
      return loss_fn(p, x, y)

    loss, grads = jax.value_and_grad(loss_of)(params)
    if compute is not None:
      grads = jax.lax.with_sharding_constraint(grads, compute)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  return step


def run_steps(step, params, state, steps=2):
  for i in range(steps):
    params, state, _ = step(params, state, *batch(i + 1))
  return params, state


@functools.cache
def one_device_steps(config_name: str):
  """The reference: the same steps on one device."""
  config = CONFIGS[config_name]
  tx = config.make()
  params = one_device(init_params(config.bf16_leaf))
  return run_steps(jax.jit(train_step(tx)), params, tx.init(params))


def bitwise_diffs(a, b) -> list[str]:
  """Paths where two pytrees differ in structure, dtype or any bit."""
  la, ta = jax.tree_util.tree_flatten_with_path(a)
  lb, tb = jax.tree_util.tree_flatten_with_path(b)
  if ta != tb:
    return [f"structure: {ta} != {tb}"]
  out = []
  for (path, x), (_, y) in zip(la, lb):
    x, y = np.asarray(x), np.asarray(y)
    if x.dtype != y.dtype or x.shape != y.shape or x.tobytes() != y.tobytes():
      out.append(jax.tree_util.keystr(path))
  return out


def max_abs_diff(a, b) -> float:
  diffs = jax.tree.map(
    lambda x, y: float(
      np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)), initial=0.0)
    ),
    a,
    b,
  )
  return max(jax.tree.leaves(diffs), default=0.0)


def sharding_mismatches(state, params) -> list[str]:
  """Moments (mu, nu, nu_max) whose sharding differs from their parameter's."""
  bad = []
  for part in jax.tree.leaves(state, is_leaf=lambda s: isinstance(s, adamw_jax.ScaleByAdamState)):
    if not isinstance(part, adamw_jax.ScaleByAdamState):
      continue
    for field in ("mu", "nu", "nu_max"):
      moments = getattr(part, field)
      if moments is None:
        continue
      for (path, m), p in zip(
        jax.tree_util.tree_flatten_with_path(moments)[0], jax.tree.leaves(params)
      ):
        if not m.sharding.is_equivalent_to(p.sharding, p.ndim):
          bad.append(f"{field}{jax.tree_util.keystr(path)}: {m.sharding} vs {p.sharding}")
  return bad


def adam_states(state) -> list[adamw_jax.ScaleByAdamState]:
  is_adam = lambda s: isinstance(s, adamw_jax.ScaleByAdamState)
  return [s for s in jax.tree.leaves(state, is_leaf=is_adam) if is_adam(s)]


def collectives_in(hlo: str) -> list[str]:
  return sorted({m.group(1) for m in _COLLECTIVE_OP.finditer(hlo)})


# --------------------------------------------------------------------------
# FSDP: parameters and state split over the 8 devices
# --------------------------------------------------------------------------


def _fsdp_init(config_name: str, kind: str, jitted: bool) -> str:
  config = CONFIGS[config_name]
  mesh = mesh_of(kind)
  params = init_params(config.bf16_leaf)
  params = jax.device_put(params, split_shardings(params, mesh))
  tx = config.make()
  state = jax.jit(tx.init)(params) if jitted else tx.init(params)
  moments = sum(
    len(jax.tree.leaves(s.mu)) + len(jax.tree.leaves(s.nu)) + len(jax.tree.leaves(s.nu_max))
    for s in adam_states(state)
  )
  assert moments >= 2 * len(jax.tree.leaves(params)), f"only {moments} moments found"
  bad = sharding_mismatches(state, params)
  assert not bad, "moments not sharded like their params:\n" + "\n".join(bad)
  detail = f"{moments} moments sharded like their params"
  if kind == "auto" and jitted:  # what the fix is for: plain zeros_like under jit
    plain = jax.jit(lambda p: jax.tree.map(jnp.zeros_like, p))(params)
    kept = all(
      z.sharding.is_equivalent_to(p.sharding, p.ndim)
      for z, p in zip(jax.tree.leaves(plain), jax.tree.leaves(params))
    )
    detail += f" (jit(jnp.zeros_like) {'keeps' if kept else 'loses'} the sharding here)"
  return detail


for _name in CONFIGS:
  for _kind in ("auto", "explicit"):
    for _mode in ("eager", "jit"):
      check(f"fsdp_init[{_name}-{_kind}-{_mode}]")(
        lambda n=_name, k=_kind, m=_mode: _fsdp_init(n, k, m == "jit")
      )


def _fsdp_step(config_name: str) -> str:
  config = CONFIGS[config_name]
  mesh = mesh_of("auto")
  tx = config.make()
  params = init_params(config.bf16_leaf)
  shardings = split_shardings(params, mesh)
  replicated = NamedSharding(mesh, P())

  p8 = jax.device_put(params, shardings)
  p8, s8 = run_steps(jax.jit(train_step(tx, compute=replicated)), p8, jax.jit(tx.init)(p8))
  p1, s1 = one_device_steps(config_name)

  bad = sharding_mismatches(s8, p8)
  assert not bad, "state lost its sharding during the steps:\n" + "\n".join(bad)
  for p, sh in zip(jax.tree.leaves(p8), jax.tree.leaves(shardings)):
    assert p.sharding.is_equivalent_to(sh, p.ndim), f"params resharded: {p.sharding} vs {sh}"
  diffs = bitwise_diffs((p8, s8), (p1, s1))
  if config.global_reduction:
    # The norm is summed per shard, then across devices: a different order.
    err = max_abs_diff((p8, s8), (p1, s1))
    assert err < 1e-6, f"8 devices vs 1: max |diff| {err:.3g}"
    return (
      f"2 steps, FSDP on 8 devices vs 1: max |diff| {err:.3g} ({len(diffs)} leaves not bitwise)"
    )
  assert not diffs, "8 devices vs 1 differ at:\n" + "\n".join(diffs)
  return "2 steps, FSDP on 8 devices == 1 device bitwise (params and state); state stays sharded"


for _name in CONFIGS:
  check(f"fsdp_step[{_name}]")(lambda n=_name: _fsdp_step(n))


def _fsdp_update_hlo(config_name: str, kind: str) -> str:
  """The compiled optimizer update on sharded grads/state/params: which collectives it runs."""
  config = CONFIGS[config_name]
  mesh = mesh_of(kind)
  tx = config.make()
  params = init_params(config.bf16_leaf)
  params = jax.device_put(params, split_shardings(params, mesh))
  grads = jax.tree.map(lambda p: (p * 0.01).astype(p.dtype), params)
  state = jax.jit(tx.init)(params)

  def update(grads, state, params):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  compiled = jax.jit(update).lower(grads, state, params).compile()
  found = collectives_in(compiled.as_text())
  new_params, new_state = compiled(grads, state, params)
  bad = sharding_mismatches(new_state, new_params)
  assert not bad, "update output not sharded like the params:\n" + "\n".join(bad)
  if config.global_reduction:
    assert "all-reduce" in found, f"clip_by_global_norm should all-reduce; found {found}"
    return f"collectives in the compiled update: {found} (the global norm)"
  assert not found, f"the compiled update communicates: {found}"
  return "no collectives in the compiled update; output sharded like the params"


for _name in CONFIGS:
  check(f"fsdp_update_hlo[{_name}-auto]")(lambda n=_name: _fsdp_update_hlo(n, "auto"))
for _name in ("amsgrad_bf16_leaf",):
  check(f"fsdp_update_hlo[{_name}-explicit]")(lambda n=_name: _fsdp_update_hlo(n, "explicit"))


# --------------------------------------------------------------------------
# ZeRO-1: parameters replicated, optimizer state split
# --------------------------------------------------------------------------


def _zero1(config_name: str) -> str:
  config = CONFIGS[config_name]
  mesh = mesh_of("auto")
  tx = config.make()
  params = init_params(config.bf16_leaf)
  replicated = NamedSharding(mesh, P())
  state_sh = split_shardings(jax.eval_shape(tx.init, params), mesh)

  p8 = jax.device_put(params, replicated)
  s8 = jax.jit(tx.init, out_shardings=state_sh)(p8)
  step8 = jax.jit(
    train_step(tx, compute=replicated), out_shardings=(replicated, state_sh, replicated)
  )
  p8, s8 = run_steps(step8, p8, s8)
  p1, s1 = one_device_steps(config_name)

  for p in jax.tree.leaves(p8):
    assert p.sharding.is_fully_replicated, f"params not replicated: {p.sharding}"
  moments = [m for s in adam_states(s8) for m in jax.tree.leaves((s.mu, s.nu, s.nu_max))]
  total = sum(m.nbytes for m in moments)
  per_device = dict.fromkeys(jax.devices(), 0)
  for m in moments:
    for shard in m.addressable_shards:
      per_device[shard.device] += shard.data.nbytes
  assert set(per_device.values()) == {total // N} and total % N == 0, (
    f"moment bytes per device {sorted(per_device.values())}, total {total}"
  )
  diffs = bitwise_diffs((p8, s8), (p1, s1))
  if config.global_reduction:
    err = max_abs_diff((p8, s8), (p1, s1))
    assert err < 1e-6, f"8 devices vs 1: max |diff| {err:.3g}"
    tail = f"max |diff| vs 1 device {err:.3g}"
  else:
    assert not diffs, "ZeRO-1 on 8 devices vs 1 differs at:\n" + "\n".join(diffs)
    tail = "equal to 1 device bitwise"
  return (
    f"{len(moments)} moments, {total} bytes in total, {total // N} on each device (1/{N}); {tail}"
  )


for _name in ("decay_mask_schedule", "amsgrad_bf16_leaf", "clip_by_global_norm"):
  check(f"zero1[{_name}]")(lambda n=_name: _zero1(n))


# --------------------------------------------------------------------------
# Data parallel: gradients averaged with pmean inside shard_map
# --------------------------------------------------------------------------


def _data_parallel(config_name: str) -> str:
  config = CONFIGS[config_name]
  mesh = mesh_of("auto")
  tx = config.make()
  params = init_params(config.bf16_leaf)

  def update(grads, state, params):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  def local_step(params, state, x, y):
    # Differentiate w.r.t. this device's copy (else shard_map's autodiff sums
    # the gradients across devices itself), then average them explicitly.
    local = jax.lax.pcast(params, AXIS, to="varying")
    grads = jax.grad(loss_fn)(local, x, y)
    grads = jax.lax.pmean(grads, AXIS)
    return *update(grads, state, params), grads

  dp_step = jax.jit(
    jax.shard_map(local_step, mesh=mesh, in_specs=(P(), P(), P(AXIS), P(AXIS)), out_specs=P())
  )
  replicated = NamedSharding(mesh, P())
  p8 = jax.device_put(params, replicated)
  s8 = tx.init(p8)
  p1 = one_device(params)
  s1 = tx.init(p1)
  full_batch_grad, update1 = jax.jit(jax.grad(loss_fn)), jax.jit(update)
  full_batch_err = 0.0
  for i in range(2):
    full = full_batch_grad(p1, *one_device(batch(i + 1)))  # the whole batch on 1 device
    x, y = jax.device_put(batch(i + 1), NamedSharding(mesh, P(AXIS)))
    p8, s8, grads = dp_step(p8, s8, x, y)
    full_batch_err = max(full_batch_err, max_abs_diff(grads, full))
    # The transform on one device, fed the averaged gradients: bitwise the same.
    p1, s1 = update1(one_device(grads), s1, p1)
  diffs = bitwise_diffs((p8, s8), (p1, s1))
  assert not diffs, "data-parallel step vs the transform on 1 device differs at:\n" + "\n".join(
    diffs
  )
  assert full_batch_err < 1e-2, (
    f"pmean'd gradients far from the full-batch gradient: {full_batch_err}"
  )
  return (
    f"2 steps in shard_map: equal bitwise to the transform on 1 device fed the pmean'd "
    f"gradients; pmean'd vs full-batch gradients max |diff| {full_batch_err:.3g}"
  )


for _name in ("amsgrad_bf16_leaf", "clip_by_global_norm"):
  check(f"data_parallel[{_name}]")(lambda n=_name: _data_parallel(n))


# --------------------------------------------------------------------------
# Low-memory AdamW: 8-bit moments on sharded leaves
# --------------------------------------------------------------------------

# b: < 4096 elements, full-precision moments; r: w's shape, replicated (its zero moments must not
# take w's sharding under jit).
LOWMEM_SHAPES = {"b": (64,), "r": (64, 256), "v": (8192,), "w": (64, 256)}


def lowmem_params():
  rng = np.random.default_rng(3)
  return {k: jnp.asarray(rng.standard_normal(s), jnp.float32) for k, s in LOWMEM_SHAPES.items()}


def lowmem_grads(params, step: int):
  return jax.tree.map(lambda p: jnp.cos(p * (3.0 + step)).astype(p.dtype), params)


def lowmem_tx(block: int = 256, bits: int = 8):
  return adamw_jax.adamw(
    1e-2, weight_decay=0.1, amsgrad=True, moment_bits=bits, moment_block_size=block
  )


@functools.cache
def lowmem_step(block: int = 256, bits: int = 8):
  """One transform and its jitted step for every check of these options.

  The variants whose params and state have the same shardings (eager and jit init on one mesh)
  run the same program, so it is compiled once for them.
  """
  tx = lowmem_tx(block, bits)

  @jax.jit
  def update(grads, state, params):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return tx, update


def lowmem_steps(update, params, state, steps=2):
  """`steps` steps of `update`; also the text of the first step's compiled program.

  That program (the update and apply_updates, on these shardings) is compiled here once: the
  first call reuses it, so a check looks for collectives in the step it runs.
  """
  hlo = update.lower(lowmem_grads(params, 0), state, params).compile().as_text()
  for i in range(steps):
    params, state = update(lowmem_grads(params, i), state, params)
  return params, state, hlo


@functools.cache
def lowmem_one_device(keys: tuple[str, ...], block: int = 256, bits: int = 8):
  """The reference: the same 2 steps on one device (the same for every mesh and init mode)."""
  tx, update = lowmem_step(block, bits)
  p1 = one_device({k: v for k, v in lowmem_params().items() if k in keys})
  p1, s1, _ = lowmem_steps(update, p1, tx.init(p1))
  return p1, s1


def quantized_moments(state):
  is_q = lambda x: isinstance(x, adamw_jax.QuantizedMoment)
  out = []
  for field in ("mu", "nu", "nu_max"):
    flat = jax.tree_util.tree_flatten_with_path(getattr(state, field), is_leaf=is_q)[0]
    out += [
      (f"{field}{jax.tree_util.keystr(path)}", path[-1].key, q) for path, q in flat if is_q(q)
    ]
  return out


def lowmem_layout_problems(state, params, mesh) -> list[str]:
  """Codes not sharded like their param; scales not split along the blocks as the param's rows.

  4-bit codes (flat, a block's bytes its own) are split along the blocks as the scales.
  """
  bad = []
  for label, key, q in quantized_moments(state):
    p = params[key]
    split = not p.sharding.is_fully_replicated
    blocks = NamedSharding(mesh, P(AXIS if split else None))
    packed = isinstance(q, adamw_jax.PackedQuantizedMoment)
    if not (
      q.codes.sharding.is_equivalent_to(blocks, 1)
      if packed
      else q.codes.sharding.is_equivalent_to(p.sharding, p.ndim)
    ):
      bad.append(f"{label}.codes: {q.codes.sharding} vs {p.sharding}")
    if not q.scale.sharding.is_equivalent_to(blocks, 1):
      bad.append(f"{label}.scale: {q.scale.sharding}")
    block = (2 if packed else 1) * q.codes.size // q.scale.size
    row = int(np.prod(p.shape[1:], dtype=np.int64))
    rows = {s.device: s.index[0] for s in p.addressable_shards}
    for shard in q.scale.addressable_shards:  # the scales of the blocks of this device's rows
      r = range(p.shape[0])[rows[shard.device]]
      want = range(r.start * row // block, r.stop * row // block)
      if range(q.scale.size)[shard.index[0]] != want:
        bad.append(f"{label}.scale on {shard.device}: blocks {shard.index[0]}, rows {r}")
  for label, key, m in (
    (f"nu[{k!r}]", k, state.nu[k])
    for k in params
    if not isinstance(state.nu[k], adamw_jax.QuantizedMoment)
  ):
    if not m.sharding.is_equivalent_to(params[key].sharding, params[key].ndim):
      bad.append(f"{label}: {m.sharding} vs {params[key].sharding}")
  return bad


def _lowmem_sharded(kind: str, jitted: bool, bits: int = 8) -> str:
  mesh = mesh_of(kind)
  tx, update = lowmem_step(256, bits)
  params = lowmem_params()
  p8 = jax.device_put(params, lowmem_shardings(mesh))
  s8 = jax.jit(tx.init)(p8) if jitted else tx.init(p8)
  assert len(quantized_moments(s8)) == 9, "r, v and w: mu, nu and nu_max quantized"
  bad = lowmem_layout_problems(s8, p8, mesh)
  assert not bad, "init: state not laid out like the params:\n" + "\n".join(bad)
  p8, s8, hlo = lowmem_steps(update, p8, s8)
  found = collectives_in(hlo)
  assert not found, f"the compiled update communicates: {found}"
  bad = lowmem_layout_problems(s8, p8, mesh)
  assert not bad, "after 2 steps: state not laid out like the params:\n" + "\n".join(bad)
  p1, s1 = lowmem_one_device(tuple(params), 256, bits)
  diffs = bitwise_diffs((p8, s8), (p1, s1))
  assert not diffs, "8 devices vs 1 differ at:\n" + "\n".join(diffs)
  return (
    f"{bits}-bit moments of (64, 256) and (8192,) leaves split in 8 shards of whole blocks: "
    + ("codes sharded like the params" if bits == 8 else "flat codes split like the scales")
    + ", scales split along the blocks (each device the scales "
    "of its rows), a replicated (64, 256) leaf's replicated, after init and 2 steps; no "
    "collectives in the update; equal to 1 device bitwise"
  )


for _kind in ("auto", "explicit"):
  for _mode in ("eager", "jit"):
    check(f"lowmem_8bit_sharded[{_kind}-{_mode}]")(
      lambda k=_kind, m=_mode: _lowmem_sharded(k, m == "jit")
    )
    check(f"lowmem_4bit_sharded[{_kind}-{_mode}]")(
      lambda k=_kind, m=_mode: _lowmem_sharded(k, m == "jit", 4)
    )


@functools.cache
def remainder_step(rounding: str | None):
  """adamw with param_rounding=`rounding` and its jitted step, one for every check.

  The step's gradients are computed from the float32 master (the same for the float32 run).
  """
  kw = {} if rounding is None else {"param_rounding": rounding}
  tx = adamw_jax.adamw(1e-2, weight_decay=0.1, amsgrad=True, **kw)

  @jax.jit
  def update(params, state, step):
    master = adamw_jax.master_params(params, state) if state_has_remainders(state) else params
    grads = jax.tree.map(lambda p: jnp.cos(p * (3.0 + step)), master)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return tx, update


def _remainder_steps(update, params, state, steps=3):
  """`steps` steps; also the text of the first step's compiled program (the call reuses it)."""
  hlo = update.lower(params, state, jnp.float32(0)).compile().as_text()
  for i in range(steps):
    params, state = update(params, state, jnp.float32(i))
  return params, state, hlo


@functools.cache
def remainder_float32_run(kind: str):
  """The float32 run on `kind`'s mesh, from eager init (the same for both init modes)."""
  tx32, update32 = remainder_step(None)
  m8 = jax.device_put(lowmem_params(), lowmem_shardings(mesh_of(kind)))
  f8, t8, _ = _remainder_steps(update32, m8, tx32.init(m8))
  return f8, t8


@functools.cache
def remainder_one_device():
  """The reference: the same 3 steps on one device (the same for every mesh and init mode)."""
  tx, update = remainder_step("remainder")
  m1 = one_device(lowmem_params())
  p1, s1 = adamw_jax.split_master(m1, tx.init(jax.tree.map(lambda x: x.astype(jnp.bfloat16), m1)))
  p1, s1, _ = _remainder_steps(update, p1, s1)
  return p1, s1


def lowmem_shardings(mesh):
  return {
    "b": NamedSharding(mesh, P()),
    "r": NamedSharding(mesh, P()),
    "v": NamedSharding(mesh, P(AXIS)),
    "w": NamedSharding(mesh, P(AXIS, None)),
  }


def state_has_remainders(state) -> bool:
  return getattr(state, "remainder", None) is not None


def _remainder_sharded(kind: str, jitted: bool) -> str:
  """param_rounding='remainder' on bfloat16 leaves split over 8 devices (and one replicated)."""
  mesh = mesh_of(kind)
  tx, update = remainder_step("remainder")
  m8 = jax.device_put(lowmem_params(), lowmem_shardings(mesh))
  bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), m8)
  init = jax.jit(tx.init) if jitted else tx.init
  split = jax.jit(adamw_jax.split_master) if jitted else adamw_jax.split_master
  p8, s8 = split(m8, init(bf16))

  def layout_problems(state, params) -> list[str]:
    bad = []
    for field in ("remainder", "mu", "nu", "nu_max"):
      for k, x in getattr(state, field).items():
        if not x.sharding.is_equivalent_to(params[k].sharding, params[k].ndim):
          bad.append(f"{field}[{k!r}]: {x.sharding} vs {params[k].sharding}")
    return bad

  bad = layout_problems(s8, p8)
  assert not bad, "init: state not laid out like the params:\n" + "\n".join(bad)
  assert s8.remainder["w"].dtype == jnp.int16 and s8.mu["w"].dtype == jnp.float32
  p8, s8, hlo = _remainder_steps(update, p8, s8)
  found = collectives_in(hlo)
  assert not found, f"the compiled update communicates: {found}"
  bad = layout_problems(s8, p8)
  assert not bad, "after 3 steps: state not laid out like the params:\n" + "\n".join(bad)
  f8, t8 = remainder_float32_run(kind)
  diffs = bitwise_diffs(adamw_jax.master_params(p8, s8), f8)
  diffs += bitwise_diffs((s8.mu, s8.nu, s8.nu_max), (t8.mu, t8.nu, t8.nu_max))
  assert not diffs, "masters or moments differ from the float32 run at:\n" + "\n".join(diffs)
  p1, s1 = remainder_one_device()
  diffs = bitwise_diffs((p8, s8), (p1, s1))
  assert not diffs, "8 devices vs 1 differ at:\n" + "\n".join(diffs)
  return (
    "bfloat16 leaves (64, 256) and (8192,) split in 8, two replicated: remainders and moments "
    "laid out like the params after init and 3 steps; no collectives in the update; masters "
    "and moments bitwise the float32 run on the same mesh; equal to 1 device bitwise"
  )


for _kind in ("auto", "explicit"):
  for _mode in ("eager", "jit"):
    check(f"lowmem_remainder_sharded[{_kind}-{_mode}]")(
      lambda k=_kind, m=_mode: _remainder_sharded(k, m == "jit")
    )


@check("zero_moments_of_same_shaped_leaves[auto-jit]")
def _zero_moments_follow_their_leaf() -> str:
  """jit(init) on an automatic mesh: a replicated leaf's moments beside a split one of its shape."""
  mesh = mesh_of("auto")
  params = {
    "r": jax.device_put(jnp.ones((64, 256)), NamedSharding(mesh, P())),
    "w": jax.device_put(jnp.ones((64, 256)), NamedSharding(mesh, P(AXIS, None))),
  }
  for tx in (adamw_jax.adamw(1e-2, amsgrad=True), adamw_jax.adamw(1e-2, mu_dtype=jnp.bfloat16)):
    state = jax.jit(tx.init)(params)
    for field in ("mu", "nu", "nu_max"):
      for k, x in (getattr(state, field) or {}).items():
        assert x.sharding.is_equivalent_to(params[k].sharding, 2), (field, k, x.sharding)
  return "the moments of a replicated (64, 256) leaf replicated, of a split one split"


SPLITTING = {  # shardings of w (64, 256) whose shards split a block
  "last_axis": (P(None, AXIS), 256),  # 8 columns of 32: a block (one row) spans 8 devices
  "small_shards": (P(AXIS, None), 4096),  # 8 rows (2048 elements) per device, blocks of 4096
}


def _split_refused(case: str, kind: str, jitted: bool) -> str:
  spec, block = SPLITTING[case]
  mesh = mesh_of(kind)
  tx = lowmem_tx(block)
  params = {"w": jax.device_put(lowmem_params()["w"], NamedSharding(mesh, spec))}
  try:
    (jax.jit(tx.init) if jitted else tx.init)(params)
  except ValueError as e:
    assert "is sharded so that a shard splits a block of moment_block_size=" in str(e), str(e)
    return f"refused: {e}"
  raise AssertionError("init accepted a sharding that splits a block")


for _case in SPLITTING:
  check(f"lowmem_8bit_split_refused[{_case}-auto-eager]")(
    lambda c=_case: _split_refused(c, "auto", False)
  )
  check(f"lowmem_8bit_split_refused[{_case}-explicit-jit]")(
    lambda c=_case: _split_refused(c, "explicit", True)
  )


def _split_auto_jit(case: str) -> str:
  """Under jit on an automatic mesh init cannot see the sharding: XLA moves the blocks."""
  spec, block = SPLITTING[case]
  mesh = mesh_of("auto")
  tx, update = lowmem_step(block)
  params = {"w": lowmem_params()["w"]}
  p8 = jax.device_put(params, NamedSharding(mesh, spec))
  s8 = jax.jit(tx.init)(p8)
  p8, s8, hlo = lowmem_steps(update, p8, s8)
  found = collectives_in(hlo)
  p1, s1 = lowmem_one_device(tuple(params), block)
  diffs = bitwise_diffs((p8, s8), (p1, s1))
  assert not diffs, "8 devices vs 1 differ at:\n" + "\n".join(diffs)
  return (
    f"jit(init) accepts it (sharding not known there); 2 steps equal 1 device bitwise; "
    f"the compiled update communicates: {found}"
  )


for _case in SPLITTING:
  check(f"lowmem_8bit_split_auto_jit[{_case}]")(lambda c=_case: _split_auto_jit(c))


# --------------------------------------------------------------------------
# Explicit axes inside jax.set_mesh: every option's step, as JAX's sharding guide writes it
# --------------------------------------------------------------------------

_BF16 = jnp.bfloat16
# option -> (transform, parameter dtype, fused_step, vmapped over a leading axis of 3)
IN_MESH: dict[str, tuple[Callable[[], optax.GradientTransformation], Any, bool, bool]] = {
  "default": (lambda: adamw_jax.adamw(1e-3, weight_decay=0.1), jnp.float32, False, False),
  "amsgrad_maximize": (
    lambda: adamw_jax.adamw(1e-3, amsgrad=True, maximize=True),
    jnp.float32,
    False,
    False,
  ),
  "bf16_moments": (
    lambda: adamw_jax.adamw(1e-3, mu_dtype=_BF16, nu_dtype=_BF16),
    jnp.float32,
    False,
    False,
  ),
  "8bit": (lambda: adamw_jax.adamw(1e-3, moment_bits=8), jnp.float32, False, False),
  "4bit": (lambda: adamw_jax.adamw(1e-3, moment_bits=4), jnp.float32, False, False),
  "stochastic": (lambda: adamw_jax.adamw(1e-3, param_rounding="stochastic"), _BF16, False, False),
  "kahan": (lambda: adamw_jax.adamw(1e-3, param_rounding="kahan"), _BF16, False, False),
  "remainder": (lambda: adamw_jax.adamw(1e-3, param_rounding="remainder"), _BF16, False, False),
  "inject_hyperparams": (
    lambda: optax.inject_hyperparams(adamw_jax.adamw)(learning_rate=1e-3),
    jnp.float32,
    False,
    False,
  ),
  "mask_schedule": (
    lambda: adamw_jax.adamw(optax.linear_schedule(1e-3, 1e-4, 10), mask=adamw_jax.decay_mask),
    jnp.float32,
    False,
    False,
  ),
  "param_groups": (
    lambda: adamw_jax.param_groups(
      {"matrices": {"weight_decay": 0.1}, "vectors": {"weight_decay": 0.0}},
      labels=lambda p: jax.tree.map(lambda x: "matrices" if x.ndim > 1 else "vectors", p),
      learning_rate=1e-3,
    ),
    jnp.float32,
    False,
    False,
  ),
  "fused": (lambda: adamw_jax.adamw(1e-3), jnp.float32, True, False),
  "fused_8bit": (lambda: adamw_jax.adamw(1e-3, moment_bits=8), jnp.float32, True, False),
  "fused_stochastic": (
    lambda: adamw_jax.adamw(1e-3, param_rounding="stochastic"),
    _BF16,
    True,
    False,
  ),
  "fused_remainder": (
    lambda: adamw_jax.adamw(1e-3, param_rounding="remainder"),
    _BF16,
    True,
    False,
  ),
  "vmap": (lambda: adamw_jax.adamw(1e-3), jnp.float32, False, True),
  "vmap_8bit": (lambda: adamw_jax.adamw(1e-3, moment_bits=8), jnp.float32, False, True),
}


_BITWISE = ("8bit", "stochastic", "fused_stochastic")  # blocks per device, random bits


def _in_mesh(option: str, in_context: bool = True) -> str:
  """Inside ``jax.set_mesh`` a result a step types without sharding is replicated, so the step
  all-gathers it: every option's compiled step must communicate nothing, compute nothing the
  size of a whole leaf, and keep the layout (`in_context` False: the mesh only in the arrays'
  types); where the values depend on the layout (`_BITWISE`), they are one device's, bit for bit."""
  make, dtype, fused, vmapped = IN_MESH[option]
  mesh = mesh_of("explicit")
  tx = make()
  init, update = (jax.vmap(tx.init), jax.vmap(tx.update)) if vmapped else (tx.init, tx.update)

  def step(grads, state, params):
    if fused:
      return adamw_jax.fused_step(tx, grads, state, params)
    updates, state = update(grads, state, params)
    return optax.apply_updates(params, updates), state

  alone = {k: p.astype(dtype) for k, p in lowmem_params().items() if k in ("v", "w")}
  if vmapped:
    alone = jax.tree.map(lambda p: jnp.stack([p, 2 * p, 3 * p]), alone)
  spec = lambda p: P(None, AXIS) if vmapped else P(AXIS)
  with jax.set_mesh(mesh) if in_context else contextlib.nullcontext():
    params = {k: jax.device_put(p, NamedSharding(mesh, spec(p))) for k, p in alone.items()}
    state = jax.jit(init)(params)
    compiled = jax.jit(step).lower(params, state, params).compile()
    new = compiled(params, state, params)
  if option in _BITWISE:
    alone = one_device(alone)
    diffs = bitwise_diffs(new, jax.jit(step)(alone, jax.jit(init)(alone), alone))
    assert not diffs, "8 devices vs 1 differ at:\n" + "\n".join(diffs)
  new_params = new[0]
  hlo = compiled.as_text()
  found = collectives_in(hlo)
  assert not found, f"the compiled step communicates: {found}"
  # nothing the size of a whole leaf: each device computes its own rows (stochastic rounding's
  # bits typed replicated were drawn whole on every device, without a collective)
  whole = {f"[{','.join(map(str, p.shape))}]" for p in params.values()}
  assert not [w for w in whole if w in hlo], f"a whole leaf in the compiled step: {whole}"
  for k, p in new_params.items():
    assert p.sharding.is_equivalent_to(params[k].sharding, p.ndim), f"{k}: {p.sharding}"
  return "no collectives and no whole leaf in the compiled step; parameters laid out as before"


for _option in IN_MESH:
  check(f"explicit_in_set_mesh[{_option}]")(lambda o=_option: _in_mesh(o))
# Without the context, the traced hyperparameters' results were typed replicated too.
for _option in ("default", "inject_hyperparams"):
  check(f"explicit_outside_set_mesh[{_option}]")(lambda o=_option: _in_mesh(o, False))


def _zero1_types(option: str) -> str:
  """ZeRO-1 on Explicit axes: replicated parameters plus a state split along its rows. JAX types
  their sum split (optax.adamw's step returns split parameters); every option's step is typed
  as the default path's (the kernels' results as the XLA path's), whichever kernel runs."""
  make, dtype, _, _ = IN_MESH[option]
  mesh = mesh_of("explicit")

  def laid_out(tx) -> list:
    def step(grads, state, params):
      updates, state = tx.update(grads, state, params)
      return optax.apply_updates(params, updates), state

    with jax.set_mesh(mesh):
      params = {
        k: jax.device_put(p.astype(dtype), NamedSharding(mesh, P()))
        for k, p in lowmem_params().items()
        if k in ("v", "w")
      }
      state = jax.jit(tx.init)(params)
      split = lambda x: (
        jax.device_put(x, NamedSharding(mesh, P(AXIS))) if x.ndim and x.shape[0] % N == 0 else x
      )
      state = jax.tree.map(split, state)
      compiled = jax.jit(step).lower(params, state, params).compile()
    return [s.spec for s in jax.tree.leaves(compiled.output_shardings[0])]

  ours, theirs = laid_out(make()), laid_out(optax.adamw(1e-3))
  assert ours == theirs, f"parameters laid out {ours}, optax.adamw's {theirs}"
  return f"parameters laid out as optax.adamw's: {ours}"


for _option in ("default", "8bit", "stochastic"):
  check(f"explicit_zero1_types[{_option}]")(lambda o=_option: _zero1_types(o))


# --------------------------------------------------------------------------
# The docs' 8-device example (docs/scaling-out.md)
# --------------------------------------------------------------------------


def docs_blocks() -> list[docs_pages.Block]:
  """The blocks marked ``<!-- docs-test: 8-devices -->``: tests/test_docs.py leaves them to this check."""
  return [
    b
    for p in docs_pages.pages()
    for b in docs_pages.blocks(p)
    if b.marker == docs_pages.EIGHT_DEVICES
  ]


@check("docs_scaling_out_example")
def _docs_example() -> str:
  blocks = docs_blocks()
  assert blocks, "no block of the docs is marked for 8 devices"
  namespace: dict = {"__name__": "docs"}
  for block in blocks:
    exec(compile(block.code, block.where, "exec"), namespace)
  return f"ran {len(blocks)} python block(s)"


# --------------------------------------------------------------------------


def main(names: list[str]) -> int:
  if jax.device_count() != N:
    print(
      f"need {N} devices, have {jax.device_count()}: set "
      f"XLA_FLAGS=--xla_force_host_platform_device_count={N} before jax is imported",
      file=sys.stderr,
    )
    return 2
  unknown = set(names) - set(CHECKS)
  if unknown:
    print(f"unknown checks: {sorted(unknown)}", file=sys.stderr)
    return 2
  results = {}
  for name in names or CHECKS:
    start = time.perf_counter()
    try:
      results[name] = {"ok": True, "detail": CHECKS[name]()}
    except Exception:
      results[name] = {"ok": False, "detail": traceback.format_exc()}
    results[name]["seconds"] = round(time.perf_counter() - start, 2)
  print(MARKER + json.dumps(results))
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
