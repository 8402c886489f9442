"""Peak host memory of growth.expand_to_tqp: the per-layer path vs the whole-tree path.

  /usr/bin/time -v python benchmarks/expand_to_tqp_memory.py --mode layer   [--d_model 512 ...]
  /usr/bin/time -v python benchmarks/expand_to_tqp_memory.py --mode whole

A random 9B-shape source (configs/stage_9b.py at --d_model, --layers, --src_experts routed experts,
vocab 64) grown into configs/stage_120b.py's shape with --experts routed experts (TQP on, 1 expert
device: no padding): --mode layer runs growth.expand_to_tqp.expand_to_tqp (one layer at a time,
--workers wide), --mode whole runs to_tqp(expand_experts(...)) as the previous expand_to_tqp did.
Prints the byte counts the memory model in lightning_jax/growth/expand_to_tqp.py uses, the peak RSS seen by
getrusage, and a checksum of the result (equal for both modes).
"""
import argparse
import resource
import sys
import time
import zlib

import jax
import numpy as np

sys.path.insert(0, __file__.rsplit("/benchmarks/", 1)[0])
from configs import stage_9b, stage_120b  # noqa: E402
from lightning_jax import nn  # noqa: E402
from lightning_jax.growth import common  # noqa: E402
from lightning_jax.growth.expand_experts import expand_experts  # noqa: E402
from lightning_jax.growth.expand_to_tqp import expand_to_tqp  # noqa: E402
from lightning_jax.growth.to_tqp import to_tqp  # noqa: E402


def cfgs(a):
  src, dst = stage_9b.get_config(), stage_120b.get_config()
  for c, e in ((src, a.src_experts), (dst, a.experts)):
    c.model.vocab_size = 64
    c.model.d_model = a.d_model
    c.model.n_layers = a.layers
    c.moe.n_experts = e
    c.moe.expert_width = a.expert_width
    c.moe.shared_width = a.expert_width
    c.model.deltanet.n_heads = a.d_model // c.model.deltanet.head_dim
    c.model.gsa.n_heads = max(1, a.d_model // c.model.gsa.head_dim)
    c.mesh.expert = 1
  return src, dst


def random_variables(cfg, seed):
  ab, flat = common.abstract_flat(cfg, common.COLLECTIONS)
  rng = np.random.default_rng(seed)
  out = {}
  for k, s in flat.items():
    if np.issubdtype(np.dtype(s.dtype), np.floating):
      out[k] = rng.standard_normal(s.shape, np.float32) * np.float32(0.02)
    else:
      out[k] = np.zeros(s.shape, s.dtype)
  return jax.tree_util.tree_map_with_path(lambda p, _: out[nn.path_str(p)], ab)


def nbytes(tree):
  return sum(np.asarray(x).nbytes for x in jax.tree_util.tree_leaves(tree))


def main():
  ap = argparse.ArgumentParser(prog="python -m benchmarks.expand_to_tqp_memory",
                               description=__doc__.splitlines()[0])
  ap.add_argument("--mode", choices=("layer", "whole"), required=True, help="layer: "
                  "growth.expand_to_tqp one layer at a time; whole: to_tqp(expand_experts(...)) "
                  "over the whole tree.")
  ap.add_argument("--d_model", type=int, default=512, help="Model width of source and result.")
  ap.add_argument("--expert_width", type=int, default=1024, help="Hidden width of each routed "
                  "(and the shared) expert.")
  ap.add_argument("--layers", type=int, default=4, help="Layers of source and result.")
  ap.add_argument("--src_experts", type=int, default=16, help="Routed experts of the random "
                  "9B-shape source.")
  ap.add_argument("--experts", type=int, default=64, help="Routed experts of the grown "
                  "120B-shape (TQP) result.")
  ap.add_argument("--workers", type=int, default=1, help="Layers expanded in parallel threads by "
                  "--mode layer (ignored by --mode whole).")
  a = ap.parse_args()
  src_cfg, dst_cfg = cfgs(a)
  src = random_variables(src_cfg, 0)
  rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  t0 = time.perf_counter()
  args = dict(ratio=0.5, router_sigma=0.05, seed=1337)
  if a.mode == "layer":
    out = expand_to_tqp(src, src_cfg, dst_cfg, workers=a.workers, **args)
  else:
    mid_cfg = common.dense_expert_cfg(dst_cfg)
    mid = expand_experts(src, src_cfg, mid_cfg, **args)
    out = to_tqp(mid, mid_cfg, dst_cfg)
    del mid
  dt = time.perf_counter() - t0
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  flat = common.flatten(out)
  crc = 0
  for k in sorted(flat):
    crc = zlib.crc32(np.ascontiguousarray(np.asarray(flat[k])).tobytes(), crc)
  layer = 3 * a.experts * a.d_model * a.expert_width * 4
  print(f"mode {a.mode} workers {a.workers}: d_model {a.d_model}, expert_width {a.expert_width}, "
        f"{a.layers} layers, {a.src_experts} -> {a.experts} experts")
  print(f"  source variables {nbytes(src) / 1e6:.0f} MB; TQP output {nbytes(out) / 1e6:.0f} MB; "
        f"dense expanded layer {layer / 1e6:.0f} MB (x {a.layers} = {layer * a.layers / 1e6:.0f} MB)")
  print(f"  peak RSS before the transform {rss0 / 1e6:.0f} MB, after {peak / 1e6:.0f} MB "
        f"(+{(peak - rss0) / 1e6:.0f} MB); {dt:.1f} s; checksum {crc:08x}")


if __name__ == "__main__":
  main()
