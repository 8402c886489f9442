"""Pool-mixture loader throughput on CPU (one process), compared with what training consumes.

  python -m benchmarks.data_bench [--shard_tokens 1048576] [--batches 30]

Writes synthetic shards (5 pools x 8 shards) to a temporary directory, then times
MixtureLoader batches for the 120B shape (global batch 64 x seq_len 8192, one process feeding
one 8-GPU node; and rank 0 of 8 processes, 8 rows each) and the tiny shape (16 x 128).
The 120B consumption rate comes from launch.count's training FLOPs/token (37.71 GFLOP at
T = 8192) and 8 x H100 bf16 dense peak (989 TFLOP/s each): 210k tokens/s at 100 % MFU. One
process feeds one node, so that is the rate each process must sustain. The shards were just
written, so they are in the page cache: this measures the loader, not the disk.
"""
import argparse
import tempfile
import time

import numpy as np

from lightning_jax.data import pools as P

FLOPS_PER_TOKEN_120B = 37.71e9       # python -m launch.count --config=configs/stage_120b.py
NODE_PEAK = 8 * 989e12               # 8 x H100 SXM, bf16 dense


def main():
  ap = argparse.ArgumentParser(prog="python -m benchmarks.data_bench",
                               description=__doc__.splitlines()[0])
  ap.add_argument("--shard_tokens", type=int, default=1 << 20, help="Tokens per synthetic "
                  "shard (uint32; 5 pools x 8 shards are written).")
  ap.add_argument("--batches", type=int, default=30, help="Timed batches per 120B-shape case "
                  "(the tiny case times 20x as many).")
  args = ap.parse_args()
  names = ["D1", "D2", "D3", "D4", "always_on"]
  weights = [.34, .24, .11, .06, .25]
  eot = 199_999
  rng = np.random.default_rng(0)
  with tempfile.TemporaryDirectory() as d:
    arrays = {("train", n): [rng.integers(0, eot, args.shard_tokens, dtype=np.uint32)
                             for _ in range(8)] for n in names}
    t0 = time.perf_counter()
    P.write_shard_dir(d, arrays, vocab_size=200_000, eot_id=eot)
    print(f"wrote {5 * 8 * args.shard_tokens * 4 / 2**20:.0f} MiB of shards in "
          f"{time.perf_counter() - t0:.1f}s")
    specs = [P.PoolSpec(n, w, n == "always_on", (n,)) for n, w in zip(names, weights)]
    pools = P.resolve_pools(specs, d)
    need_peak = NODE_PEAK / FLOPS_PER_TOKEN_120B
    print(f"120B consumes {need_peak:,.0f} tokens/s per 8-GPU node at 100% MFU "
          f"({0.4 * need_peak:,.0f} at 40%); a step is 64 x 8192 = {64 * 8192:,} tokens")
    for label, batch, seq, rank, ranks in (("120B, 1 process x 64 rows", 64, 8192, 0, 1),
                                           ("120B, rank 0 of 8 (8 rows)", 64, 8192, 0, 8),
                                           ("tiny, 16 x 128", 16, 128, 0, 1)):
      L = P.MixtureLoader(pools, batch, seq, 0, 0.25, rank, ranks, eot)
      next(L)                                            # open the memory maps
      n = args.batches if seq > 1000 else 20 * args.batches
      t0 = time.perf_counter()
      tok = 0
      for _ in range(n):
        tok += next(L)["ids"].size
      dt = time.perf_counter() - t0
      per_step = dt / n
      print(f"{label:<28} {tok / dt:>14,.0f} tokens/s  {per_step * 1e3:8.2f} ms/batch"
            + (f"  ({tok / dt / need_peak:.0f}x one node's 100%-MFU need)"
               if seq > 1000 else ""))


if __name__ == "__main__":
  main()
