"""The float32 master weights of ``param_rounding="remainder"``: read them, or start from them.

A state of ``param_rounding="remainder"`` holds one int16 remainder per
bfloat16 parameter (``LowMemoryAdamState.remainder``); the parameter and its
remainder are the float32 master weight exactly (`adamw_jax._remainder`).
[`master_params`][adamw_jax.master_params] gives the masters (to evaluate, export, or load into a
torch model after ``to_torch_state_dict``); [`split_master`][adamw_jax.split_master] is its
inverse: the bfloat16 parameters of given float32 masters, and the state with
their remainders (to start from float32 weights, or after ``from_torch``).
Both look for every ``LowMemoryAdamState`` with remainders in the optimizer
state (under ``param_groups``, ``masked`` or a chain), each holding the
remainders of its own leaves (``optax.MaskedNode`` for the others).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from adamw_jax import _lowmem, _remainder, _tree


def _has_remainders(x) -> bool:
  return isinstance(x, _lowmem.LowMemoryAdamState) and x.remainder is not None


def _is_state(x) -> bool:
  return isinstance(x, _lowmem.LowMemoryAdamState)


def _remainders(what: str, treedef, paths: list[str], opt_state) -> list[Any]:
  """For each leaf of `treedef` (boxes as leaves, at `paths`): its remainder in `opt_state`, or None."""
  states = [s for s in jax.tree.leaves(opt_state, is_leaf=_is_state) if _has_remainders(s)]
  if not states:
    raise ValueError(
      f"{what}: the optimizer state holds no master remainders: it is not the state of a "
      "transform with param_rounding='remainder'"
    )
  out: list[Any] = [None] * treedef.num_leaves
  for state in states:
    try:
      leaves = treedef.flatten_up_to(state.remainder)
    except (ValueError, TypeError) as e:
      raise ValueError(
        f"{what}: the parameters and the optimizer state's remainders differ in tree structure: {e}"
      ) from None
    for i, r in enumerate(leaves):
      if isinstance(r, optax.MaskedNode):
        continue
      if out[i] is not None:
        raise ValueError(
          f"{what}: the parameter at {_tree.where(paths[i])} has remainders in two places of "
          "the optimizer state; a parameter is written by one transform"
        )
      out[i] = _tree.unbox(r)
  return out


def _check_leaf(what: str, at: str, x, r, dtype, role: str) -> None:
  if _tree.leaf_dtype(x) != dtype:
    raise ValueError(
      f"{what}: the {role} at {at} is {_tree.leaf_dtype(x)}, but the optimizer state holds "
      f"a remainder for it: give the {jnp.dtype(dtype).name} {role}s"
      + (" (the ones the transform updates)" if role == "parameter" else "")
    )
  if np.shape(x) != np.shape(r):
    raise ValueError(
      f"{what}: the {role} at {at} has shape {np.shape(x)}, its remainder {np.shape(r)}"
    )


def master_params(params: Any, opt_state: Any) -> Any:
  """The float32 master weights of a ``param_rounding="remainder"`` run, exactly.

  Each bfloat16 parameter with a remainder in `opt_state` becomes its float32
  master weight, bit for bit: the float32 parameter that float32 AdamW would
  hold (``torch.optim.AdamW`` on float32 parameters, given the same gradients).
  Other leaves are returned as they are. Jittable.

  >>> import jax.numpy as jnp, optax, adamw_jax
  >>> tx = adamw_jax.adamw(1e-3, param_rounding="remainder")
  >>> params = {"w": jnp.ones(2, jnp.bfloat16)}
  >>> updates, state = tx.update({"w": jnp.ones(2)}, tx.init(params), params)
  >>> params = optax.apply_updates(params, updates)
  >>> print(params["w"], adamw_jax.master_params(params, state)["w"])
  [1 1] [0.99899 0.99899]

  Args:
    params: the parameters (bfloat16 where the option writes them), as given
      to ``update``; boxes (``nnx.Param``) are unboxed in the result.
    opt_state: the optimizer state: of ``adamw``/``adam`` with
      ``param_rounding="remainder"``, or of ``param_groups``, a chain or
      ``masked`` holding such states.

  Returns:
    The parameters' tree with float32 masters in place of the bfloat16 leaves
    that have remainders.
  """
  what = "master_params"
  pairs, treedef = _tree.flatten_params(params)
  remainders = _remainders(what, treedef, [p for p, _ in pairs], _tree.unbox_all(opt_state))
  out = []
  for (path, p), r in zip(pairs, remainders):
    if r is None:
      out.append(p)
      continue
    _check_leaf(what, _tree.where(path), p, r, jnp.bfloat16, "parameter")
    out.append(_remainder.combine(p, r))
  return treedef.unflatten(out)


def split_master(master: Any, opt_state: Any) -> tuple[Any, Any]:
  """The bfloat16 parameters of float32 master weights, and `opt_state` with their remainders.

  [`master_params`][adamw_jax.master_params]'s inverse: ``master_params(*split_master(master,
  opt_state))`` is `master` bit for bit. Each leaf with a remainder slot in
  `opt_state` (a bfloat16 parameter of a ``param_rounding="remainder"``
  transform) must be float32 in `master`; it becomes its bfloat16 parameter
  (rounded to nearest, ties away from zero) and its remainder. Other leaves
  are returned as they are. Jittable.

  >>> import jax, jax.numpy as jnp, adamw_jax
  >>> master = {"w": jnp.asarray([0.1, 1 / 3], jnp.float32)}
  >>> tx = adamw_jax.adamw(1e-3, param_rounding="remainder")
  >>> bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), master)
  >>> params, state = adamw_jax.split_master(master, tx.init(bf16))
  >>> print(params["w"], state.remainder["w"])
  [0.100098 0.333984] [-13107 -21845]
  >>> bool((adamw_jax.master_params(params, state)["w"] == master["w"]).all())
  True

  Args:
    master: the float32 master weights, in the parameters' tree.
    opt_state: a state whose remainders say which leaves are split: e.g.
      ``tx.init`` of the bfloat16 parameters, or ``from_torch``'s.

  Returns:
    params: the bfloat16 parameters (other leaves as given).
    opt_state: the state with the remainders of `master` (everything else as given).
  """
  what = "split_master"
  pairs, treedef = _tree.flatten_params(master)
  opt_state = _tree.unbox_all(opt_state)
  remainders = _remainders(what, treedef, [p for p, _ in pairs], opt_state)
  params, new = [], []
  for (path, m), r in zip(pairs, remainders):
    if r is None:
      params.append(m)
      new.append(optax.MaskedNode())
      continue
    _check_leaf(what, _tree.where(path), m, r, jnp.float32, "master")
    b, remainder = _remainder.split(m)
    params.append(b)
    new.append(remainder)

  def replaced(state):
    if not _has_remainders(state):
      return state
    old = treedef.flatten_up_to(state.remainder)
    leaves = [x if isinstance(x, optax.MaskedNode) else r for x, r in zip(old, new)]
    return state._replace(remainder=treedef.unflatten(leaves))

  return treedef.unflatten(params), jax.tree.map(replaced, opt_state, is_leaf=_is_state)
