"""The code GPU and TPU get: chosen where the step is lowered, and run on the CPU, still torch's.

``_steer.per_platform`` is a primitive lowered per platform: the same traced
step lowered for TPU or GPU has neither the native call nor the XLA:CPU
tricks (checked for every public step). Then that choice is forced off on the CPU (and the
native kernel with it), as it is off on an accelerator: the float64
semantics must still match torch to 1e-12 and the float32 results stay close
(not bitwise: XLA:CPU then divides by the reciprocal, which is why the
tricks exist). On a GPU, ``python -m benchmarks.device`` measures the same
table against torch CUDA.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from adamw_jax import _env, _steer
from tests import torch_reference as ref

STEPS = 50


@pytest.fixture
def generic(monkeypatch):
  """Every platform-dependent choice takes the other platforms' code, on this CPU."""
  monkeypatch.setattr(_steer, "per_platform", lambda cpu, default, *args, out, **_: default(*args))
  monkeypatch.setenv(_env.NATIVE.name, "0")


@pytest.mark.parametrize("case", ref.CASES, ids=lambda c: c.name)
def test_generic_path_float64_semantics(case, generic):
  with jax.enable_x64(True):
    params, grads = ref.make_problem(np.complex128 if case.complex else np.float64, STEPS)
    report = ref.compare(case, params, grads, STEPS, spread=())
  assert ref.max_rel_of(leaf.params for leaf in report.leaves) <= 1e-12
  assert ref.max_rel_of(leaf.state["exp_avg_sq"] for leaf in report.leaves) <= 1e-12


@pytest.mark.parametrize("case", ref.CASES, ids=lambda c: c.name)
def test_generic_path_float32_close(case, generic):
  params, grads = ref.make_problem(np.complex64 if case.complex else np.float32, STEPS)
  report = ref.compare(case, params, grads, STEPS, spread=())
  assert report.params.max_abs <= 1e-6 * report.params.scale


def test_generic_path_has_no_cpu_tricks(generic):
  """No scalar packed into a complex number, no Markstein residual: plain divisions."""
  import jax.numpy as jnp

  import adamw_jax

  tx = adamw_jax.adamw(1e-3)
  p = {"w": jnp.ones(100_000)}
  text = jax.jit(lambda p, s: tx.update(p, s, p)).lower(p, tx.init(p)).as_text()
  ops = [line for line in text.splitlines() if "stablehlo." in line]
  assert not any("stablehlo.complex" in op for op in ops)  # no packed scalars
  assert not any("stablehlo.minimum" in op and "100000x" in op for op in ops)  # no Markstein cap
  assert any("stablehlo.divide" in op and "100000x" in op for op in ops)


def _public_steps():
  import jax.numpy as jnp
  import optax

  import adamw_jax

  bf16 = jnp.bfloat16
  # name: (transform, parameter dtype, fused_step, a native kernel serves it on the CPU)
  return {
    "adamw": (lambda: adamw_jax.adamw(1e-3), jnp.float32, False, True),
    "fused_step": (lambda: adamw_jax.adamw(1e-3), jnp.float32, True, True),
    "adam, amsgrad": (lambda: adamw_jax.adam(1e-3, amsgrad=True), jnp.float32, False, True),
    "param_groups": (
      lambda: adamw_jax.param_groups(
        {"b": (r"b$", {"weight_decay": 0.0})}, rest={}, learning_rate=1e-3
      ),
      jnp.float32,
      False,
      True,
    ),
    "inject_hyperparams": (
      lambda: optax.inject_hyperparams(adamw_jax.adamw)(learning_rate=1e-3),
      jnp.float32,
      False,
      True,
    ),
    "bf16 moments": (
      lambda: adamw_jax.adamw(1e-3, mu_dtype=bf16, nu_dtype=bf16),
      jnp.float32,
      True,
      True,
    ),
    "8-bit moments": (lambda: adamw_jax.adamw(1e-3, moment_bits=8), jnp.float32, True, True),
    "4-bit moments": (lambda: adamw_jax.adamw(1e-3, moment_bits=4), jnp.float32, False, True),
    "stochastic rounding": (
      lambda: adamw_jax.adamw(1e-3, param_rounding="stochastic"),
      bf16,
      True,
      True,
    ),
    "kahan": (lambda: adamw_jax.adamw(1e-3, param_rounding="kahan"), bf16, False, True),
    "bf16 params": (lambda: adamw_jax.adamw(1e-3), bf16, False, True),
    "remainder": (lambda: adamw_jax.adamw(1e-3, param_rounding="remainder"), bf16, True, True),
  }


@pytest.mark.parametrize("name", list(_public_steps()))
def test_one_traced_step_lowers_for_cpu_tpu_and_gpu_each_with_its_own_code(name):
  """The platform decides at lowering, not the host: from this CPU host, lowered for all three."""
  import re

  import jax.numpy as jnp
  import optax

  import adamw_jax
  from adamw_jax import _native

  make, dtype, fused, native = _public_steps()[name]
  tx = make()
  params = {"w": jnp.ones((64, 128), dtype), "b": jnp.ones(128, dtype)}
  state = tx.init(params)

  def step(params, state, grads):
    if fused:
      return adamw_jax.fused_step(tx, grads, state, params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  traced = jax.jit(step).trace(params, state, params)
  text = {p: traced.lower(lowering_platforms=(p,)).as_text() for p in ("cpu", "tpu", "cuda")}
  targets = (_native.TARGET, _native.LOWMEM_TARGET)
  for platform in ("tpu", "cuda"):
    assert not any(t in text[platform] for t in targets)
    assert "stablehlo.complex" not in text[platform]
  if name == "8-bit moments":  # each accelerator its own kernel for the quantized leaf (_accel)
    assert "tpu_custom_call" in text["tpu"] and "tpu_custom_call" not in text["cuda"]
    assert "triton" in text["cuda"] and "triton" not in text["tpu"]
  # The step-scalar table (one 1-D constant per column) on CPU and GPU, with Python-number betas;
  # a TPU computes its rows (and sums traced betas' series unrolled, its coefficients scalars).
  tables = {
    p: re.findall(r"stablehlo.constant dense<[^>]*> : tensor<\d{4,}xf32>", text[p]) for p in text
  }
  assert len(tables["cpu"]) == len(tables["cuda"]) and not tables["tpu"]
  assert bool(tables["cpu"]) == (name != "inject_hyperparams")  # its betas are traced
  assert text["tpu"] != text["cuda"]
  assert text["cpu"] != text["tpu"]  # the XLA:CPU tricks (and the native call where it serves)
  assert any(t in text["cpu"] for t in targets) == native


@pytest.mark.parametrize("scheduled", [False, True])
def test_the_step_scalar_table_is_small_on_a_tpu(scheduled):
  """1-D constants of at most 1 MiB in all: a (rows, 2) table is padded to 128 columns on a TPU.

  Read from the compiled CPU program (the TPU compiler itself runs in ``.ci/compiled``).
  """
  import re

  import jax.numpy as jnp
  import optax

  import adamw_jax
  from adamw_jax import _steps

  lr = optax.cosine_decay_schedule(1e-3, 100) if scheduled else 1e-3
  tx = adamw_jax.adamw(lr)
  params = {"w": jnp.ones((64, 128))}
  step = lambda p, s: tx.update(p, s, p)
  text = jax.jit(step).lower(params, tx.init(params)).compile().as_text()
  shapes = re.findall(r"f(32|64)\[([\d,]+)\]\{[^}]*\} constant\(", text)
  tables = [([int(d) for d in dims.split(",")], int(bits) // 8) for bits, dims in shapes]
  tables = [(dims, size) for dims, size in tables if np.prod(dims) > 1000]
  assert len(tables) == (3 if scheduled else 2), tables  # one column each
  assert all(len(dims) == 1 for dims, _ in tables), tables
  assert sum(dims[0] * size for dims, size in tables) <= _steps.MAX_BYTES


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_the_taylor_series_of_gpu_and_tpu_is_the_cpus_one_bit_for_bit(dtype):
  """``expm1``'s series: in a loop on GPU, unrolled on CPU, unrolled with scalar constants on TPU.

  The loop compiles fast for a GPU; a TPU keeps scalars out of device memory (``_float2``).

  Both run here on the CPU, over the whole reduced range, hi and lo parts: equal bits.
  """
  import jax.numpy as jnp
  import numpy as np

  from adamw_jax import _float2 as f2

  with jax.enable_x64(dtype == "float64"):
    rng = np.random.default_rng(0)
    hi = rng.uniform(-np.log(2) / 2, np.log(2) / 2, 4096).astype(dtype)
    lo = (hi * rng.uniform(-(2.0**-25), 2.0**-25, hi.size)).astype(dtype)
    z = jnp.zeros((), jnp.uint32)  # the opaque zero
    r = f2.F2(jnp.asarray(hi), jnp.asarray(lo))
    rolled = jax.jit(f2._rolled)(r, z)
    unrolled = jax.jit(f2._unrolled)(r, z)
    scalar = jax.jit(f2._scalar_unrolled)(r, z)
    for a, b, c in zip(rolled, unrolled, scalar):
      np.testing.assert_array_equal(np.asarray(a).view(np.uint8), np.asarray(b).view(np.uint8))
      np.testing.assert_array_equal(np.asarray(c).view(np.uint8), np.asarray(b).view(np.uint8))
    # and they are expm1(r) / r (to float64's accuracy, for float64 pairs)
    x = hi.astype(np.float64) + lo.astype(np.float64)
    want = np.expm1(x) / x
    got = np.asarray(rolled.hi, np.float64) + np.asarray(rolled.lo, np.float64)
    assert np.max(np.abs(got - want) / np.abs(want)) < (1e-13 if dtype == "float32" else 1e-15)
