"""adamw_jax against torch.optim.AdamW / Adam, configuration by configuration.

float64 runs prove the semantics (every tensor within 1e-12 relative); float32
runs measure fidelity against torch's own spread, max|torch fused - torch
single-tensor|, and require the moments to be bitwise torch's on every step.
The runs and measures are the public ``adamw_jax.equivalence``'s (through
``torch_reference.compare``). The numbers printed here (``pytest -s``) are the
table of docs/fidelity.md.
"""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest

from tests import torch_reference as ref

STEPS = 200


def _ulp_scale(report) -> float:
  return float(np.spacing(np.float32(report.params.scale)))


@pytest.mark.parametrize("case", [*ref.CASES, ref.CHAIN], ids=lambda c: c.name)
def test_float64_semantics(case):
  dtype = np.complex128 if case.complex else np.float64
  with jax.enable_x64(True):
    params, grads = ref.make_problem(dtype, STEPS)
    report = ref.compare(case, params, grads, STEPS, spread=())
  rel = {"params": ref.max_rel_of(leaf.params for leaf in report.leaves)}
  for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
    if any(key in leaf.state for leaf in report.leaves):
      rel[key] = ref.max_rel_of(leaf.state[key] for leaf in report.leaves)
  print(f"\n[float64] {case.name}: " + ", ".join(f"{k} {v:.1e}" for k, v in rel.items()))
  assert report.steps == STEPS
  step = report.state("step")
  assert step is not None and step.bitwise == 1.0 and step.scale == STEPS  # torch's and our count
  assert ("max_exp_avg_sq" in rel) == case.amsgrad
  for name, value in rel.items():
    assert value <= 1e-12, (name, value)


@pytest.mark.parametrize("case", ref.CASES, ids=lambda c: c.name)
def test_float32_fidelity(case):
  """Within 2x torch's own fused-vs-single-tensor spread; the state bitwise every step."""
  dtype = np.complex64 if case.complex else np.float32
  params, grads = ref.make_problem(dtype, STEPS)
  report = ref.compare(case, params, grads, STEPS)
  ours_diff, ours_bits = report.params.max_abs, report.params.bitwise
  if case.complex:  # torch's fused kernel has no complex support: compare with 1 ulp
    assert "fused" in report.skipped and not report.spread
    yardstick, yard_bits = _ulp_scale(report), None
  else:
    yardstick, yard_bits = report.spread["fused"].max_abs, report.spread["fused"].bitwise
  ratio = ours_diff / yardstick if yardstick > 0 else (0.0 if ours_diff == 0 else np.inf)
  print(
    f"\n[float32] {case.name}: ours {ours_diff:.3g} ({ours_bits:.2%} bitwise), "
    f"yardstick {yardstick:.3g}"
    + (f" ({yard_bits:.2%} bitwise)" if yard_bits is not None else " (1 ulp)")
    + f", ratio {ratio:.2f}"
  )
  assert report.state_bitwise_every_step, (
    "count/mu/nu/nu_max differ from torch's step/exp_avg/exp_avg_sq/max_exp_avg_sq"
  )
  assert ("max_exp_avg_sq" in report.leaves[0].state) == case.amsgrad
  assert report.state("step").scale == STEPS
  assert ratio <= 2.0
  if yard_bits is not None:
    assert ours_bits >= yard_bits - 0.005


def test_float32_public_chain():
  """scale_by_adam -> add_decayed_weights -> scale_by_learning_rate: same math, optax's rounding.

  torch rounds the decay factor (1 - lr*wd) to float32 (a relative error up to
  3e-8 of the factor, i.e. up to 0.3 % of the decay itself, the same every
  step); the chain computes p - lr*(u + wd*p) and cannot see that rounding, so
  it drifts from torch like optax.adamw does (docs/fidelity.md).
  Its moments are still torch's, bit for bit.
  """
  case = ref.CHAIN
  params, grads = ref.make_problem(np.float32, STEPS)
  ours = ref.compare(case, params, grads, STEPS)
  plain_optax = ref.compare(
    case, params, grads, STEPS, tx=optax.adamw(1e-3, weight_decay=1e-2), spread=()
  )
  chain_diff = ours.params.max_abs
  optax_diff = plain_optax.params.max_abs
  ratio = chain_diff / ours.spread["fused"].max_abs
  print(
    f"\n[float32] public-pieces chain: {chain_diff:.3g} (ratio {ratio:.0f}); optax.adamw {optax_diff:.3g}"
  )
  assert ours.state("exp_avg").max_abs == 0.0
  assert ours.state("exp_avg_sq").max_abs == 0.0
  assert not plain_optax.leaves[0].state  # optax.adamw's state is not ours: params only
  assert chain_diff <= 1.5 * optax_diff


def test_float32_results_unchanged_by_x64():
  """Enabling x64 for other reasons must not change float32 results."""
  case = ref.CASES[0]
  params, grads = ref.make_problem(np.float32, 50)
  plain = ref.run_jax(case, params, grads, 50)
  with jax.enable_x64(True):
    wide = ref.run_jax(case, params, grads, 50)
  for k in params:
    assert wide.params[k].dtype == np.float32
    np.testing.assert_array_equal(wide.params[k], plain.params[k])
    np.testing.assert_array_equal(wide.exp_avg_sq[k], plain.exp_avg_sq[k])


def test_reference_workload():
  """100k params, 1000 steps: ours vs torch single-tensor, next to torch fused.

  (optax.adamw's column of docs/fidelity.md is measured by benchmarks/fidelity.py;
  here optax.adamw is compared in test_float32_public_chain.)
  """
  params, grads, steps = ref.reference_workload()
  case = ref.Case("reference")
  ours = ref.compare(case, params, grads, steps)
  fused = ours.spread["fused"]
  rows = {"adamw_jax.adamw": ours.params, "torch fused": fused}
  print("\n[reference workload, float32, 1000 steps] vs torch foreach=False")
  for name, d in rows.items():
    print(f"  {name:16s} max|diff| {d.max_abs:.3g}   bitwise {d.bitwise:.2%}")
  assert ours.state("exp_avg").max_abs == 0.0
  assert ours.state("exp_avg_sq").max_abs == 0.0
  assert ours.params.max_abs <= 2 * fused.max_abs
  assert ours.params.bitwise >= fused.bitwise - 0.005


@pytest.mark.parametrize(
  "size", [1000, 1 << 16], ids=["small: true division", "large: residual step"]
)
def test_division_by_bc2_sqrt_is_correctly_rounded(size):
  """Both ways the kernel divides by sqrt(1 - b2**t) give IEEE's a / b, special values included.

  `a` is sqrt(v): 0, inf, NaN or within [sqrt(FLT_MIN), sqrt(FLT_MAX)] (XLA on
  CPU flushes subnormal v to zero; docs/fidelity.md).
  """
  import jax.numpy as jnp

  from adamw_jax import _steer

  rng = np.random.default_rng(0)
  tiny, huge = np.sqrt(np.finfo(np.float32).tiny), np.sqrt(np.finfo(np.float32).max)
  special = np.array([0.0, np.inf, np.nan, tiny, huge, 1.0, 2.0], np.float32)
  a = np.exp(rng.uniform(np.log(tiny), np.log(huge), size)).astype(np.float32)
  a[: special.size] = special
  divide = jax.jit(_steer.divide_by_scalar)
  for b in np.float32([np.sqrt(1 - 0.999), np.sqrt(1 - 0.999**7), 0.9999999, 1.0]):
    ours = np.asarray(divide(jnp.asarray(a), jnp.asarray(b), jnp.zeros([], jnp.int32)))
    with np.errstate(over="ignore"):
      expected = a / b
    np.testing.assert_array_equal(ours.view(np.uint32), expected.view(np.uint32))


def test_tabulated_step_scalars_are_torchs_python_floats():
  """Step size and sqrt(1 - b2**t), read per step from _steps' table, as torch computes them."""
  import jax.numpy as jnp

  from adamw_jax import _steps

  lr, b1, b2 = 3e-4, 0.9, 0.999
  assert _steps.rows_until_one(b1) == 356 and _steps.rows_until_one(b2) == 37412
  for t in [1, 2, 100, 355, 356, 357, 20_000, 37_411, 37_412, 37_413, 10**6, 2**31 - 1]:
    step = float(t)  # torch's step tensor, as a Python float
    step_size, bc2_sqrt = _steps.lookup(b1, b2, lr, jnp.int32(t), np.float32, scheduled=False)
    bc1_hi, bc1_lo, bc2_sqrt_too = _steps.lookup(
      b1, b2, None, jnp.int32(t), np.float32, scheduled=True
    )
    assert np.float32(step_size) == np.float32(-(lr / (1 - b1**step))), t
    assert np.float32(bc2_sqrt) == np.float32(bc2_sqrt_too) == np.float32((1 - b2**step) ** 0.5), t
    assert float(bc1_hi) + float(bc1_lo) == pytest.approx(1 - b1**step, rel=2**-46), t
  assert _steps.lookup(b1, 0.9999, lr, jnp.int32(1), np.float32, scheduled=False) is None  # series


@pytest.mark.parametrize(
  "b1, b2, lr, scheduled",
  [(0.9, 0.999, 3e-4, False), (0.9, 0.999, None, True), (0.5, 0.99, 1.0, False)],
)
def test_tpu_step_scalars_without_the_table_are_the_tables(b1, b2, lr, scheduled):
  """A TPU program's rows (the series, corrected where listed) are the table's, at every row."""
  import functools
  import types

  import jax.numpy as jnp

  from adamw_jax import _scalars, _steps

  cfg = types.SimpleNamespace(b1=b1, b2=b2)
  series = functools.partial(_scalars._series_row, cfg, lr, scheduled, jnp.float32)
  rows = _steps._rows(b1, b2, scheduled, jnp.float32)
  table = _steps._table(b1, b2, lr, scheduled, rows, "float32")
  t = jnp.arange(rows + 1, dtype=jnp.int32)
  fixed = functools.partial(
    _steps.without_table, b1, b2, lr, dtype=jnp.float32, scheduled=scheduled, series=series
  )
  both = jax.jit(jax.vmap(lambda t: (fixed(t), series(jnp.maximum(t, 1)))))(t)
  corrected, raw = (np.stack(x, axis=-1) for x in both)
  listed = {
    (at, column) for at, column, _ in _steps.disagreements(b1, b2, lr, scheduled, "float32")
  }
  exact = [0, 1] if not scheduled else [2]  # a scheduled lr's pair (1 - b1**t) is the series' own
  for column in exact:
    np.testing.assert_array_equal(
      corrected[:, column].view(np.uint32), table[:, column].view(np.uint32)
    )
    unlisted = np.array([(i, column) not in listed for i in range(rows + 1)])
    assert np.array_equal(raw[unlisted, column], table[unlisted, column])
  if scheduled:  # hi + lo within 2**-46 of 1 - b1**t, as the table's split of torch's double
    sums = corrected[:, 0].astype(np.float64) + corrected[:, 1]
    np.testing.assert_allclose(sums, table[:, 0].astype(np.float64) + table[:, 1], rtol=2**-46)
