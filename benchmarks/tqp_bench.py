"""TQP expert matmul vs bf16 experts at the 120B per-device shape (GPU; the lead runs it).

  python -m benchmarks.tqp_bench [--experts=58] [--rows=13824] [--bits=4,8] [--iters=10]
                                 [--only=base,swiglu]

Per device at 120B (8 GPUs, expert parallel 8, micro-batch 8 x 8192 tokens, top-12 of 460):
8 x 65536 x 12 / 460 = 13.7K routed rows per expert, 58 local experts, so xg is [58, 13824, 4096].

"base" rows: ONE base matmul (gate/up shape 4096 -> 1024, and down shape 1024 -> 4096), forward,
  bf16 einsum on bf16 weights [E, O, n] (the dense rate: the target) vs the TQP base
  n ⊙ (Q xr): xla = dequantise to bf16 in XLA, then einsum (tqp._qbase "xla"); pallas = the
  dequantising kernel (ops/expert_matmul/kernel.py) at its default tiles and a few others; and the
  input rotation alone, which every TQP matrix pays on top (tqp.rotate in XLA vs the one-pass
  Pallas expert_matmul.rotate, natural and split layouts).
"swiglu" rows: one grouped SwiGLU (gate/up 4096->1024, down 1024->4096), forward and
  forward+backward:
  bf16          dense bf16 expert weights [58, 4096, 1024] x3, gradients to weights and input
                (what training the routed experts in full would run);
  tqp4-xla      4-bit TurboQuant base (0.5 byte/weight) + rank-16 adapters, gradients to adapters
                and input (the base is stop-gradient), base via XLA dequantise + einsum;
  tqp4-xla_rotate  XLA dequantise + einsum after the one-pass Pallas rotation (the GPU default);
  tqp4-pallas   the same with the Pallas kernel (tqp.kernel="pallas");
  tqp4-pallas_rotate  the Pallas kernel fed by the one-pass Pallas rotation (split layout);
  tqp8-*        8-bit base.
Reported: time per call, routed rows/s and tokens/s (rows / top_k), TFLOP/s of the dense
matmuls, the compiled memory analysis (arguments, temporaries) and the device's peak bytes.
Every variant runs in its own try/except: a failure prints its error and the rest still run.
"""
from __future__ import annotations

import argparse
import json
import time
import traceback

import jax
import jax.numpy as jnp

from configs.common import get_base_config
from lightning_jax import nn, tqp
from lightning_jax.ops.expert_matmul import api as expert_matmul


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


def _compiled(fn, args):
  """AOT-compile once: the same executable is timed and gives the memory analysis."""
  return fn.lower(*args).compile()


def _mem(compiled):
  ma = compiled.memory_analysis()
  if ma is None:
    return {}
  return {"arguments_gb": ma.argument_size_in_bytes / 1e9,
          "temporaries_gb": ma.temp_size_in_bytes / 1e9,
          "outputs_gb": ma.output_size_in_bytes / 1e9}


def _guard(name, fn):
  try:
    return fn()
  except Exception as err:  # noqa: BLE001  (one failing variant must not lose the others)
    traceback.print_exc()
    print(json.dumps({"variant": name, "error": f"{type(err).__name__}: {str(err)[:400]}"}),
          flush=True)
    return None


def run_base(experts=58, rows=13824, d=4096, f=1024, bits_list=(4, 8), iters=10, seed=0):
  """One base matmul per shape: bf16 einsum vs TQP xla / pallas (several tiles), + rotation."""
  key = jax.random.PRNGKey(seed)
  results = []
  for n, o in ((d, f), (f, d)):
    flops = 2.0 * experts * rows * n * o
    x = jax.random.normal(jax.random.fold_in(key, n), (experts, rows, n), jnp.bfloat16)
    t_dense = None

    def rec(name, fn, args, bits=None):
      nonlocal t_dense
      fn = _compiled(fn, args)
      t = _time(fn, args, iters)
      if name == "bf16 einsum":
        t_dense = t
      r = {"base": f"{n}->{o}", "variant": name, "ms": t * 1e3, "tflops": flops / t / 1e12,
           "pct_of_bf16": (100 * t_dense / t) if t_dense else None, "mem": _mem(fn)}
      print(json.dumps(r), flush=True)
      results.append(r)

    def dense():
      w = 0.02 * jax.random.normal(jax.random.fold_in(key, 7), (experts, o, n), jnp.bfloat16)
      rec("bf16 einsum", jax.jit(lambda x, w: jnp.einsum("ecn,eon->eco", x, w)), (x, w))
    _guard(f"bf16 einsum {n}->{o}", dense)
    signs = jnp.where(jax.random.bernoulli(key, 0.5, (n,)), 1, -1).astype(jnp.int8)
    _guard(f"rotate {n}", lambda: rec("rotate xla (tqp.rotate, every TQP matrix pays it)",
                                      jax.jit(tqp.rotate), (x, signs)))
    for split in (False, True):
      _guard(f"rotate pallas {n} split={split}", lambda _s=split: rec(
          f"rotate pallas (expert_matmul.rotate, split={_s})",
          jax.jit(lambda x, s: expert_matmul.rotate(x, s, split=_s)), (x, signs)))
    for bits in bits_list:
      idx = jax.random.randint(jax.random.fold_in(key, bits), (experts, o, n), 0, 2 ** bits)
      q = {"codes": tqp.pack(idx, bits), "norms": jnp.ones((experts, o), jnp.float32),
           "signs": signs}
      del idx
      lv = jnp.asarray(tqp.codebook(n, bits))
      _guard(f"tqp{bits} xla", lambda: rec(
          f"tqp{bits} xla (dequantise + einsum)",
          jax.jit(lambda x, q, _b=bits: tqp._qbase(x, q, _b, jnp.bfloat16, "xla")), (x, q)))
      tiles = [{}, {"w_first": True}, {"lookup": "select"}, {"x_layout": "strided"},
               {"block_m": 64, "num_warps": 4}, {"block_m": 256, "block_k": 64},
               {"block_n": 256, "block_k": 64}]
      if bits == 8:
        tiles = [t for t in tiles if "x_layout" not in t and "lookup" not in t]
      for t in tiles:
        name = f"tqp{bits} pallas {dict(expert_matmul.default_blocks(bits), **t)}"
        _guard(name, lambda _t=t, _b=bits, _n=name: rec(
            _n, jax.jit(lambda x, c, nr, lv: expert_matmul.tqp_matmul(x, c, nr, lv, _b, **_t)),
            (x, q["codes"], q["norms"], lv)))
    del x
  return results


def _tqp_variant(bits, kernel, experts, d, f, x, dy, ka, kq, record):
  cfg = _cfg(bits, d, f)
  cfg.tqp.kernel = kernel
  qb = jax.jit(lambda k: nn.init(tqp.qbase_specs(cfg, experts), k))(kq)
  ad = jax.jit(lambda k: nn.init(tqp.adapter_specs(cfg, experts), k))(ka)

  def f_tqp(ad, qb, x):
    return tqp.tqp_grouped_swiglu(ad, qb, x, cfg)
  fwd_q = jax.jit(f_tqp)

  @jax.jit
  def bwd_q(ad, qb, x, dy):
    y, vjp = jax.vjp(lambda a, xx: f_tqp(a, qb, xx), ad, x)
    return vjp(dy)
  wbytes = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(qb)) / 1e9
  abytes = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(ad)) / 1e9
  record(f"tqp{bits}-{kernel}", fwd_q, bwd_q, (ad, qb, x), (ad, qb, x, dy),
         {"weight_bytes_gb": wbytes, "adapter_bytes_gb_f32": abytes})


def run(experts=58, rows=13824, d=4096, f=1024, bits_list=(4, 8), iters=10,
        kernels=("xla", "xla_rotate", "pallas", "pallas_rotate"), top_k=12, seed=0):
  key = jax.random.PRNGKey(seed)
  kx, kw, ka, kq = jax.random.split(key, 4)
  x = jax.random.normal(kx, (experts, rows, d), jnp.bfloat16)
  dy = jnp.ones((experts, rows, d), jnp.bfloat16)
  flops_fwd = 3 * 2 * experts * rows * d * f
  results = []

  def record(name, fwd, bwd, fargs, bargs, extra=None):
    fwd, bwd = _compiled(fwd, fargs), _compiled(bwd, bargs)
    t_f = _time(fwd, fargs, iters)
    t_b = _time(bwd, bargs, iters)
    r = {"variant": name, "fwd_ms": t_f * 1e3, "fwd_bwd_ms": t_b * 1e3,
         "rows_per_s_fwd_bwd": experts * rows / t_b, "tokens_per_s_fwd_bwd": experts * rows / t_b / top_k,
         "tflops_fwd": flops_fwd / t_f / 1e12, "tflops_fwd_bwd_dense_equiv": 3 * flops_fwd / t_b / 1e12,
         "mem_fwd": _mem(fwd), "mem_fwd_bwd": _mem(bwd)}
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
  _guard("bf16", lambda: record(
      "bf16", fwd, bwd, (w, x), (w, x, dy),
      {"weight_bytes_gb": sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(w)) / 1e9}))
  del w

  for bits in bits_list:
    for kernel in kernels:
      _guard(f"tqp{bits}-{kernel}", lambda _b=bits, _k=kernel: _tqp_variant(
          _b, _k, experts, d, f, x, dy, ka, kq, record))
  return results


def main():
  ap = argparse.ArgumentParser(prog="python -m benchmarks.tqp_bench",
                               description=__doc__.splitlines()[0])
  ap.add_argument("--experts", type=int, default=58, help="Local experts (groups) per device.")
  ap.add_argument("--rows", type=int, default=13824, help="Routed rows per expert.")
  ap.add_argument("--d", type=int, default=4096, help="Model width (gate/up input, down "
                  "output).")
  ap.add_argument("--f", type=int, default=1024, help="Expert hidden width (gate/up output, down "
                  "input).")
  ap.add_argument("--bits", default="4,8", help="Comma list of TQP base bit widths.")
  ap.add_argument("--iters", type=int, default=10, help="Calls per row after one warm-up "
                  "call, timed together (mean reported).")
  ap.add_argument("--only", default="base,swiglu", help="Comma list of row groups to run (base, "
                  "swiglu).")
  ap.add_argument("--kernels", default="xla,xla_rotate,pallas,pallas_rotate",
                  help="For the swiglu rows: comma list of tqp.kernel values.")
  a = ap.parse_args()
  only = set(a.only.split(","))
  bits = tuple(int(b) for b in a.bits.split(","))
  print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}", flush=True)
  if "base" in only:
    run_base(a.experts, a.rows, a.d, a.f, bits, a.iters)
  if "swiglu" in only:
    run(a.experts, a.rows, a.d, a.f, bits, a.iters, tuple(a.kernels.split(",")))


if __name__ == "__main__":
  main()
