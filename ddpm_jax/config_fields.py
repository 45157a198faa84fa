"""Reading one section of an ml_collections config, each value checked as it is read.

`SectionReader(config, "training").int("log_every", 100, 1)` returns the field's value, its
default if the config lacks it (a run's config.json from before the field existed), or raises
`errors.UserError` with one sentence naming the field, the value and what is accepted:

    config.training.log_every=0: the logging interval must be an integer >= 1.

`changeable()` marks a settings dataclass field that may change between the runs of one
workdir (settings.py's `is_changeable`).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional, Tuple

import numpy as np

from ddpm_jax.errors import UserError

CHANGEABLE = {"changeable": True}


def changeable(default: Any = dataclasses.MISSING):
  """A field of a fixed section that may still change between the runs of one workdir."""
  return dataclasses.field(default=default, metadata=CHANGEABLE)


def show(value: Any) -> str:
  return repr(value) if isinstance(value, str) else str(value)


def fail(path: str, value: Any, accepted: str) -> UserError:
  return UserError(f"config.{path}={show(value)}: {accepted}.")


def is_int(v: Any) -> bool:
  return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
  return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


class SectionReader:
  """Reads and checks the fields of one config section; a missing field takes its default."""

  def __init__(self, config: Any, section: Optional[str]):
    self.prefix = f"{section}." if section else ""
    node = config if section is None else config.get(section)
    if node is None or not hasattr(node, "get"):
      raise UserError(f"config.{section} is missing or not a section; start the config from "
                      "configs/default.py.")
    self.node = node

  def raw(self, key: str, default: Any) -> Any:
    value = self.node.get(key, default)
    return default if value is None and default is not None else value

  def fail(self, key: str, value: Any, accepted: str) -> UserError:
    return fail(self.prefix + key, value, accepted)

  def int(self, key: str, default: int, low: int = 0, high: Optional[int] = None,
          what: str = "") -> int:
    v = self.raw(key, default)
    if not is_int(v) or v < low or (high is not None and v > high):
      rng = f"an integer in [{low}, {high}]" if high is not None else f"an integer >= {low}"
      raise self.fail(key, v, f"{what or 'the value'} must be {rng}")
    return int(v)

  def float(self, key: str, default: float, low: float = -math.inf, high: float = math.inf, *,
            low_open: bool = False, high_open: bool = False, what: str = "") -> float:
    v = self.raw(key, default)
    ok = is_number(v) and math.isfinite(v) and (v > low if low_open else v >= low) and (
        v < high if high_open else v <= high)
    if not ok:
      lo = "(" if low_open else "["
      hi = ")" if high_open else "]"
      if high == math.inf:
        rng = f"a finite number {'>' if low_open else '>='} {low:g}"
      else:
        rng = f"a number in {lo}{low:g}, {high:g}{hi}"
      raise self.fail(key, v, f"{what or 'the value'} must be {rng}")
    return float(v)

  def bool(self, key: str, default: bool) -> bool:
    v = self.raw(key, default)
    if not isinstance(v, (bool, np.bool_)):
      raise self.fail(key, v, "accepted: True or False")
    return bool(v)

  def choice(self, key: str, default: str, accepted) -> str:
    v = self.raw(key, default)
    if v not in accepted:
      raise self.fail(key, v, f"accepted: {', '.join(map(repr, accepted))}")
    return v

  def text(self, key: str, default: Optional[str]) -> Optional[str]:
    """A string, or None where the default is None (an optional path)."""
    v = self.node.get(key, default)
    if v is None and default is None:
      return None
    if not isinstance(v, str) or not v:
      raise self.fail(key, v, "a non-empty string is accepted")
    return v

  def ints(self, key: str, default: Tuple[int, ...], low: int = 0, what: str = "",
           nonempty: bool = False) -> Tuple[int, ...]:
    v = self.raw(key, default)
    if isinstance(v, (list, tuple)) and all(is_int(x) and x >= low for x in v) and (
        v or not nonempty):
      return tuple(int(x) for x in v)
    raise self.fail(key, tuple(v) if isinstance(v, list) else v,
                    f"{what or 'the value'} must be a {'non-empty ' if nonempty else ''}tuple of "
                    f"integers >= {low}")
