"""Routed-expert forward+backward at one device's share of the 120B shape, vs dense bf16.

One device at 120B (expert parallel 8): 58 local experts, 65,536 tokens x top-12 routed rows
(786,432 rows after the all_to_all), SwiGLU 4096 -> 1024 -> 4096, bf16 compute.
Useful FLOPs of forward+backward = 3 matmuls x (2 fwd + 4 bwd) x rows x 4096 x 1024.

Rows of the table (every TFLOP/s figure counts only the useful FLOPs above):
  dense        one SwiGLU of width 1024 over all 786,432 rows (same FLOPs, no routing): the target
  grouped      lightning_jax.layers.moe.grouped_swiglu on equal groups [58, C, 4096]
  dispatch     moe.dispatch (sort, pack, grouped SwiGLU, gate-weighted combine) on random
               balanced / skewed routing, dropless and capacity modes, for a few capacity factors

Usage (GPU):  python -m benchmarks.moe_bench            (full shape; about 30 GB of HBM)
              python -m benchmarks.moe_bench --small    (CPU smoke run of the same code)
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from configs import stage_120b
from lightning_jax.layers import moe


def timeit(fn, *args, iters=5, warmup=2):
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  t = time.perf_counter()
  for _ in range(iters):
    out = fn(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - t) / iters


def routing(key, n, e, k, skew):
  """[n, k] distinct expert ids per token; skew > 0 draws experts with Zipf-like preference."""
  logits = jax.random.gumbel(key, (n, e))
  if skew:
    logits = logits - skew * jnp.log1p(jnp.arange(e, dtype=jnp.float32))
  _, eid = jax.lax.top_k(logits, k)
  gates = jax.random.uniform(jax.random.fold_in(key, 1), (n, k), jnp.float32, 0.1, 1.0)
  return eid.astype(jnp.int32), gates / gates.sum(-1, keepdims=True)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--small", action="store_true", help="tiny shapes (CPU smoke test)")
  ap.add_argument("--iters", type=int, default=5)
  args = ap.parse_args()
  e, n, k, d, f = (58, 65536, 12, 4096, 1024) if not args.small else (6, 512, 3, 64, 32)
  rows = n * k
  flops = 18.0 * rows * d * f
  dt = jnp.bfloat16
  key = jax.random.PRNGKey(0)
  ks = jax.random.split(key, 8)
  w = {"gate": (0.02 * jax.random.normal(ks[0], (e, d, f))).astype(dt),
       "up": (0.02 * jax.random.normal(ks[1], (e, d, f))).astype(dt),
       "down": (0.02 * jax.random.normal(ks[2], (e, f, d))).astype(dt)}
  x = jax.random.normal(ks[3], (n, d), dt)
  cfg = stage_120b.get_config()
  cfg.tqp.enabled = False
  cfg.mesh.expert = 1
  cfg.model.d_model, cfg.moe.expert_width, cfg.moe.top_k = d, f, k
  if args.small:
    cfg.moe.group_pad = 8

  print(f"device: {jax.devices()[0].device_kind}  jax {jax.__version__}")
  print(f"shape: {e} experts, {n} tokens x top-{k} = {rows} rows, {d}->{f}->{d}, bf16; "
        f"useful fwd+bwd FLOPs {flops / 1e12:.2f} T")
  table = []

  # dense: one SwiGLU over all rows, same FLOPs
  xd = jax.random.normal(ks[4], (rows, d), dt)
  wd = {m: v[0] for m, v in w.items()}

  def dense_loss(wd, xd):
    h = jax.nn.silu(xd @ wd["gate"]) * (xd @ wd["up"])
    return jnp.sum((h @ wd["down"]).astype(jnp.float32))
  dense = jax.jit(jax.grad(dense_loss, argnums=(0, 1)))
  t_dense = timeit(dense, wd, xd, iters=args.iters)
  table.append(("dense SwiGLU (same FLOPs)", t_dense))
  del xd

  # grouped only: equal groups, capacity rounded to 128
  c = -(-rows // e // 128) * 128 if not args.small else -(-rows // e)
  xg = jax.random.normal(ks[5], (e, c, d), dt)

  def grouped_loss(w, xg):
    return jnp.sum(moe.grouped_swiglu(w, None, xg, cfg).astype(jnp.float32))
  grouped = jax.jit(jax.grad(grouped_loss, argnums=(0, 1)))
  t = timeit(grouped, w, xg, iters=args.iters) * rows / (e * c)   # scale to useful rows
  table.append((f"grouped_swiglu [E, {c}, d] (scaled to useful rows)", t))
  del xg

  def dispatch_loss(w, x, eid, gates, cfg_):
    y, _ = moe.dispatch(w, None, x, eid, gates, cfg_)
    return jnp.sum(y)

  for skew, mode, cf in [(0.0, "dropless", 1.0), (0.0, "dropless", 1.1), (0.0, "dropless", 1.25),
                         (0.0, "capacity", 1.25), (0.5, "dropless", 1.25)]:
    cc = cfg.copy_and_resolve_references()
    cc.moe.dispatch, cc.moe.capacity_factor = mode, cf
    eid, gates = routing(ks[6], n, e, k, skew)
    load = np.bincount(np.asarray(eid).ravel(), minlength=e)
    c0, c1, rounds = moe.capacities(cc, n, e)
    fn = jax.jit(jax.grad(lambda w, x, eid, g, _c=cc: dispatch_loss(w, x, eid, g, _c),
                          argnums=(0, 1, 3)))
    t = timeit(fn, w, x, eid, gates, iters=args.iters)
    extra = max(0, -(-(int(load.max()) - c0) // c1)) if c1 else 0
    table.append((f"dispatch {mode} cf={cf} skew={skew} (max/mean load "
                  f"{load.max() / load.mean():.2f}, C0={c0}, overflow rounds run {extra})", t))

  print(f"\n{'case':<88} {'ms':>9} {'TFLOP/s':>9} {'% dense':>8}")
  for name, t in table:
    tf = flops / t / 1e12
    print(f"{name:<88} {t * 1e3:9.2f} {tf:9.1f} {100 * t_dense / t:7.1f}%")


if __name__ == "__main__":
  main()
