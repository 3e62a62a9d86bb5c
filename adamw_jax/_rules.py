"""Path rules: regular expressions over the '/'-joined key path of each parameter.

Shared by [`decay_mask`][adamw_jax.decay_mask] and [`param_groups`][adamw_jax.param_groups]. A
rule matches a parameter when ``re.search(rule, path)`` finds a match, so
anchor rules (``r"(^|/)bias$"``) to avoid matching inside other names. A rule
that matches no parameter is almost always a typo or a renamed module, so
`check_all_matched` makes it an error.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import TypeGuard

from adamw_jax import _tree

Pattern = str | re.Pattern[str]
Patterns = Pattern | Sequence[Pattern]


def is_patterns(value) -> TypeGuard[Patterns]:
  """Whether `value` is a rule or a non-empty sequence of rules (strings or compiled regexes)."""
  if isinstance(value, (str, re.Pattern)):
    return True
  return (
    isinstance(value, (list, tuple))
    and len(value) > 0
    and all(isinstance(v, (str, re.Pattern)) for v in value)
  )


def compile_rules(rules: Patterns, *, what: str, role: str) -> tuple[re.Pattern[str], ...]:
  """`rules` (one pattern or a sequence of them) compiled; a bad pattern raises naming it.

  A single string is one rule (not a sequence of one-character rules).
  """
  if isinstance(rules, (str, re.Pattern)):
    rules = (rules,)
  if not isinstance(rules, Iterable):
    raise TypeError(
      f"{what}: {role} must be a regex string or a sequence of them, got {type(rules).__name__}."
    )
  out = []
  for rule in rules:
    if isinstance(rule, re.Pattern):
      out.append(rule)
    elif isinstance(rule, str):
      try:
        out.append(re.compile(rule))
      except re.error as e:
        raise ValueError(
          f"{what}: the {role + ' ' if role else ''}rule {rule!r} is not a valid regex: {e}"
        ) from e
    else:
      raise TypeError(
        f"{what}: {role + ' ' if role else ''}rules must be regex strings, got "
        f"{type(rule).__name__} {rule!r}."
      )
  return tuple(out)


def matching(rules: Sequence[re.Pattern[str]], path: str) -> list[re.Pattern[str]]:
  """The rules that match `path`."""
  return [r for r in rules if r.search(path) is not None]


def check_all_matched(
  rules: Sequence[re.Pattern[str]],
  paths: Sequence[str],
  *,
  what: str,
  role: str,
  exempt: Iterable[str] = (),
) -> None:
  """Raises ValueError for the first rule (not in `exempt`) that matches none of `paths`."""
  exempt = set(exempt)
  for rule in rules:
    if rule.pattern in exempt:
      continue
    if not any(rule.search(p) for p in paths):
      raise ValueError(
        f"{what}: the {role + ' ' if role else ''}rule {rule.pattern!r} matches no "
        "parameter; the parameter "
        f"paths are {_tree.describe_paths(paths) if paths else '(none)'}. Fix the rule, or pass "
        "allow_unmatched=True if it is meant to match nothing in this model."
      )
