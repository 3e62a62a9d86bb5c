"""Leaves of a pytree by '/'-joined path, written independently of adamw_jax._tree."""

from __future__ import annotations

from jax import tree_util as jtu


def _key(k) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def by_path(tree, is_leaf=None) -> dict:
  """Leaves of `tree` keyed by their '/'-joined path."""
  return {
    "/".join(_key(k) for k in path): leaf
    for path, leaf in jtu.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]
  }
