"""The switches: every environment variable adamw_jax reads, and the flags held while tracing.

Each variable is read here and nowhere else; a `Flag` is held while a step (or a kernel's body)
is traced.

What each variable does is written once, in the API reference
([the API reference](api.md), "Environment switches"; ``tests/test_docs.py`` keeps that
table equal to `SWITCHES`). Each is read when a step is traced, so a
change takes effect at the next trace (jitted steps retrace: the value is a
static argument of the compiled step).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import os
from collections.abc import Iterator


@dataclasses.dataclass(frozen=True)
class Switch:
  """An on/off variable of adamw_jax's own: ``1`` or ``0``; unset or empty, its default."""

  name: str
  default: bool


NATIVE = Switch("ADAMW_JAX_NATIVE", default=True)
CHECKIFY = Switch("ADAMW_JAX_CHECKIFY", default=False)
SWITCHES = (NATIVE, CHECKIFY)

# XLA's own variable, read (never set) for one flag that changes the CPU kernel's layout.
XLA_FLAGS = "XLA_FLAGS"
MULTI_OUTPUT_FUSION_FLAG = "xla_cpu_use_multi_output_fusion"


def on(switch: Switch) -> bool:
  """Whether `switch` is on now; any value but ``0``, ``1`` or empty is refused, naming it."""
  value = os.environ.get(switch.name, "").strip()
  if not value:
    return switch.default
  if value not in ("0", "1"):
    raise ValueError(
      f"{switch.name}={value!r}: expected 1 (on) or 0 (off); unset means "
      f"{int(switch.default)} (see the API reference, 'Environment switches')"
    )
  return value == "1"


class Flag:
  """A flag held while something is traced: ``with flag.held(): ...``; off elsewhere."""

  def __init__(self, name: str):
    self._var: contextvars.ContextVar[bool] = contextvars.ContextVar(name, default=False)

  def get(self) -> bool:
    return self._var.get()

  @contextlib.contextmanager
  def held(self, value: bool = True) -> Iterator[None]:
    token = self._var.set(value)
    try:
      yield
    finally:
      self._var.reset(token)


def xla_cpu_multi_output_fusion() -> bool:
  """Whether ``XLA_FLAGS`` switches on XLA:CPU's multi-output fusion (XLA reads it at start-up)."""
  return MULTI_OUTPUT_FUSION_FLAG in os.environ.get(XLA_FLAGS, "")
