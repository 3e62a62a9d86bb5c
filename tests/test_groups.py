"""param_groups: torch's param_groups as optax.partition over adamw/adam transforms.

The fidelity test trains a small MLP with a LayerNorm with two torch param
groups (decay / no decay by name, with different lr, betas, eps and AMSGrad)
and replays the same gradients through the equivalent JAX groups, written
three ways. Our parameters must be within 2x torch's own spread (fused vs
single-tensor) of torch's single-tensor ones and the moments equal bit for bit.
"""

from __future__ import annotations

import collections
import functools
import re

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx

import adamw_jax
from tests.paths import by_path

STEPS = 200


def _is_masked(x) -> bool:
  return isinstance(x, optax.MaskedNode)


def groups_of(tx, params) -> dict[str, str]:
  """path -> the group whose inner state holds that parameter (others hold MaskedNode)."""
  state = tx.init(params)
  out: dict[str, str] = {}
  for group, inner in state.inner_states.items():
    for path, leaf in by_path(inner.inner_state.mu, is_leaf=_is_masked).items():
      if not _is_masked(leaf):
        assert path not in out, path
        out[path] = group
  return out


# --------------------------------------------------------------------------
# Fidelity against torch param groups
# --------------------------------------------------------------------------

SHARED = {"lr": 2e-3}
TORCH_DECAY = {"weight_decay": 0.1, "betas": (0.9, 0.98), "eps": 1e-7}
TORCH_NO_DECAY = {"weight_decay": 0.0, "lr": 5e-3, "betas": (0.8, 0.99), "amsgrad": True}
DECAY = {"weight_decay": 0.1, "b1": 0.9, "b2": 0.98, "eps": 1e-7}
NO_DECAY = {"weight_decay": 0.0, "learning_rate": 5e-3, "b1": 0.8, "b2": 0.99, "amsgrad": True}


def _torch_mlp() -> torch.nn.Module:
  torch.manual_seed(0)
  return torch.nn.Sequential(
    collections.OrderedDict(
      [
        ("fc1", torch.nn.Linear(8, 32)),
        ("ln1", torch.nn.LayerNorm(32)),
        ("act1", torch.nn.Tanh()),
        ("fc2", torch.nn.Linear(32, 32)),
        ("ln2", torch.nn.LayerNorm(32)),
        ("act2", torch.nn.Tanh()),
        ("head", torch.nn.Linear(32, 4)),
      ]
    )
  )


def _torch_groups(model: torch.nn.Module) -> list[dict]:
  """The usual recipe: no decay for biases and LayerNorm weights, by name."""
  decay, no_decay = [], []
  for name, p in model.named_parameters():
    (no_decay if name.endswith("bias") or name.startswith("ln") else decay).append(p)
  return [{"params": decay, **TORCH_DECAY}, {"params": no_decay, **TORCH_NO_DECAY}]


def _nested(named: dict[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
  out: dict = {}
  for name, value in named.items():
    module, leaf = name.split(".")
    out.setdefault(module, {})[leaf] = value
  return out


def _torch_state(model, opt):
  named = dict(model.named_parameters())
  params = {n: p.detach().numpy().copy() for n, p in named.items()}
  state = {n: {k: v.numpy().copy() for k, v in opt.state[p].items()} for n, p in named.items()}
  return params, state


@pytest.fixture(scope="module")
def torch_runs():
  """Train with torch (foreach=False), recording the gradients; replay them with fused=True.

  Single-threaded: on tensors this small torch's thread pool costs ten times the work.
  """
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  try:
    return _torch_runs()
  finally:
    torch.set_num_threads(threads)


def _torch_runs():
  model = _torch_mlp()
  initial = {n: p.detach().numpy().copy() for n, p in model.named_parameters()}
  rng = np.random.default_rng(0)
  x_np = rng.standard_normal((512, 8))
  x = torch.tensor(x_np, dtype=torch.float32)
  y = torch.tensor(np.tanh(x_np @ rng.standard_normal((8, 4))), dtype=torch.float32)
  opt = torch.optim.AdamW(_torch_groups(model), foreach=False, **SHARED)
  grads, losses = [], []
  for t in range(STEPS):
    batch = slice((32 * t) % 512, (32 * t) % 512 + 32)
    opt.zero_grad()
    loss = torch.mean((model(x[batch]) - y[batch]) ** 2)
    loss.backward()
    grads.append({n: p.grad.numpy().copy() for n, p in model.named_parameters()})
    losses.append(loss.item())
    opt.step()
  reference = _torch_state(model, opt)

  fused_model = _torch_mlp()
  fused_opt = torch.optim.AdamW(_torch_groups(fused_model), fused=True, **SHARED)
  for g in grads:
    for n, p in fused_model.named_parameters():
      p.grad = torch.tensor(g[n])
    fused_opt.step()
  fused = _torch_state(fused_model, fused_opt)
  assert losses[-1] < 0.5 * losses[0]  # it does train
  return initial, grads, reference, fused


_JAX_GROUPINGS = {
  "regex selectors, as torch's names": lambda: adamw_jax.param_groups(
    {"decay": (r"^(fc\d|head)/weight$", DECAY), "no_decay": ((r"(^|/)bias$", r"^ln\d/"), NO_DECAY)},
    learning_rate=SHARED["lr"],
  ),
  "decay_mask selector and rest": lambda: adamw_jax.param_groups(
    {"decay": (adamw_jax.decay_mask, DECAY)}, rest=NO_DECAY, learning_rate=SHARED["lr"]
  ),
  "label prefix tree": lambda: adamw_jax.param_groups(
    {"decay": DECAY, "no_decay": NO_DECAY},
    labels={
      "fc1": {"weight": "decay", "bias": "no_decay"},
      "ln1": "no_decay",
      "fc2": {"weight": "decay", "bias": "no_decay"},
      "ln2": "no_decay",
      "head": {"weight": "decay", "bias": "no_decay"},
    },
    learning_rate=SHARED["lr"],
  ),
}


@pytest.mark.parametrize("grouping", sorted(_JAX_GROUPINGS))
def test_matches_torch_param_groups(torch_runs, grouping):
  initial, grads, (ref_params, ref_state), (fused_params, _) = torch_runs
  tx = _JAX_GROUPINGS[grouping]()
  params = jax.tree.map(jnp.asarray, _nested(initial))
  state = tx.init(params)

  @jax.jit
  def step(params, state, g):
    updates, state = tx.update(g, state, params)
    return optax.apply_updates(params, updates), state

  for g in grads:
    params, state = step(params, state, jax.tree.map(jnp.asarray, _nested(g)))

  ours = {n.replace("/", "."): np.asarray(v) for n, v in by_path(params).items()}
  assert ours.keys() == ref_params.keys()
  diff = max(float(np.max(np.abs(ours[n] - ref_params[n]))) for n in ours)
  yardstick = max(float(np.max(np.abs(fused_params[n] - ref_params[n]))) for n in ours)
  print(
    f"\n[param groups, {grouping}] max|ours - torch| {diff:.3g}, "
    f"max|torch fused - torch| {yardstick:.3g}"
  )
  assert diff <= 2 * yardstick

  seen = set()
  for _group, inner in state.inner_states.items():
    s = inner.inner_state
    assert int(s.count) == STEPS
    mu = by_path(s.mu, is_leaf=_is_masked)
    for path, m in mu.items():
      if _is_masked(m):
        continue
      name = path.replace("/", ".")
      seen.add(name)
      torch_state = ref_state[name]
      assert int(torch_state["step"].item()) == STEPS
      np.testing.assert_array_equal(m, torch_state["exp_avg"], err_msg=name)
      np.testing.assert_array_equal(by_path(s.nu)[path], torch_state["exp_avg_sq"], err_msg=name)
      amsgrad = name.endswith("bias") or name.startswith("ln")
      assert (s.nu_max is not None) == amsgrad, name
      if amsgrad:
        np.testing.assert_array_equal(
          by_path(s.nu_max)[path], torch_state["max_exp_avg_sq"], err_msg=name
        )
  assert seen == set(ref_params)


# --------------------------------------------------------------------------
# Which group each parameter lands in
# --------------------------------------------------------------------------

_PARAMS = {
  "dense": {"kernel": jnp.ones((3, 4)), "bias": jnp.ones(4)},
  "ln": {"scale": jnp.ones(4), "bias": jnp.ones(4)},
  "embed": {"embedding": jnp.ones((5, 3))},
}
_BY_NDIM = {
  "dense/kernel": "a",
  "embed/embedding": "a",
  "dense/bias": "b",
  "ln/bias": "b",
  "ln/scale": "b",
}


@pytest.mark.parametrize(
  "kwargs, expected",
  [
    ({"groups": {"a": (r"(kernel|embedding)$", {}), "b": (r"(bias|scale)$", {})}}, _BY_NDIM),
    ({"groups": {"a": ((r"kernel$", r"^embed/"), {}), "b": ((r"bias$", r"^ln/"), {})}}, _BY_NDIM),
    (
      {"groups": {"a": (re.compile(r"kernel|embedding"), {})}, "rest": {}},
      {**_BY_NDIM, **{p: "rest" for p, g in _BY_NDIM.items() if g == "b"}},
    ),
    (
      {"groups": {"a": (adamw_jax.decay_mask, {})}, "rest": {}},
      {p: "a" if g == "a" else "rest" for p, g in _BY_NDIM.items()},
    ),
    (
      {
        "groups": {
          "a": (functools.partial(adamw_jax.decay_mask, include=(r"^ln/scale$",)), {}),
          "b": (r"bias$", {}),
        }
      },
      {**_BY_NDIM, "ln/scale": "a"},
    ),
    (
      {
        "groups": {
          "a": (adamw_jax.decay_mask(_PARAMS), {}),
          "b": (jax.tree.map(lambda x: x.ndim == 1, _PARAMS), {}),
        }
      },
      _BY_NDIM,
    ),
    (
      {
        "groups": {
          "b": ({"dense": {"kernel": False, "bias": True}, "ln": True, "embed": False}, {}),
          "a": ({"dense": {"kernel": True, "bias": False}, "ln": False, "embed": True}, {}),
        }
      },
      _BY_NDIM,
    ),
    (
      {
        "groups": {"a": {}, "b": {}},
        "labels": {"dense": {"kernel": "a", "bias": "b"}, "ln": "b", "embed": "a"},
      },
      _BY_NDIM,
    ),
    (
      {
        "groups": {"a": {}, "b": {}},
        "labels": lambda p: jax.tree.map(lambda x: "a" if x.ndim > 1 else "b", p),
      },
      _BY_NDIM,
    ),
    # allow_overlap: the group listed first takes a parameter both select.
    (
      {"groups": {"b": (r"bias$", {}), "a": (r".", {})}, "allow_overlap": True},
      {**dict.fromkeys(_BY_NDIM, "a"), "dense/bias": "b", "ln/bias": "b"},
    ),
    (
      {"groups": {"a": (r".", {}), "b": (r"bias$", {})}, "allow_overlap": True},
      dict.fromkeys(_BY_NDIM, "a"),
    ),
    # allow_unmatched: a group that selects nothing is kept, empty.
    (
      {"groups": {"a": (r"^decoder/", {}), "b": (r".", {})}, "allow_unmatched": True},
      dict.fromkeys(_BY_NDIM, "b"),
    ),
    (
      {
        "groups": {"a": {}, "b": {}, "c": {}},
        "labels": {"dense": "a", "ln": "b", "embed": "a"},
        "allow_unmatched": True,
      },
      {
        "dense/kernel": "a",
        "dense/bias": "a",
        "ln/bias": "b",
        "ln/scale": "b",
        "embed/embedding": "a",
      },
    ),
  ],
  ids=[
    "regex",
    "regex tuples",
    "compiled regex + rest",
    "decay_mask + rest",
    "partial decay_mask",
    "bool trees",
    "bool prefixes",
    "label prefix",
    "label callable",
    "overlap: first wins",
    "overlap: first wins (reversed)",
    "unmatched regex allowed",
    "unmatched label allowed",
  ],
)
def test_group_assignment(kwargs, expected):
  kwargs = dict(kwargs)
  tx = adamw_jax.param_groups(kwargs.pop("groups"), **kwargs)
  assert groups_of(tx, _PARAMS) == expected


# --------------------------------------------------------------------------
# Each group is exactly its own adamw / adam
# --------------------------------------------------------------------------


def _run(tx, params, grads, steps=2):
  state = tx.init(params)
  step = jax.jit(tx.update)
  for _ in range(steps):
    updates, state = step(grads, state, params)
    params = optax.apply_updates(params, updates)
  return params


def test_each_group_is_its_own_optimizer():
  """Two groups with different hyperparameters = two separate runs on the two subtrees, bitwise."""
  params = jax.tree.map(lambda x: x * jnp.linspace(0.5, 1.5, x.size).reshape(x.shape), _PARAMS)
  grads = jax.tree.map(lambda x: jnp.cos(3 * x), params)
  hyper_a = {"learning_rate": 0.05, "weight_decay": 0.2, "b1": 0.8, "amsgrad": True}
  hyper_b = {"weight_decay": 0.0, "b2": 0.95, "eps": 1e-6, "maximize": True}
  optimizer = adamw_jax.adamw
  tx = adamw_jax.param_groups(
    {"a": (r"kernel|embedding", hyper_a), "b": (r"bias|scale", hyper_b)}, learning_rate=0.01
  )
  together = by_path(_run(tx, params, grads))
  part_a = lambda t: {"dense": {"kernel": t["dense"]["kernel"]}, "embed": t["embed"]}
  part_b = lambda t: {"dense": {"bias": t["dense"]["bias"]}, "ln": t["ln"]}
  alone = {
    **by_path(_run(optimizer(**{"learning_rate": 0.01, **hyper_a}), part_a(params), part_a(grads))),
    **by_path(_run(optimizer(**{"learning_rate": 0.01, **hyper_b}), part_b(params), part_b(grads))),
  }
  assert together.keys() == alone.keys()
  for path in together:
    np.testing.assert_array_equal(together[path], alone[path], err_msg=path)


def test_optimizer_adam():
  """optimizer=adamw_jax.adam gives torch.optim.Adam's L2 decay, not AdamW's: bitwise the plain adam.

  (The default, adamw, is what every other test here runs.)
  """
  params = {"w": jnp.linspace(-1.0, 1.0, 6).reshape(2, 3)}
  grads = jax.tree.map(lambda x: jnp.cos(3 * x), params)
  hyper = {"learning_rate": 0.05, "weight_decay": 0.3}
  grouped = _run(
    adamw_jax.param_groups({"all": (r".", hyper)}, optimizer=adamw_jax.adam), params, grads
  )
  np.testing.assert_array_equal(grouped["w"], _run(adamw_jax.adam(**hyper), params, grads)["w"])
  assert np.all(
    np.asarray(grouped["w"]) != np.asarray(_run(adamw_jax.adamw(**hyper), params, grads)["w"])
  )


# --------------------------------------------------------------------------
# Tree kinds: nnx.Optimizer, Equinox, stacked layers
# --------------------------------------------------------------------------


class _Mlp(nnx.Module):
  def __init__(self, rngs):
    self.fc = nnx.Linear(4, 8, rngs=rngs)
    self.ln = nnx.LayerNorm(8, rngs=rngs)
    self.head = nnx.Linear(8, 2, rngs=rngs)

  def __call__(self, x):
    return self.head(nnx.tanh(self.ln(self.fc(x))))


_NNX_GROUPINGS = {
  "regex": lambda state: adamw_jax.param_groups(
    {
      "decay": (r"kernel$", {"weight_decay": 0.1}),
      "no_decay": ((r"bias$", r"^ln/"), {"weight_decay": 0.0, "learning_rate": 3e-2}),
    },
    learning_rate=1e-2,
  ),
  "decay_mask tree of the nnx.State": lambda state: adamw_jax.param_groups(
    {"decay": (adamw_jax.decay_mask(state), {"weight_decay": 0.1})},
    rest={"weight_decay": 0.0, "learning_rate": 3e-2},
    learning_rate=1e-2,
  ),
  "labels: nnx.Param(str) tree": lambda state: adamw_jax.param_groups(
    {"decay": {"weight_decay": 0.1}, "no_decay": {"weight_decay": 0.0, "learning_rate": 3e-2}},
    labels=jax.tree.map(lambda p: "decay" if p.ndim > 1 else "no_decay", state),
    learning_rate=1e-2,
  ),
}


@pytest.fixture(scope="module")
def dict_reference():
  """The groups on a plain dict of the same arrays, trained on the same batches."""
  model = _Mlp(nnx.Rngs(0))
  graphdef, _ = nnx.split(model)
  params = nnx.as_pure(nnx.state(model, nnx.Param))
  tx = _NNX_GROUPINGS["regex"](None)
  state = tx.init(params)
  x = jnp.linspace(-1, 1, 12).reshape(3, 4)

  @jax.jit
  def step(params, state):
    def loss_fn(p):
      return jnp.mean(nnx.merge(graphdef, p)(x) ** 2)

    grads = jax.grad(loss_fn)(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  for _ in range(5):
    params, state = step(params, state)
  return by_path(params)


@pytest.mark.parametrize("grouping", sorted(_NNX_GROUPINGS))
def test_nnx_optimizer_with_groups(dict_reference, grouping):
  model = _Mlp(nnx.Rngs(0))
  optimizer = nnx.Optimizer(
    model, _NNX_GROUPINGS[grouping](nnx.state(model, nnx.Param)), wrt=nnx.Param
  )
  x = jnp.linspace(-1, 1, 12).reshape(3, 4)

  @nnx.jit
  def step(model, optimizer):
    grads = nnx.grad(lambda m: jnp.mean(m(x) ** 2))(model)
    optimizer.update(model, grads)

  for _ in range(5):
    step(model, optimizer)
  ours = by_path(nnx.as_pure(nnx.state(model, nnx.Param)))
  assert ours.keys() == dict_reference.keys()
  for path in ours:
    np.testing.assert_array_equal(ours[path], dict_reference[path], err_msg=path)


def test_equinox_params():
  model = eqx.nn.MLP(3, 2, 4, 1, key=jax.random.key(0))
  params = eqx.filter(model, eqx.is_array)
  tx = adamw_jax.param_groups(
    {"decay": (adamw_jax.decay_mask(model), {"weight_decay": 0.1})}, rest={"weight_decay": 0.0}
  )
  assert groups_of(tx, params) == {
    "layers/0/weight": "decay",
    "layers/0/bias": "rest",
    "layers/1/weight": "decay",
    "layers/1/bias": "rest",
  }


def test_equinox_label_module_is_not_called():
  """A label tree that is an Equinox module is callable (it has __call__) but is labels, not a function."""
  model = eqx.nn.MLP(3, 2, 4, 1, key=jax.random.key(0))
  params = eqx.filter(model, eqx.is_array)
  labels = jax.tree.map(lambda p: "decay" if p.ndim > 1 else "no_decay", params)
  assert callable(labels)
  tx = adamw_jax.param_groups(
    {"decay": {"weight_decay": 0.1}, "no_decay": {"weight_decay": 0.0}}, labels=labels
  )
  assert groups_of(tx, params) == {
    "layers/0/weight": "decay",
    "layers/0/bias": "no_decay",
    "layers/1/weight": "decay",
    "layers/1/bias": "no_decay",
  }


def test_stacked_layers():
  params = {
    "embed": {"embedding": jnp.ones((10, 4))},
    "layers": {"kernel": jnp.ones((3, 4, 4)), "gain": jnp.ones((3, 4))},
  }
  mask = functools.partial(adamw_jax.decay_mask, stacked_axes={r"^layers/": 1})
  tx = adamw_jax.param_groups({"decay": (mask, {})}, rest={"weight_decay": 0.0})
  assert groups_of(tx, params) == {
    "embed/embedding": "decay",
    "layers/kernel": "decay",
    "layers/gain": "rest",
  }


# --------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
  "groups, kwargs, error, message",
  [
    ({}, {}, TypeError, r"^param_groups: groups must be a non-empty mapping"),
    ([("a", (r".", {}))], {}, TypeError, r"^param_groups: groups must be a non-empty mapping"),
    (
      {"a": r"kernel"},
      {},
      TypeError,
      r"^param_groups: group 'a' must be a pair \(selector, hyperparameters\), got str; without "
      r"selectors, pass labels=",
    ),
    (
      {"a": (r"kernel", {})},
      {"labels": {}},
      TypeError,
      r"^param_groups: with labels=\.\.\., group 'a' must be a mapping of hyperparameters",
    ),
    (
      {"a": (r"kernel", 0.1)},
      {},
      TypeError,
      r"^param_groups: group 'a': hyperparameters must be a mapping \(e\.g\. \{'weight_decay': 0\.0\}\), "
      r"got float",
    ),
    (
      {"a": (r"kernel", {"lr": 1e-3})},
      {},
      TypeError,
      r"^param_groups: group 'a': unknown hyperparameter 'lr' \(torch's 'lr' is learning_rate here\); "
      r"the hyperparameters are learning_rate, b1, b2, eps, weight_decay, amsgrad, maximize, eps_root, "
      r"mu_dtype, nu_dtype, param_rounding, rounding_seed, moment_bits, moment_block_size\.",
    ),
    (
      {"a": (r"kernel", {"betas": (0.9, 0.99)})},
      {},
      TypeError,
      r"^param_groups: group 'a': unknown hyperparameter 'betas' \(torch's 'betas' is b1 and b2 here\)",
    ),
    (
      {"a": (r"kernel", {"weight_decy": 0.1})},
      {},
      TypeError,
      r"^param_groups: group 'a': unknown hyperparameter 'weight_decy' \(did you mean 'weight_decay'\?\)",
    ),
    (
      {"a": (r"kernel", {"mask": True})},
      {},
      TypeError,
      r"^param_groups: group 'a': unknown hyperparameter 'mask' \(make a group with weight_decay=0\.0",
    ),
    (
      {"a": (r"kernel", {})},
      {"lr": 1e-3},
      TypeError,
      r"^param_groups: shared hyperparameters: unknown hyperparameter 'lr'",
    ),
    (
      {"a": (r"kernel", {})},
      {"rest": {"momentum": 0.9}},
      TypeError,
      r"^param_groups: rest: unknown hyperparameter 'momentum'",
    ),
    (
      {"a": (r"kernel", {"b1": 1.5})},
      {},
      ValueError,
      r"^param_groups: group 'a': Invalid beta parameter at index 0 \(b1\): 1\.5 \(must be in \[0, 1\)\)",
    ),
    (
      {"a": (r"kernel", {})},
      {"rest": {"learning_rate": -1.0}},
      ValueError,
      r"^param_groups: group 'rest': Invalid learning_rate: -1\.0",
    ),
    (
      {"a": {}},
      {"labels": {}, "rest": {}},
      ValueError,
      r"^param_groups: rest= applies to selectors; with labels=\.\.\., every parameter already has a group",
    ),
    (
      {"rest": (r"kernel", {})},
      {"rest": {}},
      ValueError,
      r"^param_groups: a group is named 'rest', the name of the group rest= makes; rename it\.",
    ),
    (
      {"a": (r"kernel(", {})},
      {},
      ValueError,
      r"^param_groups: group 'a': the rule 'kernel\(' is not a valid regex",
    ),
  ],
)
def test_construction_errors(groups, kwargs, error, message):
  with pytest.raises(error, match=message):
    adamw_jax.param_groups(groups, **kwargs)


_PATHS = re.escape(
  "the parameter paths are 'dense/bias', 'dense/kernel', 'embed/embedding', 'ln/bias', 'ln/scale'"
)


@pytest.mark.parametrize(
  "groups, kwargs, message",
  [
    (
      {"decay": (r"kernel|embedding", {}), "no_decay": (r"bias$", {}), "norm": (r"^ln/", {})},
      {},
      r"^param_groups: the parameter at 'ln/bias' is claimed by groups 'no_decay' and 'norm'; make "
      r"the selectors disjoint, or pass allow_overlap=True \(the group listed first wins\)\.$",
    ),
    (
      {"decay": (adamw_jax.decay_mask, {}), "all": (lambda p: True, {})},
      {},
      r"^param_groups: the parameter at 'dense/kernel' is claimed by groups 'decay' and 'all'",
    ),
    (
      {"decay": (r"kernel", {})},
      {},
      r"^param_groups: the parameter at 'dense/bias' belongs to no group; add it to a group, or pass "
      r"rest=\{\.\.\.\}",
    ),
    (
      {"decay": ((r"kernel", r"^encoder/"), {})},
      {"rest": {}},
      r"^param_groups: group 'decay': the rule '\^encoder/' matches no parameter; "
      + _PATHS
      + r"\. Fix the rule, or pass allow_unmatched=True if it is meant to match nothing in this model\.$",
    ),
    (
      {"decay": (lambda p: jax.tree.map(lambda x: x.ndim > 2, p), {})},
      {"rest": {}},
      r"^param_groups: group 'decay' selects no parameter \(its mask is False everywhere\); "
      + _PATHS,
    ),
    (
      {"decay": ({"dense": True, "ln": False}, {})},
      {"rest": {}},
      r"^param_groups: group 'decay': the mask does not match the parameters at the root: the mask "
      r"has dict with keys \['dense', 'ln'\], the parameters have dict with keys "
      r"\['dense', 'embed', 'ln'\]\.$",
    ),
    (
      {"a": ((r"kernel", 3), {})},
      {"rest": {}},  # not all strings: a mask pytree, checked as one
      r"^param_groups: group 'a': the mask does not match the parameters at the root: the mask has "
      r"tuple with keys \['0', '1'\], the parameters have dict with keys \['dense', 'embed', 'ln'\]\.$",
    ),
    (
      {"a": {}, "b": {}},
      {"labels": {"dense": "a", "ln": "b"}},
      r"^param_groups: the label tree does not match the parameters at the root: the label tree has "
      r"dict with keys \['dense', 'ln'\], the parameters have dict with keys \['dense', 'embed', 'ln'\]\.$",
    ),
    (
      {"a": {}, "b": {}},
      {"labels": {"dense": {"kernel": "a"}, "ln": "b", "embed": "a"}},
      r"^param_groups: the label tree does not match the parameters at 'dense': the label tree has "
      r"dict with keys \['kernel'\], the parameters have dict with keys \['bias', 'kernel'\]\.$",
    ),
    (
      {"a": {}, "b": {}},
      {"labels": {"dense": "a", "ln": "c", "embed": "a"}},
      r"^param_groups: the parameter at 'ln/bias' has the label 'c', which is not a group; the groups "
      r"are 'a', 'b'\.$",
    ),
    (
      {"a": {}, "b": {}, "c": {}},
      {"labels": {"dense": "a", "ln": "b", "embed": "a"}},
      r"^param_groups: no parameter is labelled 'c'; the labels used are 'a', 'b'\. Pass "
      r"allow_unmatched=True if that is intended\.$",
    ),
  ],
)
def test_assignment_errors(groups, kwargs, message):
  tx = adamw_jax.param_groups(groups, **kwargs)
  with pytest.raises(ValueError, match=message):
    tx.init(_PARAMS)


def test_unhashable_label_is_a_type_error():
  tx = adamw_jax.param_groups({"a": {}}, labels={"dense": np.array(["a"]), "ln": "a", "embed": "a"})
  with pytest.raises(TypeError, match=r"^param_groups: labels must be group names, got ndarray"):
    tx.init(_PARAMS)


def test_errors_are_raised_under_jit_and_in_nnx_optimizer():
  tx = adamw_jax.param_groups({"decay": (r"kernel", {})})
  with pytest.raises(
    ValueError, match=r"^param_groups: the parameter at 'dense/bias' belongs to no group"
  ):
    jax.jit(tx.init)(_PARAMS)
  model = _Mlp(nnx.Rngs(0))
  with pytest.raises(
    ValueError, match=r"^param_groups: the parameter at 'fc/bias' belongs to no group"
  ):
    nnx.Optimizer(model, tx, wrt=nnx.Param)
