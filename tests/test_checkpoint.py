"""save_opt_state / restore_opt_state: exact resume with orbax, and clear refusals.

A run saved at step k and resumed must be bitwise the uninterrupted run (plain
adamw, param_groups with AMSGrad in one group, and an ``nnx.Optimizer``); a
checkpoint of another transform, tree, shape, dtype or config must fail with
an error naming what differs; a damaged one (real files truncated, corrupted,
deleted or rewritten), one of another format, or one never finished must fail
naming the directory, never restoring part of it or other numbers; arrays are
restored into the target's shardings.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import core as flax_core
from flax import nnx

import adamw_jax
from adamw_jax import _ckpt_describe, _ckpt_sums
from tests import checkpoint_files

# After a failed restore orbax's reader threads complain, when collected, that their event
# loop is closed (during whichever test runs then).
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

K, STEPS = 5, 10
PARAMS = {
  "dense": {"kernel": jnp.linspace(-1, 1, 12).reshape(3, 4), "bias": jnp.zeros(4)},
  "ln": {"scale": jnp.ones(4)},
}


def _grads(t):
  return jax.tree.map(lambda p: jnp.cos(p * (t + 1) + 0.5) * (1 + 0.1 * t), PARAMS)


def _grouped(amsgrad=True, **shared):
  return adamw_jax.param_groups(
    {
      "decay": (r"kernel$", {"weight_decay": 0.1}),
      "no_decay": ((r"bias$", r"^ln/"), {"weight_decay": 0.0, "amsgrad": amsgrad}),
    },
    learning_rate=1e-2,
    **shared,
  )


TRANSFORMS = {
  "adamw": lambda: adamw_jax.adamw(1e-2, weight_decay=0.1),
  "param_groups with amsgrad": _grouped,
  "chain with clipping": lambda: optax.chain(
    optax.clip_by_global_norm(1.0), adamw_jax.adamw(1e-2, amsgrad=True)
  ),
}


def _stepper(tx):
  """Runs `tx` on the gradients of steps `steps` (numbers, or the gradients), one compiled step."""

  @jax.jit
  def step(p, s, g):
    updates, s = tx.update(g, s, p)
    return optax.apply_updates(p, updates), s

  def run(params, state, steps):
    for t in steps:
      params, state = step(params, state, _grads(t) if isinstance(t, int) else t)
    return params, state

  return run


def _assert_bitwise(a, b):
  assert checkpoint_files.bitwise_equal(a, b)


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


def test_typed_prng_keys_round_trip(tmp_path):
  """optax.add_noise keeps a typed key (jax.random.key) in its state: saved with its
  implementation, restored bit for bit into a state or its shapes."""
  tx = optax.chain(
    optax.add_noise(0.01, 0.55, key=jax.random.key(3, impl="rbg")), adamw_jax.adamw(1e-2)
  )
  state = tx.init(PARAMS)
  state = (state[0]._replace(rng_key=jax.random.split(state[0].rng_key)[1]), state[1])
  adamw_jax.save_opt_state(tmp_path / "c", state)
  for target in (tx.init(PARAMS), jax.eval_shape(tx.init, PARAMS)):
    restored = adamw_jax.restore_opt_state(tmp_path / "c", target)
    assert jax.random.key_impl(restored[0].rng_key) == jax.random.key_impl(state[0].rng_key)
    _assert_bitwise(restored, state)
  other = optax.chain(optax.add_noise(0.01, 0.55, key=jax.random.key(3)), adamw_jax.adamw(1e-2))
  with pytest.raises(ValueError, match=r"different dtype at '0/rng_key': the checkpoint has "):
    adamw_jax.restore_opt_state(tmp_path / "c", other.init(PARAMS))


def test_zero_size_and_unusual_leaves_resume_bitwise(tmp_path):
  """Zero-size leaves (which orbax refuses to store), scalars, bfloat16, float16 and complex64."""
  params = {
    "empty": jnp.ones((0, 3)),
    "bf16": jnp.linspace(-1, 1, 4, dtype=jnp.bfloat16),
    "half": jnp.float16(0.5),
    "z": jnp.ones(2, jnp.complex64) * (1 + 2j),
  }
  tx = adamw_jax.adamw(1e-2, eps=1e-6, amsgrad=True)
  run = _stepper(tx)
  grads = lambda t: jax.tree.map(lambda p: p * (t + 1) / 3, params)
  full = run(params, tx.init(params), [grads(t) for t in range(4)])
  mid = run(params, tx.init(params), [grads(t) for t in range(2)])
  adamw_jax.save_opt_state(tmp_path / "c", mid[1])
  restored = adamw_jax.restore_opt_state(tmp_path / "c", tx.init(params))
  _assert_bitwise(restored, mid[1])
  _assert_bitwise(run(mid[0], restored, [grads(t) for t in range(2, 4)]), full)


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
  return adamw_jax.param_groups(
    {"decay": (r"kernel$", {"weight_decay": 0.1})},
    rest={"weight_decay": 0.0, "amsgrad": True},
    learning_rate=1e-2,
  )


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
  (
    "AMSGrad off",
    lambda: _grouped(amsgrad=False).init(PARAMS),
    _WHERE + r"different tree structure \(AMSGrad: the checkpoint has "
    r"'inner_states/no_decay/inner_state/nu_max', the target has it None\):\n"
    r"  only in the checkpoint: 'inner_states/no_decay/inner_state/nu_max/dense/bias' \(float32\[4\]\)\n",
  ),
  (
    "other groups",
    lambda: adamw_jax.param_groups(
      {"decay": (r"kernel$", {}), "norm": (r"^ln/", {}), "bias": (r"bias$", {})}
    ).init(PARAMS),
    _WHERE
    + r"different tree structure \(the checkpoint has param groups \['decay', 'no_decay'\], the "
    r"target param groups \['bias', 'decay', 'norm'\]\):\n",
  ),
  (
    "no groups",
    lambda: adamw_jax.adamw(amsgrad=True).init(PARAMS),
    _WHERE + r"different tree structure \(the checkpoint has param groups \['decay', 'no_decay'\], "
    r"the target no param groups\):\n  only in the checkpoint: 'inner_states/decay/inner_state/count'",
  ),
  ("optax.adamw", lambda: optax.adamw(1e-2).init(PARAMS), _WHERE + r"different tree structure"),
  (
    "another tree",
    lambda: _grouped().init(_BIGGER),
    _WHERE + r"different tree structure:\n  only in the target: "
    r"'inner_states/decay/inner_state/mu/head/kernel' \(float32\[4, 2\]\)\n",
  ),
  (
    "shape",
    lambda: _grouped().init({**PARAMS, "ln": {"scale": jnp.ones(5)}}),
    _WHERE + r"different shape at 'inner_states/no_decay/inner_state/mu/ln/scale': the checkpoint "
    r"has float32\[4\], the target float32\[5\]\.$",
  ),
  (
    "dtype",
    lambda: _grouped(mu_dtype=jnp.bfloat16).init(PARAMS),
    _WHERE + r"different dtype at 'inner_states/decay/inner_state/mu/dense/kernel': the checkpoint "
    r"has float32\[3, 4\], the target bfloat16\[3, 4\]\.$",
  ),
  (
    "node types",
    lambda: _grouped().init(flax_core.freeze(PARAMS)),
    _WHERE + r"same leaves, different pytree node types:\n  checkpoint: .*\n  target: .*FrozenDict",
  ),
]


@pytest.mark.parametrize(
  "make, message", [m[1:] for m in MISMATCHES], ids=[m[0] for m in MISMATCHES]
)
def test_mismatch_is_refused(saved, make, message):
  with pytest.raises(ValueError, match=message):
    adamw_jax.restore_opt_state(saved, make())


@pytest.mark.parametrize(
  "config, message",
  [
    (
      {"learning_rate": 1e-3, "betas": (0.9, 0.999)},
      r"^restore_opt_state: the checkpoint at '.*' was saved with another config: 'learning_rate' is "
      r"0\.01 in the checkpoint and 0\.001 here\.$",
    ),
    (
      {"learning_rate": 1e-2, "betas": (0.9, 0.999), "amsgrad": True},
      r"another config: 'amsgrad' is '<missing>' in the checkpoint and True here\.$",
    ),
  ],
)
def test_config_mismatch_is_refused(saved, config, message):
  with pytest.raises(ValueError, match=message):
    adamw_jax.restore_opt_state(saved, _grouped().init(PARAMS), config=config)


def test_config_given_but_none_saved(tmp_path):
  state = adamw_jax.adamw().init(PARAMS)
  adamw_jax.save_opt_state(tmp_path / "c", state)
  adamw_jax.restore_opt_state(tmp_path / "c", state)  # no config on either side: fine
  with pytest.raises(
    ValueError,
    match=r"saved with another config: it has none, and "
    r"config=\{'lr': 0\.1\} was given\.$",
  ):
    adamw_jax.restore_opt_state(tmp_path / "c", state, config={"lr": 0.1})


@pytest.fixture(scope="module")
def saved_adamw(tmp_path_factory):
  """A checkpoint of adamw_jax.adamw's state (no groups, AMSGrad off)."""
  path = tmp_path_factory.mktemp("ckpt") / "adamw"
  adamw_jax.save_opt_state(path, adamw_jax.adamw(1e-2).init(PARAMS))
  return path


_OPTAX_TYPES = r"\['builtins\.tuple', 'optax\._src\.transform\.ScaleByAdamState', "

OTHER_TRANSFORMS = [
  (
    "optax.adamw",
    lambda: optax.adamw(1e-2).init(PARAMS),
    _WHERE + r"different tree structure \(the state of another transform: node types only in the "
    r"checkpoint: \['adamw_jax\._core\.ScaleByAdamState'\], only in the target: " + _OPTAX_TYPES,
  ),
  (
    "inside a chain",
    lambda: optax.chain(optax.clip(1.0), adamw_jax.adamw(1e-2)).init(PARAMS),
    _WHERE + r"different tree structure \(the target holds a state like the checkpoint's under "
    r"'1/', inside a chain or inject_hyperparams: restore into that part of the target, or "
    r"save the whole state\):\n",
  ),
  (
    "inside inject_hyperparams",
    lambda: optax.inject_hyperparams(adamw_jax.adamw)(learning_rate=1e-2).init(PARAMS),
    _WHERE + r"different tree structure \(the target holds a state like the checkpoint's under "
    r"'inner_state/', ",
  ),
]


@pytest.mark.parametrize(
  "make, message", [m[1:] for m in OTHER_TRANSFORMS], ids=[m[0] for m in OTHER_TRANSFORMS]
)
def test_another_transform_is_named(saved_adamw, make, message):
  """Not an AMSGrad hint (there is no AMSGrad difference): the transform or where the state is."""
  with pytest.raises(ValueError, match=message):
    adamw_jax.restore_opt_state(saved_adamw, make())


def _flat(**shapes):
  return adamw_jax.flatten({k: jnp.ones(n) for k, n in shapes.items()})


def test_flat_params_resume_bitwise_and_other_layouts_are_refused(tmp_path):
  """A FlatParams state restores into its own layout only; the error names the first leaf."""
  tx = adamw_jax.adamw(1e-2)
  params = _flat(bias=3, kernel=5)
  state = tx.update(params, tx.init(params), params)[1]
  adamw_jax.save_opt_state(tmp_path / "flat", state)
  _assert_bitwise(adamw_jax.restore_opt_state(tmp_path / "flat", tx.init(params)), state)
  where = _WHERE + r"the FlatParams at 'mu' packs another model tree: "
  for other, message in [
    (
      _flat(bias=5, kernel=3),
      r"leaf 'bias' is in buffer 'float32' at offset 0, shape \[3\] in the checkpoint and in "
      r"buffer 'float32' at offset 0, shape \[5\] in the target\.$",
    ),
    (_flat(zbias=3, kernel=5), r"leaf 'bias' is only in the checkpoint's\.$"),
  ]:
    assert jax.tree.structure(tx.init(other)) != jax.tree.structure(state)  # the layouts differ
    assert str(jax.tree.structure(tx.init(other))) == str(jax.tree.structure(state))  # not in text
    with pytest.raises(ValueError, match=where + message):
      adamw_jax.restore_opt_state(tmp_path / "flat", tx.init(other))


_USER_FILES = {"notes.txt": "mine"}

BAD_SAVES = [
  (
    "an empty path",
    lambda p: "",
    {},
    ValueError,
    r"the directory must be a non-empty path, not ''",
  ),
  (
    "exists, no force",
    lambda p: p / "ckpt",
    {},
    FileExistsError,
    r"'.*ckpt' already exists; give force=True to replace the checkpoint there\.$",
  ),
  (
    "force over a folder of user files",
    lambda p: p / "user",
    {"force": True},
    FileExistsError,
    r"'.*user' is not an adamw_jax checkpoint \(it holds \['notes\.txt'\]\); force=True replaces "
    r"only a checkpoint\. Nothing was written or deleted\.$",
  ),
  (
    "config with NaN",
    lambda p: p / "new",
    {"config": {"lr": float("nan")}},
    ValueError,
    r"config\['lr'\] is nan, which JSON cannot hold and which never equals itself",
  ),
  (
    "config with a jnp scalar",
    lambda p: p / "new",
    {"config": {"betas": [0.9, jnp.float32(0.999)]}},
    TypeError,
    r"config\['betas'\]\[1\] is a jax\.Array \(float32\[\]: convert it, e\.g\. float\(x\) or "
    r"x\.tolist\(\)\); a config holds JSON values",
  ),
  (
    "config not a dict",
    lambda p: p / "new",
    {"config": [("lr", 0.1)]},
    TypeError,
    r"config must be a dict of JSON values, not list\.$",
  ),
  (
    "config key not a string",
    lambda p: p / "new",
    {"config": {1: 0.1}},
    TypeError,
    r"config has the key 1: JSON keys are strings\.$",
  ),
]


@pytest.mark.parametrize(
  "where, kwargs, error, message", [b[1:] for b in BAD_SAVES], ids=[b[0] for b in BAD_SAVES]
)
def test_bad_save_is_refused_and_touches_nothing(tmp_path, where, kwargs, error, message):
  state = adamw_jax.adamw().init(PARAMS)
  adamw_jax.save_opt_state(tmp_path / "ckpt", state)
  (tmp_path / "user").mkdir()
  (tmp_path / "user" / "notes.txt").write_text("mine")
  files = lambda: sorted(
    str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if not p.name.endswith("-lock")
  )
  before = files()
  with pytest.raises(error, match="^save_opt_state: " + message):
    adamw_jax.save_opt_state(where(tmp_path), state, **kwargs)
  assert files() == before  # a lock file beside the directory aside
  assert (tmp_path / "user" / "notes.txt").read_text() == "mine"


def test_a_config_that_json_cannot_hold_is_refused_on_restore_too(saved):
  with pytest.raises(TypeError, match=r"^restore_opt_state: config\['lr'\] is a jax\.Array"):
    adamw_jax.restore_opt_state(saved, _grouped().init(PARAMS), config={"lr": jnp.ones(2)})


def test_interrupted_between_the_renames_the_previous_restores(tmp_path):
  """The state a save killed between its two renames leaves: the previous checkpoint restores
  (with a warning) and the next save puts it back first."""
  state = adamw_jax.adamw().init(PARAMS)
  adamw_jax.save_opt_state(tmp_path / "ckpt", state)
  (tmp_path / "ckpt").rename(tmp_path / "ckpt.adamw_jax-old")
  with pytest.warns(UserWarning, match=r"'.*ckpt' is missing and 'ckpt\.adamw_jax-old' is there"):
    _assert_bitwise(adamw_jax.restore_opt_state(tmp_path / "ckpt", state), state)
  with pytest.raises(FileExistsError, match="already exists"):  # put back, so it exists
    adamw_jax.save_opt_state(tmp_path / "ckpt", state)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "ckpt.adamw_jax-lock"]


def test_checkpoint_manager_keeps_the_last_and_checks_them(tmp_path):
  """orbax's CheckpointManager with our item: the last 2 steps kept, restored bitwise, checked."""
  tx = _grouped()
  run = _stepper(tx)
  states = {}
  options = ocp.CheckpointManagerOptions(max_to_keep=2)
  with ocp.CheckpointManager(tmp_path / "steps", options=options) as manager:
    params, state = PARAMS, tx.init(PARAMS)
    for step in range(4):
      params, state = run(params, state, [step])
      states[step] = state
      args = adamw_jax.opt_state_save_args(state, config={"lr": 0.01})
      manager.save(step, args=ocp.args.Composite(opt_state=args))
    manager.wait_until_finished()
    assert manager.all_steps() == [2, 3]
    restore = lambda step, target, **kw: manager.restore(
      step, args=ocp.args.Composite(opt_state=adamw_jax.opt_state_restore_args(target, **kw))
    )["opt_state"]
    for step in (2, 3):
      _assert_bitwise(restore(step, tx.init(PARAMS), config={"lr": 0.01}), states[step])
    with pytest.raises(ValueError, match=r"^adamw_jax\.opt_state_restore_args: the checkpoint at "):
      restore(3, _grouped(amsgrad=False).init(PARAMS))
    for file in checkpoint_files.data_files(tmp_path / "steps" / "3"):
      checkpoint_files.flip(file, 0.3)
      checkpoint_files.flip(file, 0.7)
    with pytest.raises(ValueError, match=r"^adamw_jax\.opt_state_restore_args: .* is damaged"):
      restore(3, tx.init(PARAMS))


def test_checksums_catch_every_changed_word_and_cover_the_dtypes():
  """One bit flipped anywhere (each word, low and high bits) changes the checksum; every dtype
  of a state has one; zero-size arrays sum to 0."""
  x = np.random.default_rng(0).standard_normal((5, 7)).astype(np.float32)
  base = _ckpt_sums.sums([jnp.asarray(x)])[0]
  words = x.view(np.uint32).reshape(-1)
  for i in range(words.size):
    for bit in (0, 31):
      changed = words.copy()
      changed[i] ^= np.uint32(1 << bit)
      assert _ckpt_sums.sums([jnp.asarray(changed.view(np.float32))])[0] != base, (i, bit)
  dtypes = [jnp.bfloat16, jnp.float16, jnp.int8, jnp.uint8, jnp.bool_, jnp.complex64, jnp.int4]
  leaves = [jnp.asarray(x).astype(d) for d in dtypes]
  found = _ckpt_sums.sums([*leaves, jax.random.key_data(jax.random.key(0)), jnp.zeros((0, 3))])
  assert all(re.fullmatch(r"[0-9a-f]{16}", s) for s in found)
  assert len(set(found[:-1])) == len(found) - 1 and found[-1] == "0" * 16


def test_missing_checkpoint(tmp_path):
  with pytest.raises(
    FileNotFoundError, match=r"^restore_opt_state: no adamw_jax checkpoint at '.*nope'\.$"
  ):
    adamw_jax.restore_opt_state(tmp_path / "nope", adamw_jax.adamw().init(PARAMS))


# --------------------------------------------------------------------------
# Damaged checkpoints: real files truncated, corrupted, deleted or rewritten
# --------------------------------------------------------------------------

_DAMAGED = r"^restore_opt_state: the checkpoint at '.*' is damaged or incomplete: "


@pytest.fixture
def copy(saved, tmp_path):
  """A fresh copy of the `saved` checkpoint, to damage."""
  target = tmp_path / "copy"
  shutil.copytree(saved, target)
  return target


def _edit_config(path: pathlib.Path) -> None:
  file = path / "_METADATA"
  text = file.read_text()
  assert '"learning_rate": 0.01' in text
  file.write_text(text.replace('"learning_rate": 0.01', '"learning_rate": 0.02'))


_METADATA = _DAMAGED + r"its metadata \(the tree, the arrays, the description\) cannot be read: "

DAMAGES = [
  (
    "description truncated",
    lambda p: checkpoint_files.truncate(p / "_METADATA"),
    ValueError,
    _METADATA + "JSONDecodeError: ",
  ),
  (
    "description deleted",
    lambda p: (p / "_METADATA").unlink(),
    ValueError,
    _METADATA + "FileNotFoundError: ",
  ),
  (
    "description edited",
    _edit_config,
    ValueError,
    _DAMAGED + r"its description does not match the CRC saved with it \(the file was changed or "
    r"corrupted after saving\)\. Nothing was restored\.$",
  ),
  (
    "description without a format",
    lambda p: checkpoint_files.rewrite(p, {"leaves": {}}, crc=False),
    ValueError,
    _DAMAGED + r"its description is not one adamw_jax writes \(no format\)",
  ),
  (
    "shardings truncated",
    lambda p: checkpoint_files.truncate(p / "_sharding"),
    ValueError,
    _METADATA + "ValueError: FAILED_PRECONDITION",
  ),
  (
    "array data truncated",
    lambda p: [checkpoint_files.truncate(f) for f in checkpoint_files.data_files(p)],
    ValueError,
    _METADATA,
  ),
  (
    "array manifest deleted",
    lambda p: (p / "manifest.ocdbt").unlink(),
    ValueError,
    _METADATA + "ValueError: NOT_FOUND",
  ),
  (
    "the arrays' data files missing (partly copied)",
    lambda p: [shutil.rmtree(d) for d in sorted(p.rglob("d"), reverse=True)],
    ValueError,
    _METADATA + "ValueError: NOT_FOUND",
  ),
  (
    "never finished",
    lambda p: p.rename(p.with_name(p.name + ".adamw_jax-new")),
    FileNotFoundError,
    r"^restore_opt_state: the checkpoint at '.*copy' was never finished: only the partly written "
    r"'copy\.adamw_jax-new' is there",
  ),
  (
    "another library version",
    lambda p: checkpoint_files.rewrite(
      p, {**checkpoint_files.description(p), "format": 4, "library": "adamw_jax 9.0.0"}
    ),
    ValueError,
    r"^restore_opt_state: the checkpoint at '.*copy' is in checkpoint format 4, written by "
    r"adamw_jax 9\.0\.0; this is adamw_jax 0\.1\.0, which reads formats 1, 2, 3: restore it with "
    r"the version that wrote it\.$",
  ),
  (
    "not a checkpoint",
    lambda p: [(p / "_METADATA").unlink(), (p / "_CHECKPOINT_METADATA").unlink()],
    FileNotFoundError,
    r"^restore_opt_state: '.*copy' is not an adamw_jax checkpoint \(it has no description; it "
    r"holds \[",
  ),
]


@pytest.mark.parametrize(
  "damage, error, message", [d[1:] for d in DAMAGES], ids=[d[0] for d in DAMAGES]
)
def test_damaged_checkpoint_is_refused_naming_the_directory(copy, damage, error, message):
  damage(copy)
  with pytest.raises(error, match=message):
    adamw_jax.restore_opt_state(copy, _grouped().init(PARAMS))


def _legacy(path: pathlib.Path, state, fmt: int) -> None:
  """A checkpoint as adamw_jax wrote it in format 1 or 2: an orbax composite of two items."""
  described = _ckpt_describe.describe(state)
  meta = {"format": fmt, "leaves": described["leaves"], "structure": described["structure"]}
  meta["config"] = {"learning_rate": 0.01}
  if fmt == 2:
    arrays = [(k, x) for k, x in _ckpt_describe.leaves(state) if x is not None]
    meta["checksums"] = {k: zlib.crc32(np.asarray(x).tobytes()) for k, x in arrays}
    meta["library"] = "adamw_jax 0.1.0"
    meta["checksum"] = zlib.crc32(json.dumps(meta, sort_keys=True).encode())
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
    ckptr.save(
      path,
      args=ocp.args.Composite(
        opt_state=ocp.args.StandardSave(state), adamw_jax=ocp.args.JsonSave(meta)
      ),
    )


@pytest.mark.parametrize("fmt", [1, 2])
def test_checkpoints_of_formats_1_and_2_still_restore(tmp_path, fmt):
  """Written before format 3 (two orbax items; format 1 without CRCs): restored bit for bit.

  Format 2's CRC-32s are checked: a damaged array is refused.
  """
  tx = _grouped()
  state = _stepper(tx)(PARAMS, tx.init(PARAMS), range(K))[1]
  _legacy(tmp_path / "old", state, fmt)
  config = {"learning_rate": 0.01}
  _assert_bitwise(
    adamw_jax.restore_opt_state(tmp_path / "old", tx.init(PARAMS), config=config), state
  )
  if fmt == 2:
    described = json.loads((tmp_path / "old" / "adamw_jax" / "metadata").read_text())
    first = sorted(described["checksums"])[0]
    described["checksums"][first] ^= 1  # as if the array had changed
    checkpoint_files.rewrite_legacy(tmp_path / "old", described)
    with pytest.raises(ValueError, match=_DAMAGED + f"the array at '{first}' does not match"):
      adamw_jax.restore_opt_state(tmp_path / "old", tx.init(PARAMS))


def test_damaged_checkpoint_leaves_an_nnx_optimizer_untouched(tmp_path):
  """Never a partial restore: a failed restore does not update the optimizer in place."""
  model = _Mlp(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, adamw_jax.adamw(1e-2), wrt=nnx.Param)
  adamw_jax.save_opt_state(tmp_path / "opt", optimizer)
  for file in checkpoint_files.data_files(tmp_path / "opt"):
    checkpoint_files.flip(file, 0.3)
    checkpoint_files.flip(file, 0.7)
  fresh = nnx.Optimizer(_Mlp(nnx.Rngs(1)), adamw_jax.adamw(1e-2), wrt=nnx.Param)
  fresh.step[...] = 7
  before = jax.tree.map(np.asarray, nnx.as_pure(nnx.state(fresh)))
  with pytest.raises(ValueError, match=_DAMAGED):
    adamw_jax.restore_opt_state(tmp_path / "opt", fresh)
  _assert_bitwise(nnx.as_pure(nnx.state(fresh)), before)


# --------------------------------------------------------------------------
# Other shardings: restored into the target's, or refused when it has none
# --------------------------------------------------------------------------

_SHARDED_CHILD = r"""
import json, sys
import jax, jax.numpy as jnp, numpy as np, adamw_jax
from jax.sharding import NamedSharding, PartitionSpec as P

directory = sys.argv[1]
mesh = jax.make_mesh((4,), ("x",))
params = {"w": jnp.arange(32.0).reshape(8, 4) / 7, "b": jnp.linspace(-1, 1, 8)}
tx = adamw_jax.adamw(1e-2)
split = jax.device_put(params, NamedSharding(mesh, P("x")))
_, state = jax.jit(tx.update)(jax.tree.map(jnp.cos, split), tx.init(split), split)
adamw_jax.save_opt_state(directory + "/ckpt", state)
np.savez(directory + "/values.npz", **{str(i): np.asarray(x) for i, x in
                                       enumerate(jax.tree.leaves(state))})
targets = {
    "replicated": jax.device_put(params, NamedSharding(mesh, P())),
    "other axis": jax.device_put(params, {"w": NamedSharding(mesh, P(None, "x")),
                                          "b": NamedSharding(mesh, P())}),
    "one device": params,
}
report = {}
for name, p in targets.items():
  target = tx.init(p)
  restored = adamw_jax.restore_opt_state(directory + "/ckpt", target)
  report[name] = {
      "equal": all(np.array_equal(np.asarray(a), np.asarray(b))
                   for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state))),
      "target_sharding": all(a.sharding == b.sharding for a, b in
                             zip(jax.tree.leaves(restored), jax.tree.leaves(target))),
  }
print(json.dumps(report), flush=True)
"""


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
  """A checkpoint saved with its arrays split over 4 devices (in a subprocess), and its report."""
  directory = tmp_path_factory.mktemp("sharded")
  env = {
    **os.environ,
    "JAX_PLATFORMS": "cpu",
    "XLA_FLAGS": (
      os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
    ).strip(),
  }
  proc = subprocess.run(
    [sys.executable, "-c", _SHARDED_CHILD, str(directory)],
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  return directory, json.loads(proc.stdout.strip().splitlines()[-1])


def test_restore_into_other_shardings_takes_the_targets(sharded):
  _, report = sharded
  assert set(report) == {"replicated", "other axis", "one device"}
  for name, result in report.items():
    assert result == {"equal": True, "target_sharding": True}, name


def test_restore_on_other_devices(sharded):
  """Here (one device) into tx.init(params): the saved values; into eval_shape: refused."""
  directory, _ = sharded
  params = {"w": jnp.zeros((8, 4)), "b": jnp.zeros(8)}
  tx = adamw_jax.adamw(1e-2)
  restored = adamw_jax.restore_opt_state(directory / "ckpt", tx.init(params))
  values = np.load(directory / "values.npz")
  for i, leaf in enumerate(jax.tree.leaves(restored)):
    np.testing.assert_array_equal(np.asarray(leaf), values[str(i)])
    assert leaf.sharding == jax.sharding.SingleDeviceSharding(jax.devices()[0])
  with pytest.raises(
    ValueError,
    match=r"^restore_opt_state: the checkpoint at '.*ckpt' was saved "
    r"on other devices, and the target has leaves without a sharding",
  ):
    adamw_jax.restore_opt_state(directory / "ckpt", jax.eval_shape(tx.init, params))
