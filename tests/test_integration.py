"""adamw_jax inside the wider JAX ecosystem: optax wrappers, Flax, jit, vmap, grad.

Bitwise comparisons are made between jitted programs: the kernel relies on
XLA's fused multiply-adds for torch's rounding (see ``_kernel.py``), so a
jitted step is the unit that has a defined rounding.
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from typing import NamedTuple

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.training import train_state

import adamw_jax

INT32_MAX = 2**31 - 1


def _f32(x: float) -> float:
  """The float32 value nearest to `x`, as a Python float."""
  return float(np.float32(x))


def _params(seed: int = 0, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  return {
    "w": jnp.asarray(rng.normal(size=(4, 3)), dtype),
    "b": jnp.asarray(rng.normal(size=(3,)), dtype),
  }


def _random_like(tree, rng, scale=1.0):
  return jax.tree.map(lambda x: jnp.asarray(scale * rng.normal(size=x.shape), x.dtype), tree)


def _apply_step(tx):
  """A (params, state, grads) -> (new_params, new_state, updates) step for `tx`."""

  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, updates

  return step


def _trees_bitwise_equal(a, b) -> bool:
  if jax.tree.structure(a) != jax.tree.structure(b):
    return False

  def bits(x):
    x = np.atleast_1d(np.asarray(x))
    return x.dtype, x.shape, x.view(np.uint8).tobytes()

  return all(bits(x) == bits(y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


# --------------------------------------------------------------------------
# optax wrappers
# --------------------------------------------------------------------------


def test_chain_with_clip_by_global_norm_matches_manual_clip_then_adamw():
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(32, 4)), jnp.float32)
  y = jnp.asarray(x @ rng.normal(size=(4, 2)) * 3.0, jnp.float32)
  params0 = {"w": jnp.zeros((4, 2), jnp.float32), "b": jnp.ones((2,), jnp.float32)}

  def loss(p):
    return jnp.mean((x @ p["w"] + p["b"] - y) ** 2)

  max_norm = 1.0
  chained = optax.chain(optax.clip_by_global_norm(max_norm), adamw_jax.adamw(1e-1))
  plain = adamw_jax.adamw(1e-1)

  @jax.jit
  def chained_step(p, s):
    g = jax.grad(loss)(p)
    u, s = chained.update(g, s, p)
    return optax.apply_updates(p, u), s

  @jax.jit
  def manual_step(p, s):
    g = jax.grad(loss)(p)
    norm = jnp.sqrt(sum(jnp.sum(leaf * leaf) for leaf in jax.tree.leaves(g)))
    g = jax.tree.map(lambda t: jnp.where(norm < max_norm, t, (t / norm) * max_norm), g)
    u, s = plain.update(g, s, p)
    return optax.apply_updates(p, u), s, norm

  p, s = params0, chained.init(params0)
  q, r = params0, plain.init(params0)
  norms = []
  for i in range(60):
    p, s = chained_step(p, s)
    q, r, norm = manual_step(q, r)
    norms.append(float(norm))
    assert _trees_bitwise_equal(p, q), f"params differ at step {i}"
    assert _trees_bitwise_equal(s[1], r), f"adamw state differs at step {i}"
  # Both branches of the clip were exercised, and the model trained.
  assert max(norms) > max_norm and min(norms) < max_norm
  assert float(loss(p)) < 1e-2 * float(loss(params0))
  assert int(s[1].count) == 60


def test_inject_hyperparams_learning_rate_changes_update_without_recompiling():
  rng = np.random.default_rng(2)
  params = _params(2)
  grads = [_random_like(params, rng) for _ in range(4)]
  # The betas and eps stay Python floats; learning_rate and weight_decay are
  # injected as arrays (traced betas: see the test after this one).
  tx = optax.inject_hyperparams(adamw_jax.adamw, static_args=("b1", "b2", "eps", "eps_root"))(
    learning_rate=1e-3
  )
  state = tx.init(params)
  assert set(state.hyperparams) == {"learning_rate", "weight_decay"}

  traces = []

  def step(p, s, g):
    traces.append(None)  # runs once per trace
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s, u

  jstep = jax.jit(step)
  lrs = [1e-3, 1e-2, 0.0, 3e-2]
  for lr, g in zip(lrs, grads):
    state.hyperparams["learning_rate"] = jnp.asarray(lr, jnp.float32)
    old_p, old_inner = params, state.inner_state
    params, state, updates = jstep(params, state, g)
    # The same step as a plain adamw whose hyperparameters are the injected
    # (float32) values.
    ref = adamw_jax.adamw(_f32(lr), weight_decay=_f32(1e-2))
    ref_u, ref_s = jax.jit(ref.update)(g, old_inner, old_p)
    assert _trees_bitwise_equal(updates, ref_u), f"lr={lr}"
    assert _trees_bitwise_equal(state.inner_state, ref_s), f"lr={lr}"
    if lr == 0.0:
      for leaf in jax.tree.leaves(updates):
        np.testing.assert_array_equal(leaf, np.zeros_like(leaf))
  assert len(traces) == 1
  assert jstep._cache_size() == 1

  # From one state, a 10x learning rate gives a 10x update (decay included).
  small = state._replace(hyperparams={**state.hyperparams, "learning_rate": jnp.float32(1e-3)})
  large = state._replace(hyperparams={**state.hyperparams, "learning_rate": jnp.float32(1e-2)})
  _, _, u_small = jstep(params, small, grads[0])
  _, _, u_large = jstep(params, large, grads[0])
  assert not _trees_bitwise_equal(u_small, u_large)
  for a, b in zip(jax.tree.leaves(u_small), jax.tree.leaves(u_large)):
    np.testing.assert_allclose(b, 10 * a, rtol=2e-3)
  assert len(traces) == 1
  assert jstep._cache_size() == 1


def test_multisteps_equals_adamw_on_mean_gradient_every_k_steps():
  k = 4
  rng = np.random.default_rng(3)
  params0 = _params(3)

  def dyadic(scale, lo, hi):
    return jax.tree.map(
      lambda t: jnp.asarray(rng.integers(lo, hi, size=t.shape) / scale, jnp.float32), params0
    )

  def group():
    # Gradients on a coarse dyadic grid, chosen so that optax's running mean
    # acc + (g - acc) / n is exact however XLA evaluates the division (the
    # difference is 0 where 1/n is inexact), so the reference mean is exact.
    x, d1, d2 = dyadic(64, -64, 64), dyadic(256, -8, 8), dyadic(256, -8, 8)
    tmap = jax.tree.map
    return [
      tmap(lambda x, d: x - d, x, d1),
      tmap(lambda x, d: x + d, x, d1),
      x,
      tmap(lambda x, d: x + 4 * d, x, d2),
    ], tmap(lambda x, d: x + d, x, d2)

  inner = adamw_jax.adamw(1e-2)
  multi = optax.MultiSteps(adamw_jax.adamw(1e-2), every_k_schedule=k)
  multi_step = jax.jit(_apply_step(multi))
  plain_step = jax.jit(_apply_step(inner))

  p, s = params0, multi.init(params0)
  q, r = params0, inner.init(params0)
  for n in range(3):
    grads, expected_mean = group()
    mean = jax.tree.map(lambda *gs: sum(gs) / k, *grads)
    assert _trees_bitwise_equal(mean, expected_mean)
    for i, g in enumerate(grads):
      before = p
      p, s, _ = multi_step(p, s, g)
      if i < k - 1:
        assert _trees_bitwise_equal(p, before), "params moved before the k-th step"
        assert int(s.inner_opt_state.count) == n
    q, r, _ = plain_step(q, r, mean)
    assert _trees_bitwise_equal(p, q), f"params differ after group {n}"
    assert _trees_bitwise_equal(s.inner_opt_state, r), f"inner state differs after group {n}"
  assert int(s.inner_opt_state.count) == 3
  assert not _trees_bitwise_equal(p, params0)


def test_apply_if_finite_skips_nan_step_and_keeps_state():
  rng = np.random.default_rng(4)
  params0 = _params(4)
  g1, g2 = _random_like(params0, rng), _random_like(params0, rng)
  tx = optax.apply_if_finite(adamw_jax.adamw(1e-2), max_consecutive_errors=2)
  step = jax.jit(_apply_step(tx))
  plain = adamw_jax.adamw(1e-2)
  plain_step = jax.jit(_apply_step(plain))

  p1, s1, _ = step(params0, tx.init(params0), g1)
  bad = {"w": g2["w"].at[1, 2].set(jnp.nan), "b": g2["b"]}
  p2, s2, u2 = step(p1, s1, bad)
  assert _trees_bitwise_equal(p2, p1)
  assert _trees_bitwise_equal(s2.inner_state, s1.inner_state)
  for leaf in jax.tree.leaves(u2):
    np.testing.assert_array_equal(leaf, np.zeros_like(leaf))
  assert int(s2.notfinite_count) == 1 and not bool(s2.last_finite)
  assert int(s2.total_notfinite) == 1

  # The next finite step is the second adamw step, as if the NaN never came.
  p3, s3, _ = step(p2, s2, g2)
  q1, r1, _ = plain_step(params0, plain.init(params0), g1)
  q2, r2, _ = plain_step(q1, r1, g2)
  assert _trees_bitwise_equal(p3, q2)
  assert _trees_bitwise_equal(s3.inner_state, r2)
  assert int(s3.inner_state.count) == 2 and int(s3.notfinite_count) == 0


_TRACED_BETAS_CHILD = r"""
import json, sys, threading, time
import jax, jax.numpy as jnp, numpy as np, optax, adamw_jax

rng = np.random.default_rng(2)
params = {"w": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32),
          "b": jnp.asarray(rng.normal(size=(3,)), jnp.float32)}
grads = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), params)
tx = optax.inject_hyperparams(adamw_jax.adamw)(learning_rate=1e-3)  # every hyperparameter traced
state = tx.init(params)
step = jax.jit(tx.update).lower(grads, state, params).compile()
out = {}

def run():
  t = time.perf_counter()
  out["result"] = jax.block_until_ready(step(grads, state, params))
  out["seconds"] = time.perf_counter() - t

worker = threading.Thread(target=run, daemon=True)
worker.start()
worker.join(timeout=float(sys.argv[1]))
if worker.is_alive():
  print(json.dumps({"finished": False}), flush=True)
  import os; os._exit(0)
f32 = lambda x: float(np.float32(x))
ref = adamw_jax.adamw(f32(1e-3), b1=f32(0.9), b2=f32(0.999), eps=f32(1e-8), weight_decay=f32(1e-2))
want = jax.jit(ref.update)(grads, state.inner_state, params)
got = (out["result"][0], out["result"][1].inner_state)
equal = all(np.array_equal(np.asarray(a), np.asarray(b))
            for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)))
print(json.dumps({"finished": True, "seconds": out["seconds"], "equal": equal}), flush=True)
"""


def test_inject_hyperparams_with_traced_betas_is_fast_and_exact():
  # In a subprocess, so that a runaway XLA computation can be abandoned.
  limit = 5.0
  proc = subprocess.run(
    [sys.executable, "-c", _TRACED_BETAS_CHILD, str(limit)],
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  report = json.loads(proc.stdout.strip().splitlines()[-1])
  assert report["finished"], f"one jitted step did not finish within {limit} s"
  assert report["seconds"] < limit
  assert report["equal"], "injected-array step differs from the float32-valued adamw"


# --------------------------------------------------------------------------
# Flax
# --------------------------------------------------------------------------


def _regression_data():
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.uniform(-2, 2, size=(128, 2)), jnp.float32)
  y = jnp.sin(x[:, :1]) * jnp.cos(x[:, 1:])
  return x, y


class _LinenMLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.tanh(nn.Dense(32)(x))
    x = nn.tanh(nn.Dense(32)(x))
    return nn.Dense(1)(x)


def test_flax_linen_train_state_trains_under_jit():
  x, y = _regression_data()
  model = _LinenMLP()
  params = model.init(jax.random.key(0), x)["params"]
  # Weight decay on the kernels only, through a callable mask over Linen's tree.
  tx = adamw_jax.adamw(
    1e-2, weight_decay=1e-2, mask=lambda p: jax.tree.map(lambda a: a.ndim > 1, p)
  )
  state = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx)
  traces = []

  @jax.jit
  def train_step(state):
    traces.append(None)

    def loss_fn(p):
      return jnp.mean((state.apply_fn({"params": p}, x) - y) ** 2)

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    return state.apply_gradients(grads=grads), loss

  losses = []
  for _ in range(100):
    state, loss = train_step(state)
    losses.append(float(loss))
  assert all(np.isfinite(losses))
  assert losses[-1] < 0.1 * losses[0], (losses[0], losses[-1])
  assert len(traces) == 1
  assert int(state.step) == 100 and int(state.opt_state.count) == 100
  chex.assert_trees_all_equal_shapes_and_dtypes(state.params, params)


class _NnxMLP(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.l1 = nnx.Linear(2, 32, rngs=rngs)
    self.l2 = nnx.Linear(32, 32, rngs=rngs)
    self.l3 = nnx.Linear(32, 1, rngs=rngs)

  def __call__(self, x):
    return self.l3(nnx.tanh(self.l2(nnx.tanh(self.l1(x)))))


def test_flax_nnx_optimizer_trains_under_nnx_jit():
  x, y = _regression_data()
  model = _NnxMLP(nnx.Rngs(0))
  initial = jax.tree.map(jnp.copy, nnx.state(model, nnx.Param))
  optimizer = nnx.Optimizer(model, adamw_jax.adamw(1e-2), wrt=nnx.Param)
  traces = []

  @nnx.jit
  def train_step(model, optimizer, x, y):
    traces.append(None)

    def loss_fn(model):
      return jnp.mean((model(x) - y) ** 2)

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  losses = [float(train_step(model, optimizer, x, y)) for _ in range(100)]
  assert all(np.isfinite(losses))
  assert losses[-1] < 0.1 * losses[0], (losses[0], losses[-1])
  assert len(traces) == 1
  assert int(optimizer.step[...]) == 100
  assert isinstance(optimizer.opt_state, adamw_jax.ScaleByAdamState)
  assert int(optimizer.opt_state.count[...]) == 100
  final = nnx.state(model, nnx.Param)
  chex.assert_trees_all_equal_shapes_and_dtypes(final, initial)
  assert not _trees_bitwise_equal(final, initial)


# --------------------------------------------------------------------------
# jit: compilation, dtypes, count saturation, donation
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
  "param_dtype, mu_dtype",
  [(jnp.float32, None), (jnp.bfloat16, jnp.float32), (jnp.float16, None)],
  ids=["float32", "bfloat16-mu-float32", "float16"],
)
def test_jitted_step_does_not_recompile_and_keeps_dtypes(param_dtype, mu_dtype):
  rng = np.random.default_rng(6)
  params = _params(6, param_dtype)
  grads = _random_like(params, rng, 0.1)
  tx = adamw_jax.adamw(1e-2, mu_dtype=mu_dtype)
  traces = []

  def step(p, s, g):
    traces.append(None)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s, u

  jstep = jax.jit(step)
  state0 = tx.init(params)
  expected_mu = jnp.dtype(mu_dtype or param_dtype)
  for leaf in jax.tree.leaves(state0.mu):
    assert leaf.dtype == expected_mu
  for leaf in jax.tree.leaves(state0.nu):
    assert leaf.dtype == jnp.dtype(param_dtype)
  assert state0.count.dtype == jnp.int32 and state0.count.shape == ()

  p1, s1, u1 = jstep(params, state0, grads)
  p2, s2, u2 = jstep(p1, s1, grads)
  p3, s3, u3 = jstep(p2, s2, grads)
  assert len(traces) == 1
  assert jstep._cache_size() == 1
  chex.assert_trees_all_equal_shapes_and_dtypes(state0, s1, s2, s3)
  chex.assert_trees_all_equal_shapes_and_dtypes(params, p1, p2, p3, u1, u2, u3)
  assert int(s3.count) == 3
  chex.assert_tree_all_finite((p3, s3, u3))
  assert not _trees_bitwise_equal(p3, params)

  # The count saturates at 2**31 - 1 instead of wrapping; the bias corrections
  # are then exactly 1, as they are (to rounding) after a million steps.
  at_max = jstep(p3, s3._replace(count=jnp.int32(INT32_MAX)), grads)
  below_max = jstep(p3, s3._replace(count=jnp.int32(INT32_MAX - 1)), grads)
  million = jstep(p3, s3._replace(count=jnp.int32(10**6)), grads)
  assert int(at_max[1].count) == INT32_MAX and at_max[1].count.dtype == jnp.int32
  assert int(below_max[1].count) == INT32_MAX
  chex.assert_tree_all_finite(at_max)
  assert _trees_bitwise_equal(at_max[0], million[0])
  assert _trees_bitwise_equal(at_max[0], below_max[0])
  again = jstep(at_max[0], at_max[1], grads)
  assert int(again[1].count) == INT32_MAX
  chex.assert_trees_all_equal_shapes_and_dtypes(again[1], state0)
  assert len(traces) == 1


def test_jit_with_donated_params_and_state():
  rng = np.random.default_rng(7)
  params0 = _params(7)
  grads = [_random_like(params0, rng) for _ in range(3)]
  tx = adamw_jax.adamw(1e-2, amsgrad=True)

  def step(p, s, g):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  donating = jax.jit(step, donate_argnums=(0, 1))
  plain = jax.jit(step)
  p = jax.tree.map(jnp.copy, params0)
  s = tx.init(p)
  q, r = params0, tx.init(params0)
  for g in grads:
    old = (p, s)
    p, s = donating(p, s, g)
    q, r = plain(q, r, g)
    assert all(leaf.is_deleted() for leaf in jax.tree.leaves(old))
  assert _trees_bitwise_equal((p, s), (q, r))
  assert int(s.count) == 3


# --------------------------------------------------------------------------
# vmap, grad
# --------------------------------------------------------------------------


@pytest.mark.parametrize("amsgrad", [False, True])
def test_vmap_over_parameter_sets_equals_loop(amsgrad):
  batch = 5
  rng = np.random.default_rng(8)
  params = {
    "w": jnp.asarray(rng.normal(size=(batch, 4, 3)), jnp.float32),
    "b": jnp.asarray(rng.normal(size=(batch, 3)), jnp.float32),
  }
  grads = [_random_like(params, rng) for _ in range(3)]
  tx = adamw_jax.adamw(1e-2, amsgrad=amsgrad)

  def step(p, s, g):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  v_init, v_step = jax.jit(jax.vmap(tx.init)), jax.jit(jax.vmap(step))
  one_init, one_step = jax.jit(tx.init), jax.jit(step)

  p, s = params, v_init(params)
  assert s.count.shape == (batch,)
  for g in grads:
    p, s = v_step(p, s, g)

  for i in range(batch):
    take = lambda t: jax.tree.map(lambda x: x[i], t)
    pi = take(params)
    si = one_init(pi)
    for g in grads:
      pi, si = one_step(pi, si, take(g))
    assert _trees_bitwise_equal(take(p), pi), f"params of set {i}"
    assert _trees_bitwise_equal(take(s), si), f"state of set {i}"


def test_grad_with_respect_to_learning_rate_matches_finite_difference():
  rng = np.random.default_rng(9)
  x = jnp.asarray(rng.normal(size=(16, 3)), jnp.float32)
  y = jnp.asarray(rng.normal(size=(16,)), jnp.float32)
  params0 = {"w": jnp.asarray(rng.normal(size=(3,)), jnp.float32), "b": jnp.zeros((), jnp.float32)}

  def loss(p):
    return jnp.mean((x @ p["w"] + p["b"] - y) ** 2)

  def loss_after_training(lr):
    tx = adamw_jax.adamw(learning_rate=lr, weight_decay=0.1)
    p, s = params0, tx.init(params0)
    for _ in range(3):
      u, s = tx.update(jax.grad(loss)(p), s, p)
      p = optax.apply_updates(p, u)
    return loss(p)

  lr = 0.05
  loss_and_grad = jax.jit(jax.value_and_grad(loss_after_training))
  value, d_lr = loss_and_grad(lr)
  assert np.isfinite(float(d_lr))
  h = 1e-3
  fd = (float(loss_and_grad(lr + h)[0]) - float(loss_and_grad(lr - h)[0])) / (2 * h)
  assert abs(fd) > 1.0  # the learning rate matters
  assert float(value) < float(loss(params0))
  np.testing.assert_allclose(float(d_lr), fd, rtol=2e-3)


# --------------------------------------------------------------------------
# Tree kinds
# --------------------------------------------------------------------------


class _ParamsTuple(NamedTuple):
  a: jax.Array
  b: jax.Array
  c: jax.Array


_TREE_KINDS = {
  "dict": lambda a, b, c: {"a": a, "b": b, "c": c},
  "nested-list-tuple": lambda a, b, c: ([a, (b,)], c),
  "namedtuple": lambda a, b, c: _ParamsTuple(a, b, c),
  "dict-of-namedtuple": lambda a, b, c: {"layer": _ParamsTuple(a, b, c)},
}


_TREE_LEAVES_RNG = np.random.default_rng(10)
_TREE_LEAVES = [
  jnp.asarray(_TREE_LEAVES_RNG.normal(size=s), jnp.float32) for s in [(2, 3), (3,), ()]
]
_TREE_GRADS = [
  [jnp.asarray(_TREE_LEAVES_RNG.normal(size=x.shape), jnp.float32) for x in _TREE_LEAVES]
  for _ in range(2)
]
_TREE_TX = adamw_jax.adamw(1e-2)
_TREE_STEP = jax.jit(_apply_step(_TREE_TX))


def _run_tree_kind(build):
  p = build(*_TREE_LEAVES)
  s = _TREE_TX.init(p)
  for gl in _TREE_GRADS:
    p, s, u = _TREE_STEP(p, s, build(*gl))
  return p, s, u


@functools.cache
def _flat_list_run():
  return _run_tree_kind(lambda *xs: list(xs))


@pytest.mark.parametrize("kind", sorted(_TREE_KINDS))
def test_tree_kinds_keep_structure_and_values(kind):
  make = _TREE_KINDS[kind]
  p, s, u = _run_tree_kind(make)
  template = make(*_TREE_LEAVES)
  structure = jax.tree.structure(template)
  for tree in (p, u, s.mu, s.nu):
    assert jax.tree.structure(tree) == structure
  assert type(p) is type(template)
  # Same numbers, leaf for leaf, as with a flat list of the same arrays.
  ref_p, ref_s, ref_u = _flat_list_run()
  for got, want in ((p, ref_p), (u, ref_u), (s.mu, ref_s.mu), (s.nu, ref_s.nu)):
    assert _trees_bitwise_equal(jax.tree.leaves(got), jax.tree.leaves(want))
  assert int(s.count) == 2


# --------------------------------------------------------------------------
# Eager versus jit
# --------------------------------------------------------------------------


def test_eager_update_equals_jitted_update():
  p = jnp.linspace(-1, 1, 64, dtype=jnp.float32)
  g = jnp.cos(7 * p)
  tx = adamw_jax.adamw()
  _, s = jax.jit(tx.update)(g, tx.init(p), p)
  eager = tx.update(0.37 * g, s, p)
  jitted = jax.jit(tx.update)(0.37 * g, s, p)
  assert _trees_bitwise_equal(eager, jitted)
