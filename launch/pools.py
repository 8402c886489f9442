"""Check a config's data pools: resolve their shards, print a table, simulate the mixture.

  python -m launch.pools --config=configs/tiny.py --data_dir=/tmp/tiny_data
  python -m launch.pools --config=configs/stage_2b.py --config.data.pools.D1.shards='/data/web/*.u32' \
      --ranks=8 --batches=2000

Prints every pool's weight, shards, train tokens and held-out sets; then draws --batches global
batches of the allocation (no data read) and prints each pool's realised share, and how many
epochs of its smallest rank stripe that many batches consume.
"""
import sys

from absl import app, flags
from ml_collections import config_flags
import numpy as np

from lightning_jax.config import ConfigError
from lightning_jax.data import pools as P
from lightning_jax.data.shards import DataError

config_flags.DEFINE_config_file("config", None, "config file, e.g. configs/tiny.py",
                                lock_config=False)
flags.DEFINE_string("data_dir", "", "prepared data directory (default: config data.path)")
flags.DEFINE_integer("ranks", 1, "data-parallel processes to simulate")
flags.DEFINE_integer("batches", 1000, "global batches to simulate")
FLAGS = flags.FLAGS


def main(argv):
  del argv

  cfg = FLAGS.config
  if cfg is None:
    raise app.UsageError("--config is required, e.g. --config=configs/tiny.py")
  data_dir = FLAGS.data_dir or cfg.data.path or None
  try:
    pools = P.pools_from_config(cfg, data_dir)
    print(P.describe(pools))
    loader = P.mixture_loader(cfg, data_dir, rank=0, num_ranks=FLAGS.ranks, pools=pools)
  except (ConfigError, DataError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  counts = np.zeros(len(loader.pool_names), np.int64)
  for _ in range(FLAGS.batches):
    counts += np.bincount(loader.allocate(), minlength=len(counts))
    loader.batches += 1
  seq = cfg.train.seq_len
  print(f"\n{FLAGS.batches} global batches of {cfg.train.global_batch} x {seq} tokens over "
        f"{FLAGS.ranks} rank(s):")
  print(f"{'pool':<12} {'weight':>7} {'share':>7} {'epochs (smallest stripe)':>25}")
  for i, p in enumerate(loader.pools):
    stripes = loader.stripes[p.name]
    smallest = min(sum(s.n_tokens for s in st) for st in stripes)
    epochs = counts[i] * seq / FLAGS.ranks / max(smallest, 1)
    print(f"{p.name:<12} {p.spec.weight:>7.3f} {counts[i] / counts.sum():>7.4f} {epochs:>25.2f}")
  return 0


if __name__ == "__main__":
  app.run(main)
