"""from_torch / to_torch_state_dict with the low-memory references: torchao AdamW8bit, torch-optimi.

torchao 0.18.0's steps are driven eagerly through its ``single_param_adam``
(what ``AdamW8bit.step`` runs under ``torch.compile``, which takes ~30 s to
compile here), with its state built as ``AdamW8bit.step`` builds it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import optimi
import pytest
import torch
from torchao.optim import Adam8bit, AdamW4bit, AdamW8bit
from torchao.optim.adam import single_param_adam
from torchao.optim.subclass_8bit import OptimState8bit

import adamw_jax

LR, WD, BLOCK = 1e-2, 0.1, 256
SHAPES = {"b": (100,), "v": (4096,), "w": (64, 128)}  # sorted (jax.tree.leaves order); b: < 4096


def _np(t: torch.Tensor) -> np.ndarray:
  t = t.detach()
  return t.view(torch.int16).numpy().view(jnp.bfloat16) if t.dtype == torch.bfloat16 else t.numpy()


def _torch_params(seed: int, dtype=torch.float32) -> dict[str, torch.nn.Parameter]:
  rng = np.random.default_rng(seed)
  return {
    k: torch.nn.Parameter(torch.tensor(rng.standard_normal(s).astype(np.float32)).to(dtype))
    for k, s in SHAPES.items()
  }


def _grads(seed: int, params) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  return {k: rng.standard_normal(p.shape).astype(np.float32) for k, p in params.items()}


def _new_buffer(p: torch.Tensor, signed: bool, block: int):
  """torchao's ``_AdamBase._new_buffer`` for a plain tensor."""
  if p.numel() >= 4096 and p.numel() % block == 0:
    return OptimState8bit.zeros(p.shape, signed, block, p.device, dtype=p.dtype)
  return torch.zeros_like(p)


def _torchao_step(opt, grads: dict[str, np.ndarray]) -> None:
  """``AdamW8bit.step`` without torch.compile; grads in the order of the one param group."""
  group = opt.param_groups[0]
  for p, g in zip(group["params"], grads.values()):
    state = opt.state[p]
    if not state:
      state["step"] = torch.tensor(0.0)
      state["exp_avg"] = _new_buffer(p, True, opt.block_size)
      state["exp_avg_sq"] = _new_buffer(p, False, opt.block_size)
      if group["amsgrad"]:
        state["max_exp_avg_sq"] = _new_buffer(p, False, opt.block_size)
    state["step"] += 1
    single_param_adam(
      p.detach(),
      torch.tensor(g).to(p.dtype),
      state["step"],
      state["exp_avg"],
      state["exp_avg_sq"],
      state.get("max_exp_avg_sq"),
      group["lr"],
      group["betas"][0],
      group["betas"][1],
      group["weight_decay"],
      group["eps"],
      opt.is_adamw,
      opt.bf16_stochastic_round and p.dtype is torch.bfloat16,
    )


def _jax(params: dict[str, torch.Tensor]) -> dict[str, jax.Array]:
  return {k: jnp.asarray(_np(p)) for k, p in params.items()}


def _torchao_run(cls=AdamW8bit, amsgrad=False, steps=3, **kw):
  """`steps` steps of torchao; with `amsgrad`, max_exp_avg_sq is a copy of exp_avg_sq.

  (torchao's AMSGrad runs only compiled: eagerly, ``torch.maximum`` of an
  ``OptimState8bit`` is not implemented.)
  """
  tp = _torch_params(0)
  opt = cls(list(tp.values()), lr=LR, weight_decay=WD, **kw)
  for k in range(steps):
    _torchao_step(opt, _grads(10 + k, tp))
  if amsgrad:
    opt.param_groups[0]["amsgrad"] = True
    for p in tp.values():
      v = opt.state[p]["exp_avg_sq"]
      opt.state[p]["max_exp_avg_sq"] = (
        OptimState8bit(v.codes.clone(), v.scale.clone(), v.qmap.clone(), False, dtype=v.dtype)
        if isinstance(v, OptimState8bit)
        else v.clone()
      )
  return tp, opt


def _assert_state_is_torchaos(state, opt, tp, keys) -> None:
  for name, p in tp.items():
    for key, field in zip(("exp_avg", "exp_avg_sq", "max_exp_avg_sq"), ("mu", "nu", "nu_max")):
      if key not in keys:
        continue
      ref, ours = opt.state[p][key], getattr(state, field)[name]
      if isinstance(ref, OptimState8bit):
        assert isinstance(ours, adamw_jax.QuantizedMoment), (name, key)
        np.testing.assert_array_equal(np.asarray(ours.codes), _np(ref.codes))
        np.testing.assert_array_equal(np.asarray(ours.scale), _np(ref.scale))
      else:
        assert not isinstance(ours, adamw_jax.QuantizedMoment), (name, key)
        np.testing.assert_array_equal(np.asarray(ours), _np(ref))


@pytest.mark.parametrize("cls, amsgrad", [(AdamW8bit, False), (AdamW8bit, True), (Adam8bit, False)])
def test_torchao_state_round_trips_bit_for_bit(cls, amsgrad):
  tp, opt = _torchao_run(cls, amsgrad)
  keys = ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if amsgrad else ())
  tx, state = adamw_jax.from_torch(opt, _jax(tp))
  assert isinstance(state, adamw_jax.LowMemoryAdamState) and int(state.count) == 3
  _assert_state_is_torchaos(state, opt, tp, keys)
  # Back: into a fresh torchao optimizer, by the transform and by the optimizer.
  for target in ("tx", "optimizer"):
    fresh_params = _torch_params(1)
    fresh = cls(list(fresh_params.values()), lr=LR, weight_decay=WD, amsgrad=amsgrad)
    sd = adamw_jax.to_torch_state_dict(tx if target == "tx" else fresh, state)
    fresh.load_state_dict(sd)
    for (name, p), q in zip(tp.items(), fresh_params.values()):
      assert float(fresh.state[q]["step"]) == 3.0
      for key in keys:
        a, b = opt.state[p][key], fresh.state[q][key]
        assert type(a) is type(b), (name, key)
        if isinstance(a, OptimState8bit):
          assert b.signed == a.signed and b.block_size == a.block_size
          assert torch.equal(a.codes, b.codes) and torch.equal(a.scale, b.scale)
          assert torch.equal(a.qmap, b.qmap)
        else:
          assert torch.equal(a, b)


def test_torchao_run_continues_within_the_established_bounds():
  """torchao's next steps vs ours from its imported state: tests/test_lowmem.py's bounds, summed.

  The runs then go on apart, so each step's bound (4 ulps of p plus torchao's
  float32 bias corrections, where no second-moment code has differed yet;
  2% of lr per step where one has) adds to the previous steps'.
  """
  tp, opt = _torchao_run()
  tx, state = adamw_jax.from_torch(opt, _jax(tp))
  params = _jax(tp)
  ever = {n: np.zeros(p.shape, bool) for n, p in tp.items()}
  total = {n: np.zeros(p.shape, np.float64) for n, p in tp.items()}
  for k in range(3):
    grads = _grads(20 + k, tp)
    updates, state = tx.update({n: jnp.asarray(g) for n, g in grads.items()}, state, params)
    new = optax.apply_updates(params, updates)
    _torchao_step(opt, grads)
    t = 4 + k
    relative = 2.0**-23 * (1 / (1 - 0.9**t) + 1 / (1 - 0.999**t)) + 2.0**-20
    for name, p in tp.items():
      ref_m, ref_v = opt.state[p]["exp_avg"], opt.state[p]["exp_avg_sq"]
      if isinstance(ref_m, OptimState8bit):
        # The first moment depends on the gradients only: torchao's bit for bit at every step.
        np.testing.assert_array_equal(np.asarray(state.mu[name].codes), _np(ref_m.codes))
        np.testing.assert_array_equal(np.asarray(state.mu[name].scale), _np(ref_m.scale))
        diff = np.asarray(state.nu[name].codes).astype(int) - _np(ref_v.codes).astype(int)
        assert np.abs(diff).max() <= 1
        ever[name] |= diff != 0
      ours, old = np.asarray(new[name]), np.asarray(params[name])
      moved = np.abs(ours - old) + LR * WD * np.abs(old)
      total[name] += 4 * np.spacing(np.abs(_np(p))) + relative * moved
      err = np.abs(ours - _np(p))
      ok = np.where(ever[name], err <= 0.02 * LR * (k + 1), err <= total[name])
      assert ok.all(), (k, name, float(np.max(err / total[name])))
    params = new


def test_torchao_stochastic_rounding_and_block_size_are_read():
  tp = _torch_params(0, torch.bfloat16)
  opt = AdamW8bit(list(tp.values()), lr=LR, block_size=128, bf16_stochastic_round=True)
  _torchao_step(opt, _grads(10, tp))
  tx, state = adamw_jax.from_torch(opt, _jax(tp))
  assert state.key is not None and state.mu["w"].scale.shape == (64 * 128 // 128,)
  _assert_state_is_torchaos(state, opt, tp, ("exp_avg", "exp_avg_sq"))
  assert state.mu["b"].dtype == jnp.bfloat16  # torchao keeps plain moments in the param's dtype
  fresh = AdamW8bit(
    list(_torch_params(1, torch.bfloat16).values()),
    lr=LR,
    block_size=128,
    bf16_stochastic_round=True,
  )
  fresh.load_state_dict(adamw_jax.to_torch_state_dict(tx, state))
  q = fresh.state[fresh.param_groups[0]["params"][2]]["exp_avg"]  # 'w'
  assert torch.equal(q.codes, opt.state[tp["w"]]["exp_avg"].codes) and q.block_size == 128


def test_torchao_refusals():
  tp, opt = _torchao_run(steps=1)
  with pytest.raises(ValueError, match="pass the torchao optimizer itself"):
    adamw_jax.from_torch(opt.state_dict(), _jax(tp))
  with pytest.raises(TypeError, match="4-bit and FP8 moments are not implemented"):
    adamw_jax.from_torch(AdamW4bit(list(tp.values())), _jax(tp))
  _, state = adamw_jax.from_torch(opt, _jax(tp))
  with pytest.raises(
    ValueError,
    match=r"8-bit moments \(moment_bits=8\), which "
    r"torch\.optim\.adamw\.AdamW cannot hold; load it into torchao",
  ):
    adamw_jax.to_torch_state_dict(torch.optim.AdamW(list(tp.values())), state)
  with pytest.raises(
    ValueError, match="in blocks of 256, but the torchao optimizer's block_size is 128"
  ):
    adamw_jax.to_torch_state_dict(AdamW8bit(list(tp.values()), block_size=128), state)
  with pytest.raises(ValueError, match="has a full-precision exp_avg, but the JAX leaf 'w'"):
    _mismatched_import(tp)


def test_plain_states_into_the_references():
  """A plain adamw state: refused by torchao where it quantizes; optimi's compensation from 0."""
  tp = _torch_params(0)
  params = _jax(tp)
  tx = adamw_jax.adamw(LR, weight_decay=WD)
  _, state = tx.update(jax.tree.map(jnp.cos, params), tx.init(params), params)
  with pytest.raises(
    ValueError,
    match=r"'v' has full-precision moments, but "
    r"torchao\.optim\.adam\.AdamW8bit keeps 8-bit ones .* moment_bits=8, "
    r"moment_block_size=256",
  ):
    adamw_jax.to_torch_state_dict(AdamW8bit(list(tp.values())), state)
  bf16 = {k: v.astype(jnp.bfloat16) for k, v in params.items()}
  _, state = tx.update(jax.tree.map(jnp.cos, bf16), tx.init(bf16), bf16)
  opt = optimi.AdamW(
    [torch.nn.Parameter(t.detach().bfloat16()) for t in tp.values()],
    lr=LR,
    kahan_sum=True,
    foreach=False,
    triton=False,
  )
  opt.load_state_dict(adamw_jax.to_torch_state_dict(opt, state))
  for p in opt.param_groups[0]["params"]:
    comp = opt.state[p]["kahan_comp"]
    assert comp.dtype == torch.bfloat16 and not comp.any()
    p.grad = torch.ones_like(p)
  opt.step()  # optimi continues with the compensation from zero
  assert int(opt.param_groups[0]["step"]) == 2


def _mismatched_import(tp):
  """A torchao state whose 'w' was kept full precision (as under a DTensor with other shards)."""
  opt = AdamW8bit(list(tp.values()), lr=LR)
  _torchao_step(opt, _grads(10, tp))
  opt.state[tp["w"]]["exp_avg"] = torch.zeros(SHAPES["w"])
  adamw_jax.from_torch(opt, _jax(tp))


# --------------------------------------------------------------------------
# torch-optimi: Kahan compensation and debiased moments
# --------------------------------------------------------------------------


def _optimi_adamw(tp, weight_decay, **kw):
  """optimi's AdamW with Kahan sums, in plain PyTorch (no foreach, no triton)."""
  return optimi.AdamW(
    list(tp.values()),
    lr=1e-3,
    weight_decay=weight_decay,
    kahan_sum=True,
    foreach=False,
    triton=False,
    **kw,
  )


def _optimi_run(steps=3, weight_decay=WD, **kw):
  tp = _torch_params(0, torch.bfloat16)
  tp["b"] = torch.nn.Parameter(tp["b"].detach().float())  # a float32 leaf: no compensation
  opt = _optimi_adamw(tp, weight_decay, **kw)
  for k in range(steps):
    for p, g in zip(tp.values(), _grads(30 + k, tp).values()):
      p.grad = torch.tensor(g).to(p.dtype)
    opt.step()
  return tp, opt


def test_optimi_state_round_trips_with_the_compensation_bit_for_bit():
  tp, opt = _optimi_run()
  params = _jax(tp)
  tx, state = adamw_jax.from_torch(opt, params)
  assert isinstance(state, adamw_jax.LowMemoryAdamState) and int(state.count) == 3
  assert isinstance(state.compensation["b"], optax.MaskedNode)  # float32: optimi has None
  for name in ("w", "v"):
    comp = opt.state[tp[name]]["kahan_comp"]
    assert state.compensation[name].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(state.compensation[name]), _np(comp))
  # optimi's moments are debiased: torch's m is optimi's times 1 - b1**t (one rounding).
  for name, p in tp.items():
    for key, field, beta in (("exp_avg", "mu", 0.9), ("exp_avg_sq", "nu", 0.99)):
      ref = _np(opt.state[p][key]).astype(np.float64) * (1 - beta**3)
      ours = np.asarray(getattr(state, field)[name]).astype(np.float64)
      ulp = np.spacing(np.abs(ref).astype(np.asarray(getattr(state, field)[name]).dtype))
      assert np.all(np.abs(ours - ref) <= 0.5 * ulp.astype(np.float64)), (name, key)
  fresh_params = _torch_params(1, torch.bfloat16)
  fresh_params["b"] = torch.nn.Parameter(fresh_params["b"].detach().float())
  fresh = _optimi_adamw(fresh_params, WD)
  fresh.load_state_dict(adamw_jax.to_torch_state_dict(tx, state))
  assert int(fresh.param_groups[0]["step"]) == 3 and fresh.param_groups[0]["setup"]
  worst = 0.0
  for p, q in zip(tp.values(), fresh_params.values()):
    a, b = opt.state[p], fresh.state[q]
    if a["kahan_comp"] is None:
      assert b["kahan_comp"] is None
    else:
      assert torch.equal(a["kahan_comp"], b["kahan_comp"])
    for key in ("exp_avg", "exp_avg_sq"):
      assert b[key].dtype == a[key].dtype
      x, y = _np(a[key]).astype(np.float64), _np(b[key]).astype(np.float64)
      ulp = np.spacing(np.abs(_np(a[key])).astype(_np(a[key]).dtype)).astype(np.float64)
      worst = max(worst, float(np.max(np.abs(x - y) / ulp)))
  assert worst <= 1.0, worst  # two roundings (to ours and back): at most one ulp


def test_optimi_run_continues_close_to_optimi():
  """optimi's step is torch's Adam in another order: steps from its state stay close.

  Measured as the compensated value ``p + c`` (float64), 3 steps after the
  import, weight_decay=0: within 0.1 lr for bfloat16 leaves (measured 0.061 lr;
  optimi rounds its moments to bfloat16 debiased, ours biased) and 1e-4 lr for
  the float32 leaf (measured 4e-6 lr). With weight decay the runs part by about
  one lr in 3 steps (measured 1.17 lr at weight_decay=0.1): optimi multiplies
  the bfloat16 parameter by ``1 - lr*wd`` outside the compensation, where the
  change is rounded away or to a whole ulp; ours compensates it.
  """
  lr = 1e-3
  tp, opt = _optimi_run(weight_decay=0.0)
  params = _jax(tp)
  tx, state = adamw_jax.from_torch(opt, params)
  for k in range(3):
    grads = _grads(40 + k, tp)
    for p, g in zip(tp.values(), grads.values()):
      p.grad = torch.tensor(g).to(p.dtype)
    opt.step()
    updates, state = tx.update(
      {n: jnp.asarray(g).astype(params[n].dtype) for n, g in grads.items()}, state, params
    )
    params = optax.apply_updates(params, updates)
  for name, p in tp.items():
    ours, ref = np.asarray(params[name]).astype(np.float64), _np(p).astype(np.float64)
    if name != "b":
      ours = ours + np.asarray(state.compensation[name]).astype(np.float64)
      ref = ref + _np(opt.state[p]["kahan_comp"]).astype(np.float64)
    tolerance = 1e-4 * lr if name == "b" else 0.1 * lr
    assert np.max(np.abs(ours - ref)) <= tolerance, (name, np.max(np.abs(ours - ref)) / lr)


def test_optimi_decouple_lr_and_refusals():
  tp, opt = _optimi_run(steps=1, weight_decay=1e-3, decouple_lr=True, max_lr=2e-3)
  _, state = adamw_jax.from_torch(opt, _jax(tp))
  assert int(state.count) == 1
  sd = opt.state_dict()
  sd["param_groups"][0]["gradient_release"] = True
  with pytest.raises(ValueError, match="gradient_release=True"):
    adamw_jax.from_torch(sd, _jax(tp))
  sd["param_groups"][0]["gradient_release"] = False
  sd["param_groups"][0]["my_label"] = "x"
  with pytest.raises(ValueError, match=r"'my_label'='x', which torch-optimi's AdamW"):
    adamw_jax.from_torch(sd, _jax(tp))
  adamw_jax.from_torch(sd, _jax(tp), ignore=("my_label",))
  with pytest.raises(
    ValueError,
    match=r"Kahan compensation \(param_rounding='kahan'\), which "
    r"torch\.optim\.adamw\.AdamW cannot hold",
  ):
    adamw_jax.to_torch_state_dict(torch.optim.AdamW(list(tp.values())), state)


# --------------------------------------------------------------------------
# Exact bfloat16 master weights: torch.optim.AdamW on float32 parameters
# --------------------------------------------------------------------------


def _torch_adamw_run(steps: int = 3):
  """torch's float32 AdamW (single-tensor, AMSGrad), two groups: b undecayed."""
  tp = _torch_params(5)
  groups = [{"params": [tp["b"]], "weight_decay": 0.0}, {"params": [tp["v"], tp["w"]]}]
  opt = torch.optim.AdamW(groups, lr=LR, weight_decay=WD, amsgrad=True, foreach=False)
  for k in range(steps):
    for p, g in zip(tp.values(), _grads(30 + k, tp).values()):
      p.grad = torch.tensor(g)
    opt.step()
  return tp, opt


def _same(a: np.ndarray, b: np.ndarray) -> bool:
  return a.dtype == b.dtype and a.tobytes() == b.tobytes()


def _close_to_torch(got: np.ndarray, torch_p: np.ndarray) -> None:
  """Within torch's own square root (MKL's, not correctly rounded for ~0.7 % of inputs).

  ``docs/fidelity.md``: adamw_jax's float32 AdamW is torch's single-tensor
  step but for that square root; the moments stay bitwise (checked apart).
  """
  np.testing.assert_allclose(got, torch_p, rtol=2.0**-20, atol=1e-9)
  assert np.mean(got == torch_p) > 0.98


def test_remainder_from_torch_is_torchs_float32_run_both_ways():
  """The masters are torch's parameters, exactly; the run continues adamw_jax's float32 run
  bit for bit (torch's within its square root), and goes back to torch exactly."""
  tp, opt = _torch_adamw_run()
  master = _jax(tp)
  tx, state = adamw_jax.from_torch(opt, master, param_rounding="remainder")
  params, state = adamw_jax.split_master(master, state)
  tx32, state32 = adamw_jax.from_torch(opt, master)  # the float32 run it must be
  assert {p.dtype for p in params.values()} == {jnp.dtype(jnp.bfloat16)}
  inner = [s.inner_state for s in state.inner_states.values()]
  assert all(s.remainder is not None for s in inner)

  def moments_are_torchs(state, opt, tp) -> None:
    inner = [s.inner_state for s in state.inner_states.values()]
    for name, p in tp.items():
      mine = next(i for i in inner if not isinstance(i.mu[name], optax.MaskedNode))
      for field, key in (("mu", "exp_avg"), ("nu", "exp_avg_sq"), ("nu_max", "max_exp_avg_sq")):
        assert _same(np.asarray(getattr(mine, field)[name]), _np(opt.state[p][key])), (name, key)

  for name, p in tp.items():
    assert _same(np.asarray(adamw_jax.master_params(params, state)[name]), _np(p))
  moments_are_torchs(state, opt, tp)
  # The same import from the state dict alone (the masters are the JAX params given).
  _, from_sd = adamw_jax.from_torch(opt.state_dict(), master, param_rounding="remainder")
  assert all(
    _same(np.asarray(x), np.asarray(y))
    for x, y in zip(jax.tree.leaves(from_sd), jax.tree.leaves(state))
  )

  def stepper(tx):
    @jax.jit
    def step(params, state, grads):
      updates, state = tx.update(grads, state, params)
      return optax.apply_updates(params, updates), state

    return step

  step, step32 = stepper(tx), stepper(tx32)
  p32 = master
  for k in range(3):
    grads = _grads(40 + k, tp)
    jgrads = {n: jnp.asarray(g) for n, g in grads.items()}
    params, state = step(params, state, jgrads)
    p32, state32 = step32(p32, state32, jgrads)
    for p, g in zip(tp.values(), grads.values()):
      p.grad = torch.tensor(g)
    opt.step()
    got = adamw_jax.master_params(params, state)
    for name, p in tp.items():
      assert _same(np.asarray(got[name]), np.asarray(p32[name])), (k, name)
      _close_to_torch(np.asarray(got[name]), _np(p))
    moments_are_torchs(state, opt, tp)
  # Back to torch: the state dict, and the masters as the parameters, exactly.
  sd = adamw_jax.to_torch_state_dict(tx, state)
  back = {
    n: torch.nn.Parameter(torch.tensor(np.asarray(x)))
    for n, x in adamw_jax.master_params(params, state).items()
  }
  groups = [{"params": [back["b"]], "weight_decay": 0.0}, {"params": [back["v"], back["w"]]}]
  opt2 = torch.optim.AdamW(groups, lr=LR, weight_decay=WD, amsgrad=True, foreach=False)
  opt2.load_state_dict(sd)
  moments_are_torchs(state, opt2, back)
  assert all(_same(_np(back[n]), np.asarray(p32[n])) for n in tp)
  for k in range(2):
    grads = _grads(50 + k, tp)
    params, state = step(params, state, {n: jnp.asarray(g) for n, g in grads.items()})
    for p, g in zip(back.values(), grads.values()):
      p.grad = torch.tensor(g)
    opt2.step()
    got = adamw_jax.master_params(params, state)
    for name in tp:
      _close_to_torch(np.asarray(got[name]), _np(back[name]))
    moments_are_torchs(state, opt2, back)


def test_remainder_interop_refusals():
  tp, opt = _torch_adamw_run(steps=1)
  with pytest.raises(ValueError, match=r"param_rounding='kahan': from_torch takes None"):
    adamw_jax.from_torch(opt, _jax(tp), param_rounding="kahan")
  bf16 = {n: x.astype(jnp.bfloat16) for n, x in _jax(tp).items()}
  with pytest.raises(
    ValueError,
    match=r"takes torch's float32 parameters \(the master weights\); "
    r"the parameter at 'b' is bfloat16",
  ):
    adamw_jax.from_torch(opt, bf16, param_rounding="remainder")
  tp8, opt8 = _torchao_run(steps=1)
  with pytest.raises(
    ValueError,
    match=r"continues a float32 torch\.optim\.AdamW / Adam run; "
    r"torchao\.optim\.adam\.AdamW8bit keeps its own",
  ):
    adamw_jax.from_torch(opt8, _jax(tp8), param_rounding="remainder")
