"""adamw_jax against torch.optim.AdamW / Adam, configuration by configuration.

float64 runs prove the semantics (every tensor within 1e-12 relative); float32
runs measure fidelity against torch's own spread, max|torch fused - torch
single-tensor|, and require the moments to be bitwise torch's on every step.
The numbers printed here (``pytest -s``) are the table of docs/fidelity.md.
"""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest

from tests import torch_reference as ref

STEPS = 200


def _compare_state(ours: ref.Run, theirs: ref.Run, metric) -> dict[str, float]:
  out = {
    "params": metric(ours.params, theirs.params),
    "exp_avg": metric(ours.exp_avg, theirs.exp_avg),
    "exp_avg_sq": metric(ours.exp_avg_sq, theirs.exp_avg_sq),
  }
  if theirs.max_exp_avg_sq is not None:
    out["max_exp_avg_sq"] = metric(ours.max_exp_avg_sq, theirs.max_exp_avg_sq)
  return out


@pytest.mark.parametrize("case", [*ref.CASES, ref.CHAIN], ids=lambda c: c.name)
def test_float64_semantics(case):
  dtype = np.complex128 if case.complex else np.float64
  with jax.enable_x64(True):
    params, grads = ref.make_problem(dtype, STEPS)
    theirs = ref.run_torch(case, params, grads, STEPS, foreach=False)
    ours = ref.run_jax(case, params, grads, STEPS)
  rel = _compare_state(ours, theirs, ref.max_rel)
  print(f"\n[float64] {case.name}: " + ", ".join(f"{k} {v:.1e}" for k, v in rel.items()))
  assert ours.step == theirs.step == STEPS
  for name, value in rel.items():
    assert value <= 1e-12, (name, value)


def _ulp_scale(tree) -> float:
  x = np.abs(ref.flat(tree)).max()
  return float(np.spacing(np.float32(x)))


@pytest.mark.parametrize("case", ref.CASES, ids=lambda c: c.name)
def test_float32_fidelity(case):
  """Within 2x torch's own fused-vs-single-tensor spread; moments bitwise every step."""
  dtype = np.complex64 if case.complex else np.float32
  params, grads = ref.make_problem(dtype, STEPS)
  states, on_step = ref.recorder(case)
  theirs = ref.run_torch(case, params, grads, STEPS, on_step=on_step, foreach=False)
  ours = ref.run_jax(case, params, grads, STEPS, torch_states=states)
  ours_diff = ref.max_abs(ours.params, theirs.params)
  ours_bits = ref.bitwise_fraction(ours.params, theirs.params)
  if case.complex:  # torch's fused kernel has no complex support: compare with 1 ulp
    yardstick, yard_bits = _ulp_scale(theirs.params), None
  else:
    fused = ref.run_torch(case, params, grads, STEPS, fused=True)
    yardstick = ref.max_abs(fused.params, theirs.params)
    yard_bits = ref.bitwise_fraction(fused.params, theirs.params)
  ratio = ours_diff / yardstick if yardstick > 0 else (0.0 if ours_diff == 0 else np.inf)
  print(
    f"\n[float32] {case.name}: ours {ours_diff:.3g} ({ours_bits:.2%} bitwise), "
    f"yardstick {yardstick:.3g}"
    + (f" ({yard_bits:.2%} bitwise)" if yard_bits is not None else " (1 ulp)")
    + f", ratio {ratio:.2f}"
  )
  assert ours.moments_bitwise_every_step, (
    "mu/nu/nu_max differ from torch's exp_avg/exp_avg_sq/max_exp_avg_sq"
  )
  assert ours.step == STEPS
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
  theirs = ref.run_torch(case, params, grads, STEPS, foreach=False)
  fused = ref.run_torch(case, params, grads, STEPS, fused=True)
  ours = ref.run_jax(case, params, grads, STEPS)
  plain_optax = ref.run_optax(params, grads, STEPS, optax.adamw(1e-3, weight_decay=1e-2))
  chain_diff = ref.max_abs(ours.params, theirs.params)
  optax_diff = ref.max_abs(plain_optax, theirs.params)
  ratio = chain_diff / ref.max_abs(fused.params, theirs.params)
  print(
    f"\n[float32] public-pieces chain: {chain_diff:.3g} (ratio {ratio:.0f}); optax.adamw {optax_diff:.3g}"
  )
  assert ref.max_abs(ours.exp_avg, theirs.exp_avg) == 0.0
  assert ref.max_abs(ours.exp_avg_sq, theirs.exp_avg_sq) == 0.0
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
  """100k params, 1000 steps: ours vs torch single-tensor, next to torch fused and optax."""
  params, grads, steps = ref.reference_workload()
  case = ref.Case("reference")
  theirs = ref.run_torch(case, params, grads, steps, foreach=False)
  fused = ref.run_torch(case, params, grads, steps, fused=True)
  ours = ref.run_jax(case, params, grads, steps)
  plain_optax = ref.run_optax(params, grads, steps, optax.adamw(1e-3, weight_decay=1e-2))
  rows = {"adamw_jax.adamw": ours.params, "torch fused": fused.params, "optax.adamw": plain_optax}
  print("\n[reference workload, float32, 1000 steps] vs torch foreach=False")
  for name, p in rows.items():
    print(
      f"  {name:16s} max|diff| {ref.max_abs(p, theirs.params):.3g}   "
      f"bitwise {ref.bitwise_fraction(p, theirs.params):.2%}"
    )
  assert ref.max_abs(ours.exp_avg, theirs.exp_avg) == 0.0
  assert ref.max_abs(ours.exp_avg_sq, theirs.exp_avg_sq) == 0.0
  assert ref.max_abs(ours.params, theirs.params) <= 2 * ref.max_abs(fused.params, theirs.params)
  assert ref.bitwise_fraction(ours.params, theirs.params) >= (
    ref.bitwise_fraction(fused.params, theirs.params) - 0.005
  )


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
