"""The table of hyperparameters against adamw, adam, param_groups and the torch interop.

Every keyword of ``adamw`` and ``adam`` must be in ``adamw_jax._hyperparams.TABLE``
with the signature's default, be taken by ``param_groups`` (or refused there
with the table's reason), and be read from torch by ``from_torch`` and written
back by ``to_torch_state_dict`` (or refused by ``from_torch`` with the reason
torch has no such setting). A new keyword that skips any of these fails here.
"""

from __future__ import annotations

import inspect
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import adamw_jax
from adamw_jax import _hyperparams

FACTORIES = {
  "adamw": adamw_jax.adamw,
  "adam": adamw_jax.adam,
  "scale_by_adam": adamw_jax.scale_by_adam,
}
TORCH = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam}

# A valid value other than the default for each hyperparameter, with what it needs alongside.
NON_DEFAULT: dict[str, dict[str, Any]] = {
  "learning_rate": {"learning_rate": 3e-3},
  "b1": {"b1": 0.8},
  "b2": {"b2": 0.99},
  "eps": {"eps": 1e-3},
  "weight_decay": {"weight_decay": 0.3},
  "amsgrad": {"amsgrad": True},
  "maximize": {"maximize": True},
  "mask": {"mask": {"b": False, "w": True}},
  "eps_root": {"eps_root": 1e-3},
  "mu_dtype": {"mu_dtype": jnp.bfloat16},
  "nu_dtype": {"nu_dtype": jnp.bfloat16},
  "decay_mode": {"decay_mode": "paper"},
  "peak_learning_rate": {"decay_mode": "paper", "peak_learning_rate": 2e-3},
  "param_rounding": {"param_rounding": "kahan"},
  "rounding_seed": {"param_rounding": "stochastic", "rounding_seed": 7},
  "moment_bits": {"moment_bits": 8},
  "moment_block_size": {"moment_bits": 8, "moment_block_size": 128},
}


def _keywords(factory: str) -> list[str]:
  return list(inspect.signature(FACTORIES[factory]).parameters)


def _cases(factories=("adamw", "adam")):
  return [pytest.param(f, n, id=f"{f}-{n}") for f in factories for n in _keywords(f)]


def _params() -> dict[str, jax.Array]:
  return {
    "b": jnp.array([0.5, -0.25], jnp.float32),
    "w": jnp.arange(6.0, dtype=jnp.float32).reshape(3, 2) / 7 - 0.3,
  }


def _grads() -> dict[str, jax.Array]:
  return jax.tree.map(lambda p: jnp.cos(3 * p + 1), _params())


def _step(tx, state=None):
  params = _params()
  return tx.update(_grads(), tx.init(params) if state is None else state, params)


def _same(a, b) -> bool:
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  return jax.tree.structure(a) == jax.tree.structure(b) and all(
    x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y), equal_nan=True)
    for x, y in zip(leaves_a, leaves_b)
  )


# --------------------------------------------------------------------------
# The table and the signatures
# --------------------------------------------------------------------------


@pytest.mark.parametrize("factory", list(FACTORIES))
def test_every_keyword_is_in_the_table_with_its_default(factory):
  for name, parameter in inspect.signature(FACTORIES[factory]).parameters.items():
    assert name in _hyperparams.BY_NAME, f"{factory}({name}=...) is not in _hyperparams.TABLE"
    hp = _hyperparams.BY_NAME[name]
    assert parameter.default == _hyperparams.default(hp, factory), (factory, name)


def test_adamw_has_the_whole_table_in_its_order_and_adam_all_but_adamw_only():
  assert _keywords("adamw") == [h.name for h in _hyperparams.TABLE]
  assert _keywords("adam") == [h.name for h in _hyperparams.TABLE if not h.adamw_only]


def test_the_settings_object_holds_the_whole_table_in_its_order():
  """``_core.adam_transform`` takes one frozen Settings; its fields are the table's, no more."""
  import dataclasses

  fields = [f.name for f in dataclasses.fields(_hyperparams.Settings)]
  assert fields == ["name", "decoupled", "direction_only"] + [h.name for h in _hyperparams.TABLE]
  s = _hyperparams.Settings.of("adam", decoupled=False)  # nothing given: adam's defaults
  assert [getattr(s, h.name) for h in _hyperparams.TABLE] == [
    _hyperparams.default(h, "adam") for h in _hyperparams.TABLE
  ]
  with pytest.raises(dataclasses.FrozenInstanceError):
    s.b1 = 0.5  # type: ignore[misc]


def test_every_row_is_complete():
  assert set(NON_DEFAULT) == set(_hyperparams.BY_NAME), "give each new hyperparameter an example"
  for hp in _hyperparams.TABLE:
    assert (hp.torch is None) != (not hp.no_torch), f"{hp.name}: a torch key, or why there is none"
    assert (hp.kind == "number") == (hp.rule is not None), hp.name
    assert not hp.schedule or hp.kind == "number", hp.name
    assert (hp.kind == "choice") == bool(hp.choices), hp.name


@pytest.mark.parametrize("name", [h.name for h in _hyperparams.TABLE if h.kind == "number"])
def test_number_rules_give_the_table_label(name):
  hp = _hyperparams.BY_NAME[name]
  factory = adamw_jax.adamw
  kwargs = {"decay_mode": "paper"} if hp.adamw_only else {}
  with pytest.raises(ValueError, match="^" + re.escape(f"{hp.label}: -1.0 ({hp.rule[1]})")):
    factory(**kwargs, **{name: -1.0})
  with pytest.raises(TypeError, match="^" + re.escape(f"{hp.label}: expected a number")):
    factory(**kwargs, **{name: "0.1"})


@pytest.mark.parametrize("name", [h.name for h in _hyperparams.TABLE if h.kind == "number"])
def test_only_declared_schedules_may_be_callables(name):
  hp = _hyperparams.BY_NAME[name]
  kwargs = (
    {"decay_mode": "paper", "peak_learning_rate": 1e-3}
    if name == "learning_rate"
    else ({"decay_mode": "paper"} if hp.adamw_only else {})
  )
  schedule = lambda count: jnp.asarray(1e-3)
  if hp.schedule:
    adamw_jax.adamw(**{**kwargs, name: schedule})
  else:
    with pytest.raises(
      TypeError, match="^" + re.escape(f"{hp.label}: expected a number, got a callable")
    ):
      adamw_jax.adamw(**{**kwargs, name: schedule})


# --------------------------------------------------------------------------
# param_groups
# --------------------------------------------------------------------------


@pytest.mark.parametrize("factory, name", _cases())
def test_param_groups_takes_every_keyword(factory, name):
  """Per group and shared, with a value other than the default, exactly as the factory takes it."""
  hp = _hyperparams.BY_NAME[name]
  kwargs, optimizer = NON_DEFAULT[name], FACTORIES[factory]
  if hp.not_per_group:
    for groups, shared in (({"all": (r".", kwargs)}, {}), ({"all": (r".", {})}, kwargs)):
      with pytest.raises(
        TypeError, match=re.escape(f"unknown hyperparameter {name!r} ({hp.not_per_group})")
      ):
        adamw_jax.param_groups(groups, optimizer=optimizer, **shared)
    return
  direct_updates, direct_state = _step(optimizer(**kwargs))
  assert not _same((direct_updates, direct_state), _step(optimizer())), "not a non-default value"
  for groups, shared in (({"all": (r".", kwargs)}, {}), ({"all": (r".", {})}, kwargs)):
    updates, state = _step(adamw_jax.param_groups(groups, optimizer=optimizer, **shared))
    assert _same((updates, state.inner_states["all"].inner_state), (direct_updates, direct_state))
  # Two groups with the same value, one of them rest=: each parameter gets the same update.
  updates, _ = _step(
    adamw_jax.param_groups({"w": (r"^w$", kwargs)}, rest=kwargs, optimizer=optimizer)
  )
  assert _same(updates, direct_updates)


@pytest.mark.parametrize("name", [h.name for h in _hyperparams.TABLE if h.adamw_only])
def test_param_groups_refuses_adamw_only_keywords_for_adam(name):
  with pytest.raises(
    TypeError, match=re.escape(f"unknown hyperparameter {name!r} (adam does not take it)")
  ):
    adamw_jax.param_groups(
      {"all": (r".", {name: NON_DEFAULT[name][name]})}, optimizer=adamw_jax.adam
    )


def test_regression_param_groups_with_the_papers_decay():
  """Issue 14: ``decay_mode`` and ``peak_learning_rate`` were unknown to param_groups."""
  tx = adamw_jax.param_groups(
    {"no_decay": (r"^b$", {"weight_decay": 0.0})}, rest={}, learning_rate=1e-3, decay_mode="paper"
  )
  updates, _ = _step(tx)
  expected, _ = _step(adamw_jax.adamw(1e-3, decay_mode="paper"))
  np.testing.assert_array_equal(updates["w"], expected["w"])
  tx = adamw_jax.param_groups(
    {"all": (r".", {"peak_learning_rate": 2e-3})}, learning_rate=1e-3, decay_mode="paper"
  )
  updates, _ = _step(tx)
  expected, _ = _step(adamw_jax.adamw(1e-3, decay_mode="paper", peak_learning_rate=2e-3))
  assert _same(updates, expected)


def test_unknown_hyperparameter_lists_the_table():
  with pytest.raises(TypeError) as adamw_error:
    adamw_jax.param_groups({"all": (r".", {"momentum": 0.9})})
  listed = ", ".join(h.name for h in _hyperparams.per_group() if not h.adamw_only)
  only = ", ".join(h.name for h in _hyperparams.per_group() if h.adamw_only)
  assert str(adamw_error.value).endswith(
    f"the hyperparameters are {listed}. adamw also takes {only}."
  )
  with pytest.raises(TypeError) as adam_error:
    adamw_jax.param_groups({"all": (r".", {"momentum": 0.9})}, optimizer=adamw_jax.adam)
  assert str(adam_error.value).endswith(f"the hyperparameters are {listed}.")


# --------------------------------------------------------------------------
# from_torch / to_torch_state_dict
# --------------------------------------------------------------------------


def _torch_setting(hp: _hyperparams.Hyperparameter, value: Any) -> dict[str, Any]:
  """torch's keyword argument for `hp` = `value` (betas: the pair, the other at its default)."""
  if hp.torch_index is None:
    return {hp.torch: value}
  same = sorted(
    (h for h in _hyperparams.torch_keyed() if h.torch == hp.torch), key=lambda h: h.torch_index
  )
  return {hp.torch: tuple(value if h is hp else h.default for h in same)}


def _torch_run(factory: str, setting: dict[str, Any]):
  params = _params()
  tensors = [torch.nn.Parameter(torch.tensor(np.asarray(params[k]))) for k in ("b", "w")]
  opt = TORCH[factory](tensors, **setting)
  for t, g in zip(tensors, (_grads()["b"], _grads()["w"])):
    t.grad = torch.tensor(np.asarray(g))
  opt.step()
  return opt, {k: jnp.asarray(t.detach().numpy()) for k, t in zip(("b", "w"), tensors)}


@pytest.mark.parametrize("factory, name", _cases())
def test_interop_reads_and_writes_every_torch_setting_or_says_why_not(factory, name):
  hp = _hyperparams.BY_NAME[name]
  if hp.torch is None:
    # torch has no such setting: from_torch builds the default (torch's update), and a torch
    # param group that claims the setting is refused with the reason.
    assert hp.no_torch
    opt, params = _torch_run(factory, {})
    sd = opt.state_dict()
    sd["param_groups"][0][name] = NON_DEFAULT[name][name]
    with pytest.raises(ValueError, match=re.escape(hp.no_torch)):
      adamw_jax.from_torch(sd, params)
    return
  value = NON_DEFAULT[name][name]
  setting = _torch_setting(hp, value)
  opt, params = _torch_run(factory, setting)
  tx, state = adamw_jax.from_torch(opt, params)
  grads = _grads()
  ours = tx.update(grads, state, params)
  expected = FACTORIES[factory](**NON_DEFAULT[name]).update(grads, state, params)
  assert _same(ours, expected)
  group = adamw_jax.to_torch_state_dict(tx, state)["param_groups"][0]
  assert group[hp.torch] == setting[hp.torch]
  group = adamw_jax.to_torch_state_dict(opt, state)["param_groups"][0]
  assert group[hp.torch] == setting[hp.torch]


def test_interop_keys_come_from_the_table():
  """Every key of a torch AdamW / Adam param group is read, or ignored as an implementation."""
  for make in TORCH.values():
    keys = set(make([torch.nn.Parameter(torch.zeros(1))]).param_groups[0])
    assert keys <= set(_hyperparams.torch_keys()) | set(_hyperparams.TORCH_IGNORED)
