"""The streams' gradient kernels (ops/stream_grad) alone at stage_2b's B4 x T4096 shape, by block.

    python -m benchmarks.stream_grad_bench [--tokens N] [--iters K]

Prints, for each block setting, the median time of jit(kernel) over K calls and the bandwidth
its bytes imply (state_grad: dx', x, dv read once and dx written; mix_grads: dx', x, y read, dy
written), and the same formulas as XLA fusions (ops/stream_grad/reference.py) beside them.
"""
from __future__ import annotations

import argparse
import jax
import jax.numpy as jnp

from benchmarks.kernels_bench import bench
from lightning_jax.ops.stream_grad import kernel, reference


def _time(f, args, iters):
  """Median seconds of f(*args) (kernels_bench.bench: jit, warm-up, median)."""
  return bench(f, args, iters)[0] / 1e3


def main(argv=None):
  ap = argparse.ArgumentParser(prog="python -m benchmarks.stream_grad_bench",
                               description=__doc__.splitlines()[0])
  ap.add_argument("--tokens", type=int, default=16384, help="Tokens (B x T).")
  ap.add_argument("--iters", type=int, default=20, help="Timed calls per setting (median).")
  a = ap.parse_args(argv)
  n, s, d, m = a.tokens, 4, 4096, 24
  ks = jax.random.split(jax.random.PRNGKey(0), 9)
  bf, f32 = jnp.bfloat16, jnp.float32
  x = jax.random.normal(ks[0], (n, s, d), bf)
  dxp = jax.random.normal(ks[1], (n, s, d), bf)
  dv = jax.random.normal(ks[2], (n, d), bf)
  r, c = jax.random.uniform(ks[3], (n,), f32), jax.random.normal(ks[4], (n,), f32)
  hp, hr = jax.random.uniform(ks[5], (n, s), f32), jax.random.uniform(ks[6], (n, s, s), f32)
  dz, gw = jax.random.normal(ks[7], (n, m), f32), 0.02 * jax.random.normal(ks[8], (s * d, m), bf)
  args = (x, dxp, dv, r, c, hp, hr, dz, gw)
  state_bytes = n * s * d * 2
  sg_bytes = 3 * state_bytes + n * d * 2
  ref = jax.jit(lambda *a: reference.state_grad(*a).astype(bf))
  t = _time(ref, args, a.iters)
  print(f"state_grad XLA reference: {t * 1e3:.3f} ms, {sg_bytes / t / 1e12:.2f} TB/s", flush=True)
  for bn, bd, w, prod in ((16, 128, 4, "fma"), (32, 128, 8, "fma"), (64, 64, 8, "fma"),
                          (32, 128, 4, "fma"), (16, 256, 4, "fma"), (64, 128, 8, "fma"),
                          (16, 128, 4, "mma"), (64, 64, 4, "mma")):
    f = jax.jit(lambda *a, bn=bn, bd=bd, w=w, prod=prod: kernel.state_grad(
        *a, block_n=bn, block_d=bd, num_warps=w, product=prod))
    name = f"state_grad {prod} {bn}x{bd} w{w}"
    try:
      t = _time(f, args, a.iters)
      print(f"{name}: {t * 1e3:.3f} ms, {sg_bytes / t / 1e12:.2f} TB/s", flush=True)
    except Exception as e:  # noqa: BLE001
      print(f"{name}: failed {type(e).__name__} {str(e)[:200]}", flush=True)
  y = jax.random.normal(ks[2], (n, d), bf)
  hpost = jax.random.uniform(ks[5], (n, s), f32)
  mix_bytes = 2 * state_bytes + 2 * n * d * 2
  for bn, bd, w in ((16, 128, 4), (64, 64, 8)):
    f = jax.jit(lambda *a, bn=bn, bd=bd, w=w: kernel.mix_grads(*a, block_n=bn, block_d=bd,
                                                                num_warps=w))
    try:
      t = _time(f, (dxp, x, y, hpost), a.iters)
      print(f"mix_grads {bn}x{bd} w{w}: {t * 1e3:.3f} ms, {mix_bytes / t / 1e12:.2f} TB/s",
            flush=True)
    except Exception as e:  # noqa: BLE001
      print(f"mix_grads {bn}x{bd} w{w}: failed {type(e).__name__} {str(e)[:200]}", flush=True)


if __name__ == "__main__":
  main()
