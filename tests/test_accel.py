"""The accelerators' kernels for leaves with quantized moments (``adamw_jax/_accel.py``), on this CPU.

Each kernel (TPU's and GPU's) runs in Pallas' interpreter in place of the CPU's XLA path
and must give the same parameters, updates, codes and scales, bit for bit, for every
configuration it takes: update and fused step, masks, amsgrad, maximize, Adam's L2 decay,
block sizes, bfloat16 parameters with Kahan compensation, leaves whose last axis is or is not
a whole number of blocks, 4-bit moments (codes two a byte). A leaf a kernel does not take keeps
the XLA path.
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adamw_jax
from adamw_jax import _accel, _native, _pallas, _steer


class _Taken(list):
  """The branches a kernel fixture took (one True each), and the specs of the kernels run."""

  def __init__(self, target: str):
    super().__init__()
    self.target = target
    self.specs: list[_accel.Spec] = []


@pytest.fixture(params=["tpu", "gpu"])
def kernel(request, monkeypatch):
  """Every leaf the `target`'s kernel takes runs it (interpreted); the rest as on a CPU."""
  target = request.param
  real = _steer.per_platform
  taken = _Taken(target)
  step = _accel.step

  def choose(cpu, default, *args, out, tpu=None, gpu=None, **kw):
    branch = tpu if target == "tpu" else gpu
    if branch is None or _steer.IN_KERNEL.get():
      return real(cpu, default, *args, out=out, **kw)
    taken.append(True)
    return branch(*args)

  def recorded(spec, target, arrays):
    taken.specs.append(spec)
    return step(spec, target, arrays)

  monkeypatch.setattr(_steer, "per_platform", choose)
  monkeypatch.setattr(_accel, "step", recorded)
  # The CPU's native kernel serves quantized leaves too: off, so the leaves reach the hooks.
  monkeypatch.setattr(_native, "enabled", lambda: False)
  with _pallas.INTERPRET.held():
    yield taken


PARAMS = {
  "w": (64, 512),  # TPU: rows of whole blocks
  "flat": (8192,),  # TPU: viewed as one row of 8192
  "odd": (32, 384),  # TPU: 384 columns are not whole blocks of 256: viewed as (3, 4096)
  "small": (10, 10),  # full-precision moments (fewer than 4096 elements)
}
# 4-bit (blocks of 128): TPU views the codes and scales as rows of 128 (a scale row: 16384
# elements), then as the leaf's rows.
PARAMS_4BIT = {
  "w": (64, 512),  # TPU: 32 rows a scale row
  "flat": (16384,),  # TPU: rows of 128, two a byte row
  "odd": (16, 256),  # TPU: a small leaf (fewer than 16384 elements) as one row
  "small": (10, 10),
}

# A mask leaves "w" undecayed: the other leaves are decayed beside it (one case, both kinds).
MASK = lambda p: {k: k != "w" for k in p}

CONFIGS = {
  "adamw, mask": (
    lambda: adamw_jax.adamw(1e-2, weight_decay=0.1, moment_bits=8, mask=MASK),
    jnp.float32,
  ),
  "amsgrad, maximize, block 128, mask": (
    lambda: adamw_jax.adamw(
      1e-2, amsgrad=True, maximize=True, moment_bits=8, moment_block_size=128, mask=MASK
    ),
    jnp.float32,
  ),
  "adam L2": (lambda: adamw_jax.adam(1e-2, weight_decay=0.1, moment_bits=8), jnp.float32),
  "bf16 params, kahan": (
    lambda: adamw_jax.adamw(1e-2, weight_decay=0.1, moment_bits=8, param_rounding="kahan"),
    jnp.bfloat16,
  ),
  "scale_by_adam": (lambda: adamw_jax.scale_by_adam(moment_bits=8), jnp.float32),
  "4-bit": (
    lambda: adamw_jax.adamw(1e-2, weight_decay=0.1, moment_bits=4),
    jnp.float32,
  ),
}


def _problem(dtype, steps: int = 2, shapes=PARAMS):
  rng = np.random.default_rng(0)
  params = {k: jnp.asarray(rng.standard_normal(s), dtype) for k, s in shapes.items()}
  grads = [
    {
      k: jnp.asarray(rng.standard_normal(s) * 10.0 ** rng.uniform(-3, 1), dtype)
      for k, s in shapes.items()
    }
    for _ in range(steps)
  ]
  return params, grads


def _run(make, dtype, fused: bool, shapes=PARAMS):
  tx = make()
  params, grads = _problem(dtype, shapes=shapes)
  state = tx.init(params)
  outs = []
  # Each kernel's step is done before anything else is dispatched: an interpreted kernel's
  # callbacks dispatch operations of their own, which could wait behind this thread's (under
  # pytest-xdist, the reference run's init once deadlocked with the kernel's run before it).
  done = jax.block_until_ready
  for g in grads:
    if fused:
      params, state = done(adamw_jax.fused_step(tx, g, state, params))
    else:
      updates, state = done(tx.update(g, state, params))
      outs.append(updates)
      params = done(optax.apply_updates(params, updates))
  return params, state, outs


def _bits(tree):
  return [np.atleast_1d(np.asarray(x)).view(np.uint8) for x in jax.tree.leaves(tree)]


# Each case costs ~30 s interpreted on 2 cores: each configuration once, through update or the
# fused step (the fused step needs a learning rate: not scale_by_adam's). Decoupled decay and an
# undecayed (masked) leaf go through both: the update with "adamw, mask", the fused step with
# "amsgrad, maximize, block 128, mask" (adamw's default weight_decay).
CASES = [
  ("adamw, mask", False),
  ("amsgrad, maximize, block 128, mask", True),
  ("adam L2", False),
  ("bf16 params, kahan", True),
  ("scale_by_adam", False),
  ("4-bit", True),
]
# The GPU's update with a buffer (Kahan's, standing in as zeros in the moments' kernel) and 4-bit
# codes (unpacked by shifts, `_quantize.FUSIBLE`): the TPU's runs its kernel as the fused step.
GPU_CASES = [("bf16 params, kahan", False), ("4-bit", False)]


_IDS = lambda cases: [f"{n}-{'fused' if f else 'update'}" for n, f in cases]


@pytest.mark.parametrize(
  ("name", "fused", "kernel"),
  [(*c, t) for c in CASES for t in ("tpu", "gpu")] + [(*c, "gpu") for c in GPU_CASES],
  ids=[f"{i}-{t}" for i in _IDS(CASES) for t in ("tpu", "gpu")]
  + [f"{i}-gpu" for i in _IDS(GPU_CASES)],
  indirect=["kernel"],
)
def test_the_kernel_is_the_xla_path_bit_for_bit(name, fused, kernel):
  make, dtype = CONFIGS[name]
  shapes = PARAMS_4BIT if name.startswith("4-bit") else PARAMS
  ours = _run(make, dtype, fused, shapes)
  assert kernel, "no leaf took the kernel"
  # A GPU's update is XLA's, its kernel writing the moments alone (`_accel._split`): not with
  # Adam's L2 decay (whose moments read the parameter), nor on a TPU, nor in the fused step.
  split = kernel.target == "gpu" and not fused and name != "adam L2"
  assert kernel.specs and all(s.moments_only == split for s in kernel.specs)
  kernel.clear()
  if (name, fused) not in _XLA_RUNS:  # the CPU's XLA path: the same for both kernels
    with _steer_off():
      _XLA_RUNS[name, fused] = _bits(_run(make, dtype, fused, shapes))
  for a, b in zip(_bits(ours), _XLA_RUNS[name, fused], strict=True):
    np.testing.assert_array_equal(a, b)


_XLA_RUNS: dict[tuple[str, bool], list[np.ndarray]] = {}


@contextlib.contextmanager
def _steer_off():
  """The CPU's own path inside a kernel fixture (the real ``per_platform``)."""
  patched = _steer.per_platform
  _steer.per_platform = _REAL
  try:
    with _pallas.INTERPRET.held(False):
      yield
  finally:
    _steer.per_platform = patched


_REAL = _steer.per_platform
