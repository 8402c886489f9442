"""GSA attention core: Pallas kernels (gather in-kernel) vs flash-under-mask vs dense cuDNN.

    python -m benchmarks.gsa_kernel_bench [--seq 4096,8192] [--heads 16] [--head_dim 256]
        [--batch 1] [--k_max 256] [--selection random,clustered] [--tiles b,c,d]
        [--key_order count,position]
        [--variants kernel,flash,cudnn] [--repeat 10] [--no_check] [--no_indexer]

Times, on the default device, for each sequence length and selection kind:
  lists      the kernels' CSR lists alone (query unions + key lists; one sort each)
  kernel:X   ops.sparse_attention.kernel.gsa_attention with tile set X (below)
  flash      ops.sparse_attention.api.flash_attention (cuDNN under the [B, 1, T, T] selection mask)
  cudnn      jax.nn.dot_product_attention(implementation="cudnn", is_causal=True), no selection
each as forward ms and forward+backward ms (grad of sum(o * r) w.r.t. q, k, v), in bf16.
Selections: "random": per query k_t uniform in [32, 224] (mean ~128, at most t + 1), the 4 sinks,
then distinct uniformly random earlier keys (no overlap between neighbours: the kernels' worst
case); "clustered": the top-k_t of a score shared by all queries (per-key salience) plus a
recency bonus plus per-query noise, so neighbouring queries share most keys (closer to an
indexer). The mean list lengths per block of 16, 32, 64 queries (union of their keys) and keys
(queries selecting any of them; consecutive keys, and "ordered": blocks in key_order()) are
printed: the kernels gather one K and V row (forward, dQ) or one q and dO row (dK/dV) per list
entry and head. --check (default on) also prints the kernel's relative errors against the
float32 XLA gather reference (o, dq, dk, dv) at the first sequence length. Every variant runs
in its own try/except: a failure prints its error and the run goes on. --indexer (default on) also times
the lightning-indexer scores of all T queries (4 heads x 128), XLA vs the Pallas kernel.

Tile sets (block_q, block_k, block_kb, block_qc, warps fwd, warps bwd, stages):
"""
from __future__ import annotations

import argparse
import functools
import math
import datetime
import platform
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from lightning_jax.ops.sparse_attention import api as attention_op
from lightning_jax.ops.sparse_attention import kernel as ks

TILES = ks.TILE_SETS
__doc__ += "".join(f"  {k}: {tuple(v.values())}\n" for k, v in TILES.items())


def _compile(fn, args):
  t0 = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  return compiled, time.perf_counter() - t0


def _run(compiled, args, repeat):
  """Median ms of compiled(*args) after one warm-up call."""
  jax.block_until_ready(compiled(*args))
  ts = []
  for _ in range(repeat):
    t = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    ts.append(time.perf_counter() - t)
  return float(np.median(ts)) * 1e3


def make_selection(key, b, t, k_max, kind, n_sinks=4, k_lo=32, k_hi=224):
  """int32 [b, t, k_max], -1 padded, causal, sinks first, distinct keys (see the docstring)."""
  k1, k2, k3, k4 = jax.random.split(key, 4)
  pos = jnp.arange(t)
  kt = jax.random.randint(k1, (b, t), k_lo, k_hi + 1)
  kt = jnp.minimum(kt, pos[None] + 1)

  def rows(qpos, kt_c, noise_key):
    # scores of the queries qpos [Q] against all keys, -inf after the query; sinks +inf
    if kind == "random":
      s = jax.random.uniform(noise_key, (b, qpos.shape[0], t))
    else:
      sal = jax.random.normal(k3, (b, 1, t))
      rec = 3.0 * jnp.exp(-(qpos[:, None] - pos[None, :]).astype(jnp.float32) / 64.0)
      s = sal + rec[None] + 0.3 * jax.random.normal(noise_key, (b, qpos.shape[0], t))
    causal = pos[None, None, :] <= qpos[None, :, None]
    s = jnp.where(pos[None, None, :] < n_sinks, jnp.inf, s)
    s = jnp.where(causal, s, -jnp.inf)
    _, idx = jax.lax.top_k(s, k_max)
    ok = (jnp.arange(k_max)[None, None] < kt_c[..., None]) & (idx <= qpos[None, :, None])
    return jnp.where(ok, idx, -1).astype(jnp.int32)

  qc = math.gcd(t, 1024)
  n = t // qc
  out = jax.lax.map(lambda a: rows(*a), (pos.reshape(n, qc),
                                         jnp.moveaxis(kt.reshape(b, n, qc), 1, 0),
                                         jax.random.split(k4, n)))
  return jnp.moveaxis(out, 0, 1).reshape(b, t, k_max)


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _maxrel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def _ordered_key_lists(sel, blk):
  return ks.key_lists(sel, blk, ks.key_order(sel))


@functools.partial(jax.jit, static_argnums=(0, 2))
def _mean_len_jit(lists_fn, sel, blk):
  off = lists_fn(sel, blk)[0]
  return jnp.mean(off[:, 1:] - off[:, :-1])


def _mean_len(lists_fn, sel, blk):
  return float(_mean_len_jit(lists_fn, sel, blk))


def _bench_indexer(T, B, repeat, hi=4, di=128):
  """Indexer scores of all T queries (4 heads x 128, bf16 inputs): XLA vs the Pallas kernel."""
  k = jax.random.split(jax.random.PRNGKey(T + 1), 4)
  qi = jax.random.normal(k[0], (B, T, hi, di), jnp.bfloat16)
  ki = jax.random.normal(k[1], (B, T, di), jnp.bfloat16)
  wi = jax.random.normal(k[2], (B, T, hi), jnp.bfloat16)
  bias = jnp.zeros((hi,), jnp.float32)
  pos = jnp.arange(T)
  out = {}
  for name, fn in (("xla", attention_op.indexer_scores), ("kernel", ks.indexer_scores)):
    try:
      c, c_s = _compile(fn, (qi, ki, wi, bias, pos))
      ms = _run(c, (qi, ki, wi, bias, pos), repeat)
      out[name] = c(qi, ki, wi, bias, pos)
      print(f"T={T} indexer scores {name:6s} {ms:8.3f} ms  (compile {c_s:5.1f} s)", flush=True)
    except Exception as e:  # noqa: BLE001
      print(f"T={T} indexer scores {name} FAILED: {type(e).__name__}: {str(e)[:2000]}", flush=True)
  if len(out) == 2:
    x, y = np.asarray(out["kernel"]), np.asarray(out["xla"])
    fin = np.isfinite(y)
    print(f"T={T} indexer scores: same -inf pattern {np.array_equal(fin, np.isfinite(x))}, "
          f"max abs diff {float(np.max(np.abs(x[fin] - y[fin]))):.2e}", flush=True)


def main():
  ap = argparse.ArgumentParser(prog="python -m benchmarks.gsa_kernel_bench",
                               description=__doc__.splitlines()[0])
  ap.add_argument("--seq", default="4096,8192", help="Comma list of sequence lengths in tokens.")
  ap.add_argument("--heads", type=int, default=16, help="Attention heads.")
  ap.add_argument("--head_dim", type=int, default=256, help="Width of each head (a power of two).")
  ap.add_argument("--batch", type=int, default=1, help="Sequences per call.")
  ap.add_argument("--k_max", type=int, default=256, help="Selection width: most keys a query "
                  "keeps (the selection is int32 [batch, seq, k_max]).")
  ap.add_argument("--selection", default="random,clustered", help="Comma list of selection "
                  "kinds (random, clustered; see above).")
  ap.add_argument("--tiles", default="b,c,d", help="Comma list of the kernel's tile sets "
                  f"({','.join(TILES)}; listed above); the first one is --check'ed.")
  ap.add_argument("--key_order", default="count", help="Comma list of dK/dV key block orders "
                  "for the kernel (count, position).")
  ap.add_argument("--variants", default="kernel,flash,cudnn", help="Comma list of attention "
                  "implementations to time (kernel, flash, cudnn).")
  ap.add_argument("--repeat", type=int, default=10, help="Timed calls per measurement after "
                  "one warm-up call (median reported).")
  ap.add_argument("--check", action="store_true", default=True, help="Print the kernel's "
                  "errors against the float32 gather reference at the first --seq (default).")
  ap.add_argument("--no_check", "--no-check", dest="check", action="store_false",
                  help="Skip that check.")
  ap.add_argument("--indexer", action="store_true", default=True, help="Also time the "
                  "lightning-indexer scores, XLA vs the Pallas kernel (default).")
  ap.add_argument("--no_indexer", "--no-indexer", dest="indexer", action="store_false",
                  help="Skip the indexer timing.")
  a = ap.parse_args()
  B, H, D = a.batch, a.heads, a.head_dim
  variants = a.variants.split(",")
  print(f"# {datetime.datetime.utcnow():%Y-%m-%d %H:%M} UTC  {jax.devices()[0].device_kind}  "
        f"{platform.node()}  jax {jax.__version__}  B={B} heads={H}x{D} k_max={a.k_max} bf16",
        flush=True)
  kinds = a.selection.split(",")
  for si, T in enumerate(int(s) for s in a.seq.split(",")):
    kq, kk, kv, kr, ksel = jax.random.split(jax.random.PRNGKey(T), 5)
    q, k, v, r = (jax.random.normal(x, (B, T, H, D), jnp.bfloat16) for x in (kq, kk, kv, kr))
    causal_flops = 4 * B * T * T / 2 * H * D
    sels = {}
    lists_fn = None
    for kind in kinds:
      try:
        sel = jax.jit(lambda key, kind=kind: make_selection(key, B, T, a.k_max, kind))(ksel)
        kmean = float(jnp.mean(jnp.sum(sel >= 0, -1)))
        sizes = []
        for blk in (16, 32, 64):
          sizes.append(f"{blk}: {_mean_len(ks.query_lists, sel, blk):6.0f} keys/qblock "
                       f"{_mean_len(ks.key_lists, sel, blk):6.0f} queries/kblock "
                       f"{_mean_len(_ordered_key_lists, sel, blk):6.0f} ordered")
        if lists_fn is None:
          d = ks.DEFAULTS
          lists_fn, _ = _compile(lambda s: (ks.query_lists(s, d["block_q"]),
                                            _ordered_key_lists(s, d["block_kb"])), (sel,))
        ms = _run(lists_fn, (sel,), a.repeat)
        print(f"T={T} {kind:9s} kept/query {kmean:6.1f}  lists (default tiles) {ms:6.2f} ms  "
              f"mean list lengths, block " + " | ".join(sizes), flush=True)
        sels[kind] = sel
      except Exception as e:  # noqa: BLE001
        print(f"T={T} {kind}: selection failed: {type(e).__name__}: {e}", flush=True)
    if not sels:
      continue
    runs = []
    if "kernel" in variants:
      runs += [(f"kernel:{t}" + ("" if ko == "count" else f":{ko}"),
                lambda q, k, v, s, t=t, ko=ko: ks.gsa_attention(
                    q, k, v, s, ks.GSAKernelOptions.tile_set(t, key_order=ko)))
               for t in a.tiles.split(",") for ko in a.key_order.split(",")]
    if "flash" in variants:
      runs.append(("flash", lambda q, k, v, s: attention_op.flash_attention(q, k, v, s)))
    if "cudnn" in variants:
      runs.append(("cudnn", lambda q, k, v, s: jax.nn.dot_product_attention(
          q, k, v, is_causal=True, implementation="cudnn")))
    for name, fn in runs:
      try:
        sel0 = next(iter(sels.values()))
        fwd, c_f = _compile(fn, (q, k, v, sel0))
        loss = lambda q, k, v, s, r, fn=fn: jnp.sum(fn(q, k, v, s).astype(jnp.float32) * r)
        bwd, c_b = _compile(jax.grad(loss, (0, 1, 2)), (q, k, v, sel0, r))
        for kind, sel in sels.items():
          if name == "cudnn" and kind != next(iter(sels)):
            continue                              # no selection: one row is enough
          ms_f = _run(fwd, (q, k, v, sel), a.repeat)
          ms_b = _run(bwd, (q, k, v, sel, r), a.repeat)
          extra = (f"  ({causal_flops / ms_f / 1e9:5.0f} / {3.5 * causal_flops / ms_b / 1e9:5.0f} "
                   f"TFLOP/s causal-dense)" if name == "cudnn" else "")
          print(f"T={T} {kind:9s} {name:10s} fwd {ms_f:8.3f} ms  fwd+bwd {ms_b:8.3f} ms  "
                f"(compile {c_f:5.1f} s + {c_b:5.1f} s){extra}", flush=True)
      except Exception as e:  # noqa: BLE001
        print(f"T={T} {name:10s} FAILED: {type(e).__name__}: {str(e)[:2000]}", flush=True)
        traceback.print_exc(limit=3)
    if a.indexer:
      _bench_indexer(T, B, a.repeat)
    if a.check and si == 0 and "kernel" in variants:
      t0 = a.tiles.split(",")[0]
      f32 = lambda x: x.astype(jnp.float32)
      opts0 = ks.GSAKernelOptions.tile_set(t0)
      kern_o = jax.jit(lambda q, k, v, s: ks.gsa_attention(q, k, v, s, opts0))
      ref_o = jax.jit(lambda q, k, v, s: attention_op.attend(q, k, v, s, 512, "gather"))
      kern_g = jax.jit(jax.grad(lambda q, k, v, s: jnp.sum(ks.gsa_attention(
          q, k, v, s, opts0).astype(jnp.float32) * f32(r)), (0, 1, 2)))
      ref_g = jax.jit(jax.grad(lambda q, k, v, s: jnp.sum(attention_op.attend(
          q, k, v, s, 512, "gather") * f32(r)), (0, 1, 2)))
      for kind, sel in sels.items():
        try:
          o_k, o_r = kern_o(q, k, v, sel), ref_o(f32(q), f32(k), f32(v), sel)
          g_k, g_r = kern_g(q, k, v, sel), ref_g(f32(q), f32(k), f32(v), sel)
          errs = [("o", o_k, o_r)] + list(zip(("dq", "dk", "dv"), g_k, g_r))
          print(f"T={T} {kind:9s} check kernel:{t0} (bf16) vs float32 gather: " + "  ".join(
              f"{n} rel {_rel(x, y):.2e} maxrel {_maxrel(x, y):.2e}" for n, x, y in errs),
              flush=True)
        except Exception as e:  # noqa: BLE001
          print(f"T={T} {kind} check FAILED: {type(e).__name__}: {str(e)[:2000]}", flush=True)


if __name__ == "__main__":
  main()
