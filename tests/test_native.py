"""The native CPU kernel and the fused step against the pure-JAX kernel, bit for bit.

Every configuration of the fidelity table (float32/complex64 and float64) and
the rest of what the transforms accept (injected hyperparameters, masks,
mu/nu dtypes, bfloat16 params, eps_root, the paper's decay, large leaves that
take the multi-threaded and Markstein paths, subnormal and zero gradients)
runs once with ``ADAMW_JAX_NATIVE=0`` and once with the native kernel; params
and every state tensor must be equal bit for bit after every step, and the
native run must really contain the native call. The fused step is checked the
same way against ``update`` + ``optax.apply_updates``.
"""

from __future__ import annotations

import functools
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adamw_jax
from adamw_jax import _env, _native
from tests import torch_reference as ref

STEPS = 12
pytestmark = pytest.mark.skipif(
  _native.UNAVAILABLE is not None, reason=f"native kernel not built: {_native.UNAVAILABLE}"
)


def _bits(x) -> np.ndarray:
  x = np.asarray(x)
  if np.iscomplexobj(x):
    x = np.stack([x.real, x.imag])
  return x.view(np.dtype(f"u{x.dtype.itemsize}")) if x.dtype.itemsize in (1, 2, 4, 8) else x


def _assert_bitwise(a: Any, b: Any, what: str) -> None:
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb), what
  for i, (x, y) in enumerate(zip(la, lb)):
    assert np.asarray(x).dtype == np.asarray(y).dtype, (what, i)
    bad = np.count_nonzero(_bits(x) != _bits(y))
    assert bad == 0, f"{what}: leaf {i} differs in {bad} of {np.size(x)} elements"


def _targets(fn: Callable, *args) -> set[str]:
  """The native kernels called by the jitted `fn` (the plain one, the low-memory one).

  `fn` may be jitted already: calling it then reuses this lowering (traced once).
  """
  text = (fn if hasattr(fn, "lower") else jax.jit(fn)).lower(*args).as_text()
  return {t for t in (_native.TARGET, _native.LOWMEM_TARGET) if t in text}


def _uses_native(fn: Callable, *args) -> bool:
  return bool(_targets(fn, *args))


def _trajectory(
  tx,
  params,
  grads: Callable[[int], Any],
  native: bool,
  monkeypatch,
  *,
  fused: bool = False,
  serves: bool | str = True,
  steps: int = STEPS,
) -> list:
  """(params, state) after each jitted step, with or without the native kernel.

  `serves`: whether the native kernel serves this configuration (it must then
  appear in the compiled step when `native`, and never otherwise); a target's
  name: that kernel in particular.
  """
  monkeypatch.setenv(_env.NATIVE.name, "1" if native else "0")

  def step(g, s, p):
    if fused:
      return adamw_jax.fused_step(tx, g, s, p)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  p = jax.tree.map(jnp.asarray, params)
  s = tx.init(p)
  g0 = jax.tree.map(jnp.asarray, grads(0))
  jitted = jax.jit(step)
  called = _targets(jitted, g0, s, p)  # traced and lowered once: the steps below reuse it
  if isinstance(serves, str):
    assert (serves in called) == native and (native or not called), called
  else:
    assert bool(called) == (native and serves), "native call presence"
  out = []
  for t in range(steps):
    p, s = jitted(jax.tree.map(jnp.asarray, grads(t)), s, p)
    out.append((p, s))
  return out


def _compare(
  tx,
  params,
  grads,
  monkeypatch,
  *,
  serves: bool | str = True,
  fused: bool = False,
  steps: int = STEPS,
) -> None:
  """The native run (`fused`: fused_step) against the pure update + apply_updates, bit for bit."""
  want = _trajectory(tx, params, grads, False, monkeypatch, serves=serves, steps=steps)
  got = _trajectory(tx, params, grads, True, monkeypatch, fused=fused, serves=serves, steps=steps)
  for t, (w, g) in enumerate(zip(want, got)):
    _assert_bitwise(g, w, f"step {t + 1}")


def _problem(dtype, shapes=None, scale_range=(-6, 2)):
  """The fidelity tests' problem (``torch_reference.make_problem``) on `shapes`, a bank of 5 gradients."""
  return ref.make_problem(dtype, STEPS, bank=5, shapes=shapes, log10_scale=scale_range)


# fused_step takes adamw/adam (and clipped, MultiSteps: test_fused_wrappers), not another chain.
_TABLE = [(c, False) for c in [*ref.CASES, ref.CHAIN]] + [(c, True) for c in ref.CASES]


@pytest.mark.parametrize(
  ("case", "fused"),
  _TABLE,
  ids=lambda x: x.name if isinstance(x, ref.Case) else ("fused" if x else "update"),
)
def test_fidelity_table_float32(case, fused, monkeypatch):
  params, grads = ref.make_problem(np.complex64 if case.complex else np.float32, STEPS)
  serves = not (case.complex and case.algo == "adam")  # complex + L2: complex arithmetic, pure
  _compare(case.jax_tx(), params, grads, monkeypatch, serves=serves, fused=fused)


@pytest.mark.parametrize("case", [*ref.CASES, ref.CHAIN], ids=lambda c: c.name)
def test_fidelity_table_float64(case, monkeypatch):
  with jax.enable_x64(True):
    params, grads = ref.make_problem(np.complex128 if case.complex else np.float64, STEPS)
    serves = not (case.complex and case.algo == "adam")
    _compare(case.jax_tx(), params, grads, monkeypatch, serves=serves)


def _inject():
  return optax.inject_hyperparams(adamw_jax.adamw)(
    learning_rate=1e-3, b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-2
  )


CONFIGS = {
  "eps_root": (lambda: adamw_jax.adamw(1e-3, eps_root=1e-10), True),
  "injected hyperparameters": (_inject, True),
  "weight decay schedule": (
    lambda: adamw_jax.adamw(1e-3, weight_decay=optax.linear_schedule(0.1, 0.0, 10)),
    True,
  ),
  "mask (no decay on vectors)": (
    lambda: adamw_jax.adamw(1e-3, mask=lambda p: {k: v.ndim > 1 for k, v in p.items()}),
    True,
  ),
  "adam mask + amsgrad": (
    lambda: adamw_jax.adam(
      1e-3, weight_decay=0.1, amsgrad=True, mask=lambda p: {k: v.ndim > 1 for k, v in p.items()}
    ),
    True,
  ),
  "mu_dtype=bfloat16": (lambda: adamw_jax.adamw(1e-3, mu_dtype=jnp.bfloat16), True),
  "nu_dtype=bfloat16, amsgrad": (
    lambda: adamw_jax.adamw(1e-3, nu_dtype=jnp.bfloat16, amsgrad=True),
    True,
  ),
  "paper decay": (lambda: adamw_jax.adamw(1e-3, decay_mode="paper"), True),
  "weight_decay=0 (no parameter read)": (lambda: adamw_jax.adamw(1e-3, weight_decay=0.0), True),
  "b1=0": (lambda: adamw_jax.adamw(1e-3, b1=0.0), True),
  "b2=0.95, maximize, amsgrad": (
    lambda: adamw_jax.adamw(3e-4, b2=0.95, maximize=True, amsgrad=True),
    True,
  ),
  "scale_by_adam": (lambda: adamw_jax.scale_by_adam(), True),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_configurations(name, monkeypatch):
  make, serves = CONFIGS[name]
  params, grads = _problem(np.float32)
  _compare(make(), params, grads, monkeypatch, serves=serves)


# inject_hyperparams wraps the transform, which fused_step refuses (tested below).
@pytest.mark.parametrize(
  "name", [n for n in CONFIGS if n not in ("scale_by_adam", "injected hyperparameters")]
)
def test_configurations_fused(name, monkeypatch):
  make, serves = CONFIGS[name]
  params, grads = _problem(np.float32)
  _compare(make(), params, grads, monkeypatch, serves=serves, fused=True)


@pytest.mark.parametrize("fused", [False, True], ids=["update", "fused"])
@pytest.mark.parametrize("amsgrad", [False, True])
def test_large_leaves_threads_and_markstein(amsgrad, fused, monkeypatch):
  """Leaves above the pure kernel's division threshold and the native kernel's thread split."""
  shapes = {"big": (300_001,), "mid": (40_000,), "many": (7, 5000), "tiny": (3,), "empty": (0,)}
  params, grads = _problem(np.float32, shapes)
  tx = adamw_jax.adamw(1e-3, amsgrad=amsgrad, mask=lambda p: {k: k != "mid" for k in p})
  _compare(tx, params, grads, monkeypatch, fused=fused)


def test_subnormal_and_zero_gradients(monkeypatch):
  """XLA flushes subnormals to zero; the native kernel runs with the same control word."""
  shapes = {"w": (200_000,), "v": (1000,)}
  params, grads = _problem(np.float32, shapes, scale_range=(-45, -30))
  zero_or = lambda t: {
    k: np.where(np.arange(v.size).reshape(v.shape) % 3 == 0, 0, v).astype(v.dtype)
    for k, v in grads(t).items()
  }
  _compare(adamw_jax.adamw(1e-3, eps=1e-30), params, zero_or, monkeypatch)
  _compare(adamw_jax.adamw(1e-3, eps=1e-30), params, zero_or, monkeypatch, fused=True)


def test_non_finite_values(monkeypatch):
  params, grads = _problem(np.float32, {"w": (64,)})

  def bad(t):
    g = grads(t)["w"].copy()
    g[t % 8] = [np.inf, -np.inf, np.nan, 3e38][t % 4]
    return {"w": g}

  _compare(adamw_jax.adamw(1e-3, amsgrad=True), params, bad, monkeypatch)


def test_grad_through_the_update_is_the_pure_kernels(monkeypatch):
  """jax.grad of a loss of the updated parameters, w.r.t. the gradients and the lr.

  Under differentiation the pure kernel computes the step (so no native call
  is compiled), traced from the scalars the native call takes rather than from
  the hyperparameters: XLA may round the tangent of the lr differently (by an
  ulp), so gradients are compared to float32 precision and the loss bit for bit.
  """
  params, grads = _problem(np.float32, {"w": (50,), "b": (3,)})
  p = jax.tree.map(jnp.asarray, params)
  g = jax.tree.map(jnp.asarray, grads(0))

  def loss(g, lr):
    tx = optax.inject_hyperparams(adamw_jax.adamw)(learning_rate=lr)
    s = tx.init(p)
    for _ in range(2):
      u, s = tx.update(g, s, p)
    return sum(jnp.sum(jnp.sin(x)) for x in jax.tree.leaves(optax.apply_updates(p, u)))

  results = []
  for native in ("0", "1"):
    monkeypatch.setenv(_env.NATIVE.name, native)
    results.append(jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(g, jnp.float32(1e-2)))
  assert not _uses_native(lambda g: jax.grad(loss)(g, jnp.float32(1e-2)), g)
  (value_native, grad_native), (value_pure, grad_pure) = results[1], results[0]
  _assert_bitwise(value_native, value_pure, "loss")
  for a, b in zip(jax.tree.leaves(grad_native), jax.tree.leaves(grad_pure)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6 * float(jnp.abs(b).max()))
  assert float(jnp.abs(grad_native[1])) > 0


def test_vmap_over_learning_rates(monkeypatch):
  """Under jax.vmap the native call runs once per learning rate.

  The batched per-step scalars (traced lr) are computed by XLA in batched
  form, which may round them differently from an unbatched step in either
  kernel; so the vmapped runs are compared with unbatched native runs to
  float32 precision, and the native call must be in the compiled vmapped step.
  """
  params, grads = _problem(np.float32, {"w": (40, 3), "b": (3,)})
  lrs = jnp.array([1e-4, 1e-3, 1e-2], jnp.float32)
  p = jax.tree.map(jnp.asarray, params)

  def run(lr):
    tx = optax.inject_hyperparams(adamw_jax.adamw)(learning_rate=lr)
    s, q = tx.init(p), p
    for t in range(3):
      u, s = tx.update(jax.tree.map(jnp.asarray, grads(t)), s, q)
      q = optax.apply_updates(q, u)
    return q, s.inner_state

  monkeypatch.setenv(_env.NATIVE.name, "1")
  vmapped, single_run = jax.jit(jax.vmap(run)), jax.jit(run)
  assert _uses_native(vmapped, lrs)
  batched = vmapped(lrs)
  for k, lr in enumerate(lrs):
    single = single_run(lr)
    for a, b in zip(jax.tree.leaves(batched), jax.tree.leaves(single)):
      np.testing.assert_allclose(np.asarray(a)[k], b, rtol=2e-6, atol=1e-12)


def test_fused_step_donates_in_place(monkeypatch):
  """With params and state donated the step allocates nothing the size of the parameters.

  jit matches donated inputs to outputs of the same shape in order, so the
  donated arguments come in the order of the results, (params, state), as in
  a TrainState.
  """
  monkeypatch.setenv(_env.NATIVE.name, "1")
  tx = adamw_jax.adamw(1e-3)
  p = {"w": jnp.ones((1 << 20,), jnp.float32)}
  s = tx.init(p)
  step = jax.jit(lambda p, s, g: adamw_jax.fused_step(tx, g, s, p), donate_argnums=(0, 1))
  compiled = step.lower(p, s, p).compile()
  assert " copy(" not in compiled.as_text()
  stats = compiled.memory_analysis()
  assert stats.temp_size_in_bytes < 1 << 16, stats
  assert stats.alias_size_in_bytes >= 3 * 4 << 20, stats  # p, m and v written in place


def test_fused_step_refuses_other_transforms():
  p = {"w": jnp.ones(3)}
  for tx in (
    optax.chain(adamw_jax.scale_by_adam(), optax.scale(-1e-3)),
    optax.adamw(1e-3),
    _inject(),
  ):
    with pytest.raises(
      TypeError, match=r"fused_step: tx must be made by adamw_jax\.adamw, adamw_jax\.adam"
    ):
      adamw_jax.fused_step(tx, p, tx.init(p), p)
  tx = adamw_jax.scale_by_adam()
  with pytest.raises(TypeError, match="needs a learning rate"):
    adamw_jax.fused_step(tx, p, tx.init(p), p)


def test_fused_step_checks_its_arguments():
  tx = adamw_jax.adamw(1e-3)
  p = {"w": jnp.ones(3)}
  with pytest.raises(ValueError, match="structure"):
    adamw_jax.fused_step(tx, {"v": jnp.ones(3)}, tx.init(p), p)


def test_missing_extension_warns_once_and_falls_back(tmp_path):
  """A failed build leaves a working package that says why, once, on import."""
  script = """
import importlib.machinery, sys, warnings
class Hide:
  def find_spec(self, name, path=None, target=None):
    return None if name != "adamw_jax._native_lib" else importlib.machinery.ModuleSpec(name, None)
sys.meta_path.insert(0, Hide())
with warnings.catch_warnings(record=True) as caught:
  warnings.simplefilter("always")
  import jax, jax.numpy as jnp, optax, adamw_jax
  from adamw_jax import _native
  tx = adamw_jax.adamw(1e-3)
  p = {"w": jnp.ones(3)}
  u, s = tx.update(p, tx.init(p), p)
  new, s = adamw_jax.fused_step(tx, p, tx.init(p), p)
assert not _native.enabled()
assert _native.TARGET not in jax.jit(tx.update).lower(p, s, p).as_text()
mine = [str(w.message) for w in caught if "native CPU kernel" in str(w.message)]
print(len(mine), mine[0] if mine else "")
"""
  out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr
  count, message = out.stdout.strip().split(" ", 1)
  assert count == "1", out.stdout
  assert "not available" in message and "pure-JAX kernel is used" in message, message


def test_fused_step_in_a_linen_train_state():
  """The Linen loop of docs/native.md: fused_step on a TrainState equals apply_gradients bit for bit."""
  import flax.linen as nn
  from flax.training import train_state

  model = nn.Sequential([nn.Dense(16), nn.relu, nn.Dense(3)])
  x = jax.random.normal(jax.random.key(0), (32, 5))
  y = jax.random.randint(jax.random.key(1), (32,), 0, 3)
  params = model.init(jax.random.key(2), x)["params"]

  def loss_fn(params):
    logits = model.apply({"params": params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  def fused(state):
    grads = jax.grad(loss_fn)(state.params)
    params, opt_state = adamw_jax.fused_step(state.tx, grads, state.opt_state, state.params)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state)

  def plain(state):
    return state.apply_gradients(grads=jax.grad(loss_fn)(state.params))

  states = []
  for step in (fused, plain):
    state = train_state.TrainState.create(
      apply_fn=model.apply, params=jax.tree.map(jnp.copy, params), tx=adamw_jax.adamw(1e-2)
    )
    jitted = jax.jit(step, donate_argnums=0)
    for _ in range(5):
      state = jitted(state)
    states.append((state.params, state.opt_state))
  _assert_bitwise(states[0], states[1], "TrainState")


def test_fused_step_with_nnx():
  """The NNX loop of docs/native.md: split the model, fused_step on its nnx.Param state, merge back."""
  from flax import nnx

  class MLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
      self.fc1, self.fc2 = nnx.Linear(5, 16, rngs=rngs), nnx.Linear(16, 3, rngs=rngs)

    def __call__(self, x):
      return self.fc2(nnx.relu(self.fc1(x)))

  x = jax.random.normal(jax.random.key(0), (32, 5))
  y = jax.random.randint(jax.random.key(1), (32,), 0, 3)
  results = []
  for fused in (True, False):
    model = MLP(nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    tx = adamw_jax.adamw(1e-2)
    opt_state = tx.init(params)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def train_step(params, opt_state, fused=fused, graphdef=graphdef, tx=tx):
      def loss_fn(params):
        logits = nnx.merge(graphdef, params)(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

      grads = jax.grad(loss_fn)(params)
      if fused:
        return adamw_jax.fused_step(tx, grads, opt_state, params)
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state

    for _ in range(5):
      params, opt_state = train_step(params, opt_state)
    nnx.update(model, params)
    results.append((nnx.state(model, nnx.Param), opt_state))
  _assert_bitwise(results[0], results[1], "nnx")
