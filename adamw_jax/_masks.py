"""Weight-decay masks by path rules and ndim: ``decay_mask``, and ``describe_mask`` to read one."""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from adamw_jax import _flat, _rules, _tree

DEFAULT_EXCLUDE: tuple[str, ...] = (
  r"(^|/)bias$",
  r"(^|/)(scale|offset)$",
  r"(?i)(^|/)([^/]*norm[^/]*|(ln|bn|gn)[^/]*)/weight$",
)
"""The rules [`decay_mask`][adamw_jax.decay_mask] excludes by default.

- ``(^|/)bias$``: every bias (Dense, Conv, attention, LayerNorm, BatchNorm, ...);
- ``(^|/)(scale|offset)$``: normalisation scales and offsets of Flax (LayerNorm,
  BatchNorm, RMSNorm, GroupNorm: ``scale``) and Haiku (``offset``);
- ``(?i)(^|/)([^/]*norm[^/]*|(ln|bn|gn)[^/]*)/weight$``: normalisation weights
  under torch-style names (Equinox ``norm/weight``, ported ``ln_f/weight``,
  ``bn1/weight``, ``LayerNorm/weight``).

Kernels and embeddings match none of them. Extend rather than replace:
``exclude=DEFAULT_EXCLUDE + (r"pos_embedding$",)``.
"""

StackedAxes = int | Mapping[_rules.Pattern, int]


def _count(name: str, value: Any, *, what: str) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
    raise ValueError(f"{what}: {name} must be a non-negative int, got {value!r}.")
  return int(value)


def _is_parameter(x: Any) -> bool:
  """A floating-point or complex array (a leaf weight decay can apply to)."""
  return hasattr(x, "dtype") and hasattr(x, "shape") and jnp.issubdtype(x.dtype, jnp.inexact)


def decay_mask(
  params: Any,
  *,
  exclude: _rules.Patterns = DEFAULT_EXCLUDE,
  include: _rules.Patterns = (),
  min_ndim: int = 2,
  stacked_axes: StackedAxes = 0,
  allow_unmatched: bool = False,
) -> Any:
  r"""Which parameters to decay, by path rules and by ndim: a bool pytree like `params`.

  Each parameter has a *path*, the '/'-joined keys from the root to it
  (``"Dense_0/kernel"``, ``"layers/0/attn/query/kernel"``; list and tuple
  indices and Equinox field names count as keys), and an *effective ndim*, its
  ndim minus its stacked axes. The rules combine in this order, first decision
  wins:

  1. a parameter whose path an ``include`` rule matches **is decayed**;
  2. otherwise, one whose path an ``exclude`` rule matches **is not decayed**;
  3. otherwise it **is decayed iff its effective ndim >= min_ndim**.

  A rule matches when ``re.search(rule, path)`` does, so anchor your rules
  (``r"(^|/)pos_emb$"``). Leaves that are not floating-point or complex arrays
  (integers, ``None``, an Equinox module's functions) are never decayed and
  rules ignore them.

  **The default** ([`DEFAULT_EXCLUDE`][adamw_jax.DEFAULT_EXCLUDE], ``min_ndim=2``) is the usual
  transformer recipe: kernels and embeddings are decayed; biases, and the
  scales and offsets of LayerNorm, BatchNorm, RMSNorm and GroupNorm, are not.
  The name rules and the ndim rule agree on ordinary models and each catches
  what the other misses: the names catch a stacked LayerNorm scale of shape
  ``(L, d)`` when ``stacked_axes`` was forgotten; the ndim rule catches a 1-D
  parameter with an unusual name. A sketch, with ``Embed``, ``Dense``
  (``kernel``, ``bias``) and ``LayerNorm`` (``scale``, ``bias``) parameters:

  >>> import jax.numpy as jnp, adamw_jax
  >>> params = {"embed": {"embedding": jnp.zeros((100, 8))},
  ...           "dense": {"kernel": jnp.zeros((8, 8)), "bias": jnp.zeros(8)},
  ...           "ln": {"scale": jnp.ones(8), "bias": jnp.zeros(8)}}
  >>> adamw_jax.decay_mask(params)
  {'dense': {'bias': False, 'kernel': True}, 'embed': {'embedding': True}, 'ln': {'bias': False, 'scale': False}}
  >>> adamw_jax.decay_mask(params, exclude=adamw_jax.DEFAULT_EXCLUDE + (r"^embed/",))["embed"]
  {'embedding': False}
  >>> adamw_jax.decay_mask(params, include=(r"^ln/scale$",))["ln"]
  {'bias': False, 'scale': True}

  **Stacked layers.** Layers stacked along leading axes (``nn.scan``,
  ``nnx.vmap``, ``jax.vmap`` over an init) have a layer axis that is not part
  of the weight: with ``stacked_axes=1`` an ``(L, d_in, d_out)`` kernel counts
  as ndim 2 (decayed) and an ``(L, d)`` bias or scale as ndim 1 (not decayed).
  When only part of the model is stacked, give a mapping from rules to counts;
  a parameter takes the count of the first rule that matches it, 0 if none:

  >>> stacked = {"embed": {"embedding": jnp.zeros((100, 8))},
  ...            "layers": {"kernel": jnp.zeros((4, 8, 8)), "gain": jnp.ones((4, 8))}}
  >>> adamw_jax.decay_mask(stacked, stacked_axes={r"^layers/": 1})
  {'embed': {'embedding': True}, 'layers': {'gain': False, 'kernel': True}}

  **Tree kinds.** Nested dicts, Flax Linen params (``FrozenDict`` too, and
  ``nn.Partitioned`` boxes), ``nnx.State`` (``nnx.state(model, nnx.Param)``),
  lists and tuples, Equinox modules (the whole model or
  ``eqx.filter(model, eqx.is_array)``). The result has the container types of
  `params` with a Python bool in place of each leaf; an ``nnx.Param`` (or a
  Linen box) is replaced by a bool as a whole, so the mask made from
  ``nnx.state(model, nnx.Param)`` is a prefix both of that state and of the
  pure arrays ``nnx.Optimizer`` passes to the transform, and works as the
  ``mask`` of ``adamw_jax.adamw``, ``adamw_jax.masked`` and of optax's own.
  ``decay_mask`` itself (or a ``functools.partial`` of it) may be passed as a
  callable ``mask``.

  Args:
    params: the parameters (only their structure, paths, shapes and dtypes are read).
    include: rules (regex strings or compiled patterns) for parameters to decay
      whatever the other rules say.
    exclude: rules for parameters not to decay. Default [`DEFAULT_EXCLUDE`][adamw_jax.DEFAULT_EXCLUDE].
    min_ndim: parameters with fewer effective dimensions are not decayed.
    stacked_axes: leading axes that stack layers and do not count towards the
      ndim: an int for every parameter, or a mapping ``rule -> int``.
    allow_unmatched: every rule in ``include``, ``exclude`` and ``stacked_axes``
      must match at least one parameter (a rule that matches nothing is usually
      a typo), except the rules of [`DEFAULT_EXCLUDE`][adamw_jax.DEFAULT_EXCLUDE] (a model may have no
      biases). ``True`` lifts the check.

  Returns:
    A pytree like `params` with ``True`` where weight decay applies. For a
    [`FlatParams`][adamw_jax.FlatParams] it decides on the model's tree and returns
    one bool per buffer (an error if a buffer holds both kinds of leaf).

  Raises:
    ValueError: a rule that matches no parameter (naming it and showing the
      paths), an invalid regex, or ``stacked_axes`` larger than a parameter's
      ndim (naming its path).
  """
  what = "decay_mask"
  if isinstance(params, _flat.FlatParams):  # decided on the model's tree, then per buffer
    return params.resolve_mask(
      functools.partial(
        decay_mask,
        exclude=exclude,
        include=include,
        min_ndim=min_ndim,
        stacked_axes=stacked_axes,
        allow_unmatched=allow_unmatched,
      ),
      what=what,
    )
  include_rules = _rules.compile_rules(include, what=what, role="include")
  exclude_rules = _rules.compile_rules(exclude, what=what, role="exclude")
  min_ndim = _count("min_ndim", min_ndim, what=what)
  if isinstance(stacked_axes, Mapping):
    stacked_rules = _rules.compile_rules(tuple(stacked_axes), what=what, role="stacked_axes")
    stacked_counts = tuple(
      _count(f"stacked_axes[{k!r}]", v, what=what) for k, v in stacked_axes.items()
    )
    every = 0
  else:
    stacked_rules, stacked_counts = (), ()
    every = _count("stacked_axes", stacked_axes, what=what)

  leaves, treedef = _tree.flatten_params(params)
  paths = [path for path, leaf in leaves if _is_parameter(leaf)]
  decisions = []
  for path, leaf in leaves:
    if not _is_parameter(leaf):
      decisions.append(False)
      continue
    stacked = next((n for r, n in zip(stacked_rules, stacked_counts) if r.search(path)), every)
    ndim = len(leaf.shape) - stacked
    if ndim < 0:
      raise ValueError(
        f"{what}: '{path}' has shape {tuple(leaf.shape)} (ndim {len(leaf.shape)}), fewer "
        f"dimensions than its stacked_axes={stacked}."
      )
    if _rules.matching(include_rules, path):
      decisions.append(True)
    elif _rules.matching(exclude_rules, path):
      decisions.append(False)
    else:
      decisions.append(ndim >= min_ndim)
  if not allow_unmatched:
    _rules.check_all_matched(include_rules, paths, what=what, role="include")
    _rules.check_all_matched(
      exclude_rules, paths, what=what, role="exclude", exempt=DEFAULT_EXCLUDE
    )
    _rules.check_all_matched(stacked_rules, paths, what=what, role="stacked_axes")
  return treedef.unflatten(decisions)


def _shape_text(shape) -> str:
  return "(" + ", ".join(str(d) for d in shape) + ("," if len(shape) == 1 else "") + ")"


def describe_mask(params: Any, mask: _tree.MaskOrFn) -> str:
  """A table of the parameters, their shapes, dtypes and whether `mask` decays them, with totals.

  `mask` is anything the ``mask`` argument of [`adamw`][adamw_jax.adamw] accepts:
  a bool pytree like `params`, a prefix of it, or a callable ``params -> mask``
  (e.g. [`decay_mask`][adamw_jax.decay_mask]). Returns a string, for ``print``:

  >>> import jax.numpy as jnp, adamw_jax
  >>> params = {"embed": {"embedding": jnp.zeros((100, 8))},
  ...           "dense": {"kernel": jnp.zeros((8, 8)), "bias": jnp.zeros(8)},
  ...           "ln": {"scale": jnp.ones(8), "bias": jnp.zeros(8)}}
  >>> print(adamw_jax.describe_mask(params, adamw_jax.decay_mask))
  path             shape     dtype    decayed
  ---------------  --------  -------  -------
  dense/bias       (8,)      float32  no
  dense/kernel     (8, 8)    float32  yes
  embed/embedding  (100, 8)  float32  yes
  ln/bias          (8,)      float32  no
  ln/scale         (8,)      float32  no
  decayed: 2 tensors, 864 parameters (97.3%); not decayed: 3 tensors, 24 parameters (2.7%)

  Parameter counts are element counts (a complex element counts once). Leaves
  that are not arrays (an Equinox module's functions) are not listed.

  Raises:
    ValueError: the mask does not match the parameters (naming the first
      mismatching path and both trees' keys there).
  """
  resolved = _tree.resolve_mask(mask, params, what="describe_mask")
  leaves, _ = _tree.flatten_params(params)
  flags, _ = _tree.flatten_params(resolved)
  rows = []
  totals = {True: [0, 0], False: [0, 0]}
  for (path, leaf), (_, flag) in zip(leaves, flags):
    if not (hasattr(leaf, "shape") and hasattr(leaf, "dtype")):
      continue
    flag = bool(flag)
    size = math.prod(leaf.shape)
    totals[flag][0] += 1
    totals[flag][1] += size
    rows.append(
      (
        path or "(root)",
        _shape_text(leaf.shape),
        str(np.dtype(leaf.dtype)),
        "yes" if flag else "no",
      )
    )
  header = ("path", "shape", "dtype", "decayed")
  widths = [max(len(r[i]) for r in [*rows, header]) for i in range(4)]
  line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
  total = totals[True][1] + totals[False][1]

  def summary(flag: bool, label: str) -> str:
    n, size = totals[flag]
    share = f" ({100 * size / total:.1f}%)" if total else ""
    return f"{label}: {n} tensor{'s' * (n != 1)}, {size:,} parameter{'s' * (size != 1)}{share}"

  out = [line(header), line(["-" * w for w in widths])]
  out += [line(r) for r in rows]
  out.append(f"{summary(True, 'decayed')}; {summary(False, 'not decayed')}")
  return "\n".join(out)
