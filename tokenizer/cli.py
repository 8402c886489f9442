"""The one way the tokenizer tools parse their absl flags when called in-process (tests)."""
from __future__ import annotations

import sys
from typing import Callable

from absl import flags


def in_process(prog: str, define_flags: Callable, run: Callable, argv: list[str]) -> int:
  """Parse `argv` (as on the command line, without the program name) into fresh FlagValues
  defined by `define_flags(fv)`, then `run(fv, positional_args)`; a flag error is exit code 2."""
  fv = flags.FlagValues()
  define_flags(fv)
  try:
    rest = fv([prog, *argv])
  except flags.Error as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return run(fv, rest[1:])
