"""The one elementwise Adam/AdamW kernel, in torch's rounding order.

Every public transform (``scale_by_adam``, ``adamw``, ``adam``) calls
`adam_leaf` for each parameter leaf; nothing else in the package writes
the Adam math. The operation order reproduces ``torch.optim.AdamW``'s
single-tensor CPU path (``foreach=False``) operation by operation:

```text
g  <- -g                               if maximize
g  <- fma(wd, p, g)                    Adam's L2 term: grad.add(param, alpha=wd)
p  <- p * (1 - lr*wd)                  AdamW's decoupled decay: param.mul_(...)
m  <- fma(1 - b1, g - m, m)            exp_avg.lerp_(g, 1 - b1)
v  <- fma((1 - b2) * g, g, v * b2)     exp_avg_sq.mul_(b2).addcmul_(g, g, 1 - b2)
vm <- max(vm, v)                       amsgrad
d  <- sqrt(v) / sqrt(1 - b2**t) + eps  (exp_avg_sq.sqrt() / bc2_sqrt).add_(eps)
p  <- p + (s * m) / d                  param.addcdiv_(m, d, value=s), s = -lr / (1 - b1**t)
```

XLA contracts ``a * b + c`` into a fused multiply-add when ``a * b`` is the
first operand of the addition (measured on CPU), so the expressions below are
written in that order where torch fuses and separated by
`adamw_jax._steer.rounded` where it does not; the division by
``sqrt(1 - b2**t)`` is `adamw_jax._steer.divide_by_scalar` (every trick
that steers XLA lives in ``_steer``). Tests in ``tests/test_fidelity.py`` pin
all of this against torch bit for bit. The native CPU kernel (``_native.cc``)
is this kernel's twin, tested bit for bit against it (``tests/test_native.py``).

With the opt-in ``XLA_FLAGS=--xla_backend_extra_options=xla_cpu_use_multi_output_fusion``
the same operations are laid out so that XLA fuses the whole step into one
pass over memory (`_real_kernel`); ``tests/test_one_pass.py`` checks
that the results do not change by a bit.
"""

from __future__ import annotations

from typing import Any, NamedTuple, overload

import jax
import jax.numpy as jnp
import optax
from jax import lax

from adamw_jax import _steer


class Coefficients(NamedTuple):
  """One step's scalars, each rounded to the compute dtype as torch rounds it."""

  one_minus_b1: jax.Array  # lerp weight of exp_avg
  b2: jax.Array
  one_minus_b2: jax.Array
  bc2_sqrt: jax.Array  # sqrt(1 - b2**t)
  eps: jax.Array
  eps_root: jax.Array | None  # eps_root * (1 - b2**t), or None when eps_root == 0
  step_size: jax.Array  # s in p + (s * m) / d


def _real_step(
  grad: jax.Array,
  mu: jax.Array,
  nu: jax.Array,
  nu_max: jax.Array | None,
  param: jax.Array | None,
  c: Coefficients,
  *,
  z: jax.Array,
  maximize: bool,
  l2: jax.Array | None,
  decay: jax.Array | None,
  moments: tuple | None = None,
):
  """The kernel on real arrays of one compute dtype. Returns (out, mu, nu, nu_max).

  `out` is the new parameter when `param` is given, else the step ``(s*m)/d``.
  `z` is the step's `adamw_jax._steer.opaque_zero`, for the steering tricks.
  `moments`: the new ``(mu, nu, nu_max)``, already computed by the native twin
  (``_native``), which leaves only the parameter's step to this kernel.
  """
  dtype = grad.dtype
  c = c._replace(**{f: getattr(c, f).astype(dtype) for f in c._fields if getattr(c, f) is not None})
  if decay is not None:
    decay = decay.astype(dtype)
  if l2 is not None:
    l2 = l2.astype(dtype)
  if moments is None:
    # Hidden from XLA, which would otherwise move the negation into the products
    # and change which multiplication it fuses into an FMA.
    g = _steer.rounded(-grad, z) if maximize else grad
    if l2 is not None:
      assert param is not None  # Adam's L2 term reads the parameter
      g = l2 * param + g
    m = c.one_minus_b1 * (g - mu) + mu
    # Only one product may reach each addition, or XLA picks which one to fuse.
    v = (c.one_minus_b2 * g) * g + _steer.rounded(nu * c.b2, z)
    if nu_max is not None:
      nu_max = jnp.maximum(nu_max, v)
  else:
    m, v, nu_max = moments
  v_used = v if nu_max is None else nu_max
  if c.eps_root is not None:
    v_used = v_used + c.eps_root
  denom = _steer.divide_by_scalar(jnp.sqrt(v_used), c.bc2_sqrt, z) + c.eps
  step = (c.step_size * m) / denom
  if param is None:
    return step, m, v, nu_max
  if decay is not None:
    param = _steer.rounded(param * decay, z)
  return param + step, m, v, nu_max


def _real_kernel(
  grad: jax.Array,
  mu: jax.Array,
  nu: jax.Array,
  nu_max: jax.Array | None,
  param: jax.Array | None,
  c: Coefficients,
  *,
  z: jax.Array,
  maximize: bool,
  l2: jax.Array | None,
  decay: jax.Array | None,
):
  """`_real_step`, laid out for one pass over memory when XLA can fuse it so.

  XLA on CPU emits one loop per output unless multi-output fusion is on. The
  parameter loop then reads the new moments back from memory (40 bytes per
  float32 parameter instead of 28). With multi-output fusion on, the
  parameter's output is recomputed from the inputs instead: its loop and the
  moments' loops become siblings reading the same arrays, which XLA merges
  into one loop writing all outputs. The gradient, the second moment and the
  parameter of the recomputation pass through `rounded`, so that
  common-subexpression elimination cannot merge its products back into the
  moments' loops (every product involves one of the three; hiding fewer
  splits the loop or, with Adam's L2 term, moves an FMA); the values, and so
  the results, are bit for bit the same. Without the flag the recomputation
  would make the parameter loop read the old moments after the moment loops
  overwrote them in place (a copy each), so it is only used with the flag.
  """
  kw: dict[str, Any] = {"z": z, "maximize": maximize, "l2": l2, "decay": decay}
  out, m, v, vm = _real_step(grad, mu, nu, nu_max, param, c, **kw)
  if _steer.multi_output_fusion():  # for a CPU program only

    def recomputed(out, grad, mu, nu, nu_max, param, c, z, decay):
      this = {**kw, "z": z, "decay": decay}  # this trace's values, not the outer step's
      hidden = None if param is None else _steer.rounded(param, z)
      grad, nu = _steer.rounded(grad, z), _steer.rounded(nu, z)
      return _real_step(grad, mu, nu, nu_max, hidden, c, **this)[0]

    args = (out, grad, mu, nu, nu_max, param, c, z, decay)
    shape = jax.ShapeDtypeStruct(out.shape, out.dtype)
    out = _steer.per_platform(recomputed, lambda out, *_: out, *args, out=shape)
  return out, m, v, vm


@overload
def _components(x: jax.Array) -> tuple[jax.Array, jax.Array]: ...
@overload
def _components(x: jax.Array | None) -> tuple[jax.Array | None, jax.Array | None]: ...
def _components(x: jax.Array | None) -> tuple[jax.Array | None, jax.Array | None]:
  """torch's view_as_real: the real and imaginary parts as separate elements."""
  if x is None:
    return (None, None)
  return (jnp.real(x), jnp.imag(x))


def adam_leaf(
  grad: jax.Array,
  mu: jax.Array,
  nu: jax.Array,
  nu_max: jax.Array | None,
  param: jax.Array | None,
  c: Coefficients,
  *,
  z: jax.Array,
  maximize: bool,
  l2: jax.Array | None = None,
  decay: jax.Array | None = None,
  moments: tuple | None = None,
):
  """One leaf's Adam/AdamW step. Returns ``(out, mu, nu, nu_max)``.

  `c` holds the step's scalars (``_scalars.coefficients``); `z` is the step's
  `adamw_jax._steer.opaque_zero`, which the steering tricks OR into bits.

  `out` is the new parameter if `param` is given, else the (unscaled) Adam step.
  The moments come back in their own dtypes and `out` in the dtype of `param`
  (or of `grad`). Complex leaves are processed as (real, imag) pairs.
  `moments`: for a real leaf whose moments the native kernel has already
  updated (in the compute dtype), the new ``(mu, nu, nu_max)``.
  """
  out_dtype = (param if param is not None else grad).dtype
  complex_ = (
    jnp.iscomplexobj(grad)
    or jnp.iscomplexobj(mu)
    or (param is not None and jnp.iscomplexobj(param))
  )
  if moments is not None:
    if complex_:
      raise ValueError("adam_leaf: precomputed moments are for real leaves")
    out, mu_new, nu_new, nu_max_new = _real_step(
      grad, mu, nu, nu_max, param, c, z=z, maximize=maximize, l2=l2, decay=decay, moments=moments
    )
  elif complex_:
    if l2 is not None:
      # torch adds the L2 term in complex arithmetic, before view_as_real.
      assert param is not None  # Adam's L2 term reads the parameter
      grad = (-grad if maximize else grad) + l2 * param
      maximize = False
      l2 = None
    parts = [
      _real_kernel(g, m, v, vm, p, c, z=z, maximize=maximize, l2=l2, decay=decay)
      for g, m, v, vm, p in zip(
        _components(grad), _components(mu), _components(nu), _components(nu_max), _components(param)
      )
    ]
    (out_re, m_re, v_re, vm_re), (out_im, m_im, v_im, vm_im) = parts
    out = lax.complex(out_re, out_im)
    mu_new, nu_new = lax.complex(m_re, m_im), lax.complex(v_re, v_im)
    nu_max_new = None if vm_re is None or vm_im is None else lax.complex(vm_re, vm_im)
  else:
    cdtype = jnp.result_type(*[x for x in (grad, mu, nu, param) if x is not None])
    cast = lambda x: None if x is None else x.astype(cdtype)
    out, mu_new, nu_new, nu_max_new = _real_kernel(
      grad.astype(cdtype),
      mu.astype(cdtype),
      nu.astype(cdtype),
      cast(nu_max),
      cast(param),
      c,
      z=z,
      maximize=maximize,
      l2=l2,
      decay=decay,
    )
  return (
    out.astype(out_dtype),
    mu_new.astype(mu.dtype),
    nu_new.astype(nu.dtype),
    None if nu_max is None or nu_max_new is None else nu_max_new.astype(nu_max.dtype),
  )


def optax_leaf(
  g,
  m,
  v,
  vm,
  p,
  c: Coefficients,
  decay,
  *,
  z: jax.Array,
  maximize: bool,
  decoupled: bool,
  with_params: bool,
  fused: bool,
  moments=None,
):
  """One leaf's result in optax's terms: (update, or new parameter if `fused`, m, v, vm).

  The update is ``new_param - param`` with the parameters (`with_params`),
  else the step itself; `fused` adds it to the parameter as
  ``optax.apply_updates`` does.

  `moments`: the new (m, v, vm), already computed by the native kernel.
  """
  out, m, v, vm = adam_leaf(
    g,
    m,
    v,
    vm,
    p if with_params else None,
    c,
    z=z,
    maximize=maximize,
    l2=None if decoupled else decay,
    decay=decay if decoupled else None,
    moments=moments,
  )
  if with_params:
    # torch's new parameter, as an update: exact when new and old parameters
    # are within a factor of two of each other, so p + update lands on it.
    out = out - p
  if fused:
    out = optax.apply_updates(p, out)
  return out, m, v, vm
