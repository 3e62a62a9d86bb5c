"""4-bit codes and their scales on a TPU kernel's tile, laid out as the leaf's rows (``_accel``).

A leaf with 4-bit moments stores its codes two a byte and its scales flat, in block order;
on a TPU those flat arrays come into the kernel as their free views, rows of 128 lanes, which
are not the rows of the leaf's tile. ``Nibbles`` moves them between those views and VMEM
copies laid out as the tile, and splits each byte into its two codes (and joins them back),
with operations Mosaic lowers: strided copies of whole rows, lane rotations, transposes and
exact 0/1 products on the MXU. 8-bit moments' scales take the same layout (any block size).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu


class Nibbles(NamedTuple):
  """A TPU tile of a leaf with 4-bit moments: its flat codes and scales laid out as its rows.

  The leaf's tile is ``(rows, columns)`` (`columns` a multiple of 256, or 128); its codes and
  scales, flat arrays, come as their free views on a TPU, ``(n / 256, 128)`` bytes and
  ``(n / 16384, 128)`` scales (blocks of 128), which are not the tile's rows: code row ``y``
  holds the elements ``256 y ..``, scale row ``y`` the blocks ``128 y ..``. Here they are
  moved to and from VMEM copies laid out as the tile (codes ``(rows, columns)``, one a
  lane; scales ``(rows, max(blocks a row, 128))``) by strided copies of whole 128-lane rows
  and lane rotations, and the bytes split into their two codes (and joined) by products
  with 0/1 (and 16/1) matrices on the MXU: integers below 256, exact.
  """

  rows: int
  columns: int
  block_size: int = 128  # 8-bit moments' flat scales (blocks of any size) take the same layout

  def _spread(self):
    """(even, odd): ``(128, 256)`` matrices placing byte lane ``l``'s codes at ``2 l``, ``2 l + 1``."""
    row = jax.lax.broadcasted_iota(jnp.int32, (128, 256), 0)
    lane = jax.lax.broadcasted_iota(jnp.int32, (128, 256), 1)
    return (lane == 2 * row).astype(jnp.bfloat16), (lane == 2 * row + 1).astype(jnp.bfloat16)

  def _split(self, b):
    """Bytes ``(r, 128)`` -> their codes ``(r, 256)``, the even element's the high nibble."""
    even, odd = self._spread()
    hi = jnp.dot((b >> 4).astype(jnp.bfloat16), even, preferred_element_type=jnp.float32)
    lo = jnp.dot((b & 15).astype(jnp.bfloat16), odd, preferred_element_type=jnp.float32)
    return (hi + lo).astype(jnp.int32)

  def _join(self, u):
    """Codes ``(r, 256)`` -> bytes ``(r, 128)``, ``16 even + odd``."""
    row = jax.lax.broadcasted_iota(jnp.int32, (256, 128), 0)
    lane = jax.lax.broadcasted_iota(jnp.int32, (256, 128), 1)
    weights = jnp.where(row == 2 * lane, 16.0, jnp.where(row == 2 * lane + 1, 1.0, 0.0))
    joined = jnp.dot(
      u.astype(jnp.bfloat16), weights.astype(jnp.bfloat16), preferred_element_type=jnp.float32
    )
    return joined.astype(jnp.int32)

  def unpack(self, packed, wide):
    """Bytes ``(rows * columns / 256, 128)`` -> codes ``(rows, columns)`` (int32 VMEM refs)."""
    rows, columns = self.rows, self.columns
    if columns == 128:  # a byte row holds two rows
      u = self._split(packed[...])
      wide[pl.ds(0, rows // 2, stride=2), :] = u[:, :128]
      wide[pl.ds(1, rows // 2, stride=2), :] = u[:, 128:]
      return
    step = columns // 256

    def one(j, carry):
      wide[:, pl.ds(pl.multiple_of(j * 256, 256), 256)] = self._split(
        packed[pl.ds(j, rows, stride=step), :]
      )
      return carry

    jax.lax.fori_loop(0, step, one, 0)

  def pack(self, wide, packed):
    """`unpack` backwards."""
    rows, columns = self.rows, self.columns
    if columns == 128:
      u = jnp.concatenate(
        [wide[pl.ds(0, rows // 2, stride=2), :], wide[pl.ds(1, rows // 2, stride=2), :]], axis=1
      )
      packed[...] = self._join(u)
      return
    step = columns // 256

    def one(j, carry):
      u = wide[:, pl.ds(pl.multiple_of(j * 256, 256), 256)]
      packed[pl.ds(j, rows, stride=step), :] = self._join(u)
      return carry

    jax.lax.fori_loop(0, step, one, 0)

  def scales_in(self, flat, held):
    """Scales ``(rows * columns / 16384, 128)`` -> ``held[row, block of the row]``.

    A small leaf, one row of fewer than 16384 elements: its scales as one row.
    """
    rows, q = self.rows, self.columns // self.block_size  # blocks a row
    if flat.shape[1] < 128:
      held[:, :q] = flat[...]
      return
    if q >= 128:
      for m in range(q // 128):
        held[:, 128 * m : 128 * (m + 1)] = flat[pl.ds(m, rows, stride=q // 128), :]
      return
    if q == 1:  # rows of one block (a flat leaf): each scale row, transposed, is 128 rows

      def row(y, carry):
        x = jnp.broadcast_to(flat[pl.ds(y, 1), :], (128, 128))
        held[pl.ds(pl.multiple_of(y * 128, 128), 128), :] = jnp.transpose(x)
        return carry

      jax.lax.fori_loop(0, rows // 128, row, 0)
      return
    per = 128 // q  # rows a scale row holds

    def one(t, carry):
      x = pltpu.roll(flat[...], jax.lax.rem(128 - t * q, 128), 1)
      held[pl.ds(t, rows // per, stride=per), :] = x
      return carry

    jax.lax.fori_loop(0, per, one, 0)

  def scales_out(self, held, flat):
    """`scales_in` backwards."""
    rows, q = self.rows, self.columns // self.block_size
    if flat.shape[1] < 128:
      flat[...] = held[:, :q]
      return
    if q >= 128:
      for m in range(q // 128):
        flat[pl.ds(m, rows, stride=q // 128), :] = held[:, 128 * m : 128 * (m + 1)]
      return
    if q == 1:

      def row(y, carry):
        x = jnp.transpose(held[pl.ds(pl.multiple_of(y * 128, 128), 128), :])
        flat[pl.ds(y, 1), :] = x[:1, :]
        return carry

      jax.lax.fori_loop(0, rows // 128, row, 0)
      return
    per = 128 // q
    lane = jax.lax.broadcasted_iota(jnp.int32, flat.shape, 1)

    def one(t, carry):
      x = pltpu.roll(held[pl.ds(t, rows // per, stride=per), :], t * q, 1)
      flat[...] = jnp.where((lane >= t * q) & (lane < (t + 1) * q), x, flat[...])
      return carry

    jax.lax.fori_loop(0, per, one, 0)
