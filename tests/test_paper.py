"""The paper's decay (decay_mode="paper"), normalized weight decay and warm restarts.

The decay factor of one step is read off exactly: from zero moments and a zero
gradient the Adam step is 0 / (0 + eps) = 0, so a parameter equal to 1 becomes
the rounded factor ``1 - (lr_t / peak) * weight_decay`` itself.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adamw_jax
from adamw_jax import _hyperparams
from tests import docs_pages
from tests import torch_reference as ref


def decay_factor(tx: optax.GradientTransformation, count) -> jax.Array:
  """The parameter 1.0 after one step of `tx` at step `count` with zero gradients."""
  p = jnp.ones((), jnp.float32)
  state = tx.init(p)._replace(count=jnp.asarray(count, jnp.int32))
  updates, _ = tx.update(jnp.zeros_like(p), state, p)
  return optax.apply_updates(p, updates)


def ramp(count):
  """lr_t = 2**-8 * (t + 1): exactly 1/4, 2/4, 3/4, 4/4 of the peak 2**-6 at t = 0..3."""
  return jnp.float32(2.0**-8) * (count + 1).astype(jnp.float32)


BY_HAND = [
  # (name, transform, step, expected factor as float32 written as a float64 literal)
  # Constant lr: its own peak, eta = 1, factor 1 - 0.1 = 0.9 -> float32 0.8999999761581421.
  (
    "paper, constant lr",
    adamw_jax.adamw(1e-3, weight_decay=0.1, decay_mode="paper"),
    0,
    0.8999999761581421,
  ),
  # torch's factor for the same arguments: 1 - 1e-3 * 0.1 = 0.9999 -> 0.9998999834060669.
  ("torch, constant lr", adamw_jax.adamw(1e-3, weight_decay=0.1), 0, 0.9998999834060669),
  # Both numbers: Python doubles, 1 - (3e-4 / 1e-3) * 0.3 = 0.91 -> 0.9100000262260437.
  (
    "paper, lr below an explicit peak",
    adamw_jax.adamw(3e-4, weight_decay=0.3, decay_mode="paper", peak_learning_rate=1e-3),
    0,
    0.9100000262260437,
  ),
  # ramp / 2**-6 = 1/4, 1/2, 3/4, 1 (exact); 1 - eta * 0.1 = 0.975, 0.95, 0.925, 0.9 in
  # double, rounded to float32: 0.9750000238418579, 0.949999988079071, 0.925000011920929,
  # 0.8999999761581421.
  *[
    (
      f"paper, schedule step {t}",
      adamw_jax.adamw(ramp, weight_decay=0.1, decay_mode="paper", peak_learning_rate=2.0**-6),
      t,
      want,
    )
    for t, want in enumerate(
      [0.9750000238418579, 0.949999988079071, 0.925000011920929, 0.8999999761581421]
    )
  ],
  # Rounded once: lr_t = float32(7e-4) = 0.000699999975040555, the peak 1e-3 rounded as
  # the lr is, to 0.0010000000474974513; eta = 0.6999999417923418 (exact quotient);
  # 1 - eta * 0.05 = 0.9650000029103829 (Fractions) -> float32 0.9649999737739563.
  # float32 arithmetic throughout would give the other neighbour, 0.9650000333786011.
  (
    "paper, rounded once",
    adamw_jax.adamw(
      lambda c: jnp.float32(7e-4), weight_decay=0.05, decay_mode="paper", peak_learning_rate=1e-3
    ),
    0,
    0.9649999737739563,
  ),
  # The schedule at its peak: float32(1e-3) / float32(1e-3) = 1 exactly: 1 - 0.05 = 0.95.
  (
    "paper, schedule at its peak",
    adamw_jax.adamw(
      lambda c: jnp.float32(1e-3), weight_decay=0.05, decay_mode="paper", peak_learning_rate=1e-3
    ),
    0,
    0.949999988079071,
  ),
]


@pytest.fixture(scope="module")
def by_hand_factors() -> np.ndarray:
  """All the BY_HAND factors, from one compilation."""
  return np.asarray(jax.jit(lambda: jnp.stack([decay_factor(tx, t) for _, tx, t, _ in BY_HAND]))())


@pytest.mark.parametrize("i", range(len(BY_HAND)), ids=[c[0] for c in BY_HAND])
def test_decay_factor_by_hand(by_hand_factors, i):
  assert by_hand_factors[i] == BY_HAND[i][3]


def test_traced_constant_lr_is_its_own_peak():
  """Under vmap over learning rates (the notebooks' grids) the factor is 1 - wd for every lr."""

  def factor(lr):
    p = jnp.ones((), jnp.float32)
    tx = adamw_jax.adamw(lr, weight_decay=0.1, decay_mode="paper")
    updates, _ = tx.update(jnp.zeros_like(p), tx.init(p), p)
    return optax.apply_updates(p, updates)

  got = jax.vmap(factor)(jnp.array([1e-4, 1e-3, 3e-2, 1.0], jnp.float32))
  np.testing.assert_array_equal(np.asarray(got), np.float32(0.8999999761581421))


@dataclasses.dataclass(frozen=True)
class PaperCase(ref.Case):
  """Paper mode with decay `lam` = weight_decay * lr: torch's AdamW with weight_decay = lam / lr.

  With lr (the peak) a power of two, lam / lr is exact and both sides round the
  same real number 1 - lr_t * weight_decay once (torch via Python doubles).
  """

  def jax_tx(self) -> optax.GradientTransformation:
    sched = self.schedule()
    return adamw_jax.adamw(
      sched or self.lr,
      b1=self.betas[0],
      b2=self.betas[1],
      eps=self.eps,
      weight_decay=self.weight_decay * self.lr,
      decay_mode="paper",
      peak_learning_rate=self.lr if sched else None,
    )


EQUIVALENT = [
  PaperCase("constant lr", lr=2.0**-7, weight_decay=8.0),
  PaperCase("cosine schedule", lr=2.0**-6, weight_decay=2.0, cosine_steps=12),
]


def run_checked_against_torch(case: ref.Case, params, grads, steps: int) -> ref.Run:
  """Our run of `case`, asserted to be torch.optim.AdamW's (moments bitwise every step).

  The parameters are torch's up to its square root: torch's single-tensor sqrt
  (MKL) is not correctly rounded for ~0.7 % of inputs (docs/fidelity.md, "How close to
  PyTorch?"), so a few parameters differ in the last bit.
  """
  states, on_step = ref.recorder(case)
  theirs = ref.run_torch(case, params, grads, steps, on_step=on_step, foreach=False)
  ours = ref.run_jax(case, params, grads, steps, torch_states=states)
  assert ours.moments_bitwise_every_step
  assert ref.max_rel(ours.params, theirs.params) <= 1e-6
  assert ref.bitwise_fraction(ours.params, theirs.params) >= 0.95
  return ours


@pytest.mark.parametrize("case", EQUIVALENT, ids=lambda c: c.name)
def test_paper_mode_is_weight_decay_over_peak(case):
  """Paper mode with decay lam is torch mode with weight_decay lam / peak, bit for bit."""
  torch_mode = ref.Case(
    case.name, lr=case.lr, weight_decay=case.weight_decay, cosine_steps=case.cosine_steps
  )
  params, grads = ref.make_problem(np.float32, steps=12)
  if case.cosine_steps:  # and so torch's (checked once: the slowest part)
    paper = run_checked_against_torch(case, params, grads, 12)
  else:
    paper = ref.run_jax(case, params, grads, 12)
  torch_like = ref.run_jax(torch_mode, params, grads, 12)
  for k in params:
    np.testing.assert_array_equal(paper.params[k], torch_like.params[k], err_msg=k)


def test_torch_mode_unchanged():
  """decay_mode="torch" spelled out is torch.optim.AdamW's step and the default's, bit for bit."""

  @dataclasses.dataclass(frozen=True)
  class Explicit(ref.Case):
    def jax_tx(self):
      return adamw_jax.adamw(self.schedule(), weight_decay=self.weight_decay, decay_mode="torch")

  explicit = Explicit("explicit torch", lr=1e-2, weight_decay=0.3, cosine_steps=10)
  default = ref.Case("default", lr=1e-2, weight_decay=0.3, cosine_steps=10)
  params, grads = ref.make_problem(np.float32, steps=10)
  a = run_checked_against_torch(explicit, params, grads, 10)
  b = ref.run_jax(default, params, grads, 10)
  for k in params:
    np.testing.assert_array_equal(a.params[k], b.params[k], err_msg=k)


def test_paper_mode_under_inject_hyperparams():
  """Injected (traced) lr and peak give the same steps as Python numbers (exact values).

  The ramp's values are exact whether it is evaluated eagerly (inject_hyperparams)
  or inside the jitted step; the peak and the decay are exact in float32.
  """
  kw = {"weight_decay": 0.125, "decay_mode": "paper", "peak_learning_rate": 2.0**-4}
  sched = ramp
  plain = adamw_jax.adamw(sched, **kw)
  static = ("decay_mode", "b1", "b2", "eps", "eps_root")  # injected: lr, peak and decay
  injected = optax.inject_hyperparams(adamw_jax.adamw, static_args=static)(sched, **kw)
  params, grads = ref.make_problem(np.float32, steps=6)
  p1 = p2 = jax.tree.map(jnp.asarray, params)
  s1, s2 = plain.init(p1), injected.init(p2)

  @jax.jit
  def steps(p1, s1, p2, s2, g):
    u1, s1 = plain.update(g, s1, p1)
    u2, s2 = injected.update(g, s2, p2)
    return optax.apply_updates(p1, u1), s1, optax.apply_updates(p2, u2), s2

  for t in range(6):
    p1, s1, p2, s2 = steps(p1, s1, p2, s2, jax.tree.map(jnp.asarray, grads(t)))
  assert float(s2.hyperparams["learning_rate"]) == 6 * 2.0**-8  # the ramp, injected
  for k in params:
    np.testing.assert_array_equal(np.asarray(p1[k]), np.asarray(p2[k]), err_msg=k)


def test_normalized_weight_decay_by_hand():
  # 0.5 * sqrt(32 / (1000 * 8)) = 0.5 * sqrt(0.004) = sqrt(0.001) = 0.03162277660168379.
  assert adamw_jax.normalized_weight_decay(0.5, 32, 1000, 8) == pytest.approx(
    0.03162277660168379, rel=1e-15
  )
  # sqrt(25 / (100 * 1)) = 1/2 exactly.
  assert adamw_jax.normalized_weight_decay(0.05, 25, 100, 1) == 0.025
  # Four times the epochs halves it; fractional epochs are allowed: sqrt(10 / (40 * 0.25)) = 1.
  assert adamw_jax.normalized_weight_decay(0.05, 25, 100, 4) == 0.0125
  assert adamw_jax.normalized_weight_decay(0.2, 10, 40, 0.25) == 0.2


def test_warm_restarts_by_hand():
  # Periods T_0 = 4 and T_1 = 8: lr = 0.5 * (1 + cos(pi * t / T_i)), restarting at step 4;
  # after both periods (step 12) it stays at the minimum, 0.
  sched = adamw_jax.warm_restarts(1.0, 4, 2, num_periods=2)
  want = [
    1.0,
    0.8535533905932737,
    0.5,
    0.14644660940672627,
    1.0,
    0.9619397662556434,
    0.8535533905932737,
    0.6913417161825449,
    0.5,
    0.30865828381745514,
    0.14644660940672627,
    0.03806023374435663,
    0.0,
    0.0,
  ]
  got = np.asarray(jax.vmap(sched)(jnp.arange(14)))
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
  # min 0.5, peak 2, T_0 = 2, T_mult = 1.5: periods 2, 3, then round-half-up(4.5) = 5.
  sched = adamw_jax.warm_restarts(2.0, 2, 1.5, num_periods=3, min_value=0.5)
  starts = [0, 2, 5]
  got = np.asarray(jax.vmap(sched)(jnp.arange(11)))
  np.testing.assert_allclose(got[starts], 2.0, rtol=1e-7)
  # Mid-period of the 3-step period (t = 1 of 3): 0.5 + 0.75 * (1 + cos(pi/3)) = 1.625.
  np.testing.assert_allclose(got[3], 1.625, rtol=1e-6)
  # Last step of the 5-step period (t = 4 of 5), then the minimum for good.
  assert got[9] == pytest.approx(0.5 + 0.75 * (1 + math.cos(math.pi * 4 / 5)), rel=1e-6)
  assert got[10] == 0.5
  assert np.all(got[[1, 3, 4, 6, 7, 8, 9]] < 2.0)


def test_adamwr_paper_decay_restarts():
  """AdamWR: the decay factor follows the multiplier and is 1 - wd again at each restart."""
  tx = adamw_jax.adamw(
    adamw_jax.warm_restarts(1e-3, 4, 2, num_periods=2),
    weight_decay=0.05,
    decay_mode="paper",
    peak_learning_rate=1e-3,
  )
  # Steps 0 and 4 start a period: eta = 1 exactly, factor float32(0.95); from step 12 on
  # the lr is 0, eta = 0 and the factor is 1.
  f0, f2, f4, f12 = np.asarray(jax.vmap(lambda t: decay_factor(tx, t))(jnp.array([0, 2, 4, 12])))
  assert f0 == f4 == 0.949999988079071
  assert f12 == 1.0
  # Mid-period (step 2 of 4): eta = 1/2 up to float32 rounding of the cosine: 1 - 0.025.
  assert f2 == pytest.approx(0.975, abs=1e-7)


SCHED = optax.constant_schedule(1e-3)

BAD = [
  (lambda: adamw_jax.adamw(decay_mode="Paper"), ValueError, r"Invalid decay_mode: 'Paper'"),
  (lambda: adamw_jax.adamw(decay_mode=None), ValueError, r"Invalid decay_mode: None"),
  (
    lambda: adamw_jax.adamw(SCHED, decay_mode="paper"),
    ValueError,
    r"schedule needs peak_learning_rate",
  ),
  (
    lambda: adamw_jax.adamw(1e-3, peak_learning_rate=1e-3),
    ValueError,
    r"peak_learning_rate is only used with decay_mode='paper'",
  ),
  (
    lambda: adamw_jax.adamw(SCHED, decay_mode="paper", peak_learning_rate=0.0),
    ValueError,
    r"Invalid peak_learning_rate: 0.0 \(must be > 0 and finite\)",
  ),
  (
    lambda: adamw_jax.adamw(SCHED, decay_mode="paper", peak_learning_rate=-1e-3),
    ValueError,
    r"Invalid peak_learning_rate: -0.001",
  ),
  (
    lambda: adamw_jax.adamw(SCHED, decay_mode="paper", peak_learning_rate=math.inf),
    ValueError,
    r"Invalid peak_learning_rate: inf",
  ),
  (
    lambda: adamw_jax.adamw(SCHED, decay_mode="paper", peak_learning_rate=math.nan),
    ValueError,
    r"Invalid peak_learning_rate: nan",
  ),
  (
    lambda: adamw_jax.adamw(SCHED, decay_mode="paper", peak_learning_rate=SCHED),
    TypeError,
    r"peak_learning_rate: expected a number, got a callable",
  ),
  (
    lambda: adamw_jax.adamw(SCHED, decay_mode="paper", peak_learning_rate=True),
    TypeError,
    r"Invalid peak_learning_rate: expected a number",
  ),
  # Adam + L2 and the bare direction have no decoupled decay to rescale.
  (
    lambda: _hyperparams.Settings.of(
      "adam", decoupled=False, learning_rate=1e-3, weight_decay=0.1, decay_mode="paper"
    ),
    ValueError,
    r"adam: decay_mode='paper' is for decoupled weight decay",
  ),
  (
    lambda: _hyperparams.Settings.of(
      "scale_by_adam",
      decoupled=True,
      direction_only=True,
      learning_rate=None,
      weight_decay=0.0,
      decay_mode="paper",
    ),
    ValueError,
    r"scale_by_adam: decay_mode='paper' is for decoupled weight decay",
  ),
  (
    lambda: adamw_jax.normalized_weight_decay(-0.1, 32, 1000, 8),
    ValueError,
    r"Invalid lambda_norm: -0.1",
  ),
  (
    lambda: adamw_jax.normalized_weight_decay("0.1", 32, 1000, 8),
    TypeError,
    r"Invalid lambda_norm: expected a number",
  ),
  (
    lambda: adamw_jax.normalized_weight_decay(0.1, 0, 1000, 8),
    ValueError,
    r"Invalid batch_size: 0 \(must be > 0",
  ),
  (
    lambda: adamw_jax.normalized_weight_decay(0.1, 32.0, 1000, 8),
    TypeError,
    r"Invalid batch_size: expected an integer, got 32.0",
  ),
  (
    lambda: adamw_jax.normalized_weight_decay(0.1, 32, -5, 8),
    ValueError,
    r"Invalid dataset_size: -5",
  ),
  (lambda: adamw_jax.normalized_weight_decay(0.1, 32, 1000, 0), ValueError, r"Invalid epochs: 0"),
  (lambda: adamw_jax.warm_restarts(1e-3, 0, num_periods=2), ValueError, r"Invalid first_period: 0"),
  (
    lambda: adamw_jax.warm_restarts(1e-3, 10, 0.5, num_periods=2),
    ValueError,
    r"Invalid period_mult: 0.5 \(must be >= 1\)",
  ),
  (lambda: adamw_jax.warm_restarts(1e-3, 10, num_periods=0), ValueError, r"Invalid num_periods: 0"),
  (lambda: adamw_jax.warm_restarts(0.0, 10, num_periods=2), ValueError, r"Invalid peak_value: 0.0"),
  (
    lambda: adamw_jax.warm_restarts(1e-3, 10, num_periods=2, min_value=2e-3),
    ValueError,
    r"Invalid min_value: 0.002 \(must be in \[0, peak_value=0.001\]\)",
  ),
  (
    lambda: adamw_jax.warm_restarts(1e-3, 10, num_periods=2, min_value=-1.0),
    ValueError,
    r"Invalid min_value: -1.0",
  ),
]


@pytest.mark.parametrize("make,error,match", BAD, ids=[b[2] for b in BAD])
def test_bad_inputs(make, error, match):
  with pytest.raises(error, match=match):
    make()


def test_docs_section_runs():
  """The code block of docs/paper-decay.md builds what it says it builds."""
  blocks = docs_pages.section(
    docs_pages.page("paper-decay.md"), 'The paper\'s decay (decay_mode="paper")'
  )
  assert len(blocks) == 1
  namespace: dict = {}
  exec(compile(blocks[0].code, blocks[0].where, "exec"), namespace)
  # 0.05 * sqrt(128 / (50_000 * 100)) = 0.05 * 0.00505964... = 2.5298221281347037e-4.
  assert namespace["lam"] == pytest.approx(2.5298221281347037e-4, rel=1e-12)
  restarts = namespace["restarts"]
  assert float(restarts(3900)) == pytest.approx(1e-3)  # the first restart, after 10 epochs
