"""adamw_jax in place of optax: what optax's own tests and real programs found (issue 27).

Each case is a call that optax (``optax.inject_hyperparams``,
``optax.tree.map_params``, ``optax.masked``, ``optax.add_decayed_weights``)
answers and that adamw_jax answered differently: here it gives optax's answer,
or the untraced path's numbers, or an error that says how to write the call.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adamw_jax

# Hyperparameters exact in bfloat16, float32 and double: traced and untraced agree bit for bit.
EXACT = {"learning_rate": 0.5, "b1": 0.5, "b2": 0.75, "eps": 2.0**-20, "weight_decay": 0.25}


def _params(dtype=jnp.float32):
  return {"w": jnp.array([[1.0, -2.0], [0.5, 3.0]], dtype), "b": jnp.array([0.25, -1.5], dtype)}


def _grads(step: int, params):
  return jax.tree.map(lambda p: (jnp.cos(p.real * (step + 1) + 0.5) + 0.1).astype(p.dtype), params)


def _run(tx, params, steps: int = 3):
  state = tx.init(params)
  for i in range(steps):
    updates, state = jax.jit(tx.update)(_grads(i, params), state, params)
    params = optax.apply_updates(params, updates)
  return params, state


def _assert_bitwise(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# --------------------------------------------------------------------------
# optax.inject_hyperparams: traced betas of 0, complex and bfloat16 params
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
  ("betas", "amsgrad"),
  [
    ({"b1": 0.0}, False),
    ({"b2": 0.0}, True),
    ({"b1": 0.0, "b2": 0.0}, False),
    ({"b1": 2.0**-100, "b2": 2.0**-70}, True),
  ],
  ids=["b1=0", "b2=0-amsgrad", "both=0", "tiny-amsgrad"],
)
def test_injected_beta_of_zero_steps_as_the_untraced_path(betas, amsgrad):
  hp = {**EXACT, **betas}
  injected = optax.inject_hyperparams(adamw_jax.adamw, static_args=("amsgrad",))(
    **hp, amsgrad=amsgrad
  )
  got, _ = _run(injected, _params())
  want, _ = _run(adamw_jax.adamw(**hp, amsgrad=amsgrad), _params())
  assert all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(got))
  _assert_bitwise(got, want)


def test_injected_beta_of_zero_in_float64_steps_as_the_untraced_path():
  with jax.enable_x64(True):
    hp = {**EXACT, "b1": 0.0, "b2": 0.0}
    injected = optax.inject_hyperparams(adamw_jax.adamw)(**hp)
    got, _ = _run(injected, _params(jnp.float64))
    want, _ = _run(adamw_jax.adamw(**hp), _params(jnp.float64))
    _assert_bitwise(got, want)


def test_injected_hyperparameters_on_complex_params_are_their_real_parts():
  params = jax.tree.map(lambda p: (p + 0.5j * p[::-1]).astype(jnp.complex64), _params())
  complex_hp = optax.inject_hyperparams(adamw_jax.adamw)(**EXACT)
  got, state = _run(complex_hp, params, steps=2)
  assert state.hyperparams["learning_rate"].dtype == jnp.complex64  # optax's choice, kept
  _assert_bitwise(got, _run(adamw_jax.adamw(**EXACT), params, steps=2)[0])


def test_a_complex_hyperparameter_with_an_imaginary_part_is_refused():
  with pytest.raises(TypeError, match=r"learning_rate: expected a real number, got the complex"):
    adamw_jax.adamw(learning_rate=jnp.asarray(0.1 + 0.5j))


def test_injected_bfloat16_betas_rounded_to_one_are_refused_saying_how_to_inject():
  tx = optax.inject_hyperparams(adamw_jax.adamw)(learning_rate=0.1)
  with pytest.raises(
    ValueError,
    match=r"\(b2\): 1\.0 .*bfloat16 array: optax\.inject_hyperparams stores .*"
    r"hyperparam_dtype=jnp\.float32 .* static_args=\('b2',\)",
  ):
    tx.init(_params(jnp.bfloat16))


@pytest.mark.parametrize(
  "inject",
  [
    {"hyperparam_dtype": jnp.float32},
    {"static_args": ("b1", "b2", "eps", "moment_bits", "moment_block_size", "rounding_seed")},
  ],
  ids=["hyperparam_dtype", "static_args"],
)
def test_injected_on_bfloat16_params_the_documented_ways_step_as_the_untraced_path(inject):
  hp = {**EXACT, "b2": 0.999, "eps": 1e-8} if "static_args" in inject else EXACT
  injected = optax.inject_hyperparams(adamw_jax.adamw, **inject)(**hp)
  got, _ = _run(injected, _params(jnp.bfloat16))
  _assert_bitwise(got, _run(adamw_jax.adamw(**hp), _params(jnp.bfloat16))[0])


# --------------------------------------------------------------------------
# optax.tree.map_params, prefix masks, add_decayed_weights(None)
# --------------------------------------------------------------------------

MASK = {"w": True, "b": False}


@pytest.mark.parametrize(
  ("ours", "theirs"),
  [
    (lambda m: adamw_jax.adamw(mask=m), lambda m: optax.adamw(1e-3, mask=m)),
    (
      lambda m: adamw_jax.masked(optax.scale_by_adam(), m),
      lambda m: optax.masked(optax.scale_by_adam(), m),
    ),
    (
      lambda m: adamw_jax.add_decayed_weights(0.1, mask=m),
      lambda m: optax.add_decayed_weights(0.1, mask=m),
    ),
  ],
  ids=["adamw", "masked", "add_decayed_weights"],
)
@pytest.mark.parametrize("mask", [MASK, lambda p: MASK], ids=["pytree", "callable"])
def test_map_params_maps_the_moments_with_a_mask_as_optax(ours, theirs, mask):
  params = _params()
  tx = ours(mask)
  state = tx.init(params)
  mapped = optax.tree.map_params(tx, lambda p: p + 100.0, state)
  moments = [x for x in jax.tree.leaves(mapped) if x.ndim > 0]
  reference = theirs(mask)
  want = optax.tree.map_params(reference, lambda p: p + 100.0, reference.init(params))
  assert len(moments) == len([x for x in jax.tree.leaves(want) if x.ndim > 0])
  assert all(bool((x == 100.0).all()) for x in moments)


@pytest.mark.parametrize(
  "mask",
  [
    {"w": False, "b": True},
    {"w": {"a": True, "c": False}, "b": False},
    True,
    lambda p: {"w": False, "b": True},
  ],
  ids=["subtree-off", "nested", "root", "callable"],
)
def test_a_prefix_mask_gives_optax_masked_state_and_updates(mask):
  params = {"w": {"a": jnp.array([1.0, -2.0]), "c": jnp.ones(3)}, "b": jnp.array([0.5])}
  ours, theirs = (m(optax.scale_by_adam(), mask) for m in (adamw_jax.masked, optax.masked))
  state, want_state = ours.init(params), theirs.init(params)
  assert jax.tree.structure(state) == jax.tree.structure(want_state)
  updates, state = ours.update(params, state)
  want_updates, want_state = theirs.update(params, want_state)
  _assert_bitwise((updates, state), (want_updates, want_state))


@pytest.mark.parametrize(
  ("weight_decay", "count"), [(0.1, 0), (optax.linear_schedule(0.1, 0.0, 10), 1)]
)
def test_add_decayed_weights_of_none_updates_is_none_as_optax(weight_decay, count):
  tx = adamw_jax.add_decayed_weights(weight_decay)
  updates, state = tx.update(None, tx.init(_params()), _params())
  assert updates is None
  assert int(state.count) == count  # optax's: the count moves only for a schedule


def test_add_decayed_weights_of_none_updates_still_needs_the_params():
  tx = adamw_jax.add_decayed_weights(0.1)
  with pytest.raises(ValueError, match=r"weight decay needs the parameters"):
    tx.update(None, tx.init(_params()), None)


# --------------------------------------------------------------------------
# Positional calls that mean another thing in optax or torch
# --------------------------------------------------------------------------

TOO_MANY = r"takes at most 4 positional arguments \(learning_rate, b1, b2, eps\), got {}"
HOW = r".*as keywords, e\.g\. {}\(learning_rate=1e-3, b1=0\.9, b2=0\.999, eps=1e-8, weight_decay="


@pytest.mark.parametrize("name", ["adamw", "adam"])
@pytest.mark.parametrize(
  ("args", "kwargs", "match"),
  [
    # optax.adamw(lr, b1, b2, eps, eps_root): the 5th is eps_root there, weight_decay in torch.
    ((1e-3, 0.9, 0.999, 1e-8, 0.0), {}, TOO_MANY.format(5) + r".*optax\.{}'s positional" + HOW),
    # optax.adamw(lr, b1, b2, eps, eps_root, mu_dtype, weight_decay, mask)
    ((1e-3, 0.9, 0.999, 1e-8, 0.0, None, 1e-4, None), {}, TOO_MANY.format(8) + HOW),
    # torch.optim.AdamW(params, lr, betas, ...) without the params: betas lands in b1.
    ((1e-3, (0.9, 0.999), 1e-8, 1e-2), {}, r"{}: b1 got the pair \(0\.9, 0\.999\), torch's betas"),
    ((1e-3,), {"b1": [0.9, 0.99]}, r"b1 got the pair \[0\.9, 0\.99\].*write b1=0\.9, b2=0\.99"),
    # torch.optim.AdamW(params, lr): the params land in learning_rate.
    (({"w": np.ones(2)}, 1e-3), {}, r"{}: learning_rate got a dict.*takes them at init"),
    (([np.ones(2)], 1e-3), {}, r"learning_rate got a list.*\(learning_rate=1e-3, \.\.\.\)\.init"),
  ],
  ids=["optax-eps_root", "optax-8", "torch-betas", "betas-keyword", "torch-params", "params-list"],
)
def test_a_positional_call_meaning_else_in_optax_or_torch_says_how_to_write_it(
  name, args, kwargs, match
):
  with pytest.raises(TypeError, match=match.replace("{}", re.escape(name))):
    getattr(adamw_jax, name)(*args, **kwargs)


@pytest.mark.parametrize("name", ["adamw", "adam"])
def test_the_positions_shared_with_optax_and_keywords_mean_the_same(name):
  ours = getattr(adamw_jax, name)
  params = _params()
  positional = ours(0.5, 0.5, 0.75, 2.0**-20, weight_decay=0.25)
  keywords = ours(learning_rate=0.5, b1=0.5, b2=0.75, eps=2.0**-20, weight_decay=0.25)
  _assert_bitwise(_run(positional, params), _run(keywords, params))


def test_inject_hyperparams_sees_the_keyword_only_signature():
  tx = optax.inject_hyperparams(adamw_jax.adamw)(learning_rate=0.5, weight_decay=0.25)
  assert set(tx.init(_params()).hyperparams) >= {"learning_rate", "weight_decay", "eps_root"}
