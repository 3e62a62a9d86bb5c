"""The environment switches: every variable adamw_jax reads, read here and nowhere else.

What each one does is written once, in the API reference
([the API reference](api.md), "Environment switches"; ``tests/test_docs.py`` keeps that
table equal to `SWITCHES`). Each is read when a step is traced, so a
change takes effect at the next trace (jitted steps retrace: the value is a
static argument of the compiled step).
"""

from __future__ import annotations

import dataclasses
import os


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


def xla_cpu_multi_output_fusion() -> bool:
  """Whether ``XLA_FLAGS`` switches on XLA:CPU's multi-output fusion (XLA reads it at start-up)."""
  return MULTI_OUTPUT_FUSION_FLAG in os.environ.get(XLA_FLAGS, "")
