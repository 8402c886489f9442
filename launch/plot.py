"""PNG curves of a run: `python -m launch.plot RUN_DIR [--out DIR]`.

Reads RUN_DIR/metrics.jsonl (written by launch.train) and writes loss.png (CE_next, CE_mtp,
aux in its own panel below), heldout.png (held-out CE_next per domain), lr.png, throughput.png, mfu.png and
grad_norm.png into RUN_DIR/plots (or --out).
"""
from __future__ import annotations

import sys

from absl import app, flags

from lightning_jax.metrics import plot_run

flags.DEFINE_string("out", "", "Output directory (default RUN_DIR/plots).")
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) != 2:
    print("usage: python -m launch.plot RUN_DIR [--out DIR]", file=sys.stderr)
    return 2
  try:
    written = plot_run(argv[1], FLAGS.out or None)
  except FileNotFoundError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  for p in written:
    print(p)
  return 0


if __name__ == "__main__":
  app.run(lambda argv: sys.exit(main(argv)))
