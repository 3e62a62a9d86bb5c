"""Low-memory AdamW against its references: torchao (8/4-bit moments, stochastic rounding) and torch-optimi (Kahan).

References: torchao 0.18.0 (``torchao.optim``: ``AdamW8bit``'s and
``AdamW4bit``'s quantization and step, ``_fp32_to_bf16_sr``), torch-optimi
0.3.3 (``kahan_sum=True``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import optimi
import pytest
import torch
from torchao.optim import quant_utils, subclass_4bit
from torchao.optim.adam import single_param_adam
from torchao.optim.subclass_4bit import OptimState4bit
from torchao.optim.subclass_8bit import OptimState8bit, get_qmap_signed, get_qmap_unsigned

import adamw_jax
from adamw_jax import _lowprec, _qmap, _quantize


def _np(t: torch.Tensor) -> np.ndarray:
  return t.detach().numpy()


# --------------------------------------------------------------------------
# 8-bit moments: torchao's map, quantization and AdamW8bit step
# --------------------------------------------------------------------------


@pytest.mark.parametrize("signed, reference", [(True, get_qmap_signed), (False, get_qmap_unsigned)])
def test_quantization_map_is_torchaos(signed, reference):
  np.testing.assert_array_equal(_qmap.dynamic_map(signed), np.asarray(reference(), np.float32))


@pytest.mark.parametrize("signed", [True, False])
def test_quantize_and_dequantize_are_torchaos_bit_for_bit(signed):
  rng = np.random.default_rng(0)
  x = rng.standard_normal((32, 256)).astype(np.float32) * np.logspace(-8, 1, 256, dtype=np.float32)
  x = x if signed else np.abs(x)
  x[3] = 0.0  # an all-zero block: scale clipped to 1e-12
  for block in (64, 256, 1024):
    scaled, scale = quant_utils.scale_tensor(torch.tensor(x), block)
    qmap = torch.tensor(get_qmap_signed() if signed else get_qmap_unsigned())
    codes = quant_utils.quantize_8bit_with_qmap(scaled, qmap)
    ours = _quantize.quantize(jnp.asarray(x), block, signed)
    np.testing.assert_array_equal(np.asarray(ours.codes), _np(codes))
    np.testing.assert_array_equal(np.asarray(ours.scale), _np(scale))
    back = quant_utils.dequant_with_qmap(codes, qmap, scale)
    np.testing.assert_array_equal(np.asarray(_quantize.dequantize(ours, signed)), _np(back))


def _as_ours(t: OptimState8bit | OptimState4bit) -> adamw_jax.QuantizedMoment:
  kind = (
    adamw_jax.PackedQuantizedMoment if isinstance(t, OptimState4bit) else adamw_jax.QuantizedMoment
  )
  return kind(jnp.asarray(_np(t.codes)), jnp.asarray(_np(t.scale)))


def test_adamw8bit_step_against_torchao():
  """From torchao's state at each step, one step of ours and of torchao's AdamW8bit.

  The first moment, its codes and scales are torchao's bit for bit (the same
  lerp). The second moment differs in one rounding: torch's (and ours)
  ``v*b2 + (1-b2)*g*g`` against torchao's ``lerp(v, g*g, 1-b2)``; a code then
  differs by one where the value lies within that rounding of a decision
  boundary, and the parameters by torchao's other order of the step
  (``p - lr*wd*p`` and ``p - lr*(m/bc1)/d``) plus those codes.
  """
  rng = np.random.default_rng(1)
  shape, lr, wd, block = (64, 128), 1e-2, 0.1, 256
  p = torch.tensor(rng.standard_normal(shape).astype(np.float32))
  m = OptimState8bit.zeros(shape, True, block)
  v = OptimState8bit.zeros(shape, False, block)
  tx = adamw_jax.adamw(lr, weight_decay=wd, moment_bits=8, moment_block_size=block)
  state = tx.init({"w": jnp.asarray(_np(p))})
  assert isinstance(state.mu["w"], adamw_jax.QuantizedMoment)
  step = torch.tensor(0.0)
  v_mismatches = 0
  for k in range(8):
    g = rng.standard_normal(shape).astype(np.float32) * (1 + k)
    params = {"w": jnp.asarray(_np(p))}
    state = state._replace(
      count=jnp.asarray(k, jnp.int32), mu={"w": _as_ours(m)}, nu={"w": _as_ours(v)}
    )
    updates, state = tx.update({"w": jnp.asarray(g)}, state, params)
    ours_p = np.asarray(optax.apply_updates(params, updates)["w"])
    step += 1
    single_param_adam(
      p, torch.tensor(g), step, m, v, None, torch.tensor(lr), 0.9, 0.999, wd, 1e-8, True, False
    )
    np.testing.assert_array_equal(np.asarray(state.mu["w"].codes), _np(m.codes))
    np.testing.assert_array_equal(np.asarray(state.mu["w"].scale), _np(m.scale))
    np.testing.assert_allclose(np.asarray(state.nu["w"].scale), _np(v.scale), rtol=2.0**-22)
    diff = np.asarray(state.nu["w"].codes).astype(int) - _np(v.codes).astype(int)
    assert np.abs(diff).max() <= 1
    v_mismatches += int(np.count_nonzero(diff))
    # Parameters: torchao rounds 1 - beta**t to float32 (step is a float32 tensor) where torch
    # rounds it in double: the step differs by up to 2**-23 / (1 - beta**t) relative for each
    # beta, and by torchao's other order (p - lr*wd*p, then p - lr*(m/bc1)/d) by 4 ulps of p.
    # Where a second-moment code differs, the parameter is within 2% of lr.
    err = np.abs(ours_p - _np(p))
    t = k + 1
    relative = 2.0**-23 * (1 / (1 - 0.9**t) + 1 / (1 - 0.999**t)) + 2.0**-20
    moved = np.abs(ours_p - np.asarray(params["w"])) + lr * wd * np.abs(np.asarray(params["w"]))
    bound = 4 * np.spacing(np.abs(_np(p))) + relative * moved
    bad = ~np.where(diff == 0, err <= bound, err <= 0.02 * lr)
    assert not bad.any(), (k, _np(p)[bad][:4], ours_p[bad][:4], (err / bound)[bad][:4])
  assert v_mismatches <= 1e-3 * 8 * p.numel(), v_mismatches


def test_8bit_state_is_a_quarter_and_small_leaves_are_unchanged():
  params = {"big": jnp.ones((64, 128)), "small": jnp.linspace(-1, 1, 100), "odd": jnp.ones((4097,))}
  grads = jax.tree.map(lambda p: jnp.cos(p * 3 + 1), params)
  tx8 = adamw_jax.adamw(1e-2, moment_bits=8)
  s8 = tx8.init(params)
  assert isinstance(s8.mu["big"], adamw_jax.QuantizedMoment)
  assert s8.mu["big"].codes.dtype == jnp.uint8 and s8.mu["big"].scale.shape == (32,)
  assert not isinstance(s8.mu["small"], adamw_jax.QuantizedMoment)  # < 4096 elements
  assert not isinstance(s8.mu["odd"], adamw_jax.QuantizedMoment)  # not a multiple of 256
  nbytes = lambda t: sum(x.nbytes for x in jax.tree.leaves(t))
  assert nbytes((s8.mu["big"], s8.nu["big"])) == 2 * 64 * 128 * (1 + 4 / 256)
  u8, s8 = tx8.update(grads, s8, params)
  tx = adamw_jax.adamw(1e-2)
  u, s = tx.update(grads, tx.init(params), params)
  for k in ("small", "odd"):  # the same kernel as without the option, bit for bit
    np.testing.assert_array_equal(u8[k], u[k])
    np.testing.assert_array_equal(s8.mu[k], s.mu[k])
    np.testing.assert_array_equal(s8.nu[k], s.nu[k])


def test_8bit_with_amsgrad_mask_flat_buffers_and_fused_step():
  params = {"w": jnp.linspace(-1, 1, 8192).reshape(64, 128), "b": jnp.zeros(8)}
  grads = jax.tree.map(lambda p: jnp.sin(p * 5 + 0.3), params)
  mask = {"w": True, "b": False}
  tx = adamw_jax.adamw(1e-2, weight_decay=0.1, amsgrad=True, mask=mask, moment_bits=8)
  state = tx.init(params)
  assert isinstance(state.nu_max["w"], adamw_jax.QuantizedMoment)
  updates, new_state = tx.update(grads, state, params)
  fused_params, fused_state = adamw_jax.fused_step(tx, grads, state, params)
  expected = optax.apply_updates(params, updates)
  for k in params:
    np.testing.assert_array_equal(fused_params[k], expected[k])
  assert jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()), fused_state, new_state))
  # Flat buffers: two leaves of 4096 elements, so blocks of 256 align with the leaves and the
  # one buffer's quantized step is the two leaves' step.
  tree = {"a": jnp.linspace(-1, 1, 4096), "b": jnp.linspace(2, 0, 4096).reshape(64, 64)}
  tree_grads = jax.tree.map(lambda p: jnp.cos(p * 7), tree)
  flat = adamw_jax.flatten(tree)
  tx1 = adamw_jax.adamw(1e-2, moment_bits=8)
  flat_state = tx1.init(flat)
  assert [
    type(x)
    for x in jax.tree.leaves(
      flat_state.mu, is_leaf=lambda x: isinstance(x, adamw_jax.QuantizedMoment)
    )
  ] == [adamw_jax.QuantizedMoment]
  flat_updates, _ = tx1.update(flat.pack(tree_grads), flat_state, flat)
  tree_updates, _ = tx1.update(tree_grads, tx1.init(tree), tree)
  for k in tree:
    np.testing.assert_array_equal(flat_updates.view()[k], tree_updates[k])


def test_8bit_flat_buffers_equal_the_leaves_bit_for_bit():
  """Leaves of sizes that are not multiples of the block size, packed with and without 8-bit ones.

  ``flatten(moment_block_size=...)`` packs the leaves that get 8-bit moments
  apart (each a whole number of blocks, so blocks never span leaves); the
  other buffer (5376 elements, 21 blocks' worth) keeps full precision, as its
  leaves do one by one.
  """
  sizes = {"a": (4096,), "b": (100,), "c": (5000,), "d": (64, 96), "e": (4352,), "f": (276,)}
  rng = np.random.default_rng(4)
  tree = {k: jnp.asarray(rng.standard_normal(s), jnp.float32) for k, s in sizes.items()}
  tx = adamw_jax.adamw(1e-2, weight_decay=0.1, amsgrad=True, moment_bits=8)
  with pytest.raises(
    ValueError,
    match=r"the flat buffer 'float32' packs leaves that get 8-bit "
    r"moments \('a', 4096 elements\) and leaves that keep full-precision ones "
    r"\('b', 100 elements: fewer than 4096 or not a multiple of "
    r"moment_block_size=256\).*adamw_jax\.flatten\(params, "
    r"moment_block_size=256\)",
  ):
    tx.init(adamw_jax.flatten(tree))
  flat = adamw_jax.flatten(tree, moment_block_size=256)
  assert flat.layout.names == ("float32/8bit", "float32")
  flat_state, tree_state = tx.init(flat), tx.init(tree)
  assert isinstance(flat_state.mu.buffers[0], adamw_jax.QuantizedMoment)
  assert not isinstance(flat_state.mu.buffers[1], adamw_jax.QuantizedMoment)
  step = jax.jit(tx.update)
  flat_params, tree_params = flat, tree
  for _k in range(3):
    grads = {n: jnp.asarray(rng.standard_normal(s), jnp.float32) for n, s in sizes.items()}
    flat_updates, flat_state = step(flat_params.pack(grads), flat_state, flat_params)
    tree_updates, tree_state = step(grads, tree_state, tree_params)
    flat_params = optax.apply_updates(flat_params, flat_updates)
    tree_params = optax.apply_updates(tree_params, tree_updates)
    for n in sizes:
      np.testing.assert_array_equal(flat_params.view()[n], tree_params[n])
  for field in ("mu", "nu", "nu_max"):
    q, plain = getattr(flat_state, field).buffers
    leaves = getattr(tree_state, field)
    np.testing.assert_array_equal(
      q.codes, jnp.concatenate([leaves[n].codes.ravel() for n in ("a", "d", "e")])
    )
    np.testing.assert_array_equal(
      q.scale, jnp.concatenate([leaves[n].scale for n in ("a", "d", "e")])
    )
    np.testing.assert_array_equal(plain, jnp.concatenate([leaves[n] for n in ("b", "c", "f")]))
  # Another block size in the transform than in flatten: 'g' (4224 = 33 * 128 elements) gets
  # 8-bit moments with blocks of 128 but was packed with 's' as a leaf that does not.
  with pytest.raises(ValueError, match=r"'g', 4224 elements.*moment_block_size=128"):
    adamw_jax.adamw(1e-2, moment_bits=8, moment_block_size=128).init(
      adamw_jax.flatten(
        {"g": jnp.ones(4224), "h": jnp.ones(4096), "s": jnp.ones(100)}, moment_block_size=256
      )
    )


def test_param_groups_with_and_without_8bit():
  params = {"w": jnp.linspace(-1, 1, 8192).reshape(64, 128), "c": jnp.linspace(0, 1, 8192)}
  grads = jax.tree.map(lambda p: jnp.sin(p * 5 + 0.3), params)
  tx = adamw_jax.param_groups({"q": (r"^w$", {"moment_bits": 8})}, rest={}, learning_rate=1e-2)
  updates, state = tx.update(grads, tx.init(params), params)
  q_updates, _ = adamw_jax.adamw(1e-2, moment_bits=8).update(
    {"w": grads["w"]},
    adamw_jax.adamw(1e-2, moment_bits=8).init({"w": params["w"]}),
    {"w": params["w"]},
  )
  np.testing.assert_array_equal(updates["w"], q_updates["w"])
  plain, _ = adamw_jax.adamw(1e-2).update(
    {"c": grads["c"]}, adamw_jax.adamw(1e-2).init({"c": params["c"]}), {"c": params["c"]}
  )
  np.testing.assert_array_equal(updates["c"], plain["c"])
  assert isinstance(state.inner_states["q"].inner_state, adamw_jax.LowMemoryAdamState)


# --------------------------------------------------------------------------
# 4-bit moments: torchao's AdamW4bit (2309.01507)
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
  "signed, reference",
  [(True, subclass_4bit.get_qmap_signed), (False, subclass_4bit.get_qmap_unsigned)],
)
def test_4bit_quantization_map_is_torchaos(signed, reference):
  ours = _qmap.quantization_map(signed, 4)
  assert ours.shape == (16,)
  np.testing.assert_array_equal(ours, np.asarray(reference(), np.float32))


@pytest.mark.parametrize("signed", [True, False])
def test_4bit_quantize_and_dequantize_are_torchaos_bit_for_bit(signed):
  """Codes packed two a byte as torchao's ``copy_`` packs them, scales and dequantized values."""
  rng = np.random.default_rng(5)
  x = rng.standard_normal((32, 256)).astype(np.float32) * np.logspace(-8, 1, 256, dtype=np.float32)
  x = x if signed else np.abs(x)
  x[3] = 0.0  # an all-zero block: scale clipped to 1e-12
  for block in (64, 128, 1024):
    ref = OptimState4bit.zeros(x.shape, signed, block)
    ref.copy_(torch.tensor(x))
    ours = _quantize.quantize(jnp.asarray(x), block, signed, 4)
    assert ours.codes.shape == (x.size // 2,) and ours.codes.dtype == jnp.uint8
    np.testing.assert_array_equal(np.asarray(ours.codes), _np(ref.codes))
    np.testing.assert_array_equal(np.asarray(ours.scale), _np(ref.scale))
    assert isinstance(ours, adamw_jax.PackedQuantizedMoment)
    back = _quantize.dequantize(ours, signed, x.shape)
    np.testing.assert_array_equal(np.asarray(back), _np(ref.dequantize()))


def test_adamw4bit_step_against_torchao():
  """From torchao's state at each step, one step of ours and of torchao's AdamW4bit.

  As for 8-bit: the first moment's codes and scales are torchao's bit for bit;
  the second moment differs by the one rounding of ``v*b2 + (1-b2)*g*g``
  against torchao's lerp (a code by at most one, the scales by 2**-22
  relative), and the parameters by torchao's order of the step plus, where a
  second-moment code differs, that code's step of the coarse 4-bit map.
  Measured: no second-moment code differs here, nor in 6 steps of a
  (512, 1024) leaf (3.1M codes); the scales differ by at most 2**-22.
  """
  rng = np.random.default_rng(6)
  shape, lr, wd, block = (64, 128), 1e-2, 0.1, 128
  p = torch.tensor(rng.standard_normal(shape).astype(np.float32))
  m = OptimState4bit.zeros(shape, True, block)
  v = OptimState4bit.zeros(shape, False, block)
  tx = adamw_jax.adamw(lr, weight_decay=wd, moment_bits=4)  # torchao's default block: 128
  state = tx.init({"w": jnp.asarray(_np(p))})
  assert state.mu["w"].scale.shape == (p.numel() // block,)
  step = torch.tensor(0.0)
  v_mismatches = 0
  unpack = lambda c: np.stack([c >> 4, c & 15], axis=-1).reshape(-1).astype(int)
  for k in range(8):
    g = rng.standard_normal(shape).astype(np.float32) * (1 + k)
    params = {"w": jnp.asarray(_np(p))}
    state = state._replace(
      count=jnp.asarray(k, jnp.int32), mu={"w": _as_ours(m)}, nu={"w": _as_ours(v)}
    )
    updates, state = tx.update({"w": jnp.asarray(g)}, state, params)
    ours_p = np.asarray(optax.apply_updates(params, updates)["w"])
    step += 1
    single_param_adam(
      p, torch.tensor(g), step, m, v, None, torch.tensor(lr), 0.9, 0.999, wd, 1e-8, True, False
    )
    np.testing.assert_array_equal(np.asarray(state.mu["w"].codes), _np(m.codes))
    np.testing.assert_array_equal(np.asarray(state.mu["w"].scale), _np(m.scale))
    np.testing.assert_allclose(np.asarray(state.nu["w"].scale), _np(v.scale), rtol=2.0**-22)
    diff = unpack(np.asarray(state.nu["w"].codes)) - unpack(_np(v.codes))
    assert np.abs(diff).max() <= 1
    v_mismatches += int(np.count_nonzero(diff))
    err = np.abs(ours_p - _np(p)).reshape(-1)
    t = k + 1
    relative = 2.0**-23 * (1 / (1 - 0.9**t) + 1 / (1 - 0.999**t)) + 2.0**-20
    before = np.asarray(params["w"]).reshape(-1)
    moved = np.abs(ours_p.reshape(-1) - before) + lr * wd * np.abs(before)
    bound = 4 * np.spacing(np.abs(_np(p).reshape(-1))) + relative * moved
    # A code one off: v by one step of the linear map (j/16 against (j+1)/16 of the scale, j >= 1:
    # no zero), so the Adam step by a factor within [1/sqrt(2), sqrt(2)].
    bad = ~np.where(diff == 0, err <= bound, err <= bound + (np.sqrt(2) - 1) * moved)
    assert not bad.any(), (k, (err / bound)[bad][:4], err[bad][:4] / lr)
  assert v_mismatches <= 1e-3 * 8 * p.numel(), v_mismatches


def test_4bit_state_is_an_eighth_and_small_leaves_are_unchanged():
  params = {"big": jnp.ones((64, 128)), "small": jnp.linspace(-1, 1, 100), "odd": jnp.ones((4160,))}
  grads = jax.tree.map(lambda p: jnp.cos(p * 3 + 1), params)
  tx4 = adamw_jax.adamw(1e-2, moment_bits=4)
  s4 = tx4.init(params)
  big = s4.mu["big"]
  assert isinstance(big, adamw_jax.QuantizedMoment)
  assert big.codes.shape == (4096,) and big.codes.dtype == jnp.uint8
  assert big.scale.shape == (64,)  # blocks of 128, torchao's AdamW4bit default
  assert not isinstance(s4.mu["odd"], adamw_jax.QuantizedMoment)  # 4160 = 32.5 * 128
  assert not isinstance(s4.mu["small"], adamw_jax.QuantizedMoment)  # < 4096 elements
  nbytes = lambda t: sum(x.nbytes for x in jax.tree.leaves(t))
  assert nbytes((s4.mu["big"], s4.nu["big"])) == 2 * 64 * 128 * (0.5 + 4 / 128)
  u4, s4 = tx4.update(grads, s4, params)
  tx = adamw_jax.adamw(1e-2)
  u, s = tx.update(grads, tx.init(params), params)
  for k in ("small", "odd"):  # the same kernel as without the option, bit for bit
    np.testing.assert_array_equal(u4[k], u[k])
    np.testing.assert_array_equal(s4.mu[k], s.mu[k])
    np.testing.assert_array_equal(s4.nu[k], s.nu[k])
  np.testing.assert_allclose(u4["big"], u["big"], rtol=0.1)  # the first step: m/sqrt(v) ~ sign
  with pytest.raises(ValueError, match="moment_block_size=129 must be even"):
    adamw_jax.scale_by_adam(moment_bits=4, moment_block_size=129)
  direction, state = adamw_jax.scale_by_adam(moment_bits=4, moment_block_size=512).update(
    {"w": params["big"]},
    adamw_jax.scale_by_adam(moment_bits=4, moment_block_size=512).init({"w": params["big"]}),
  )
  assert state.mu["w"].scale.shape == (16,) and state.mu["w"].codes.shape == (4096,)
  np.testing.assert_allclose(direction["w"], 1.0, atol=0.05)  # m/sqrt(v) of a constant gradient


def test_4bit_with_amsgrad_mask_flat_buffers_fused_step_and_checkpoint(tmp_path):
  params = {"w": jnp.linspace(-1, 1, 8192).reshape(64, 128), "b": jnp.zeros(8)}
  grads = jax.tree.map(lambda p: jnp.sin(p * 5 + 0.3), params)
  mask = {"w": True, "b": False}
  tx = adamw_jax.adamw(1e-2, weight_decay=0.1, amsgrad=True, mask=mask, moment_bits=4)
  state = tx.init(params)
  assert isinstance(state.nu_max["w"], adamw_jax.QuantizedMoment)
  updates, new_state = tx.update(grads, state, params)
  fused_params, fused_state = adamw_jax.fused_step(tx, grads, state, params)
  expected = optax.apply_updates(params, updates)
  for k in params:
    np.testing.assert_array_equal(fused_params[k], expected[k])
  assert jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()), fused_state, new_state))
  adamw_jax.save_opt_state(tmp_path / "ckpt", new_state)
  restored = adamw_jax.restore_opt_state(tmp_path / "ckpt", tx.init(params))
  assert jax.tree.structure(restored) == jax.tree.structure(new_state)
  for x, y in zip(jax.tree.leaves(restored), jax.tree.leaves(new_state)):
    assert x.dtype == y.dtype
    np.testing.assert_array_equal(x, y)
  with pytest.raises(ValueError, match=r"'w' has 4-bit moments \(moment_bits=4\); writing them"):
    adamw_jax.to_torch_state_dict(torch.optim.AdamW([torch.nn.Parameter(torch.zeros(8))]), state)
  # Flat buffers: the 4-bit leaves packed apart, whole blocks of 128 (whole bytes) each.
  sizes = {"a": (4096,), "b": (100,), "d": (64, 96), "e": (4224,)}
  rng = np.random.default_rng(7)
  tree = {k: jnp.asarray(rng.standard_normal(s), jnp.float32) for k, s in sizes.items()}
  tx4 = adamw_jax.adamw(1e-2, weight_decay=0.1, moment_bits=4)
  flat = adamw_jax.flatten(tree, moment_block_size=128)
  flat_state, tree_state = tx4.init(flat), tx4.init(tree)
  assert isinstance(flat_state.mu.buffers[0], adamw_jax.QuantizedMoment)
  flat_params, tree_params = flat, tree
  for _k in range(2):
    g = {n: jnp.asarray(rng.standard_normal(s), jnp.float32) for n, s in sizes.items()}
    flat_updates, flat_state = tx4.update(flat_params.pack(g), flat_state, flat_params)
    tree_updates, tree_state = tx4.update(g, tree_state, tree_params)
    flat_params = optax.apply_updates(flat_params, flat_updates)
    tree_params = optax.apply_updates(tree_params, tree_updates)
    for n in sizes:
      np.testing.assert_array_equal(flat_params.view()[n], tree_params[n])
  q = flat_state.nu.buffers[0]
  np.testing.assert_array_equal(
    q.codes, jnp.concatenate([tree_state.nu[n].codes for n in ("a", "d", "e")])
  )


# --------------------------------------------------------------------------
# Non-finite gradients in quantized moments: torchao's policy, the block poisoned
# --------------------------------------------------------------------------


def _block_codes(codes, bits: int, block: int, b: int) -> np.ndarray:
  """The codes of block `b`: 8-bit codes in row-major order, 4-bit ones as packed bytes."""
  flat = np.asarray(codes).reshape(-1)
  width = block if bits == 8 else block // 2
  return flat[b * width : (b + 1) * width]


@pytest.mark.parametrize(
  "bits, block, kind", [(8, 256, OptimState8bit), (4, 128, OptimState4bit)], ids=["8bit", "4bit"]
)
def test_a_non_finite_gradient_poisons_its_block_as_in_torchao(bits, block, kind):
  """torchao 0.18.0's AdamW8bit/AdamW4bit step (eager; its compiled step measured the same).

  A NaN gradient element makes its block's scale NaN in both moments (every
  code of the block 0), an infinite one makes it infinite: the codes and
  scales of those blocks are torchao's (NaN for NaN; the next step, torchao's
  lerp makes an infinite second moment NaN where torch's arithmetic, ours,
  keeps it infinite). The step that sees it
  writes NaN to that element's parameter only (the step reads the moments
  before they are quantized); from the next step the whole block's
  parameters are NaN. Other blocks stay finite.
  """
  rng = np.random.default_rng(9)
  shape, lr, nan_at, inf_at = (32, 128), 1e-2, 5, 3 * block + 7
  p0 = rng.standard_normal(shape).astype(np.float32)
  p = torch.tensor(p0)
  m, v = kind.zeros(shape, True, block), kind.zeros(shape, False, block)
  tx = adamw_jax.adamw(lr, weight_decay=0.0, moment_bits=bits, moment_block_size=block)
  params = {"w": jnp.asarray(p0)}
  state = tx.init(params)
  g1 = rng.standard_normal(shape).astype(np.float32)
  g1.reshape(-1)[[nan_at, inf_at]] = [np.nan, np.inf]
  g2 = rng.standard_normal(shape).astype(np.float32)
  poisoned = np.zeros(p0.size, bool)
  poisoned[:block] = poisoned[3 * block : 4 * block] = True
  for k, g in enumerate((g1, g2)):
    updates, state = tx.update({"w": jnp.asarray(g)}, state, params)
    params = optax.apply_updates(params, updates)
    step = torch.tensor(float(k + 1))
    single_param_adam(
      p, torch.tensor(g), step, m, v, None, torch.tensor(lr), 0.9, 0.999, 0.0, 1e-8, True, False
    )
    for ours, theirs in ((state.mu["w"], m), (state.nu["w"], v)):
      scale, want = np.asarray(ours.scale), _np(theirs.scale)
      if k == 0 or ours is state.mu["w"]:
        np.testing.assert_array_equal(np.isnan(scale), np.isnan(want))
        np.testing.assert_array_equal(scale[np.isinf(want)], want[np.isinf(want)])
      else:  # an infinite second moment: torchao's lerp gives inf - inf, torch's arithmetic inf
        np.testing.assert_array_equal(np.isfinite(scale), np.isfinite(want))
      assert np.isnan(scale[0]) and not np.isfinite(scale[3]) and np.isfinite(scale[4:]).all()
      for b in (0, 3):
        np.testing.assert_array_equal(
          _block_codes(ours.codes, bits, block, b), _block_codes(theirs.codes, bits, block, b)
        )
    nan = np.isnan(np.asarray(params["w"]).reshape(-1))
    np.testing.assert_array_equal(nan, np.isnan(_np(p).reshape(-1)))
    if k == 0:
      assert np.flatnonzero(nan).tolist() == [nan_at, inf_at]
    else:
      np.testing.assert_array_equal(nan, poisoned)


def test_apply_if_finite_skips_a_nan_step_with_8bit_moments():
  """The way to keep a block from a NaN gradient: skip the step (docs/bad-inputs.md)."""
  params = {"w": jnp.linspace(-1, 1, 4096)}
  tx = optax.apply_if_finite(adamw_jax.adamw(1e-2, moment_bits=8), max_consecutive_errors=5)
  good = {"w": jnp.cos(params["w"])}
  _, state = tx.update(good, tx.init(params), params)
  updates, skipped = tx.update({"w": good["w"].at[5].set(jnp.nan)}, state, params)
  assert np.all(np.asarray(updates["w"]) == 0) and int(skipped.total_notfinite) == 1
  for x, y in zip(jax.tree.leaves(skipped.inner_state), jax.tree.leaves(state.inner_state)):
    np.testing.assert_array_equal(x, y)


# --------------------------------------------------------------------------
# Stochastic rounding (torchao's bf16_stochastic_round) and Kahan sums (torch-optimi)
# --------------------------------------------------------------------------


def test_stochastic_rounding_is_unbiased():
  """Mean of 4096 roundings of each value within 5 standard errors of the exact value."""
  rng = np.random.default_rng(2)
  x = (rng.standard_normal(64) * np.logspace(-3, 3, 64)).astype(np.float32)
  x[0] = 1.0 + 2.0**-12  # 1/32 of the way from 1 to the next bfloat16
  draws = 4096
  keys = jax.random.split(jax.random.PRNGKey(0), draws)
  rounded = jax.vmap(lambda k: _lowprec.stochastic_round_bf16(jnp.asarray(x), k))(keys)
  rounded = np.asarray(rounded.astype(jnp.float32), np.float64)
  down = np.asarray(jnp.asarray(x).astype(jnp.bfloat16).astype(jnp.float32))  # a neighbour
  ulp = np.spacing(np.abs(x).astype(jnp.bfloat16).astype(np.float32)).astype(np.float64) * 2**16
  assert np.all((rounded == down) | (np.abs(rounded - x) < ulp)), "not one of the two neighbours"
  mean_error = np.abs(rounded.mean(axis=0) - x.astype(np.float64))
  assert np.all(mean_error <= 5 * (ulp / 2) / np.sqrt(draws)), mean_error / ulp
  assert 0 < np.mean(rounded[:, 0] > 1.0) < 0.1  # rounds up about 1/32 of the time
  exact = jnp.asarray([1.0, -0.5, 3.0], jnp.float32)
  np.testing.assert_array_equal(_lowprec.stochastic_round_bf16(exact, keys[0]), exact)


def test_kahan_write_is_torch_optimis_bit_for_bit():
  """torch-optimi's SGD(lr=1, kahan_sum=True) adds -grad with the same compensation steps."""
  rng = np.random.default_rng(3)
  p0 = rng.standard_normal(512).astype(np.float32)
  param = torch.nn.Parameter(torch.tensor(p0).bfloat16())
  opt = optimi.SGD([param], lr=1.0, kahan_sum=True)
  p, comp = jnp.asarray(p0).astype(jnp.bfloat16), jnp.zeros(512, jnp.bfloat16)
  for _k in range(20):
    u = (rng.standard_normal(512) * 10.0 ** rng.uniform(-6, -2, 512)).astype(np.float32)
    u_bf16 = torch.tensor(u).bfloat16()
    param.grad = -u_bf16
    opt.step()
    p, comp = _lowprec.kahan_write(p, comp, jnp.asarray(u_bf16.float().numpy()))
    np.testing.assert_array_equal(np.asarray(p.astype(jnp.float32)), _np(param.float()))
    np.testing.assert_array_equal(
      np.asarray(comp.astype(jnp.float32)), _np(opt.state[param]["kahan_comp"].float())
    )


def _tiny_steps(tx, steps: int, dtype=jnp.bfloat16):
  """`steps` AdamW steps on a quadratic whose updates are far below half a bf16 ulp."""
  params = {"w": jnp.full((4096,), 1.0, dtype)}
  state = tx.init(params)
  target = jnp.full((4096,), 0.0)

  @jax.jit
  def step(params, state):
    grads = jax.tree.map(lambda p: (p.astype(jnp.float32) - target).astype(p.dtype), params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  for _ in range(steps):
    params, state = step(params, state)
  return params, state


def test_bf16_stall_and_its_cures_track_float32():
  lr, steps = 1e-4, 200  # each step moves w by ~lr: 1/80 of a bf16 ulp at 1.0
  fp32, _ = _tiny_steps(adamw_jax.adamw(lr, weight_decay=0.0), steps, jnp.float32)
  plain, _ = _tiny_steps(adamw_jax.adamw(lr, weight_decay=0.0), steps)
  sr, _ = _tiny_steps(adamw_jax.adamw(lr, weight_decay=0.0, param_rounding="stochastic"), steps)
  kahan, state = _tiny_steps(adamw_jax.adamw(lr, weight_decay=0.0, param_rounding="kahan"), steps)
  moved = 1.0 - float(fp32["w"].mean())
  assert moved > 0.015
  assert float(plain["w"].astype(jnp.float32).mean()) == 1.0  # the stall: nothing moves
  for cured in (sr, kahan):
    assert abs(1.0 - float(cured["w"].astype(jnp.float32).mean()) - moved) < 0.05 * moved
  assert state.compensation["w"].dtype == jnp.bfloat16


def test_stochastic_rounding_is_reproducible_and_resumable(tmp_path):
  tx = adamw_jax.adamw(1e-3, param_rounding="stochastic", rounding_seed=5)
  params = {"w": jnp.linspace(-1, 1, 300, dtype=jnp.bfloat16), "f": jnp.ones(3)}
  grads = jax.tree.map(lambda p: jnp.sin(7 * p), params)

  def run(params, state, n):
    for _ in range(n):
      updates, state = tx.update(grads, state, params)
      params = optax.apply_updates(params, updates)
    return params, state

  a, sa = run(params, tx.init(params), 4)
  b, _sb = run(params, tx.init(params), 4)
  np.testing.assert_array_equal(a["w"], b["w"])
  half, s_half = run(params, tx.init(params), 2)
  adamw_jax.save_opt_state(tmp_path / "ckpt", s_half)
  restored = adamw_jax.restore_opt_state(tmp_path / "ckpt", tx.init(params))
  np.testing.assert_array_equal(restored.key, s_half.key)
  c, sc = run(half, restored, 2)
  np.testing.assert_array_equal(c["w"], a["w"])
  np.testing.assert_array_equal(sc.key, sa.key)
  other_tx = adamw_jax.adamw(1e-3, param_rounding="stochastic", rounding_seed=6)
  other = optax.apply_updates(params, other_tx.update(grads, other_tx.init(params), params)[0])
  first = optax.apply_updates(params, tx.update(grads, tx.init(params), params)[0])
  assert not np.array_equal(other["w"], first["w"])  # another seed, other roundings
  assert a["w"].dtype == jnp.bfloat16 and sa.key.dtype == jnp.uint32


def test_8bit_state_survives_a_checkpoint(tmp_path):
  params = {"w": jnp.linspace(-1, 1, 8192)}
  tx = adamw_jax.adamw(1e-2, moment_bits=8, param_rounding="kahan")
  _updates, state = tx.update(jax.tree.map(jnp.cos, params), tx.init(params), params)
  adamw_jax.save_opt_state(tmp_path / "ckpt", state)
  restored = adamw_jax.restore_opt_state(tmp_path / "ckpt", tx.init(params))
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  for x, y in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
    assert x.dtype == y.dtype
    np.testing.assert_array_equal(x, y)


# --------------------------------------------------------------------------
# Validation and defaults
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
  "kwargs, error, match",
  [
    ({"moment_bits": 5}, ValueError, r"Invalid moment_bits: 5 \(must be None or 8 or 4\)"),
    ({"moment_bits": 4, "moment_block_size": 65}, ValueError, "moment_block_size=65 must be even"),
    ({"moment_bits": True}, ValueError, "Invalid moment_bits: True"),
    ({"moment_bits": 8, "moment_block_size": 0}, ValueError, r"Invalid moment_block_size: 0.0"),
    ({"moment_bits": 8, "moment_block_size": 2.5}, ValueError, "must be an integer"),
    ({"moment_block_size": 128}, ValueError, "only used with moment_bits=8 or 4"),
    ({"param_rounding": "up"}, ValueError, "Invalid param_rounding: 'up'"),
    ({"rounding_seed": 3}, ValueError, "only used with param_rounding='stochastic'"),
    ({"param_rounding": "stochastic", "rounding_seed": 2**32}, ValueError, "Invalid rounding_seed"),
    ({"moment_bits": 8, "mu_dtype": jnp.bfloat16}, ValueError, "mu_dtype=bfloat16 cannot be used"),
  ],
)
def test_invalid_low_memory_options_are_refused(kwargs, error, match):
  with pytest.raises(error, match=match):
    adamw_jax.adamw(**kwargs)


def test_leaves_that_do_not_fit_are_refused_at_init():
  with pytest.raises(ValueError, match="rounds to bfloat16; the parameter at 'w' is float16"):
    adamw_jax.adamw(param_rounding="stochastic").init({"w": jnp.ones(3, jnp.float16)})
  with pytest.raises(ValueError, match="quantizes real moments; the parameter at 'c' is complex64"):
    adamw_jax.adamw(moment_bits=8).init({"c": jnp.ones(8, jnp.complex64)})
  with pytest.raises(TypeError, match="unexpected keyword argument 'param_rounding'"):
    adamw_jax.scale_by_adam(param_rounding="kahan")
  with pytest.raises(ValueError, match=r"needs|params"):
    tx = adamw_jax.adamw(param_rounding="kahan", weight_decay=0.0)
    params = {"w": jnp.ones(3, jnp.bfloat16)}
    tx.update(params, tx.init(params))


def test_scale_by_adam_with_8bit_moments():
  grads = {"w": jnp.linspace(-1, 1, 4096)}
  tx = adamw_jax.scale_by_adam(moment_bits=8, moment_block_size=512)
  direction, state = tx.update(grads, tx.init(grads))
  assert state.mu["w"].scale.shape == (8,)
  np.testing.assert_allclose(direction["w"], jnp.sign(grads["w"]), atol=0.05)


def test_defaults_keep_the_plain_state():
  params = {"w": jnp.ones(3)}
  for tx in (adamw_jax.adamw(), adamw_jax.adam(), adamw_jax.scale_by_adam()):
    assert type(tx.init(params)) is adamw_jax.ScaleByAdamState


@pytest.mark.parametrize(
  "kwargs, dtype",
  [
    ({}, jnp.float32),
    ({"moment_bits": 8}, jnp.float32),
    ({"moment_bits": 8, "amsgrad": True}, jnp.float32),
    ({"moment_bits": 4}, jnp.float32),
    ({"mu_dtype": jnp.bfloat16, "nu_dtype": jnp.bfloat16}, jnp.float32),
    ({"param_rounding": "stochastic"}, jnp.bfloat16),
    ({"param_rounding": "kahan", "moment_bits": 4}, jnp.bfloat16),
    ({"param_rounding": "remainder"}, jnp.bfloat16),
  ],
)
@pytest.mark.parametrize("placed", ["uncommitted", "one device", "a mesh"])
def test_the_state_is_placed_as_the_params_and_a_jitted_step_compiles_once(kwargs, dtype, placed):
  # A state leaf committed where the params are not (or the reverse: optax's count beside
  # committed params) gives the jitted step's second call inputs placed otherwise than the
  # first's: a second compile, of the whole training step.
  tx = adamw_jax.adamw(1e-3, **kwargs)
  params = {"w": jnp.ones((64, 512), dtype), "small": jnp.ones((3,), dtype)}
  if placed == "one device":
    params = jax.device_put(params, jax.devices()[0])
  elif placed == "a mesh":
    mesh = jax.make_mesh((1,), ("d",))
    params = jax.device_put(params, jax.sharding.NamedSharding(mesh, jax.P("d")))
  state = tx.init(params)
  committed = placed != "uncommitted"
  leaves = jax.tree_util.tree_leaves_with_path(state)
  assert {jax.tree_util.keystr(k) for k, x in leaves if x.committed != committed} == set()
  assert all(x.devices() == {jax.devices()[0]} for _, x in leaves)

  compiles = []
  listener = lambda event, secs, **kw: compiles.append(event)
  step = jax.jit(lambda g, s, p: adamw_jax.fused_step(tx, g, s, p))
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    p, s = params, state
    for _ in range(3):
      p, s = step(params, s, p)
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert compiles.count("/jax/core/compile/backend_compile_duration") == 1
  assert {x.committed for x in jax.tree.leaves((p, s))} == {committed}
