"""save_opt_state / restore_opt_state: exact resume with orbax, and clear refusals.

A run saved at step k and resumed must be bitwise the uninterrupted run (plain
adamw, param_groups with AMSGrad in one group, and an ``nnx.Optimizer``); a
checkpoint of another transform, tree, shape, dtype or config must fail with
an error naming what differs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import core as flax_core
from flax import nnx

import adamw_jax

K, STEPS = 5, 10
PARAMS = {"dense": {"kernel": jnp.linspace(-1, 1, 12).reshape(3, 4), "bias": jnp.zeros(4)},
          "ln": {"scale": jnp.ones(4)}}


def _grads(t):
  return jax.tree.map(lambda p: jnp.cos(p * (t + 1) + 0.5) * (1 + 0.1 * t), PARAMS)


def _grouped(amsgrad=True, **shared):
  return adamw_jax.param_groups(
      {"decay": (r"kernel$", {"weight_decay": 0.1}),
       "no_decay": ((r"bias$", r"^ln/"), {"weight_decay": 0.0, "amsgrad": amsgrad})},
      learning_rate=1e-2, **shared)


TRANSFORMS = {
    "adamw": lambda: adamw_jax.adamw(1e-2, weight_decay=0.1),
    "param_groups with amsgrad": _grouped,
    "chain with clipping": lambda: optax.chain(optax.clip_by_global_norm(1.0),
                                               adamw_jax.adamw(1e-2, amsgrad=True)),
}


def _stepper(tx):
  """Runs `tx` on the gradients of steps `steps`, with one compiled step."""
  @jax.jit
  def step(p, s, g):
    updates, s = tx.update(g, s, p)
    return optax.apply_updates(p, updates), s

  def run(params, state, steps):
    for t in steps:
      params, state = step(params, state, _grads(t))
    return params, state

  return run


def _assert_bitwise(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.dtype == y.dtype
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_resume_is_bitwise(tmp_path, name):
  tx = TRANSFORMS[name]()
  run = _stepper(tx)
  full_params, full_state = run(PARAMS, tx.init(PARAMS), range(STEPS))
  params, state = run(PARAMS, tx.init(PARAMS), range(K))
  adamw_jax.save_opt_state(tmp_path / "ckpt", state, config={"name": name})
  # The target may be a state (tx.init) or only its shapes (jax.eval_shape).
  for target in (tx.init(PARAMS), jax.eval_shape(tx.init, PARAMS)):
    restored = adamw_jax.restore_opt_state(tmp_path / "ckpt", target, config={"name": name})
    _assert_bitwise(restored, state)
  resumed_params, resumed_state = run(params, restored, range(K, STEPS))
  _assert_bitwise(resumed_params, full_params)
  _assert_bitwise(resumed_state, full_state)


class _Mlp(nnx.Module):
  def __init__(self, rngs):
    self.fc = nnx.Linear(3, 8, rngs=rngs)
    self.head = nnx.Linear(8, 2, rngs=rngs)

  def __call__(self, x):
    return self.head(nnx.tanh(self.fc(x)))


def test_nnx_optimizer_resume(tmp_path):
  """An nnx.Optimizer (step and opt_state) saved at step K, restored in place, continues bitwise."""
  x = jnp.linspace(-1, 1, 15).reshape(5, 3)

  @nnx.jit
  def step(model, optimizer):
    grads = nnx.grad(lambda m: jnp.mean(m(x) ** 2))(model)
    optimizer.update(model, grads)

  tx = _grouped_nnx()  # one transform: nnx.jit compiles the step once

  def fresh():
    model = _Mlp(nnx.Rngs(0))
    return model, nnx.Optimizer(model, tx, wrt=nnx.Param)

  reference, ref_opt = fresh()
  for _ in range(STEPS):
    step(reference, ref_opt)

  model, optimizer = fresh()
  for _ in range(K):
    step(model, optimizer)
  adamw_jax.save_opt_state(tmp_path / "opt", optimizer)
  with ocp.StandardCheckpointer() as ckptr:  # the model, as Flax's docs save it
    ckptr.save(tmp_path / "model", nnx.state(model))
  model, optimizer = fresh()
  assert int(optimizer.step[...]) == 0
  with ocp.StandardCheckpointer() as ckptr:
    nnx.update(model, ckptr.restore(tmp_path / "model", nnx.state(model)))
  assert adamw_jax.restore_opt_state(tmp_path / "opt", optimizer) is optimizer
  assert int(optimizer.step[...]) == K
  for _ in range(STEPS - K):
    step(model, optimizer)
  _assert_bitwise(nnx.as_pure(nnx.state(model)), nnx.as_pure(nnx.state(reference)))
  _assert_bitwise(nnx.as_pure(nnx.state(optimizer)), nnx.as_pure(nnx.state(ref_opt)))


def _grouped_nnx():
  return adamw_jax.param_groups({"decay": (r"kernel$", {"weight_decay": 0.1})},
                                rest={"weight_decay": 0.0, "amsgrad": True}, learning_rate=1e-2)


# --------------------------------------------------------------------------
# Refusals
# --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """A checkpoint of _grouped() (AMSGrad in group 'no_decay') after K steps, with a config."""
  path = tmp_path_factory.mktemp("ckpt") / "grouped"
  tx = _grouped()
  _, state = _stepper(tx)(PARAMS, tx.init(PARAMS), range(K))
  adamw_jax.save_opt_state(path, state, config={"learning_rate": 1e-2, "betas": (0.9, 0.999)})
  return path


_WHERE = r"^restore_opt_state: the checkpoint at '.*' does not fit the target: "
_BIGGER = {**PARAMS, "head": {"kernel": jnp.ones((4, 2))}}

MISMATCHES = [
    ("AMSGrad off", lambda: _grouped(amsgrad=False).init(PARAMS),
     _WHERE + r"different tree structure \(AMSGrad: the checkpoint has "
     r"'inner_states/no_decay/inner_state/nu_max', the target has it None\):\n"
     r"  only in the checkpoint: 'inner_states/no_decay/inner_state/nu_max/dense/bias' \(float32\[4\]\)\n"),
    ("other groups", lambda: adamw_jax.param_groups(
        {"decay": (r"kernel$", {}), "norm": (r"^ln/", {}), "bias": (r"bias$", {})}).init(PARAMS),
     _WHERE + r"different tree structure \(the checkpoint has param groups \['decay', 'no_decay'\], the "
     r"target param groups \['bias', 'decay', 'norm'\]\):\n"),
    ("no groups", lambda: adamw_jax.adamw(amsgrad=True).init(PARAMS),
     _WHERE + r"different tree structure \(the checkpoint has param groups \['decay', 'no_decay'\], "
     r"the target no param groups\):\n  only in the checkpoint: 'inner_states/decay/inner_state/count'"),
    ("optax.adamw", lambda: optax.adamw(1e-2).init(PARAMS), _WHERE + r"different tree structure"),
    ("another tree", lambda: _grouped().init(_BIGGER),
     _WHERE + r"different tree structure:\n  only in the target: "
     r"'inner_states/decay/inner_state/mu/head/kernel' \(float32\[4, 2\]\)\n"),
    ("shape", lambda: _grouped().init({**PARAMS, "ln": {"scale": jnp.ones(5)}}),
     _WHERE + r"different shape at 'inner_states/no_decay/inner_state/mu/ln/scale': the checkpoint "
     r"has float32\[4\], the target float32\[5\]\.$"),
    ("dtype", lambda: _grouped(mu_dtype=jnp.bfloat16).init(PARAMS),
     _WHERE + r"different dtype at 'inner_states/decay/inner_state/mu/dense/kernel': the checkpoint "
     r"has float32\[3, 4\], the target bfloat16\[3, 4\]\.$"),
    ("node types", lambda: _grouped().init(flax_core.freeze(PARAMS)),
     _WHERE + r"same leaves, different pytree node types:\n  checkpoint: .*\n  target: .*FrozenDict"),
]


@pytest.mark.parametrize("make, message", [m[1:] for m in MISMATCHES], ids=[m[0] for m in MISMATCHES])
def test_mismatch_is_refused(saved, make, message):
  with pytest.raises(ValueError, match=message):
    adamw_jax.restore_opt_state(saved, make())


@pytest.mark.parametrize("config, message", [
    ({"learning_rate": 1e-3, "betas": (0.9, 0.999)},
     r"^restore_opt_state: the checkpoint at '.*' was saved with another config: 'learning_rate' is "
     r"0\.01 in the checkpoint and 0\.001 here\.$"),
    ({"learning_rate": 1e-2, "betas": (0.9, 0.999), "amsgrad": True},
     r"another config: 'amsgrad' is '<missing>' in the checkpoint and True here\.$"),
])
def test_config_mismatch_is_refused(saved, config, message):
  with pytest.raises(ValueError, match=message):
    adamw_jax.restore_opt_state(saved, _grouped().init(PARAMS), config=config)


def test_config_given_but_none_saved(tmp_path):
  state = adamw_jax.adamw().init(PARAMS)
  adamw_jax.save_opt_state(tmp_path / "c", state)
  adamw_jax.restore_opt_state(tmp_path / "c", state)  # no config on either side: fine
  with pytest.raises(ValueError, match=r"saved with another config: it has none, and "
                     r"config=\{'lr': 0\.1\} was given\.$"):
    adamw_jax.restore_opt_state(tmp_path / "c", state, config={"lr": 0.1})


def test_missing_checkpoint(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"^restore_opt_state: no adamw_jax checkpoint at '.*nope'\.$"):
    adamw_jax.restore_opt_state(tmp_path / "nope", adamw_jax.adamw().init(PARAMS))
