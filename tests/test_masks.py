"""decay_mask, describe_mask, and masks of every kind in adamw, adam, add_decayed_weights, masked.

Also runs the recipes of docs/masks.md ("Weight-decay masks and parameter
groups") and checks the tables and messages printed there.
"""

from __future__ import annotations

import contextlib
import doctest
import functools
import io
import re

import equinox as eqx
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import adamw_jax
from adamw_jax import _masks
from tests import docs_pages
from tests.paths import by_path

# --------------------------------------------------------------------------
# Tree kinds
# --------------------------------------------------------------------------


class _LinenNet(nn.Module):
  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(10, 8)(tokens)
    x = nn.LayerNorm()(nn.Dense(8)(x))
    x = nn.RMSNorm()(nn.BatchNorm(use_running_average=True)(x))
    x = nn.Conv(4, (3,))(x)
    return nn.Dense(
      8, kernel_init=nn.with_partitioning(nn.initializers.lecun_normal(), (None, "model"))
    )(x)


_LINEN_EXPECTED = {
  "BatchNorm_0/bias": False,
  "BatchNorm_0/scale": False,
  "Conv_0/bias": False,
  "Conv_0/kernel": True,
  "Dense_0/bias": False,
  "Dense_0/kernel": True,
  "Dense_1/bias": False,
  "Dense_1/kernel": True,
  "Embed_0/embedding": True,
  "LayerNorm_0/bias": False,
  "LayerNorm_0/scale": False,
  "RMSNorm_0/scale": False,
}


@functools.cache
def _linen_params(boxed: bool):
  params = _LinenNet().init(jax.random.key(0), jnp.zeros((2, 5), jnp.int32))["params"]
  return params if boxed else nn.unbox(params)


class _NnxNet(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.embed = nnx.Embed(10, 8, rngs=rngs)
    self.dense = nnx.Linear(8, 8, rngs=rngs)
    self.ln = nnx.LayerNorm(8, rngs=rngs)
    self.bn = nnx.BatchNorm(8, rngs=rngs)
    self.rms = nnx.RMSNorm(8, rngs=rngs)
    self.conv = nnx.Conv(8, 4, (3,), rngs=rngs)
    self.blocks = nnx.List([nnx.Linear(4, 4, rngs=rngs)])

  def __call__(self, tokens):
    x = self.rms(self.bn(self.ln(self.dense(self.embed(tokens))), use_running_average=True))
    return self.blocks[0](self.conv(x))


_NNX_EXPECTED = {
  "blocks/0/bias": False,
  "blocks/0/kernel": True,
  "bn/bias": False,
  "bn/scale": False,
  "conv/bias": False,
  "conv/kernel": True,
  "dense/bias": False,
  "dense/kernel": True,
  "embed/embedding": True,
  "ln/bias": False,
  "ln/scale": False,
  "rms/scale": False,
}


class _EqxNet(eqx.Module):
  linear: eqx.nn.Linear
  norm: eqx.nn.LayerNorm
  embed: eqx.nn.Embedding
  conv: eqx.nn.Conv1d
  mlp: eqx.nn.MLP

  def __init__(self, key):
    k = jax.random.split(key, 4)
    self.linear = eqx.nn.Linear(3, 4, key=k[0])
    self.norm = eqx.nn.LayerNorm(4)
    self.embed = eqx.nn.Embedding(10, 4, key=k[1])
    self.conv = eqx.nn.Conv1d(4, 2, 3, key=k[2])  # bias of shape (2, 1): 2-D, excluded by name
    self.mlp = eqx.nn.MLP(4, 2, 8, 1, key=k[3])


@functools.cache
def _eqx_net() -> _EqxNet:
  return _EqxNet(jax.random.key(0))


@functools.cache
def _eqx_mlp() -> eqx.nn.MLP:
  return eqx.nn.MLP(2, 2, 4, 1, key=jax.random.key(0))


_EQX_EXPECTED = {
  "linear/weight": True,
  "linear/bias": False,
  "norm/weight": False,
  "norm/bias": False,
  "embed/weight": True,
  "conv/weight": True,
  "conv/bias": False,
  "mlp/layers/0/weight": True,
  "mlp/layers/0/bias": False,
  "mlp/layers/1/weight": True,
  "mlp/layers/1/bias": False,
}

_DICT = {
  "embed": {"embedding": jnp.zeros((10, 4))},
  "dense": {"kernel": jnp.zeros((4, 4)), "bias": jnp.zeros(4)},
  "ln": {"scale": jnp.ones(4), "bias": jnp.zeros(4)},
}
_DICT_EXPECTED = {
  "dense/bias": False,
  "dense/kernel": True,
  "embed/embedding": True,
  "ln/bias": False,
  "ln/scale": False,
}

_TREE_KINDS = {
  "nested dict": (lambda: _DICT, _DICT_EXPECTED),
  "linen params": (lambda: _linen_params(boxed=False), _LINEN_EXPECTED),
  "linen FrozenDict": (lambda: flax.core.freeze(_linen_params(boxed=False)), _LINEN_EXPECTED),
  "linen nn.Partitioned boxes": (lambda: _linen_params(boxed=True), _LINEN_EXPECTED),
  "nnx.State": (lambda: nnx.state(_NnxNet(nnx.Rngs(0)), nnx.Param), _NNX_EXPECTED),
  "nnx.State, pure": (
    lambda: nnx.as_pure(nnx.state(_NnxNet(nnx.Rngs(0)), nnx.Param)),
    _NNX_EXPECTED,
  ),
  "list and tuple": (
    lambda: [jnp.zeros((3, 3)), (jnp.zeros(3), {"bias": jnp.zeros((2, 2))})],
    {"0": True, "1/0": False, "1/1/bias": False},
  ),
  "equinox module, filtered": (lambda: eqx.filter(_eqx_net(), eqx.is_array), _EQX_EXPECTED),
  "equinox module, whole": (
    lambda: _eqx_net(),
    {**_EQX_EXPECTED, "mlp/activation": False, "mlp/final_activation": False},
  ),
}


@pytest.mark.parametrize("kind", sorted(_TREE_KINDS))
def test_default_mask_on_each_tree_kind(kind):
  make, expected = _TREE_KINDS[kind]
  params = make()
  mask = adamw_jax.decay_mask(params)
  assert by_path(mask) == expected
  assert all(type(m) is bool for m in jax.tree.leaves(mask))
  assert type(mask) is type(params)


def test_works_on_shapes_only():
  """jax.eval_shape(model.init, ...) gives the same mask, before any parameter is allocated."""
  shapes = jax.eval_shape(lambda: _linen_params(boxed=True))
  assert by_path(adamw_jax.decay_mask(shapes)) == _LINEN_EXPECTED
  assert adamw_jax.describe_mask(shapes, adamw_jax.decay_mask) == adamw_jax.describe_mask(
    _linen_params(boxed=True), adamw_jax.decay_mask
  )


# --------------------------------------------------------------------------
# Rules: include > exclude > ndim
# --------------------------------------------------------------------------

_RULES_PARAMS = {
  "embed": {"embedding": jnp.zeros((10, 4))},
  "dense": {"kernel": jnp.zeros((4, 4)), "bias": jnp.zeros(4)},
  "ln": {"scale": jnp.ones(4), "bias": jnp.zeros(4)},
  "pos": jnp.zeros((3, 4)),
  "gain": jnp.ones(4),
  "temperature": jnp.ones(()),
  "count": jnp.zeros((4, 4), jnp.int32),
}
_D = "dense/kernel embed/embedding pos"  # what the default decays


@pytest.mark.parametrize(
  "kwargs, decayed",
  [
    ({}, _D),
    ({"include": (r"^gain$",)}, _D + " gain"),
    ({"include": r"^gain$"}, _D + " gain"),  # a single string is one rule
    ({"include": re.compile(r"^ga")}, _D + " gain"),
    ({"include": (r"^ln/scale$",)}, _D + " ln/scale"),  # include wins over the default exclude
    ({"include": (r"^pos$",), "exclude": (r"^pos$",)}, _D),  # include wins over exclude
    ({"exclude": (*_masks.DEFAULT_EXCLUDE, r"^embed/")}, "dense/kernel pos"),
    ({"exclude": r"^embed/"}, "dense/kernel pos"),  # replaces the default: 1-D biases still by ndim
    ({"exclude": ()}, _D),
    ({"exclude": (), "min_ndim": 1}, _D + " dense/bias gain ln/bias ln/scale"),
    ({"exclude": (), "min_ndim": 0}, _D + " dense/bias gain ln/bias ln/scale temperature"),
    ({"min_ndim": 1}, _D + " gain"),
    ({"min_ndim": 3}, ""),
    ({"min_ndim": 3, "include": (r"^pos$", r"^gain$")}, "gain pos"),
    ({"include": (r"^temperature$",), "min_ndim": 5}, "temperature"),
  ],
)
def test_rule_order(kwargs, decayed):
  mask = by_path(adamw_jax.decay_mask(_RULES_PARAMS, **kwargs))
  assert sorted(p for p, on in mask.items() if on) == sorted(decayed.split())
  assert mask["count"] is False  # integer leaves are never decayed


def test_default_exclude_is_exported():
  assert adamw_jax.DEFAULT_EXCLUDE is _masks.DEFAULT_EXCLUDE
  matches = lambda path: any(re.search(r, path) for r in adamw_jax.DEFAULT_EXCLUDE)
  for path in (
    "bias",
    "Dense_0/bias",
    "LayerNorm_0/scale",
    "ln/offset",
    "norm/weight",
    "blocks/0/LayerNorm/weight",
    "ln_f/weight",
    "bn1/weight",
    "encoder/layer_norm/weight",
  ):
    assert matches(path), path
  for path in (
    "Dense_0/kernel",
    "Embed_0/embedding",
    "wte/weight",
    "subnet/weight",
    "linear/weight",
    "bias_proj/kernel",
    "scales/kernel",
    "conv/weight",
  ):
    assert not matches(path), path


# --------------------------------------------------------------------------
# Stacked layers
# --------------------------------------------------------------------------

_L = 4
_STACKED = {
  "embed": {"embedding": jnp.zeros((10, 8))},
  "layers": {
    "kernel": jnp.zeros((_L, 8, 8)),
    "bias": jnp.zeros((_L, 8)),
    "scale": jnp.ones((_L, 8)),
    "gain": jnp.ones((_L, 8)),
  },
}


@pytest.mark.parametrize(
  "kwargs, decayed",
  [
    # The names catch stacked biases and scales; the custom (L, d) 'gain' looks 2-D.
    ({}, "embed/embedding layers/kernel layers/gain"),
    ({"stacked_axes": {r"^layers/": 1}}, "embed/embedding layers/kernel"),
    # stacked_axes=1 for everything also makes the (10, 8) embedding count as 1-D.
    ({"stacked_axes": 1}, "layers/kernel"),
    # ndim alone (the optax docs' rule) decays every stacked bias and scale ...
    ({"exclude": ()}, "embed/embedding layers/kernel layers/bias layers/scale layers/gain"),
    # ... unless the stacked axis is discounted.
    ({"exclude": (), "stacked_axes": {r"^layers/": 1}}, "embed/embedding layers/kernel"),
    ({"stacked_axes": {r"^layers/": 1, r"^embed/": 0}}, "embed/embedding layers/kernel"),
    (
      {"stacked_axes": {r"^layers/kernel$": 2, r"^layers/": 1}},
      "embed/embedding",
    ),  # first rule wins
  ],
)
def test_stacked_axes(kwargs, decayed):
  mask = by_path(adamw_jax.decay_mask(_STACKED, **kwargs))
  assert sorted(p for p, on in mask.items() if on) == sorted(decayed.split())


class _ScanBlock(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    x = x + nn.MultiHeadDotProductAttention(num_heads=2)(nn.LayerNorm()(x))
    return x + nn.Dense(x.shape[-1])(nn.gelu(nn.Dense(16)(x))), None


class _ScanModel(nn.Module):
  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(20, 8)(tokens)
    x, _ = nn.scan(_ScanBlock, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)(
      name="layers"
    )(x, None)
    return nn.Dense(20)(x)


class _NnxBlock(nnx.Module):
  def __init__(self, rngs):
    self.norm = nnx.LayerNorm(8, rngs=rngs)
    self.gate = nnx.Param(jnp.ones(8))
    self.proj = nnx.Linear(8, 8, rngs=rngs)


def _nnx_stack():
  @nnx.vmap(in_axes=0, out_axes=0)
  def make(key):
    return _NnxBlock(nnx.Rngs(key))

  return nnx.state(make(jax.random.split(jax.random.key(0), 3)), nnx.Param)


def _eqx_stack():
  keys = jax.random.split(jax.random.key(0), 3)
  return eqx.filter_vmap(
    lambda k: eqx.nn.Sequential([eqx.nn.Linear(8, 8, key=k), eqx.nn.LayerNorm(8)])
  )(keys)


_ATTN = "layers/MultiHeadDotProductAttention_0"
_STACKED_MODELS = {
  # name: (params, stacked_axes, decayed by default, also decayed by ndim alone with stacked_axes)
  "linen nn.scan": (  # shapes only: decay_mask reads paths, shapes and dtypes
    lambda: jax.eval_shape(_ScanModel().init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))[
      "params"
    ],
    {r"^layers/": 1},
    {
      "Dense_0/kernel",
      "Embed_0/embedding",
      "layers/Dense_0/kernel",
      "layers/Dense_1/kernel",
      f"{_ATTN}/key/kernel",
      f"{_ATTN}/out/kernel",
      f"{_ATTN}/query/kernel",
      f"{_ATTN}/value/kernel",
    },
    # Flax's attention biases are (heads, head_dim) matrices: only their name excludes them.
    {f"{_ATTN}/key/bias", f"{_ATTN}/query/bias", f"{_ATTN}/value/bias"},
  ),
  "nnx.vmap": (_nnx_stack, 1, {"proj/kernel"}, set()),
  "equinox filter_vmap": (_eqx_stack, 1, {"layers/0/weight"}, set()),
}


@pytest.mark.parametrize("name", sorted(_STACKED_MODELS))
def test_stacked_models(name):
  make, stacked_axes, decayed, ndim_extra = _STACKED_MODELS[name]
  params = make()
  mask = by_path(adamw_jax.decay_mask(params, stacked_axes=stacked_axes))
  assert {p for p, on in mask.items() if on} == decayed
  ndim_only = by_path(adamw_jax.decay_mask(params, exclude=(), stacked_axes=stacked_axes))
  assert {p for p, on in ndim_only.items() if on} == decayed | ndim_extra
  # Without stacked_axes, ndim alone also decays the stacked biases and norm scales.
  naive = by_path(adamw_jax.decay_mask(params, exclude=()))
  assert {p for p, on in naive.items() if on} > decayed | ndim_extra


# --------------------------------------------------------------------------
# decay_mask errors
# --------------------------------------------------------------------------

_PATHS = re.escape(
  "the parameter paths are 'dense/bias', 'dense/kernel', 'embed/embedding', 'ln/bias', 'ln/scale'"
)


@pytest.mark.parametrize(
  "kwargs, error, message",
  [
    (
      {"include": (r"^dense/kernal$",)},
      ValueError,
      r"^decay_mask: the include rule '\^dense/kernal\$' matches no parameter; "
      + _PATHS
      + r"\. Fix the rule, or pass allow_unmatched=True",
    ),
    (
      {"exclude": (*_masks.DEFAULT_EXCLUDE, r"LayerNorm")},
      ValueError,
      r"^decay_mask: the exclude rule 'LayerNorm' matches no parameter",
    ),
    (
      {"exclude": (r"(^|/)bias$", r"(^|/)Scale$")},
      ValueError,  # a user's rule, even if default-like
      r"^decay_mask: the exclude rule '\(\^\|/\)Scale\$' matches no parameter",
    ),
    (
      {"stacked_axes": {r"^layers/": 1}},
      ValueError,
      r"^decay_mask: the stacked_axes rule '\^layers/' matches no parameter",
    ),
    (
      {"include": (r"^count$",)},
      ValueError,  # integer leaves are not parameters
      r"^decay_mask: the include rule '\^count\$' matches no parameter",
    ),
    (
      {"include": ("dense(",)},
      ValueError,
      r"^decay_mask: the include rule 'dense\(' is not a valid regex: missing \)",
    ),
    ({"include": (1,)}, TypeError, r"^decay_mask: include rules must be regex strings, got int 1"),
    ({"exclude": None}, TypeError, r"^decay_mask: exclude must be a regex string or a sequence"),
    (
      {"stacked_axes": 2},
      ValueError,
      re.escape(
        "decay_mask: 'dense/bias' has shape (4,) (ndim 1), fewer dimensions than its "
        "stacked_axes=2."
      ),
    ),
    (
      {"stacked_axes": {r"^dense/bias$": 2}},
      ValueError,
      r"^decay_mask: 'dense/bias' has shape \(4,\)",
    ),
    (
      {"stacked_axes": -1},
      ValueError,
      r"^decay_mask: stacked_axes must be a non-negative int, got -1",
    ),
    (
      {"stacked_axes": {r"^dense/": 1.0}},
      ValueError,
      r"^decay_mask: stacked_axes\['\^dense/'\] must be a non-negative int, got 1\.0",
    ),
    ({"min_ndim": "2"}, ValueError, r"^decay_mask: min_ndim must be a non-negative int, got '2'"),
    ({"min_ndim": True}, ValueError, r"^decay_mask: min_ndim must be a non-negative int, got True"),
  ],
)
def test_decay_mask_errors(kwargs, error, message):
  params = {**_DICT, "count": jnp.zeros((2, 2), jnp.int32)}
  with pytest.raises(error, match=message):
    adamw_jax.decay_mask(params, **kwargs)


@pytest.mark.parametrize(
  "kwargs",
  [
    {"include": (r"^dense/kernal$",)},
    {"exclude": (*_masks.DEFAULT_EXCLUDE, r"LayerNorm")},
    {"stacked_axes": {r"^layers/": 1}},
  ],
)
def test_allow_unmatched(kwargs):
  assert by_path(adamw_jax.decay_mask(_DICT, allow_unmatched=True, **kwargs)) == _DICT_EXPECTED


def test_default_rules_may_match_nothing():
  # No bias, no norm: the default rules match nothing, which is no error.
  assert adamw_jax.decay_mask({"w": jnp.zeros((2, 2)), "v": jnp.zeros(2)}) == {
    "v": False,
    "w": True,
  }


@pytest.mark.parametrize(
  "function", [_masks.decay_mask, _masks.describe_mask], ids=lambda f: f.__name__
)
def test_docstring_examples_run(function):
  runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
  tests = doctest.DocTestFinder().find(function, function.__name__, globs={})
  assert tests and tests[0].examples
  for test in tests:
    runner.run(test)
  assert runner.summarize(verbose=False).failed == 0


# --------------------------------------------------------------------------
# describe_mask
# --------------------------------------------------------------------------

_TABLE = """\
path             shape    dtype    decayed
---------------  -------  -------  -------
dense/bias       (4,)     float32  no
dense/kernel     (4, 4)   float32  yes
embed/embedding  (10, 4)  float32  yes
ln/bias          (4,)     float32  no
ln/scale         (4,)     float32  no
decayed: 2 tensors, 56 parameters (82.4%); not decayed: 3 tensors, 12 parameters (17.6%)"""


@pytest.mark.parametrize(
  "mask",
  [
    {
      "dense": {"kernel": True, "bias": False},
      "embed": {"embedding": True},
      "ln": {"scale": False, "bias": False},
    },
    {"dense": {"kernel": True, "bias": False}, "embed": True, "ln": False},
    adamw_jax.decay_mask,
    lambda p: jax.tree.map(lambda x: x.ndim > 1, p),
    adamw_jax.decay_mask(_DICT),
  ],
  ids=["full", "prefix", "decay_mask", "callable", "decay_mask tree"],
)
def test_describe_mask_table(mask):
  assert adamw_jax.describe_mask(_DICT, mask) == _TABLE


def test_describe_mask_counts_and_edge_cases():
  params = {
    "w": jnp.zeros((2, 3), jnp.bfloat16),
    "c": jnp.zeros(1, jnp.complex64),
    "s": jnp.zeros(()),
  }
  text = adamw_jax.describe_mask(params, {"w": True, "c": False, "s": False})
  assert text.splitlines()[2:] == [
    "c     (1,)    complex64  no",
    "s     ()      float32    no",
    "w     (2, 3)  bfloat16   yes",
    "decayed: 1 tensor, 6 parameters (75.0%); not decayed: 2 tensors, 2 parameters (25.0%)",
  ]
  assert (
    adamw_jax.describe_mask(jnp.zeros(3), True).splitlines()[2] == "(root)  (3,)   float32  yes"
  )


def test_describe_mask_on_nnx_state_has_no_value_suffix():
  state = nnx.state(_NnxNet(nnx.Rngs(0)), nnx.Param)
  text = adamw_jax.describe_mask(state, adamw_jax.decay_mask)
  rows = {line.split()[0]: line.split()[-1] for line in text.splitlines()[2:-1]}
  assert rows == {p: "yes" if on else "no" for p, on in _NNX_EXPECTED.items()}


@pytest.mark.parametrize(
  "mask, error, message",
  [
    (
      {"dense": True, "embed": True},
      ValueError,
      re.escape(
        "describe_mask: the mask does not match the parameters at the root: the mask has "
        "dict with keys ['dense', 'embed'], the parameters have dict with keys "
        "['dense', 'embed', 'ln']"
      ),
    ),
    (
      {"dense": {"kernel": True}, "embed": True, "ln": False},
      ValueError,
      re.escape(
        "describe_mask: the mask does not match the parameters at 'dense': the mask has "
        "dict with keys ['kernel'], the parameters have dict with keys ['bias', 'kernel']"
      ),
    ),
    (
      {"dense": 1, "embed": True, "ln": False},
      TypeError,
      r"describe_mask: mask leaves must be booleans, got int 1 at 'dense'",
    ),
  ],
)
def test_describe_mask_errors(mask, error, message):
  with pytest.raises(error, match=message):
    adamw_jax.describe_mask(_DICT, mask)


# --------------------------------------------------------------------------
# Masks of every kind in adamw, adam, add_decayed_weights and masked
# --------------------------------------------------------------------------

_WD, _LR = 0.5, 0.1
_TRANSFORMS = {
  "adamw": lambda m: adamw_jax.adamw(_LR, weight_decay=_WD, mask=m),
  "adam": lambda m: adamw_jax.adam(_LR, weight_decay=_WD, mask=m),
  "add_decayed_weights": lambda m: adamw_jax.add_decayed_weights(_WD, mask=m),
  "masked": lambda m: adamw_jax.masked(adamw_jax.add_decayed_weights(_WD), m),
}


def _random_like(params):
  leaves, treedef = jax.tree.flatten(params)
  rng = np.random.default_rng(1)  # NumPy's generator: nothing to compile for each shape
  return treedef.unflatten([jnp.asarray(rng.standard_normal(x.shape), x.dtype) for x in leaves])


_DICT_KINDS = {
  "full tree": lambda p: {
    "dense": {"kernel": True, "bias": False},
    "embed": {"embedding": True},
    "ln": {"scale": False, "bias": False},
  },
  "prefix": lambda p: {"dense": {"kernel": True, "bias": False}, "embed": True, "ln": False},
  "callable": lambda p: lambda q: jax.tree.map(lambda x: x.ndim > 1, q),
  "decay_mask tree": lambda p: adamw_jax.decay_mask(p),
  "decay_mask callable": lambda p: adamw_jax.decay_mask,
  "decay_mask partial": lambda p: functools.partial(
    adamw_jax.decay_mask, include=(r"^dense/kernel$",)
  ),
  "numpy and jax bools": lambda p: {
    "dense": {"kernel": np.bool_(True), "bias": jnp.array(False)},
    "embed": np.True_,
    "ln": False,
  },
}


def _combinations(kinds, adamw_kinds, adam_kinds, cheap=("add_decayed_weights", "masked")):
  """Every kind with the cheap transforms; adamw and adam (each instance costs ~0.7 s of
  compilation, and their masks go through the same code in _core) with the kinds listed."""
  return (
    [(k, t) for k in sorted(kinds) for t in cheap]
    + [(k, "adamw") for k in adamw_kinds]
    + [(k, "adam") for k in adam_kinds]
  )


@pytest.mark.parametrize(
  "kind, transform",
  _combinations(
    _DICT_KINDS, ["full tree", "prefix", "decay_mask callable"], ["prefix", "callable"]
  ),
)
def test_mask_kinds_in_transforms(kind, transform):
  """Zero gradients: only weight decay moves a parameter, so the changed leaves are the decayed ones."""
  params = _random_like(_DICT)
  tx = _TRANSFORMS[transform](_DICT_KINDS[kind](params))
  state = tx.init(params)
  updates, _ = jax.jit(tx.update)(jax.tree.map(jnp.zeros_like, params), state, params)
  moved = {p: bool(np.any(np.asarray(u) != 0)) for p, u in by_path(updates).items()}
  assert moved == _DICT_EXPECTED
  if transform in ("add_decayed_weights", "masked"):
    for p, u in by_path(updates).items():
      np.testing.assert_array_equal(u, _WD * by_path(params)[p] if _DICT_EXPECTED[p] else 0 * u)


_OTHER_TREES = {
  # Mask containers may differ from the params' (dict for FrozenDict / nnx.State) if the keys agree.
  "FrozenDict params, dict mask": (
    lambda: flax.core.freeze(_random_like(_DICT)),
    lambda p: {"dense": {"kernel": True, "bias": False}, "embed": True, "ln": False},
    _DICT_EXPECTED,
  ),
  "dict params, FrozenDict mask": (
    lambda: _random_like(_DICT),
    lambda p: flax.core.freeze(
      {"dense": {"kernel": True, "bias": False}, "embed": True, "ln": False}
    ),
    _DICT_EXPECTED,
  ),
  "linen nn.Partitioned boxes": (
    lambda: {
      "dense": {
        "kernel": nn.Partitioned(jnp.ones((3, 4)), names=(None, "model")),
        "bias": jnp.ones(4),
      }
    },
    adamw_jax.decay_mask,
    {"dense/kernel/value": True, "dense/bias": False},
  ),
  "equinox: whole-model mask, filtered params": (
    lambda: _random_like(eqx.filter(_eqx_mlp(), eqx.is_array)),
    lambda p: adamw_jax.decay_mask(_eqx_mlp()),
    {
      "layers/0/weight": True,
      "layers/0/bias": False,
      "layers/1/weight": True,
      "layers/1/bias": False,
    },
  ),
  "lists and tuples, prefix": (
    lambda: _random_like([jnp.zeros((3, 3)), (jnp.zeros(3), {"bias": jnp.zeros((2, 2))})]),
    lambda p: [True, False],
    {"0": True, "1/0": False, "1/1/bias": False},
  ),
}


@pytest.mark.parametrize(
  "kind, transform",
  _combinations(
    _OTHER_TREES,
    [
      "FrozenDict params, dict mask",
      "linen nn.Partitioned boxes",
      "equinox: whole-model mask, filtered params",
    ],
    [],
    cheap=("masked",),
  ),
)
def test_mask_tree_kinds_in_transforms(kind, transform):
  make_params, make_mask, expected = _OTHER_TREES[kind]
  params = make_params()
  tx = _TRANSFORMS[transform](make_mask(params))
  updates, _ = jax.jit(tx.update)(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
  assert {p: bool(np.any(np.asarray(u) != 0)) for p, u in by_path(updates).items()} == expected


class _NnxSmall(nnx.Module):
  def __init__(self, rngs):
    self.dense = nnx.Linear(4, 4, rngs=rngs)
    self.ln = nnx.LayerNorm(4, rngs=rngs)
    self.embed = nnx.Embed(10, 4, rngs=rngs)

  def __call__(self, tokens):
    return self.ln(self.dense(self.embed(tokens)))


_NNX_KINDS = {
  "decay_mask of nnx.State": lambda s: adamw_jax.decay_mask(s),
  "decay_mask of pure nnx.State": lambda s: adamw_jax.decay_mask(nnx.as_pure(s)),
  "decay_mask callable": lambda s: adamw_jax.decay_mask,
  "nnx.Param(bool) tree, jax-ml/jax#31256": lambda s: jax.tree.map(lambda x: x.ndim > 1, s),
  "callable": lambda s: lambda p: jax.tree.map(lambda x: x.ndim > 1, p),
  "dict prefix": lambda s: {"dense": {"kernel": True, "bias": False}, "embed": True, "ln": False},
}


@pytest.mark.parametrize(
  "kind, transform",
  [
    *_combinations(
      _NNX_KINDS,
      ["decay_mask of nnx.State", "dict prefix", "nnx.Param(bool) tree, jax-ml/jax#31256"],
      ["nnx.Param(bool) tree, jax-ml/jax#31256"],
      cheap=("masked",),
    ),
    ("nnx.Param(bool) tree, jax-ml/jax#31256", "add_decayed_weights"),
  ],
)
def test_mask_kinds_inside_nnx_optimizer(kind, transform):
  model = _NnxSmall(nnx.Rngs(0))
  state = nnx.state(model, nnx.Param)
  before = by_path(nnx.as_pure(jax.tree.map(np.asarray, state)))
  optimizer = nnx.Optimizer(model, _TRANSFORMS[transform](_NNX_KINDS[kind](state)), wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer):
    grads = nnx.grad(lambda m: 0.0 * jnp.sum(m(jnp.arange(3))))(model)
    optimizer.update(model, grads)

  step(model, optimizer)
  after = by_path(nnx.as_pure(nnx.state(model, nnx.Param)))
  moved = {p: bool(np.any(np.asarray(after[p]) != before[p])) for p in after}
  assert moved == _DICT_EXPECTED


def test_decay_mask_of_nnx_state_works_in_optax_too():
  """Our mask (bools in place of nnx.Param) is a prefix of the pure state: optax.adamw accepts it."""
  model = _NnxSmall(nnx.Rngs(0))
  state = nnx.state(model, nnx.Param)
  before = by_path(nnx.as_pure(jax.tree.map(np.asarray, state)))
  optimizer = nnx.Optimizer(
    model, optax.adamw(0.1, weight_decay=0.5, mask=adamw_jax.decay_mask(state)), wrt=nnx.Param
  )

  @nnx.jit
  def step(model, optimizer):
    optimizer.update(model, nnx.grad(lambda m: 0.0 * jnp.sum(m(jnp.arange(3))))(model))

  step(model, optimizer)
  after = by_path(nnx.as_pure(nnx.state(model, nnx.Param)))
  assert {p: bool(np.any(np.asarray(after[p]) != before[p])) for p in after} == _DICT_EXPECTED


@pytest.mark.parametrize(
  "mask, message",
  [
    (
      {"dense": True, "ln": False},
      r"^adamw: the mask does not match the parameters at the root: the mask has dict with keys "
      r"\['dense', 'ln'\], the parameters have State with keys \['dense', 'embed', 'ln'\]\.",
    ),
    (
      {"dense": {"kernel": True}, "embed": True, "ln": False},
      r"^adamw: the mask does not match the parameters at 'dense': the mask has dict with keys "
      r"\['kernel'\], the parameters have dict with keys \['bias', 'kernel'\]\.",
    ),
    (
      lambda p: {"dense": [True, False], "embed": True, "ln": False},
      r"^adamw: the mask does not match the parameters at 'dense': the mask has list with keys "
      r"\['0', '1'\], the parameters have dict with keys \['bias', 'kernel'\]\.",
    ),
  ],
  ids=["root", "dense", "callable"],
)
def test_nnx_mask_mismatch_names_path_and_keys(mask, message):
  model = _NnxSmall(nnx.Rngs(0))
  with pytest.raises(ValueError, match=message):  # at init: nnx.Optimizer calls tx.init
    nnx.Optimizer(model, adamw_jax.adamw(mask=mask), wrt=nnx.Param)
  # The update, given a state from a transform without the mask, says the same.
  optimizer = nnx.Optimizer(model, adamw_jax.adamw(), wrt=nnx.Param)
  optimizer.tx = adamw_jax.adamw(mask=mask)
  grads = nnx.grad(lambda m: jnp.sum(m(jnp.arange(3))))(model)
  with pytest.raises(ValueError, match=message):
    optimizer.update(model, grads)


def test_callable_pytree_mask_is_not_called():
  """An Equinox module of bools is callable (it has __call__) but is a mask, not a function."""
  model = _eqx_mlp()
  params = eqx.filter(model, eqx.is_array)
  mask = adamw_jax.decay_mask(model)
  assert callable(mask)
  tx = adamw_jax.add_decayed_weights(1.0, mask=mask)
  updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
  assert {p: bool(np.any(np.asarray(u) != 0)) for p, u in by_path(updates).items()} == {
    "layers/0/weight": True,
    "layers/0/bias": False,
    "layers/1/weight": True,
    "layers/1/bias": False,
  }


# --------------------------------------------------------------------------
# The recipes of docs/masks.md
# --------------------------------------------------------------------------


def _docs_recipes() -> dict[str, list[docs_pages.Block]]:
  """The page's blocks by subsection title."""
  recipes: dict[str, list[docs_pages.Block]] = {}
  for block in docs_pages.blocks(docs_pages.page("masks.md")):
    if len(block.headings) > 1:
      recipes.setdefault(block.headings[1], []).append(block)
  return recipes


_RECIPE_CHECKS = {
  "Transformer (Flax Linen, scanned layers)": lambda ns: (
    by_path(ns["mask"])["layers/LayerNorm_0/scale"] is False
  ),
  "CNN with BatchNorm (Flax Linen)": lambda ns: bool(jnp.isfinite(ns["loss"])),
  "Flax NNX": lambda ns: bool(jnp.isfinite(ns["loss"])),
}


def test_docs_have_the_three_recipes_and_groups():
  assert set(_docs_recipes()) == {*_RECIPE_CHECKS, "Parameter groups: torch's `param_groups`"}
  # The recipes are every python block of the page (tests/test_docs.py leaves the page to us).
  page = docs_pages.blocks(docs_pages.page("masks.md"))
  recipes = [b for blocks in _docs_recipes().values() for b in blocks]
  assert {b.line for b in page if b.lang == "python"} <= {b.line for b in recipes}


@pytest.mark.parametrize(
  "title", [*sorted(_RECIPE_CHECKS), "Parameter groups: torch's `param_groups`"]
)
def test_docs_recipe(title):
  """Runs the recipe's python blocks; a ```text block right after one is its exact output."""
  blocks = _docs_recipes()[title]
  namespace: dict = {}
  checked = 0
  for i, block in enumerate(blocks):
    if block.lang != "python":
      continue
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
      exec(compile(block.code, block.where, "exec"), namespace)
    if i + 1 < len(blocks) and blocks[i + 1].lang == "text":
      assert out.getvalue().rstrip("\n") == blocks[i + 1].code.rstrip("\n")
      checked += 1
  assert checked >= 1
  if title in _RECIPE_CHECKS:
    assert _RECIPE_CHECKS[title](namespace)
  else:
    _check_docs_groups(namespace)


def _partition(tx, params) -> set[frozenset[str]]:
  """The parameters of each group of a param_groups transform, from where its state is not masked."""
  groups = []
  for inner in tx.init(params).inner_states.values():
    mu = by_path(inner.inner_state.mu, is_leaf=lambda x: isinstance(x, optax.MaskedNode))
    groups.append(frozenset(p for p, m in mu.items() if not isinstance(m, optax.MaskedNode)))
  return set(groups)


def _check_docs_groups(ns):
  """The page's three ways of writing the groups split the same way; its messages are real."""
  params = nnx.as_pure(ns["params"])
  split = _partition(ns["by_rule"], params)
  assert split == {
    frozenset({"layers/0/kernel", "layers/2/kernel"}),
    frozenset({"layers/0/bias", "layers/1/bias", "layers/1/scale", "layers/2/bias"}),
  }
  assert _partition(ns["by_rest"], params) == split
  assert _partition(ns["by_label"], params) == split
  errors = next(
    b.code
    for b in _docs_recipes()["Parameter groups: torch's `param_groups`"]
    if b.lang == "text" and b.code.startswith("ValueError")
  ).splitlines()
  raised = []
  for make in (
    lambda: adamw_jax.param_groups(
      {
        "no_decay": (r"(^|/)bias$", {"weight_decay": 0.0}),
        "norm": (r"^layers/1/", {"learning_rate": 3e-3}),
      },
      rest={},
    ).init(ns["params"]),
    lambda: adamw_jax.param_groups({"no_decay": (r"Bias$", {"weight_decay": 0.0})}, rest={}).init(
      ns["params"]
    ),
    lambda: adamw_jax.describe_mask(
      ns["params"], {"layers": {0: True, 1: {"bias": False}, 2: True}}
    ),
  ):
    with pytest.raises(ValueError) as info:
      make()
    raised.append(f"ValueError: {info.value}")
  assert raised == errors
