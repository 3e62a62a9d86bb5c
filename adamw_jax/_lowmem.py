"""Low-memory AdamW: the options ``param_rounding`` and ``moment_bits``, their state and its checks.

The options change two things per leaf, each a hook of the one step
(``_core``): how its moments are held (:mod:`adamw_jax._moments`: full
precision, or ``moment_bits=8``/``4`` block-wise quantized for leaves of at
least 4096 elements) and how its parameter is written
(:mod:`adamw_jax._writes`: ``param_rounding="stochastic"``, ``"kahan"`` or
``"remainder"`` for bfloat16 leaves). :class:`Options` picks the hooks of each
leaf; leaves that use neither get exactly the plain step, native kernel
included. With an option on, the state is a :class:`LowMemoryAdamState`,
which also holds the PRNG key of stochastic rounding, the Kahan compensation
buffers or the master weights' remainders; :func:`check_state` refuses a
state made with other options than the transform's.
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
    remainder: with ``param_rounding="remainder"``: one int16 array per
      bfloat16 leaf, the low 16 bits of its float32 master weight
      (:func:`adamw_jax.master_params`), ``optax.MaskedNode()`` for the other
      leaves; else None.
  """

  count: jax.Array  # pyright: ignore[reportIncompatibleMethodOverride]  # shadows tuple.count
  mu: Any
  nu: Any
  nu_max: Any
  key: jax.Array | None
  compensation: Any
  remainder: Any = None


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
  def buffer_field(self) -> str | None:
    """The state's field of the writer's per-leaf buffers (``"compensation"``, ...), or None."""
    chosen = _writes.WRITERS[self.param_rounding]
    return chosen.buffer if chosen.has_buffer else None

  def writer(self, p) -> _writes.Writer:
    """How the parameter `p` is written (None: no parameter, the direction only)."""
    return _writes.writer(self.param_rounding, None if p is None else _tree.leaf_dtype(p))

  def describe(self) -> str:
    """The options as keyword arguments, for messages."""
    q = self.quantization
    return f"param_rounding={self.param_rounding!r}, " + (
      "moment_bits=None" if q is None else q.options()
    )


_BFLOAT16_ONLY = {
  "stochastic": "rounds to bfloat16",
  "remainder": "keeps bfloat16 parameters and their float32 masters",
}


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
    if options.param_rounding in _BFLOAT16_ONLY and dtype == jnp.float16:
      raise ValueError(
        f"{name}: param_rounding={options.param_rounding!r} "
        f"{_BFLOAT16_ONLY[options.param_rounding]}; the parameter at {at} is float16 (use "
        "param_rounding='kahan' for float16)"
      )
    if q is not None and q.applies(p):
      _moments.check_shards(p, q.block_size, at, name)


def init_state(options: Options, params, count, mu, nu, nu_max) -> LowMemoryAdamState:
  """The zero state with the options' PRNG key and compensation buffers."""
  key = jax.random.PRNGKey(options.rounding_seed) if options.stochastic else None

  def buffer(p):
    chosen = options.writer(p)
    if chosen.has_buffer:
      return _moments.zeros(p, chosen.buffer_dtype or _tree.leaf_dtype(p))
    return optax.MaskedNode()

  field = options.buffer_field
  buffers = {} if field is None else {field: jax.tree.map(buffer, params)}
  return LowMemoryAdamState(count, mu, nu, nu_max, key, None)._replace(**buffers)


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
  for field, rounding in _writes.BUFFERS.items():
    if (getattr(state, field) is None) == (options.buffer_field == field):
      made = (
        f"has no {_BUFFER_NAMES[field]}"
        if getattr(state, field) is None
        else f"holds {_BUFFER_NAMES[field]} (param_rounding={rounding!r})"
      )
      raise _refuse(name, made, options)
  field = options.buffer_field
  if field is None or params is None:
    return
  treedef = jax.tree.structure(updates)
  try:
    buffers = treedef.flatten_up_to(getattr(state, field))
  except (ValueError, TypeError) as e:
    raise ValueError(
      f"{name}: the updates and the optimizer state ({field}) differ in tree structure: {e}"
    ) from None
  paths = [path for path, _ in jax.tree_util.tree_flatten_with_path(updates)[0]]
  for path, b, p in zip(paths, buffers, treedef.flatten_up_to(params)):
    _check_buffer(options, field, b, p, _tree.where(path), name)


_BUFFER_NAMES = {"compensation": "compensation buffers", "remainder": "master remainders"}


def _check_buffer(options: Options, field: str, b, p, at: str, name: str) -> None:
  """A leaf's buffer is there where the writer keeps one, and only there, in its dtype."""
  chosen, dtype = options.writer(p), _tree.leaf_dtype(p)
  rounding = options.param_rounding
  if chosen.has_buffer and isinstance(b, optax.MaskedNode):
    raise ValueError(
      f"{name}: the optimizer state has no {field} for the {dtype} parameter at {at}, "
      f"which param_rounding={rounding!r} keeps one for; give the transform the state "
      "its init makes for these parameters"
    )
  if not chosen.has_buffer and not isinstance(b, optax.MaskedNode):
    hint = (
      ": it writes bfloat16 parameters (adamw_jax.split_master gives them, with their "
      "remainders, from float32 master weights)"
      if field == "remainder"
      else ""
    )
    raise ValueError(
      f"{name}: the optimizer state holds a {field} for the parameter at {at}, which is "
      f"{dtype}; param_rounding={rounding!r} keeps none for {dtype} parameters{hint}"
    )
  want = jnp.dtype(chosen.buffer_dtype or dtype)
  if chosen.has_buffer and jnp.result_type(b) != want:
    raise ValueError(
      f"{name}: the optimizer state's {field} at {at} is {jnp.result_type(b)}, not the "
      f"{want.name} of param_rounding={rounding!r}"
    )
