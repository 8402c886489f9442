"""TQP expert matmul vs bf16 experts at the 120B per-device shape (GPU; the lead runs it).

  python -m benchmarks.tqp_bench [--experts=58] [--rows=13824] [--bits=4,8] [--iters=10]

Per device at 120B (8 GPUs, expert parallel 8, micro-batch 8 x 8192 tokens, top-12 of 460):
8 x 65536 x 12 / 460 = 13.7K routed rows per expert, 58 local experts, so xg is [58, 13824, 4096].
Compared, each as forward and forward+backward of one grouped SwiGLU (gate/up 4096->1024, down
1024->4096):
  bf16   dense bf16 expert weights [58, 4096, 1024] x3, gradients to weights and input
         (what training the routed experts in full would run);
  tqp4   4-bit TurboQuant base (0.5 byte/weight) + rank-16 adapters, gradients to adapters and
         input (the base is stop-gradient);
  tqp8   8-bit base.
Reported: time per call, routed rows/s and tokens/s (rows / top_k), TFLOP/s of the dense
matmuls, the compiled memory analysis (arguments, temporaries) and the device's peak bytes.
"""
from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp

from configs.common import get_base_config
from lightning_jax import nn, tqp


def _cfg(bits, d, f):
  c = get_base_config()
  c.model.d_model, c.moe.expert_width = d, f
  c.moe.enabled, c.moe.router = True, "sigmoid"
  c.tqp.enabled, c.tqp.bits = True, bits
  c.model.dtype = "bfloat16"
  return c


def _bf16_swiglu(w, x):
  g = jnp.einsum("ecd,edf->ecf", x, w["gate"])
  u = jnp.einsum("ecd,edf->ecf", x, w["up"])
  return jnp.einsum("ecf,efd->ecd", jax.nn.silu(g) * u, w["down"])


def _time(fn, args, iters):
  out = fn(*args)
  jax.block_until_ready(out)
  t0 = time.perf_counter()
  for _ in range(iters):
    out = fn(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - t0) / iters


def _mem(fn, args):
  ma = fn.lower(*args).compile().memory_analysis()
  if ma is None:
    return {}
  return {"arguments_gb": ma.argument_size_in_bytes / 1e9,
          "temporaries_gb": ma.temp_size_in_bytes / 1e9,
          "outputs_gb": ma.output_size_in_bytes / 1e9}


def run(experts=58, rows=13824, d=4096, f=1024, bits_list=(4, 8), iters=10, top_k=12, seed=0):
  key = jax.random.PRNGKey(seed)
  kx, kw, ka, kq = jax.random.split(key, 4)
  x = jax.random.normal(kx, (experts, rows, d), jnp.bfloat16)
  dy = jnp.ones((experts, rows, d), jnp.bfloat16)
  flops_fwd = 3 * 2 * experts * rows * d * f
  results = []

  def record(name, fwd, bwd, fargs, bargs, extra=None):
    t_f = _time(fwd, fargs, iters)
    t_b = _time(bwd, bargs, iters)
    r = {"variant": name, "fwd_ms": t_f * 1e3, "fwd_bwd_ms": t_b * 1e3,
         "rows_per_s_fwd_bwd": experts * rows / t_b, "tokens_per_s_fwd_bwd": experts * rows / t_b / top_k,
         "tflops_fwd": flops_fwd / t_f / 1e12, "tflops_fwd_bwd_dense_equiv": 3 * flops_fwd / t_b / 1e12,
         "mem_fwd": _mem(fwd, fargs), "mem_fwd_bwd": _mem(bwd, bargs)}
    r.update(extra or {})
    stats = jax.devices()[0].memory_stats() or {}
    r["peak_bytes_in_use_gb"] = stats.get("peak_bytes_in_use", 0) / 1e9
    print(json.dumps(r), flush=True)
    results.append(r)

  # ---- bf16 experts (trained in full)
  w = {"gate": 0.02 * jax.random.normal(kw, (experts, d, f), jnp.bfloat16),
       "up": 0.02 * jax.random.normal(jax.random.fold_in(kw, 1), (experts, d, f), jnp.bfloat16),
       "down": 0.02 * jax.random.normal(jax.random.fold_in(kw, 2), (experts, f, d), jnp.bfloat16)}
  fwd = jax.jit(_bf16_swiglu)

  @jax.jit
  def bwd(w, x, dy):
    y, vjp = jax.vjp(_bf16_swiglu, w, x)
    return vjp(dy)
  record("bf16", fwd, bwd, (w, x), (w, x, dy),
         {"weight_bytes_gb": sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(w)) / 1e9})
  del w

  for bits in bits_list:
    cfg = _cfg(bits, d, f)
    qb = jax.jit(lambda k: nn.init(tqp.qbase_specs(cfg, experts), k))(kq)
    ad = jax.jit(lambda k: nn.init(tqp.adapter_specs(cfg, experts), k))(ka)

    def f_tqp(ad, qb, x, _cfg=cfg):
      return tqp.tqp_grouped_swiglu(ad, qb, x, _cfg)
    fwd_q = jax.jit(f_tqp)

    @jax.jit
    def bwd_q(ad, qb, x, dy, _f=f_tqp):
      y, vjp = jax.vjp(lambda a, xx: _f(a, qb, xx), ad, x)
      return vjp(dy)
    wbytes = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(qb)) / 1e9
    abytes = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(ad)) / 1e9
    record(f"tqp{bits}", fwd_q, bwd_q, (ad, qb, x), (ad, qb, x, dy),
           {"weight_bytes_gb": wbytes, "adapter_bytes_gb_f32": abytes})
    del qb, ad
  return results


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--experts", type=int, default=58)
  ap.add_argument("--rows", type=int, default=13824)
  ap.add_argument("--d", type=int, default=4096)
  ap.add_argument("--f", type=int, default=1024)
  ap.add_argument("--bits", default="4,8")
  ap.add_argument("--iters", type=int, default=10)
  a = ap.parse_args()
  print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}", flush=True)
  run(a.experts, a.rows, a.d, a.f, tuple(int(b) for b in a.bits.split(",")), a.iters)


if __name__ == "__main__":
  main()
