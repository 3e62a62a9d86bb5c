"""Property tests (hypothesis): random trees, shapes, dtypes and hyperparameters.

For any of them: an update keeps the tree structure, shapes and dtypes; the
per-leaf and flat-buffer paths, with the native kernel and without
(``ADAMW_JAX_NATIVE=1`` / ``0``, read when the step is traced), give the same
bits; ``init`` and ``update`` are pure; and a run saved and restored midway
is bitwise the uninterrupted run. Examples are few and derandomized, so that
the suite stays fast and every run checks the same cases.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import adamw_jax
from adamw_jax import _env

DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16, jnp.complex64)
SETTINGS = {
  "deadline": None,
  "derandomize": True,
  "database": None,
  "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large],
}

shapes = st.lists(st.integers(0, 4), min_size=0, max_size=3).map(tuple)
leaves = st.tuples(shapes, st.sampled_from(DTYPES))
names = st.sampled_from(["bias", "kernel", "scale", "embedding", "w"])
specs = st.recursive(
  leaves,
  lambda inner: st.one_of(
    st.dictionaries(names, inner, min_size=1, max_size=3), st.lists(inner, min_size=1, max_size=2)
  ),
  max_leaves=5,
)


class Problem(NamedTuple):
  params: Any
  grads: list  # one gradient tree per step
  factory: str
  hyper: dict
  masked: bool


def _array(rng: np.random.Generator, shape: tuple, dtype) -> jax.Array:
  x = rng.normal(size=shape)
  if jnp.issubdtype(dtype, jnp.complexfloating):
    x = x + 1j * rng.normal(size=shape)
  return jnp.asarray(
    x.astype(np.complex64) if jnp.iscomplexobj(x) else x.astype(np.float32)
  ).astype(dtype)


def _tree(spec, rng):
  if isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[0], tuple):
    return _array(rng, *spec)
  if isinstance(spec, dict):
    return {k: _tree(v, rng) for k, v in spec.items()}
  return [_tree(v, rng) for v in spec]


@st.composite
def problems(draw, steps: int = 2) -> Problem:
  spec = draw(specs)
  seed = draw(st.integers(0, 2**16))
  rng = np.random.default_rng(seed)
  params = _tree(spec, rng)
  grads = [_tree(spec, rng) for _ in range(steps)]
  factory = draw(st.sampled_from(["adamw", "adam"]))
  hyper = {
    "learning_rate": draw(st.sampled_from([1e-3, 1e-2, 0.1])),
    "b1": draw(st.sampled_from([0.0, 0.9])),
    "b2": draw(st.sampled_from([0.99, 0.999])),
    "eps": draw(st.sampled_from([1e-8, 1e-6])),
    "weight_decay": draw(st.sampled_from([0.0, 1e-2, 0.1])),
    "amsgrad": draw(st.booleans()),
    "maximize": draw(st.booleans()),
  }
  if any(jnp.dtype(x.dtype) == jnp.float16 for x in jax.tree.leaves(params)):
    hyper["eps"] = 1e-6  # eps=1e-8 rounds to 0 in float16 (refused with a warning)
  return Problem(params, grads, factory, hyper, factory == "adamw" and draw(st.booleans()))


def _mask(params):
  return jax.tree.map(lambda x: x.ndim >= 2, params)


def _tx(problem: Problem) -> optax.GradientTransformation:
  factory = adamw_jax.adamw if problem.factory == "adamw" else adamw_jax.adam
  return factory(**problem.hyper, **({"mask": _mask} if problem.masked else {}))


@contextlib.contextmanager
def _native_env(value: str):
  old = os.environ.get(_env.NATIVE.name)
  os.environ[_env.NATIVE.name] = value
  try:
    yield
  finally:
    if old is None:
      del os.environ[_env.NATIVE.name]
    else:
      os.environ[_env.NATIVE.name] = old


def _run(tx, params, grads, state=None):
  """Updates applied for every gradient in `grads`: (params, state)."""
  state = tx.init(params) if state is None else state
  for g in grads:
    updates, state = tx.update(g, state, params)
    params = optax.apply_updates(params, updates)
  return params, state


def _host(tree):
  return jax.tree.map(lambda x: np.array(x), tree)


def _assert_bitwise(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape
    # bytes, so that NaN payloads and signed zeros count too
    assert x.tobytes() == y.tobytes()


@settings(max_examples=25, **SETTINGS)
@given(problems())
def test_update_keeps_structure_shapes_and_dtypes(problem):
  tx = _tx(problem)
  state = tx.init(problem.params)
  for step, g in enumerate(problem.grads, 1):
    updates, state = tx.update(g, state, problem.params)
    assert jax.tree.structure(updates) == jax.tree.structure(problem.params)
    for u, p, m, v in zip(
      *(jax.tree.leaves(t) for t in (updates, problem.params, state.mu, state.nu))
    ):
      assert u.shape == p.shape == m.shape == v.shape
      assert u.dtype == p.dtype == m.dtype == v.dtype
    assert (state.nu_max is not None) == problem.hyper["amsgrad"]
    assert int(state.count) == step


@settings(max_examples=20, **SETTINGS)
@given(problems())
def test_per_leaf_flat_native_and_pure_agree_bit_for_bit(problem):
  """New parameters and moments, per leaf and in flat buffers, with and without the native kernel."""
  results = {}
  for native in ("1", "0"):
    with _native_env(native):
      tx = _tx(problem)
      params, state = _run(tx, problem.params, problem.grads)
      results[f"per-leaf, native={native}"] = (params, state.mu, state.nu, state.nu_max)
      flat = adamw_jax.flatten(problem.params, mask=_mask if problem.masked else None)
      params, state = _run(tx, flat, [flat.pack(g) for g in problem.grads])
      view = lambda x: None if x is None else x.view()
      results[f"flat, native={native}"] = tuple(
        map(view, (params, state.mu, state.nu, state.nu_max))
      )
  want = results.pop("per-leaf, native=1")
  for _name, got in results.items():
    _assert_bitwise(got, want)


@settings(max_examples=20, **SETTINGS)
@given(problems())
def test_init_and_update_are_pure(problem):
  tx = _tx(problem)
  inputs = (problem.params, problem.grads[0])
  before = _host(inputs)
  state = tx.init(problem.params)
  _assert_bitwise(tx.init(problem.params), state)
  state_before = _host(state)
  first = tx.update(problem.grads[0], state, problem.params)
  second = tx.update(problem.grads[0], state, problem.params)
  _assert_bitwise(first, second)
  _assert_bitwise(jax.jit(tx.update)(problem.grads[0], state, problem.params), first)
  _assert_bitwise(_host(inputs), before)  # nothing given was changed
  _assert_bitwise(_host(state), state_before)


@settings(max_examples=10, **SETTINGS)
@given(problems(steps=4), st.integers(1, 3))
def test_resume_from_a_saved_state_equals_the_uninterrupted_run(problem, k):
  tx = _tx(problem)
  full = _run(tx, problem.params, problem.grads)
  params, state = _run(tx, problem.params, problem.grads[:k])
  with tempfile.TemporaryDirectory() as directory:
    adamw_jax.save_opt_state(directory + "/ckpt", state)
    restored = adamw_jax.restore_opt_state(directory + "/ckpt", tx.init(problem.params))
  _assert_bitwise(restored, state)
  _assert_bitwise(_run(tx, params, problem.grads[k:], restored), full)
