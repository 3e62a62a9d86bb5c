"""Errors: invalid hyperparameters, missing params, mismatched trees and masks, bad dtypes.

Every error must name what is wrong (argument and value, or the tree path and
both sides there), so the tables below match on the message, not just the type.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adamw_jax

NAN = float("nan")

# Every factory that takes a given hyperparameter, called with only that one set.
_FACTORIES = {
  "adamw": adamw_jax.adamw,
  "adam": adamw_jax.adam,
  "scale_by_adam": adamw_jax.scale_by_adam,
  "add_decayed_weights": adamw_jax.add_decayed_weights,
}
_TAKES = {
  "adamw": {"learning_rate", "b1", "b2", "eps", "eps_root", "weight_decay"},
  "adam": {"learning_rate", "b1", "b2", "eps", "eps_root", "weight_decay"},
  "scale_by_adam": {"b1", "b2", "eps", "eps_root"},
  "add_decayed_weights": {"weight_decay"},
}

# (argument, value, message prefix naming the argument)
_INVALID = [
  ("learning_rate", -1e-3, "Invalid learning_rate: -0.001"),
  ("learning_rate", NAN, "Invalid learning_rate: nan"),
  ("eps", -1e-8, "Invalid epsilon value (eps): -1e-08"),
  ("eps", NAN, "Invalid epsilon value (eps): nan"),
  ("b1", 1.0, "Invalid beta parameter at index 0 (b1): 1.0"),
  ("b1", 1.5, "Invalid beta parameter at index 0 (b1): 1.5"),
  ("b1", -0.1, "Invalid beta parameter at index 0 (b1): -0.1"),
  ("b1", NAN, "Invalid beta parameter at index 0 (b1): nan"),
  ("b2", 1.0, "Invalid beta parameter at index 1 (b2): 1.0"),
  ("b2", NAN, "Invalid beta parameter at index 1 (b2): nan"),
  ("weight_decay", -0.1, "Invalid weight_decay value: -0.1"),
  ("weight_decay", NAN, "Invalid weight_decay value: nan"),
  ("eps_root", -1, "Invalid eps_root value: -1.0"),
]


_LABELS = {
  "learning_rate": "Invalid learning_rate",
  "b1": "Invalid beta parameter at index 0 (b1)",
  "b2": "Invalid beta parameter at index 1 (b2)",
  "eps": "Invalid epsilon value (eps)",
  "eps_root": "Invalid eps_root value",
  "weight_decay": "Invalid weight_decay value",
}


def _cases(table):
  for arg, value, message in table:
    for factory, takes in _TAKES.items():
      if arg in takes:
        yield pytest.param(factory, arg, value, message, id=f"{factory}-{arg}={value}")


def _params():
  return {
    "layer": {
      "w": jnp.arange(6.0, dtype=jnp.float32).reshape(2, 3) / 7 - 0.3,
      "b": jnp.array([0.5, -0.25, 0.125], jnp.float32),
    },
    "emb": {"table": jnp.linspace(-1.0, 1.0, 8, dtype=jnp.float32).reshape(4, 2)},
  }


def _grads():
  return jax.tree.map(lambda p: jnp.cos(3 * p + 1), _params())


# --------------------------------------------------------------------------
# Hyperparameters
# --------------------------------------------------------------------------


@pytest.mark.parametrize("factory, arg, value, message", list(_cases(_INVALID)))
def test_invalid_hyperparameter_raises_value_error_naming_it(factory, arg, value, message):
  with pytest.raises(ValueError, match="^" + re.escape(message)):
    _FACTORIES[factory](**{arg: value})


@pytest.mark.parametrize(
  "factory, arg, value, message",
  list(
    _cases(
      [
        ("b1", jnp.float32(1.5), "Invalid beta parameter at index 0 (b1): 1.5"),
        ("learning_rate", jnp.array(-0.5), "Invalid learning_rate: -0.5"),
        ("weight_decay", np.float64(-2.0), "Invalid weight_decay value: -2.0"),
      ]
    )
  ),
)
def test_invalid_hyperparameter_as_concrete_array_raises(factory, arg, value, message):
  with pytest.raises(ValueError, match="^" + re.escape(message)):
    _FACTORIES[factory](**{arg: value})


@pytest.mark.parametrize(
  "factory, arg",
  [
    ("adamw", "learning_rate"),
    ("adam", "learning_rate"),
    ("adamw", "weight_decay"),
    ("add_decayed_weights", "weight_decay"),
  ],
)
def test_schedule_negative_at_step_zero_is_rejected(factory, arg):
  schedule = optax.linear_schedule(-1e-3, 1e-3, transition_steps=10)
  with pytest.raises(
    ValueError, match=re.escape(f"{_LABELS[arg]}: the schedule returns -0.001") + ".*step 0"
  ):
    _FACTORIES[factory](**{arg: schedule})


@pytest.mark.parametrize(
  "factory, arg",
  [pytest.param(f, a, id=f"{f}-{a}") for f, takes in _TAKES.items() for a in sorted(takes)],
)
@pytest.mark.parametrize("value", [True, False])
def test_bool_hyperparameter_raises_type_error(factory, arg, value):
  with pytest.raises(
    TypeError,
    match="^" + re.escape(f"{_LABELS[arg]}: expected a number, got the boolean {value!r}"),
  ):
    _FACTORIES[factory](**{arg: value})


@pytest.mark.parametrize("factory", ["adamw", "adam"])
@pytest.mark.parametrize(
  "kwargs, params_move",
  [
    pytest.param({"b1": 0.0}, True, id="b1=0"),
    pytest.param({"b2": 0.0}, True, id="b2=0"),
    pytest.param({"weight_decay": 0.0}, True, id="wd=0"),
    pytest.param({"eps": 0.0}, True, id="eps=0"),
    pytest.param({"eps_root": 0.0}, True, id="eps_root=0"),
    pytest.param({"b1": 0.999999, "b2": 0.999999}, True, id="betas-near-1"),
    pytest.param({"learning_rate": 0.0}, False, id="lr=0"),
    pytest.param(
      {"learning_rate": optax.linear_schedule(0.0, 1e-2, 10)}, False, id="lr-schedule-from-0"
    ),
  ],
)
def test_valid_edge_hyperparameters_are_accepted(factory, kwargs, params_move):
  tx = _FACTORIES[factory](**kwargs)
  params, grads = _params(), _grads()
  updates, state = tx.update(grads, tx.init(params), params)
  assert int(state.count) == 1
  for leaf in jax.tree.leaves((updates, state)):
    assert np.all(np.isfinite(leaf))
  if params_move:
    for leaf in jax.tree.leaves(updates):
      assert np.all(leaf != 0)
  else:  # lr == 0 at step 0: the parameters do not move at all
    for leaf in jax.tree.leaves(updates):
      np.testing.assert_array_equal(leaf, np.zeros_like(leaf))


def test_valid_edge_hyperparameters_for_building_blocks():
  params, grads = _params(), _grads()
  for tx in (
    adamw_jax.scale_by_adam(b1=0.0, eps=0.0),
    adamw_jax.scale_by_adam(b2=0.0),
    adamw_jax.add_decayed_weights(0.0),
  ):
    updates, _ = tx.update(grads, tx.init(params), params)
    for leaf in jax.tree.leaves(updates):
      assert np.all(np.isfinite(leaf))
  # weight decay 0: the updates pass through unchanged.
  tx = adamw_jax.add_decayed_weights(0.0)
  updates, _ = tx.update(grads, tx.init(params), params)
  for u, g in zip(jax.tree.leaves(updates), jax.tree.leaves(grads)):
    np.testing.assert_array_equal(u, g)


@pytest.mark.parametrize("factory", ["adamw", "adam", "scale_by_adam"])
@pytest.mark.parametrize("arg", ["mu_dtype", "nu_dtype"])
@pytest.mark.parametrize("dtype", [jnp.int32, jnp.uint8, jnp.bool_], ids=["int32", "uint8", "bool"])
def test_invalid_moment_dtype_raises_value_error(factory, arg, dtype):
  with pytest.raises(ValueError, match=re.escape(f"Invalid {arg}: {jnp.dtype(dtype)}")):
    _FACTORIES[factory](**{arg: dtype})


# --------------------------------------------------------------------------
# params required
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
  "make",
  [
    pytest.param(lambda: adamw_jax.adamw(), id="adamw"),
    pytest.param(
      lambda: adamw_jax.adamw(weight_decay=optax.constant_schedule(1e-2)), id="adamw-wd-schedule"
    ),
    pytest.param(lambda: adamw_jax.adam(weight_decay=1e-2), id="adam-l2"),
    pytest.param(lambda: adamw_jax.add_decayed_weights(1e-2), id="add_decayed_weights"),
  ],
)
def test_update_without_params_when_needed_raises_naming_params(make):
  tx = make()
  state = tx.init(_params())
  with pytest.raises(ValueError, match=r"update\(updates, state, params\) with params"):
    tx.update(_grads(), state)
  with pytest.raises(ValueError, match=r"with params"):
    jax.jit(tx.update)(_grads(), state, None)


@pytest.mark.parametrize(
  "make",
  [
    pytest.param(lambda: adamw_jax.scale_by_adam(), id="scale_by_adam"),
    pytest.param(lambda: adamw_jax.adamw(weight_decay=0.0), id="adamw-wd0"),
    pytest.param(lambda: adamw_jax.adam(), id="adam-wd0"),
  ],
)
def test_update_without_weight_decay_does_not_need_params(make):
  # Without weight decay the step does not involve the parameters, so they
  # are optional; with or without them the parameters land on the same values.
  tx = make()
  params, grads = _params(), _grads()
  state = tx.init(params)
  step = jax.jit(tx.update)
  without, state_without = step(grads, state, None)
  with_params, state_with = step(grads, state, params)
  assert int(state_without.count) == 1
  assert jax.tree.structure(without) == jax.tree.structure(params)
  np.testing.assert_equal(
    jax.tree.map(np.asarray, optax.apply_updates(params, without)),
    jax.tree.map(np.asarray, optax.apply_updates(params, with_params)),
  )
  np.testing.assert_equal(
    jax.tree.map(np.asarray, state_without), jax.tree.map(np.asarray, state_with)
  )


# --------------------------------------------------------------------------
# Gradients that do not match the state or the params
# --------------------------------------------------------------------------


def _with(tree, path, value):
  """A copy of the nested dict `tree` with `path` set to `value` (or removed if value is None)."""
  tree = jax.tree.map(lambda x: x, tree)  # copy the dicts
  node = tree
  for key in path[:-1]:
    node = node[key]
  if value is None:
    del node[path[-1]]
  else:
    node[path[-1]] = value
  return tree


_G = _grads()
_GRAD_MISMATCHES = [
  (
    "missing-key",
    _with(_G, ("layer", "b"), None),
    r"differ in tree structure at 'layer': updates has dict with keys \['w'\], "
    r"optimizer state \(mu\) has dict with keys \['b', 'w'\]",
  ),
  (
    "extra-key",
    _with(_G, ("layer", "c"), _G["layer"]["b"]),
    r"differ in tree structure at 'layer': updates has dict with keys \['b', 'c', 'w'\], "
    r"optimizer state \(mu\) has dict with keys \['b', 'w'\]",
  ),
  (
    "extra-top-level-key",
    {**_G, "head": jnp.zeros(2)},
    r"differ in tree structure at the root: updates has dict with keys \['emb', 'head', "
    r"'layer'\], optimizer state \(mu\) has dict with keys \['emb', 'layer'\]",
  ),
  (
    "deeper-nesting",
    _with(_G, ("layer", "w"), {"x": _G["layer"]["w"]}),
    r"differ in tree structure at 'layer/w': updates has dict with keys \['x'\], "
    r"optimizer state \(mu\) has a leaf",
  ),
  (
    "shallower-nesting",
    {**_G, "emb": _G["emb"]["table"]},
    r"differ in tree structure at 'emb': updates has a leaf.*, "
    r"optimizer state \(mu\) has dict with keys \['table'\]",
  ),
  (
    "list-instead-of-dict",
    {**_G, "layer": [_G["layer"]["b"], _G["layer"]["w"]]},
    r"differ in tree structure at 'layer': updates has list with keys \['0', '1'\], "
    r"optimizer state \(mu\) has dict with keys \['b', 'w'\]",
  ),
  (
    "shape",
    _with(_G, ("layer", "w"), _G["layer"]["w"][:1]),
    r"differ in shape at 'layer/w': updates has shape \(1, 3\), "
    r"optimizer state \(mu\) has shape \(2, 3\)",
  ),
  (
    "transposed-shape",
    _with(_G, ("emb", "table"), _G["emb"]["table"].T),
    r"differ in shape at 'emb/table': updates has shape \(2, 4\), "
    r"optimizer state \(mu\) has shape \(4, 2\)",
  ),
]


@pytest.mark.parametrize("factory", ["adamw", "adam", "scale_by_adam"])
@pytest.mark.parametrize(
  "grads, message", [pytest.param(g, m, id=name) for name, g, m in _GRAD_MISMATCHES]
)
def test_gradients_not_matching_state_raise_naming_path(factory, grads, message):
  tx = _FACTORIES[factory]()
  params = _params()
  state = tx.init(params)
  with pytest.raises(
    ValueError, match=f"^{factory}: updates and optimizer state \\(mu\\) " + message
  ):
    tx.update(grads, state, params)
  with pytest.raises(ValueError, match=message):
    jax.jit(tx.update)(grads, state, params)


@pytest.mark.parametrize("factory", ["adamw", "add_decayed_weights"])
def test_params_not_matching_updates_raise_naming_path(factory):
  tx = _FACTORIES[factory]()
  params = _params()
  state = tx.init(params)
  wrong_shape = _with(params, ("emb", "table"), params["emb"]["table"].T)
  with pytest.raises(
    ValueError,
    match=re.escape(
      f"{factory}: updates and params differ in shape at 'emb/table': "
      "updates has shape (4, 2), params has shape (2, 4)"
    ),
  ):
    tx.update(_grads(), state, wrong_shape)
  missing = _with(params, ("layer", "w"), None)
  with pytest.raises(
    ValueError,
    match=re.escape(
      f"{factory}: updates and params differ in tree structure at 'layer': "
      "updates has dict with keys ['b', 'w'], params has dict with keys ['b']"
    ),
  ):
    tx.update(_grads(), state, missing)


# --------------------------------------------------------------------------
# Parameters that Adam cannot handle
# --------------------------------------------------------------------------


@pytest.mark.parametrize("factory", ["adamw", "adam", "scale_by_adam"])
@pytest.mark.parametrize(
  "dtype", [jnp.int32, jnp.int8, jnp.uint32, jnp.bool_], ids=["int32", "int8", "uint32", "bool"]
)
def test_non_float_params_raise_type_error_at_init(factory, dtype):
  params = _with(_params(), ("layer", "steps"), jnp.zeros((3,), dtype))
  with pytest.raises(
    TypeError,
    match=re.escape(f"{factory}: the parameter at 'layer/steps' has dtype {jnp.dtype(dtype)}"),
  ):
    _FACTORIES[factory]().init(params)
  with pytest.raises(
    TypeError, match=re.escape(f"{factory}: the parameter at the root has dtype {jnp.dtype(dtype)}")
  ):
    _FACTORIES[factory]().init(jnp.zeros((2,), dtype))


# --------------------------------------------------------------------------
# Masks
# --------------------------------------------------------------------------

_MASK_BUILDERS = {
  "adamw": lambda m: adamw_jax.adamw(mask=m),
  "add_decayed_weights": lambda m: adamw_jax.add_decayed_weights(mask=m),
  "masked": lambda m: adamw_jax.masked(adamw_jax.scale_by_adam(), m),
}

_BAD_MASKS = [
  (
    "wrong-key",
    {"layer": True, "embedding": False},
    ValueError,
    r"the mask does not match the parameters at the root: the mask has dict with keys "
    r"\['embedding', 'layer'\], the parameters have dict with keys \['emb', 'layer'\]",
  ),
  (
    "missing-nested-key",
    {"layer": {"w": True}, "emb": False},
    ValueError,
    r"the mask does not match the parameters at 'layer': the mask has dict with keys "
    r"\['w'\], the parameters have dict with keys \['b', 'w'\]",
  ),
  (
    "too-deep",
    {"layer": {"w": {"kernel": True}, "b": False}, "emb": False},
    ValueError,
    r"the mask does not match the parameters at 'layer/w': the mask has dict with keys "
    r"\['kernel'\], the parameters have a leaf",
  ),
  (
    "list-for-dict",
    {"layer": [True, False], "emb": False},
    ValueError,
    r"the mask does not match the parameters at 'layer': the mask has list",
  ),
  (
    "int-leaf",
    {"layer": {"w": 1, "b": True}, "emb": False},
    TypeError,
    r"mask leaves must be booleans, got int 1 at 'layer/w'",
  ),
  (
    "float-leaf",
    {"layer": True, "emb": 0.0},
    TypeError,
    r"mask leaves must be booleans, got float 0.0 at 'emb'",
  ),
  (
    "array-leaf",
    {"layer": True, "emb": {"table": jnp.ones((4, 2), bool)}},
    TypeError,
    r"mask leaves must be booleans, got ArrayImpl .* at 'emb/table'",
  ),
  (
    "callable-wrong-key",
    lambda p: {"layer": True},
    ValueError,
    r"the mask does not match the parameters at the root: the mask has dict with keys "
    r"\['layer'\]",
  ),
]


@pytest.mark.parametrize("builder", sorted(_MASK_BUILDERS))
@pytest.mark.parametrize(
  "mask, error, message", [pytest.param(m, e, msg, id=name) for name, m, e, msg in _BAD_MASKS]
)
def test_bad_mask_raises_naming_path(builder, mask, error, message):
  tx = _MASK_BUILDERS[builder](mask)
  params = _params()
  with pytest.raises(error, match=f"(?s)^{builder}: " + message):
    # optax.masked resolves the mask at init already; the others at update.
    tx.update(_grads(), tx.init(params), params)


_GOOD_MASKS = {
  "full": {"layer": {"w": True, "b": False}, "emb": {"table": True}},
  "prefix": {"layer": {"w": True, "b": False}, "emb": True},
  "callable": lambda p: jax.tree.map(lambda x: x.ndim > 1, p),
  "numpy-bools": {"layer": {"w": np.bool_(True), "b": np.bool_(False)}, "emb": jnp.array(True)},
}
_DECAYED = {("layer", "w"): True, ("layer", "b"): False, ("emb", "table"): True}


def _leaf(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def _two_jitted_steps(tx, grads=None, params=None):
  params = _params() if params is None else params
  grads = _grads() if grads is None else grads
  state = tx.init(params)
  step = jax.jit(tx.update)
  _updates, state = step(grads, state, params)
  return step(grads, state, params)


@functools.cache
def _adamw_reference(decayed: bool):
  """Two jitted adamw steps with weight decay on every leaf, or on none."""
  return _two_jitted_steps(adamw_jax.adamw(0.1, weight_decay=0.5 if decayed else 0.0))


@functools.cache
def _scale_by_adam_reference(path):
  """Two jitted scale_by_adam steps on the single leaf at `path`."""
  return _two_jitted_steps(adamw_jax.scale_by_adam(), _leaf(_grads(), path), _leaf(_params(), path))


@pytest.mark.parametrize("mask", sorted(_GOOD_MASKS))
def test_adamw_mask_decays_only_selected_leaves(mask):
  # Compared as new parameters: an update may be computed as p_new - p or as
  # the step itself, and both land on the same p_new.
  params = _params()
  new_params = lambda updates: optax.apply_updates(params, updates)
  updates, state = _two_jitted_steps(adamw_jax.adamw(0.1, weight_decay=0.5, mask=_GOOD_MASKS[mask]))
  for path, decayed in _DECAYED.items():
    got = _leaf(new_params(updates), path)
    want = _leaf(new_params(_adamw_reference(decayed)[0]), path)
    other = _leaf(new_params(_adamw_reference(not decayed)[0]), path)
    np.testing.assert_array_equal(got, want, err_msg=str(path))
    assert np.any(np.asarray(got) != np.asarray(other)), path
  # All leaves get the Adam step: the moments do not depend on the mask.
  np.testing.assert_equal(
    jax.tree.map(np.asarray, state.mu), jax.tree.map(np.asarray, _adamw_reference(False)[1].mu)
  )


@pytest.mark.parametrize("mask", sorted(_GOOD_MASKS))
def test_add_decayed_weights_mask_passes_unselected_leaves_through(mask):
  params, grads = _params(), _grads()
  wd = 0.25
  tx = adamw_jax.add_decayed_weights(wd, mask=_GOOD_MASKS[mask])
  updates, state = tx.update(grads, tx.init(params), params)
  assert int(state.count) == 1
  for path, decayed in _DECAYED.items():
    u, g, p = (np.asarray(_leaf(t, path)) for t in (updates, grads, params))
    if decayed:
      np.testing.assert_allclose(u, g + wd * p.astype(np.float64), rtol=1e-6, atol=1e-7)
      assert np.any(u != g)
    else:
      np.testing.assert_array_equal(u, g)


@pytest.mark.parametrize("mask", sorted(_GOOD_MASKS))
def test_masked_applies_inner_to_selected_leaves_only(mask):
  grads = _grads()
  updates, _ = _two_jitted_steps(adamw_jax.masked(adamw_jax.scale_by_adam(), _GOOD_MASKS[mask]))
  for path, selected in _DECAYED.items():
    u, g = np.asarray(_leaf(updates, path)), np.asarray(_leaf(grads, path))
    if selected:
      np.testing.assert_array_equal(u, _scale_by_adam_reference(path)[0], err_msg=str(path))
      assert np.any(u != g)
    else:
      np.testing.assert_array_equal(u, g, err_msg=str(path))


def test_mask_errors_are_raised_under_jit_too():
  tx = adamw_jax.adamw(mask={"layer": {"w": True}, "emb": True})
  params = _params()
  with pytest.raises(
    ValueError, match=r"^adamw: the mask does not match the parameters at 'layer'"
  ):
    jax.jit(tx.update)(_grads(), tx.init(params), params)
