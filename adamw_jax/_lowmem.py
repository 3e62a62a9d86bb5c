"""Low-memory AdamW: the options ``param_rounding`` and ``moment_bits``, their state and its checks.

The options change two things per leaf, each a hook of the one step
(``_core``): how its moments are held (:mod:`adamw_jax._moments`: full
precision, or ``moment_bits=8``/``4`` block-wise quantized for leaves of at
least 4096 elements) and how its parameter is written
(:mod:`adamw_jax._writes`: ``param_rounding="stochastic"`` or ``"kahan"`` for
bfloat16 leaves). :class:`Options` picks the hooks of each leaf; leaves that
use neither get exactly the plain step, native kernel included. With an
option on, the state is a :class:`LowMemoryAdamState`, which also holds the
PRNG key of stochastic rounding and the Kahan compensation buffers;
:func:`check_state` refuses a state made with other options than the
transform's.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from adamw_jax import _hyperparams, _moments, _tree, _writes


class LowMemoryAdamState(NamedTuple):
  """State of ``adamw``/``adam``/``scale_by_adam`` with ``param_rounding`` or ``moment_bits``.

  Attributes:
    count: int32 step count, as :class:`adamw_jax.ScaleByAdamState`'s.
    mu, nu, nu_max: the moments as in ``ScaleByAdamState``; with
      ``moment_bits=8`` or ``4`` a leaf of at least 4096 elements (a multiple
      of the block size) holds a :class:`adamw_jax.QuantizedMoment` instead
      (4-bit: its subclass ``PackedQuantizedMoment``, flat codes two a byte).
    key: with ``param_rounding="stochastic"``: the raw uint32[2] PRNG key of
      the next step's rounding (split once per step), else None.
    compensation: with ``param_rounding="kahan"``: one buffer per leaf, in the
      parameter's dtype for bfloat16/float16 leaves, ``optax.MaskedNode()``
      for the others; else None.
  """

  count: jax.Array  # pyright: ignore[reportIncompatibleMethodOverride]  # shadows tuple.count
  mu: Any
  nu: Any
  nu_max: Any
  key: jax.Array | None
  compensation: Any


@dataclasses.dataclass(frozen=True)
class Options:
  """The low-memory options of one transform, already checked (``_hyperparams``)."""

  param_rounding: str = "nearest"
  rounding_seed: int = 0
  quantization: _moments.Quantization | None = None

  @classmethod
  def of(cls, s: _hyperparams.Settings) -> Options:
    """From a transform's checked settings; None: the default."""
    seed, block, bits = s.rounding_seed, s.moment_block_size, s.moment_bits
    block = _hyperparams.default_block_size(bits) if block is None else int(block)
    return cls(
      s.param_rounding,
      0 if seed is None else int(seed),
      None if bits is None else _moments.Quantization(int(bits), block),
    )

  @property
  def enabled(self) -> bool:
    """Whether the state is a :class:`LowMemoryAdamState` (an option is on)."""
    return self.param_rounding != "nearest" or self.quantization is not None

  @property
  def stochastic(self) -> bool:
    return self.param_rounding == "stochastic"

  @property
  def kahan(self) -> bool:
    return _writes.WRITERS[self.param_rounding].has_buffer

  def writer(self, p) -> _writes.Writer:
    """How the parameter `p` is written (None: no parameter, the direction only)."""
    return _writes.writer(self.param_rounding, None if p is None else _tree.leaf_dtype(p))

  def describe(self) -> str:
    """The options as keyword arguments, for messages."""
    q = self.quantization
    return f"param_rounding={self.param_rounding!r}, " + (
      "moment_bits=None" if q is None else q.options()
    )


def check_leaves(options: Options, params, name: str) -> None:
  """Refuses at ``init`` the leaves an option cannot take: complex, float16 to bf16, split blocks."""
  q = options.quantization
  for path, p in _tree.flatten_params(params)[0]:
    at, dtype = _tree.where(path), _tree.leaf_dtype(p)
    if q is not None and jnp.issubdtype(dtype, jnp.complexfloating):
      raise ValueError(
        f"{name}: moment_bits={q.bits} quantizes real moments; the parameter at {at} is "
        f"{dtype} (keep complex leaves in a param group without moment_bits)"
      )
    if options.stochastic and dtype == jnp.float16:
      raise ValueError(
        f"{name}: param_rounding='stochastic' rounds to bfloat16; the parameter at "
        f"{at} is float16 (use param_rounding='kahan' for float16)"
      )
    if q is not None and q.applies(p):
      _moments.check_shards(p, q.block_size, at, name)


def init_state(options: Options, params, count, mu, nu, nu_max) -> LowMemoryAdamState:
  """The zero state with the options' PRNG key and compensation buffers."""
  key = jax.random.PRNGKey(options.rounding_seed) if options.stochastic else None

  def buffer(p):
    if options.writer(p).has_buffer:
      return _moments.zeros(p, _tree.leaf_dtype(p))
    return optax.MaskedNode()

  compensation = jax.tree.map(buffer, params) if options.kahan else None
  return LowMemoryAdamState(count, mu, nu, nu_max, key, compensation)


def _refuse(name: str, what: str, options: Options) -> ValueError:
  return ValueError(
    f"{name}: the optimizer state {what}, but this transform has {options.describe()}; a "
    "state is read with the options that made it: give the transform its own init's state, "
    "or build it with the state's options"
  )


def check_state(options: Options, state, updates, params, *, amsgrad: bool, name: str) -> None:
  """Refuses a state whose moments, key or buffers were made with other options (at ``update``)."""
  q = options.quantization
  expected = None if q is None else _moments.quantized_leaves(q, updates, name)
  for field in ("mu", "nu") + (("nu_max",) if amsgrad else ()):
    _moments.check_layout(q, getattr(state, field), updates, expected, field, name)
  if not isinstance(state, LowMemoryAdamState):
    return
  if (state.key is None) == options.stochastic:
    made = (
      "has no PRNG key" if state.key is None else "holds a PRNG key (param_rounding='stochastic')"
    )
    raise _refuse(name, made, options)
  if (state.compensation is None) == options.kahan:
    made = (
      "has no compensation buffers"
      if state.compensation is None
      else "holds compensation buffers (param_rounding='kahan')"
    )
    raise _refuse(name, made, options)
  if state.compensation is None or params is None:
    return
  treedef = jax.tree.structure(updates)
  try:
    buffers = treedef.flatten_up_to(state.compensation)
  except (ValueError, TypeError) as e:
    raise ValueError(
      f"{name}: the updates and the optimizer state (compensation) differ in tree structure: {e}"
    ) from None
  paths = [path for path, _ in jax.tree_util.tree_flatten_with_path(updates)[0]]
  for path, b, p in zip(paths, buffers, treedef.flatten_up_to(params)):
    if options.writer(p).has_buffer and isinstance(b, optax.MaskedNode):
      raise ValueError(
        f"{name}: the optimizer state has no compensation buffer for the {_tree.leaf_dtype(p)} "
        f"parameter at {_tree.where(path)}, which param_rounding='kahan' compensates; give "
        "the transform the state its init makes for these parameters"
      )
