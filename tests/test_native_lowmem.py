"""The native twin of the low-memory options against the pure kernel, bit for bit.

A table of options (bfloat16/float16 moments, bfloat16/float16 parameters
written to nearest, stochastically or with Kahan compensation, 8-bit and
4-bit moments, and combinations) x configurations (weight decay on and off,
masks, amsgrad, maximize, Adam's L2 term, update + ``optax.apply_updates``
and ``fused_step``, flat buffers): each runs with ``ADAMW_JAX_NATIVE=0`` and
with the native kernel, whose run must call the low-memory kernel, and every parameter and state tensor (codes, scales, keys and
compensation buffers included) must be equal bit for bit after every step.
Then what the table does not reach: leaves of several tasks and chunks,
non-finite gradients, the quantizer on the values where its decisions turn,
and the bucket tables the quantizer starts from.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import adamw_jax
from adamw_jax import _native, _native_lowmem, _qmap, _quantize
from tests import torch_reference as ref
from tests.test_native import _assert_bitwise, _trajectory

pytestmark = pytest.mark.skipif(
  _native.UNAVAILABLE is not None, reason=f"native kernel not built: {_native.UNAVAILABLE}"
)

STEPS = 4
LOWMEM = _native.LOWMEM_TARGET
BF16, F16, F32 = jnp.bfloat16, jnp.float16, jnp.float32
# 8192 and 40960 elements: quantized (the larger one from the emulated division's Markstein
# threshold and the thread split on); 1000 and 3 not, 1000 a partial chunk.
SHAPES = {"w": (64, 128), "big": (40960,), "odd": (1000,), "b": (3,)}

OPTIONS = {
  # name: (the option's keywords, the parameters' dtype)
  "bf16 moments": ({"mu_dtype": BF16, "nu_dtype": BF16}, F32),
  "f16 moments": ({"mu_dtype": F16, "nu_dtype": F16}, F32),
  "bf16 params": ({}, BF16),
  "bf16 params, f32 moments": ({"mu_dtype": F32, "nu_dtype": F32}, BF16),
  "f16 params": ({"eps": 1e-4}, F16),
  "stochastic": ({"param_rounding": "stochastic"}, BF16),
  "kahan": ({"param_rounding": "kahan"}, BF16),
  "kahan f16": ({"param_rounding": "kahan", "eps": 1e-4}, F16),
  "remainder": ({"param_rounding": "remainder"}, BF16),
  "8-bit": ({"moment_bits": 8}, F32),
  "4-bit": ({"moment_bits": 4}, F32),
}
# Options together, each in one configuration: (keywords, parameters' dtype, configuration).
COMBINED = {
  "8-bit, stochastic": (
    {"moment_bits": 8, "param_rounding": "stochastic"},
    BF16,
    "mask + amsgrad, fused",
  ),
  "4-bit blocks of 64, kahan": (
    {"moment_bits": 4, "moment_block_size": 64, "param_rounding": "kahan"},
    BF16,
    "adam L2 + amsgrad, update",
  ),
  "8-bit, remainder": (
    {"moment_bits": 8, "param_rounding": "remainder"},
    BF16,
    "adam L2 + amsgrad, update",
  ),
  "bf16 moments, remainder": (
    {"mu_dtype": BF16, "nu_dtype": BF16, "param_rounding": "remainder"},
    BF16,
    "mask + amsgrad, fused",
  ),
  "8-bit blocks of 96, bf16 params": (
    {"moment_bits": 8, "moment_block_size": 96},
    BF16,
    "adamw, update",
  ),
}

_matrices = lambda p: {k: np.ndim(v) > 1 for k, v in p.items()}

CONFIGS = {
  # name: (transform from the option's keywords, fused_step, flat buffers)
  "adamw, update": (lambda kw: adamw_jax.adamw(1e-3, weight_decay=0.1, **kw), False, False),
  "mask + amsgrad, fused": (
    lambda kw: adamw_jax.adamw(1e-3, weight_decay=0.1, amsgrad=True, mask=_matrices, **kw),
    True,
    False,
  ),
  "maximize, weight_decay=0, fused": (
    lambda kw: adamw_jax.adamw(3e-4, b2=0.95, maximize=True, weight_decay=0.0, **kw),
    True,
    False,
  ),
  "weight_decay=0, update": (
    lambda kw: adamw_jax.adamw(1e-3, weight_decay=0.0, **kw),
    False,
    False,
  ),
  "adam L2 + amsgrad, update": (
    lambda kw: adamw_jax.adam(1e-3, weight_decay=0.1, amsgrad=True, mask=_matrices, **kw),
    False,
    False,
  ),
  "flat buffers, fused": (lambda kw: adamw_jax.adamw(1e-3, **kw), True, True),
}


def _nan_as_nan(tree):
  """`tree` with every NaN made the one float32/bfloat16/float16 quiet NaN of positive sign."""

  def one(x):
    x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.floating) and x.dtype != jnp.bfloat16:
      return x
    return np.where(np.isnan(x.astype(np.float32)), np.asarray(np.nan, x.dtype), x)

  return jax.tree.map(one, tree)


def _compare(
  tx, params, grads, monkeypatch, *, fused: bool, steps: int = STEPS, nan_bits: bool = True
) -> None:
  """The native run against the pure one, both `fused` (fused_step) or both update +
  apply_updates, bit for bit after every step; the native one calls the low-memory kernel.

  Like with like: with stochastic rounding or Kahan compensation the fused step
  writes the new parameter itself, update + apply_updates ``p + (new - p)``,
  which differ where ``new - p`` is not a bfloat16 number.

  `nan_bits` False: a NaN's sign and payload are not compared (XLA does not
  define them: LLVM may commute the operands of an addition, and x86 returns
  the first of two NaNs), only that it is a NaN.
  """
  kw = {"serves": LOWMEM, "fused": fused, "steps": steps}
  want = _trajectory(tx, params, grads, False, monkeypatch, **kw)
  got = _trajectory(tx, params, grads, True, monkeypatch, **kw)
  same = (lambda x: x) if nan_bits else _nan_as_nan
  for t, (w, g) in enumerate(zip(want, got)):
    _assert_bitwise(same(g), same(w), f"step {t + 1}")


def _problem(dtype, shapes=SHAPES, scale=(-6, 2)):
  return ref.make_problem(dtype, STEPS, bank=3, shapes=shapes, log10_scale=scale)


def _flat(params, grads, options: dict):
  """The problem on flat buffers (leaves with quantized moments packed apart)."""
  bits = options.get("moment_bits")
  block = options.get("moment_block_size", 256 if bits == 8 else 128) if bits else None
  flat = adamw_jax.flatten(jax.tree.map(jnp.asarray, params), moment_block_size=block)
  return flat, lambda t: flat.pack(jax.tree.map(jnp.asarray, grads(t)))


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("option", list(OPTIONS))
def test_options_by_configurations(option, config, monkeypatch):
  options, dtype = OPTIONS[option]
  make, fused, flat = CONFIGS[config]
  params, grads = _problem(dtype)
  if flat:
    params, grads = _flat(params, grads, options)
  _compare(make(options), params, grads, monkeypatch, fused=fused)


@pytest.mark.parametrize("option", list(COMBINED))
def test_options_combined(option, monkeypatch):
  options, dtype, config = COMBINED[option]
  make, fused, _ = CONFIGS[config]
  params, grads = _problem(dtype, {**SHAPES, "big": (36864,)})  # a multiple of 96 too
  _compare(make(options), params, grads, monkeypatch, fused=fused)


@pytest.mark.parametrize("fused", [False, True], ids=["update", "fused"])
@pytest.mark.parametrize(
  "option", ["bf16 moments", "bf16 params", "stochastic", "kahan", "remainder", "8-bit", "4-bit"]
)
def test_leaves_of_several_tasks_and_chunks(option, fused, monkeypatch):
  """Leaves split into tasks of 65,536 elements and chunks (partial ones too), on two threads.

  Stochastic rounding's random bits are drawn at each element's index in its leaf.
  """
  options, dtype = OPTIONS[option]
  shapes = {"w": (300_032,), "v": (70_001,) if "bit" not in option else (69_888,)}
  params, grads = _problem(dtype, shapes)
  tx = adamw_jax.adamw(1e-3, amsgrad=True, **options)
  _compare(tx, params, grads, monkeypatch, fused=fused, steps=3)


@pytest.mark.parametrize(
  "option",
  ["bf16 params", "stochastic", "kahan", "remainder", "8-bit", "4-bit", "kahan, f32 gradients"],
)
def test_non_finite_gradients(option, monkeypatch):
  """inf, -inf, NaN and huge gradients: NaNs where the pure kernel's are, poisoned blocks as its.

  With quantized moments two NaNs of different signs meet in the parameter's
  step after a block is poisoned (the parameter's, the block's scale's);
  which one XLA's code returns depends on the order LLVM gives an addition's
  operands, so there NaNs are compared as NaNs. Elsewhere every bit.
  """
  options, dtype = OPTIONS[option.removesuffix(", f32 gradients")]
  params, grads = _problem(dtype, {"w": (64, 128), "b": (64,)})
  if option.endswith("f32 gradients"):  # a float32 NaN's payload reaches a bfloat16 rounding
    grads = lambda t, grads=grads: {k: v.astype(np.float32) for k, v in grads(t).items()}

  # A NaN with a payload as well as the quiet one: the kernel's roundings skip their NaN
  # select only in chunks without a NaN (_native_lowmem.cc's Ordinary), and must then give
  # the pure kernel's bits for every other NaN.
  payload = np.uint32(0x7FFFFFFF).view(np.float32)

  def bad(t):
    g = {k: v.copy() for k, v in grads(t).items()}
    for v in g.values():
      v.reshape(-1)[(t * 997) % v.size] = [np.inf, -np.inf, np.nan, 3e38, payload][t % 5]
    return g

  tx = adamw_jax.adamw(1e-3, amsgrad=True, **options)
  _compare(tx, params, bad, monkeypatch, fused=True, steps=5, nan_bits="bit" not in option)


def _decision_values(qmap: np.ndarray) -> np.ndarray:
  """Where the quantizer's answer turns: each entry, each halfway point, 3 ulps around each."""
  entries = qmap.astype(np.float32)
  halves = (entries[:-1] + (entries[1:] - entries[:-1]) * np.float32(0.5)).astype(np.float32)
  centres = np.concatenate([entries, halves, np.float32([0.0, -0.0, 1e-30, -1e-30, 1e-9])])
  out = [centres]
  for direction in (np.inf, -np.inf):
    x = centres
    for _ in range(3):
      x = np.nextafter(x, np.float32(direction))
      out.append(x)
  values = np.concatenate(out).astype(np.float32)
  return values[np.abs(values) <= 1]


@pytest.mark.parametrize("bits", [8, 4])
def test_quantizer_decides_as_the_binary_search(bits, monkeypatch):
  """First moments at every decision point of the signed map, written by both kernels.

  With b1 = 0 the first step's new moment is the gradient itself, and a
  block that holds 1.0 has the scale 1, so each code is the quantizer's
  answer for exactly that value: the pure kernel's binary search, and the
  native kernel's bucket table and comparisons.
  """
  block = 256 if bits == 8 else 128
  values = _decision_values(_qmap.quantization_map(True, bits))
  per_block = block - 1
  blocks = -(-values.size // per_block)
  g = np.zeros((blocks, block), np.float32)
  g[:, 0] = 1.0
  g[:, 1:] = np.pad(values, (0, blocks * per_block - values.size)).reshape(blocks, per_block)
  n = max(blocks * block, _quantize.MIN_SIZE)
  grad = np.zeros(n, np.float32)
  grad[: g.size] = g.reshape(-1)
  tx = adamw_jax.adamw(1e-3, b1=0.0, moment_bits=bits)
  runs = [
    _trajectory(tx, {"w": grad}, lambda t: {"w": grad}, native, monkeypatch, serves=LOWMEM, steps=1)
    for native in (False, True)
  ]
  _assert_bitwise(runs[1], runs[0], "one step")
  codes = np.asarray(runs[0][0][1].mu["w"].codes)
  assert len(np.unique(codes)) > (200 if bits == 8 else 12)  # the values reach the whole map


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("signed", [True, False])
def test_bucket_tables_decide_as_the_binary_search(bits, signed):
  """A bucket's entry and one comparison give the code of the binary search and its decision.

  Checked on every float32 of a dense sample (every entry, every threshold,
  every bucket's edges and their neighbours), as ``_native_quantize.h``
  reads the table, against the pure kernel's search and decision.
  """
  (smap, stable), (umap, utable), (e_lo_s, mbits_s, e_lo_u, mbits_u) = _native_lowmem.maps(bits)
  qmap, table, e_lo, mbits = (
    (smap, stable, e_lo_s, mbits_s) if signed else (umap, utable, e_lo_u, mbits_u)
  )
  assert np.array_equal(qmap, _qmap.quantization_map(signed, bits))
  assert table.dtype == np.uint32
  rng = np.random.default_rng(bits)
  shift = 23 - mbits
  edges = (np.arange((e_lo - 1) << mbits, (128 << mbits) + 1, dtype=np.uint32) << shift).view(
    np.float32
  )
  t = _native_lowmem.thresholds(qmap)
  t = np.where(t < 0, (-t - 1) | 0x80000000, t).astype(np.uint32).view(np.float32)
  centres = np.concatenate([qmap, t, edges, -edges])
  x = np.concatenate(
    [
      centres,
      *(np.nextafter(centres, np.float32(d)) for d in (np.inf, -np.inf)),
      rng.uniform(-1.5, 1.5, 200_000).astype(np.float32),
      (rng.uniform(-1, 1, 200_000) * 10.0 ** rng.uniform(-12, 0, 200_000)).astype(np.float32),
      np.float32([0.0, -0.0, 2.0, -2.0, 1e30, -1e30, np.inf, -np.inf, np.nan, -np.nan]),
    ]
  ).astype(np.float32)
  u = x.view(np.uint32).astype(np.int64)
  neg = u >> 31
  low, top = (e_lo << mbits) - 1, 127 << mbits
  r = np.clip((u & 0x7FFFFFFF) >> shift, low, top) - low
  entry = table[table.size // 2 + np.where(neg == 1, -1 - r, r)].astype(np.int64)
  w = np.where(neg == 1, ~u, u) & ((1 << shift) - 1)
  got = np.where(np.isnan(x), 0, (entry >> 23) + (w > (entry & 0x7FFFFF)))
  i = np.maximum(np.searchsorted(qmap, x, side="right") - 1, 0)
  up = np.minimum(i + 1, qmap.size - 1)
  half = ((qmap[up] - qmap[i]) * np.float32(0.5)).astype(np.float32)
  want = np.where((x - qmap[i]).astype(np.float32) >= half, up, i)
  np.testing.assert_array_equal(got, np.where(np.isnan(x), 0, want))
