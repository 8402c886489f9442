"""RMSNorm's reference: x / sqrt(mean(x^2) + eps) * scale over the last axis, float32, plain
autodiff (api.rms_norm has the same forward and a hand-written backward)."""
from __future__ import annotations

import jax.numpy as jnp


def rms_norm(x, scale=None, eps: float = 1e-6):
  """Float32 variance and scaling; the result in x's dtype."""
  xf = x.astype(jnp.float32)
  var = jnp.mean(jnp.square(xf), axis=-1, keepdims=True)
  y = xf * jnp.reciprocal(jnp.sqrt(var + eps))
  if scale is not None:
    y = y * scale.astype(jnp.float32)
  return y.astype(x.dtype)
