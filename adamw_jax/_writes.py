"""How a leaf's new parameter is written: to nearest, stochastically, Kahan-compensated, or exactly.

The one step (``_core``) runs each leaf through one `Writer`, chosen
per leaf by ``param_rounding`` (`writer`): every writer runs the one
kernel (`adamw_jax._kernel`) on the moments as ``_moments`` loaded them
and returns ``(out, mu, nu, nu_max, buffer)``, `out` being the optax update
(or the new parameter in the fused step) and `buffer` the writer's per-leaf
buffer in the state (the field `Writer.buffer` of
``LowMemoryAdamState``: Kahan's compensation, the master's remainder; passed
through by the others).

- `NEAREST`: torch's step in the leaf's own dtype (``optax_leaf``);
- ``"stochastic"``: a bfloat16 leaf's step in float32, written by stochastic
  rounding (`adamw_jax._lowprec.stochastic_round_bf16`) with the leaf's key;
- ``"kahan"``: a bfloat16/float16 leaf's step in float32, its whole change
  added with Kahan compensation (`adamw_jax._lowprec.kahan_write`);
- ``"remainder"``: a bfloat16 leaf and its int16 remainder are a float32
  master (`adamw_jax._remainder`), stepped as a float32 leaf is, and
  split again: the master's trajectory is the float32 one, bit for bit.

A leaf a writer does not write (a float32 leaf with ``"stochastic"``) gets
`NEAREST`, exactly the plain step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from adamw_jax import _kernel, _lowprec, _remainder, _steer


class How(NamedTuple):
  """The step's flags, fixed when it is traced (``_kernel.optax_leaf``'s keywords)."""

  z: jax.Array  # the step's opaque zero (``_steer``)
  maximize: bool
  decoupled: bool
  with_params: bool  # the update is new_param - param (a learning rate and weight decay)
  fused: bool  # out is the new parameter (the fused step)


def _nearest(g, m, v, vm, p, c, decay, buffer, key, how: How):
  del key
  out, m, v, vm = _kernel.optax_leaf(g, m, v, vm, p, c, decay, **how._asdict())
  return out, m, v, vm, buffer


def _in_float32(g, m, v, vm, p, c, decay, how: How):
  """The new parameter and moments in float32, torch's arithmetic on the widened leaf."""
  wide = lambda x: x.astype(jnp.float32)
  return _kernel.adam_leaf(
    wide(g),
    wide(m),
    wide(v),
    None if vm is None else wide(vm),
    wide(p),
    c,
    z=how.z,
    maximize=how.maximize,
    l2=None if how.decoupled else decay,
    decay=decay if how.decoupled else None,
  )


def _stochastic(g, m, v, vm, p, c, decay, buffer, key, how: How):
  new32, m, v, vm = _in_float32(g, m, v, vm, p, c, decay, how)
  new = _lowprec.stochastic_round_bf16(new32, key)
  return (new if how.fused else new - p), m, v, vm, buffer


def _kahan(g, m, v, vm, p, c, decay, buffer, key, how: How):
  del key
  new32, m, v, vm = _in_float32(g, m, v, vm, p, c, decay, how)
  new, buffer = _lowprec.kahan_write(p, buffer, new32 - p.astype(jnp.float32))
  return (new if how.fused else new - p), m, v, vm, buffer


def _remainder_step(g, m, v, vm, p, c, decay, buffer, key, how: How):
  """The float32 master's step, exactly the float32 leaf's (fused: ``p + (new - p)`` as optax)."""
  del key
  wide = lambda x: None if x is None else x.astype(jnp.float32)
  master = _remainder.combine(p, buffer)
  new, m, v, vm = _kernel.optax_leaf(
    wide(g),
    wide(m),
    wide(v),
    wide(vm),
    master,
    c,
    decay,
    z=how.z,
    maximize=how.maximize,
    decoupled=how.decoupled,
    with_params=how.with_params,
    fused=True,  # the new master as optax.apply_updates(master, new - master) makes it
  )
  param, remainder = _remainder.split(jnp.asarray(new))
  if how.fused:
    return param, m, v, vm, remainder
  param = _steer.materialized(param)  # TPU: else recomputed from the new moments (38 B/param)
  # optax lands on `param` (_remainder.update), but for a master just below a power of two
  # stepping across zero to within 2**-15 of it: then the new master has at most 8 significant
  # bits, its remainder is 0, and the master is the parameter optax writes instead, one float32
  # ulp of the old parameter off.
  return _remainder.update(p, param), m, v, vm, remainder


class Writer(NamedTuple):
  """One way of writing a parameter, and what it needs from the step and the state."""

  param_rounding: str
  writes: Callable[[Any], bool]  # the parameter dtypes it writes (the others: NEAREST)
  step: Callable  # (g, m, v, vm, p, c, decay, buffer, key, how) -> (out, m, v, vm, buffer)
  reads_params: bool  # the update needs the parameters, weight decay or not
  uses_key: bool  # a PRNG key per leaf, from the state's key
  has_buffer: bool  # a buffer per leaf in the state, the field `buffer` of LowMemoryAdamState
  computes_in: Any  # the dtype its step is computed in; None: the leaf's own
  buffer: str = "compensation"  # the state's field of its buffers, where `has_buffer`
  buffer_dtype: Any = None  # their dtype; None: the parameter's
  moments_in: Any = None  # the moments' dtype where mu_dtype/nu_dtype are None; None: the leaf's


NEAREST = Writer("nearest", lambda dtype: True, _nearest, False, False, False, None)

WRITERS = {
  "nearest": NEAREST,
  "stochastic": Writer(
    "stochastic",
    lambda dtype: jnp.dtype(dtype) == jnp.bfloat16,
    _stochastic,
    True,
    True,
    False,
    jnp.float32,
  ),
  "kahan": Writer("kahan", _lowprec.is_low_precision, _kahan, True, False, True, jnp.float32),
  "remainder": Writer(
    "remainder",
    lambda dtype: jnp.dtype(dtype) == jnp.bfloat16,
    _remainder_step,
    True,
    False,
    True,
    jnp.float32,
    buffer="remainder",
    buffer_dtype=jnp.int16,
    moments_in=jnp.float32,
  ),
}

BUFFERS = {"compensation": "kahan", "remainder": "remainder"}
"""The state's buffer fields, and the param_rounding each belongs to."""


def writer(param_rounding: str, dtype) -> Writer:
  """The writer of a parameter of `dtype` (None: no parameter, the direction only)."""
  chosen = WRITERS[param_rounding]
  return chosen if dtype is not None and chosen.writes(dtype) else NEAREST
