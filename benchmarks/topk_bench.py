"""GSA's key selection (the indexer's top-k) alone at stage_2b's B4 x T4096 chunk shape, by form.

    python -m benchmarks.topk_bench [--rows R] [--keys T] [--k K] [--iters N]

In the B4 step's profile the indexer's `jax.lax.top_k` (k_max = 256 of 4,096 keys, 2,048 query
rows a chunk) runs as XLA sort kernels: 24 calls, 12.5 ms a step on an H100. This times exact
forms of the same selection side by side and checks each against `jax.lax.top_k` (values and
indices equal, ties to the lower index):
  * top_k: `jax.lax.top_k(s, k)` (what the model runs);
  * sort_pair: `jax.lax.sort((-s, iota), num_keys=1)` then the first k (the sort top_k becomes);
  * two_stage_B: top-k within B blocks of the row, then top-k of the B x k candidates.
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.kernels_bench import bench


def sort_pair(s, k):
  iota = jax.lax.broadcasted_iota(jnp.int32, s.shape, s.ndim - 1)
  neg, idx = jax.lax.sort((-s, iota), dimension=s.ndim - 1, num_keys=1, is_stable=True)
  return -neg[..., :k], idx[..., :k]


def two_stage(s, k, blocks):
  """Exact top-k by blocks: each block's k best, then the k best of those (ties: lower index)."""
  *lead, t = s.shape
  w = t // blocks
  v1, i1 = jax.lax.top_k(s.reshape(*lead, blocks, w), min(k, w))
  i1 = i1 + (jnp.arange(blocks, dtype=jnp.int32) * w)[:, None]
  v1, i1 = v1.reshape(*lead, -1), i1.reshape(*lead, -1)
  v2, j = jax.lax.top_k(v1, k)
  return v2, jnp.take_along_axis(i1, j, axis=-1)


def main(argv=None):
  ap = argparse.ArgumentParser(prog="python -m benchmarks.topk_bench",
                               description=__doc__.splitlines()[0])
  ap.add_argument("--rows", type=int, default=2048, help="Query rows (B x query_chunk).")
  ap.add_argument("--keys", type=int, default=4096, help="Keys per row (T).")
  ap.add_argument("--k", type=int, default=256, help="Keys kept (model.gsa.k_max).")
  ap.add_argument("--iters", type=int, default=20, help="Timed calls per form (median).")
  a = ap.parse_args(argv)
  s = jax.random.normal(jax.random.PRNGKey(0), (a.rows, a.keys), jnp.float32)
  # the model's rows: -inf past the query, +inf on the sinks, a few exact ties
  pos = jnp.arange(a.rows) % a.keys
  kpos = jnp.arange(a.keys)
  s = jnp.where(kpos[None] <= pos[:, None], jnp.round(s * 64) / 64, -jnp.inf)
  s = jnp.where(kpos[None] < 4, jnp.inf, s)
  forms = {"top_k": lambda x: jax.lax.top_k(x, a.k), "sort_pair": lambda x: sort_pair(x, a.k)}
  for b in (2, 4, 8, 16):
    if a.keys % b == 0:
      forms[f"two_stage_{b}"] = lambda x, b=b: two_stage(x, a.k, b)
  want = None
  for name, f in forms.items():
    ms, first, out = bench(f, (s,), a.iters)
    v, i = (np.asarray(o) for o in out)
    if want is None:
      want = (v, i)
    same_v = np.array_equal(v, want[0])
    same_i = np.array_equal(i, want[1])
    print(f"{name:<14} {ms:8.3f} ms  (first call {first:.1f} s)  values equal: {same_v}  "
          f"indices equal: {same_i}", flush=True)


if __name__ == "__main__":
  main()
