"""The one-pass layout of the kernel under XLA's multi-output fusion flag.

With ``XLA_FLAGS=--xla_backend_extra_options=xla_cpu_use_multi_output_fusion``
the kernel recomputes the parameter from the inputs so that XLA fuses the whole
step into one loop (``adamw_jax._kernel._real_kernel``). These tests run a few
steps of each configuration in a fresh process with the flag and check the
results bit for bit against a process without it, and that plain AdamW then
compiles to one loop over the parameters, against three without the flag.
The layout is the pure-JAX kernel's, so these processes run with the native
CPU kernel off (``ADAMW_JAX_NATIVE=0``; ``tests/test_native.py`` covers it).
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adamw_jax
from adamw_jax import _env

N = 1003
CONFIGS = {
  "adamw": lambda: adamw_jax.adamw(1e-3, weight_decay=1e-2),
  "amsgrad": lambda: adamw_jax.adamw(1e-2, weight_decay=1e-2, amsgrad=True),
  "maximize": lambda: adamw_jax.adamw(1e-3, weight_decay=0.1, maximize=True),
  "adam_l2": lambda: adamw_jax.adam(1e-3, weight_decay=1e-2),
  "no_decay": lambda: adamw_jax.adamw(1e-3, weight_decay=0.0),
  "scale_by_adam": lambda: adamw_jax.scale_by_adam(eps_root=1e-8),
  "bf16_params": lambda: adamw_jax.adamw(1e-3, weight_decay=1e-2, mu_dtype=jnp.float32),
}
DTYPES = {"bf16_params": jnp.bfloat16}


def _loops(compiled_text: str) -> int:
  """Loop fusions over the N-element arrays in the entry computation."""
  entry = compiled_text[compiled_text.index("ENTRY") :]
  return sum(
    1 for line in entry.splitlines() if " fusion(" in line and f"[{N}]" in line.split(" fusion(")[0]
  )


def run_configs() -> dict:
  """Per configuration: a digest of params and state after 5 steps, and the number of loops."""
  rng = np.random.default_rng(0)
  out = {}
  for name, make in CONFIGS.items():
    dtype = DTYPES.get(name, jnp.float32)
    params = {
      "w": jnp.asarray(rng.standard_normal(N), dtype),
      "b": jnp.asarray(rng.standard_normal(7), dtype),
    }
    tx = make()
    state = tx.init(params)

    def step(p, s, g, tx=tx):
      u, s = tx.update(g, s, p)
      return optax.apply_updates(p, u), s

    step = jax.jit(step)
    loops = _loops(step.lower(params, state, params).compile().as_text())
    digest = hashlib.sha256()
    for t in range(5):
      grads = jax.tree.map(
        lambda p: jnp.asarray(rng.standard_normal(p.shape) * 10.0**-t, p.dtype), params
      )
      params, state = step(params, state, grads)
      for leaf in jax.tree.leaves((params, state)):
        digest.update(np.asarray(leaf).tobytes())
    out[name] = {"digest": digest.hexdigest(), "loops": loops}
  return out


def _in_fresh_process(xla_flags: str) -> dict:
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["ADAMW_JAX_NATIVE"] = "0"
  if xla_flags:
    env["XLA_FLAGS"] = xla_flags
  code = "import json, tests.test_one_pass as t; print(json.dumps(t.run_configs()))"
  root = pathlib.Path(__file__).resolve().parent.parent
  proc = subprocess.run(
    [sys.executable, "-c", code], env=env, cwd=root, stdout=subprocess.PIPE, text=True, check=True
  )
  return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def with_flag() -> dict:
  return _in_fresh_process(f"--xla_backend_extra_options={_env.MULTI_OUTPUT_FUSION_FLAG}")


@pytest.fixture(scope="module")
def without_flag() -> dict:
  return _in_fresh_process("")


@pytest.mark.parametrize("name", CONFIGS)
def test_flag_changes_no_bit(name, with_flag, without_flag):
  assert with_flag[name]["digest"] == without_flag[name]["digest"]


def test_adamw_is_one_loop_with_the_flag_three_without(with_flag, without_flag):
  assert with_flag["adamw"]["loops"] == 1
  assert without_flag["adamw"]["loops"] == 3
