"""`python -m growth.init --dst RUN --config=configs/stage_9b.py [--cpu]`: a randomly initialised
run written as a step-0 checkpoint without training (lightning_jax/growth/init.py says what it
writes; flags and errors as the other growth commands, growth/cli.py).
"""
from __future__ import annotations

import sys

from absl import app, flags, logging as absl_logging
from ml_collections import config_flags

from growth.cli import guarded, list_in_help, preflight
from lightning_jax.growth.init import init_run


def main():
  preflight()
  config_flags.DEFINE_config_file("config", None, "Stage config file, e.g. configs/stage_9b.py "
                                  "(overrides: --config.section.field=...).", lock_config=True)
  flags.DEFINE_string("dst", None, "New run directory.")
  flags.DEFINE_bool("cpu", False, "Initialise and write on the host CPU device.")
  flags.mark_flags_as_required(["config", "dst"])
  list_in_help("config", "dst", "cpu")

  def run(argv):
    F = flags.FLAGS
    return guarded(argv, "--dst=RUN --config=configs/x.py",
                   lambda: init_run(F.dst, F.config, on_cpu=F.cpu))

  absl_logging.set_verbosity(absl_logging.ERROR)
  app.run(lambda argv: sys.exit(run(argv)))


if __name__ == "__main__":
  main()
