"""Sinkhorn normalisation of the mHC residual mixing logits (SPEC §2.5): the op's entry point,
a rolled loop (reference.py: the same rounds unrolled in Python)."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def sinkhorn(logits, iters: int = 20, eps: float = 1e-6):
  """[..., n, n] logits -> doubly stochastic [..., n, n] (float32)."""
  x = logits.astype(jnp.float32)
  m = jnp.exp(x - jax.lax.stop_gradient(jnp.max(x, axis=-1, keepdims=True)))

  def body(_, m):
    m = m / (jnp.sum(m, axis=-1, keepdims=True) + eps)
    return m / (jnp.sum(m, axis=-2, keepdims=True) + eps)

  # A rolled loop, not an unrolled one: unrolled, the 20 rounds' backward becomes ~100 separate
  # small reductions per call (x2 per layer); on GPU every one is a kernel to compile, and the
  # tiny model's training step did not finish compiling in 4 minutes (47 s rolled; PERFORMANCE.md).
  return jax.lax.fori_loop(0, iters, body, m)
