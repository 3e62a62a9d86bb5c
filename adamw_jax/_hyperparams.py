"""The hyperparameters of adamw, adam and scale_by_adam: one table, and the checks made from it.

:data:`TABLE` declares each hyperparameter once: its name, kind, default,
validation rule, torch's param-group key (or why torch has none), whether it
may be a schedule, and whether :func:`adamw_jax.param_groups` takes it per
group. From it come the checks made when a transform is built (with torch's
wording), the hyperparameters ``param_groups`` accepts, and the param-group
keys ``from_torch`` reads and ``to_torch_state_dict`` writes.
``tests/test_hyperparams.py`` holds every keyword of ``adamw`` and ``adam``
against this table, so that the four cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any, Literal, cast

import jax
import jax.core
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

from adamw_jax import _env

Scalar = float | jax.Array
ScalarOrSchedule = float | jax.Array | Callable[[jax.Array], jax.typing.ArrayLike]
Kind = Literal["number", "flag", "dtype", "mask", "choice"]
Rule = tuple[Callable[[Any], Any], str]
"""``(predicate, what it must be)``; the predicate takes a float or a traced scalar."""

_NON_NEGATIVE: Rule = (lambda x: x >= 0, "must be >= 0")
_UNIT: Rule = (lambda x: (x >= 0) & (x < 1), "must be in [0, 1)")
_POSITIVE: Rule = (lambda x: (x > 0) & (x < math.inf), "must be > 0 and finite")
_SEED: Rule = (lambda x: x == int(x) and 0 <= x < 2**32, "must be an integer in [0, 2**32)")
_BLOCK: Rule = (lambda x: x == int(x) and 1 <= x <= 2**20, "must be an integer in [1, 2**20]")


@dataclasses.dataclass(frozen=True)
class Hyperparameter:
  """One hyperparameter of the Adam-family transforms.

  Attributes:
    name: the keyword argument.
    kind: ``"number"`` (a real scalar, checked by `rule`), ``"flag"`` (a bool,
      taken for its truth value as torch does), ``"dtype"`` (None or a
      floating-point dtype), ``"mask"`` (a weight-decay mask, checked against
      the params) or ``"choice"`` (one of `choices`).
    default: its default in ``adamw`` and ``scale_by_adam``, and in ``adam``
      unless `adam_default` is given.
    label: how errors name an invalid value: torch's wording where torch has one.
    rule: for a number, ``(predicate, what it must be)``.
    schedule: a number that may also be a schedule ``count -> value``,
      evaluated at every step (checked at step 0).
    choices: the values of a choice.
    torch: torch's param-group key, or None where torch has no such setting.
    torch_index: the position in torch's value (``betas[0]`` is ``b1``).
    torch_optional: a torch state dict may lack the key (older torch); it
      then means `default`.
    no_torch: where `torch` is None: why, and what torch does instead.
    adam_default: its default in ``adam``, where that differs (None: `default`).
    adamw_only: only ``adamw`` takes it (``adam`` has no decoupled decay).
    not_per_group: why ``param_groups`` does not take it per group ("": it does).
  """

  name: str
  kind: Kind
  default: Any
  label: str = ""
  rule: Rule | None = None
  schedule: bool = False
  choices: tuple[Any, ...] = ()
  torch: str | None = None
  torch_index: int | None = None
  torch_optional: bool = False
  no_torch: str = ""
  adam_default: Any = None
  adamw_only: bool = False
  not_per_group: str = ""

  def __post_init__(self):
    if not self.label:
      object.__setattr__(self, "label", f"Invalid {self.name}")


TABLE: tuple[Hyperparameter, ...] = (
  Hyperparameter(
    "learning_rate",
    "number",
    1e-3,
    "Invalid learning_rate",
    _NON_NEGATIVE,
    schedule=True,
    torch="lr",
  ),
  Hyperparameter(
    "b1",
    "number",
    0.9,
    "Invalid beta parameter at index 0 (b1)",
    _UNIT,
    torch="betas",
    torch_index=0,
  ),
  Hyperparameter(
    "b2",
    "number",
    0.999,
    "Invalid beta parameter at index 1 (b2)",
    _UNIT,
    torch="betas",
    torch_index=1,
  ),
  Hyperparameter("eps", "number", 1e-8, "Invalid epsilon value (eps)", _NON_NEGATIVE, torch="eps"),
  Hyperparameter(
    "weight_decay",
    "number",
    1e-2,
    "Invalid weight_decay value",
    _NON_NEGATIVE,
    schedule=True,
    torch="weight_decay",
    adam_default=0.0,
  ),
  Hyperparameter("amsgrad", "flag", False, torch="amsgrad"),
  Hyperparameter("maximize", "flag", False, torch="maximize", torch_optional=True),
  Hyperparameter(
    "mask",
    "mask",
    None,
    no_torch="torch leaves parameters undecayed by putting them in a param group with "
    "weight_decay=0 (adamw_jax.param_groups, as from_torch builds it)",
    not_per_group="make a group with weight_decay=0.0 instead of a mask inside a group",
  ),
  Hyperparameter(
    "eps_root",
    "number",
    0.0,
    "Invalid eps_root value",
    _NON_NEGATIVE,
    no_torch="torch adds nothing inside the square root (eps_root=0.0)",
  ),
  Hyperparameter(
    "mu_dtype",
    "dtype",
    None,
    no_torch="torch keeps exp_avg in the parameter's dtype (mu_dtype=None)",
  ),
  Hyperparameter(
    "nu_dtype",
    "dtype",
    None,
    no_torch="torch keeps exp_avg_sq in the parameter's dtype (nu_dtype=None)",
  ),
  Hyperparameter(
    "decay_mode",
    "choice",
    "torch",
    choices=("torch", "paper"),
    adamw_only=True,
    no_torch="torch decays by 1 - lr * weight_decay (decay_mode='torch')",
  ),
  Hyperparameter(
    "peak_learning_rate",
    "number",
    None,
    "Invalid peak_learning_rate",
    _POSITIVE,
    adamw_only=True,
    no_torch="torch's decay does not depend on a peak learning rate (decay_mode='torch')",
  ),
  # Low-memory AdamW (_lowmem): bfloat16 parameter writes and 8-bit or 4-bit moments.
  Hyperparameter(
    "param_rounding",
    "choice",
    "nearest",
    choices=("nearest", "stochastic", "kahan", "remainder"),
    no_torch="torch.optim.AdamW writes parameters rounded to nearest (param_rounding='nearest')",
  ),
  Hyperparameter(
    "rounding_seed",
    "number",
    None,
    "Invalid rounding_seed",
    _SEED,
    no_torch="torch.optim.AdamW draws no random numbers (rounding_seed=None)",
  ),
  Hyperparameter(
    "moment_bits",
    "choice",
    None,
    choices=(None, 8, 4),
    no_torch="torch.optim.AdamW keeps full-precision moments (moment_bits=None)",
  ),
  Hyperparameter(
    "moment_block_size",
    "number",
    None,
    "Invalid moment_block_size",
    _BLOCK,
    no_torch="torch.optim.AdamW does not quantize its moments (moment_block_size=None)",
  ),
)
"""Every hyperparameter, in the order of ``adamw``'s signature."""

BY_NAME: Mapping[str, Hyperparameter] = {h.name: h for h in TABLE}

TORCH_DECOUPLED = "decoupled_weight_decay"
"""torch's param-group key that tells AdamW (True) from Adam (False): a factory, not a value."""

TORCH_IGNORED: tuple[str, ...] = (
  "params",
  "param_names",
  "foreach",
  "fused",
  "capturable",
  "differentiable",
)
"""torch's param-group keys that choose an implementation, not the math, or name the parameters."""


def default(hp: Hyperparameter, factory: str) -> Any:
  """`hp`'s default in the factory named `factory` (``"adamw"``, ``"adam"``, ...)."""
  if factory == "adam" and hp.adam_default is not None:
    return hp.adam_default
  return hp.default


def per_group() -> tuple[Hyperparameter, ...]:
  """The hyperparameters :func:`adamw_jax.param_groups` takes per group (and shared)."""
  return tuple(h for h in TABLE if not h.not_per_group)


def torch_keyed() -> tuple[Hyperparameter, ...]:
  """The hyperparameters a torch param group sets, in the table's order."""
  return tuple(h for h in TABLE if h.torch is not None)


def torch_keys() -> tuple[str, ...]:
  """torch's param-group keys that from_torch reads: the hyperparameters' and AdamW-or-Adam."""
  return (*tuple(dict.fromkeys(cast(str, h.torch) for h in torch_keyed())), TORCH_DECOUPLED)


def torch_renamed() -> dict[str, str]:
  """torch's param-group key -> the names it has here, where they differ (``'lr'``, ``'betas'``)."""
  names: dict[str, list[str]] = {}
  for h in torch_keyed():
    names.setdefault(cast(str, h.torch), []).append(h.name)
  return {key: " and ".join(n) for key, n in names.items() if n != [key]}


# --------------------------------------------------------------------------
# Checks made when a transform is built
# --------------------------------------------------------------------------


def _concrete_scalar(value: Any, hp: Hyperparameter) -> float | None:
  """The value as a float if it is known now, None if it is traced."""
  expected = "a number or a schedule" if hp.schedule else "a number"
  if value is None:
    raise TypeError(f"{hp.label}: expected {expected}, got None")
  if isinstance(value, bool) or (hasattr(value, "dtype") and np.dtype(value.dtype) == np.bool_):
    raise TypeError(f"{hp.label}: expected a number, got the boolean {value!r}")
  if isinstance(value, (int, float, np.integer, np.floating)):
    return float(value)
  if isinstance(value, (np.ndarray, jax.Array)):
    if np.ndim(value) != 0:
      raise ValueError(f"{hp.label}: expected a scalar, got an array of shape {np.shape(value)}")
    if not (jnp.issubdtype(value.dtype, jnp.floating) or jnp.issubdtype(value.dtype, jnp.integer)):
      raise TypeError(f"{hp.label}: expected a real number, got dtype {value.dtype}")
    try:
      return float(value)
    except jax.errors.ConcretizationTypeError:
      return None  # traced, e.g. under optax.inject_hyperparams or jax.grad
  raise TypeError(f"{hp.label}: expected {expected}, got {type(value).__name__}")


def _valid(hp: Hyperparameter, x: Any) -> Any:
  """Whether `x` (a float or a traced scalar) satisfies `hp`'s rule; NaN never does."""
  assert hp.rule is not None  # a number's
  return (
    ~jnp.isnan(x) & hp.rule[0](x)
    if isinstance(x, jax.Array)
    else (not math.isnan(x) and bool(hp.rule[0](x)))
  )


def traced_checks() -> bool:
  """Whether the step carries the checks of traced values (``ADAMW_JAX_CHECKIFY=1``).

  Off by default: a ``checkify.debug_check`` compiles to no operation, but it
  gives the jitted step an effect, and JAX then dispatches every call of it
  through its Python path: a step of a 2,000-leaf tree took 90 ms instead of
  24 ms (this machine). Read when the step is traced.
  """
  return _env.on(_env.CHECKIFY)


def check_traced(
  name: str, value: jax.typing.ArrayLike, context: str = "", *args: jax.Array
) -> None:
  """A check of a value known only inside the trace: a ``checkify.debug_check``.

  Only with ``ADAMW_JAX_CHECKIFY=1`` (:func:`traced_checks`). It then
  compiles to no operation unless the step runs under
  ``jax.experimental.checkify.checkify``, which reports the message; the
  outcome without checkify is in ``docs/bad-inputs.md``. `context` is
  appended to the message, with ``{}`` for each of `args`.
  """
  if not traced_checks():
    return
  hp = BY_NAME[name]
  assert hp.rule is not None  # a number's
  x = jnp.asarray(value)
  checkify.debug_check(
    _valid(hp, x), f"{hp.label}: {{}}{context} ({hp.rule[1]})", x, *(jnp.asarray(a) for a in args)
  )


def _check_schedule(hp: Hyperparameter, schedule: Callable) -> None:
  if not hp.schedule:
    raise TypeError(f"{hp.label}: expected a number, got a callable")
  try:
    first = schedule(jnp.zeros([], jnp.int32))
  except Exception:
    return
  x = _concrete_scalar(first, hp)
  if x is not None and not _valid(hp, x):
    assert hp.rule is not None  # a number's
    raise ValueError(f"{hp.label}: the schedule returns {x} at step 0 ({hp.rule[1]})")


def concrete(name: str, value: Any) -> float | None:
  """A number hyperparameter's value if it is known now: None for a schedule or a traced value."""
  return None if callable(value) else _concrete_scalar(value, BY_NAME[name])


def check(name: str, value: Any) -> None:
  """Raises if a number hyperparameter given as a number (or a schedule, at step 0) is invalid.

  A traced value (``optax.inject_hyperparams``, ``jax.grad`` with respect to
  it) is checked by :func:`check_traced` instead.
  """
  hp = BY_NAME[name]
  if callable(value):
    _check_schedule(hp, value)
    return
  x = _concrete_scalar(value, hp)
  if x is None:
    check_traced(name, value, ", a traced value")
  elif not _valid(hp, x):
    assert hp.rule is not None  # a number's
    raise ValueError(f"{hp.label}: {x} ({hp.rule[1]})")


def check_dtype(name: str, dtype: Any) -> jnp.dtype | None:
  """A moment dtype given by the user: None or a floating or complex dtype."""
  if dtype is None:
    return None
  try:
    dt = jnp.dtype(dtype)
  except TypeError as e:
    raise TypeError(f"{BY_NAME[name].label}: {dtype!r} is not a dtype") from e
  if not jnp.issubdtype(dt, jnp.inexact):
    raise ValueError(f"{BY_NAME[name].label}: {dt} (must be a floating-point dtype)")
  return dt


def _check_decay_mode(what: str, values: Mapping[str, Any], decoupled: bool) -> None:
  """Raises if `decay_mode` and `peak_learning_rate` do not fit the transform."""
  hp = BY_NAME["decay_mode"]
  mode = values.get("decay_mode", hp.default)
  peak, lr = values.get("peak_learning_rate"), values.get("learning_rate")
  if not isinstance(mode, str) or mode not in hp.choices:
    raise ValueError(
      f"{what}: {hp.label}: {mode!r} (must be {' or '.join(repr(c) for c in hp.choices)})"
    )
  if mode == "torch":
    if peak is not None:
      raise ValueError(
        f"{what}: peak_learning_rate is only used with decay_mode='paper' "
        "(torch's decay is 1 - lr_t * weight_decay, whatever the peak)"
      )
    return
  if not decoupled or lr is None:
    raise ValueError(
      f"{what}: decay_mode='paper' is for decoupled weight decay with a learning "
      "rate (adamw); Adam's L2 term and scale_by_adam have no decay to rescale"
    )
  if peak is None and callable(lr):
    raise ValueError(
      f"{what}: decay_mode='paper' with a learning-rate schedule needs "
      "peak_learning_rate (the schedule's maximum, the paper's alpha): the decay "
      "is 1 - (lr_t / peak_learning_rate) * weight_decay"
    )


def checked(
  what: str, *, decoupled: bool, optional: tuple[str, ...] = (), **values: Any
) -> dict[str, Any]:
  """`values` (keyword arguments of one transform) checked: dtypes and flags normalised.

  A number that defaults to None may be None (not given), and so may the ones
  named in `optional` (``learning_rate`` of ``scale_by_adam``, which has none);
  any other None is refused. Raises ValueError or TypeError naming the
  hyperparameter, with torch's wording where torch has one.
  """
  out = dict(values)
  for name, value in values.items():
    hp = BY_NAME[name]
    if hp.kind == "number" and not (value is None and (hp.default is None or name in optional)):
      check(name, value)
    elif hp.kind == "dtype":
      out[name] = check_dtype(name, value)
    elif hp.kind == "flag":
      out[name] = bool(value)  # its truth value, as torch takes it
  _check_decay_mode(what, values, decoupled)
  _check_low_memory(what, out)
  return out


def is_number(value: Any) -> bool:
  """Whether `value` is a Python or NumPy number (known now, not traced, not a schedule)."""
  return isinstance(value, (int, float, np.floating, np.integer))


def is_zero(value: Any) -> bool:
  """Whether `value` is a number equal to 0 (a schedule or a traced value never is)."""
  return is_number(value) and float(value) == 0.0


@dataclasses.dataclass(frozen=True)
class Settings:
  """One transform's hyperparameters, checked: everything ``_core.adam_transform`` builds from.

  Made by :meth:`of` from the factory's keyword arguments; those not given
  take :data:`TABLE`'s default. The fields after `direction_only` are the
  table's, in its order (``tests/test_hyperparams.py`` holds them together).

  Attributes:
    name: the factory (``"adamw"``, ``"adam"``, ``"scale_by_adam"``), which
      error messages name.
    decoupled: AdamW's ``p * (1 - lr*wd)``, else Adam's L2 term ``g + wd*p``.
    direction_only: the bias-corrected Adam direction without a learning rate
      (``scale_by_adam``), not ``new_param - param``.
  """

  name: str
  decoupled: bool
  direction_only: bool
  learning_rate: ScalarOrSchedule | None
  b1: Scalar
  b2: Scalar
  eps: Scalar
  weight_decay: ScalarOrSchedule
  amsgrad: bool
  maximize: bool
  mask: Any
  eps_root: Scalar
  mu_dtype: jnp.dtype | None
  nu_dtype: jnp.dtype | None
  decay_mode: str
  peak_learning_rate: Scalar | None
  param_rounding: str
  rounding_seed: int | None
  moment_bits: int | None
  moment_block_size: int | None

  @classmethod
  def of(
    cls, name: str, *, decoupled: bool, direction_only: bool = False, **values: Any
  ) -> Settings:
    """The checked settings of the factory `name` given the keyword arguments `values`.

    Raises ValueError or TypeError for an invalid value (:func:`checked`).
    """
    given = checked(
      name, decoupled=decoupled, optional=("learning_rate",) if direction_only else (), **values
    )
    return cls(
      name=name,
      decoupled=decoupled,
      direction_only=direction_only,
      **{h.name: given.get(h.name, default(h, name)) for h in TABLE},
    )

  @property
  def needs_params(self) -> bool:
    """Whether the step reads the parameters (any weight decay)."""
    return not is_zero(self.weight_decay)


def _is_choice(value: Any, choices: tuple[Any, ...]) -> bool:
  """`value` is one of `choices`: None by identity, no bool standing for an int."""
  if value is None or isinstance(value, bool):
    return value is None and None in choices
  return any(c is not None and type(c) is type(value) and c == value for c in choices) or (
    isinstance(value, np.integer) and int(value) in choices
  )


LAYOUT = ("moment_bits", "moment_block_size", "rounding_seed")
"""Low-memory options that fix the state's layout: Python values, never traced."""

DEFAULT_BLOCK_SIZE = 256  # torchao's AdamW8bit
DEFAULT_BLOCK_SIZE_4BIT = 128  # torchao's AdamW4bit


def default_block_size(bits: int | None) -> int:
  """torchao's default ``block_size`` for `bits`-bit moments (AdamW8bit's 256, AdamW4bit's 128)."""
  return DEFAULT_BLOCK_SIZE_4BIT if bits == 4 else DEFAULT_BLOCK_SIZE


def _static_ints(what: str, out: dict[str, Any]) -> None:
  """The layout options as Python ints (None stays None); refuses traced values."""
  for name in LAYOUT:
    value = out.get(name)
    if isinstance(value, jax.core.Tracer):
      raise TypeError(
        f"{what}: {name} fixes the optimizer state's layout and cannot be traced; "
        f"with optax.inject_hyperparams pass static_args=({name!r},)"
      )
    if (
      isinstance(value, (np.ndarray, jax.Array, np.integer))
      and np.ndim(value) == 0
      and (np.issubdtype(np.asarray(value).dtype, np.integer))
    ):
      out[name] = int(value)


def _check_low_memory(what: str, values: dict[str, Any]) -> None:
  """Raises if the low-memory options (``param_rounding``, ``moment_bits``) do not fit together."""
  _static_ints(what, values)
  for name in ("param_rounding", "moment_bits"):
    hp = BY_NAME[name]
    value = values.get(name, hp.default)
    if not _is_choice(value, hp.choices):
      raise ValueError(
        f"{what}: {hp.label}: {value!r} (must be {' or '.join(repr(c) for c in hp.choices)})"
      )
  rounding = values.get("param_rounding", "nearest")
  bits = values.get("moment_bits")
  if rounding != "stochastic" and values.get("rounding_seed") is not None:
    raise ValueError(
      f"{what}: rounding_seed is only used with param_rounding='stochastic' "
      f"(param_rounding={rounding!r} draws no random numbers)"
    )
  if rounding != "nearest" and values.get("learning_rate") is None:
    raise ValueError(
      f"{what}: param_rounding={rounding!r} rounds the parameter's write; "
      "scale_by_adam returns a direction and writes no parameter"
    )
  if bits is None and values.get("moment_block_size") is not None:
    raise ValueError(f"{what}: moment_block_size is only used with moment_bits=8 or 4")
  block = values.get("moment_block_size")
  if bits == 4 and block is not None and int(block) % 2:
    raise ValueError(
      f"{what}: moment_bits=4 packs two codes a byte within a block; "
      f"moment_block_size={block} must be even"
    )
  if bits is not None:
    for name in ("mu_dtype", "nu_dtype"):
      if values.get(name) is not None:
        raise ValueError(
          f"{what}: moment_bits={bits} stores the moments quantized (float32 "
          f"to compute); {name}={values[name]} cannot be used with it"
        )
