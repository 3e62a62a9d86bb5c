"""from_torch / to_torch_state_dict: a run moved between torch and JAX mid-way equals the run that stayed.

Every test trains 50 steps on one side, converts, trains 50 on the other, and
compares with 100 steps of torch's single-tensor AdamW (``foreach=False``) on
the same gradients: moments bit for bit, parameters within torch's own spread
(max|fused - single-tensor| over the same 100 steps, as tests/test_fidelity.py).
"""

from __future__ import annotations

import collections

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx

import adamw_jax
from tests import docs_pages
from tests import torch_reference as ref
from tests.paths import by_path

HALF = 50
NAMES = sorted(ref.SHAPES)  # the torch parameters in the order of the JAX dict's leaves

# One of each kind of math (the others differ only in numbers): AdamW, AMSGrad, maximize,
# complex, Adam + L2. A torch LR scheduler is refused (see the error table).

CASES = [
  c
  for c in ref.CASES
  if c.name in ("default", "amsgrad", "maximize", "complex", "adam+L2", "adam amsgrad+maximize")
]


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
  """Single-threaded: on tensors this small torch's thread pool costs more than the work."""
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(threads)


def _torch_params(params, names=NAMES):
  return [torch.nn.Parameter(torch.tensor(params[k]).clone()) for k in names]


def _torch_steps(opt, tensors, grads, steps, names=NAMES):
  for t in steps:
    g = grads(t)
    for k, p in zip(names, tensors):
      p.grad = torch.tensor(g[k]).clone()
    opt.step()


def _jax_steps(tx, params, state, grads, steps):
  @jax.jit
  def step(p, s, g):
    updates, s = tx.update(g, s, p)
    return optax.apply_updates(p, updates), s

  for t in steps:
    params, state = step(params, state, jax.tree.map(jnp.asarray, grads(t)))
  return params, state


def _torch_run(case, params, grads, steps=2 * HALF, **impl):
  tensors = _torch_params(params)
  opt, _ = case.torch_opt(tensors, **impl)
  _torch_steps(opt, tensors, grads, range(steps))
  return opt, tensors


def _torch_state(opt, tensors, key, names=NAMES):
  return {k: opt.state[p][key].numpy().copy() for k, p in zip(names, tensors)}


def _np(tree):
  return {k: np.asarray(v) for k, v in tree.items()}


def _check_params(ours, reference, fused, complex_):
  diff = ref.max_abs(ours, reference)
  yardstick = (
    float(np.spacing(np.float32(np.abs(ref.flat(reference)).max())))
    if complex_
    else ref.max_abs(fused, reference)
  )
  print(
    f" params: max|ours - torch| {diff:.3g} ({ref.bitwise_fraction(ours, reference):.2%} "
    f"bitwise), yardstick {yardstick:.3g}"
  )
  assert diff <= 2 * yardstick


@pytest.fixture(scope="module", params=CASES, ids=lambda c: c.name)
def reference(request):
  """The case, its problem, and torch's uninterrupted 100-step run (single-tensor and fused)."""
  case = request.param
  params, grads = ref.make_problem(np.complex64 if case.complex else np.float32, 2 * HALF)
  opt, tensors = _torch_run(case, params, grads, foreach=False)
  full = {
    key: _torch_state(opt, tensors, key)
    for key in ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if case.amsgrad else ())
  }
  full["params"] = {k: p.detach().numpy().copy() for k, p in zip(NAMES, tensors)}
  fused = None
  if not case.complex:
    _fused_opt, fused_tensors = _torch_run(case, params, grads, fused=True)
    fused = {k: p.detach().numpy().copy() for k, p in zip(NAMES, fused_tensors)}
  return case, params, grads, full, fused


def test_torch_then_jax(reference):
  """50 torch steps, from_torch (by order), 50 JAX steps == 100 torch steps."""
  case, params, grads, full, fused = reference
  tensors = _torch_params(params)
  opt, _ = case.torch_opt(tensors, foreach=False)
  _torch_steps(opt, tensors, grads, range(HALF))
  jparams = {k: jnp.asarray(p.detach().numpy()) for k, p in zip(NAMES, tensors)}
  tx, state = adamw_jax.from_torch(opt, jparams)
  assert isinstance(state, adamw_jax.ScaleByAdamState) and int(state.count) == HALF
  jparams, state = _jax_steps(tx, jparams, state, grads, range(HALF, 2 * HALF))
  assert int(state.count) == 2 * HALF
  np.testing.assert_equal(_np(state.mu), full["exp_avg"])
  np.testing.assert_equal(_np(state.nu), full["exp_avg_sq"])
  if case.amsgrad:
    np.testing.assert_equal(_np(state.nu_max), full["max_exp_avg_sq"])
  else:
    assert state.nu_max is None
  _check_params(_np(jparams), full["params"], fused, case.complex)


def test_jax_then_torch(reference):
  """50 JAX steps, to_torch_state_dict into a fresh torch optimizer, 50 torch steps == 100 torch steps."""
  case, params, grads, full, fused = reference
  tx = case.jax_tx()
  jparams = jax.tree.map(jnp.asarray, params)
  jparams, state = _jax_steps(tx, jparams, tx.init(jparams), grads, range(HALF))
  tensors = _torch_params(_np(jparams))
  opt, _ = case.torch_opt(tensors, foreach=False)
  opt.load_state_dict(adamw_jax.to_torch_state_dict(opt, state))
  _torch_steps(opt, tensors, grads, range(HALF, 2 * HALF))
  assert all(opt.state[p]["step"].item() == 2 * HALF for p in tensors)
  for key in ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if case.amsgrad else ()):
    np.testing.assert_equal(_torch_state(opt, tensors, key), full[key])
  _check_params(
    {k: p.detach().numpy() for k, p in zip(NAMES, tensors)}, full["params"], fused, case.complex
  )


def test_round_trip_is_exact():
  """torch -> JAX -> torch (through the tx from from_torch) gives back torch's state, bit for bit."""
  case = ref.Case("amsgrad", amsgrad=True)
  params, grads = ref.make_problem(np.float32, HALF)
  opt, tensors = _torch_run(case, params, grads, steps=7, foreach=False)
  before = opt.state_dict()
  tx, state = adamw_jax.from_torch(
    opt, {k: jnp.asarray(p.detach().numpy()) for k, p in zip(NAMES, tensors)}
  )
  after = adamw_jax.to_torch_state_dict(tx, state)
  assert after["param_groups"] == before["param_groups"]
  assert after["state"].keys() == before["state"].keys()
  for i, s in before["state"].items():
    assert after["state"][i].keys() == s.keys()
    for key, value in s.items():
      assert after["state"][i][key].dtype == value.dtype, key
      assert torch.equal(after["state"][i][key], value), key


# --------------------------------------------------------------------------
# Several param groups
# --------------------------------------------------------------------------

TORCH_GROUPS = [
  ({"matrix", "cube"}, {"weight_decay": 0.1, "betas": (0.9, 0.98)}),
  ({"vector", "scalar"}, {"weight_decay": 0.0, "lr": 5e-3, "amsgrad": True}),
]


def _grouped_torch(params, grads, steps, late_start=0):
  """AdamW with TORCH_GROUPS; group 1 gets no gradient before step `late_start`."""
  tensors = dict(zip(NAMES, _torch_params(params)))
  opt = torch.optim.AdamW(
    [
      {"params": [tensors[k] for k in NAMES if k in members], **hyper}
      for members, hyper in TORCH_GROUPS
    ],
    lr=2e-3,
    foreach=False,
  )
  for t in steps:
    g = grads(t)
    for k, p in tensors.items():
      p.grad = None if (t < late_start and k in TORCH_GROUPS[1][0]) else torch.tensor(g[k]).clone()
    opt.step()
  return opt, tensors


@pytest.mark.parametrize("late_start", [0, 10], ids=["same steps", "group 1 starts at step 10"])
def test_param_groups_both_ways(late_start):
  params, grads = ref.make_problem(np.float32, 2 * HALF)
  full_opt, full_t = _grouped_torch(params, grads, range(2 * HALF), late_start)
  opt, tensors = _grouped_torch(params, grads, range(HALF), late_start)
  jparams = {k: jnp.asarray(p.detach().numpy()) for k, p in tensors.items()}
  names = [k for members, _ in TORCH_GROUPS for k in NAMES if k in members]  # the optimizer's order
  tx, state = adamw_jax.from_torch(opt, jparams, names=names)
  assert isinstance(state, optax.PartitionState)
  assert {g: int(s.inner_state.count) for g, s in state.inner_states.items()} == {
    "group0": HALF,
    "group1": HALF - late_start,
  }
  jparams, state = _jax_steps(tx, jparams, state, grads, range(HALF, 2 * HALF))
  for group, members in zip(("group0", "group1"), (m for m, _ in TORCH_GROUPS)):
    inner = state.inner_states[group].inner_state
    for k in members:
      np.testing.assert_equal(np.asarray(inner.mu[k]), full_opt.state[full_t[k]]["exp_avg"].numpy())
      np.testing.assert_equal(
        np.asarray(inner.nu[k]), full_opt.state[full_t[k]]["exp_avg_sq"].numpy()
      )
      np.testing.assert_allclose(
        np.asarray(jparams[k]), full_t[k].detach().numpy(), rtol=0, atol=1e-6
      )
  # ... and back into a torch optimizer with the same groups, which continues the run.
  back_opt, back_t = _grouped_torch(_np(jparams), grads, [])
  back_opt.load_state_dict(adamw_jax.to_torch_state_dict(back_opt, state, names=names))
  for k, p in back_t.items():
    s = back_opt.state[p]
    assert s["step"].item() == 2 * HALF - (late_start if k in TORCH_GROUPS[1][0] else 0)
    assert torch.equal(s["exp_avg_sq"], full_opt.state[full_t[k]]["exp_avg_sq"])


def test_hand_built_param_groups_to_torch():
  """A JAX run with adamw_jax.param_groups goes to torch optimizer with the same groups."""
  params, grads = ref.make_problem(np.float32, 2 * HALF)
  tx = adamw_jax.param_groups(
    {
      "decay": ((r"^(matrix|cube)$",), {"weight_decay": 0.1, "b2": 0.98}),
      "no_decay": (
        (r"^(vector|scalar)$",),
        {"weight_decay": 0.0, "learning_rate": 5e-3, "amsgrad": True},
      ),
    },
    learning_rate=2e-3,
  )
  jparams = jax.tree.map(jnp.asarray, params)
  jparams, state = _jax_steps(tx, jparams, tx.init(jparams), grads, range(HALF))
  opt, tensors = _grouped_torch(_np(jparams), grads, [])
  names = [k for members, _ in TORCH_GROUPS for k in NAMES if k in members]
  opt.load_state_dict(adamw_jax.to_torch_state_dict(opt, state, names=names))
  for t in range(HALF, 2 * HALF):
    g = grads(t)
    for k, p in tensors.items():
      p.grad = torch.tensor(g[k]).clone()
    opt.step()
  full_opt, full_t = _grouped_torch(params, grads, range(2 * HALF))
  for k in NAMES:
    assert torch.equal(opt.state[tensors[k]]["exp_avg"], full_opt.state[full_t[k]]["exp_avg"]), k
    np.testing.assert_allclose(
      tensors[k].detach().numpy(), full_t[k].detach().numpy(), rtol=0, atol=1e-6
    )


# --------------------------------------------------------------------------
# A real model: torch Conv2d / LayerNorm / Linear <-> Flax NNX Conv / LayerNorm / Linear
# --------------------------------------------------------------------------


class TorchNet(torch.nn.Module):
  def __init__(self):
    super().__init__()
    self.conv = torch.nn.Conv2d(2, 6, kernel_size=3)
    self.ln = torch.nn.LayerNorm(6)
    self.head = torch.nn.Linear(6, 3)

  def forward(self, x):  # NCHW
    h = torch.relu(self.conv(x)).mean(dim=(2, 3))
    return self.head(self.ln(h))


class FlaxNet(nnx.Module):
  def __init__(self, rngs):
    self.conv = nnx.Conv(2, 6, kernel_size=(3, 3), padding="VALID", rngs=rngs)
    self.ln = nnx.LayerNorm(6, epsilon=1e-5, rngs=rngs)  # torch's default eps
    self.head = nnx.Linear(6, 3, rngs=rngs)

  def __call__(self, x):  # NHWC
    h = jnp.mean(nnx.relu(self.conv(x)), axis=(1, 2))
    return self.head(self.ln(h))


def _to_flax_params(model, params, mapping):
  """The torch module's weights as the Flax params (a pure nnx.State)."""
  flat = by_path(params)
  values = {}
  for name, p in model.named_parameters():
    path, axes = mapping(name)
    values[path] = np.transpose(p.detach().numpy(), axes) if axes else p.detach().numpy()
  assert values.keys() == flat.keys()
  return jax.tree.map(
    jnp.asarray, jax.tree_util.tree_unflatten(jax.tree.structure(params), [values[k] for k in flat])
  )


def test_flax_layout_on_a_real_model():
  torch.manual_seed(0)
  model = TorchNet()
  opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05, foreach=False)
  x = torch.randn(8, 2, 7, 7)
  y = torch.randn(8, 3)

  def torch_step():
    opt.zero_grad()
    loss = torch.mean((model(x) - y) ** 2)
    loss.backward()
    opt.step()
    return loss.item()

  for _ in range(10):
    torch_step()
  flax_model = FlaxNet(nnx.Rngs(0))
  graphdef, template = nnx.split(flax_model, nnx.Param)
  template = nnx.as_pure(template)
  mapping = adamw_jax.flax_layout(template)
  assert mapping("conv.weight") == ("conv/kernel", (2, 3, 1, 0))
  assert mapping("head.weight") == ("head/kernel", (1, 0))
  assert mapping("ln.weight") == ("ln/scale", None)
  assert mapping("head.bias") == ("head/bias", None)
  jparams = _to_flax_params(model, template, mapping)
  x_nhwc = jnp.asarray(x.numpy().transpose(0, 2, 3, 1))
  np.testing.assert_allclose(
    np.asarray(nnx.merge(graphdef, jparams)(x_nhwc)),
    model(x).detach().numpy(),
    rtol=1e-5,
    atol=1e-6,
  )

  tx, state = adamw_jax.from_torch(opt, jparams, names=model, mapping=mapping)
  # Continue both: torch on its own, JAX inside an nnx.Optimizer, on the same batch.
  flax_model = nnx.merge(graphdef, jparams)
  optimizer = nnx.Optimizer(flax_model, tx, wrt=nnx.Param)
  nnx.update(optimizer.opt_state, nnx.state(state))

  @nnx.jit
  def jax_step(m, o):
    loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x_nhwc) - jnp.asarray(y.numpy())) ** 2))(
      m
    )
    o.update(m, grads)
    return loss

  for _ in range(10):
    torch_loss, jax_loss = torch_step(), float(jax_step(flax_model, optimizer))
    assert abs(torch_loss - jax_loss) <= 1e-4 * abs(torch_loss)
  # The JAX state goes back in torch's layout; it is close to torch's own (the gradients
  # of the two frameworks differ by rounding).
  sd = adamw_jax.to_torch_state_dict(opt, optimizer.opt_state, names=model, mapping=mapping)
  for i, (name, p) in enumerate(model.named_parameters()):
    assert sd["state"][i]["step"].item() == 20
    assert sd["state"][i]["exp_avg"].shape == p.shape, name
    np.testing.assert_allclose(
      sd["state"][i]["exp_avg"].numpy(),
      opt.state[p]["exp_avg"].numpy(),
      rtol=1e-3,
      atol=1e-6,
      err_msg=name,
    )
  fresh = TorchNet()
  fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2, weight_decay=0.05)
  fresh_opt.load_state_dict(sd)
  assert fresh_opt.state[fresh.conv.weight]["exp_avg_sq"].shape == (6, 2, 3, 3)


@pytest.mark.parametrize(
  "rename, name, expected",
  [
    (None, "layers.0.weight", ("layers_0/kernel", (1, 0))),  # Linen's naming of a list
    (None, "embed.weight", ("embed/embedding", None)),
    (None, "conv1d.weight", ("conv1d/kernel", (2, 1, 0))),
    ({"features.0": "stem"}, "features.0.weight", ("stem/kernel", (1, 0))),
    (lambda m: m.replace("blocks.", "block_"), "blocks.1.bias", ("block_1/bias", None)),
  ],
)
def test_flax_layout_names(rename, name, expected):
  params = {
    "layers_0": {"kernel": np.zeros((4, 3)), "bias": np.zeros(3)},
    "embed": {"embedding": np.zeros((10, 4))},
    "conv1d": {"kernel": np.zeros((5, 2, 3))},
    "stem": {"kernel": np.zeros((4, 3))},
    "block_1": {"bias": np.zeros(3)},
  }
  assert adamw_jax.flax_layout(params, rename=rename)(name) == expected


def test_names_from_named_parameters():
  """An optimizer built from named_parameters() keeps the names: mapping= needs nothing more."""
  model = torch.nn.Sequential(collections.OrderedDict([("fc", torch.nn.Linear(3, 2))]))
  opt = torch.optim.AdamW(model.named_parameters())
  model(torch.ones(1, 3)).sum().backward()
  opt.step()
  params = {"fc": {"kernel": jnp.zeros((3, 2)), "bias": jnp.zeros(2)}}
  _, state = adamw_jax.from_torch(opt.state_dict(), params, mapping=adamw_jax.flax_layout(params))
  np.testing.assert_equal(
    np.asarray(state.mu["fc"]["kernel"]), opt.state[model.fc.weight]["exp_avg"].numpy().T
  )


def test_docs_example(tmp_path, monkeypatch):
  """The example of docs/migrating.md ("Moving a run between PyTorch and JAX") runs as written."""
  blocks = [  # the equivalence check's blocks build on each other: test_docs runs the page
    b
    for b in docs_pages.section(
      docs_pages.page("migrating.md"), "Moving a run between PyTorch and JAX"
    )
    if "Checking that the JAX run is the torch run" not in b.headings
  ]
  monkeypatch.chdir(tmp_path)  # it writes a checkpoint to ckpt/
  for block in blocks:
    exec(compile(block.code, block.where, "exec"), {})
  assert (tmp_path / "ckpt" / "opt_state").is_dir()


# --------------------------------------------------------------------------
# What is refused
# --------------------------------------------------------------------------


def _opt(cls=torch.optim.AdamW, shapes=((2, 3), (3,)), steps=1, groups=None, **kw):
  tensors = [torch.nn.Parameter(torch.ones(s)) for s in shapes]
  opt = cls(groups(tensors) if groups else tensors, **kw)
  for _ in range(steps):
    for p in tensors:
      p.grad = torch.ones_like(p)
    opt.step()
  return opt


def _sd(opt, edit):
  sd = opt.state_dict()
  edit(sd)
  return sd


P = {"a": jnp.zeros((2, 3)), "b": jnp.zeros(3)}


def _late_param():
  a, b = torch.nn.Parameter(torch.ones(2, 3)), torch.nn.Parameter(torch.ones(3))
  opt = torch.optim.AdamW([a, b])
  a.grad = torch.ones_like(a)
  opt.step()
  return opt


FROM_TORCH_ERRORS = [
  (
    "SGD",
    lambda: (_opt(torch.optim.SGD, lr=0.1), P, {}),
    TypeError,
    r"^from_torch: torch\.optim\.sgd\.SGD is not supported; only torch\.optim\.AdamW / Adam, "
    r"torchao\.optim\.AdamW8bit / Adam8bit and optimi\.AdamW / Adam are\.$",
  ),
  (
    "not an optimizer",
    lambda: ({"state": {}}, P, {}),
    TypeError,
    r"^from_torch: expected a torch\.optim\.AdamW / Adam or its state_dict\(\), got dict\.$",
  ),
  (
    "NAdam-like setting",
    lambda: (_sd(_opt(), lambda sd: sd["param_groups"][0].update(momentum_decay=4e-3)), P, {}),
    ValueError,
    r"^from_torch: param group 0 has the setting 'momentum_decay'=0\.004, which torch\.optim\.AdamW "
    r"/ Adam do not have and adamw_jax does not model\. If it does not change the update .*"
    r"pass ignore=\('momentum_decay',\)\.$",
  ),
  (
    "RAdam state dict",
    lambda: (_opt(torch.optim.RAdam).state_dict(), P, {}),
    ValueError,
    r"^from_torch: param group 0 has no 'amsgrad': not a torch\.optim\.AdamW / Adam state dict\.$",
  ),
  (
    "LR scheduler",
    lambda: (_sched_opt(), P, {}),
    ValueError,
    r"^from_torch: param group 0 has 'initial_lr': an LR scheduler is attached.*Pass learning_rate=",
  ),
  (
    "Adam and AdamW groups",
    lambda: (
      _opt(
        torch.optim.Adam,
        groups=lambda t: [{"params": t[:1]}, {"params": t[1:], "decoupled_weight_decay": True}],
      ),
      P,
      {},
    ),
    ValueError,
    r"^from_torch: some param groups decouple weight decay \(AdamW\) and others do not \(Adam\)",
  ),
  (
    "count",
    lambda: (_opt(shapes=((2, 3),)), P, {}),
    ValueError,
    r"^from_torch: the torch optimizer has 1 parameters and the JAX params have 2 leaves; matched "
    r"by order they must be as many \(pass names= and mapping= to match by name\)\.$",
  ),
  (
    "shape, transposed",
    lambda: (_opt(shapes=((3, 2), (3,))), P, {}),
    ValueError,
    r"^from_torch: torch parameter 0 has exp_avg of shape \(3, 2\), but the JAX leaf 'a' has shape "
    r"\(2, 3\)\. Linear / Conv weights need a transposed layout: pass names= and "
    r"mapping=adamw_jax\.flax_layout\(params\)\.$",
  ),
  (
    "shape",
    lambda: (_opt(shapes=((2, 3), (4,))), P, {}),
    ValueError,
    r"^from_torch: torch parameter 1 has exp_avg of shape \(4,\), but the JAX leaf 'b' has shape \(3,\)\.$",
  ),
  (
    "dtype",
    lambda: (_opt(), jax.tree.map(lambda x: x.astype(jnp.bfloat16), P), {}),
    ValueError,
    r"^from_torch: torch parameter 0 has exp_avg of dtype float32, but the JAX leaf 'a' has dtype "
    r"bfloat16; cast the params to float32 first\.$",
  ),
  (
    "step within a group",
    lambda: (_late_param(), P, {}),
    ValueError,
    r"^from_torch: in param group 0, torch parameter 0 is at step 1 and torch parameter 1 at step 0; "
    r"adamw_jax keeps one step count per group",
  ),
  (
    "odd step",
    lambda: (_sd(_opt(), lambda sd: sd["state"][0].update(step=torch.tensor(1.5))), P, {}),
    ValueError,
    r"^from_torch: torch parameter 0 has step 1\.5; expected a whole number of steps",
  ),
  (
    "extra state",
    lambda: (_sd(_opt(), lambda sd: sd["state"][1].update(momentum_buffer=torch.ones(3))), P, {}),
    ValueError,
    r"^from_torch: the state of torch parameter 1 has keys \['exp_avg', 'exp_avg_sq', 'momentum_buffer', "
    r"'step'\]; expected \['exp_avg', 'exp_avg_sq', 'step'\] \(amsgrad=False\); unexpected "
    r"\['momentum_buffer'\]\.$",
  ),
  (
    "unknown path",
    lambda: (_opt(), P, {"names": ["a", "bb.c"]}),
    ValueError,
    r"^from_torch: the torch parameter 'bb\.c' maps to 'bb/c', which is not a leaf of the JAX params; "
    r"the paths are 'a', 'b'\.$",
  ),
  (
    "close path",
    lambda: (_opt(), P, {"names": ["a", "b"], "mapping": {"a": "a", "b": "bb"}}),
    ValueError,
    r"^from_torch: the torch parameter 'b' maps to 'bb', which is not a leaf of the JAX "
    r"params \(did you mean 'b'\?\)\.$",
  ),
  (
    "two to one leaf",
    lambda: (
      _opt(shapes=((2, 3), (2, 3))),
      {"a": P["a"], "b": P["a"]},
      {"names": ["x", "y"], "mapping": lambda n: "a"},
    ),
    ValueError,
    r"^from_torch: the torch parameters 'x' and 'y' both map to the leaf 'a'\.$",
  ),
  (
    "mapping without names",
    lambda: (_opt(), P, {"mapping": {"a": "a"}}),
    ValueError,
    r"^from_torch: mapping= needs the torch parameter names: pass names=",
  ),
  (
    "wrong number of names",
    lambda: (_opt(), P, {"names": ["a"]}),
    ValueError,
    r"^from_torch: names= must be 2 strings \(one per torch parameter, in the optimizer's order\), "
    r"got 1 items\.$",
  ),
  (
    "module with state dict",
    lambda: (_opt().state_dict(), P, {"names": torch.nn.Linear(3, 2)}),
    TypeError,
    r"^from_torch: names=<module> needs the optimizer itself",
  ),
  (
    "learning rates",
    lambda: (_opt(), P, {"learning_rate": [1e-3, 1e-4]}),
    ValueError,
    r"^from_torch: learning_rate= has 2 entries for 1 param groups\.$",
  ),
]


def _sched_opt():
  opt = _opt()
  torch.optim.lr_scheduler.StepLR(opt, step_size=10)
  return opt


@pytest.mark.parametrize(
  "make, error, message", [c[1:] for c in FROM_TORCH_ERRORS], ids=[c[0] for c in FROM_TORCH_ERRORS]
)
def test_from_torch_errors(make, error, message):
  optimizer, params, kwargs = make()
  with pytest.raises(error, match=message):
    adamw_jax.from_torch(optimizer, params, **kwargs)


def test_scheduler_with_learning_rate_and_ignored_keys():
  """learning_rate= takes over from an attached LR scheduler; ignore= lets labels through."""
  opt = _sched_opt()
  opt.param_groups[0]["name"] = "all"
  schedule = optax.cosine_decay_schedule(1e-3, 100)
  tx, state = adamw_jax.from_torch(opt, P, learning_rate=schedule, ignore=("name",))
  assert int(state.count) == 1
  tx.update(P, state, P)


TO_TORCH_ERRORS = [
  (
    "not a tx from from_torch",
    lambda: (adamw_jax.adamw(), adamw_jax.adamw().init(P), {}),
    TypeError,
    r"^to_torch_state_dict: expected the torch optimizer to load the state into, or a transform "
    r"made by adamw_jax\.from_torch; got GradientTransformationExtraArgs\.$",
  ),
  (
    "no Adam state",
    lambda: (_opt(steps=0), optax.sgd(0.1).init(P), {}),
    ValueError,
    r"^to_torch_state_dict: the optimizer state holds no adamw_jax ScaleByAdamState",
  ),
  (
    "amsgrad on one side",
    lambda: (_opt(steps=0, amsgrad=True), adamw_jax.adamw().init(P), {}),
    ValueError,
    r"^to_torch_state_dict: param group 0 has amsgrad=True, but the JAX state of 'a' has "
    r"no nu_max \(amsgrad=False\)\.$",
  ),
  (
    "shape",
    lambda: (_opt(steps=0, shapes=((3, 2), (3,))), adamw_jax.adamw().init(P), {}),
    ValueError,
    r"^to_torch_state_dict: torch parameter 0 has shape \(3, 2\), but the JAX state of 'a' gives "
    r"exp_avg of shape \(2, 3\)\.$",
  ),
  (
    "leaf outside adam",
    lambda: (
      _opt(steps=0),
      optax.partition(
        {"adam": adamw_jax.adamw(), "frozen": optax.set_to_zero()}, {"a": "adam", "b": "frozen"}
      ).init(P),
      {},
    ),
    ValueError,
    r"^to_torch_state_dict: the JAX leaf 'b' has no Adam state \(it is outside every adamw_jax "
    r"transform\), but the torch optimizer updates every parameter\.$",
  ),
]


@pytest.mark.parametrize(
  "make, error, message", [c[1:] for c in TO_TORCH_ERRORS], ids=[c[0] for c in TO_TORCH_ERRORS]
)
def test_to_torch_errors(make, error, message):
  target, state, kwargs = make()
  with pytest.raises(error, match=message):
    adamw_jax.to_torch_state_dict(target, state, **kwargs)
