"""The head's per-chunk softmax statistics alone at stage_2b's chunk shape, by form.

    python -m benchmarks.lse_bench [--tokens N] [--vocab V] [--iters K]

One chunk of bf16 logits [4096, 131072] (1 GiB) read as float32: the logsumexp and the target's
logit, as `ops/head_ce` needs them. Forms:
  * two_pass: jax.nn.logsumexp (a max pass, then a sum pass) and take_along_axis (a gather);
  * one_pass3: one variadic reduction of (running max, sum of exp(x - max), the target's logit),
    one exp an element (tried in ops/head_ce in session 21 and taken out: on an H100 the B4 step
    gained 1.3 ms, within the spread, as this reduction is bound by its arithmetic);
  * one_pass2: the variadic reduction of (max, sum) alone, the target's logit by a gather.
Prints each form's median time, the bandwidth of one read of the logits and the largest
difference from two_pass.
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from benchmarks.kernels_bench import bench


def _online(a, b):
  """Two partial (max, sum of exp(x - max), picked) triples of one row, combined."""
  m1, s1, p1 = a
  m2, s2, p2 = b
  # one exp: the smaller max's sum scaled by exp(-|m1 - m2|); equal maxima (both -inf
  # included, where the difference is NaN) by 1
  e = jnp.where(m1 == m2, 1.0, jnp.exp(-jnp.abs(m1 - m2)))
  return jnp.maximum(m1, m2), jnp.where(m2 > m1, s1 * e + s2, s1 + s2 * e), p1 + p2


def _reduce(lg, picked):
  m, s, p = jax.lax.reduce((lg, jnp.ones_like(lg), picked),
                           (jnp.float32(-jnp.inf), jnp.float32(0), jnp.float32(0)), _online,
                           (lg.ndim - 1,))
  return m + jnp.log(s), p


def _one_pass3(lg, tgt):
  lg = lg.astype(jnp.float32)
  vocab = jax.lax.broadcasted_iota(jnp.int32, lg.shape, lg.ndim - 1)
  return _reduce(lg, jnp.where(vocab == tgt[..., None], lg, 0.0))


def _one_pass2(lg, tgt):
  lg = lg.astype(jnp.float32)
  lse, _ = _reduce(lg, jnp.zeros_like(lg))
  return lse, jnp.take_along_axis(lg, tgt[..., None], axis=-1)[..., 0]


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
  for name, f in (("two_pass", _two_pass), ("one_pass3", _one_pass3),
                  ("one_pass2", _one_pass2)):
    ms, _, out = bench(f, (lg, tgt), a.iters)
    if want is None:
      want = out
    err = max(float(jnp.max(jnp.abs(o - w))) for o, w in zip(out, want))
    print(f"{name:<10} {ms:7.3f} ms  {nbytes / ms / 1e9:5.2f} TB/s  max |diff| {err:.2e}",
          flush=True)


if __name__ == "__main__":
  main()
