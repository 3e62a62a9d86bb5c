"""The configurations and gradients of the fidelity tests, for both libraries.

Shared by the fidelity tests, ``benchmarks/fidelity.py`` (which prints the
table of docs/fidelity.md, "How close to PyTorch?") and ``benchmarks/device.py``.
The comparison itself is the public ``adamw_jax.equivalence``
(:func:`compare`); the runs below remain for tests that need torch's or our
run on its own (the interop's hand-over, the paper's decay).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch

import adamw_jax
from adamw_jax import equivalence

SHAPES = {"matrix": (16, 8), "vector": (8,), "scalar": (), "cube": (3, 4, 5)}


@dataclasses.dataclass(frozen=True)
class Case:
  """One optimizer configuration, expressed for both libraries."""

  name: str
  algo: str = "adamw"  # "adamw", "adam" or "chain" (scale_by_adam -> add_decayed_weights -> lr)
  lr: float = 1e-3
  betas: tuple[float, float] = (0.9, 0.999)
  eps: float = 1e-8
  weight_decay: float = 1e-2
  amsgrad: bool = False
  maximize: bool = False
  complex: bool = False
  cosine_steps: int | None = None  # cosine lr schedule over this many steps

  def schedule(self) -> Callable[[Any], Any] | None:
    if self.cosine_steps is None:
      return None
    return optax.cosine_decay_schedule(self.lr, self.cosine_steps, alpha=0.1)

  def jax_tx(self) -> optax.GradientTransformation:
    lr = self.schedule() or self.lr
    b1, b2 = self.betas
    kw = {"b1": b1, "b2": b2, "eps": self.eps, "amsgrad": self.amsgrad, "maximize": self.maximize}
    if self.algo == "adamw":
      return adamw_jax.adamw(lr, weight_decay=self.weight_decay, **kw)
    if self.algo == "adam":
      return adamw_jax.adam(lr, weight_decay=self.weight_decay, **kw)
    return optax.chain(
      adamw_jax.scale_by_adam(**kw),
      adamw_jax.add_decayed_weights(self.weight_decay),
      optax.scale_by_learning_rate(lr),
    )

  def torch_opt(self, params: list[torch.Tensor], **impl) -> tuple[torch.optim.Optimizer, Any]:
    cls = torch.optim.Adam if self.algo == "adam" else torch.optim.AdamW
    sched = self.schedule()
    opt = cls(
      params,
      lr=1.0 if sched else self.lr,
      betas=self.betas,
      eps=self.eps,
      weight_decay=self.weight_decay,
      amsgrad=self.amsgrad,
      maximize=self.maximize,
      **impl,
    )
    lr_sched = None
    if sched is not None:
      # LambdaLR multiplies the base lr (1.0) by the lambda, so torch sees exactly the
      # float32 values the jitted schedule gives (eager evaluation may round differently).
      jitted = jax.jit(sched)
      lr_sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda t: float(jitted(jnp.asarray(t, jnp.int32)))
      )
    return opt, lr_sched

  def lr_at(self) -> Callable[[int], float] | None:
    """The lr torch uses at step t (from 0): the jitted schedule's float32 value, or None."""
    sched = self.schedule()
    if sched is None:
      return None
    jitted = jax.jit(sched)
    return lambda t: float(jitted(jnp.asarray(t, jnp.int32)))


CASES = [
  Case("default"),
  Case("lr=0.01", lr=1e-2),
  Case("weight_decay=0.1", weight_decay=0.1),
  Case("maximize", maximize=True),
  Case("amsgrad", amsgrad=True),
  Case("betas=(0.8,0.99),eps=1e-6", betas=(0.8, 0.99), eps=1e-6),
  Case("b2=0.9999 (beyond the step tables)", betas=(0.9, 0.9999), cosine_steps=200),
  Case("complex", complex=True),
  Case("cosine schedule", cosine_steps=200),
  Case("adam+L2", algo="adam", weight_decay=0.1),
  Case("adam amsgrad+maximize", algo="adam", amsgrad=True, maximize=True, weight_decay=0.05),
]
CHAIN = Case("public-pieces chain", algo="chain")


def make_problem(
  dtype,
  steps: int,
  seed: int = 0,
  bank: int = 20,
  shapes: dict | None = None,
  log10_scale: tuple[float, float] = (-6, 2),
):
  """Initial params and a gradient function ``t -> grads`` (magnitudes 1e-6 .. 1e2).

  `shapes` defaults to :data:`SHAPES`; the gradients' magnitudes are 10 to a
  power drawn uniformly from `log10_scale`, per element.
  """
  shapes = SHAPES if shapes is None else shapes
  rng = np.random.default_rng(seed)
  is_complex = np.issubdtype(dtype, np.complexfloating)

  def draw(shape, scale):
    x = rng.standard_normal(shape) * scale
    if is_complex:
      x = x + 1j * rng.standard_normal(shape) * scale
    return np.asarray(x, dtype)

  params = {k: draw(s, 1.0) for k, s in shapes.items()}
  grads_bank = [
    {k: draw(s, 10.0 ** rng.uniform(*log10_scale, s)) for k, s in shapes.items()}
    for _ in range(bank)
  ]

  def grads(t: int):
    scale = 1 + 0.01 * t
    return {k: np.asarray(v * scale, dtype) for k, v in grads_bank[t % bank].items()}

  del steps
  return params, grads


@dataclasses.dataclass
class Run:
  """Final params and state of one run, as numpy dicts keyed like the params."""

  params: dict[str, np.ndarray]
  exp_avg: dict[str, np.ndarray]
  exp_avg_sq: dict[str, np.ndarray]
  max_exp_avg_sq: dict[str, np.ndarray] | None
  step: int
  moments_bitwise_every_step: bool | None = None


def to_tensor(x: np.ndarray, device: str = "cpu") -> torch.Tensor:
  """A torch copy of a NumPy array on `device` (bfloat16 through its bits: NumPy has no bfloat16)."""
  x = np.array(x, order="C")
  if x.dtype == jnp.bfloat16:
    return torch.from_numpy(x.view(np.int16)).view(torch.bfloat16).to(device)
  return torch.from_numpy(x).to(device)


def to_numpy(t: torch.Tensor) -> np.ndarray:
  """A NumPy copy of a tensor on any device (bfloat16 as ml_dtypes' bfloat16, like JAX's)."""
  t = t.detach().cpu()
  if t.dtype == torch.bfloat16:
    return t.view(torch.int16).numpy().view(jnp.bfloat16).copy()
  return t.numpy().copy()


def run_torch(
  case: Case, params, grads, steps: int, on_step=None, device: str = "cpu", **impl
) -> Run:
  """Torch's run on `device` ("cpu" or "cuda"); `impl` picks the implementation (foreach=, fused=)."""
  names = list(params)
  tensors = [torch.nn.Parameter(to_tensor(params[k], device)) for k in names]
  opt, sched = case.torch_opt(tensors, **impl)
  for t in range(steps):
    g = grads(t)
    for k, p in zip(names, tensors):
      p.grad = to_tensor(g[k], device)
    opt.step()
    if sched is not None:
      sched.step()
    if on_step is not None:
      on_step(t, {k: opt.state[p] for k, p in zip(names, tensors)})
  st = [opt.state[p] for p in tensors]
  arr = lambda key: {k: to_numpy(s[key]) for k, s in zip(names, st)}
  return Run(
    params={k: to_numpy(p) for k, p in zip(names, tensors)},
    exp_avg=arr("exp_avg"),
    exp_avg_sq=arr("exp_avg_sq"),
    max_exp_avg_sq=arr("max_exp_avg_sq") if case.amsgrad else None,
    step=int(st[0]["step"].item()),
  )


def compare(
  case: Case,
  params,
  grads,
  steps: int,
  tx: optax.GradientTransformation | None = None,
  spread: tuple[str, ...] = ("fused",),
  device: str = "cpu",
) -> equivalence.Report:
  """`case` (or `tx`) against torch's single-tensor path, by ``adamw_jax.equivalence``."""
  names = list(params)
  tensors = [torch.nn.Parameter(to_tensor(params[k], device)) for k in names]
  opt = case.torch_opt(tensors)[0]  # its LambdaLR is replaced by lr_at, step by step
  return equivalence.compare_optimizers(
    opt,
    case.jax_tx() if tx is None else tx,
    params,
    steps=steps,
    grads=lambda t: [grads(t)[k] for k in names],
    names=names,
    spread=spread,
    torch_lr=case.lr_at(),
    device=device,
  )


def max_rel_of(diffs) -> float:
  """The largest of each tensor's difference relative to its largest magnitude (max_rel's)."""
  return max((d.rel for d in diffs), default=0.0)


def _adam_state(state) -> adamw_jax.ScaleByAdamState:
  """The ScaleByAdamState inside a (possibly chained) optax state."""
  if isinstance(state, adamw_jax.ScaleByAdamState):
    return state
  return next(s for s in state if isinstance(s, adamw_jax.ScaleByAdamState))


def _jax_steps(tx: optax.GradientTransformation, params, grads, steps: int):
  """Yields (t, params, state) after each jitted step of `tx` on the given gradients."""
  p = jax.tree.map(jnp.asarray, params)
  state = tx.init(p)

  @jax.jit
  def step(p, state, g):
    updates, state = tx.update(g, state, p)
    return optax.apply_updates(p, updates), state

  for t in range(steps):
    p, state = step(p, state, jax.tree.map(jnp.asarray, grads(t)))
    yield t, p, state


def run_jax(case: Case, params, grads, steps: int, torch_states=None) -> Run:
  """Our run; with `torch_states` (a list of per-step torch states) also checks moments every step."""
  bitwise = True
  for t, p, state in _jax_steps(case.jax_tx(), params, grads, steps):  # noqa: B007 - the last step's params
    if torch_states is not None:
      s = _adam_state(state)
      ref = torch_states[t]
      for k in params:
        bitwise &= np.array_equal(np.asarray(s.mu[k]), ref[k][0])
        bitwise &= np.array_equal(np.asarray(s.nu[k]), ref[k][1])
        if case.amsgrad:
          bitwise &= np.array_equal(np.asarray(s.nu_max[k]), ref[k][2])
  s = _adam_state(state)
  to_np = lambda tree: {k: np.asarray(v) for k, v in tree.items()}
  return Run(
    params=to_np(p),
    exp_avg=to_np(s.mu),
    exp_avg_sq=to_np(s.nu),
    max_exp_avg_sq=to_np(s.nu_max) if case.amsgrad else None,
    step=int(s.count),
    moments_bitwise_every_step=bitwise if torch_states is not None else None,
  )


def recorder(case: Case):
  """An `on_step` callback for run_torch that keeps each step's moments."""
  states: list[dict[str, tuple]] = []

  def on_step(t, st):
    del t
    states.append(
      {
        k: (
          to_numpy(s["exp_avg"]),
          to_numpy(s["exp_avg_sq"]),
          to_numpy(s["max_exp_avg_sq"]) if case.amsgrad else None,
        )
        for k, s in st.items()
      }
    )

  return states, on_step


def flat(tree: dict[str, np.ndarray]) -> np.ndarray:
  """All leaves as one real vector (complex as (real, imag) pairs, like view_as_real)."""
  parts = [np.asarray(tree[k]).reshape(-1) for k in sorted(tree)]
  x = np.concatenate(parts)
  return np.concatenate([x.real, x.imag]) if np.iscomplexobj(x) else x


def max_abs(a, b) -> float:
  return float(np.max(np.abs(flat(a).astype(np.float64) - flat(b).astype(np.float64))))


def bitwise_fraction(a, b) -> float:
  return float(np.mean(flat(a) == flat(b)))


def max_rel(a, b) -> float:
  """Largest difference of each tensor relative to that tensor's largest magnitude."""
  worst = 0.0
  for k in a:
    x, y = np.asarray(a[k]), np.asarray(b[k])
    scale = np.max(np.abs(y))
    if scale > 0:
      worst = max(worst, float(np.max(np.abs(x - y)) / scale))
  return worst


def reference_workload(n: int = 100_000, steps: int = 1000, seed: int = 0):
  """The reference workload of docs/fidelity.md: N(0,1) params, 50 gradients 10^U(-6,2) cycled, x(1+0.01t)."""
  rng = np.random.default_rng(seed)
  params = {"w": rng.standard_normal(n).astype(np.float32)}
  bank = [
    (rng.standard_normal(n) * 10.0 ** rng.uniform(-6, 2, n)).astype(np.float32) for _ in range(50)
  ]

  def grads(t):
    return {"w": (bank[t % 50] * np.float32(1 + 0.01 * t)).astype(np.float32)}

  return params, grads, steps


def run_optax(params, grads, steps: int, tx: optax.GradientTransformation) -> dict[str, np.ndarray]:
  for _, p, _ in _jax_steps(tx, params, grads, steps):  # noqa: B007 - the last step's params
    pass
  return {k: np.asarray(v) for k, v in p.items()}
