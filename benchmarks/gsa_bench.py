"""Time and memory of one Gated Sparse Attention layer (lightning_jax.layers.sparse_attention).

    python -m benchmarks.gsa_bench [--config configs/stage_2b.py] [--batch 1] [--seq 4096,8192]
        [--query_chunk 256,512] [--attention gather,dense_masked,flash,kernel] [--dtype bfloat16]
        [--repeat 5]

For each (seq, query_chunk, attention mode) it compiles and times, on the default device:
  select      indexer + adaptive top-k only (gsa_select)
  forward     gsa_apply, selecting
  reuse_fwd   gsa_apply with a given selection (what the reversible recompute runs)
  train       loss + grads w.r.t. params and x (selecting; the indexer gets no gradient)
and prints XLA's memory_analysis().temp_size_in_bytes for each compiled function, plus the mean
kept keys per query. Parameters use the config's init; the variance EMA is calibrated to the
first batch so budgets spread around k_base as after warm-up. Attention modes are those of
model.gsa.attention ("kernel": the Pallas kernels of lightning_jax/ops/sparse_attention/kernel.py;
benchmarks/gsa_kernel_bench.py times the attention core alone against cuDNN).
"""
from __future__ import annotations

import argparse
import datetime
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from lightning_jax import nn
from lightning_jax.config import load_config
from lightning_jax.layers import sparse_attention as gsa
from lightning_jax.layers.rotary import rotary_tables


def _time(fn, args, repeat):
  compiled = jax.jit(fn).lower(*args).compile()
  mem = compiled.memory_analysis()
  temp = getattr(mem, "temp_size_in_bytes", float("nan")) if mem is not None else float("nan")
  out = compiled(*args)
  jax.block_until_ready(out)
  ts = []
  for _ in range(repeat):
    t = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    ts.append(time.perf_counter() - t)
  return float(np.median(ts)) * 1e3, temp / 2**30, out


def main():
  ap = argparse.ArgumentParser(prog="python -m benchmarks.gsa_bench",
                               description=__doc__.splitlines()[0])
  ap.add_argument("--config", default="configs/stage_2b.py", help="Config file whose model.gsa "
                  "layer is timed.")
  ap.add_argument("--batch", type=int, default=1, help="Sequences per call.")
  ap.add_argument("--seq", default="4096,8192", help="Comma list of sequence lengths in tokens.")
  ap.add_argument("--query_chunk", default="", help="Comma list of model.gsa.query_chunk values "
                  "in queries (default: the config's).")
  ap.add_argument("--attention", default="gather,dense_masked,flash", help="Comma list of "
                  "model.gsa.attention modes (gather, dense_masked, flash, kernel).")
  ap.add_argument("--dtype", default="bfloat16", help="model.dtype (compute dtype) for the layer.")
  ap.add_argument("--repeat", type=int, default=5, help="Timed calls per function after one "
                  "warm-up call (median reported).")
  a = ap.parse_args()
  cfg = load_config(a.config)
  cfg.model.dtype = a.dtype
  g = cfg.model.gsa
  chunks = [int(c) for c in a.query_chunk.split(",")] if a.query_chunk else [int(g.query_chunk)]
  print(f"# {datetime.datetime.utcnow():%Y-%m-%d %H:%M} UTC  {jax.devices()[0].device_kind}  "
        f"{platform.node()}  d={cfg.model.d_model} heads={g.n_heads}x{g.head_dim} "
        f"k=[{g.k_min},{g.k_base},{g.k_max}] dtype={a.dtype} B={a.batch}")
  p = nn.init(gsa.gsa_specs(cfg), jax.random.PRNGKey(0))
  for T in [int(s) for s in a.seq.split(",")]:
    x = jax.random.normal(jax.random.PRNGKey(1), (a.batch, T, cfg.model.d_model), jnp.float32)
    consts = {"rope_gsa": rotary_tables(jnp.arange(T)[None], g.head_dim, cfg.model.rope_base)}
    for qc, mode in [(c, m) for c in chunks for m in a.attention.split(",")]:
      g.query_chunk = qc
      g.attention = mode
      st0 = gsa.gsa_stats_init(cfg)
      _, _, var_t = jax.jit(lambda p, s, x: gsa.gsa_select(p, s, x, cfg))(p, st0, x)
      stats = {"var_ema": jnp.mean(var_t)}
      ms_sel, m_sel, (sel, k_t, _) = _time(lambda p, s, x: gsa.gsa_select(p, s, x, cfg),
                                            (p, stats, x), a.repeat)
      ms_fwd, m_fwd, _ = _time(lambda p, s, x, c: gsa.gsa_apply(p, s, x, c, cfg)[0],
                               (p, stats, x, consts), a.repeat)
      ms_re, m_re, _ = _time(lambda p, s, x, c, sl: gsa.gsa_apply(p, s, x, c, cfg, sl)[0],
                             (p, stats, x, consts, sel), a.repeat)

      def loss(p, s, x, c):
        y = gsa.gsa_apply(p, s, x, c, cfg)[0]
        return jnp.mean(jnp.square(y.astype(jnp.float32)))

      ms_tr, m_tr, _ = _time(jax.grad(loss, argnums=(0, 2)), (p, stats, x, consts), a.repeat)
      print(f"T={T:6d} Qc={qc:5d} {mode:12s} kept/query={float(jnp.mean(k_t)):7.1f} | "
            f"select {ms_sel:8.2f} ms ({m_sel:6.2f} GiB) | forward {ms_fwd:8.2f} ms ({m_fwd:6.2f} GiB)"
            f" | reuse_fwd {ms_re:8.2f} ms ({m_re:6.2f} GiB) | train {ms_tr:8.2f} ms ({m_tr:6.2f} GiB)")


if __name__ == "__main__":
  main()
