"""Library kernels tried before our own (issue 11): tokamax's ragged dot at the 120B expert shape.

    python -m benchmarks.tokamax_bench [--small] [--iters 10]

One device's share of a 120B MoE layer: 58 local experts, 786,944 rows (65,536 tokens x top-12,
rounded to equal groups of 13,568), gate/up 4096 -> 1024 and down 1024 -> 4096, bf16:
  dense       one [M, 4096] x [4096, 1024] matmul (the rate to reach)
  einsum      the batched einsum on equal groups (what moe.grouped_swiglu does on padded groups)
  tokamax     tokamax.ragged_dot (Pallas Mosaic GPU kernel on sm90), bf16 and with the expert
              weights quantised to int4 by qwix (tiles of 128 along K; affine int4, not TQP's
              codebook — it is the rate an int4 dequantising kernel reaches on this GPU)
(jax.lax.ragged_dot is not run: on jax 0.11.2 / H100 XLA lowers it at this shape to a dense dot
over a [786944, 237568] operand and the autotuner asks for 348 GiB.)
Forward only for every row, forward+backward for the bf16 ones. tokamax is optional: its absence is
printed and the XLA rows still run. Results are TFLOP/s against the dense row.
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from benchmarks.kernels_bench import bench, guarded, record


def main(argv=None):
  ap = argparse.ArgumentParser(prog="python -m benchmarks.tokamax_bench",
                               description=__doc__.splitlines()[0])
  ap.add_argument("--small", action="store_true", help="Toy shapes (CPU smoke run).")
  ap.add_argument("--iters", type=int, default=10, help="Timed runs per row after warm-up "
                  "(median reported).")
  a = ap.parse_args(argv)
  g, rows, d, f = (4, 64, 128, 64) if a.small else (58, 13568, 4096, 1024)
  m = g * rows
  print(f"devices: {jax.devices()}  jax {jax.__version__}  M={m} groups={g} d={d} f={f}", flush=True)
  kx, kw, kd = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, (m, d), jnp.bfloat16)
  w = (jax.random.normal(kw, (g, d, f), jnp.float32) * 0.02).astype(jnp.bfloat16)
  wd = (jax.random.normal(kd, (g, f, d), jnp.float32) * 0.02).astype(jnp.bfloat16)
  sizes = jnp.full((g,), rows, jnp.int32)
  flops = 2.0 * m * d * f
  rates = {}

  def row(name, fn, args, mult=1.0):
    def go():
      ms, first, _ = bench(fn, args, iters=a.iters)
      tf = mult * flops / ms / 1e9
      base = rates.get("dense", tf if name == "dense" else None)
      rates.setdefault(name, tf)
      pct = f"{100 * tf / base:5.1f}% of dense fwd" if base else ""
      record(name, ms, f"{tf:7.1f} TFLOP/s {pct} (first call {first:.1f} s)")
    guarded(name, go)

  row("dense", lambda x, w: x @ w[0], (x, w))
  row("einsum", lambda x, w: jnp.einsum("gcd,gdf->gcf", x.reshape(g, rows, d), w), (x, w))
  row("einsum down", lambda h, w: jnp.einsum("gcf,gfd->gcd", h.reshape(g, rows, f), w),
      (x[:, :f], wd))

  def loss_of(mm):
    return lambda x, w, *r: jnp.sum(mm(x, w, *r).astype(jnp.float32) ** 2)
  bwd = lambda mm: jax.grad(loss_of(mm), argnums=(0, 1))
  row("einsum fwd+bwd", bwd(lambda x, w: jnp.einsum("gcd,gdf->gcf", x.reshape(g, rows, d), w)),
      (x, w), mult=3.0)

  try:
    import tokamax
  except ImportError as e:
    print(f"tokamax not importable ({e}); its rows are skipped", flush=True)
    return
  tk = lambda x, w, s: tokamax.ragged_dot(x, w, s, implementation="mosaic")
  row("tokamax.ragged_dot mosaic bf16", tk, (x, w, sizes))
  row("tokamax.ragged_dot mosaic bf16 down", tk, (x[:, :f], wd, sizes))
  row("tokamax.ragged_dot default bf16", lambda x, w, s: tokamax.ragged_dot(x, w, s),
      (x, w, sizes))
  row("tokamax.ragged_dot mosaic bf16 fwd+bwd", bwd(tk), (x, w, sizes), mult=3.0)

  def int4():
    import qwix
    wq = qwix.quantize(w, jnp.int4, tiled_axes={0: 1, 1: 128, 2: 1})
    print(f"int4 rhs: qvalue {wq.qvalue.dtype}{wq.qvalue.shape}, scale {wq.scale.shape}", flush=True)
    row("tokamax.ragged_dot mosaic int4 (qwix)", tk, (x, wq, sizes))
  guarded("int4 setup", int4)


if __name__ == "__main__":
  main()
