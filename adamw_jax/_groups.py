"""Parameter groups: torch's ``param_groups`` as ``optax.partition`` over adamw/adam transforms."""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import jax
import optax

from adamw_jax import _alias, _hyperparams, _rules, _tree

Selector = _rules.Patterns | _tree.MaskOrFn
GroupSpec = tuple[Selector, Mapping[str, Any]] | Mapping[str, Any]

_SELECTOR_NAMES = {"params": "the selector"}  # torch's other param-group key, not a hyperparameter
REST = "rest"


def _takes(optimizer: Callable[..., Any], name: str) -> bool:
  """Whether `optimizer` accepts the keyword argument `name` (True if its signature is unknown)."""
  try:
    parameters = inspect.signature(optimizer).parameters
  except (TypeError, ValueError):
    return True
  return name in parameters or any(p.kind == p.VAR_KEYWORD for p in parameters.values())


def _accepted(optimizer: Callable[..., Any]) -> tuple[str, ...]:
  """The hyperparameters a group of `optimizer` may set: the table's, those it takes."""
  return tuple(h.name for h in _hyperparams.per_group() if _takes(optimizer, h.name))


def _listing(optimizer: Callable[..., Any], accepted: Sequence[str]) -> str:
  """The hyperparameters, for messages: those of adamw and adam, then the ones only adamw has."""
  only = [n for n in accepted if _hyperparams.BY_NAME[n].adamw_only]
  common = [n for n in accepted if n not in only]
  text = f"the hyperparameters are {', '.join(common)}."
  if only:
    text += f" {getattr(optimizer, '__name__', 'The optimizer')} also takes {', '.join(only)}."
  return text


def _hint(key: Any, accepted: Sequence[str], optimizer: Callable[..., Any]) -> str:
  """Why `key` is not a hyperparameter here, or what was probably meant."""
  hp = _hyperparams.BY_NAME.get(key) if isinstance(key, str) else None
  if hp is not None and hp.not_per_group:
    return f" ({hp.not_per_group})"
  if hp is not None:
    return f" ({getattr(optimizer, '__name__', 'the optimizer')} does not take it)"
  renamed = {**_hyperparams.torch_renamed(), **_SELECTOR_NAMES}
  if key in renamed:
    return f" (torch's {key!r} is {renamed[key]} here)"
  close = difflib.get_close_matches(str(key), accepted, n=1)
  return f" (did you mean {close[0]!r}?)" if close else ""


def _check_hyperparameters(
  where: str, hyper: Mapping[str, Any], optimizer: Callable[..., Any]
) -> dict[str, Any]:
  if not isinstance(hyper, Mapping):
    raise TypeError(
      f"param_groups: {where}: hyperparameters must be a mapping "
      f"(e.g. {{'weight_decay': 0.0}}), got {type(hyper).__name__}."
    )
  accepted = _accepted(optimizer)
  for key in hyper:
    if key not in accepted:
      raise TypeError(
        f"param_groups: {where}: unknown hyperparameter {key!r}"
        f"{_hint(key, accepted, optimizer)}; {_listing(optimizer, accepted)}"
      )
  return dict(hyper)


def _is_labels_fn(labels) -> bool:
  """A callable ``params -> labels``, not a callable pytree of labels (an Equinox module)."""
  return callable(labels) and not any(isinstance(x, str) for x in jax.tree.leaves(labels))


class _Assigner:
  """Gives each parameter of a tree the name of its group, checking overlaps and misses."""

  def __init__(
    self,
    names: list[str],
    selectors: list[Selector] | None,
    labels: Any,
    rest: bool,
    allow_unmatched: bool,
    allow_overlap: bool,
  ):
    self.names = names
    self.labels = labels
    self.rest = rest
    self.allow_unmatched = allow_unmatched
    self.allow_overlap = allow_overlap
    self.selectors = []
    for name, selector in zip(names, selectors or []):
      if _rules.is_patterns(selector):
        rules = _rules.compile_rules(selector, what=f"param_groups: group {name!r}", role="")
        self.selectors.append((name, rules, None))
      else:
        self.selectors.append((name, None, selector))

  def __call__(self, tree) -> Any:
    leaves, treedef = _tree.flatten_params(tree)
    paths = [path for path, _ in leaves]
    if self.labels is not None:
      return self._from_labels(tree, paths, treedef)
    claims: list[list[str]] = [[] for _ in leaves]
    for name, rules, mask in self.selectors:
      where = f"param_groups: group {name!r}"
      if rules is not None:
        if not self.allow_unmatched:
          _rules.check_all_matched(rules, paths, what=where, role="")
        chosen = [bool(_rules.matching(rules, p)) for p in paths]
      else:
        chosen = [
          bool(f) for _, f in _tree.flatten_params(_tree.resolve_mask(mask, tree, what=where))[0]
        ]
        if not self.allow_unmatched and not any(chosen):
          raise ValueError(
            f"{where} selects no parameter (its mask is False everywhere); the parameter "
            f"paths are {_tree.describe_paths(paths)}. Pass allow_unmatched=True if "
            "that is intended."
          )
      for claim, on in zip(claims, chosen):
        if on:
          claim.append(name)
    out = []
    for path, claim in zip(paths, claims):
      if len(claim) > 1 and not self.allow_overlap:
        raise ValueError(
          f"param_groups: the parameter at {_tree.where(path)} is claimed by groups "
          f"{' and '.join(repr(c) for c in claim)}; make the selectors disjoint, or pass "
          "allow_overlap=True (the group listed first wins)."
        )
      if not claim:
        if not self.rest:
          raise ValueError(
            f"param_groups: the parameter at {_tree.where(path)} belongs to no group; add it "
            "to a group, or pass rest={...} (the hyperparameters of the parameters no group "
            "selects; rest={} for the shared ones)."
          )
        claim.append(REST)
      out.append(claim[0])
    return treedef.unflatten(out)

  def _from_labels(self, tree, paths, treedef) -> Any:
    labels = self.labels(tree) if _is_labels_fn(self.labels) else self.labels

    def leaf_error(label, where):
      return f"labels must be group names, got {type(label).__name__} {label!r} at {where}."

    expanded = _tree.expand_prefix(
      labels,
      tree,
      what="param_groups",
      noun="label tree",
      leaf_ok=lambda x: isinstance(x, Hashable),
      leaf_error=leaf_error,
    )
    out = [label for _, label in _tree.flatten_params(expanded)[0]]
    for path, label in zip(paths, out):
      if label not in self.names:
        raise ValueError(
          f"param_groups: the parameter at {_tree.where(path)} has the label {label!r}, which "
          f"is not a group; the groups are {', '.join(repr(n) for n in self.names)}."
        )
    if not self.allow_unmatched:
      for name in self.names:
        if name not in out:
          raise ValueError(
            f"param_groups: no parameter is labelled {name!r}; the labels used are "
            f"{', '.join(repr(n) for n in self.names if n in out)}. Pass "
            "allow_unmatched=True if that is intended."
          )
    return treedef.unflatten(out)


def param_groups(
  groups: Mapping[str, GroupSpec],
  *,
  labels: Any | Callable[[Any], Any] | None = None,
  rest: Mapping[str, Any] | None = None,
  optimizer: Callable[..., optax.GradientTransformation] = _alias.adamw,
  allow_unmatched: bool = False,
  allow_overlap: bool = False,
  **hyperparameters: Any,
) -> optax.GradientTransformationExtraArgs:
  r"""Different hyperparameters for groups of parameters: torch's ``param_groups`` for optax.

  ``torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params":
  no_decay, "weight_decay": 0.0}], lr=1e-3)`` becomes

  ```python
  tx = adamw_jax.param_groups(
      {"decay": (adamw_jax.decay_mask, {"weight_decay": 0.1}),
       "no_decay": (r"(^|/)(bias|scale)$", {"weight_decay": 0.0})},
      learning_rate=1e-3)
  ```

  >>> import jax.numpy as jnp, adamw_jax
  >>> params = {"dense": {"bias": jnp.zeros(2), "kernel": jnp.ones((2, 2))}}
  >>> tx = adamw_jax.param_groups({"no_decay": (r"bias$", {"weight_decay": 0.0})}, rest={},
  ...                             learning_rate=1e-3, weight_decay=0.1)
  >>> sorted(tx.init(params).inner_states)  # "rest": the parameters no group selects
  ['no_decay', 'rest']

  Each group is an ``optimizer(**hyperparameters, **overrides)`` transform
  (``adamw_jax.adamw`` by default, or ``adamw_jax.adam``) applied to the
  parameters the group selects, through ``optax.partition``; as in torch, each
  parameter gets exactly its group's update, moments and step count, so a run
  matches torch's run with the same groups number for number.

  **Selecting parameters.** Either each group is a pair ``(selector,
  overrides)``, where the selector is

  - a regex string or a sequence of them, over the '/'-joined key path of each
    parameter (``re.search``, as in [`decay_mask`][adamw_jax.decay_mask]): the group
    takes the parameters that any of them matches;
  - a bool mask: a pytree like the params, a prefix of it, or a callable
    ``params -> mask`` such as [`decay_mask`][adamw_jax.decay_mask];

  or ``labels`` is given (a pytree of group names like the params, a prefix of
  it, or a callable ``params -> labels``) and each group is just its overrides
  mapping. Label trees and masks may be built from ``nnx.State``: a
  ``nnx.Param`` around a label counts as the label.

  **Safety.** The groups are assigned each time the transform is initialised
  or traced, from the paths and structure of the tree it is given (at init on
  traced parameters too, as every update assigns them, so that each error
  below is raised by ``init`` already):

  - a rule, or a mask, that selects no parameter is an error, and so is a
    group name that no label carries (``allow_unmatched=True`` allows both);
  - a parameter selected by two groups is an error (``allow_overlap=True``:
    the group listed first in `groups` takes it);
  - a parameter no group selects is an error, unless ``rest`` is given: those
    parameters then form one more group, named ``"rest"``, with the shared
    hyperparameters updated by ``rest`` (``rest={}`` for the shared ones);
  - a label tree that does not match the params names the first mismatching
    path and both trees' keys there; a label that is not a group name names
    its path.

  Args:
    groups: group name -> ``(selector, overrides)``, or -> ``overrides`` with
      ``labels``. Overrides are a mapping of hyperparameter name to value:
      any keyword argument of `optimizer` but ``mask`` (for [`adamw`][adamw_jax.adamw],
      ``learning_rate`` ... ``peak_learning_rate``; torch's ``lr`` is
      ``learning_rate``, ``betas`` is ``b1`` and ``b2``).
    labels: a pytree of group names, or a callable returning one.
    rest: overrides for the parameters no group selects (None: every parameter
      must be selected).
    optimizer: ``adamw_jax.adamw`` (default) or ``adamw_jax.adam``, or any
      factory taking these keyword arguments.
    allow_unmatched: allow rules, masks and labels that select nothing.
    allow_overlap: allow a parameter in several groups; the first one wins.
    **hyperparameters: shared by all groups (torch's optimizer keyword
      arguments), e.g. ``learning_rate=1e-3, weight_decay=0.1``.

  Returns:
    An ``optax.partition`` of one ``optimizer`` per group. Its state is an
    ``optax.PartitionState`` whose ``inner_states[name].inner_state`` is the
    group's [`ScaleByAdamState`][adamw_jax.ScaleByAdamState] (parameters of other groups hold
    ``optax.MaskedNode()``).

  Raises:
    TypeError: an unknown hyperparameter name, or a group given in the wrong form.
    ValueError: an invalid hyperparameter value (naming the group), or, when
      the transform is initialised or updated, the selection errors above.
  """
  if not isinstance(groups, Mapping) or not groups:
    raise TypeError(
      "param_groups: groups must be a non-empty mapping of group name -> "
      "(selector, hyperparameters)."
    )
  shared = _check_hyperparameters("shared hyperparameters", hyperparameters, optimizer)
  names = list(groups)
  if rest is not None and REST in groups:
    raise ValueError(
      f"param_groups: a group is named {REST!r}, the name of the group rest= makes; rename it."
    )
  overrides: dict[str, dict[str, Any]] = {}
  selectors: list[Selector] = []
  for name, spec in groups.items():
    if labels is None:
      if not (isinstance(spec, tuple) and len(spec) == 2):
        raise TypeError(
          f"param_groups: group {name!r} must be a pair (selector, hyperparameters), got "
          f"{type(spec).__name__}; without selectors, pass labels=... and give each group "
          "its hyperparameters only."
        )
      selector, hyper = spec
      selectors.append(selector)
    else:
      if isinstance(spec, tuple):
        raise TypeError(
          f"param_groups: with labels=..., group {name!r} must be a mapping of "
          "hyperparameters, not a (selector, hyperparameters) pair."
        )
      hyper = spec
    overrides[name] = _check_hyperparameters(f"group {name!r}", hyper, optimizer)
  if rest is not None:
    if labels is not None:
      raise ValueError(
        "param_groups: rest= applies to selectors; with labels=..., every "
        "parameter already has a group."
      )
    overrides[REST] = _check_hyperparameters("rest", rest, optimizer)

  transforms = {}
  for name, hyper in overrides.items():
    try:
      transforms[name] = optimizer(**{**shared, **hyper})
    except (TypeError, ValueError) as e:
      raise type(e)(f"param_groups: group {name!r}: {e}") from e

  assign = _Assigner(
    names,
    None if labels is not None else selectors,
    labels,
    rest is not None,
    allow_unmatched,
    allow_overlap,
  )
  tx = optax.partition(transforms, assign)

  def init_fn(params):
    state = tx.init(params)
    # Every update assigns the groups on traced parameters: do so here too, so
    # that a selector reading the parameters' values fails at init, as it would there.
    _tree.trace_like_update(assign, _tree.unbox_all(params))
    return state

  return optax.GradientTransformationExtraArgs(init_fn, tx.update)
