"""The code GPU and TPU get, run on the CPU: the XLA:CPU tricks off, the results still torch's.

``_steer`` selects the tricks that only XLA:CPU needs by platform
(``_steer.on_cpu``). Here that choice is forced off on the CPU (and the
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
  monkeypatch.setattr(_steer, "on_cpu", lambda: False)
  monkeypatch.setenv(_env.NATIVE.name, "0")


@pytest.mark.parametrize("case", ref.CASES, ids=lambda c: c.name)
def test_generic_path_float64_semantics(case, generic):
  with jax.enable_x64(True):
    params, grads = ref.make_problem(np.complex128 if case.complex else np.float64, STEPS)
    theirs = ref.run_torch(case, params, grads, STEPS, foreach=False)
    ours = ref.run_jax(case, params, grads, STEPS)
  assert ref.max_rel(ours.params, theirs.params) <= 1e-12
  assert ref.max_rel(ours.exp_avg_sq, theirs.exp_avg_sq) <= 1e-12


@pytest.mark.parametrize("case", ref.CASES, ids=lambda c: c.name)
def test_generic_path_float32_close(case, generic):
  params, grads = ref.make_problem(np.complex64 if case.complex else np.float32, STEPS)
  theirs = ref.run_torch(case, params, grads, STEPS, foreach=False)
  ours = ref.run_jax(case, params, grads, STEPS)
  scale = np.abs(ref.flat(theirs.params)).max()
  assert ref.max_abs(ours.params, theirs.params) <= 1e-6 * scale


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
