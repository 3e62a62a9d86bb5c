"""Bad and edge inputs: one table of what each does, and the policy for non-finite gradients.

Every row says what happens to one input: refused (when the transform is
built, at ``init``, or when the step is traced) with a message naming what is
wrong; reported by ``checkify`` (values known only inside the compiled step);
or accepted, with the outcome stated and checked (torch's, where torch has
one). docs/bad-inputs.md ("Bad inputs and non-finite gradients") is this
table in words.
"""

from __future__ import annotations

import collections
import re
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from jax.experimental import checkify

import adamw_jax
from adamw_jax import _env
from tests import docs_pages, test_errors
from tests.torch_reference import to_numpy, to_tensor

INF, NAN = float("inf"), float("nan")


@pytest.fixture(autouse=True)
def _traced_checks(monkeypatch):
  """The checks of traced values are opt-in (ADAMW_JAX_CHECKIFY=1): on for this module."""
  monkeypatch.setenv(_env.CHECKIFY.name, "1")


def _params():
  return {
    "layer": {
      "w": jnp.arange(6.0, dtype=jnp.float32).reshape(2, 3) / 7 - 0.3,
      "b": jnp.array([0.5, -0.25, 0.125], jnp.float32),
    },
    "emb": {"table": jnp.linspace(-1.0, 1.0, 8, dtype=jnp.float32).reshape(4, 2)},
  }


def _grads(params=None):
  return jax.tree.map(lambda p: jnp.cos(3 * p + 1), _params() if params is None else params)


def _step(tx, params=None, grads=None, state=None):
  """One eager update: (updates, new state)."""
  params = _params() if params is None else params
  grads = _grads(params) if grads is None else grads
  return tx.update(grads, tx.init(params) if state is None else state, params)


def _checkified(tx, params=None, grads=None, state=None, steps: int = 1):
  """The checkify error of `steps` jitted updates (None: no check failed)."""
  params = _params() if params is None else params
  grads = _grads(params) if grads is None else grads
  state = tx.init(params) if state is None else state
  step = checkify.checkify(jax.jit(tx.update))
  for _ in range(steps):
    err, (_, state) = step(grads, state, params)
    if err.get() is not None:
      return err.get()
  return None


def _torch_step(params: dict, grads: dict, **kwargs) -> tuple[dict, list]:
  """One torch.optim.AdamW(foreach=False) step: new params and the per-parameter states."""
  tensors = {k: torch.nn.Parameter(to_tensor(np.asarray(v))) for k, v in params.items()}
  opt = torch.optim.AdamW(list(tensors.values()), foreach=False, **kwargs)
  for k, t in tensors.items():
    t.grad = to_tensor(np.asarray(grads[k]))
  opt.step()
  return (
    {k: to_numpy(t.detach()) for k, t in tensors.items()},
    [opt.state[t] for t in tensors.values()],
  )


# --------------------------------------------------------------------------
# What each input does
# --------------------------------------------------------------------------


class Case(NamedTuple):
  """One input and what it must do: `expect(run)` runs it and checks the outcome."""

  name: str
  run: Callable[[], Any]
  expect: Callable[[Callable[[], Any]], None]


def raises(error: type, pattern: str):
  def expect(run):
    with pytest.raises(error, match=pattern):
      run()

  return expect


def reports(pattern: str):
  """`run` returns a checkify message, which must match."""

  def expect(run):
    message = run()
    assert message is not None and re.search(pattern, message), message

  return expect


def holds(check: Callable[[Any], None]):
  def expect(run):
    check(run())

  return expect


def _bitwise(a, b) -> None:
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert np.asarray(x).dtype == np.asarray(y).dtype
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _same_as(reference: Callable[[], Any]):
  """The run gives bit for bit what `reference()` gives."""
  return holds(lambda got: _bitwise(got, reference()))


def _new_params(tx, params, grads, **kw):
  updates, state = _step(tx, params, grads, **kw)
  return optax.apply_updates(params, updates), state


def _as_torch(torch_kwargs: dict, params=None, grads=None):
  """adamw_jax.adamw with torch's keyword arguments lands on torch's parameters, NaN for NaN."""
  params = {"w": jnp.array([1.0, -2.0, 0.5, 0.0], jnp.float32)} if params is None else params
  grads = {"w": jnp.array([0.5, 0.25, -1.0, 0.0], jnp.float32)} if grads is None else grads
  names = {"lr": "learning_rate"}

  def run():
    tx = adamw_jax.adamw(**{names.get(k, k): v for k, v in torch_kwargs.items()})
    return _new_params(tx, params, grads)[0]

  def check(got):
    want, _ = _torch_step(params, grads, **torch_kwargs)
    for k in want:
      np.testing.assert_array_equal(np.asarray(got[k]), want[k])

  return run, holds(check)


def _injected(**hyper):
  """An inject_hyperparams adamw whose state then holds `hyper` (traced in the step)."""
  tx = optax.inject_hyperparams(adamw_jax.adamw)(learning_rate=1e-3)
  state = tx.init(_params())
  for k, v in hyper.items():
    state.hyperparams[k] = jnp.asarray(v, jnp.float32)
  return tx, state


def _injected_step(jit: bool, **hyper):
  tx, state = _injected(**hyper)
  update = jax.jit(tx.update) if jit else tx.update
  return lambda: update(_grads(), state, _params())


def _injected_checkified(**hyper):
  tx, state = _injected(**hyper)
  return lambda: _checkified(tx, state=state)


def _with_count(count):
  """One adamw update from a state whose count is `count`."""
  tx = adamw_jax.adamw()
  return lambda: _step(tx, state=tx.init(_params())._replace(count=count))


def _with_count_checkified(count):
  tx = adamw_jax.adamw()
  return lambda: _checkified(tx, state=tx.init(_params())._replace(count=count))


def _ascends(updates_and_state):
  updates, _ = updates_and_state
  for u, g in zip(jax.tree.leaves(updates), jax.tree.leaves(_grads())):
    assert np.all(np.sign(np.asarray(u)) == np.sign(np.asarray(g)))


def _all_nan(updates_and_state):
  for u in jax.tree.leaves(updates_and_state[0]):
    assert np.all(np.isnan(np.asarray(u)))


def _kept(leaf_key: str, value):
  """The leaf `leaf_key` is `value` (None or MaskedNode) in the updates and in mu and nu."""

  def check(updates_and_state):
    updates, state = updates_and_state
    for tree in (updates, state.mu, state.nu):
      assert tree[leaf_key] == value

  return holds(check)


def _zero_size_check(updates_and_state):
  updates, state = updates_and_state
  assert updates["empty"].shape == (0, 3) and state.mu["empty"].shape == (0, 3)
  assert int(state.count) == 1
  reference = _step(adamw_jax.adamw())
  _bitwise({k: v for k, v in updates.items() if k != "empty"}, reference[0])


def _scalar_as_torch(got):
  want, _ = _torch_step({"s": np.float32(0.75)}, {"s": np.float32(-0.5)})
  np.testing.assert_array_equal(np.asarray(got), want["s"])
  assert np.shape(got) == ()


def _float16_eps(run):
  with pytest.warns(
    UserWarning,
    match=re.escape(
      "adamw: eps=1e-08 rounds to 0 in float16 (the parameter at 'h'): where a gradient is zero "
      "the step is 0/0"
    ),
  ):
    got = run()
  params = {"h": np.array([1.0, 2.0, -0.5], np.float16)}
  want, _ = _torch_step(params, {"h": np.array([0.0, 1.0, 0.0], np.float16)})
  np.testing.assert_array_equal(np.isnan(np.asarray(got["h"])), np.isnan(want["h"]))
  assert np.isnan(np.asarray(got["h"])).tolist() == [True, False, True]


def _no_warning(run):
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    got = run()
  assert all(np.all(np.isfinite(np.asarray(x, np.float32))) for x in jax.tree.leaves(got))


def _float16(eps=1e-8, **kw):
  params = {"h": jnp.array([1.0, 2.0, -0.5], jnp.float16)}
  grads = {"h": jnp.array([0.0, 1.0, 0.0], jnp.float16)}
  return lambda: _new_params(adamw_jax.adamw(eps=eps, **kw), params, grads)[0]


def _bfloat16_as_torch(got):
  params = {"w": np.array([1.0, -2.0, 0.5, 3.0], jnp.bfloat16)}
  want, _ = _torch_step(params, {"w": np.array([0.5, 0.25, -1.0, 2.0], jnp.bfloat16)})
  assert got["w"].dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(got["w"], np.float32), want["w"].astype(np.float32))


def _complex_moments(state):
  assert state.mu["z"].dtype == jnp.complex64 and state.nu["z"].dtype == jnp.complex64


def _saturated(updates_and_state):
  updates, state = updates_and_state
  assert int(state.count) == 2**31 - 1
  # At the last count the bias corrections are 1 (1 - beta**t rounds to 1 from
  # t = 37,412 for 0.999): finite, and the step of any late count.
  late, _ = _step(
    adamw_jax.adamw(),
    state=adamw_jax.adamw().init(_params())._replace(count=jnp.asarray(10**6, jnp.int32)),
  )
  _bitwise(updates, late)
  assert all(np.all(np.isfinite(np.asarray(u))) for u in jax.tree.leaves(updates))


def _stays_saturated(updates_and_state):
  assert int(updates_and_state[1].count) == 2**31 - 1


def _grads_as_torch(bad: list[float]):
  params = {"w": jnp.array([1.0, -2.0, 0.5, 3.0, 0.25], jnp.float32)}
  grads = {"w": jnp.array(bad, jnp.float32)}

  def run():
    return _new_params(adamw_jax.adamw(), params, grads)

  def check(got):
    new, state = got
    want, torch_state = _torch_step(params, grads)
    np.testing.assert_array_equal(np.asarray(new["w"]), want["w"])
    np.testing.assert_array_equal(np.asarray(state.mu["w"]), to_numpy(torch_state[0]["exp_avg"]))
    np.testing.assert_array_equal(np.asarray(state.nu["w"]), to_numpy(torch_state[0]["exp_avg_sq"]))
    bad_at = ~np.isfinite(np.asarray(grads["w"]))
    assert np.all(np.isnan(np.asarray(new["w"])[bad_at]))
    assert np.all(np.isfinite(np.asarray(new["w"])[~bad_at]))  # other elements unaffected

  return run, holds(check)


def _empty_tree(tx):
  def run():
    updates, state = tx.update({}, tx.init({}), {})
    return updates, state

  return run


def _empty_ok(got):
  updates, _ = got
  assert updates == {}


def _python_float_leaf():
  params = {"s": 0.5, "w": jnp.ones(3)}
  return _step(adamw_jax.adamw(), params, {"s": jnp.float32(0.25), "w": jnp.full(3, 0.5)})


def _float32_scalar_leaf():
  params = {"s": jnp.float32(0.5), "w": jnp.ones(3)}
  return _step(adamw_jax.adamw(), params, {"s": jnp.float32(0.25), "w": jnp.full(3, 0.5)})


def _from_torch_with_step(step):
  w = torch.nn.Parameter(torch.ones(3))
  opt = torch.optim.AdamW([w], lr=0.1)
  w.grad = torch.ones(3)
  opt.step()
  opt.state[w]["step"] = torch.tensor(step)
  return lambda: adamw_jax.from_torch(opt.state_dict(), {"w": jnp.ones(3)})


def _flat_mismatch(other):
  flat = adamw_jax.flatten({"a": jnp.ones(3), "b": jnp.ones((2, 2))})
  tx = adamw_jax.adamw()
  return lambda: tx.update(adamw_jax.flatten(other), tx.init(flat), flat)


def _value_dependent(p):
  return jax.tree.map(lambda x: jnp.any(x > 0), p)


def _pos_selector(p):
  return jax.tree.map(lambda x: jnp.all(x > -10), p)


_MASK_PREFIX = (
  "the mask at 'emb/table' is a traced boolean \\(bool\\[\\]\\), but which leaves are decayed"
)


CASES = [
  # -- hyperparameters, when the transform is built --
  Case(
    "lr=string",
    lambda: adamw_jax.adamw(learning_rate="1e-3"),
    raises(TypeError, r"^Invalid learning_rate: expected a number or a schedule, got str$"),
  ),
  Case(
    "b1=string",
    lambda: adamw_jax.adamw(b1="0.9"),
    raises(TypeError, r"^Invalid beta parameter at index 0 \(b1\): expected a number, got str$"),
  ),
  Case(
    "lr=None adamw",
    lambda: adamw_jax.adamw(learning_rate=None),
    raises(TypeError, r"^Invalid learning_rate: expected a number or a schedule, got None$"),
  ),
  Case(
    "lr=None adam",
    lambda: adamw_jax.adam(learning_rate=None),
    raises(TypeError, r"^Invalid learning_rate: expected a number or a schedule, got None$"),
  ),
  Case(
    "lr=None param_groups",
    lambda: adamw_jax.param_groups({"all": (r".", {})}, learning_rate=None),
    raises(
      TypeError,
      r"^param_groups: group 'all': Invalid learning_rate: expected a number "
      r"or a schedule, got None$",
    ),
  ),
  Case(
    "eps=None",
    lambda: adamw_jax.adamw(eps=None),
    raises(TypeError, r"^Invalid epsilon value \(eps\): expected a number, got None$"),
  ),
  Case(
    "weight_decay=None",
    lambda: adamw_jax.adamw(weight_decay=None),
    raises(TypeError, r"^Invalid weight_decay value: expected a number or a schedule, got None$"),
  ),
  Case(
    "lr=np.float32(nan)",
    lambda: adamw_jax.adamw(learning_rate=np.float32(NAN)),
    raises(ValueError, r"^Invalid learning_rate: nan \(must be >= 0\)$"),
  ),
  Case(
    "eps=jnp.float32(nan)",
    lambda: adamw_jax.adamw(eps=jnp.float32(NAN)),
    raises(ValueError, r"^Invalid epsilon value \(eps\): nan \(must be >= 0\)$"),
  ),
  Case(
    "b2=np.float64(inf)",
    lambda: adamw_jax.adamw(b2=np.float64(INF)),
    raises(ValueError, r"^Invalid beta parameter at index 1 \(b2\): inf \(must be in \[0, 1\)\)$"),
  ),
  Case(
    "b1=jnp.array(-inf)",
    lambda: adamw_jax.adamw(b1=jnp.array(-INF)),
    raises(ValueError, r"^Invalid beta parameter at index 0 \(b1\): -inf"),
  ),
  Case(
    "eps=-inf",
    lambda: adamw_jax.adamw(eps=-INF),
    raises(ValueError, r"^Invalid epsilon value \(eps\): -inf \(must be >= 0\)$"),
  ),
  Case(
    "weight_decay=-inf",
    lambda: adamw_jax.adamw(weight_decay=-INF),
    raises(ValueError, r"^Invalid weight_decay value: -inf \(must be >= 0\)$"),
  ),
  Case(
    "lr of shape (1,)",
    lambda: adamw_jax.adamw(learning_rate=jnp.array([1e-3])),
    raises(ValueError, r"^Invalid learning_rate: expected a scalar, got an array of shape \(1,\)$"),
  ),
  Case(
    "lr=complex",
    lambda: adamw_jax.adamw(learning_rate=1e-3 + 0j),
    raises(TypeError, r"^Invalid learning_rate: expected a number or a schedule, got complex$"),
  ),
  Case(
    "lr=complex64 array",
    lambda: adamw_jax.adamw(learning_rate=jnp.array(1e-3, jnp.complex64)),
    raises(TypeError, r"^Invalid learning_rate: expected a real number, got dtype complex64$"),
  ),
  Case(
    "mu_dtype='float33'",
    lambda: adamw_jax.adamw(mu_dtype="float33"),
    raises(TypeError, r"^Invalid mu_dtype: 'float33' is not a dtype$"),
  ),
  Case(
    "peak_learning_rate=inf",
    lambda: adamw_jax.adamw(decay_mode="paper", peak_learning_rate=INF),
    raises(ValueError, r"^Invalid peak_learning_rate: inf \(must be > 0 and finite\)$"),
  ),
  Case(
    "decay_mode='Paper'",
    lambda: adamw_jax.adamw(decay_mode="Paper"),
    raises(ValueError, r"^adamw: Invalid decay_mode: 'Paper' \(must be 'torch' or 'paper'\)$"),
  ),
  Case(
    "lr=np.int64(1) is lr=1.0",
    lambda: _step(adamw_jax.adamw(np.int64(1))),
    _same_as(lambda: _step(adamw_jax.adamw(1.0))),
  ),
  Case(
    "amsgrad='yes' is True (truth value, as torch)",
    lambda: _step(adamw_jax.adamw(amsgrad="yes")),
    _same_as(lambda: _step(adamw_jax.adamw(amsgrad=True))),
  ),
  Case("lr=inf as torch", *_as_torch({"lr": INF})),
  Case("weight_decay=inf as torch", *_as_torch({"weight_decay": INF})),
  Case("eps=inf as torch", *_as_torch({"eps": INF})),
  # -- schedules --
  Case(
    "schedule NaN at step 0",
    lambda: adamw_jax.adamw(lambda count: jnp.nan),
    raises(
      ValueError,
      r"^Invalid learning_rate: the schedule returns nan at step 0 "
      r"\(must be >= 0\)$",
    ),
  ),
  Case(
    "schedule of arrays",
    lambda: adamw_jax.adamw(lambda count: jnp.full(2, 1e-3)),
    raises(ValueError, r"^Invalid learning_rate: expected a scalar, got an array of shape \(2,\)$"),
  ),
  Case(
    "schedule negative at step 1: checkify",
    lambda: _checkified(adamw_jax.adamw(lambda c: jnp.where(c >= 1, -1e-3, 1e-3)), steps=2),
    reports(
      r"^Invalid learning_rate: -0\.00100000\d*, the schedule's value at count 1 "
      r"\(must be >= 0\)"
    ),
  ),
  Case(
    "weight_decay schedule negative at step 1: checkify",
    lambda: _checkified(
      adamw_jax.adamw(weight_decay=lambda c: jnp.where(c >= 1, -0.1, 0.1)), steps=2
    ),
    reports(
      r"^Invalid weight_decay value: -0\.100000\d*, the schedule's value at count 1 "
      r"\(must be >= 0\)"
    ),
  ),
  Case(
    "schedule NaN at step 1: NaN updates without checkify",
    lambda: jax.jit(adamw_jax.adamw(lambda c: jnp.where(c >= 1, jnp.nan, 1e-3)).update)(
      _grads(), adamw_jax.adamw().init(_params())._replace(count=jnp.asarray(1)), _params()
    ),
    holds(_all_nan),
  ),
  Case(
    "schedule with Python if",
    lambda: _step(adamw_jax.adamw(lambda c: 1e-3 if c < 10 else 1e-4)),
    raises(
      TypeError,
      r"^adamw: the learning_rate schedule cannot be traced "
      r"\(TracerBoolConversionError\)",
    ),
  ),
  Case(
    "schedule with Python if, 8-bit moments",
    lambda: _step(adamw_jax.adamw(lambda c: 1e-3 if c < 10 else 1e-4, moment_bits=8)),
    raises(
      TypeError,
      r"^adamw: the learning_rate schedule cannot be traced "
      r"\(TracerBoolConversionError\)",
    ),
  ),
  Case(
    "weight_decay schedule negative at step 1, stochastic rounding: checkify",
    lambda: _checkified(
      adamw_jax.adamw(
        weight_decay=lambda c: jnp.where(c >= 1, -0.1, 0.1), param_rounding="stochastic"
      ),
      steps=2,
    ),
    reports(
      r"^Invalid weight_decay value: -0\.100000\d*, the schedule's value at count 1 "
      r"\(must be >= 0\)"
    ),
  ),
  # -- hyperparameters traced by optax.inject_hyperparams --
  Case(
    "injected lr=-1: checkify",
    _injected_checkified(learning_rate=-1.0),
    reports(r"^Invalid learning_rate: -1\.0, a traced value \(must be >= 0\)"),
  ),
  Case(
    "injected b1=1.5: checkify",
    _injected_checkified(b1=1.5),
    reports(
      r"^Invalid beta parameter at index 0 \(b1\): 1\.5, a traced value "
      r"\(must be in \[0, 1\)\)"
    ),
  ),
  Case(
    "injected eps=nan: checkify",
    _injected_checkified(eps=NAN),
    reports(r"^Invalid epsilon value \(eps\): nan, a traced value \(must be >= 0\)"),
  ),
  Case(
    "injected lr=-1, jitted: ascends without checkify",
    _injected_step(True, learning_rate=-1.0, weight_decay=0.0),
    holds(_ascends),
  ),
  Case(
    "injected lr=-1, eager update: refused",
    _injected_step(False, learning_rate=-1.0),
    raises(ValueError, r"^Invalid learning_rate: -1\.0 \(must be >= 0\)$"),
  ),
  Case(
    "inject_hyperparams(lr=-1) at init",
    lambda: optax.inject_hyperparams(adamw_jax.adamw)(learning_rate=-1.0).init(_params()),
    raises(ValueError, r"^Invalid learning_rate: -1\.0 \(must be >= 0\)$"),
  ),
  # -- parameters --
  Case("Python float leaf", _python_float_leaf, _same_as(_float32_scalar_leaf)),
  Case(
    "Python int leaf",
    lambda: adamw_jax.adamw().init({"n": 3, "w": jnp.ones(2)}),
    raises(
      TypeError,
      r"^adamw: the parameter at 'n' has dtype int32 \(a Python int\); Adam "
      r"needs floating-point or complex parameters",
    ),
  ),
  Case(
    "string leaf",
    lambda: adamw_jax.adamw().init({"name": "dense", "w": jnp.ones(2)}),
    raises(TypeError, r"^adamw: the parameter at 'name' is a str, not an array"),
  ),
  Case(
    "None leaf",
    lambda: _step(adamw_jax.adamw(), {**_params(), "frozen": None}, {**_grads(), "frozen": None}),
    _kept("frozen", None),
  ),
  Case(
    "optax.MaskedNode leaf",
    lambda: _step(
      adamw_jax.adamw(),
      {**_params(), "other": optax.MaskedNode()},
      {**_grads(), "other": optax.MaskedNode()},
    ),
    _kept("other", optax.MaskedNode()),
  ),
  Case(
    "zero-size leaf",
    lambda: _step(
      adamw_jax.adamw(),
      {**_params(), "empty": jnp.ones((0, 3))},
      {**_grads(), "empty": jnp.ones((0, 3))},
    ),
    holds(_zero_size_check),
  ),
  Case(
    "scalar params as torch",
    lambda: optax.apply_updates(
      jnp.float32(0.75), _step(adamw_jax.adamw(), jnp.float32(0.75), jnp.float32(-0.5))[0]
    ),
    holds(_scalar_as_torch),
  ),
  Case("float16 with eps=1e-8: warned, NaN where torch has NaN", _float16(), _float16_eps),
  Case("float16 with eps=1e-4: no warning", _float16(eps=1e-4), _no_warning),
  Case(
    "float16 with float32 moments: no warning",
    _float16(mu_dtype=jnp.float32, nu_dtype=jnp.float32),
    _no_warning,
  ),
  Case(
    "bfloat16 as torch",
    lambda: _new_params(
      adamw_jax.adamw(),
      {"w": jnp.array([1.0, -2.0, 0.5, 3.0], jnp.bfloat16)},
      {"w": jnp.array([0.5, 0.25, -1.0, 2.0], jnp.bfloat16)},
    )[0],
    holds(_bfloat16_as_torch),
  ),
  Case(
    "complex params with real mu_dtype keep complex moments",
    lambda: adamw_jax.adamw(mu_dtype=jnp.float32, nu_dtype=jnp.float32).init(
      {"z": jnp.ones(2, jnp.complex64)}
    ),
    holds(_complex_moments),
  ),
  # -- the step count --
  Case(
    "count 2**31 - 2: saturates, finite",
    _with_count(jnp.asarray(2**31 - 2, jnp.int32)),
    holds(_saturated),
  ),
  Case(
    "count 2**31 - 1: stays",
    _with_count(jnp.asarray(2**31 - 1, jnp.int32)),
    holds(_stays_saturated),
  ),
  Case(
    "count float32",
    _with_count(jnp.asarray(3.0)),
    raises(
      TypeError,
      r"^adamw: the state's count must be an integer scalar \(int32: the "
      r"number of steps taken, torch's step\), got float32\[\]",
    ),
  ),
  Case(
    "count Python float",
    _with_count(3.0),
    raises(
      TypeError,
      r"^adamw: the state's count must be an integer scalar .*, got the "
      r"float 3\.0",
    ),
  ),
  Case(
    "count of shape (1,)",
    _with_count(jnp.zeros(1, jnp.int32)),
    raises(TypeError, r"integer scalar .*, got int32\[1\]"),
  ),
  Case("count bool", _with_count(True), raises(TypeError, r"integer scalar .*, got the bool True")),
  Case(
    "count -5 (Python int)",
    _with_count(-5),
    raises(ValueError, r"^adamw: the state's count is -5; it must be >= 0"),
  ),
  Case(
    "count -5 (NumPy)",
    _with_count(np.int32(-5)),
    raises(ValueError, r"^adamw: the state's count is -5; it must be >= 0"),
  ),
  Case(
    "count -5 (jax.Array): checkify",
    _with_count_checkified(jnp.asarray(-5, jnp.int32)),
    reports(r"^adamw: the state's count is -5; it must be >= 0"),
  ),
  # -- gradients --
  Case("NaN gradient as torch", *_grads_as_torch([NAN, 0.5, -1.0, 2.0, 0.0])),
  Case("inf gradients as torch", *_grads_as_torch([INF, -INF, -1.0, 2.0, 0.0])),
  # -- masks and parameter groups, at init --
  Case(
    "mask mismatch at init",
    lambda: adamw_jax.adamw(mask={"layer": {"w": True}, "emb": True}).init(_params()),
    raises(
      ValueError,
      r"^adamw: the mask does not match the parameters at 'layer': the mask "
      r"has dict with keys \['w'\], the parameters have dict with keys \['b', 'w'\]\.",
    ),
  ),
  Case(
    "add_decayed_weights mask mismatch at init",
    lambda: adamw_jax.add_decayed_weights(mask={"layer": True}).init(_params()),
    raises(
      ValueError,
      r"^add_decayed_weights: the mask does not match the parameters at the "
      r"root",
    ),
  ),
  Case(
    "value-dependent mask at init",
    lambda: adamw_jax.adamw(mask=_value_dependent).init(_params()),
    raises(TypeError, "^adamw: " + _MASK_PREFIX),
  ),
  Case(
    "value-dependent mask at update",
    lambda: adamw_jax.adamw(mask=_value_dependent).update(
      _grads(), adamw_jax.adamw().init(_params()), _params()
    ),
    raises(TypeError, "^adamw: " + _MASK_PREFIX),
  ),
  Case(
    "mask passed through jit",
    lambda: jax.jit(
      lambda m: adamw_jax.adamw(mask=m).update(
        _grads(), adamw_jax.adamw().init(_params()), _params()
      )
    )(_value_dependent(_params())),
    raises(TypeError, "^adamw: " + _MASK_PREFIX),
  ),
  Case(
    "masked with a value-dependent mask at init",
    lambda: adamw_jax.masked(adamw_jax.scale_by_adam(), _value_dependent).init(_params()),
    raises(TypeError, "^masked: " + _MASK_PREFIX),
  ),
  Case(
    "param_groups with a value-dependent selector at init",
    lambda: adamw_jax.param_groups({"pos": (_pos_selector, {})}).init(_params()),
    raises(TypeError, "^param_groups: group 'pos': " + _MASK_PREFIX),
  ),
  Case(
    "mask={} on params",
    lambda: adamw_jax.adamw(mask={}).init(_params()),
    raises(
      ValueError,
      r"^adamw: the mask does not match the parameters at the root: the mask "
      r"has dict with keys \[\], the parameters have dict with keys \['emb', 'layer'\]\.",
    ),
  ),
  Case("adamw(mask={}) on an empty tree", _empty_tree(adamw_jax.adamw(mask={})), holds(_empty_ok)),
  Case(
    "masked(inner, {}) on an empty tree",
    _empty_tree(adamw_jax.masked(adamw_jax.adamw(), {})),
    holds(_empty_ok),
  ),
  Case(
    "add_decayed_weights(mask={}) on an empty tree",
    _empty_tree(adamw_jax.add_decayed_weights(mask={})),
    holds(_empty_ok),
  ),
  # -- flat buffers and torch interop --
  Case(
    "FlatParams of other shapes",
    _flat_mismatch({"a": jnp.ones(4), "b": jnp.ones(3)}),
    raises(
      ValueError,
      r"^adamw: updates and optimizer state \(mu\) differ in tree structure at "
      r"the root: updates has FlatParams with keys \['float32'\] \(its leaf 'a' has shape "
      r"\(4,\)\), optimizer state \(mu\) has FlatParams with keys \['float32'\] \(its leaf "
      r"'a' has shape \(3,\)\)\.$",
    ),
  ),
  Case(
    "FlatParams of other leaves",
    _flat_mismatch({"a": jnp.ones(3), "c": jnp.ones((2, 2))}),
    raises(
      ValueError,
      r"updates has FlatParams with keys \['float32'\] \(packing 'c', which "
      r"the other does not\), optimizer state \(mu\) has FlatParams with keys "
      r"\['float32'\] \(packing 'b', which the other does not\)\.$",
    ),
  ),
  Case(
    "from_torch with step nan",
    _from_torch_with_step(NAN),
    raises(
      ValueError,
      r"^from_torch: torch parameter 0 has step nan; expected a whole number "
      r"of steps in \[0, 2\*\*31 - 1\]\.$",
    ),
  ),
  Case(
    "from_torch with step inf",
    _from_torch_with_step(INF),
    raises(ValueError, r"^from_torch: torch parameter 0 has step inf; expected a whole number"),
  ),
]


def test_the_table_covers_the_issue():
  assert len(CASES) >= 40
  assert len({c.name for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_or_edge_input(case):
  case.expect(case.run)


# --------------------------------------------------------------------------
# init raises what update raises
# --------------------------------------------------------------------------


@pytest.mark.parametrize("builder", ["adamw", "add_decayed_weights"])
@pytest.mark.parametrize(
  "mask, error, message",
  [pytest.param(m, e, msg, id=name) for name, m, e, msg in test_errors._BAD_MASKS],
)
def test_bad_mask_is_refused_at_init_with_the_update_message(builder, mask, error, message):
  tx = test_errors._MASK_BUILDERS[builder](mask)
  with pytest.raises(error, match=f"(?s)^{builder}: " + message):
    tx.init(_params())


def test_flat_mask_splitting_a_buffer_is_refused_at_init():
  flat = adamw_jax.flatten(_params())
  with pytest.raises(
    ValueError,
    match=r"^adamw: the mask decays some but not all of the leaves "
    r"packed into the flat buffer 'float32'",
  ):
    adamw_jax.adamw(mask=adamw_jax.decay_mask).init(flat)


# --------------------------------------------------------------------------
# Options x bad inputs: every option refuses what the default refuses, the same way, as early
# --------------------------------------------------------------------------

# Each option with the parameter dtype it is for (the rounding options write bfloat16 leaves).
OPTIONS = {
  "default": ({}, jnp.float32),
  "bf16 moments": ({"mu_dtype": jnp.bfloat16, "nu_dtype": jnp.bfloat16}, jnp.float32),
  "stochastic": ({"param_rounding": "stochastic"}, jnp.bfloat16),
  "kahan": ({"param_rounding": "kahan"}, jnp.bfloat16),
  "remainder": ({"param_rounding": "remainder"}, jnp.bfloat16),
  "8-bit": ({"moment_bits": 8}, jnp.float32),
  "4-bit": ({"moment_bits": 4}, jnp.float32),
}


class Option(NamedTuple):
  """One column of the table: an option, its parameters (one leaf quantized with 8/4 bits)."""

  name: str

  def tx(self, **kw):
    return adamw_jax.adamw(**OPTIONS[self.name][0], **kw)

  def params(self, **extra):
    dtype = OPTIONS[self.name][1]
    big = jnp.linspace(-1, 1, 4096, dtype=jnp.float32).reshape(16, 256)
    return {**jax.tree.map(lambda p: p.astype(dtype), {**_params(), "big": big}), **extra}

  def grads(self, **extra):
    return {**_grads(self.params()), **extra}

  def state(self, **kw):
    return self.tx(**kw).init(self.params())


def _init(**extra):
  return lambda o: o.tx().init(o.params(**extra))


def _update(tx_kw=None, params=True, state=None, **grads):
  """An update of the option's transform, with `grads` replacing some gradients."""

  def run(o):
    tx = o.tx(**(tx_kw or {}))
    st = o.state() if state is None else state(o)
    return tx.update(o.grads(**grads), st, o.params() if params is True else params)

  return run


def _count(count):
  return _update(state=lambda o: o.state()._replace(count=count))


def _count_checkified(count):
  def run(o):
    state = o.state()._replace(count=count)
    return _checkified(o.tx(), params=o.params(), grads=o.grads(), state=state)

  return run


def _foreign_state(o):
  """The state of another option's init: a ScaleByAdamState, or for the default a low-memory one."""
  other = Option("kahan" if o.name in ("default", "bf16 moments") else "default")
  return other.tx().init(o.params())


def _other_type(o):
  low = OPTIONS[o.name][0].get("moment_bits") or OPTIONS[o.name][0].get("param_rounding")
  have, want = ("ScaleByAdamState", "LowMemoryAdamState")[:: 1 if low else -1]
  return (
    TypeError,
    rf"^adamw: the optimizer state is a {have}, not the {want} this transform's init",
  )


_SHAPE = r"^adamw: updates and optimizer state \(mu\) differ in shape at "
_COUNT_TYPE = r"^adamw: the state's count must be an integer scalar \(int32: the number of steps "
_TRACED_MASK = r"^adamw: the mask at '[\w/]+' is a traced boolean \(bool\[\]\), but which leaves"


class Bad(NamedTuple):
  """One bad input: refused at `when` ('init' or 'update'), with `error` matching `pattern`."""

  name: str
  when: str
  run: Callable[[Option], Any]
  error: type | Callable[[Option], tuple[type, str]]
  pattern: str = ""


BAD = [
  # -- at init --
  Bad(
    "Python int leaf",
    "init",
    _init(n=3),
    TypeError,
    r"^adamw: the parameter at 'n' has dtype int32 \(a Python int\); Adam needs",
  ),
  Bad("string leaf", "init", _init(name="dense"), TypeError, r"^adamw: the parameter at 'name' is"),
  Bad(
    "mask of other keys",
    "init",
    lambda o: o.tx(mask={"layer": {"w": True}, "emb": True, "big": True}).init(o.params()),
    ValueError,
    r"^adamw: the mask does not match the parameters at 'layer': the mask has dict with keys "
    r"\['w'\], the parameters have dict with keys \['b', 'w'\]\.",
  ),
  Bad(
    "mask with an int leaf",
    "init",
    lambda o: o.tx(mask={"layer": {"w": 1, "b": True}, "emb": False, "big": True}).init(o.params()),
    TypeError,
    r"^adamw: mask leaves must be booleans, got int 1 at 'layer/w'\.",
  ),
  Bad(
    "value-dependent mask",
    "init",
    lambda o: o.tx(mask=_value_dependent).init(o.params()),
    TypeError,
    _TRACED_MASK,
  ),
  Bad(
    "mask splitting a flat buffer",
    "init",
    lambda o: o.tx(mask=adamw_jax.decay_mask).init(adamw_jax.flatten(o.params())),
    ValueError,
    r"^adamw: the mask decays some but not all of the leaves packed into the flat buffer",
  ),
  # -- at update --
  Bad(
    "gradient (1,) for state (3,), no params",
    "update",
    lambda o: _update(
      tx_kw={"weight_decay": 0.0},
      params=o.params() if OPTIONS[o.name][0].get("param_rounding") else None,
      layer={"w": o.grads()["layer"]["w"], "b": jnp.ones(1, OPTIONS[o.name][1])},
    )(o),
    ValueError,
    _SHAPE + r"'layer/b': updates has shape \(1,\), optimizer state \(mu\) has shape \(3,\)\.$",
  ),
  Bad(
    "gradient (8, 256) for a (16, 256) leaf",
    "update",
    lambda o: _update(big=jnp.ones((8, 256), OPTIONS[o.name][1]))(o),
    ValueError,
    _SHAPE + r"'big': updates has shape \(8, 256\), optimizer state \(mu\) has shape \(16, 256\)",
  ),
  Bad(
    "gradients missing a leaf",
    "update",
    lambda o: o.tx().update({k: v for k, v in o.grads().items() if k != "emb"}, o.state(), None),
    ValueError,
    r"^adamw: updates and optimizer state \(mu\) differ in tree structure at the root",
  ),
  Bad(
    "params missing with weight decay",
    "update",
    _update(params=None),
    ValueError,
    r"^adamw: weight decay needs the parameters; call update\(updates, state, params\) with",
  ),
  Bad(
    "params of another tree",
    "update",
    lambda o: o.tx().update(o.grads(), o.state(), {**o.params(), "extra": jnp.ones(2)}),
    ValueError,
    r"^adamw: updates and params differ in tree structure at the root",
  ),
  Bad("count float32", "update", _count(jnp.asarray(3.0)), TypeError, _COUNT_TYPE),
  Bad("count Python float", "update", _count(3.0), TypeError, _COUNT_TYPE + r".*got the float"),
  Bad("count of shape (1,)", "update", _count(jnp.zeros(1, jnp.int32)), TypeError, _COUNT_TYPE),
  Bad("count bool", "update", _count(True), TypeError, _COUNT_TYPE + r".*got the bool True"),
  Bad(
    "count -5 (Python int)",
    "update",
    _count(-5),
    ValueError,
    r"^adamw: the state's count is -5; it must be >= 0",
  ),
  Bad(
    "count -5 (NumPy)",
    "update",
    _count(np.int32(-5)),
    ValueError,
    r"^adamw: the state's count is -5; it must be >= 0",
  ),
  Bad(
    "count -5 (jax.Array): checkify",
    "checkify",
    _count_checkified(jnp.asarray(-5, jnp.int32)),
    str,
    r"^adamw: the state's count is -5; it must be >= 0",
  ),
  Bad(
    "value-dependent mask at update",
    "update",
    lambda o: o.tx(mask=_value_dependent).update(o.grads(), o.state(), o.params()),
    TypeError,
    _TRACED_MASK,
  ),
  Bad(
    "schedule with Python if",
    "update",
    _update(tx_kw={"learning_rate": lambda c: 1e-3 if c < 10 else 1e-4}),
    TypeError,
    r"^adamw: the learning_rate schedule cannot be traced \(TracerBoolConversionError\)",
  ),
  Bad("another option's state", "update", _update(state=_foreign_state), _other_type),
]


@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("bad", BAD, ids=[b.name for b in BAD])
def test_every_option_refuses_what_the_default_refuses(bad, option):
  """The table: each bad input refused by each option as by the default: type, message, when."""
  o = Option(option)
  error, pattern = bad.error(o) if not isinstance(bad.error, type) else (bad.error, bad.pattern)
  if bad.when == "checkify":
    reports(pattern)(lambda: bad.run(o))
    return
  if bad.when == "update":
    o.tx().init(o.params())  # init takes the parameters
  with pytest.raises(error, match=pattern):
    bad.run(o)


@pytest.mark.parametrize("option", list(OPTIONS))
def test_every_option_takes_a_python_float_leaf_as_a_float32_scalar(option):
  """As the default path (and optax): the same numbers as ``jnp.float32(x)``, state included."""
  o = Option(option)
  w = jnp.linspace(-1, 1, 4096, dtype=jnp.float32).astype(OPTIONS[option][1])
  grads = {"s": jnp.float32(0.25), "w": jnp.cos(w)}
  got = o.tx().update(grads, o.tx().init({"s": 0.5, "w": w}), {"s": 0.5, "w": w})
  want = o.tx().update(grads, o.tx().init({"s": jnp.float32(0.5), "w": w}), {"s": 0.5, "w": w})
  _bitwise(got, want)


def test_the_options_table_covers_each_refusal_once():
  assert len(BAD) >= 20 and len({b.name for b in BAD}) == len(BAD)
  assert {b.when for b in BAD} == {"init", "update", "checkify"}
  assert list(OPTIONS) == [
    "default",
    "bf16 moments",
    "stochastic",
    "kahan",
    "remainder",
    "8-bit",
    "4-bit",
  ]


_F16 = {"big": jnp.linspace(-1, 1, 4096, dtype=jnp.float16), "small": jnp.array([1, 2, -0.5])}
_F16 = {k: v.astype(jnp.float16) for k, v in _F16.items()}
_F16_GRADS = {"big": jnp.zeros(4096, jnp.float16), "small": jnp.array([0, 1, 0], jnp.float16)}


@pytest.mark.parametrize("bits", [8, 4])
def test_float16_with_quantized_moments_warns_for_the_leaves_computed_in_float16(bits):
  """With moment_bits, a leaf below 4096 elements keeps float16 moments and is computed in float16.

  There eps=1e-8 rounds to 0 and a zero gradient gives 0/0, the default
  path's float16 case: the same warning, naming that leaf; the quantized
  leaf is computed in float32 and stays finite. eps=1e-4 warns of nothing.
  """
  tx = adamw_jax.adamw(moment_bits=bits)
  message = (
    "adamw: eps=1e-08 rounds to 0 in float16 (the parameter at 'small'): where a gradient is "
    "zero the step is 0/0 and the parameter becomes NaN, as in torch's (non-fused) AdamW. Use "
    f"eps >= 6e-8 (e.g. 1e-4 for float16): with moment_bits={bits} a leaf of fewer than 4096"
  )
  with pytest.warns(UserWarning, match=re.escape(message)):
    state = tx.init(_F16)
  new = optax.apply_updates(_F16, tx.update(_F16_GRADS, state, _F16)[0])
  assert np.isnan(np.asarray(new["small"])).tolist() == [True, False, True]
  assert np.all(np.isfinite(np.asarray(new["big"])))
  tx = adamw_jax.adamw(eps=1e-4, moment_bits=bits)
  _no_warning(lambda: optax.apply_updates(_F16, tx.update(_F16_GRADS, tx.init(_F16), _F16)[0]))


def test_kahan_computes_float16_leaves_in_float32_without_the_warning():
  tx = adamw_jax.adamw(param_rounding="kahan")
  _no_warning(lambda: optax.apply_updates(_F16, tx.update(_F16_GRADS, tx.init(_F16), _F16)[0]))


_8BIT_256 = r"8-bit in blocks of 256 \(moment_bits=8, moment_block_size=256\)"


@pytest.mark.parametrize(
  "made, used, dtype, pattern",
  [
    pytest.param(
      {"moment_bits": 8, "moment_block_size": 256},
      {"moment_bits": 8, "moment_block_size": 128},
      jnp.float32,
      rf"'w' is {_8BIT_256}, but this transform holds it 8-bit in blocks of 128 "
      r"\(moment_bits=8, moment_block_size=128\)",
      id="block 256 to 128",
    ),
    pytest.param(
      {"moment_bits": 8, "moment_block_size": 256},
      {"moment_bits": 4},
      jnp.float32,
      rf"'w' is {_8BIT_256}, but this transform holds it 4-bit in blocks of 128 "
      r"\(moment_bits=4, moment_block_size=128\)",
      id="8-bit to 4-bit",
    ),
    pytest.param(
      {"moment_bits": 4, "moment_block_size": 256},
      {"moment_bits": 8},
      jnp.float32,
      r"'w' is 4-bit in blocks of 256 \(moment_bits=4, moment_block_size=256\), but this "
      rf"transform holds it {_8BIT_256}",
      id="4-bit to 8-bit",
    ),
    pytest.param(
      {"param_rounding": "kahan"},
      {"param_rounding": "kahan", "moment_bits": 8},
      jnp.bfloat16,
      rf"'w' is full precision \(bfloat16\), but this transform holds it {_8BIT_256}",
      id="full precision to 8-bit",
    ),
    pytest.param(
      {"param_rounding": "kahan", "moment_bits": 8},
      {"param_rounding": "kahan"},
      jnp.bfloat16,
      rf"'w' is {_8BIT_256}, but this transform holds it full precision;",
      id="8-bit to full precision",
    ),
    pytest.param(
      {"param_rounding": "stochastic"},
      {"param_rounding": "kahan"},
      jnp.bfloat16,
      r"holds a PRNG key \(param_rounding='stochastic'\), but this transform has "
      r"param_rounding='kahan', moment_bits=None",
      id="stochastic to kahan",
    ),
    pytest.param(
      {"param_rounding": "kahan"},
      {"param_rounding": "stochastic"},
      jnp.bfloat16,
      r"has no PRNG key, but this transform has param_rounding='stochastic'",
      id="kahan to stochastic",
    ),
    pytest.param(
      {"param_rounding": "remainder"},
      {"param_rounding": "kahan"},
      jnp.bfloat16,
      r"has no compensation buffers, but this transform has param_rounding='kahan'",
      id="remainder to kahan",
    ),
    pytest.param(
      {"param_rounding": "kahan"},
      {"param_rounding": "remainder"},
      jnp.bfloat16,
      r"holds compensation buffers \(param_rounding='kahan'\), but this transform has "
      r"param_rounding='remainder', moment_bits=None",
      id="kahan to remainder",
    ),
    pytest.param(
      {"param_rounding": "stochastic"},
      {"param_rounding": "remainder"},
      jnp.bfloat16,
      r"holds a PRNG key \(param_rounding='stochastic'\), but this transform has "
      r"param_rounding='remainder'",
      id="stochastic to remainder",
    ),
    pytest.param(
      {"moment_bits": 8},
      {"param_rounding": "remainder", "moment_bits": 8},
      jnp.bfloat16,
      r"has no master remainders, but this transform has param_rounding='remainder', "
      r"moment_bits=8, moment_block_size=256",
      id="8-bit to remainder",
    ),
    pytest.param(
      {"param_rounding": "remainder"},
      {"param_rounding": "nearest", "mu_dtype": jnp.float32, "nu_dtype": jnp.float32},
      jnp.bfloat16,
      None,
      id="remainder to nearest",
    ),
  ],
)
def test_a_state_made_with_other_options_is_refused_naming_both(made, used, dtype, pattern):
  """Read in other blocks, maps or buffers, such a state would be converted silently.

  A low-memory state given to the default transform (no option: ``pattern``
  None) is refused by its type.
  """
  params = {"w": jnp.linspace(-1, 1, 4096, dtype=jnp.float32).reshape(16, 256).astype(dtype)}
  state = adamw_jax.adamw(**made).init(params)
  tx = adamw_jax.adamw(**used)
  error, full = (
    (TypeError, r"^adamw: the optimizer state is a LowMemoryAdamState, not the ScaleByAdamState")
    if pattern is None
    else (ValueError, r"^adamw: the optimizer state('s \w+ at)? " + pattern)
  )
  for update in (tx.update, jax.jit(tx.update)):
    with pytest.raises(error, match=full):
      update(jax.tree.map(jnp.ones_like, params), state, params)


def test_4bit_without_params_takes_a_gradient_of_the_leafs_size_in_another_shape():
  """The one bad input no option-free check sees: 4-bit codes are flat (torchao's layout).

  Without the parameters (``scale_by_adam``, or no weight decay) a gradient of
  the leaf's size but another shape is read in row-major order, as the
  leaf's; with the parameters it is refused, as by the default path.
  """
  params = {"w": jnp.linspace(-1, 1, 4096).reshape(16, 256)}
  grads = jax.tree.map(lambda p: jnp.cos(3 * p), params)
  flat = {"w": grads["w"].reshape(4096)}
  tx = adamw_jax.scale_by_adam(moment_bits=4)
  direction, _ = tx.update(flat, tx.init(params))
  want, _ = tx.update(grads, tx.init(params))
  np.testing.assert_array_equal(direction["w"], want["w"].reshape(4096))
  tx = adamw_jax.adamw(moment_bits=4)
  with pytest.raises(ValueError, match=_SHAPE + r"'w': updates has shape \(4096,\), optimizer"):
    tx.update(flat, tx.init(params), params)
  tx = adamw_jax.scale_by_adam(moment_bits=8)  # 8-bit codes have the leaf's shape
  shape = _SHAPE.replace("adamw", "scale_by_adam")
  with pytest.raises(ValueError, match=shape + r"'w': updates has shape \(4096,\), optimizer"):
    tx.update(flat, tx.init(params))


@pytest.mark.parametrize("rounding", ["kahan", "remainder"])
def test_rounding_without_params_says_that_it_writes_them(rounding):
  tx = adamw_jax.adamw(weight_decay=0.0, param_rounding=rounding)
  params = {"w": jnp.ones(3, jnp.bfloat16)}
  with pytest.raises(
    ValueError,
    match=rf"^adamw: param_rounding='{rounding}' writes the parameters; call update\(updates, "
    r"state, params\) with params\.$",
  ):
    tx.update(params, tx.init(params))


# --------------------------------------------------------------------------
# Extra arguments: optax's GradientTransformationExtraArgs
# --------------------------------------------------------------------------


def _from_torch_tx():
  b, w = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2, 3))
  opt = torch.optim.AdamW([{"params": [b], "weight_decay": 0.0}, {"params": [w]}])
  return adamw_jax.from_torch(opt, {"b": jnp.ones(3), "w": jnp.ones((2, 3))})[0]


TRANSFORMS = {
  "adamw": adamw_jax.adamw,
  "adam": adamw_jax.adam,
  "scale_by_adam": adamw_jax.scale_by_adam,
  "add_decayed_weights": adamw_jax.add_decayed_weights,
  "masked": lambda: adamw_jax.masked(adamw_jax.adamw(), {"w": True, "b": False}),
  "param_groups": lambda: adamw_jax.param_groups({"w": (r"^w$", {})}, rest={}),
  "from_torch": _from_torch_tx,
}


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_update_accepts_and_ignores_extra_args(name):
  tx = TRANSFORMS[name]()
  assert isinstance(tx, optax.GradientTransformationExtraArgs)
  params = {"w": jnp.ones((2, 3)), "b": jnp.full(3, 0.5)}
  grads = jax.tree.map(lambda p: p * 0.25 - 0.1, params)
  state = tx.init(params)
  plain = tx.update(grads, state, params)
  extra = tx.update(grads, state, params, value=jnp.float32(1.0), loss=2.0)
  _bitwise(extra, plain)
  chained = optax.chain(tx, optax.contrib.reduce_on_plateau())  # which reads value=
  updates, _ = chained.update(grads, chained.init(params), params, value=jnp.float32(1.0))
  _bitwise(updates, plain[0])


def test_fused_step_still_works_with_the_extra_args_update():
  tx = adamw_jax.adamw(1e-2)
  params, grads = _params(), _grads()
  state = tx.init(params)
  updates, want_state = tx.update(grads, state, params, value=1.0)
  new_params, new_state = adamw_jax.fused_step(tx, grads, state, params)
  _bitwise(new_params, optax.apply_updates(params, updates))
  _bitwise(new_state, want_state)


# --------------------------------------------------------------------------
# Traced hyperparameters: betas in float32, checks under checkify only
# --------------------------------------------------------------------------


def test_injected_betas_are_float32_and_static_args_keep_torch_precision():
  """inject_hyperparams traces b2 as a float32 array; static_args keeps the Python double."""
  params, grads = _params(), _grads()
  injected = optax.inject_hyperparams(adamw_jax.adamw)(learning_rate=1e-3, b2=0.99999)
  state = injected.init(params)
  assert state.hyperparams["b2"].dtype == jnp.float32
  assert float(state.hyperparams["b2"]) != 0.99999  # 0.99998998641968 in float32
  static = optax.inject_hyperparams(adamw_jax.adamw, static_args=("b1", "b2"))(
    learning_rate=1e-3, b2=0.99999
  )
  s, r = static.init(params), adamw_jax.adamw(1e-3, b2=0.99999).init(params)
  step_s, step_r = jax.jit(static.update), jax.jit(adamw_jax.adamw(1e-3, b2=0.99999).update)
  for _ in range(3):
    (u_s, s), (u_r, r) = step_s(grads, s, params), step_r(grads, r, params)
    _bitwise(u_s, u_r)


def _ops(tx, state) -> collections.Counter:
  """The instructions of the compiled update, by opcode."""
  hlo = jax.jit(tx.update).lower(_grads(), state, _params()).compile().as_text()
  return collections.Counter(re.findall(r"= \S+ ([a-z][a-z0-9-]*)\(", hlo))


@pytest.mark.parametrize(
  "make",
  [
    pytest.param(_injected, id="inject_hyperparams"),
    pytest.param(
      lambda: (lambda tx: (tx, tx.init(_params())))(
        adamw_jax.adamw(
          optax.cosine_decay_schedule(1e-3, 100), weight_decay=optax.constant_schedule(0.1)
        )
      ),
      id="schedules",
    ),
  ],
)
def test_traced_checks_compile_to_nothing_without_checkify(make, monkeypatch):
  """The checks of traced values and of the count add no instruction to the compiled step."""
  tx, state = make()
  with_checks = _ops(tx, state)
  monkeypatch.setattr(checkify, "debug_check", lambda *args, **kwargs: None)
  tx, state = make()
  assert _ops(tx, state) == with_checks
  assert not any("callback" in op for op in with_checks)
  monkeypatch.undo()
  monkeypatch.setenv(_env.CHECKIFY.name, "1")
  assert _checkified(tx, state=state) is None  # a valid step reports nothing


def test_traced_checks_are_off_by_default(monkeypatch):
  """Without ADAMW_JAX_CHECKIFY=1 the step has no effect, so JAX dispatches it on its fast path."""
  monkeypatch.delenv(_env.CHECKIFY.name)
  tx, state = _injected()
  assert not jax.make_jaxpr(tx.update)(_grads(), state, _params()).effects
  monkeypatch.setenv(_env.CHECKIFY.name, "1")
  tx, state = _injected()
  assert jax.make_jaxpr(tx.update)(_grads(), state, _params()).effects


def test_docs_checkify_example(monkeypatch):
  """The example of docs/bad-inputs.md runs and reports what its comment says."""
  block = docs_pages.section(docs_pages.page("bad-inputs.md"), "Checked only under `checkify`")[0]
  monkeypatch.setenv(_env.CHECKIFY.name, "0")  # restored after the example sets it
  namespace: dict = {}
  exec(compile(block.code, block.where, "exec"), namespace)
  comment = re.search(r"err\.get\(\)\s+# '(.*)'", block.code).group(1)
  assert namespace["err"].get() == comment
  with pytest.raises(checkify.JaxRuntimeError, match=r"Invalid learning_rate: -1\.0"):
    namespace["err"].throw()


# --------------------------------------------------------------------------
# Non-finite gradients: propagated as torch by default; skipped with optax
# --------------------------------------------------------------------------

_GOOD = {"w": jnp.full(3, 0.5), "b": jnp.array([0.1, -0.2])}
_BAD = {"w": jnp.array([0.5, jnp.nan, 0.5]), "b": jnp.array([jnp.inf, -0.2])}
_P0 = {"w": jnp.ones(3), "b": jnp.zeros(2)}


def _run(tx, grads_seq):
  step = jax.jit(tx.update)
  params, state, states = _P0, tx.init(_P0), []
  for g in grads_seq:
    updates, state = step(g, state, params)
    params = optax.apply_updates(params, updates)
    states.append(state)
  return params, states


def test_apply_if_finite_skips_leaves_state_untouched_and_counts():
  tx = optax.apply_if_finite(adamw_jax.adamw(1e-2), max_consecutive_errors=5)
  params, states = _run(tx, [_GOOD, _BAD, _BAD, _GOOD])
  want_params, want_states = _run(adamw_jax.adamw(1e-2), [_GOOD, _GOOD])
  _bitwise(states[2].inner_state, states[0].inner_state)  # untouched by the two bad steps
  assert int(states[2].inner_state.count) == 1  # the count did not advance
  assert [int(s.total_notfinite) for s in states] == [0, 1, 2, 2]  # the skipped steps, in all
  assert [int(s.notfinite_count) for s in states] == [0, 1, 2, 0]  # in a row
  assert [bool(s.last_finite) for s in states] == [True, False, False, True]
  _bitwise(params, want_params)
  _bitwise(states[-1].inner_state, want_states[-1])


def test_multisteps_skip_not_finite_leaves_state_untouched():
  tx = optax.MultiSteps(
    adamw_jax.adamw(1e-2), every_k_schedule=1, should_skip_update_fn=optax.skip_not_finite
  )
  params, states = _run(tx, [_GOOD, _BAD, _BAD, _GOOD])
  want_params, want_states = _run(adamw_jax.adamw(1e-2), [_GOOD, _GOOD])
  _bitwise(states[2].inner_opt_state, states[0].inner_opt_state)
  assert [int(s.gradient_step) for s in states] == [1, 1, 1, 2]  # steps taken: calls - skipped
  assert [bool(s.skip_state["should_skip"]) for s in states] == [False, True, True, False]
  assert [int(s.skip_state["num_not_finite"]) for s in states] == [0, 2, 2, 0]
  _bitwise(params, want_params)
  _bitwise(states[-1].inner_opt_state, want_states[-1])


def test_default_propagates_non_finite_gradients_into_the_moments():
  """Without a wrapper a NaN or inf gradient reaches the moments of its element only, as torch."""
  params, states = _run(adamw_jax.adamw(1e-2), [_BAD, _GOOD])
  mu = states[-1].mu
  assert np.isnan(np.asarray(mu["w"])).tolist() == [False, True, False]
  assert np.isinf(np.asarray(states[0].mu["b"])).tolist() == [True, False]
  assert np.isnan(np.asarray(params["w"])).tolist() == [False, True, False]
  assert np.isnan(np.asarray(params["b"])).tolist() == [True, False]
