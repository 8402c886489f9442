"""`python -m growth.next_phase --src RUN_P1 --dst RUN_P2 --config=configs/stage_9b.py:p2
[--optimizer carry|fresh]`: the next training phase of a stage from the previous phase's last
checkpoint (lightning_jax/growth/next_phase.py says what it writes and carries).
"""
from __future__ import annotations

import json
import sys

from absl import app, flags, logging as absl_logging
from ml_collections import config_flags

from growth.cli import guarded, list_in_help, preflight
from lightning_jax.growth.next_phase import OPTIMIZER, next_phase


def main(argv):
  F = flags.FLAGS

  def go():
    out = next_phase(F.src, F.dst, F.config, optimizer=F.optimizer)
    print(json.dumps(out["meta"]["provenance"]))
  return guarded(argv, "--src=RUN --dst=NEW_RUN --config=configs/stage_9b.py:p2", go)


def _define_flags():
  config_flags.DEFINE_config_file("config", None, "The NEXT phase's config, e.g. "
                                  "configs/stage_9b.py:p2 (overrides: --config.section.field=...).",
                                  lock_config=True)
  flags.DEFINE_string("src", None, "Source run directory, checkpoints/ dir or checkpoints/<step>.")
  flags.DEFINE_string("dst", None, "New run directory for the next phase.")
  flags.DEFINE_enum("optimizer", "carry", list(OPTIMIZER), "carry: keep the Adam moments (the "
                    "reference); fresh: new zero moments.")
  flags.mark_flags_as_required(["config", "src", "dst"])
  list_in_help("config", "src", "dst", "optimizer")


if __name__ == "__main__":
  preflight()
  _define_flags()
  absl_logging.set_verbosity(absl_logging.ERROR)
  app.run(lambda argv: sys.exit(main(argv)))
