"""Optimizer state between ``torch.optim.AdamW`` / ``torch.optim.Adam`` and adamw_jax, both ways.

torch keeps, per parameter, ``step``, ``exp_avg``, ``exp_avg_sq`` and (AMSGrad)
``max_exp_avg_sq``; [`ScaleByAdamState`][adamw_jax.ScaleByAdamState] holds the same numbers
as ``count``, ``mu``, ``nu`` and ``nu_max``, so a run moves across with its
moments. Which torch parameter is which pytree leaf is decided by order, or by
torch's parameter names and a mapping (see [`flax_layout`][adamw_jax.flax_layout]). The
low-memory references (torchao's ``AdamW8bit``, torch-optimi's ``AdamW``) come
and go with their 8-bit moments and Kahan compensation into a
[`LowMemoryAdamState`][adamw_jax.LowMemoryAdamState].

What is the same for every reference is here: the param groups'
hyperparameters, the layout, the step counts, the adamw_jax state filled and
read. What differs is one adapter per reference (`adamw_jax._references`).
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import tree_util as jtu

from adamw_jax import (
  _alias,
  _core,
  _groups,
  _hyperparams,
  _layout,
  _lowmem,
  _master,
  _quantize,
  _references,
  _tree,
)
from adamw_jax import _interop_adapter as _adapter

Axes = _layout.Axes
Mapper = _layout.Mapper


@dataclasses.dataclass(frozen=True)
class _Config:
  """What ``from_torch`` read: enough for ``to_torch_state_dict`` to write the state dict back."""

  param_groups: tuple[dict, ...]  # torch's param_groups entries, 'params' as indices
  slots: tuple[_layout.TorchParam, ...]
  reference: _adapter.Reference


# The transforms from_torch made, keyed by their init function (a GradientTransformation is
# a tuple and carries no attributes), so that to_torch_state_dict(tx, ...) can write
# torch's param groups back.
_CONFIGS: weakref.WeakKeyDictionary[Callable, _Config] = weakref.WeakKeyDictionary()


# --------------------------------------------------------------------------
# torch -> JAX
# --------------------------------------------------------------------------


def _read_optimizer(what: str, optimizer_or_state_dict: Any):
  """(state_dict, the parameter tensors in state-dict order or None, its Reference)."""
  torch = _adapter.torch()
  if isinstance(optimizer_or_state_dict, torch.optim.Optimizer):
    opt = optimizer_or_state_dict
    ref = _references.of_optimizer(what, opt)
    tensors = [p for g in opt.param_groups for p in g["params"]]
    return opt.state_dict(), tensors, ref
  sd = optimizer_or_state_dict
  if not (isinstance(sd, Mapping) and "state" in sd and "param_groups" in sd):
    raise TypeError(
      f"{what}: expected a torch.optim.AdamW / Adam or its state_dict(), got {type(sd).__name__}."
    )
  return sd, None, _references.of_state_dict(what, sd)


def _unmodelled(where: str, key: Any, value: Any) -> ValueError:
  """The error for a param-group key that from_torch does not read, saying why."""
  if key == "initial_lr":
    return ValueError(
      f"{where} has 'initial_lr': an LR scheduler is attached, and its state is not part of "
      "the optimizer's. Pass learning_rate= (a float or an optax schedule, continuing from "
      "the current step) to say what the learning rate is from here on."
    )
  hp = _hyperparams.BY_NAME.get(key) if isinstance(key, str) else None
  if hp is not None and hp.torch is not None:
    return ValueError(
      f"{where} has {key!r}, adamw_jax's name for torch's {hp.torch!r}: a torch "
      f"param group has {hp.torch!r}."
    )
  if hp is not None:
    return ValueError(
      f"{where} has {key!r}={value!r}, a hyperparameter of adamw_jax that "
      f"torch.optim.AdamW / Adam do not have: {hp.no_torch}. from_torch gives "
      f"torch's update; pass ignore=({key!r},) to have that."
    )
  return ValueError(
    f"{where} has the setting {key!r}={value!r}, which torch.optim.AdamW / Adam do not "
    "have and adamw_jax does not model. If it does not change the update (a label, say), "
    f"pass ignore=({key!r},)."
  )


def _group_hyperparameters(what: str, i: int, group: Mapping, ignore: Sequence[str]) -> dict:
  """The keyword arguments of adamw / adam that torch's param group `group` sets."""
  where = f"{what}: param group {i}"
  for key in group:
    if (
      key not in _hyperparams.torch_keys()
      and key not in _hyperparams.TORCH_IGNORED
      and (key not in ignore)
    ):
      raise _unmodelled(where, key, group[key])
  out = {}
  for hp in _hyperparams.torch_keyed():
    if hp.torch not in group and not hp.torch_optional:
      raise ValueError(f"{where} has no {hp.torch!r}: not a torch.optim.AdamW / Adam state dict.")
    value = group.get(hp.torch, hp.default)
    value = value if hp.torch_index is None else value[hp.torch_index]
    out[hp.name] = bool(value) if hp.kind == "flag" else float(value)
  return out


def _decoupled(what: str, groups: Sequence[Mapping], ref: _adapter.Reference) -> bool:
  """AdamW (True) or Adam (False): one for all groups."""
  flags = {ref.is_adamw(what, g) for g in groups}
  if len(flags) > 1:
    raise ValueError(
      f"{what}: some param groups decouple weight decay (AdamW) and others do not "
      "(Adam); adamw_jax builds all groups with one of the two."
    )
  return flags.pop() if flags else True


_STATES = (_core.ScaleByAdamState, _lowmem.LowMemoryAdamState)


def _is_state(x) -> bool:
  return isinstance(x, _STATES)


def _adam_states(state) -> list:
  """Every ScaleByAdamState and LowMemoryAdamState in `state`, in tree order."""
  return [s for s in jax.tree.leaves(state, is_leaf=_is_state) if _is_state(s)]


def _is_masked(x) -> bool:
  return isinstance(x, optax.MaskedNode)


def _is_moment_leaf(x) -> bool:
  return _is_masked(x) or isinstance(x, _quantize.QuantizedMoment)


def _leaf_paths(tree) -> list[tuple[str, Any]]:
  """(path, leaf) pairs; a QuantizedMoment and a MaskedNode count as leaves."""
  return [
    (_tree.path_str(p), x) for p, x in jtu.tree_flatten_with_path(tree, is_leaf=_is_moment_leaf)[0]
  ]


def _host(x):
  """A moment as numpy: an array, or a QuantizedMoment of numpy arrays."""
  if isinstance(x, _quantize.QuantizedMoment):
    return _quantize.QuantizedMoment(np.asarray(x.codes), np.asarray(x.scale))
  return np.asarray(x)


def _hyperparameters(
  what: str, groups: Sequence[Mapping], learning_rate: Any, ignore: Sequence[str]
) -> list[dict]:
  """Each param group's hyperparameters, as keyword arguments of adamw / adam."""
  if learning_rate is not None:
    ignore = (*ignore, "initial_lr")
  hypers = [_group_hyperparameters(what, i, g, ignore) for i, g in enumerate(groups)]
  for i, g in enumerate(groups):
    if not g["params"]:
      raise ValueError(f"{what}: param group {i} has no parameters.")
  if learning_rate is not None:
    lrs = (
      list(learning_rate)
      if isinstance(learning_rate, (list, tuple))
      else [learning_rate] * len(groups)
    )
    if len(lrs) != len(groups):
      raise ValueError(
        f"{what}: learning_rate= has {len(lrs)} entries for {len(groups)} param groups."
      )
    for h, lr in zip(hypers, lrs):
      h["learning_rate"] = lr
  return hypers


def _check_steps(what: str, slots: Sequence[_layout.TorchParam], read: Mapping[str, tuple]) -> None:
  """All parameters of a group at one step: adamw_jax keeps one count per group."""
  first: dict[int, _layout.TorchParam] = {}
  for s in slots:
    f = first.setdefault(s.group, s)
    if read[s.path][0] != read[f.path][0]:
      raise ValueError(
        f"{what}: in param group {s.group}, {f.label()} is at step {read[f.path][0]} "
        f"and {s.label()} at step {read[s.path][0]}; adamw_jax keeps one step count per group "
        "(a parameter that has not had a gradient yet has no state in torch)."
      )


def _filled(what: str, state, read: Mapping[str, tuple]):
  """A state from tx.init with torch's step, moments (and compensation) put in."""
  if not _is_state(state):
    return state
  mine = [p for p, x in _leaf_paths(state.mu) if not _is_masked(x)]

  def put(tree, field):
    if tree is None:
      return None
    out = []
    for path, x in _leaf_paths(tree):
      value = read[path][field]
      if _is_masked(x) or value is None:  # not this transform's leaf / optimi has no buffer yet
        if value is not None and path in mine:
          raise ValueError(
            f"{what}: the torch state has a Kahan compensation for {path!r}, "
            "but its JAX leaf gets none (param_rounding='kahan' compensates "
            "bfloat16 and float16 leaves)."
          )
        out.append(x)
      else:
        out.append(jax.tree.map(jnp.asarray, value))
    return jax.tree.structure(tree, is_leaf=_is_moment_leaf).unflatten(out)

  count = jnp.asarray(read[mine[0]][0] if mine else 0, jnp.int32)
  moments = (put(state.mu, 1), put(state.nu, 2), put(state.nu_max, 3))
  if isinstance(state, _core.ScaleByAdamState):
    return _core.ScaleByAdamState(count, *moments)
  return state._replace(
    count=count,
    mu=moments[0],
    nu=moments[1],
    nu_max=moments[2],
    compensation=put(state.compensation, 4),
  )


def _to_bf16(x):
  return jnp.asarray(x).astype(jnp.bfloat16)


def _check_rounding(what: str, rounding: str | None, ref: _adapter.Reference, params) -> None:
  """``param_rounding="remainder"``: float32 parameters of torch's AdamW / Adam; nothing else."""
  if rounding is None:
    return
  if rounding != "remainder":
    raise ValueError(
      f"{what}: param_rounding={rounding!r}: from_torch takes None (torch's parameters as "
      "they are) or 'remainder' (float32 parameters held as bfloat16 parameters and "
      "remainders, exactly)"
    )
  if not ref.TAKES_REMAINDER:
    raise ValueError(
      f"{what}: param_rounding='remainder' continues a float32 torch.optim.AdamW / Adam run; "
      f"{ref.label} keeps its own low-memory state"
    )
  for path, p in _tree.flatten_params(params)[0]:
    if _tree.leaf_dtype(p) != jnp.float32:
      raise ValueError(
        f"{what}: param_rounding='remainder' takes torch's float32 parameters (the master "
        f"weights); the parameter at {_tree.where(path)} is {_tree.leaf_dtype(p)}"
      )


def from_torch(
  optimizer_or_state_dict: Any,
  params: Any,
  *,
  names: Any = None,
  mapping: Mapper | None = None,
  learning_rate: Any = None,
  ignore: Sequence[str] = (),
  param_rounding: str | None = None,
) -> tuple[optax.GradientTransformation, Any]:
  """A torch AdamW / Adam run as ``(tx, opt_state)``: the transform and its state, moments and all.

  ```python
  tx, opt_state = adamw_jax.from_torch(optimizer, params)                # by order
  tx, opt_state = adamw_jax.from_torch(optimizer, flax_params, names=model,
                                       mapping=adamw_jax.flax_layout(flax_params))
  ```

  >>> import torch, jax.numpy as jnp, adamw_jax
  >>> w = torch.nn.Parameter(torch.ones(3))
  >>> optimizer = torch.optim.AdamW([w], lr=0.1)
  >>> w.grad = torch.ones(3); optimizer.step()
  >>> tx, opt_state = adamw_jax.from_torch(optimizer, {"w": jnp.asarray(w.detach().numpy())})
  >>> print(int(opt_state.count), opt_state.mu["w"])  # torch's step and exp_avg
  1 [0.1 0.1 0.1]

  The next ``tx.update(grads, opt_state, params)`` is torch's next
  ``optimizer.step()``. One param group gives [`adamw`][adamw_jax.adamw] (or
  [`adam`][adamw_jax.adam] for ``torch.optim.Adam`` without
  ``decoupled_weight_decay``); several give [`param_groups`][adamw_jax.param_groups]
  with groups named ``"group0"``, ``"group1"``, ... in torch's order, each
  with its own step count. ``foreach``, ``fused``, ``capturable`` and
  ``differentiable`` choose torch's implementation, not the math, and are
  ignored.

  **Which torch parameter is which leaf.** By default, by order: the
  optimizer's parameters (group by group) against the leaves of `params` in
  ``jax.tree.leaves`` order, shapes as they are. With `names` (or, when only
  `mapping` is given, the ``param_names`` torch stores for an optimizer built
  from ``model.named_parameters()``), each torch name goes to the path
  ``mapping(name)`` (default: dots become slashes), optionally with axes to
  transpose by: [`flax_layout`][adamw_jax.flax_layout] does Linear and Conv weights. Every leaf
  must get exactly one torch parameter.

  **The low-memory references.** A ``torchao.optim.AdamW8bit`` /
  ``Adam8bit`` gives ``moment_bits=8`` with its ``block_size`` (and
  ``param_rounding="stochastic"`` with ``bf16_stochastic_round``): its 8-bit
  moments' codes and scales become [`QuantizedMoment`][adamw_jax.QuantizedMoment] bit
  for bit. Pass the optimizer, not its state dict (which lacks those
  settings). An ``optimi.AdamW`` / ``Adam`` gives ``param_rounding="kahan"``
  with its ``kahan_sum`` (its ``kahan_comp`` becomes the ``compensation``
  bit for bit) and ``decay_mode="paper"`` with ``decouple_lr``; its debiased
  moments are converted to torch's (``m = exp_avg * (1 - b1**t)``, one
  rounding). The next step is then torch's AdamW, close to the reference's
  (README, "Low-memory AdamW").

  **Exact bfloat16 master weights.** With ``param_rounding="remainder"``,
  `params` are torch's float32 parameters (the master weights, as JAX
  arrays): `tx` has ``param_rounding="remainder"`` and `opt_state` is the
  state of their bfloat16 parameters, torch's moments (float32) and the
  remainders that make each bfloat16 parameter its float32 master exactly;
  [`split_master`][adamw_jax.split_master] gives the bfloat16 parameters:

  ```python
  tx, opt_state = adamw_jax.from_torch(optimizer, master, param_rounding="remainder")
  params, opt_state = adamw_jax.split_master(master, opt_state)
  ```

  The run then continues torch's float32 run bit for bit
  ([Low-memory AdamW](low-memory.md)); [`master_params`][adamw_jax.master_params] gives torch's
  parameters back.

  **Refused, with an error saying what differs:** another optimizer class; a
  param group setting that AdamW / Adam do not have; an LR scheduler's
  ``initial_lr`` (pass `learning_rate`); counts, shapes or dtypes that do not
  match; a name without a leaf or a leaf without a torch parameter; params of
  one group at different steps (a parameter that never had a gradient while
  others did, say), which one step count cannot represent. Groups at
  different steps are fine: each group keeps its own count, as in torch.

  Args:
    optimizer_or_state_dict: a ``torch.optim.AdamW`` or ``torch.optim.Adam``,
      or its ``state_dict()``; a torchao ``AdamW8bit`` / ``Adam8bit``; an
      ``optimi.AdamW`` / ``Adam`` or its state dict.
    params: the JAX parameters (any pytree; ``nnx.State`` of ``nnx.Param``
      counts each ``Param`` as a leaf).
    names: torch parameter names in the optimizer's order: the torch module
      (matched by identity; needs the optimizer), or a list of strings.
    mapping: torch name -> JAX path (``'/'``-joined), or -> ``(path, axes)``:
      a dict, a function, or [`flax_layout`][adamw_jax.flax_layout].
    learning_rate: replaces torch's ``lr``: a float or an optax schedule
      ``count -> lr`` (``count`` continues from torch's step), or a list of
      one per param group. Needed when an LR scheduler is attached.
    ignore: param group keys to ignore (your own labels).
    param_rounding: None (default: torch's parameters as they are) or
      ``"remainder"``: float32 `params` held as bfloat16 parameters and
      remainders (torch.optim.AdamW / Adam only).

  Returns:
    tx: the optax transform with torch's hyperparameters, per param group;
      [`to_torch_state_dict`][adamw_jax.to_torch_state_dict] takes it back to torch.
    opt_state: `tx`'s state, holding torch's moments and step counts.
  """
  what = "from_torch"
  sd, tensors, ref = _read_optimizer(what, optimizer_or_state_dict)
  _check_rounding(what, param_rounding, ref, params)
  raw_groups = list(sd["param_groups"])
  translated = ref.read_groups(what, raw_groups, ignore)
  groups = [g for g, _ in translated]
  extras = [e for _, e in translated]
  hypers = _hyperparameters(what, groups, learning_rate, ignore)
  decoupled = _decoupled(what, groups, ref)
  flat, treedef = _tree.flatten_params(params)
  leaves = dict(flat)
  slots = _layout.match(
    what,
    groups,
    _layout.param_names(what, names, mapping, groups, tensors),
    {p: np.shape(x) for p, x in flat},
    mapping,
  )
  for i, g in enumerate(raw_groups):
    extras[i].update(
      ref.group_options(g, [jnp.result_type(leaves[s.path]) for s in slots if s.group == i])
    )
  for h, e in zip(hypers, extras):
    h.update(e)
    if param_rounding is not None:
      h["param_rounding"] = param_rounding
  readings = [
    _adapter.Reading(
      h["amsgrad"], ref.group_step(raw), (float(g["betas"][0]), float(g["betas"][1]))
    )
    for raw, g, h in zip(raw_groups, groups, hypers)
  ]
  read = {
    s.path: ref.read(what, s, sd["state"].get(s.index), leaves[s.path], readings[s.group])
    for s in slots
  }
  _check_steps(what, slots, read)

  factory = _alias.adamw if decoupled else _alias.adam
  if len(groups) == 1:
    tx = factory(**hypers[0])
  else:
    group_of = {s.path: f"group{s.group}" for s in slots}
    tx = _groups.param_groups(
      {f"group{i}": h for i, h in enumerate(hypers)},
      labels=treedef.unflatten([group_of[p] for p, _ in flat]),
      optimizer=factory,
    )
  pure = _tree.unbox_all(params)
  working = pure if param_rounding is None else jax.tree.map(_to_bf16, pure)
  opt_state = jax.tree.map(lambda s: _filled(what, s, read), tx.init(working), is_leaf=_is_state)
  if param_rounding is not None:
    opt_state = _master.split_master(pure, opt_state)[1]
  _CONFIGS[tx.init] = _Config(
    tuple({k: v for k, v in g.items() if k != "initial_lr"} for g in raw_groups), tuple(slots), ref
  )
  return tx, opt_state


# --------------------------------------------------------------------------
# JAX -> torch
# --------------------------------------------------------------------------


def _entries(what: str, opt_state) -> tuple[list[str], dict[str, tuple]]:
  """Leaf paths in tree order, and path -> (count, mu, nu, nu_max, compensation) from every state.

  The states are ScaleByAdamState and LowMemoryAdamState; `compensation` is
  None where there is none; a quantized moment is a QuantizedMoment of numpy arrays.
  """
  states = _adam_states(_tree.unbox_all(opt_state))
  if not states:
    raise ValueError(
      f"{what}: the optimizer state holds no adamw_jax ScaleByAdamState (it is "
      "not the state of adamw, adam, scale_by_adam or param_groups)."
    )
  order = [p for p, _ in _leaf_paths(states[0].mu)]
  out: dict[str, tuple] = {}
  for s in states:
    comp = getattr(s, "compensation", None)
    cols: list[Any] = [
      dict(_leaf_paths(t)) if t is not None else None for t in (s.mu, s.nu, s.nu_max, comp)
    ]
    for path, m in cols[0].items():
      if _is_masked(m):
        continue
      if isinstance(m, _quantize.PackedQuantizedMoment):
        raise ValueError(
          f"{what}: the JAX state of {path!r} has 4-bit moments (moment_bits=4); "
          "writing them to a torch optimizer (torchao's AdamW4bit) is not implemented."
        )
      if path in out:
        raise ValueError(
          f"{what}: the leaf {path!r} has Adam state in two places of the "
          "optimizer state; a torch optimizer keeps one per parameter."
        )
      c = None if cols[3] is None or _is_masked(cols[3][path]) else np.asarray(cols[3][path])
      out[path] = (
        int(s.count),
        _host(m),
        _host(cols[1][path]),
        None if cols[2] is None else _host(cols[2][path]),
        c,
      )
  return order, out


def to_torch_state_dict(
  tx_or_optimizer: Any,
  opt_state: Any,
  *,
  names: Any = None,
  mapping: Mapper | None = None,
) -> dict:
  """The ``state_dict()`` of a torch AdamW / Adam that continues a JAX run.

  ```python
  optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-2)
  optimizer.load_state_dict(adamw_jax.to_torch_state_dict(optimizer, opt_state))
  ```

  >>> import torch, jax.numpy as jnp, adamw_jax
  >>> params = {"w": jnp.ones(3)}
  >>> tx = adamw_jax.adamw(learning_rate=0.1)
  >>> _, opt_state = tx.update({"w": jnp.ones(3)}, tx.init(params), params)
  >>> optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.ones(3))], lr=0.1)
  >>> state_dict = adamw_jax.to_torch_state_dict(optimizer, opt_state)
  >>> optimizer.load_state_dict(state_dict)
  >>> optimizer.state_dict()["state"][0]["step"], optimizer.state_dict()["state"][0]["exp_avg"]
  (tensor(1.), tensor([0.1000, 0.1000, 0.1000]))

  With ``param_rounding="remainder"`` the state dict is torch's float32 AdamW
  state (the moments are float32); the torch parameters are the float32
  master weights, [`master_params`][adamw_jax.master_params] (copy them into the model).

  Args:
    tx_or_optimizer: the torch optimizer that is to continue (torch's, torchao's
      ``AdamW8bit`` / ``Adam8bit``, which get ``OptimState8bit`` moments, or
      optimi's, which get ``kahan_comp`` and the group's ``step``; its param groups
      give the hyperparameters and group membership; `names` and `mapping`
      say which leaf is which parameter, as in [`from_torch`][adamw_jax.from_torch]), or the
      `tx` that [`from_torch`][adamw_jax.from_torch] returned (everything is known from it).
    opt_state: the state of an adamw_jax transform (``adamw``, ``adam``,
      ``param_groups``, or a chain holding one), or ``nnx.Optimizer.opt_state``.
    names: as in [`from_torch`][adamw_jax.from_torch] (with a torch optimizer only).
    mapping: as in [`from_torch`][adamw_jax.from_torch] (with a torch optimizer only).

  Returns:
    A state dict for ``optimizer.load_state_dict``: per parameter ``step``
    (a float32 tensor, as torch keeps it), ``exp_avg``, ``exp_avg_sq`` and,
    with AMSGrad, ``max_exp_avg_sq``, in torch's layout.

  Raises:
    ValueError: when the state does not fit the optimizer: a parameter without
      a leaf or the other way round, another shape, AMSGrad on one side only.
    TypeError: when `tx_or_optimizer` is neither a torch optimizer nor a
      transform made by [`from_torch`][adamw_jax.from_torch].
  """
  what = "to_torch_state_dict"
  torch = _adapter.torch()
  order, entries = _entries(what, opt_state)
  if isinstance(tx_or_optimizer, torch.optim.Optimizer):
    opt = tx_or_optimizer
    sd, tensors, ref = _read_optimizer(what, opt)
    assert tensors is not None  # an optimizer's
    groups = [dict(g) for g in sd["param_groups"]]
    missing = [p for p in order if p not in entries]
    if missing:
      raise ValueError(
        f"{what}: the JAX leaf {missing[0]!r} has no Adam state (it is outside "
        "every adamw_jax transform), but the torch optimizer updates every "
        "parameter."
      )
    slots = _layout.match(
      what,
      groups,
      _layout.param_names(what, names, mapping, groups, tensors),
      {p: _adapter.shape(entries[p][1]) for p in order},
      mapping,
    )
    shapes = {i: tuple(t.shape) for i, t in zip((s.index for s in slots), tensors)}
  else:
    config = (
      _CONFIGS.get(tx_or_optimizer.init)
      if callable(getattr(tx_or_optimizer, "init", None))
      else None
    )
    if config is None:
      raise TypeError(
        f"{what}: expected the torch optimizer to load the state into, or a "
        "transform made by adamw_jax.from_torch; got "
        f"{type(tx_or_optimizer).__name__}."
      )
    if names is not None or mapping is not None:
      raise ValueError(
        f"{what}: names= and mapping= go with a torch optimizer; the transform "
        "from from_torch already knows its parameters."
      )
    groups = [dict(g) for g in config.param_groups]
    slots = list(config.slots)
    ref = config.reference
    shapes = {}
    for s in slots:
      if s.path not in entries:
        raise ValueError(
          f"{what}: the optimizer state has no Adam state for the leaf {s.path!r} "
          f"({s.label()}); is it the state of this transform?"
        )
  state = {}
  for s in slots:
    count, mu, nu, nu_max, comp = entries[s.path]
    ref.check(what, s, (mu, nu, nu_max), comp)
    amsgrad = bool(groups[s.group].get(_hyperparams.BY_NAME["amsgrad"].torch, False))
    if amsgrad != (nu_max is not None):
      raise ValueError(
        f"{what}: param group {s.group} has amsgrad={amsgrad}, but the JAX state "
        f"of {s.path!r} {'has no' if amsgrad else 'has a'} nu_max "
        f"(amsgrad={not amsgrad})."
      )
    back = _adapter.inverse(s.axes)
    arrays = {"exp_avg": mu, "exp_avg_sq": nu, "max_exp_avg_sq": nu_max}
    for key, x in arrays.items():
      if x is None:
        continue
      shape = tuple(np.shape(_adapter.permute(np.empty(_adapter.shape(x), np.bool_), back)))
      if s.index in shapes and shape != shapes[s.index]:
        raise ValueError(
          f"{what}: {s.label()} has shape {shapes[s.index]}, but the JAX state of "
          f"{s.path!r} gives {key} of shape {shape}"
          + (f" (after axes {back})" if back else "")
          + "."
        )
    state[s.index] = ref.write(s, count, arrays, comp, back, groups[s.group])
  return {"state": state, "param_groups": groups}
