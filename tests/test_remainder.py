"""param_rounding="remainder": bfloat16 parameters whose float32 master weights are exact.

The bit split (every tie, the largest finite values, zeros, subnormals,
infinities, NaNs), the float32 update that ``optax.apply_updates`` lands on
the new parameter, and the whole trajectory against float32 AdamW on float32
parameters: 1,000 steps, every element of the masters and the moments bit for
bit, through ``update`` + ``apply_updates`` and ``fused_step``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax

import adamw_jax
from adamw_jax import _remainder
from tests import checkpoint_files

# --------------------------------------------------------------------------
# The split: float32 bits <-> (bfloat16 parameter, int16 remainder)
# --------------------------------------------------------------------------


def _bits32(x) -> np.ndarray:
  return np.asarray(x, np.float32).view(np.uint32)


def _bits16(x) -> np.ndarray:
  return np.asarray(jnp.asarray(x).view(jnp.uint16))


def _sweep() -> np.ndarray:
  """Every sign and high half (65,536), each with 7 low halves at the edges and 9 random ones.

  The split depends on the low half only through ``lo >= 0x8000`` (and is the
  identity on it), so the edges 0, 1, 0x7FFF, 0x8000 (the tie), 0x8001,
  0xFFFE, 0xFFFF and random ones cover every branch, for every exponent:
  zeros, subnormals, the binade boundaries, the largest finite values,
  infinities and NaNs. (All 2**32 patterns were checked once the same way:
  none differs.)
  """
  high = np.arange(1 << 16, dtype=np.uint32) << 16
  edges = np.array([0, 1, 0x7FFF, 0x8000, 0x8001, 0xFFFE, 0xFFFF], np.uint32)
  random = np.random.default_rng(0).integers(0, 1 << 16, (high.size, 9), dtype=np.uint32)
  low = np.concatenate([np.broadcast_to(edges, (high.size, edges.size)), random], axis=1)
  return (high[:, None] | low).reshape(-1)


def test_the_split_is_exact_and_rounds_to_nearest_ties_away_from_zero():
  bits = _sweep()
  master = bits.view(np.float32)
  param, remainder = jax.jit(_remainder.split)(jnp.asarray(master))
  back = _bits32(jax.jit(_remainder.combine)(param, remainder))
  magnitude, lo = bits & 0x7FFFFFFF, bits & 0xFFFF
  nan = magnitude > 0x7F800000
  # Exact for every non-NaN master; a NaN stays NaN, a quiet one bit for bit (signalling: quieted).
  np.testing.assert_array_equal(back[~nan], bits[~nan])
  np.testing.assert_array_equal(back[nan], bits[nan] | 0x00400000)
  # The remainder is the low half; it is negative exactly where the parameter was rounded up.
  np.testing.assert_array_equal(_bits16(remainder), lo)
  p16 = _bits16(param).astype(np.uint32)
  up = (p16 & 0x7FFF) == (magnitude >> 16) + 1
  np.testing.assert_array_equal(up[~nan], lo[~nan] >= 0x8000)
  np.testing.assert_array_equal(p16 >> 15, bits >> 31)  # the sign, zeros and NaNs included
  # To nearest as astype (ties to even) except at ties whose lower neighbour is even: away.
  nearest_even = _bits16(jnp.asarray(master).astype(jnp.bfloat16)).astype(np.uint32)
  even_tie = (lo == 0x8000) & ((magnitude >> 16) % 2 == 0) & ~nan
  np.testing.assert_array_equal(p16[~nan & ~even_tie], nearest_even[~nan & ~even_tie])
  np.testing.assert_array_equal(p16[even_tie], nearest_even[even_tie] + 1)
  assert np.isnan(np.asarray(param[nan], np.float32)).all()
  assert even_tie.sum() >= 32768 - 128  # each even high half but NaNs (the edge 0x8000)
  # The largest finite masters round up to infinity and stay finite; infinities are exact.
  top = np.array([0x7F7F7FFF, 0x7F7F8000, 0x7F7FFFFF, 0xFF7FFFFF, 0x7F800000, 0xFF800000])
  p, r = _remainder.split(jnp.asarray(top.astype(np.uint32).view(np.float32)))
  np.testing.assert_array_equal(_bits16(p), [0x7F7F, 0x7F80, 0x7F80, 0xFF80, 0x7F80, 0xFF80])
  np.testing.assert_array_equal(_bits32(_remainder.combine(p, r)), top)


def test_an_unpaired_zero_with_a_negative_remainder_combines_to_zero():
  """A pair the split never makes (a rounded-up magnitude is >= 1): zero, not a borrowed NaN."""
  zero = jnp.asarray([0.0, -0.0, 1.0], jnp.bfloat16)
  got = _remainder.combine(zero, jnp.asarray([-5, -1, -1], jnp.int16))
  np.testing.assert_array_equal(_bits32(got), [0, 0x80000000, 0x3F7FFFFF])


def _lands(p, b) -> np.ndarray:
  """Whether ``optax.apply_updates`` of the remainder's update lands `p` on `b` (bitwise)."""
  p, b = jnp.asarray(p, jnp.bfloat16), jnp.asarray(b, jnp.bfloat16)
  new = jax.jit(lambda p, b: optax.apply_updates(p, _remainder.update(p, b)))(p, b)
  return _bits16(new) == _bits16(b)


def test_the_update_lands_on_the_new_parameter_wherever_the_proof_says():
  """Every normal bfloat16 parameter to new ones up to 2**15 times larger or smaller, any sign.

  ``_remainder.update``'s proof: exact when the exponents differ by at most
  15, or either is zero (and the difference is not below float32's normal
  range, which XLA:CPU flushes). Checked here on the 55,554 parameters from
  ``2**-104`` to ``2**113`` in magnitude (and the zeros) against 248 new
  parameters each, to zero and 2**-15 to 2**15 times as large; beyond, no
  float32 update reaches some of them (all 2**32 pairs were checked once: none
  fails within the proof, the first failures are 2**17 apart).
  """
  rng = np.random.default_rng(1)
  p16 = np.arange(1 << 16, dtype=np.uint32)
  exponent = (p16 >> 7) & 0xFF
  # Exponents 23 to 239: the new ones (8 to 254) normal, and so is any nonzero difference.
  p16 = p16[((exponent >= 23) & (exponent <= 239)) | ((p16 & 0x7FFF) == 0)]
  assert p16.size == 2 * 217 * 128 + 2
  gaps = np.arange(-15, 16)
  shift = np.broadcast_to(gaps[:, None], (gaps.size, 8)).reshape(-1)
  new_exponent = (p16[:, None] >> 7 & 0xFF).astype(np.int64) + shift[None, :]
  new_exponent = np.where((p16[:, None] & 0x7FFF) == 0, 127, new_exponent)
  mantissa = rng.integers(0, 128, (p16.size, shift.size))
  sign = rng.integers(0, 2, (p16.size, shift.size))
  b16 = (sign << 15) | (new_exponent << 7) | mantissa
  b16[:, 0] = 0  # to zero
  p = np.broadcast_to(p16[:, None], b16.shape).astype(np.uint16).view(jnp.bfloat16)
  b = b16.astype(np.uint16).view(jnp.bfloat16)
  assert _lands(p, b).all()
  # 3 -> 2**-30 and 0.01 -> -1e-9: no float32 update gets there.
  assert not _lands([3.0, 0.01], [2.0**-30, -1e-9]).any()


def test_steps_that_shrink_a_parameter_2_to_the_24_times_land_and_the_one_exception():
  """First steps with lr=1 (each ~sign(g)) from ~1 to ~1e-7 or across zero.

  They land: the new masters are on the float32 grid of the old one
  (``_remainder.update``). The exception, 1 - 3 * 2**-24 (parameter 1.0) to
  -2**-24 (the step rounds to -(1 - 2**-24)): no float32 update lands optax
  there (1 - 4 * 2**-24 to -2**-23 lands). ``fused_step`` writes it exactly;
  through ``update`` the master is the parameter optax writes (0: the new
  master has 1 significant bit, its remainder is 0), one float32 ulp of the
  old parameter from float32 AdamW's.
  """
  master = {"w": jnp.asarray([1.0, 1.0, 1.0, 1 - 4 * 2.0**-24, 1 - 3 * 2.0**-24], jnp.float32)}
  grads = {"w": jnp.asarray([0.1, 0.03, 3e-4, 1.0, 1.0], jnp.float32)}
  make = lambda **kw: adamw_jax.adamw(1.0, weight_decay=0.0, **kw)
  updates, _ = make().update(grads, make().init(master), master)
  want = np.asarray(optax.apply_updates(master, updates)["w"])
  np.testing.assert_array_equal(want[4], -(2.0**-24))
  assert (np.abs(want[:4]) < 2.0**-14).all() and want[3] < 0  # 2**24 to 2**15 times smaller
  tx = make(param_rounding="remainder")
  params, state = adamw_jax.split_master(master, tx.init(_as_bf16(master)))
  assert params["w"][4] == 1.0 and state.remainder["w"][4] == -3  # rounded up to 1.0
  new, fused = adamw_jax.fused_step(tx, grads, state, params)
  np.testing.assert_array_equal(_bits32(adamw_jax.master_params(new, fused)["w"]), _bits32(want))
  updates, state = tx.update(grads, state, params)
  assert updates["w"].dtype == jnp.float32
  new = optax.apply_updates(params, updates)
  got = np.asarray(adamw_jax.master_params(new, state)["w"])
  np.testing.assert_array_equal(_bits32(got[:4]), _bits32(want[:4]))
  assert got[4] == 0.0 and new["w"][4] == 0.0 and state.remainder["w"][4] == 0


# --------------------------------------------------------------------------
# The trajectory: float32 AdamW on float32 parameters, bit for bit
# --------------------------------------------------------------------------

SHAPES = {"a": (3,), "b": (7, 5), "c": (129,), "d": (), "e": (2, 3, 4)}
MASK = {"a": False, "b": True, "c": True, "d": False, "e": True, "f": True}


def _masters() -> dict:
  """Odd sizes, a scalar, values from 1e-3 (crossing zero often) to ~3; a float32 leaf 'f'."""
  rng = np.random.default_rng(7)  # NumPy's generator: nothing to compile for each shape
  out = {
    k: jnp.asarray(rng.standard_normal(s) * 10.0 ** (i % 4 - 2.5), jnp.float32)
    for i, (k, s) in enumerate(SHAPES.items())
  }
  return {**out, "f": jnp.linspace(-1.0, 1.0, 5)}


def _grads(steps: int, bf16: bool) -> dict:
  """The gradients of `steps` steps, stacked: computed once, an argument of the scan.

  Generated inside the loop, XLA could recompute them in each consumer's
  fusion, contracted differently (other values for each run); a constant
  gradient lets it fold ``g * g`` (other rounding than torch's).
  """
  shapes = {**SHAPES, "f": (5,)}
  rng = np.random.default_rng(11)  # NumPy's generator: nothing to compile for each shape
  g = {k: jnp.asarray(rng.standard_normal((steps, *s)), jnp.float32) for k, s in shapes.items()}
  return jax.tree.map(lambda x: x.astype(jnp.bfloat16).astype(jnp.float32), g) if bf16 else g


def _as_bf16(tree) -> dict:
  return {k: v if k == "f" else v.astype(jnp.bfloat16) for k, v in tree.items()}


CONFIGS = {
  "adamw, schedule, mask, amsgrad": lambda **kw: adamw_jax.adamw(
    optax.cosine_decay_schedule(3e-2, 1000, alpha=0.01),
    weight_decay=0.1,
    mask=MASK,
    amsgrad=True,
    **kw,
  ),
  "adamw, maximize, no weight decay": lambda **kw: adamw_jax.adamw(
    3e-3, weight_decay=0.0, maximize=True, **kw
  ),
  "adam, L2 decay scheduled": lambda **kw: adamw_jax.adam(
    1e-2, weight_decay=lambda c: jnp.where(c < 500, 1e-2, 0.0), b1=0.8, **kw
  ),
}


def _same_bits(a, b) -> jax.Array:
  """Whether two trees hold the same bits (jittable; NaNs and signed zeros told apart)."""
  bits = lambda x: lax.bitcast_convert_type(x, jnp.uint16 if x.dtype.itemsize == 2 else jnp.uint32)
  eq = [jnp.all(bits(x) == bits(y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))]
  return jnp.all(jnp.stack(eq))


def _trajectories(make, steps: int, fused: bool, bf16_grads: bool = False):
  """float32 AdamW and the remainder run side by side in one scan; whether they agree each step."""
  tx32, txr = make(), make(param_rounding="remainder")
  master = _masters()
  params, state = adamw_jax.split_master(master, txr.init(_as_bf16(master)))

  def step(tx, grads, state, params):
    if fused:
      return adamw_jax.fused_step(tx, grads, state, params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  def body(carry, g):
    p32, s32, p, s = carry
    p32, s32 = step(tx32, g, s32, p32)
    p, s = step(txr, _as_bf16(g) if bf16_grads else g, s, p)
    moments = lambda s: (s.mu, s.nu, s.nu_max)
    same = _same_bits(adamw_jax.master_params(p, s), p32) & _same_bits(moments(s), moments(s32))
    return (p32, s32, p, s), same & _same_bits(p, _remainder_split(p32))

  run = jax.jit(lambda carry, grads: lax.scan(body, carry, grads))
  return run((master, tx32.init(master), params, state), _grads(steps, bf16_grads))


def _remainder_split(master: dict) -> dict:
  return {k: v if k == "f" else _remainder.split(v)[0] for k, v in master.items()}


@pytest.mark.parametrize("fused", [False, True], ids=["update", "fused_step"])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_1000_steps_are_float32_adamw_bit_for_bit(config, fused):
  """Every element of the masters and the moments, at every one of 1,000 steps."""
  (p32, _, params, state), same = _trajectories(CONFIGS[config], 1000, fused)
  assert bool(same.all()), f"first differs at step {int(np.argmin(np.asarray(same)))}"
  assert int(state.count) == 1000 and params["b"].dtype == jnp.bfloat16
  assert params["f"].dtype == jnp.float32 and isinstance(state.remainder["f"], optax.MaskedNode)
  assert state.mu["b"].dtype == jnp.float32  # float32 moments by default
  master = adamw_jax.master_params(params, state)
  for k in p32:
    np.testing.assert_array_equal(_bits32(master[k]), _bits32(p32[k]))
  moved = np.abs(np.asarray(p32["b"]) - np.asarray(_masters()["b"]))
  assert moved.max() > 0.05  # the run went somewhere


def test_bfloat16_gradients_give_the_float32_run_on_their_values():
  (_, _, _, state), same = _trajectories(
    CONFIGS["adamw, schedule, mask, amsgrad"], 300, False, bf16_grads=True
  )
  assert bool(same.all()) and int(state.count) == 300


# --------------------------------------------------------------------------
# Donation, flat buffers, param groups, checkpoints, memory
# --------------------------------------------------------------------------


def _stepper(tx, fused: bool, donate: bool = False):
  def step(params, state, grads):
    if fused:
      return adamw_jax.fused_step(tx, grads, state, params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return jax.jit(step, donate_argnums=(0, 1) if donate else ())


def _steps(tx, params, state, grads: list, fused: bool, donate: bool = False):
  step = _stepper(tx, fused, donate)
  for g in grads:
    params, state = step(params, state, g)
  return params, state


def _each_step(grads: dict) -> list[dict]:
  return [
    jax.tree.map(lambda g, t=t: g[t], grads) for t in range(jax.tree.leaves(grads)[0].shape[0])
  ]


@pytest.mark.parametrize("fused", [False, True], ids=["update", "fused_step"])
def test_a_jitted_donated_step_and_flat_buffers_are_the_float32_run(fused):
  make = CONFIGS["adamw, schedule, mask, amsgrad"]
  tx32, txr = make(), make(param_rounding="remainder")
  master, grads = _masters(), _each_step(_grads(20, False))
  p32, s32 = _steps(tx32, master, tx32.init(master), grads, fused)
  params, state = adamw_jax.split_master(master, txr.init(_as_bf16(master)))
  donated = _steps(txr, *jax.tree.map(jnp.copy, (params, state)), grads, fused, donate=True)
  assert checkpoint_files.bitwise_equal(adamw_jax.master_params(*donated), p32)
  assert checkpoint_files.bitwise_equal(donated[1].mu, s32.mu)
  # Flat buffers: bfloat16 ones (their remainders int16 buffers) and a float32 one.
  flat = adamw_jax.flatten(_as_bf16(master), mask=MASK)
  assert sorted(b.dtype.name for b in flat.buffers) == ["bfloat16", "bfloat16", "float32"]
  wide = jax.tree.map(lambda b: b.astype(jnp.float32), flat)  # the layout, float32 buffers
  flat_params, flat_state = adamw_jax.split_master(wide.pack(master), txr.init(flat))
  assert [r.dtype.name for r in jax.tree.leaves(flat_state.remainder)] == ["int16", "int16"]
  flat_params, flat_state = _steps(
    txr, flat_params, flat_state, [wide.pack(g) for g in grads], fused
  )
  assert checkpoint_files.bitwise_equal(
    adamw_jax.master_params(flat_params, flat_state).view(), p32
  )


def test_checkpoint_resumes_bit_for_bit(tmp_path):
  tx = CONFIGS["adamw, schedule, mask, amsgrad"](param_rounding="remainder")
  grads = _each_step(_grads(10, False))
  params, state = adamw_jax.split_master(_masters(), tx.init(_as_bf16(_masters())))
  full = _steps(tx, params, state, grads, False)
  half_params, half = _steps(tx, params, state, grads[:5], False)
  adamw_jax.save_opt_state(tmp_path / "ckpt", half)
  for target in (tx.init(half_params), jax.eval_shape(tx.init, half_params)):
    restored = adamw_jax.restore_opt_state(tmp_path / "ckpt", target)
    assert checkpoint_files.bitwise_equal(restored, half)
  assert restored.remainder["b"].dtype == jnp.int16
  resumed = _steps(tx, half_params, restored, grads[5:], False)
  assert checkpoint_files.bitwise_equal(resumed, full)
  # A checkpoint of another rounding's state is refused, naming the field.
  kahan = CONFIGS["adamw, schedule, mask, amsgrad"](param_rounding="kahan")
  with pytest.raises(ValueError, match=r"(?s)checkpoint: 'remainder/a'.*target: 'compensation/a'"):
    adamw_jax.restore_opt_state(tmp_path / "ckpt", kahan.init(half_params))


def test_param_groups_and_masks_write_their_own_leaves():
  """A group with the option beside one with Kahan and a float32 rest; masters per group."""
  master = _masters()
  params = _as_bf16(master)
  tx = adamw_jax.param_groups(
    {
      "exact": (r"^[bc]$", {"param_rounding": "remainder"}),
      "kahan": (r"^e$", {"param_rounding": "kahan", "weight_decay": 0.0}),
    },
    rest={"weight_decay": 0.0},
    learning_rate=1e-2,
  )
  # The leaves without remainders are taken as they are given: here their bfloat16 parameters.
  params, state = adamw_jax.split_master(
    {**params, "b": master["b"], "c": master["c"]}, tx.init(params)
  )
  alone = adamw_jax.adamw(1e-2)
  exact = {k: master[k] for k in "bc"}
  alone_state = alone.init(exact)
  for g in _each_step(_grads(5, False)):
    updates, state = tx.update(g, state, params)
    params = optax.apply_updates(params, updates)
    u, alone_state = alone.update({k: g[k] for k in "bc"}, alone_state, exact)
    exact = optax.apply_updates(exact, u)
  got = adamw_jax.master_params(params, state)
  assert checkpoint_files.bitwise_equal({k: got[k] for k in "bc"}, exact)
  assert got["e"].dtype == jnp.bfloat16 and got["a"].dtype == jnp.bfloat16  # no remainders
  remainders = state.inner_states["exact"].inner_state.remainder
  assert isinstance(remainders["a"], optax.MaskedNode) and remainders["b"].dtype == jnp.int16


def test_4_bytes_a_parameter_for_the_weights_and_the_master():
  """bfloat16 parameter + int16 remainder (fp32 master + bf16 copy: 6); float32 moments: 8."""
  tx = adamw_jax.adamw(1e-3, param_rounding="remainder")
  params = {"w": jnp.zeros((64, 256), jnp.bfloat16)}
  state = tx.init(params)
  n = params["w"].size
  assert (params["w"].nbytes + state.remainder["w"].nbytes) / n == 4
  assert (state.mu["w"].nbytes + state.nu["w"].nbytes) / n == 8
  low = adamw_jax.adamw(
    1e-3, param_rounding="remainder", mu_dtype=jnp.bfloat16, nu_dtype=jnp.bfloat16
  )
  assert low.init(params).mu["w"].dtype == jnp.bfloat16  # moments as asked
  eight = adamw_jax.adamw(1e-3, param_rounding="remainder", moment_bits=8).init(params)
  assert (
    isinstance(eight.mu["w"], adamw_jax.QuantizedMoment) and eight.remainder["w"].dtype == jnp.int16
  )


def test_master_params_and_split_master_refuse_what_does_not_fit():
  tx = adamw_jax.adamw(1e-3, param_rounding="remainder")
  params = {"w": jnp.ones(3, jnp.bfloat16), "f": jnp.ones(2)}
  state = tx.init(params)
  with pytest.raises(ValueError, match=r"^master_params: the optimizer state holds no master"):
    adamw_jax.master_params(params, adamw_jax.adamw(1e-3).init(params))
  with pytest.raises(ValueError, match=r"^master_params: the parameter at 'w' is float32, but"):
    adamw_jax.master_params({"w": jnp.ones(3), "f": jnp.ones(2)}, state)
  with pytest.raises(ValueError, match=r"^master_params: the parameters and the optimizer state"):
    adamw_jax.master_params({"w": params["w"]}, state)
  twice = optax.chain(tx, tx).init(params)
  with pytest.raises(
    ValueError, match=r"^master_params: the parameter at 'w' has remainders in two"
  ):
    adamw_jax.master_params(params, twice)
  with pytest.raises(ValueError, match=r"^split_master: the master at 'w' is bfloat16, but"):
    adamw_jax.split_master(params, state)
  with pytest.raises(ValueError, match=r"^split_master: the master at 'w' has shape \(4,\)"):
    adamw_jax.split_master({"w": jnp.ones(4), "f": jnp.ones(2)}, state)
  # update with the float32 masters in place of the bfloat16 parameters: refused, not silent.
  with pytest.raises(
    ValueError,
    match=r"holds a remainder for the parameter at 'w', which is "
    r"float32; .*adamw_jax.split_master",
  ):
    tx.update(params, state, {"w": jnp.ones(3), "f": jnp.ones(2)})
  with pytest.raises(
    ValueError,
    match=r"keeps bfloat16 parameters and their float32 masters; the parameter at 'h' is "
    r"float16 \(use param_rounding='kahan' for float16\)",
  ):
    tx.init({"h": jnp.ones(2, jnp.float16)})
  with pytest.raises(ValueError, match=r"remainder at 'w' is int32, not the int16"):
    bad = state._replace(remainder={"w": jnp.zeros(3, jnp.int32), "f": optax.MaskedNode()})
    tx.update(params, bad, params)
