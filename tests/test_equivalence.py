"""The public equivalence check, ``adamw_jax.equivalence``: replays, reports, outputs, command.

A table of configurations where the report must say what docs/fidelity.md
claims on a CPU (torch's state, step and moments, bitwise after every step;
the parameters within torch's own fused-vs-single-tensor spread); runs it must
catch (another optimizer, another learning rate, a model's weights copied in
the wrong layout); and a table of bad inputs with their messages.
"""

from __future__ import annotations

import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

import adamw_jax
from adamw_jax import equivalence

STEPS = 30
SHAPES = [(6, 4), (4,), (), (2, 3, 5)]


def _tensors(shapes=SHAPES, seed=0, dtype=torch.float32) -> list[torch.nn.Parameter]:
  gen = torch.Generator().manual_seed(seed)
  return [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=dtype)) for s in shapes]


def _check_within_spread(report: equivalence.Report, before: int = 0) -> None:
  """What docs/fidelity.md says of the default transform on a CPU (`before`: steps done before)."""
  table = f"\n{report}"
  assert report.state_bitwise_every_step, table
  assert report.state("step").scale == before + report.steps  # torch's count and ours, every step
  for key in ("exp_avg", "exp_avg_sq"):
    assert report.state(key).bitwise == 1.0 and report.state(key).first_step is None, table
  fused = report.spread["fused"]
  assert report.params.max_abs <= 2 * fused.max_abs, table
  # bitwise as often as torch fused, but for 0.5 % or two elements (a small problem's grain)
  assert report.params.bitwise >= fused.bitwise - max(0.005, 2 / report.params.size), table
  assert report.params.max_ulps <= 2 * fused.max_ulps, table


# name: (torch class, its settings, one group's or several groups' overrides)
CONFIGS = {
  "default": (torch.optim.AdamW, {}, None),
  "no decay": (torch.optim.AdamW, {"weight_decay": 0.0}, None),
  "decay 0.1, lr 1e-2": (torch.optim.AdamW, {"weight_decay": 0.1, "lr": 1e-2}, None),
  "amsgrad": (torch.optim.AdamW, {"amsgrad": True}, None),
  "maximize": (torch.optim.AdamW, {"maximize": True}, None),
  "betas, eps": (torch.optim.AdamW, {"betas": (0.8, 0.99), "eps": 1e-6}, None),
  "adam + L2, amsgrad, maximize": (
    torch.optim.Adam,
    {"weight_decay": 0.05, "amsgrad": True, "maximize": True},
    None,
  ),
  "param groups": (
    torch.optim.AdamW,
    {"lr": 1e-3},
    [{"weight_decay": 0.1}, {"weight_decay": 0.0, "lr": 3e-3, "amsgrad": True}],
  ),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_the_default_transform_is_torchs_single_tensor_path(name):
  cls, settings, groups = CONFIGS[name]
  tensors = _tensors()
  if groups is None:
    optimizer = cls(tensors, **settings)
  else:
    half = len(tensors) // 2
    optimizer = cls(
      [{"params": tensors[:half], **groups[0]}, {"params": tensors[half:], **groups[1]}],
      **settings,
    )
  report = equivalence.compare_optimizers(optimizer, steps=STEPS, seed=1)  # from_torch's tx
  print(f"\n[{name}]\n{report}")
  assert report.steps == STEPS and len(report.leaves) == len(SHAPES)
  assert ("max_exp_avg_sq" in report.leaves[-1].state) == (
    settings.get("amsgrad", False) or bool(groups and groups[1].get("amsgrad"))
  )
  _check_within_spread(report)
  assert all(not t.grad_fn and t.grad is None for t in tensors)  # the optimizer is left alone
  assert not optimizer.state


def _flax_params(model: torch.nn.Sequential) -> dict:
  """The Linear layers' weights as a Flax-like tree: kernels (in, out)."""
  return {
    str(i): {
      "kernel": jnp.asarray(model[i].weight.detach().numpy().T),
      "bias": jnp.asarray(model[i].bias.detach().numpy()),
    }
    for i in (0, 2)
  }


def test_an_explicit_transform_in_flax_layout_continuing_a_run():
  """A Linear model, a Flax-like tree (kernel transposed), names and flax_layout; tx given."""
  model = torch.nn.Sequential(torch.nn.Linear(5, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))
  optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
  params = _flax_params(model)
  mapping = adamw_jax.flax_layout(params)
  tx = adamw_jax.adamw(1e-2, weight_decay=0.1)
  report = equivalence.compare_optimizers(
    optimizer, tx, params, steps=STEPS, names=model, mapping=mapping
  )
  assert [leaf.path for leaf in report.leaves] == [
    "0/kernel",
    "0/bias",
    "2/kernel",
    "2/bias",
  ]
  assert report.leaves[0].name == "0.weight" and report.leaves[0].shape == (3, 5)
  _check_within_spread(report)

  # Mid-run: the optimizer's state continues through from_torch's transform and state.
  x = torch.randn(4, 5)
  model(x).square().sum().backward()
  optimizer.step()
  params = _flax_params(model)
  later = equivalence.compare_optimizers(
    optimizer, None, params, steps=5, names=model, mapping=mapping
  )
  _check_within_spread(later, before=1)
  assert all(s["step"].item() == 1 for s in optimizer.state.values())  # left as it was


def test_recorded_gradients_torch_tensors_and_the_last_step():
  tensors = _tensors([(3, 2), (2,)])
  optimizer = torch.optim.AdamW(tensors, lr=1e-2)
  recorded = [[torch.full((3, 2), 0.5 * t), torch.full((2,), -1.0)] for t in range(1, 8)]
  report = equivalence.compare_optimizers(optimizer, grads=recorded)
  assert report.steps == 7
  _check_within_spread(report)
  fewer = equivalence.compare_optimizers(optimizer, grads=recorded, steps=3, spread=())
  assert fewer.steps == 3 and fewer.spread == {} and fewer.skipped == {}


def test_it_finds_where_another_optimizer_parts():
  """The check can fail: another lr parts at step 1; optax.adamw's state is not compared."""
  tensors = _tensors()
  optimizer = torch.optim.AdamW(tensors, lr=1e-3, weight_decay=1e-2)
  params = [jnp.asarray(t.detach().numpy()) for t in tensors]
  other_lr = equivalence.compare_optimizers(
    optimizer, adamw_jax.adamw(1.1e-3, weight_decay=1e-2), params, steps=5, spread=()
  )
  assert other_lr.params.first_step == 1 and other_lr.params.bitwise < 0.5
  assert other_lr.params.max_ulps > 100
  assert other_lr.state("exp_avg").bitwise == 1.0  # the moments do not see the lr
  assert not other_lr.state_bitwise_every_step or other_lr.params.first_step is not None
  plain = equivalence.compare_optimizers(
    optimizer, optax.adamw(1e-3, weight_decay=1e-2), params, steps=STEPS
  )
  assert all(not leaf.state for leaf in plain.leaves) and not plain.state_bitwise_every_step
  assert plain.params.first_step is not None
  assert plain.params.max_abs > 10 * plain.spread["fused"].max_abs
  assert "n/a" in plain.table()


def test_complex_parameters_have_no_fused_yardstick():
  tensors = _tensors([(4, 3)], dtype=torch.complex64)
  report = equivalence.compare_optimizers(torch.optim.AdamW(tensors), steps=10)
  assert "fused" in report.skipped and report.spread == {}
  assert report.state_bitwise_every_step
  assert "fused: not run" in report.table()


def test_float64():
  tensors = _tensors(dtype=torch.float64)
  with jax.enable_x64(True):
    report = equivalence.compare_optimizers(torch.optim.AdamW(tensors), steps=STEPS)
  assert report.leaves[0].dtype == "float64"
  _check_within_spread(report)


@pytest.mark.parametrize(
  ("a", "b", "ulps", "bitwise"),
  [
    (1.0, np.nextafter(np.float32(1), np.float32(2)), 1, 0.0),
    (-1.0, np.nextafter(np.float32(-1), np.float32(-2)), 1, 0.0),
    (  # -tiny, -0 / +0, tiny: two ulps
      -np.float32(1e-45),
      np.float32(1e-45),
      2,
      0.0,
    ),
    (0.5, 0.5, 0, 1.0),
    (1.0, 2.0, 2**23, 0.0),
  ],
)
def test_ulps_and_bits(a, b, ulps, bitwise):
  d = equivalence.Diff.of(np.float32([a]), np.float32([b]), None)
  assert d.max_ulps == ulps and d.bitwise == bitwise
  assert d.max_abs == abs(float(np.float32(a)) - float(np.float32(b)))


def test_a_diff_of_complex_counts_real_and_imaginary_parts():
  d = equivalence.Diff.of(np.complex64([1 + 1j, 2]), np.complex64([1 + 1j, 2 + 1j]), 3)
  assert (d.size, d.bitwise, d.max_abs, d.first_step) == (4, 0.75, 1.0, 3)
  both = equivalence.Diff.combine([d, equivalence.Diff.of(np.float32([1]), np.float32([1]), None)])
  assert (both.size, both.bitwise, both.first_step) == (5, 0.8, 3)


# ----------------------------------------------------------------------------- a model's outputs


class TorchCNN(torch.nn.Module):
  """conv (1 -> 2 channels, 3x3) - tanh - flatten (channels first) - dense: an NCHW model."""

  def __init__(self) -> None:
    super().__init__()
    torch.manual_seed(0)
    self.conv = torch.nn.Conv2d(1, 2, 3, padding=1)
    self.dense = torch.nn.Linear(2 * 4 * 4, 3)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.dense(torch.tanh(self.conv(x)).flatten(1))


class FlaxCNN(nn.Module):
  """Its twin in Flax, on NHWC input; flattens channels last."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = jnp.tanh(nn.Conv(2, (3, 3), padding="SAME", name="conv")(x))
    return nn.Dense(3, name="dense")(x.reshape((x.shape[0], -1)))


def _copied(torch_model: TorchCNN, fix_flatten: bool) -> dict:
  """The torch weights in Flax's layouts, with or without the dense rows reordered."""
  w = torch_model.dense.weight.detach().numpy().T  # (c*h*w, out)
  if fix_flatten:  # rows in torch's (c, h, w) order -> Flax's (h, w, c) order
    w = w.reshape(2, 4, 4, 3).transpose(1, 2, 0, 3).reshape(32, 3)
  return {
    "params": {
      "conv": {
        "kernel": torch_model.conv.weight.detach().numpy().transpose(2, 3, 1, 0),
        "bias": torch_model.conv.bias.detach().numpy(),
      },
      "dense": {"kernel": w, "bias": torch_model.dense.bias.detach().numpy()},
    }
  }


def test_compare_outputs_catches_the_flatten_order():
  torch_model = TorchCNN()
  x = np.random.default_rng(0).standard_normal((5, 4, 4, 1)).astype(np.float32)  # NHWC
  nchw = x.transpose(0, 3, 1, 2)
  naive = equivalence.compare_outputs(
    torch_model, FlaxCNN().apply, _copied(torch_model, False), x, torch_batch=nchw
  )
  fixed = equivalence.compare_outputs(
    torch_model, FlaxCNN().apply, _copied(torch_model, True), x, torch_batch=nchw
  )
  print(f"\nnaive: {naive}\nfixed: {fixed}")
  assert not naive.allclose and naive.max_abs > 1e-2 and "DIFFER" in str(naive)
  assert fixed.allclose and fixed.max_abs < 1e-5 and "agree" in str(fixed)
  assert torch_model.training  # eval() only for the check


# ----------------------------------------------------------------------------- the command


def test_the_command_prints_the_table(capsys):
  report = equivalence.main(
    ["--steps", "4", "--shapes", "3x2", "scalar", "--amsgrad", "--weight-decay", "0.1"]
  )
  out = capsys.readouterr().out
  assert "max |diff|" in out and "parameter 1 | ()" in out and "fused: max |diff|" in out
  assert report.steps == 4 and [leaf.shape for leaf in report.leaves] == [(3, 2), ()]
  assert report.state_bitwise_every_step and "max_exp_avg_sq" in report.leaves[0].state
  adam = equivalence.main(["--adam", "--steps", "2", "--dtype", "float64", "--spread"])
  assert adam.leaves[0].dtype == "float64" and adam.spread == {}


@pytest.mark.parametrize(
  ("argv", "message"),
  [
    (["--steps", "0"], "must be a positive integer"),
    (["--shapes", "3xa"], "a shape is sizes joined by 'x'"),
    (["--spread", "bogus"], "invalid choice"),
  ],
)
def test_the_command_refuses(argv, message, capsys):
  with pytest.raises(SystemExit):
    equivalence.main(argv)
  assert message in capsys.readouterr().err


# ----------------------------------------------------------------------------- bad inputs


def _opt(**kw):
  return torch.optim.AdamW(_tensors([(3, 2), (2,)]), **kw)


def _with_state():
  opt = _opt()
  for p in opt.param_groups[0]["params"]:
    p.grad = torch.ones_like(p)
  opt.step()
  return opt


BAD = {
  "not a torch optimizer": (
    lambda: equivalence.compare_optimizers(adamw_jax.adamw(1e-3)),
    TypeError,
    "expected a torch.optim optimizer",
  ),
  "spread as a string": (
    lambda: equivalence.compare_optimizers(_opt(), spread="fused"),
    ValueError,
    "spread= names torch implementations",
  ),
  "unknown spread": (
    lambda: equivalence.compare_optimizers(_opt(), spread=("cuda",)),
    ValueError,
    r"a tuple of \['foreach', 'fused'\]",
  ),
  "zero steps": (
    lambda: equivalence.compare_optimizers(_opt(), steps=0),
    ValueError,
    "steps must be a positive integer",
  ),
  "a gradient function without steps": (
    lambda: equivalence.compare_optimizers(_opt(), grads=lambda t: []),
    ValueError,
    "pass steps= too",
  ),
  "gradients of another kind": (
    lambda: equivalence.compare_optimizers(_opt(), grads={"w": np.ones(2)}),
    TypeError,
    "grads= must be None",
  ),
  "fewer recorded steps": (
    lambda: equivalence.compare_optimizers(_opt(), grads=[[np.ones((3, 2)), np.ones(2)]], steps=2),
    ValueError,
    "steps=2, but grads= holds 1 steps",
  ),
  "one gradient short": (
    lambda: equivalence.compare_optimizers(_opt(), grads=[[np.ones((3, 2))]]),
    ValueError,
    "step 0's gradients must be a sequence of 2 arrays",
  ),
  "a gradient in another layout": (
    lambda: equivalence.compare_optimizers(_opt(), grads=[[np.ones((2, 3)), np.ones(2)]]),
    ValueError,
    r"gradient 0 has shape \(2, 3\), but torch parameter 0 has shape \(3, 2\)",
  ),
  "params with other values": (
    lambda: equivalence.compare_optimizers(
      _opt(), adamw_jax.adamw(1e-3), [jnp.zeros((3, 2)), jnp.zeros(2)]
    ),
    ValueError,
    "does not hold torch parameter 0's values",
  ),
  "params in another layout": (
    lambda: equivalence.compare_optimizers(
      _opt(), adamw_jax.adamw(1e-3), [jnp.zeros((2, 3)), jnp.zeros(2)]
    ),
    ValueError,
    r"torch parameter 0 is float32\[3, 2\] in the JAX layout, but its leaf '0' is float32\[2, 3\]",
  ),
  "params of another count": (
    lambda: equivalence.compare_optimizers(_opt(), adamw_jax.adamw(1e-3), [jnp.zeros(2)]),
    ValueError,
    "the torch optimizer has 2 parameters and the JAX params have 1 leaves",
  ),
  "names without params": (
    lambda: equivalence.compare_optimizers(_opt(), names=["a", "b"]),
    ValueError,
    "names= and mapping= go with params=",
  ),
  "tx for an optimizer with state": (
    lambda: equivalence.compare_optimizers(_with_state(), adamw_jax.adamw(1e-3)),
    ValueError,
    "the optimizer already has state",
  ),
  "outputs of other shapes": (
    lambda: equivalence.compare_outputs(
      torch.nn.Linear(3, 2), lambda v, x: x, None, np.ones((4, 3), np.float32)
    ),
    ValueError,
    r"output 0 has shape \[4, 2\] in torch and \[4, 3\] in JAX",
  ),
  "another number of outputs": (
    lambda: equivalence.compare_outputs(
      torch.nn.Linear(3, 2), lambda v, x: (x, x), None, np.ones((4, 3), np.float32)
    ),
    ValueError,
    "torch gives 1 outputs, JAX 2",
  ),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_inputs(name):
  call, error, message = BAD[name]
  with pytest.raises(error, match=message):
    call()


def test_without_torch_it_says_what_to_install(monkeypatch):
  monkeypatch.setitem(sys.modules, "torch", None)  # import torch raises ImportError
  with pytest.raises(ImportError, match=r"pip install 'adamw_jax\[torch\]'"):
    equivalence.compare_optimizers(object())
  with pytest.raises(ImportError, match=r"pip install 'adamw_jax\[torch\]'"):
    equivalence.compare_outputs(object(), lambda v, x: x, None, np.ones(2))


@pytest.mark.parametrize("name", ["compare_optimizers", "compare_outputs", "random_gradients"])
def test_docstring_example_runs(name):
  """The module is not in adamw_jax.__all__ (tests/test_docstrings.py): its examples run here."""
  import doctest

  function = getattr(equivalence, name)
  tests = doctest.DocTestFinder(recurse=False).find(function, name, globs={})
  assert sum(len(t.examples) for t in tests), f"equivalence.{name} has no >>> example"
  report: list[str] = []
  runner = doctest.DocTestRunner()
  for test in tests:
    runner.run(test, out=report.append)
  assert runner.failures == 0, "".join(report)
