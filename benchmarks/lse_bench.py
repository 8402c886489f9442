"""The head's per-chunk softmax statistics alone at stage_2b's chunk shape, by form.

    python -m benchmarks.lse_bench [--tokens N] [--vocab V] [--iters K]

One chunk of bf16 logits [4096, 131072] (1 GiB) read as float32: the logsumexp and the target's
logit, as `ops/head_ce` needs them. Forms:
  * two_pass: jax.nn.logsumexp (a max pass, then a sum pass) and take_along_axis (a gather);
  * one_pass3: `head_ce.api.lse_and_picked`, one variadic reduction of (max, sum, picked);
  * one_pass2: the variadic reduction of (max, sum) alone, the target's logit by a gather.
Prints each form's median time and the bandwidth of one read of the logits.
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from benchmarks.kernels_bench import bench
from lightning_jax.ops.head_ce import api


def _lse2(lg, tgt):
  lg = lg.astype(jnp.float32)
  ax = lg.ndim - 1
  m, s, _ = jax.lax.reduce((lg, jnp.ones_like(lg), jnp.zeros_like(lg)),
                           (jnp.float32(-jnp.inf), jnp.float32(0), jnp.float32(0)),
                           api._online_lse, (ax,))
  return m + jnp.log(s), jnp.take_along_axis(lg, tgt[..., None], axis=-1)[..., 0]


def _two_pass(lg, tgt):
  lg = lg.astype(jnp.float32)
  return (jax.nn.logsumexp(lg, axis=-1),
          jnp.take_along_axis(lg, tgt[..., None], axis=-1)[..., 0])


def main(argv=None):
  ap = argparse.ArgumentParser(prog="python -m benchmarks.lse_bench",
                               description=__doc__.splitlines()[0])
  ap.add_argument("--tokens", type=int, default=4096, help="Tokens in the chunk.")
  ap.add_argument("--vocab", type=int, default=131072, help="Vocabulary (the logits' width).")
  ap.add_argument("--iters", type=int, default=20, help="Timed calls per form (median).")
  a = ap.parse_args(argv)
  k1, k2 = jax.random.split(jax.random.PRNGKey(0))
  lg = (4.0 * jax.random.normal(k1, (a.tokens, a.vocab), jnp.float32)).astype(jnp.bfloat16)
  tgt = jax.random.randint(k2, (a.tokens,), 0, a.vocab)
  nbytes = lg.size * 2
  want = None
  for name, f in (("two_pass", _two_pass), ("one_pass3", api.lse_and_picked),
                  ("one_pass2", _lse2)):
    ms, _, out = bench(f, (lg, tgt), a.iters)
    if want is None:
      want = out
    err = max(float(jnp.max(jnp.abs(o - w))) for o, w in zip(out, want))
    print(f"{name:<10} {ms:7.3f} ms  {nbytes / ms / 1e9:5.2f} TB/s  max |diff| {err:.2e}",
          flush=True)


if __name__ == "__main__":
  main()
