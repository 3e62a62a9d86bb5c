"""What adamw_jax's Pallas kernels share (``_accel``, ``_accel_random``).

- the interpreter switch: kernels traced while `INTERPRET` is held run in Pallas'
  interpreter (the tests, on a CPU);
- the step's scalars as one float32 vector for a kernel's scalar memory, and back;
- a TPU kernel's limits: the largest float32 tile of its working values, what it may hold in
  VMEM, and the rows of a tile of 8-bit codes;
- a kernel on each device's rows of a leaf on a mesh (:func:`on_mesh`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

from adamw_jax import _env, _kernel

INTERPRET = _env.Flag("interpret")  # held: kernels traced meanwhile run in Pallas' interpreter
TPU_TILE_BYTES = 1 << 20  # the largest float32 tile of a TPU kernel's working values
TPU_VMEM = 64 << 20  # what a TPU kernel may hold in VMEM (v5e and v6e have 128 MiB)
# A TPU kernel's array operands are constrained to HBM: it pipelines its own tiles into VMEM.
# Unconstrained, XLA:TPU's memory-space assignment prefetched whole operands (and slices of
# them) into VMEM ahead of each call, searching slice orders: a step of 8 leaves of 2048x2048
# with 8-bit moments, fused and sharded over 4 chips, compiled in 82 s instead of 2 s, and kept
# 1.2 MiB of temporaries.


def pack_scalars(c: _kernel.Coefficients, decay, z) -> tuple[jax.Array, jax.Array]:
  """The step's scalars as one float32 vector (the coefficients, then the decay) and z."""
  values = [x for x in c if x is not None] + ([] if decay is None else [decay])
  floats = jnp.stack([jnp.asarray(x, jnp.float32) for x in values])
  floats = jnp.pad(floats, (0, 8 - floats.shape[0]))
  return floats, jnp.reshape(z, (1,)).astype(jnp.int32)


def unpack_scalars(floats, eps_root: bool, decayed: bool):
  """`pack_scalars` backwards: (coefficients, decay), those absent None."""
  it = iter(range(8))
  fields = {}
  for name in _kernel.Coefficients._fields:
    fields[name] = None if (name == "eps_root" and not eps_root) else floats[next(it)]
  decay = floats[next(it)] if decayed else None
  return _kernel.Coefficients(**fields), decay


def tile8(rows: int, columns: int) -> int:
  """Rows a TPU tile of 8-bit codes: a divisor of `rows`, a multiple of 32 unless all of them."""
  most = max(1, TPU_TILE_BYTES // (4 * columns))
  for tile in (256, 128, 64, 32):
    if tile <= most and rows % tile == 0:
      return tile
  return rows


def _placement(x, rows: int) -> tuple[Any, tuple[str, ...]] | None:
  """(mesh, the axes a leaf's first axis is split over) for :func:`jax.shard_map`; None: one device.

  Explicit axes: the leaf's own; automatic: every axis of the mesh, if they split its rows
  evenly, else none (``_accel``'s docstring).
  """
  sharding = getattr(jax.typeof(x), "sharding", None)
  mesh = getattr(sharding, "mesh", None)
  if mesh is None or not mesh.shape:  # a mesh of one device is mapped too (`on_mesh`)
    return None
  if all(t == AxisType.Explicit for t in mesh.axis_types):
    assert sharding is not None  # it has a mesh
    spec = tuple(sharding.spec)
    first = spec[0] if spec else None
    axes = () if first is None else ((first,) if isinstance(first, str) else tuple(first))
  else:
    axes = tuple(mesh.axis_names)
  count = math.prod(mesh.shape[a] for a in axes)
  return mesh, (axes if rows % count == 0 else ())


def on_mesh(arrays: dict[str, Any], whole: set[str], takes: Callable, run: Callable) -> Any:
  """A kernel on each device's rows of the leaf ``arrays["g"]`` (`_placement`); None where it
  does not take them.

  `whole`: the keys of the arrays each device takes whole (the scalars); the others, and every
  output, are split along the leaf's first axis. `takes(shape)`: whether the kernel takes a
  device's rows of that shape; `run(arrays, index)`: the kernel on one device's arrays, `index`
  the device's position along the axes that split them (0 where none do).

  A mesh of one device is mapped too: inside :func:`jax.shard_map` Pallas reads the TPU's kind
  (for 1-D blocks: `_accel._codes_view`) from the mesh, not from the host's default device (compiled
  from a CPU host, the CPU).
  """
  g = arrays["g"]
  shape = tuple(g.shape)
  placed = _placement(g, shape[0] if shape else 1)
  if placed is None:
    return run(arrays, 0) if takes(shape) else None
  mesh, axes = placed
  count = math.prod(mesh.shape[a] for a in axes)
  if not takes((shape[0] // count, *shape[1:])):
    return None
  split = P(axes if axes else None)
  in_specs = {k: P() if k in whole else jax.tree.map(lambda _: split, v) for k, v in arrays.items()}
  mapped = jax.shard_map(
    lambda a: run(a, jax.lax.axis_index(axes) if axes else 0),
    mesh=mesh,
    in_specs=(in_specs,),
    out_specs=split,
    axis_names=set(mesh.axis_names),
    check_vma=False,
  )
  return mapped(arrays)
