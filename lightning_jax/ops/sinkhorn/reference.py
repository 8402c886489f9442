"""Sinkhorn's reference: exp of the (row-max shifted) logits, then `iters` rounds of row and
column normalisation written out one by one in Python, float32, plain autodiff."""
from __future__ import annotations

import jax.numpy as jnp


def sinkhorn(logits, iters: int = 20, eps: float = 1e-6):
  x = logits.astype(jnp.float32)
  m = jnp.exp(x - jnp.max(x, axis=-1, keepdims=True))
  for _ in range(int(iters)):
    m = m / (jnp.sum(m, axis=-1, keepdims=True) + eps)
    m = m / (jnp.sum(m, axis=-2, keepdims=True) + eps)
  return m
