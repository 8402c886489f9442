"""The growth transforms' registry: each transform module registers itself on import.

A Transform names its function, what its source must be, what it writes, and its extra flags
(name, type, default, help text). growth/cli.py builds every `python -m growth.<name>` command's
flags and --help from here; lightning_jax/growth/driver.py's `grow` calls the function through
it. A new transform is one module that calls `register` (and is imported by driver.py).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

FLAG_KINDS = ("enum", "integer", "float", "string")


@dataclasses.dataclass(frozen=True)
class Flag:
  """One extra command-line flag of a transform: --<name> (absl DEFINE_<kind>)."""
  name: str
  kind: str               # one of FLAG_KINDS
  default: Any
  help: str
  choices: tuple = ()     # kind "enum" only


@dataclasses.dataclass(frozen=True)
class Transform:
  """fn(variables, src_cfg, dst_cfg, **{flag: value}, return_report=True[, log=]) ->
  (grown variables, common.GrowthReport)."""
  name: str
  fn: Callable
  needs: str                       # what the source checkpoint must be (for --help)
  makes: str                       # what the grown run is (for --help)
  flags: tuple = ()                # Flag, in the order the provenance records them
  keeps_tqp: bool = False          # False: a tqp.enabled target is written with dense experts
  on_cpu: bool = False             # build and write the grown state on the host CPU (120B size)
  takes_log: bool = False          # fn accepts log=
  report_choices: tuple = ()       # GrowthReport.choices entries copied into the growth report

  def describe(self) -> str:
    return f"{self.name}: {self.needs} -> {self.makes}."


_REGISTRY: dict[str, Transform] = {}


def register(t: Transform) -> Transform:
  """Add a transform (once per name; every flag of a known kind)."""
  if t.name in _REGISTRY and _REGISTRY[t.name].fn is not t.fn:
    raise ValueError(f"growth transform {t.name!r} is registered twice; expected one module per "
                     f"transform.")
  for f in t.flags:
    if f.kind not in FLAG_KINDS:
      raise ValueError(f"growth transform {t.name!r}: flag --{f.name} has kind {f.kind!r}; "
                       f"expected one of {FLAG_KINDS}.")
  _REGISTRY[t.name] = t
  return t


def names() -> tuple[str, ...]:
  """The registered transforms' names, in registration order."""
  return tuple(_REGISTRY)


def get(name: str) -> Transform:
  if name not in _REGISTRY:
    raise ValueError(f"unknown growth transform {name!r}; expected one of {names()}.")
  return _REGISTRY[name]
