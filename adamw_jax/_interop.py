"""Optimizer state between ``torch.optim.AdamW`` / ``torch.optim.Adam`` and adamw_jax, both ways.

torch keeps, per parameter, ``step``, ``exp_avg``, ``exp_avg_sq`` and (AMSGrad)
``max_exp_avg_sq``; :class:`adamw_jax.ScaleByAdamState` holds the same numbers
as ``count``, ``mu``, ``nu`` and ``nu_max``, so a run moves across with its
moments. Which torch parameter is which pytree leaf is decided by order, or by
torch's parameter names and a mapping (see :func:`flax_layout`).
"""

from __future__ import annotations

import dataclasses
import math
import weakref
from collections.abc import Mapping, Sequence
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import tree_util as jtu

from adamw_jax import _alias, _core, _groups, _hyperparams, _layout, _tree

Axes = _layout.Axes
Mapper = _layout.Mapper


@dataclasses.dataclass(frozen=True)
class _Config:
  """What ``from_torch`` read: enough for ``to_torch_state_dict`` to write the state dict back."""

  param_groups: tuple[dict, ...]  # torch's param_groups entries, 'params' as indices
  slots: tuple[_layout.TorchParam, ...]


# The transforms from_torch made, keyed by their init function (a GradientTransformation is
# a tuple and carries no attributes), so that to_torch_state_dict(tx, ...) can write
# torch's param groups back.
_CONFIGS: "weakref.WeakKeyDictionary[Callable, _Config]" = weakref.WeakKeyDictionary()


def _torch():
  try:
    import torch
  except ImportError as e:  # pragma: no cover - torch is in the test extra
    raise ImportError("adamw_jax.from_torch / to_torch_state_dict need PyTorch: "
                      "pip install 'adamw_jax[torch]'.") from e
  return torch


# --------------------------------------------------------------------------
# Arrays
# --------------------------------------------------------------------------

def _to_numpy(t) -> np.ndarray:
  torch = _torch()
  t = t.detach().cpu()
  if t.dtype == torch.bfloat16:
    return t.view(torch.int16).numpy().view(jnp.bfloat16)
  return t.numpy()


def _to_tensor(x):
  torch = _torch()
  x = np.array(x, order="C")  # a copy torch owns (np.ascontiguousarray would make 0-d 1-d)
  if x.dtype == jnp.bfloat16:
    return torch.from_numpy(x.view(np.int16)).view(torch.bfloat16)
  return torch.from_numpy(x)


def _inverse(axes: Axes) -> Axes:
  return None if axes is None else tuple(int(a) for a in np.argsort(axes))


def _permute(x: np.ndarray, axes: Axes) -> np.ndarray:
  return x if axes is None else np.transpose(x, axes)


# --------------------------------------------------------------------------
# torch -> JAX
# --------------------------------------------------------------------------

def _read_optimizer(what: str, optimizer_or_state_dict: Any):
  """(state_dict, the parameter tensors in state-dict order, or None for a state dict)."""
  torch = _torch()
  if isinstance(optimizer_or_state_dict, torch.optim.Optimizer):
    opt = optimizer_or_state_dict
    if not isinstance(opt, torch.optim.Adam):
      raise TypeError(f"{what}: {type(opt).__module__}.{type(opt).__name__} is not supported; "
                      "only torch.optim.AdamW and torch.optim.Adam are.")
    tensors = [p for g in opt.param_groups for p in g["params"]]
    return opt.state_dict(), tensors
  sd = optimizer_or_state_dict
  if not (isinstance(sd, Mapping) and "state" in sd and "param_groups" in sd):
    raise TypeError(f"{what}: expected a torch.optim.AdamW / Adam or its state_dict(), got "
                    f"{type(sd).__name__}.")
  return sd, None


def _unmodelled(where: str, key: Any, value: Any) -> ValueError:
  """The error for a param-group key that from_torch does not read, saying why."""
  if key == "initial_lr":
    return ValueError(
        f"{where} has 'initial_lr': an LR scheduler is attached, and its state is not part of "
        "the optimizer's. Pass learning_rate= (a float or an optax schedule, continuing from "
        "the current step) to say what the learning rate is from here on.")
  hp = _hyperparams.BY_NAME.get(key) if isinstance(key, str) else None
  if hp is not None and hp.torch is not None:
    return ValueError(f"{where} has {key!r}, adamw_jax's name for torch's {hp.torch!r}: a torch "
                      f"param group has {hp.torch!r}.")
  if hp is not None:
    return ValueError(f"{where} has {key!r}={value!r}, a hyperparameter of adamw_jax that "
                      f"torch.optim.AdamW / Adam do not have: {hp.no_torch}. from_torch gives "
                      f"torch's update; pass ignore=({key!r},) to have that.")
  return ValueError(
      f"{where} has the setting {key!r}={value!r}, which torch.optim.AdamW / Adam do not "
      "have and adamw_jax does not model. If it does not change the update (a label, say), "
      f"pass ignore=({key!r},).")


def _group_hyperparameters(what: str, i: int, group: Mapping, ignore: Sequence[str]) -> dict:
  """The keyword arguments of adamw / adam that torch's param group `group` sets."""
  where = f"{what}: param group {i}"
  for key in group:
    if key not in _hyperparams.torch_keys() and key not in _hyperparams.TORCH_IGNORED and (
        key not in ignore):
      raise _unmodelled(where, key, group[key])
  out = {}
  for hp in _hyperparams.torch_keyed():
    if hp.torch not in group and not hp.torch_optional:
      raise ValueError(f"{where} has no {hp.torch!r}: not a torch.optim.AdamW / Adam state dict.")
    value = group.get(hp.torch, hp.default)
    value = value if hp.torch_index is None else value[hp.torch_index]
    out[hp.name] = bool(value) if hp.kind == "flag" else float(value)
  return out


def _decoupled(what: str, groups: Sequence[Mapping], optimizer: Any) -> bool:
  torch = _torch()
  flags = set()
  for g in groups:
    if _hyperparams.TORCH_DECOUPLED in g:
      flags.add(bool(g[_hyperparams.TORCH_DECOUPLED]))
    elif isinstance(optimizer, torch.optim.AdamW):
      flags.add(True)
    elif isinstance(optimizer, torch.optim.Adam):
      flags.add(False)
    else:
      raise ValueError(f"{what}: the state dict has no 'decoupled_weight_decay' (an older torch): "
                       "pass the optimizer itself, which tells AdamW from Adam.")
  if len(flags) > 1:
    raise ValueError(f"{what}: some param groups decouple weight decay (AdamW) and others do not "
                     "(Adam); adamw_jax builds all groups with one of the two.")
  return flags.pop() if flags else True


def _step_of(what: str, slot: _layout.TorchParam, value) -> int:
  step = float(value.item() if hasattr(value, "item") else value)
  if not math.isfinite(step) or step != int(step) or not 0 <= step <= 2**31 - 1:
    raise ValueError(f"{what}: {slot.label()} has step {step}; expected a whole number of steps "
                     "in [0, 2**31 - 1].")
  return int(step)


def _read_state(what: str, slot: _layout.TorchParam, state: Optional[Mapping], amsgrad: bool,
                leaf) -> tuple:
  """(step, mu, nu, nu_max) of one torch parameter, in the layout and dtype of `leaf`."""
  shape, dtype = np.shape(leaf), jnp.result_type(leaf)
  if not state:
    zeros = np.zeros(shape, dtype)
    return 0, zeros, zeros, (zeros if amsgrad else None)
  expected = {"step", "exp_avg", "exp_avg_sq"} | ({"max_exp_avg_sq"} if amsgrad else set())
  if set(state) != expected:
    extra, missing = sorted(set(state) - expected), sorted(expected - set(state))
    raise ValueError(f"{what}: the state of {slot.label()} has keys {sorted(state)}; expected "
                     f"{sorted(expected)} (amsgrad={amsgrad})"
                     + (f"; unexpected {extra}" if extra else "")
                     + (f"; missing {missing}" if missing else "")
                     + ".")
  out = []
  for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq") if amsgrad else ("exp_avg", "exp_avg_sq"):
    x = _permute(_to_numpy(state[key]), slot.axes)
    if x.shape != shape:
      hint = (" Linear / Conv weights need a transposed layout: pass names= and "
              "mapping=adamw_jax.flax_layout(params)." if slot.axes is None and len(shape) >= 2
              and sorted(x.shape) == sorted(shape) else "")
      raise ValueError(f"{what}: {slot.label()} has {key} of shape {x.shape}"
                       + (f" (after axes {slot.axes})" if slot.axes else "")
                       + f", but the JAX leaf {slot.path!r} has shape {shape}.{hint}")
    if x.dtype != dtype:
      raise ValueError(f"{what}: {slot.label()} has {key} of dtype {x.dtype}, but the JAX leaf "
                       f"{slot.path!r} has dtype {dtype}; cast the params to {x.dtype} first.")
    out.append(x)
  return (_step_of(what, slot, state["step"]), out[0], out[1], out[2] if amsgrad else None)


def _adam_states(state) -> list[_core.ScaleByAdamState]:
  return [s for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, _core.ScaleByAdamState))
          if isinstance(s, _core.ScaleByAdamState)]


def _is_masked(x) -> bool:
  return isinstance(x, optax.MaskedNode)


def _leaf_paths(tree) -> list[tuple[str, Any]]:
  return [(_tree.path_str(p), x)
          for p, x in jtu.tree_flatten_with_path(tree, is_leaf=_is_masked)[0]]


def _hyperparameters(what: str, groups: Sequence[Mapping], learning_rate: Any,
                     ignore: Sequence[str]) -> list[dict]:
  """Each param group's hyperparameters, as keyword arguments of adamw / adam."""
  if learning_rate is not None:
    ignore = (*ignore, "initial_lr")
  hypers = [_group_hyperparameters(what, i, g, ignore) for i, g in enumerate(groups)]
  for i, g in enumerate(groups):
    if not g["params"]:
      raise ValueError(f"{what}: param group {i} has no parameters.")
  if learning_rate is not None:
    lrs = (list(learning_rate) if isinstance(learning_rate, (list, tuple))
           else [learning_rate] * len(groups))
    if len(lrs) != len(groups):
      raise ValueError(f"{what}: learning_rate= has {len(lrs)} entries for {len(groups)} "
                       "param groups.")
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
          "(a parameter that has not had a gradient yet has no state in torch).")


def _filled(state, read: Mapping[str, tuple]):
  """A ScaleByAdamState from tx.init with torch's step and moments put in (others as they are)."""
  if not isinstance(state, _core.ScaleByAdamState):
    return state

  def put(tree, field):
    if tree is None:
      return None
    flat, treedef = jtu.tree_flatten_with_path(tree, is_leaf=_is_masked)
    return treedef.unflatten([x if _is_masked(x) else jnp.asarray(read[_tree.path_str(p)][field])
                              for p, x in flat])

  mine = [p for p, x in _leaf_paths(state.mu) if not _is_masked(x)]
  count = read[mine[0]][0] if mine else 0
  return _core.ScaleByAdamState(jnp.asarray(count, jnp.int32), put(state.mu, 1),
                                put(state.nu, 2), put(state.nu_max, 3))


def from_torch(
    optimizer_or_state_dict: Any,
    params: Any,
    *,
    names: Any = None,
    mapping: Optional[Mapper] = None,
    learning_rate: Any = None,
    ignore: Sequence[str] = (),
) -> tuple[optax.GradientTransformation, Any]:
  """A torch AdamW / Adam run as ``(tx, opt_state)``: the transform and its state, moments and all.

  .. code-block:: python

     tx, opt_state = adamw_jax.from_torch(optimizer, params)                # by order
     tx, opt_state = adamw_jax.from_torch(optimizer, flax_params, names=model,
                                          mapping=adamw_jax.flax_layout(flax_params))

  >>> import torch, jax.numpy as jnp, adamw_jax
  >>> w = torch.nn.Parameter(torch.ones(3))
  >>> optimizer = torch.optim.AdamW([w], lr=0.1)
  >>> w.grad = torch.ones(3); optimizer.step()
  >>> tx, opt_state = adamw_jax.from_torch(optimizer, {"w": jnp.asarray(w.detach().numpy())})
  >>> print(int(opt_state.count), opt_state.mu["w"])  # torch's step and exp_avg
  1 [0.1 0.1 0.1]

  The next ``tx.update(grads, opt_state, params)`` is torch's next
  ``optimizer.step()``. One param group gives :func:`adamw_jax.adamw` (or
  :func:`adamw_jax.adam` for ``torch.optim.Adam`` without
  ``decoupled_weight_decay``); several give :func:`adamw_jax.param_groups`
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
  transpose by: :func:`flax_layout` does Linear and Conv weights. Every leaf
  must get exactly one torch parameter.

  **Refused, with an error saying what differs:** another optimizer class; a
  param group setting that AdamW / Adam do not have; an LR scheduler's
  ``initial_lr`` (pass `learning_rate`); counts, shapes or dtypes that do not
  match; a name without a leaf or a leaf without a torch parameter; params of
  one group at different steps (a parameter that never had a gradient while
  others did, say), which one step count cannot represent. Groups at
  different steps are fine: each group keeps its own count, as in torch.

  Args:
    optimizer_or_state_dict: a ``torch.optim.AdamW`` or ``torch.optim.Adam``,
      or its ``state_dict()``.
    params: the JAX parameters (any pytree; ``nnx.State`` of ``nnx.Param``
      counts each ``Param`` as a leaf).
    names: torch parameter names in the optimizer's order: the torch module
      (matched by identity; needs the optimizer), or a list of strings.
    mapping: torch name -> JAX path (``'/'``-joined), or -> ``(path, axes)``:
      a dict, a function, or :func:`flax_layout`.
    learning_rate: replaces torch's ``lr``: a float or an optax schedule
      ``count -> lr`` (``count`` continues from torch's step), or a list of
      one per param group. Needed when an LR scheduler is attached.
    ignore: param group keys to ignore (your own labels).

  Returns:
    ``(tx, opt_state)``; :func:`to_torch_state_dict` takes `tx` back to torch.
  """
  what = "from_torch"
  sd, tensors = _read_optimizer(what, optimizer_or_state_dict)
  groups = list(sd["param_groups"])
  hypers = _hyperparameters(what, groups, learning_rate, ignore)
  decoupled = _decoupled(what, groups, optimizer_or_state_dict)
  flat, treedef = _tree.flatten_params(params)
  leaves = dict(flat)
  slots = _layout.match(what, groups, _layout.param_names(what, names, mapping, groups, tensors),
                        {p: np.shape(x) for p, x in flat}, mapping)
  read = {s.path: _read_state(what, s, sd["state"].get(s.index), hypers[s.group]["amsgrad"],
                              leaves[s.path]) for s in slots}
  _check_steps(what, slots, read)

  factory = _alias.adamw if decoupled else _alias.adam
  if len(groups) == 1:
    tx = factory(**hypers[0])
  else:
    group_of = {s.path: f"group{s.group}" for s in slots}
    tx = _groups.param_groups({f"group{i}": h for i, h in enumerate(hypers)},
                              labels=treedef.unflatten([group_of[p] for p, _ in flat]),
                              optimizer=factory)
  opt_state = jax.tree.map(lambda s: _filled(s, read), tx.init(_tree.unbox_all(params)),
                           is_leaf=lambda x: isinstance(x, _core.ScaleByAdamState))
  _CONFIGS[tx.init] = _Config(
      tuple({k: v for k, v in g.items() if k != "initial_lr"} for g in groups), tuple(slots))
  return tx, opt_state


# --------------------------------------------------------------------------
# JAX -> torch
# --------------------------------------------------------------------------

def _entries(what: str, opt_state) -> tuple[list[str], dict[str, tuple]]:
  """Leaf paths in tree order, and path -> (count, mu, nu, nu_max) from every ScaleByAdamState."""
  states = _adam_states(_tree.unbox_all(opt_state))
  if not states:
    raise ValueError(f"{what}: the optimizer state holds no adamw_jax ScaleByAdamState (it is "
                     "not the state of adamw, adam, scale_by_adam or param_groups).")
  order = [p for p, _ in _leaf_paths(states[0].mu)]
  out: dict[str, tuple] = {}
  for s in states:
    cols: list[Any] = [dict(_leaf_paths(t)) if t is not None else None
                       for t in (s.mu, s.nu, s.nu_max)]
    for path, m in cols[0].items():
      if _is_masked(m):
        continue
      if path in out:
        raise ValueError(f"{what}: the leaf {path!r} has Adam state in two places of the "
                         "optimizer state; a torch optimizer keeps one per parameter.")
      out[path] = (int(s.count), np.asarray(m), np.asarray(cols[1][path]),
                   None if cols[2] is None else np.asarray(cols[2][path]))
  return order, out


def to_torch_state_dict(
    tx_or_optimizer: Any,
    opt_state: Any,
    *,
    names: Any = None,
    mapping: Optional[Mapper] = None,
) -> dict:
  """The ``state_dict()`` of a torch AdamW / Adam that continues a JAX run.

  .. code-block:: python

     optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-2)
     optimizer.load_state_dict(adamw_jax.to_torch_state_dict(optimizer, opt_state))

  >>> import torch, jax.numpy as jnp, adamw_jax
  >>> params = {"w": jnp.ones(3)}
  >>> tx = adamw_jax.adamw(learning_rate=0.1)
  >>> _, opt_state = tx.update({"w": jnp.ones(3)}, tx.init(params), params)
  >>> optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.ones(3))], lr=0.1)
  >>> state_dict = adamw_jax.to_torch_state_dict(optimizer, opt_state)
  >>> optimizer.load_state_dict(state_dict)
  >>> optimizer.state_dict()["state"][0]["step"], optimizer.state_dict()["state"][0]["exp_avg"]
  (tensor(1.), tensor([0.1000, 0.1000, 0.1000]))

  Args:
    tx_or_optimizer: the torch optimizer that is to continue (its param groups
      give the hyperparameters and group membership; `names` and `mapping`
      say which leaf is which parameter, as in :func:`from_torch`), or the
      `tx` that :func:`from_torch` returned (everything is known from it).
    opt_state: the state of an adamw_jax transform (``adamw``, ``adam``,
      ``param_groups``, or a chain holding one), or ``nnx.Optimizer.opt_state``.
    names: as in :func:`from_torch` (with a torch optimizer only).
    mapping: as in :func:`from_torch` (with a torch optimizer only).

  Returns:
    A state dict for ``optimizer.load_state_dict``: per parameter ``step``
    (a float32 tensor, as torch keeps it), ``exp_avg``, ``exp_avg_sq`` and,
    with AMSGrad, ``max_exp_avg_sq``, in torch's layout.

  Raises:
    ValueError: when the state does not fit the optimizer: a parameter without
      a leaf or the other way round, another shape, AMSGrad on one side only.
    TypeError: when `tx_or_optimizer` is neither a torch optimizer nor a
      transform made by :func:`from_torch`.
  """
  what = "to_torch_state_dict"
  torch = _torch()
  order, entries = _entries(what, opt_state)
  if isinstance(tx_or_optimizer, torch.optim.Optimizer):
    opt = tx_or_optimizer
    sd, tensors = _read_optimizer(what, opt)
    assert tensors is not None  # an optimizer's
    groups = [dict(g) for g in sd["param_groups"]]
    missing = [p for p in order if p not in entries]
    if missing:
      raise ValueError(f"{what}: the JAX leaf {missing[0]!r} has no Adam state (it is outside "
                       "every adamw_jax transform), but the torch optimizer updates every "
                       "parameter.")
    slots = _layout.match(what, groups, _layout.param_names(what, names, mapping, groups, tensors),
                   {p: entries[p][1].shape for p in order}, mapping)
    shapes = {i: tuple(t.shape) for i, t in zip((s.index for s in slots), tensors)}
  else:
    config = _CONFIGS.get(tx_or_optimizer.init) if callable(
        getattr(tx_or_optimizer, "init", None)) else None
    if config is None:
      raise TypeError(f"{what}: expected the torch optimizer to load the state into, or a "
                      "transform made by adamw_jax.from_torch; got "
                      f"{type(tx_or_optimizer).__name__}.")
    if names is not None or mapping is not None:
      raise ValueError(f"{what}: names= and mapping= go with a torch optimizer; the transform "
                       "from from_torch already knows its parameters.")
    groups = [dict(g) for g in config.param_groups]
    slots = list(config.slots)
    shapes = {}
    for s in slots:
      if s.path not in entries:
        raise ValueError(f"{what}: the optimizer state has no Adam state for the leaf {s.path!r} "
                         f"({s.label()}); is it the state of this transform?")
  state = {}
  for s in slots:
    count, mu, nu, nu_max = entries[s.path]
    amsgrad = bool(groups[s.group][_hyperparams.BY_NAME["amsgrad"].torch])
    if amsgrad != (nu_max is not None):
      raise ValueError(f"{what}: param group {s.group} has amsgrad={amsgrad}, but the JAX state "
                       f"of {s.path!r} {'has no' if amsgrad else 'has a'} nu_max "
                       f"(amsgrad={not amsgrad}).")
    back = _inverse(s.axes)
    arrays = {"exp_avg": mu, "exp_avg_sq": nu, "max_exp_avg_sq": nu_max}
    entry = {"step": torch.tensor(float(count), dtype=torch.float32)}
    for key, x in arrays.items():
      if x is None:
        continue
      x = _permute(x, back)
      if s.index in shapes and x.shape != shapes[s.index]:
        raise ValueError(f"{what}: {s.label()} has shape {shapes[s.index]}, but the JAX state of "
                         f"{s.path!r} gives {key} of shape {x.shape}"
                         + (f" (after axes {back})" if back else "") + ".")
      entry[key] = _to_tensor(x)
    state[s.index] = entry
  return {"state": state, "param_groups": groups}
