"""Print stored and active parameter counts by component (no allocation).

  python -m launch.count --config=configs/stage_2b.py [--config.moe.n_experts=460] [--json]
"""
import json
import os

if __name__ == "__main__":      # counting needs no accelerator: before jax is imported
  os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from lightning_jax import counting  # noqa: E402
from lightning_jax.config import ConfigError, validate  # noqa: E402

config_flags.DEFINE_config_file("config", None, "config file, e.g. configs/stage_2b.py",
                                lock_config=False)
flags.DEFINE_integer("seq_len", 0, "sequence length for FLOPs/token (0: config train.seq_len)")
flags.DEFINE_bool("json", False, "print the counts as JSON instead of a table")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  cfg = FLAGS.config
  if cfg is None:
    raise app.UsageError("--config is required, e.g. --config=configs/stage_2b.py")
  try:
    validate(cfg)
  except ConfigError as e:
    raise app.UsageError(str(e))
  counts = counting.count_params(cfg)
  seq = FLAGS.seq_len or cfg.train.seq_len
  if FLAGS.json:
    counts["flops_per_token"] = counting.flops_per_token(cfg, seq)
    print(json.dumps(counts, indent=1))
  else:
    print(counting.format_report(cfg, counts, seq))


if __name__ == "__main__":
  app.run(main)
