"""RMSNorm with float32 variance (SPEC §2.8: eps 1e-6)."""
import jax.numpy as jnp

from lightning_jax import nn


def rms_norm_specs(dim: int, axis: str | None = "embed") -> dict:
  return {"scale": nn.Spec((dim,), (axis,), nn.ones)}


def rms_norm(x, scale=None, eps: float = 1e-6):
  """x / sqrt(mean(x^2) + eps) * scale over the last axis; variance in float32."""
  xf = x.astype(jnp.float32)
  var = jnp.mean(jnp.square(xf), axis=-1, keepdims=True)
  y = xf * jnp.reciprocal(jnp.sqrt(var + eps))
  if scale is not None:
    y = y * scale.astype(jnp.float32)
  return y.astype(x.dtype)
