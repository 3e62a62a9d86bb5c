"""The TPU kernel of stochastically rounded bfloat16 leaves (``adamw_jax/_accel_random.py``), on this CPU.

The kernel runs in Pallas' interpreter in place of the CPU's XLA path and must give the same
parameters and moments, bit for bit, over a few fused steps: its random bits are threefry of
each element's flat index in the leaf, tile by tile and device by device, as ``jax.random.bits``
draws them for the whole leaf. Leaves it does not take keep the XLA path.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import adamw_jax
from adamw_jax import _accel_random, _lowprec, _native, _pallas, _steer

SHAPES = {
  "w": (64, 1024),  # two chunks of 512 columns a row group, four row groups (sharded: one)
  "tall": (512, 256),  # two tiles of 256 rows
  "flat": (8192,),  # rows of 128
  "odd": (10, 10),  # the XLA path
}


def _problem(steps: int = 2):
  rng = np.random.default_rng(0)
  bf16 = jnp.bfloat16
  params = {k: jnp.asarray(rng.standard_normal(s), bf16) for k, s in SHAPES.items()}
  grads = [
    {
      k: jnp.asarray(rng.standard_normal(s) * 10.0 ** rng.uniform(-3, 0), bf16)
      for k, s in SHAPES.items()
    }
    for _ in range(steps)
  ]
  return params, grads


def _run(tx):
  params, grads = _problem()
  state = tx.init(params)
  for g in grads:  # each step done before the next is dispatched (test_accel's note)
    params, state = jax.block_until_ready(adamw_jax.fused_step(tx, g, state, params))
  return params, state


def _through_kernel(tx, taken, monkeypatch):
  """`_run` with every TPU branch taken (interpreted); `taken`: the shapes the kernel took."""
  real, local = _steer.per_platform, _accel_random._local

  def choose(cpu, default, *args, out, tpu=None, gpu=None, **kw):
    if tpu is None or _steer.IN_KERNEL.get():
      return real(cpu, default, *args, out=out, **kw)
    return tpu(*args)

  def counted(spec, arrays, interpret=False):
    taken.append(tuple(arrays["g"].shape))
    return local(spec, arrays, interpret)

  monkeypatch.setattr(_steer, "per_platform", choose)
  monkeypatch.setattr(_accel_random, "_local", counted)
  with _pallas.INTERPRET.held():
    return _run(tx)


def _bytes(x):
  return np.atleast_1d(np.asarray(x)).view(np.uint8)


CONFIGS = {
  "adamw, bf16 moments": lambda: adamw_jax.adamw(
    1e-2,
    weight_decay=0.1,
    mu_dtype=jnp.bfloat16,
    nu_dtype=jnp.bfloat16,
    param_rounding="stochastic",
  ),
  "amsgrad, maximize, mask, float32 moments": lambda: adamw_jax.adamw(
    1e-2,
    amsgrad=True,
    maximize=True,
    mask=lambda p: {k: k != "w" for k in p},
    mu_dtype=jnp.float32,
    nu_dtype=jnp.float32,
    param_rounding="stochastic",
  ),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_the_kernel_is_the_xla_path_bit_for_bit(name, monkeypatch):
  # The CPU's native kernel serves these leaves too: off, so the leaves reach the hooks.
  monkeypatch.setattr(_native, "enabled", lambda: False)
  taken: list[tuple] = []
  ours = _through_kernel(CONFIGS[name](), taken, monkeypatch)
  assert sorted(set(taken)) == sorted(s for k, s in SHAPES.items() if k != "odd")
  monkeypatch.undo()
  monkeypatch.setattr(_native, "enabled", lambda: False)
  ref = _run(CONFIGS[name]())
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref), strict=True):
    np.testing.assert_array_equal(_bytes(a), _bytes(b))


def test_a_tiles_bits_are_the_leafs():
  key = jnp.array([12345, 678], jnp.uint32)
  leaf = jax.random.bits(key, (40, 300), jnp.uint32)
  tile = _lowprec.TileKey(key, jnp.int32(3 * 300 + 128), jnp.int32(300))
  np.testing.assert_array_equal(_lowprec.random_bits(tile, (5, 100)), leaf[3:8, 128:228])


SHARDED = textwrap.dedent(
  """
  import jax, jax.numpy as jnp, numpy as np
  from jax.sharding import NamedSharding, PartitionSpec as P
  import adamw_jax
  from adamw_jax import _native
  import test_accel_random as t
  _native.enabled = lambda: False
  mesh = jax.make_mesh((4,), ("d",))
  params, grads = t._problem(steps=1)
  spec = lambda x: P("d") if x.shape[0] % 4 == 0 else P()
  put = lambda tree: jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh, spec(x))), tree)
  params, grads = put(params), [put(g) for g in grads]

  def run(taken):
    tx = t.CONFIGS["adamw, bf16 moments"]()  # its own: no step traced for the other run
    real = t._steer.per_platform
    def choose(cpu, default, *args, out, tpu=None, gpu=None, **kw):
      if tpu is None or t._steer.IN_KERNEL.get():
        return real(cpu, default, *args, out=out, **kw)
      taken.append(True)
      return tpu(*args)
    t._steer.per_platform = choose if taken is not None else real
    try:
      with t._pallas.INTERPRET.held():
        p, s = params, tx.init(params)
        for g in grads:
          step = jax.jit(lambda g, s, p: adamw_jax.fused_step(tx, g, s, p))
          p, s = jax.block_until_ready(step(g, s, p))  # done first (test_accel's note)
        return p, s
    finally:
      t._steer.per_platform = real

  taken = []
  ours, ref = run(taken), run(None)
  assert taken, "no leaf took the kernel"
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref), strict=True):
    np.testing.assert_array_equal(t._bytes(a), t._bytes(b))
  print("OK")
  """
)


# bfloat16 moments: with float32 moments, Pallas' TPU interpreter (jax 0.10.2) hangs under
# shard_map on 4 CPU devices (one device: the test above).
def test_sharded_over_four_devices_each_draws_its_rows_bits():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
  env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(__file__), env.get("PYTHONPATH", "")])
  out = subprocess.run(
    [sys.executable, "-c", SHARDED], env=env, capture_output=True, text=True, timeout=600
  )
  assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]
