"""``fused_step`` through ``optax.MultiSteps`` and ``clipped``, against optax's own wrappers, bit for bit.

A table of optimizer configurations (weight-decay mask, schedules, amsgrad,
bfloat16 moments, 8-bit moments, flat buffers, Adam's L2 term) times the
wrappers real loops use (``MultiSteps`` with ``every_k`` 1 and 3, the
gradient-norm clip, and both): each runs several steps through
``fused_step`` and through the reference ``update`` + ``optax.apply_updates``
built from optax's own ``MultiSteps`` and ``optax.chain(clip_by_global_norm,
...)``; parameters (with -0.0 elements and a scalar leaf, where MultiSteps'
``0 * update`` keeps or drops the sign) and every state leaf must be equal bit
for bit after every step, on the native kernel (the CPU).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adamw_jax
from adamw_jax import _env, _native

STEPS = 5  # k=3: two accumulating steps, one that emits, two after it
CLIP = 0.6  # below some steps' global norm and above others'

needs_native = pytest.mark.skipif(
  _native.UNAVAILABLE is not None, reason=f"native kernel not built: {_native.UNAVAILABLE}"
)


def _params(big: bool = False) -> dict:
  w = np.linspace(-1.0, 1.0, 4096 if big else 12).astype(np.float32)
  w[::3] = -0.0  # MultiSteps' accumulating steps add 0 * update: the sign of a zero moves
  return {
    "w": jnp.asarray(w.reshape(64, 64) if big else w),
    "b": jnp.asarray([-0.0, 0.5]),
    "s": jnp.asarray(-0.0, jnp.float32),
  }


def _grads(params: Any, t: int, nan_at: int | None = None) -> Any:
  rng = np.random.default_rng(t)

  def leaf(p):
    g = rng.normal(size=np.shape(p)) * (3.0 if t % 2 else 0.05)
    g = np.where(rng.random(np.shape(p)) < 0.2, 0.0, g)
    if t == nan_at:
      g = np.full(np.shape(p), np.nan)
    return jnp.asarray(g, jnp.asarray(p).dtype)

  return jax.tree.map(leaf, params)


# name: (optimizer, parameters); the parameters' -0.0 elements are kept in every one.
CONFIGS: dict[str, tuple[Callable[[], optax.GradientTransformation], Callable[[], Any]]] = {
  "plain": (lambda: adamw_jax.adamw(1e-2, weight_decay=0.1), _params),
  "mask": (
    lambda: adamw_jax.adamw(1e-2, weight_decay=0.1, mask={"w": True, "b": False, "s": False}),
    _params,
  ),
  "schedules": (
    lambda: adamw_jax.adamw(
      optax.linear_schedule(1e-2, 1e-3, 5), weight_decay=lambda t: 0.1 / (1.0 + t)
    ),
    _params,
  ),
  "amsgrad": (lambda: adamw_jax.adamw(1e-2, weight_decay=0.1, amsgrad=True), _params),
  "bf16 moments": (
    lambda: adamw_jax.adamw(1e-2, weight_decay=0.1, mu_dtype=jnp.bfloat16, nu_dtype=jnp.bfloat16),
    _params,
  ),
  "8-bit moments": (
    lambda: adamw_jax.adamw(1e-2, weight_decay=0.1, moment_bits=8),
    lambda: _params(big=True),
  ),
  "flat buffers": (
    lambda: adamw_jax.adamw(1e-2, weight_decay=0.1),
    lambda: adamw_jax.flatten(_params()),
  ),
  "adam L2": (lambda: adamw_jax.adam(1e-2, weight_decay=0.1), _params),
  "bf16 params": (
    lambda: adamw_jax.adamw(1e-2, weight_decay=0.1),
    lambda: jax.tree.map(lambda p: p.astype(jnp.bfloat16), _params()),
  ),
}

# name: (the wrapped transform for fused_step, optax's own reference, from the same optimizer)
WRAPPERS: dict[str, Callable[[Any], tuple[Any, Any]]] = {
  "MultiSteps k=1": lambda tx: (optax.MultiSteps(tx, 1), optax.MultiSteps(tx, 1)),
  "MultiSteps k=3": lambda tx: (
    optax.MultiSteps(tx, 3).gradient_transformation(),
    optax.MultiSteps(tx, 3),
  ),
  "clip": lambda tx: (
    adamw_jax.clipped(tx, CLIP),
    optax.chain(optax.clip_by_global_norm(CLIP), tx),
  ),
  "MultiSteps k=3 of clip": lambda tx: (
    optax.MultiSteps(adamw_jax.clipped(tx, CLIP), 3),
    optax.MultiSteps(optax.chain(optax.clip_by_global_norm(CLIP), tx), 3),
  ),
}


def _bits(x) -> np.ndarray:
  x = np.asarray(x)
  return x.view(np.dtype(f"u{x.dtype.itemsize}"))


def _assert_bitwise(a: Any, b: Any, what: str) -> None:
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert jax.tree.structure(a) == jax.tree.structure(b), what
  for i, (x, y) in enumerate(zip(la, lb)):
    assert np.asarray(x).dtype == np.asarray(y).dtype, (what, i)
    bad = np.count_nonzero(_bits(x) != _bits(y))
    assert bad == 0, f"{what}: leaf {i} differs in {bad} of {np.size(x)} elements: {x} {y}"


def _compare(fused_tx, reference, params, steps: int = STEPS, nan_at: int | None = None) -> Any:
  """Both loops jitted, params and state donated on the fused side; bits compared every step."""
  fused = jax.jit(lambda p, s, g: adamw_jax.fused_step(fused_tx, g, s, p), donate_argnums=(0, 1))

  @jax.jit
  def plain(p, s, g):
    updates, s = reference.update(g, s, p)
    return optax.apply_updates(p, updates), s

  copy = lambda t: jax.tree.map(jnp.copy, t)
  p_ref, s_ref = params, reference.init(params)
  p_fused, s_fused = copy(p_ref), copy(fused_tx.init(params))
  _assert_bitwise(s_fused, s_ref, "init")
  for t in range(steps):
    g = _grads(params, t, nan_at)
    p_ref, s_ref = plain(p_ref, s_ref, g)
    p_fused, s_fused = fused(p_fused, s_fused, copy(g))
    _assert_bitwise((p_fused, s_fused), (p_ref, s_ref), f"step {t}")
  return p_ref


# Every configuration through both wrappers at once; every wrapper on its own with a few (each
# case compiles two steps: the whole product would take minutes of the suite's 2 cores).
CASES = [(config, "MultiSteps k=3 of clip") for config in CONFIGS] + [
  ("plain", "MultiSteps k=1"),
  ("plain", "MultiSteps k=3"),
  ("plain", "clip"),
  ("mask", "MultiSteps k=1"),
  ("amsgrad", "clip"),
  ("bf16 moments", "MultiSteps k=3"),
  ("adam L2", "clip"),
]


@needs_native
@pytest.mark.parametrize(("config", "wrapper"), CASES, ids=[f"{c}-{w}" for c, w in CASES])
def test_fused_step_of_wrappers_is_update_and_apply_updates(config, wrapper):
  make_tx, make_params = CONFIGS[config]
  fused_tx, reference = WRAPPERS[wrapper](make_tx())
  p = _compare(fused_tx, reference, make_params())
  if wrapper.startswith("MultiSteps k=3") and config in ("plain", "mask"):
    # The case the table is for: some -0.0 parameters became +0.0 on the accumulating steps.
    signs = np.signbit(np.asarray(p["w"])[::3])
    assert signs.any() and not signs.all(), signs


@needs_native
def test_fused_step_of_multisteps_that_skips():
  """``should_skip_update_fn``: the skipped step adds MultiSteps' zeros (+0.0), not 0 * update."""
  tx = adamw_jax.adamw(1e-2, weight_decay=0.1)
  make = lambda k: optax.MultiSteps(tx, k, should_skip_update_fn=optax.skip_not_finite)
  for k, nan_at in ((3, 1), (1, 2)):
    _compare(make(k), make(k), _params(), 6, nan_at)


def test_multisteps_schedule_and_sum(monkeypatch):
  """A schedule of every_k and summed (not averaged) gradients, on the pure-JAX kernel."""
  monkeypatch.setenv(_env.NATIVE.name, "0")
  tx = adamw_jax.adamw(1e-2, weight_decay=0.1)
  every_k = lambda step: jnp.where(step < 1, 2, 3)
  make = lambda: optax.MultiSteps(tx, every_k, use_grad_mean=False)
  _compare(make(), make(), _params(), 8)


def test_clipped_has_the_chain_state_and_update():
  """``clipped``'s init and update are optax.chain's: states interchange, updates are equal."""
  tx = adamw_jax.adamw(1e-2)
  mine, chain = adamw_jax.clipped(tx, CLIP), optax.chain(optax.clip_by_global_norm(CLIP), tx)
  p = _params()
  state = chain.init(p)
  _assert_bitwise(mine.init(p), state, "init")
  g = _grads(p, 1)
  _assert_bitwise(mine.update(g, state, p, value=1.0), chain.update(g, state, p), "update")


def _inject():
  return optax.inject_hyperparams(adamw_jax.adamw)(learning_rate=1e-2)


# name: (transform given to fused_step, the error's type, what its message must say)
REFUSED = {
  "optax.chain(clip_by_global_norm, adamw)": (
    lambda: optax.chain(optax.clip_by_global_norm(1.0), adamw_jax.adamw(1e-2)),
    TypeError,
    r"fused_step: tx must be made by adamw_jax\.adamw.*adamw_jax\.clipped\(tx, c\)",
  ),
  "optax.chain(adamw, scale)": (
    lambda: optax.chain(adamw_jax.adamw(1e-2), optax.scale(0.5)),
    TypeError,
    r"fused_step: tx must be made by adamw_jax\.adamw",
  ),
  "MultiSteps(optax.adamw)": (
    lambda: optax.MultiSteps(optax.adamw(1e-2), 2),
    TypeError,
    r"fused_step: the optimizer inside optax\.MultiSteps must be made by adamw_jax\.adamw",
  ),
  "MultiSteps(chain(clip, adamw))": (
    lambda: optax.MultiSteps(optax.chain(optax.clip_by_global_norm(1.0), adamw_jax.adamw(1)), 2),
    TypeError,
    r"inside optax\.MultiSteps must be made by .*adamw_jax\.clipped\(tx, c\)",
  ),
  "MultiSteps(inject_hyperparams(adamw))": (
    lambda: optax.MultiSteps(_inject(), 2),
    TypeError,
    r"inside optax\.MultiSteps must be made by",
  ),
  "clipped(optax.adamw)": (
    lambda: adamw_jax.clipped(optax.adamw(1e-2), 1.0),
    TypeError,
    r"fused_step: clipped's tx must be made by adamw_jax\.adamw",
  ),
  "clipped(scale_by_adam)": (
    lambda: adamw_jax.clipped(adamw_jax.scale_by_adam(), 1.0),
    TypeError,
    r"the fused step needs a learning rate",
  ),
  "clipped max_norm 0": (
    lambda: adamw_jax.clipped(adamw_jax.adamw(1e-2), 0.0),
    ValueError,
    r"clipped: Invalid max_norm: 0\.0 .* must be > 0",
  ),
  "clipped max_norm nan": (
    lambda: adamw_jax.clipped(adamw_jax.adamw(1e-2), float("nan")),
    ValueError,
    r"clipped: Invalid max_norm: nan",
  ),
  "clipped max_norm string": (
    lambda: adamw_jax.clipped(adamw_jax.adamw(1e-2), "1.0"),  # pyright: ignore[reportArgumentType]
    TypeError,
    r"clipped: max_norm must be a real number > 0, got '1\.0'",
  ),
  "clipped with another state": (
    lambda: adamw_jax.clipped(adamw_jax.adamw(1e-2), 1.0),
    TypeError,
    r"clipped: the optimizer state must be the pair",
  ),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_fused_step_refuses(case):
  make, error, match = REFUSED[case]
  p = {"w": jnp.ones(3)}
  with pytest.raises(error, match=match):
    tx = make()
    state = tx.init(p)
    if case == "clipped with another state":
      state = state[1]
    adamw_jax.fused_step(tx, p, state, p)


@needs_native
@pytest.mark.parametrize("wrapper", ["none", "MultiSteps k=2 of clip"])
def test_fused_update_is_nnx_optimizer_update(wrapper):
  """``fused_update`` in an NNX loop with BatchNorm statistics and dropout RNGs, bit for bit.

  The same loop (``nnx.jit``, ``nnx.grad`` over the ``nnx.Param`` state, the
  model in training mode) runs with ``optimizer.update`` and with
  ``adamw_jax.fused_update``; parameters, batch statistics, RNG counts,
  optimizer state and step must be equal bit for bit after every step.
  """
  from flax import nnx

  class Model(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
      self.fc1 = nnx.Linear(5, 16, rngs=rngs)
      self.bn = nnx.BatchNorm(16, rngs=rngs)
      self.drop = nnx.Dropout(0.3, rngs=rngs)
      self.fc2 = nnx.Linear(16, 3, rngs=rngs)

    def __call__(self, x):
      return self.fc2(self.drop(nnx.relu(self.bn(self.fc1(x)))))

  x = jax.random.normal(jax.random.key(0), (32, 5))
  y = jax.random.randint(jax.random.key(1), (32,), 0, 3)

  def loss_fn(model):
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

  def make_tx():
    tx = adamw_jax.adamw(1e-2, weight_decay=0.1)
    multi = optax.MultiSteps(adamw_jax.clipped(tx, CLIP), 2)
    return tx if wrapper == "none" else multi.gradient_transformation()

  @nnx.jit
  def plain(model, optimizer):
    optimizer.update(model, nnx.grad(loss_fn)(model))

  @nnx.jit
  def fused(model, optimizer):
    adamw_jax.fused_update(optimizer, model, nnx.grad(loss_fn)(model))

  runs = []
  for step in (plain, fused):
    model = Model(nnx.Rngs(0, dropout=1))
    model.train()
    optimizer = nnx.Optimizer(model, make_tx(), wrt=nnx.Param)
    states = []
    for _ in range(4):
      step(model, optimizer)
      states.append(nnx.state((model, optimizer)))
    runs.append(states)
  for t, (a, b) in enumerate(zip(*runs)):
    _assert_bitwise(jax.tree.map(_key_data, a), jax.tree.map(_key_data, b), f"nnx step {t}")
  stats = runs[1][-1]
  assert not np.array_equal(stats[0]["bn"]["mean"][...], np.zeros(16))  # BatchNorm ran
  assert int(stats[1]["step"][...]) == 4


def _key_data(x):
  return jax.random.key_data(x) if jnp.issubdtype(jnp.asarray(x).dtype, jax.dtypes.prng_key) else x


def test_fused_update_refuses_what_is_not_an_nnx_optimizer():
  tx = adamw_jax.adamw(1e-2)
  with pytest.raises(TypeError, match=r"fused_update: optimizer must be an nnx\.Optimizer, got"):
    adamw_jax.fused_update(tx, None, None)
