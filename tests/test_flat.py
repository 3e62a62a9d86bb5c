"""Flat buffers (adamw_jax.flatten / FlatParams): bitwise the per-leaf path, masks, sharding, Flax.

Every comparison runs the same jitted step (update + apply_updates) on the
model's tree and on its FlatParams and compares parameters and every state
tensor bit for bit.
"""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adamw_jax
from tests import docs_pages

# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------


def _is_flat(x) -> bool:
  return isinstance(x, adamw_jax.FlatParams)


def _as_tree(x):
  """`x` (params, updates or a state) with every FlatParams replaced by the model's tree."""
  return jax.tree.map(lambda v: v.view() if _is_flat(v) else v, x, is_leaf=_is_flat)


def _assert_bitwise(got, want):
  got_leaves, want_leaves = jax.tree.leaves(got), jax.tree.leaves(want)
  assert jax.tree.structure(got) == jax.tree.structure(want)
  paths = jax.tree_util.tree_flatten_with_path(want)[0]
  for path_leaf, a, b in zip(paths, got_leaves, want_leaves):
    a, b = np.asarray(a), np.asarray(b)
    assert (a.dtype, a.shape) == (b.dtype, b.shape), path_leaf[0]
    assert a.tobytes() == b.tobytes(), f"differs at {jax.tree_util.keystr(path_leaf[0])}"


def _params(dtypes=(jnp.float32,), seed=0):
  """A small model-like tree: per dtype a kernel, a bias and a LayerNorm scale."""
  rng = np.random.default_rng(seed)
  tree = {}
  for dtype in dtypes:
    name = jnp.dtype(dtype).name

    def draw(shape, dtype=dtype):
      x = rng.normal(size=shape)
      if jnp.issubdtype(dtype, jnp.complexfloating):
        x = x + 1j * rng.normal(size=shape)
      return jnp.asarray(x, dtype)

    tree[name] = {
      "dense": {"kernel": draw((5, 3)), "bias": draw((3,))},
      "ln": {"scale": draw((3,))},
    }
  return tree


def _grads(params, steps: int, seed=1):
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(steps):

    def draw(p):
      g = rng.normal(size=p.shape) * 0.1
      if jnp.issubdtype(p.dtype, jnp.complexfloating):
        g = g + 1j * rng.normal(size=p.shape) * 0.1
      return jnp.asarray(g, p.dtype)

    out.append(jax.tree.map(draw, params))
  return out


def _both_paths(tx, params, steps=3, flatten_mask=None):
  """(flat result as trees, per-leaf result): (params, state) after `steps` steps each.

  Both paths run in one jitted step (one compilation for the pair).
  """
  flat = adamw_jax.flatten(params, mask=flatten_mask)

  @jax.jit
  def step(runs):
    out = []
    for p, s, g in runs:
      u, s = tx.update(g, s, p)
      out.append((optax.apply_updates(p, u), s))
    return out

  runs = [(params, tx.init(params)), (flat, tx.init(flat))]
  for grads in _grads(params, steps):
    runs = step([(p, s, g) for (p, s), g in zip(runs, (grads, flat.pack(grads)))])
  (tree_params, tree_state), (flat_params, flat_state) = runs
  assert _is_flat(flat_params)
  assert any(_is_flat(x) for x in jax.tree.leaves(flat_state, is_leaf=_is_flat))
  return _as_tree((flat_params, flat_state)), (tree_params, tree_state)


# --------------------------------------------------------------------------
# Bitwise equal to the per-leaf path
# --------------------------------------------------------------------------


class Config(NamedTuple):
  name: str
  tx: Callable[[], optax.GradientTransformation]
  dtypes: tuple = (jnp.float32,)
  flatten_mask: Any | None = None
  x64: bool = False


def _schedule(count):
  return 1e-2 * 0.5 ** count.astype(jnp.float32)


_MIXED = (jnp.float32, jnp.bfloat16, jnp.complex64)

CONFIGS = [
  Config("defaults", lambda: adamw_jax.adamw()),
  Config(
    "amsgrad_maximize_schedules_mixed_dtypes",
    lambda: adamw_jax.adamw(
      _schedule,
      weight_decay=lambda c: 0.5 + 0.0 * c,
      amsgrad=True,
      maximize=True,
      mask=adamw_jax.decay_mask,
    ),
    dtypes=_MIXED,
    flatten_mask=adamw_jax.decay_mask,
  ),
  Config(
    "adam_l2_mask_moment_dtypes",
    lambda: adamw_jax.adam(
      1e-2, weight_decay=0.1, mask=adamw_jax.decay_mask, mu_dtype=jnp.bfloat16
    ),
    dtypes=_MIXED,
    flatten_mask=adamw_jax.decay_mask,
  ),
  Config(
    "chain_with_masked_decay",
    lambda: optax.chain(
      adamw_jax.scale_by_adam(eps_root=1e-12),
      adamw_jax.add_decayed_weights(0.1, mask=adamw_jax.decay_mask),
      optax.scale_by_learning_rate(1e-2),
    ),
    flatten_mask=adamw_jax.decay_mask,
  ),
  Config(
    "float64_mixed_x64",
    lambda: adamw_jax.adamw(1e-2, mask=adamw_jax.decay_mask),
    dtypes=(jnp.float64, jnp.float32, jnp.bfloat16),
    flatten_mask=adamw_jax.decay_mask,
    x64=True,
  ),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.name)
def test_flat_is_bitwise_the_per_leaf_path(config):
  with jax.enable_x64(config.x64):
    params = _params(config.dtypes)
    got, want = _both_paths(config.tx(), params, flatten_mask=config.flatten_mask)
    _assert_bitwise(got, want)


def test_one_buffer_per_dtype_and_decay_group():
  params = _params(_MIXED)
  flat = adamw_jax.flatten(params)
  assert flat.layout.names == ("bfloat16", "complex64", "float32")  # first seen first
  assert [b.shape for b in flat.buffers] == [(21,)] * 3
  grouped = adamw_jax.flatten(params, mask=adamw_jax.decay_mask)
  names = [str(k[0].key) for k, _ in jax.tree_util.tree_flatten_with_path(grouped)[0]]
  assert names == [
    "bfloat16/not_decayed",
    "bfloat16/decayed",
    "complex64/not_decayed",
    "complex64/decayed",
    "float32/not_decayed",
    "float32/decayed",
  ]
  assert [b.shape for b in grouped.buffers] == [(6,), (15,)] * 3
  _assert_bitwise(grouped.view(), params)


# --------------------------------------------------------------------------
# Masks on FlatParams
# --------------------------------------------------------------------------


def test_mask_splitting_a_buffer_raises_and_names_the_fix():
  params = _params()
  flat = adamw_jax.flatten(params)  # no mask: kernels and biases share a buffer
  tx = adamw_jax.adamw(mask=adamw_jax.decay_mask)
  with pytest.raises(
    ValueError,
    match=r"adamw: the mask decays some but not all of the leaves "
    r"packed into the flat buffer 'float32' \(e\.g\. 'float32/dense/kernel' is "
    r"decayed, 'float32/dense/bias' is not\); flatten the parameters with the "
    r"same mask, adamw_jax\.flatten\(params, mask=mask\)",
  ):
    tx.update(flat, tx.init(flat), flat)
  with pytest.raises(ValueError, match="add_decayed_weights: the mask decays some but not all"):
    adamw_jax.add_decayed_weights(0.1, mask=adamw_jax.decay_mask).update(flat, None, flat)


def test_mask_uniform_per_buffer_needs_no_flatten_mask():
  params = _params((jnp.float32, jnp.bfloat16))
  flat = adamw_jax.flatten(params)
  prefix = {"float32": True, "bfloat16": False}  # a prefix of the model's tree

  def by_dtype(p):
    return {
      "float32": jax.tree.map(lambda _: True, p["float32"]),
      "bfloat16": jax.tree.map(lambda x: x.ndim > 5, p["bfloat16"]),
    }

  for mask in (prefix, by_dtype):
    resolved = flat.resolve_mask(mask, what="test")
    assert _is_flat(resolved) and resolved.buffers == (False, True)  # bfloat16, float32
  got, want = _both_paths(adamw_jax.adamw(1e-2, weight_decay=0.5, mask=by_dtype), params)
  _assert_bitwise(got, want)


@pytest.mark.parametrize("wrapper", [adamw_jax.masked, optax.masked], ids=["adamw_jax", "optax"])
def test_masked_wrappers_on_flat_params(wrapper):
  params = _params()
  flat = adamw_jax.flatten(params, mask=adamw_jax.decay_mask)
  # decay_mask itself decides on the model's tree and answers per buffer, so
  # even optax's own masked (which calls it on the FlatParams) is right.
  assert adamw_jax.decay_mask(flat).buffers == (False, True)  # bias+scale, kernel
  tx = wrapper(optax.add_decayed_weights(0.25), adamw_jax.decay_mask)
  updates = jax.tree.map(jnp.ones_like, params)
  want, _ = tx.update(updates, tx.init(params), params)
  got, _ = tx.update(flat.pack(updates), tx.init(flat), flat)
  _assert_bitwise(got.view(), want)


# --------------------------------------------------------------------------
# view(): the gradient comes out flat, as one concatenation
# --------------------------------------------------------------------------


def _loss(tree):
  return sum(
    jnp.sum(jnp.sin(x.astype(jnp.float32)) * jnp.arange(x.size).reshape(x.shape))
    for x in jax.tree.leaves(tree)
  )


def test_gradient_through_view_is_flat_and_equals_the_packed_tree_gradient():
  params = _params((jnp.float32, jnp.bfloat16))
  flat = adamw_jax.flatten(params)
  got = jax.jit(jax.grad(lambda f: _loss(f.view())))(flat)
  want = jax.jit(jax.grad(_loss))(params)
  assert _is_flat(got) and got.layout == flat.layout
  _assert_bitwise(got, flat.pack(want))


def test_backward_of_view_writes_each_leaf_gradient_in_place():
  """Not the default transpose of slices (one zero-padded copy per leaf, summed)."""
  params = {f"layer{i}": {"w": jnp.ones((3, i + 1)), "b": jnp.ones((i + 1,))} for i in range(10)}
  flat = adamw_jax.flatten(params)
  compiled = jax.jit(jax.grad(lambda f: _loss(f.view()))).lower(flat).compile()
  hlo = compiled.as_text()
  assert hlo.count(" pad(") <= 1 and "concatenate(" not in hlo  # the zeros, once
  assert hlo.count("dynamic-update-slice(") >= 19
  stats = compiled.memory_analysis()
  assert stats.temp_size_in_bytes < stats.output_size_in_bytes / 4  # no gradient copies


def test_update_program_does_not_grow_with_the_number_of_leaves():
  """A deterministic stand-in for compile time: one leaf or 1,000, the same program."""
  tx = adamw_jax.adamw(mask=adamw_jax.decay_mask)

  def program(params):
    flat = adamw_jax.flatten(params, mask=adamw_jax.decay_mask)
    state = tx.init(flat)
    text = jax.jit(tx.update).lower(flat, state, flat).as_text()
    return text.count("\n"), len(flat.buffers)

  many = {f"l{i}": {"kernel": jnp.ones((2, 3)), "bias": jnp.ones(3)} for i in range(1000)}
  few = {"l": {"kernel": jnp.ones((2000, 3)), "bias": jnp.ones(3000)}}
  assert program(many) == program(few)


# --------------------------------------------------------------------------
# Memory: the donated step keeps no full-size temporaries
# --------------------------------------------------------------------------


def test_donated_step_has_no_full_size_temporaries():
  params = {f"l{i}": jnp.ones((1000,)) for i in range(256)}
  flat = adamw_jax.flatten(params)
  tx = adamw_jax.adamw(amsgrad=True)
  state = tx.init(flat)

  def step(p, s, g):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  stats = jax.jit(step, donate_argnums=(0, 1)).lower(flat, state, flat).compile().memory_analysis()
  param_bytes = 4 * 256 * 1000
  assert stats.temp_size_in_bytes < 0.01 * param_bytes
  assert stats.alias_size_in_bytes == 4 * param_bytes + 4  # p, m, v, v_max and the count in place


# --------------------------------------------------------------------------
# Pytree behaviour and errors
# --------------------------------------------------------------------------


def test_flat_params_is_a_pytree_of_its_buffers():
  params = _params((jnp.float32, jnp.bfloat16))
  flat = adamw_jax.flatten(params)
  doubled = jax.tree.map(lambda x: 2 * x, flat)
  assert _is_flat(doubled) and doubled.layout == flat.layout
  assert len(jax.tree.leaves(flat)) == 2
  _assert_bitwise(doubled.view(), jax.tree.map(lambda x: 2 * x, params))
  # Equal layouts from separate flatten calls: one jit cache entry.
  again = adamw_jax.flatten(params)
  assert jax.tree.structure(again) == jax.tree.structure(flat)
  assert hash(again.layout) == hash(flat.layout)
  traced = jax.jit(adamw_jax.flatten)(params)  # packed in the program, not on the host
  assert traced.layout == flat.layout
  _assert_bitwise(traced, flat)
  all_f32 = adamw_jax.flatten(jax.tree.map(lambda x: x.astype(jnp.float32), params))
  assert jax.tree.structure(all_f32) != jax.tree.structure(flat)


def test_flatten_of_empty_tree_and_zero_size_leaves():
  empty = adamw_jax.flatten({})
  assert empty.buffers == () and empty.view() == {}
  params = {"a": jnp.ones((0, 3)), "b": jnp.ones((2,))}
  got, want = _both_paths(adamw_jax.adamw(1e-2), params)
  _assert_bitwise(got, want)


_BAD_PACK = [
  (
    {"float32": {"dense": {"kernel": jnp.ones((5, 3))}}},
    ValueError,
    r"FlatParams.pack: the tree and the flattened parameters differ in tree structure at "
    r"'float32': the tree has dict with keys \['dense'\], the flattened parameters has dict "
    r"with keys \['dense', 'ln'\]",
  ),
  (
    {
      "float32": {
        "dense": {"kernel": jnp.ones((3, 5)), "bias": jnp.ones(3)},
        "ln": {"scale": jnp.ones(3)},
      }
    },
    ValueError,
    r"the leaf at 'float32/dense/kernel' has shape \(3, 5\), the flattened parameter "
    r"has shape \(5, 3\)",
  ),
  (
    {
      "float32": {
        "dense": {"kernel": jnp.ones((5, 3)), "bias": jnp.ones(3, jnp.bfloat16)},
        "ln": {"scale": jnp.ones(3)},
      }
    },
    TypeError,
    r"the leaf at 'float32/dense/bias' has dtype bfloat16, the flattened parameter has "
    r"dtype float32; cast it first",
  ),
]


@pytest.mark.parametrize("tree, error, match", _BAD_PACK, ids=["structure", "shape", "dtype"])
def test_pack_rejects_trees_of_another_layout(tree, error, match):
  flat = adamw_jax.flatten(_params())
  with pytest.raises(error, match=match):
    flat.pack(tree)


def test_flatten_rejects_integer_leaves():
  with pytest.raises(TypeError, match=r"flatten: the parameter at 'step' has dtype int32"):
    adamw_jax.flatten({"w": jnp.ones(3), "step": jnp.zeros((), jnp.int32)})


# --------------------------------------------------------------------------
# Flax: training through flat.view() is the per-leaf training, bit for bit
# --------------------------------------------------------------------------


class _Mlp(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.LayerNorm()(nn.gelu(nn.Dense(16)(x)))
    return nn.Dense(2)(x)


def test_flax_linen_training_through_view_is_bitwise_the_tree_path():
  model = _Mlp()
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(32, 4)), jnp.float32)
  y = jnp.asarray(rng.normal(size=(32, 2)), jnp.float32)
  params = model.init(jax.random.key(0), x)["params"]
  tx = adamw_jax.adamw(1e-2, weight_decay=0.1, mask=adamw_jax.decay_mask)

  def loss(p):
    return jnp.mean((model.apply({"params": p}, x) - y) ** 2)

  @jax.jit
  def steps(p, s, f, fs):  # both paths in one compilation
    u, s = tx.update(jax.grad(loss)(p), s, p)
    fu, fs = tx.update(jax.grad(lambda f: loss(f.view()))(f), fs, f)
    return optax.apply_updates(p, u), s, optax.apply_updates(f, fu), fs

  flat = adamw_jax.flatten(params, mask=adamw_jax.decay_mask)
  p, s, f, fs = params, tx.init(params), flat, tx.init(flat)
  for _ in range(4):
    p, s, f, fs = steps(p, s, f, fs)
  assert _is_flat(f)
  _assert_bitwise(_as_tree((f, fs)), (p, s))
  assert float(loss(f.view())) < float(loss(params))


# --------------------------------------------------------------------------
# Sharding: 8 virtual CPU devices, in a subprocess
# --------------------------------------------------------------------------

_SHARDED_CHILD = r"""
import os
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
import json
import jax, jax.numpy as jnp, numpy as np, optax
from jax.sharding import NamedSharding, PartitionSpec as P
import adamw_jax

mesh = jax.make_mesh((8,), ("x",))
sharded, replicated = NamedSharding(mesh, P(None, "x")), NamedSharding(mesh, P())
rng = np.random.default_rng(0)
params = {
    "dense": {"kernel": jax.device_put(jnp.asarray(rng.normal(size=(4, 16)), jnp.float32), sharded),
              "bias": jax.device_put(jnp.asarray(rng.normal(size=16), jnp.float32), replicated)},
    "head": {"kernel": jax.device_put(jnp.asarray(rng.normal(size=(16, 3)), jnp.float32),
                                      replicated),
             "bias": jax.device_put(jnp.asarray(rng.normal(size=3), jnp.float32), replicated)},
}
x = jax.device_put(jnp.asarray(rng.normal(size=(8, 4)), jnp.float32), replicated)

def loss(p):
  return jnp.sum(jnp.tanh(x @ p["dense"]["kernel"] + p["dense"]["bias"]) @ p["head"]["kernel"]
                 + p["head"]["bias"])

tx = adamw_jax.adamw(1e-2, weight_decay=0.1, mask=adamw_jax.decay_mask)

@jax.jit
def tree_step(p, s):
  u, s = tx.update(jax.grad(loss)(p), s, p)
  return optax.apply_updates(p, u), s

@jax.jit
def flat_step(f, s):
  u, s = tx.update(jax.grad(lambda f: loss(f.view()))(f), s, f)
  return optax.apply_updates(f, u), s

flat = adamw_jax.flatten(params, mask=adamw_jax.decay_mask)
report = {"names": list(flat.layout.names),
          "shapes": [list(b.shape) for b in flat.buffers]}
p, s, f, fs = params, tx.init(params), flat, tx.init(flat)
for _ in range(3):
  p, s = tree_step(p, s)
  f, fs = flat_step(f, fs)
got = jax.tree.leaves((f.view(), fs.mu.view(), fs.nu.view()))
want = jax.tree.leaves((p, s.mu, s.nu))
report["equal"] = all(np.asarray(a).tobytes() == np.asarray(b).tobytes() for a, b in zip(got, want))
report["kernel_sharding_kept"] = all(
    t.buffers[1].sharding.is_equivalent_to(sharded, 2) for t in (f, fs.mu, fs.nu))
report["packed_replicated"] = all(
    b.sharding.is_fully_replicated and len(b.sharding.device_set) == 8
    for t in (f, fs.mu, fs.nu) for b in (t.buffers[0], t.buffers[2]))
print(json.dumps(report))
"""


def test_sharded_leaves_stay_whole_and_train_like_the_per_leaf_path():
  proc = subprocess.run(
    [sys.executable, "-c", _SHARDED_CHILD], capture_output=True, text=True, timeout=300
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads(proc.stdout.strip().splitlines()[-1])
  # The sharded kernel is a child of its own with its 2-D shape; the replicated
  # leaves are packed by decay group.
  assert report["names"] == ["float32/not_decayed", "dense/kernel", "float32/decayed"]
  assert report["shapes"] == [[19], [4, 16], [48]]
  assert report["equal"]
  assert report["kernel_sharding_kept"]
  assert report["packed_replicated"]


# --------------------------------------------------------------------------
# The docs' example (docs/flat.md)
# --------------------------------------------------------------------------


def test_docs_flat_buffers_example_runs_as_written():
  blocks = docs_pages.section(
    docs_pages.page("flat.md"), "Flat buffers: the fast path for many small leaves", lang=None
  )
  code = next(b for b in blocks if b.lang == "python")
  expected = next(b for b in blocks if b.lang == "text")
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    exec(compile(code.code, code.where, "exec"), {})
  assert out.getvalue() == expected.code
