"""Check that a JAX run is the torch run it replaces: the optimizer step by step, a model's outputs.

Two checks for a migration from PyTorch, each a function and, for the first,
a command (``python -m adamw_jax.equivalence --help``):

- [`compare_optimizers`][adamw_jax.equivalence.compare_optimizers] replays
  the same gradients (random with a seed, or recorded from your run) through a
  ``torch.optim.AdamW`` / ``Adam`` and an adamw_jax transform for N steps,
  and reports per parameter how far apart they are: max |difference|, max
  ulps, the fraction bitwise equal, the first step where they part, the
  moments alike, and torch's own spread (its fused kernel against its
  single-tensor path on the same gradients) as the yardstick.
- [`compare_outputs`][adamw_jax.equivalence.compare_outputs] runs a torch
  model and its Flax twin on one batch and says whether their outputs agree:
  the check that catches weights copied in the wrong layout (the flatten
  order of a CNN, say) before any training.

The reference is torch's single-tensor path (``foreach=False``), the one
adamw_jax follows operation by operation: on a CPU in float32 the default
transform is bitwise equal to it ([Fidelity](fidelity.md)). PyTorch is needed
only here, imported when a function runs (``pip install 'adamw_jax[torch]'``).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
from collections.abc import Callable, Sequence
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np
import optax

from adamw_jax import _interop, _interop_adapter, _layout, _tree

STATE = ("step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")  # torch's names; count, mu, nu, nu_max
IMPLEMENTATIONS = {"fused": {"fused": True, "foreach": False}, "foreach": {"foreach": True}}
_SINGLE = {"foreach": False, "fused": False}  # torch's single-tensor path: the reference
_IMPL_KEYS = ("params", "param_names", "foreach", "fused")
_SETTINGS = ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize")  # the command's


def _torch():
  try:
    import torch
  except ImportError as e:
    raise ImportError(
      "adamw_jax.equivalence compares with PyTorch, which cannot be imported: "
      "pip install 'adamw_jax[torch]'."
    ) from e
  return torch


# --------------------------------------------------------------------------
# Differences
# --------------------------------------------------------------------------


def _real(x) -> np.ndarray:
  """A float array as is; a complex one as its (real, imag) pairs, like torch.view_as_real."""
  x = np.ascontiguousarray(x)
  if np.iscomplexobj(x):
    return x.view(np.float64 if x.dtype == np.complex128 else np.float32)
  return x


def _ordered(x: np.ndarray) -> np.ndarray:
  """Each float's bits as an integer that counts ulps: adjacent floats differ by 1."""
  itype = {2: np.int16, 4: np.int32, 8: np.int64}[x.dtype.itemsize]
  i = x.view(itype).astype(np.int64)
  return np.where(i < 0, np.iinfo(itype).min - i, i).astype(np.float64)


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
  a, b = _real(a), _real(b)
  return a.shape == b.shape and a.tobytes() == b.tobytes()


@dataclasses.dataclass(frozen=True)
class Diff:
  """How far one array (or a set of them) is from its reference, after the last step.

  Attributes:
    max_abs: the largest absolute difference (complex: of the real and
      imaginary parts).
    max_ulps: the largest difference in units in the last place (the number
      of floats of that dtype between the two values).
    bitwise: the fraction of elements with the reference's bits.
    first_step: the first step (1-based) after which some element differed,
      or None if they never did.
    scale: the largest magnitude of the reference, for a relative difference.
    size: the number of elements compared (complex: twice the count).
  """

  max_abs: float
  max_ulps: float
  bitwise: float
  first_step: int | None
  scale: float
  size: int

  @property
  def rel(self) -> float:
    """``max_abs`` relative to ``scale`` (0 where both are 0)."""
    if self.scale > 0:
      return self.max_abs / self.scale
    return 0.0 if self.max_abs == 0 else float("inf")

  @staticmethod
  def of(ours, reference, first_step: int | None) -> Diff:
    """The difference of two arrays of one shape and dtype."""
    a, b = _real(ours), _real(reference)
    if a.size == 0:
      return Diff(0.0, 0.0, 1.0, first_step, 0.0, 0)
    wide_a, wide_b = a.astype(np.float64), b.astype(np.float64)
    same = a.view(np.uint8).reshape(a.size, -1) == b.view(np.uint8).reshape(b.size, -1)
    with np.errstate(invalid="ignore"):
      return Diff(
        max_abs=float(np.nanmax(np.abs(wide_a - wide_b), initial=0.0)),
        max_ulps=float(np.nanmax(np.abs(_ordered(a) - _ordered(b)), initial=0.0)),
        bitwise=float(np.mean(same.all(axis=1))),
        first_step=first_step,
        scale=float(np.nanmax(np.abs(wide_b), initial=0.0)),
        size=int(a.size),
      )

  @staticmethod
  def combine(diffs: Sequence[Diff]) -> Diff:
    """One Diff for several arrays: the largest differences, the overall bitwise fraction."""
    size = sum(d.size for d in diffs)
    steps = [d.first_step for d in diffs if d.first_step is not None]
    return Diff(
      max_abs=max((d.max_abs for d in diffs), default=0.0),
      max_ulps=max((d.max_ulps for d in diffs), default=0.0),
      bitwise=sum(d.bitwise * d.size for d in diffs) / size if size else 1.0,
      first_step=min(steps) if steps else None,
      scale=max((d.scale for d in diffs), default=0.0),
      size=size,
    )

  def cells(self) -> list[str]:
    """max |diff|, max ulps, bitwise and first step, as table cells."""
    return [
      f"{self.max_abs:.2g}",
      f"{self.max_ulps:.0f}",
      f"{self.bitwise:.2%}",
      "-" if self.first_step is None else str(self.first_step),
    ]


@dataclasses.dataclass(frozen=True)
class LeafReport:
  """One parameter: ours against torch's single-tensor path, and torch's own spread.

  Attributes:
    name: the torch parameter's name (or ``"parameter <i>"``).
    path: its JAX leaf (``'/'``-joined).
    shape: its torch shape.
    dtype: its dtype.
    params: the JAX parameter against torch's.
    state: torch's ``step``, ``exp_avg``, ``exp_avg_sq`` (and
      ``max_exp_avg_sq``) against the JAX state's ``count``, ``mu``, ``nu``
      (``nu_max``); empty when the transform has no adamw_jax Adam state
      (``optax.adamw``, say).
    spread: per other torch implementation (``"fused"``, ``"foreach"``), its
      parameter against the single-tensor one: the yardstick.
  """

  name: str
  path: str
  shape: tuple[int, ...]
  dtype: str
  params: Diff
  state: dict[str, Diff]
  spread: dict[str, Diff]


@dataclasses.dataclass(frozen=True)
class Report:
  """What [`compare_optimizers`][adamw_jax.equivalence.compare_optimizers] found; ``str()`` is the table.

  Attributes:
    steps: the number of steps replayed.
    leaves: one [`LeafReport`][adamw_jax.equivalence.LeafReport] per parameter, in torch's order.
    skipped: the torch implementations asked for as a yardstick that could
      not run, and why (torch's fused kernel has no complex support, say).
  """

  steps: int
  leaves: tuple[LeafReport, ...]
  skipped: dict[str, str]

  @property
  def params(self) -> Diff:
    """All parameters together."""
    return Diff.combine([leaf.params for leaf in self.leaves])

  def state(self, key: str) -> Diff | None:
    """All parameters' state `key` (``"exp_avg"``, ...) together; None if not compared."""
    found = [leaf.state[key] for leaf in self.leaves if key in leaf.state]
    return Diff.combine(found) if found else None

  @property
  def spread(self) -> dict[str, Diff]:
    """Per torch implementation, all its parameters against the single-tensor ones."""
    names = [n for n in IMPLEMENTATIONS if all(n in leaf.spread for leaf in self.leaves)]
    return {n: Diff.combine([leaf.spread[n] for leaf in self.leaves]) for n in names}

  @property
  def state_bitwise_every_step(self) -> bool:
    """True if the state (step, moments) was compared and equal torch's bit for bit after every step."""
    found = [d for leaf in self.leaves for d in leaf.state.values()]
    return bool(found) and all(d.first_step is None for d in found)

  def table(self) -> str:
    """The per-leaf table, then all leaves together."""
    header = ["leaf", "shape", "dtype", "max |diff|", "ulps", "bitwise", "parts at", "state"]
    for name in self.spread:
      header += [f"{name}: max |diff|", "ulps", "bitwise"]

    def state(d: dict[str, Diff]) -> str:
      if not d:
        return "n/a"
      first = Diff.combine(list(d.values())).first_step
      return "bitwise" if first is None else f"part at {first}"

    rows = []
    for leaf in self.leaves:
      rows.append(
        [leaf.name, str(leaf.shape), leaf.dtype, *leaf.params.cells(), state(leaf.state)]
        + [c for n in self.spread for c in leaf.spread[n].cells()[:3]]
      )
    every = {k: d for k in STATE if (d := self.state(k)) is not None}
    rows.append(
      ["all", "", "", *self.params.cells(), state(every)]
      + [c for d in self.spread.values() for c in d.cells()[:3]]
    )
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [" | ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows]]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    notes = [f"{n}: not run ({why})" for n, why in self.skipped.items()]
    return "\n".join(
      [
        f"{self.steps} steps against torch's single-tensor path (foreach=False); "
        "'parts at': the first step after which a value differed",
        *lines,
        *notes,
      ]
    )

  def __str__(self) -> str:
    return self.table()


# --------------------------------------------------------------------------
# Replaying an optimizer
# --------------------------------------------------------------------------

Gradients = Sequence[Any]  # one array (or tensor) per torch parameter, in the optimizer's order


def random_gradients(
  shapes: Sequence[tuple[int, ...]], dtypes: Sequence[Any], seed: int = 0
) -> Callable[[int], list[np.ndarray]]:
  """The default gradients: ``t -> [one array per parameter]``, drawn afresh each step.

  Each element is N(0, 1) times 10 to a power drawn uniformly from (-6, 2): the
  magnitudes a real run sees, from vanishing to large (complex dtypes get an
  imaginary part alike). Step ``t``'s draw depends only on `seed` and ``t``.

  >>> from adamw_jax import equivalence
  >>> grads = equivalence.random_gradients([(2, 3), ()], ["float32", "float32"], seed=0)
  >>> [g.shape for g in grads(0)], bool((grads(5)[0] == grads(5)[0]).all())
  ([(2, 3), ()], True)

  Args:
    shapes: the parameters' shapes, in torch's layout.
    dtypes: their dtypes.
    seed: the seed.

  Returns:
    A function of the step (0-based) that gives that step's gradients.
  """

  def grads(t: int) -> list[np.ndarray]:
    rng = np.random.default_rng([seed, t])
    out = []
    for shape, dtype in zip(shapes, dtypes):
      scale = 10.0 ** rng.uniform(-6, 2, shape)
      x = rng.standard_normal(shape) * scale
      if np.issubdtype(np.dtype(dtype), np.complexfloating):
        x = x + 1j * rng.standard_normal(shape) * scale
      out.append(np.asarray(x).astype(dtype))
    return out

  return grads


def _gradient_source(
  what: str, grads: Any, steps: int | None, shapes: list, dtypes: list, seed: int
) -> tuple[Callable[[int], Gradients], int]:
  """(t -> that step's gradients, the number of steps)."""
  if grads is None:
    return random_gradients(shapes, dtypes, seed), 100 if steps is None else steps
  if callable(grads):
    if steps is None:
      raise ValueError(f"{what}: grads= is a function of the step; pass steps= too.")
    return cast(Callable[[int], Gradients], grads), steps
  if isinstance(grads, (str, bytes)) or not isinstance(grads, Sequence):
    raise TypeError(
      f"{what}: grads= must be None (random), a function t -> gradients, or a sequence of "
      f"each step's gradients; got {type(grads).__name__}."
    )
  recorded = list(grads)
  if steps is None:
    steps = len(recorded)
  if steps > len(recorded):
    raise ValueError(f"{what}: steps={steps}, but grads= holds {len(recorded)} steps.")
  return (lambda t: recorded[t]), steps


def _numpy(x, dtype) -> np.ndarray:
  if hasattr(x, "detach"):  # a torch tensor
    x = _interop_adapter.to_numpy(x)
  return np.asarray(x).astype(dtype, copy=False)


def _step_gradients(
  what: str, t: int, source: Callable[[int], Gradients], shapes: list, dtypes: list
) -> list[np.ndarray]:
  """Step `t`'s gradients as numpy, checked against the parameters."""
  got = source(t)
  if isinstance(got, (str, bytes)) or not isinstance(got, Sequence) or len(got) != len(shapes):
    n = len(got) if isinstance(got, Sequence) else type(got).__name__
    raise ValueError(
      f"{what}: step {t}'s gradients must be a sequence of {len(shapes)} arrays (one per "
      f"torch parameter, in the optimizer's order), got {n}."
    )
  out = [_numpy(g, d) for g, d in zip(got, dtypes)]
  for i, (g, shape) in enumerate(zip(out, shapes)):
    if g.shape != shape:
      raise ValueError(
        f"{what}: step {t}'s gradient {i} has shape {g.shape}, but torch parameter {i} "
        f"has shape {shape} (gradients are in torch's layout)."
      )
  return out


def _replica(what: str, optimizer: Any, device: str, impl: dict) -> tuple[Any, list]:
  """A copy of `optimizer` (its class, groups, settings, parameters and state) on `impl`."""
  torch = _torch()
  groups, tensors = [], []
  for g in optimizer.param_groups:
    copies = [torch.nn.Parameter(p.detach().clone().to(device)) for p in g["params"]]
    tensors += copies
    groups.append({**{k: v for k, v in g.items() if k not in _IMPL_KEYS}, "params": copies})
  replica = type(optimizer)(groups, **impl)
  if optimizer.state:  # a deep copy: load_state_dict would share the tensors of the state
    replica.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    for g in replica.param_groups:
      g.update(impl)
  return replica, tensors


def _check_start(what: str, slots, tensors, leaves: dict) -> None:
  for s, t in zip(slots, tensors):
    theirs = _interop_adapter.permute(_interop_adapter.to_numpy(t), s.axes)
    ours = np.asarray(leaves[s.path])
    if ours.shape != theirs.shape or ours.dtype != theirs.dtype:
      raise ValueError(
        f"{what}: {s.label()} is {theirs.dtype}{list(theirs.shape)} in the JAX layout, but its "
        f"leaf {s.path!r} is {ours.dtype}{list(ours.shape)}."
      )
    if not _same_bits(ours, theirs):
      raise ValueError(
        f"{what}: the JAX leaf {s.path!r} does not hold {s.label()}'s values (max |diff| "
        f"{Diff.of(ours, theirs, None).max_abs:.3g}); start both runs from the same weights."
      )


def compare_optimizers(
  optimizer: Any,
  tx: optax.GradientTransformation | None = None,
  params: Any = None,
  *,
  steps: int | None = None,
  grads: Any = None,
  seed: int = 0,
  names: Any = None,
  mapping: _layout.Mapper | None = None,
  spread: Sequence[str] = ("fused",),
  torch_lr: Callable[[int], float] | None = None,
  device: str = "cpu",
) -> Report:
  """Replays the same gradients through a torch optimizer and an adamw_jax transform; a report per leaf.

  ```python
  optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-2)
  tx = adamw_jax.adamw(1e-3, weight_decay=1e-2)
  mapping = adamw_jax.flax_layout(flax_params)
  report = equivalence.compare_optimizers(optimizer, tx, flax_params,
                                          names=model, mapping=mapping)
  print(report)  # the per-leaf table
  assert report.state_bitwise_every_step
  ```

  >>> import torch, jax.numpy as jnp, adamw_jax
  >>> from adamw_jax import equivalence
  >>> w = torch.nn.Parameter(torch.linspace(-1, 1, 6).reshape(2, 3))
  >>> optimizer = torch.optim.AdamW([w], lr=1e-2, weight_decay=0.1)
  >>> report = equivalence.compare_optimizers(optimizer, steps=50)
  >>> report.params.bitwise, report.params.first_step, report.state_bitwise_every_step
  (1.0, None, True)

  `optimizer` describes the torch run and is left as it is: its class
  (``torch.optim.AdamW`` or ``Adam``, or another class with a single-tensor
  path), its param groups and settings, and its parameters' current values
  (and state, to continue a run) are copied. The copies run torch's
  single-tensor path (``foreach=False``), the reference adamw_jax follows,
  and, as the yardstick, each implementation named in `spread` (torch's
  fused kernel by default) on the same gradients: where ours is as close to
  the reference as torch is to itself, the difference is rounding, not math.

  Gradients come in torch's layout, one array (or tensor) per parameter in
  the optimizer's order: random by default (see
  [`random_gradients`][adamw_jax.equivalence.random_gradients]), or your own:
  a function ``t -> gradients`` or a sequence of each step's, recorded from
  your run with ``[p.grad.clone() for g in optimizer.param_groups for p in
  g["params"]]`` after each backward pass.

  The JAX run starts from `params`, which must hold the torch parameters'
  values (each leaf is matched as in [`from_torch`][adamw_jax.from_torch]:
  by order, or by `names` and `mapping`, with layouts transposed), and steps
  ``tx.update`` then ``optax.apply_updates``, jitted. Without `tx`, `tx` and
  its starting state are [`from_torch`][adamw_jax.from_torch]'s (so an
  optimizer with state continues its run); without `params`, the params are
  the torch parameters as a list.

  Args:
    optimizer: the torch optimizer, as it stands before the steps to compare.
    tx: the transform to check; default: [`from_torch`][adamw_jax.from_torch]'s.
      Given, it starts from ``tx.init(params)``, so `optimizer` must have no
      state yet.
    params: the JAX parameters (any pytree); default: the torch parameters'
      values as a list, in the optimizer's order.
    steps: the number of steps (default: 100 for random gradients, all of a
      recorded sequence).
    grads: None (random), a function ``t -> gradients`` (``t`` from 0), or a
      sequence of each step's gradients.
    seed: the seed of the random gradients.
    names: torch parameter names, as in [`from_torch`][adamw_jax.from_torch].
    mapping: torch name -> JAX path (and axes), as in
      [`from_torch`][adamw_jax.from_torch].
    spread: torch's other implementations to measure against its
      single-tensor path: ``"fused"`` and/or ``"foreach"``; ``()`` for none.
    torch_lr: the learning rate torch uses at step ``t`` (from 0), set on
      every param group before the step (as a ``LambdaLR`` over ``lr=1``
      would); for a `tx` with an optax schedule. Default: the groups' ``lr``.
    device: where torch runs (``"cpu"`` or ``"cuda"``); JAX runs on its default device.

  Returns:
    A [`Report`][adamw_jax.equivalence.Report]; ``print(report)`` shows the table.

  Raises:
    ValueError: for parameters that do not match (count, shapes, dtypes,
      values), gradients that do not fit them, an unknown implementation in
      `spread`, or a `tx` given for an optimizer that already has state.
    TypeError: when `optimizer` is not a torch optimizer, or `grads` is of
      another kind.
    ImportError: without PyTorch.
  """
  what = "compare_optimizers"
  torch = _torch()
  if not isinstance(optimizer, torch.optim.Optimizer):
    raise TypeError(
      f"{what}: expected a torch.optim optimizer (AdamW, Adam), got {type(optimizer).__name__}."
    )
  unknown = [s for s in spread if s not in IMPLEMENTATIONS]
  if isinstance(spread, str) or unknown:
    raise ValueError(
      f"{what}: spread= names torch implementations to measure against its single-tensor "
      f"path, a tuple of {sorted(IMPLEMENTATIONS)}; got {spread!r}."
    )
  if not isinstance(steps, (int, type(None))) or (steps is not None and steps < 1):
    raise ValueError(f"{what}: steps must be a positive integer, got {steps!r}.")
  tensors = [p for g in optimizer.param_groups for p in g["params"]]
  shapes = [tuple(t.shape) for t in tensors]
  dtypes = [_interop_adapter.to_numpy(t.detach().reshape(-1)[:0]).dtype for t in tensors]
  if params is None:
    params = [jnp.asarray(_interop_adapter.to_numpy(t)) for t in tensors]
    if names is not None or mapping is not None:
      raise ValueError(f"{what}: names= and mapping= go with params= (the JAX tree they name).")
  state_dict_groups = optimizer.state_dict()["param_groups"]
  flat = _tree.flatten_params(params)[0]
  leaves = dict(flat)
  slots = _layout.match(
    what,
    state_dict_groups,
    _layout.param_names(what, names, mapping, state_dict_groups, tensors),
    {p: np.shape(x) for p, x in flat},
    mapping,
  )
  _check_start(what, slots, tensors, leaves)
  if tx is None:
    tx, state = _interop.from_torch(optimizer, params, names=names, mapping=mapping)
  elif optimizer.state:
    raise ValueError(
      f"{what}: the optimizer already has state ({len(optimizer.state)} parameters), but "
      "tx= starts from tx.init(params); leave tx out to continue with from_torch's transform "
      "and state."
    )
  else:
    state = tx.init(_tree.unbox_all(params))
  source, steps = _gradient_source(what, grads, steps, shapes, dtypes, seed)

  def gradients(t: int) -> list[np.ndarray]:
    return _step_gradients(what, t, source, shapes, dtypes)

  # One run after the other (interleaved, torch's and XLA's thread pools wake each other up
  # at every step); each keeps a digest of every value after every step, to find where
  # they part.
  reference = _replica(what, optimizer, device, _SINGLE)
  ref_digests, theirs = _torch_run(reference, gradients, steps, torch_lr, device, True)
  first: dict[tuple, int] = {}
  others, skipped = {}, {}
  for name in spread:
    try:
      run = _replica(what, optimizer, device, IMPLEMENTATIONS[name])
      digests, others[name] = _torch_run(run, gradients, steps, torch_lr, device, False)
    except (RuntimeError, ValueError) as e:  # fused: no complex, say
      skipped[name] = (str(e).strip().splitlines() or [type(e).__name__])[0]
      continue
    first.update(_first_steps(name, digests, ref_digests))
  # JAX last: torch's fused kernel runs slower on a CPU just after XLA's thread pool.
  ours_digests, ours = _jax_run(what, tx, state, params, slots, gradients, steps)
  first.update(_first_steps("ours", ours_digests, ref_digests))
  return _report(steps, slots, tensors, ours, theirs, others, skipped, first)


Values = list[dict[str, np.ndarray]]  # per torch parameter: "param" and the state's values
Digests = list[list[dict[str, bytes]]]  # per step, per torch parameter, per key


def _bytes(x) -> np.ndarray:
  """The bits of an array as a flat uint8 view (no copy; bfloat16 has no buffer of its own)."""
  return _real(x).reshape(-1).view(np.uint8)


def _digest(values: Values) -> list[dict[str, bytes]]:
  return [{k: hashlib.sha1(_bytes(x).data).digest() for k, x in v.items()} for v in values]


def _first_steps(name: str, digests: Digests, reference: Digests) -> dict[tuple, int]:
  """(name, parameter, key) -> the first step (1-based) after which it differed."""
  first: dict[tuple, int] = {}
  for t, (mine, ref) in enumerate(zip(digests, reference)):
    for i, (a, b) in enumerate(zip(mine, ref)):
      for key, x in a.items():
        if (name, i, key) not in first and x != b.get(key):
          first[(name, i, key)] = t + 1
  return first


def _torch_run(replica, gradients, steps: int, torch_lr, device: str, state: bool):
  """(digests, final values) of a torch replica over `steps` steps."""
  opt, tensors = replica
  digests = []
  for t in range(steps):
    for tensor, x in zip(tensors, gradients(t)):
      tensor.grad = _interop_adapter.to_tensor(x).to(device)
    if torch_lr is not None:
      lr = torch_lr(t)
      for group in opt.param_groups:
        group["lr"] = lr
    opt.step()
    digests.append(_digest(_torch_values(opt, tensors, state)))
  return digests, _torch_values(opt, tensors, state)


def _jax_run(what: str, tx, state, params, slots, gradients, steps: int):
  """(digests, final values) of `tx` from `state`, jitted update and apply_updates."""

  @jax.jit
  def step(p, s, g):
    updates, s = tx.update(g, s, p)
    return optax.apply_updates(p, updates), s

  flat, treedef = _tree.flatten_params(params)
  where = {s.path: i for i, s in enumerate(slots)}
  p = treedef.unflatten([jnp.asarray(x) for _, x in flat])
  digests, values = [], []
  for t in range(steps):
    g = gradients(t)
    leaves = [_interop_adapter.permute(g[where[path]], slots[where[path]].axes) for path, _ in flat]
    p, state = step(p, state, treedef.unflatten([jnp.asarray(x) for x in leaves]))
    values = _host_values(what, p, state, slots)
    digests.append(_digest(values))
  return digests, values


def _step(x) -> np.ndarray:
  """A step count as a float64 scalar (torch keeps a float tensor, JAX an int32)."""
  return np.asarray(float(x.item() if hasattr(x, "item") else x), np.float64)


def _torch_values(opt, tensors, state: bool = True) -> list[dict[str, np.ndarray]]:
  """Per parameter: "param" (and its state), as numpy in torch's layout (views of the tensors)."""
  out = []
  for tensor in tensors:
    values = {"param": _interop_adapter.to_numpy(tensor)}
    st = opt.state.get(tensor, {}) if state else {}
    for k in STATE:
      if k in st:
        values[k] = _step(st[k]) if k == "step" else _interop_adapter.to_numpy(st[k])
    out.append(values)
  return out


def _host_values(what: str, p, state, slots) -> list[dict[str, np.ndarray]]:
  """Per torch parameter: the JAX parameter and moments, as numpy in torch's layout."""
  leaves = dict(_tree.flatten_params(p)[0])
  entries = _interop._entries(what, state)[1] if _interop._adam_states(state) else {}
  out = []
  for s in slots:
    back = _interop_adapter.inverse(s.axes)
    values = {"param": _interop_adapter.permute(np.asarray(leaves[s.path]), back)}
    if s.path in entries:
      values["step"] = _step(entries[s.path][0])
      for key, x in zip(STATE[1:], entries[s.path][1:4]):
        if isinstance(x, np.ndarray):  # not a quantized moment
          values[key] = _interop_adapter.permute(x, back)
    out.append(values)
  return out


def _report(steps, slots, tensors, ours, theirs, finals, skipped, first) -> Report:
  leaves = []
  for i, (s, tensor) in enumerate(zip(slots, tensors)):
    ref = theirs[i]
    state = {
      k: Diff.of(x, ref[k], first.get(("ours", i, k)))
      for k, x in ours[i].items()
      if k != "param" and k in ref
    }
    spread = {
      n: Diff.of(v[i]["param"], ref["param"], first.get((n, i, "param"))) for n, v in finals.items()
    }
    leaves.append(
      LeafReport(
        name=s.name or f"parameter {s.index}",
        path=s.path,
        shape=tuple(tensor.shape),
        dtype=str(ref["param"].dtype),
        params=Diff.of(ours[i]["param"], ref["param"], first.get(("ours", i, "param"))),
        state=state,
        spread=spread,
      )
    )
  return Report(steps, tuple(leaves), skipped)


# --------------------------------------------------------------------------
# A model's outputs
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class OutputReport:
  """What [`compare_outputs`][adamw_jax.equivalence.compare_outputs] found.

  Attributes:
    max_abs: the largest absolute difference of the outputs.
    max_rel: ``max_abs`` over the largest magnitude of torch's outputs.
    allclose: whether every output is ``np.allclose(jax, torch, rtol, atol)``.
    rtol: the relative tolerance used.
    atol: the absolute tolerance used.
  """

  max_abs: float
  max_rel: float
  allclose: bool
  rtol: float
  atol: float

  def __str__(self) -> str:
    verdict = "agree" if self.allclose else "DIFFER"
    return (
      f"outputs {verdict}: max |diff| {self.max_abs:.3g} ({self.max_rel:.3g} of the largest "
      f"output; rtol={self.rtol:g}, atol={self.atol:g})"
    )


def compare_outputs(
  torch_model: Any,
  apply_fn: Callable[..., Any],
  variables: Any,
  batch: Any,
  *,
  torch_batch: Any = None,
  rtol: float = 1e-5,
  atol: float = 1e-5,
) -> OutputReport:
  """A torch model's outputs against its Flax twin's on one batch.

  Run it after copying the weights and before training: every shape can fit
  while the twin computes something else (a Linear after ``torch.flatten`` of
  channels-first activations needs its rows permuted for a Flax model that
  flattens channels-last; [Migrating](migrating.md) shows the example).

  >>> import torch, jax.numpy as jnp, numpy as np, adamw_jax
  >>> from adamw_jax import equivalence
  >>> layer = torch.nn.Linear(3, 2)
  >>> kernel = layer.weight.detach().numpy().T  # torch's (out, in) is Flax's (in, out)
  >>> variables = {"kernel": kernel, "bias": layer.bias.detach().numpy()}
  >>> apply_fn = lambda v, x: x @ v["kernel"] + v["bias"]
  >>> equivalence.compare_outputs(layer, apply_fn, variables, np.ones((4, 3), np.float32)).allclose
  True

  Args:
    torch_model: a ``torch.nn.Module`` (run in ``eval()`` mode without
      gradients; its mode is restored afterwards), or any callable on tensors.
    apply_fn: the JAX model, called as ``apply_fn(variables, batch)``
      (Linen's ``model.apply``; for NNX, ``lambda m, x: m(x)`` with the module).
    variables: its parameters (and other collections).
    batch: the input, a numpy or JAX array (or a tuple of them: each becomes
      a torch tensor).
    torch_batch: torch's input when its layout differs (channels-first
      images, say); default: `batch`.
    rtol: relative tolerance of ``allclose``.
    atol: absolute tolerance of ``allclose``.

  Returns:
    An [`OutputReport`][adamw_jax.equivalence.OutputReport]: max abs and
    relative difference, and whether all outputs are close.

  Raises:
    ValueError: when the outputs differ in number or shape.
  """
  what = "compare_outputs"
  torch = _torch()
  given = batch if torch_batch is None else torch_batch
  inputs = [_interop_adapter.to_tensor(np.asarray(x)) for x in jax.tree.leaves(given)]
  training = getattr(torch_model, "training", None)
  if training is not None:
    torch_model.eval()
  try:
    with torch.no_grad():
      out = torch_model(*inputs)
  finally:
    if training:
      torch_model.train()
  is_tensor = lambda x: isinstance(x, torch.Tensor)
  theirs = [_interop_adapter.to_numpy(x) for x in jax.tree.leaves(out, is_leaf=is_tensor)]
  ours = [np.asarray(x) for x in jax.tree.leaves(apply_fn(variables, batch))]
  if len(ours) != len(theirs):
    raise ValueError(f"{what}: torch gives {len(theirs)} outputs, JAX {len(ours)}.")
  max_abs, scale, close = 0.0, 0.0, True
  for i, (a, b) in enumerate(zip(ours, theirs)):
    if a.shape != b.shape:
      raise ValueError(
        f"{what}: output {i} has shape {list(b.shape)} in torch and {list(a.shape)} in JAX."
      )
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    max_abs = max(max_abs, float(np.abs(a64 - b64).max(initial=0.0)))
    scale = max(scale, float(np.abs(b64).max(initial=0.0)))
    close &= bool(np.allclose(a64, b64, rtol=rtol, atol=atol))
  rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf"))
  return OutputReport(max_abs, rel, close, rtol, atol)


# --------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------


def _shape(text: str) -> tuple[int, ...]:
  if text in ("", "scalar"):
    return ()
  try:
    shape = tuple(int(n) for n in text.split("x"))
  except ValueError:
    raise argparse.ArgumentTypeError(
      f"a shape is sizes joined by 'x' (16x8) or 'scalar', got {text!r}"
    ) from None
  if any(n < 0 for n in shape):
    raise argparse.ArgumentTypeError(f"sizes must be non-negative, got {text!r}")
  return shape


def _positive(text: str) -> int:
  if not text.isdigit() or int(text) < 1:
    raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
  return int(text)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  """The command's options (``python -m adamw_jax.equivalence --help``)."""
  p = argparse.ArgumentParser(
    prog="python -m adamw_jax.equivalence",
    description="Replay random gradients through torch.optim.AdamW (or Adam) and the adamw_jax "
    "transform from_torch makes of it; print how far apart they are, per parameter.",
  )
  p.add_argument("--adam", action="store_true", help="torch.optim.Adam (L2) instead of AdamW")
  p.add_argument("--lr", type=float, default=1e-3, help="learning rate (default: 1e-3)")
  p.add_argument("--weight-decay", type=float, default=1e-2, help="weight decay (default: 1e-2)")
  p.add_argument(
    "--betas", type=float, nargs=2, default=(0.9, 0.999), metavar=("B1", "B2"), help="betas"
  )
  p.add_argument("--eps", type=float, default=1e-8, help="eps (default: 1e-8)")
  p.add_argument("--amsgrad", action="store_true", help="AMSGrad")
  p.add_argument("--maximize", action="store_true", help="maximize")
  p.add_argument("--steps", type=_positive, default=100, help="steps (default: 100)")
  p.add_argument(
    "--shapes",
    type=_shape,
    nargs="+",
    default=[(16, 8), (8,), (), (3, 4, 5)],
    help="parameter shapes, e.g. 16x8 8 scalar (default: 16x8 8 scalar 3x4x5)",
  )
  p.add_argument("--dtype", choices=["float32", "float64"], default="float32", help="dtype")
  p.add_argument("--seed", type=int, default=0, help="seed of params and gradients (default: 0)")
  p.add_argument(
    "--spread",
    nargs="*",
    choices=sorted(IMPLEMENTATIONS),
    default=["fused"],
    help="torch implementations to measure against its single-tensor path (default: fused)",
  )
  return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> Report:
  """Runs the command: prints the table and returns the report."""
  args = parse_args(argv)
  torch = _torch()
  rng = np.random.default_rng(args.seed)
  tensors = [
    torch.nn.Parameter(torch.from_numpy(rng.standard_normal(s).astype(args.dtype)))
    for s in args.shapes
  ]
  cls = torch.optim.Adam if args.adam else torch.optim.AdamW
  optimizer = cls(
    tensors,
    lr=args.lr,
    betas=tuple(args.betas),
    eps=args.eps,
    weight_decay=args.weight_decay,
    amsgrad=args.amsgrad,
    maximize=args.maximize,
  )
  with jax.enable_x64(args.dtype == "float64"):
    report = compare_optimizers(
      optimizer, steps=args.steps, seed=args.seed + 1, spread=tuple(args.spread)
    )
  settings = ", ".join(f"{k}={v}" for k, v in optimizer.defaults.items() if k in _SETTINGS)
  shapes = ", ".join("x".join(map(str, s)) or "scalar" for s in args.shapes)
  print(f"torch.optim.{cls.__name__}({settings}), {args.dtype} parameters of shapes {shapes}")
  print(report)
  return report


if __name__ == "__main__":
  main()
