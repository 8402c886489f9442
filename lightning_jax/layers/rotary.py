"""Rotary position embedding with interleaved pairs (x[2i], x[2i+1]), base 10000 (SPEC §2.8)."""
import jax.numpy as jnp


def rotary_tables(positions, head_dim: int, base: float = 10000.0):
  """cos, sin of shape [..., T, head_dim // 2] for integer positions [..., T]."""
  inv = 1.0 / (base ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  ang = positions.astype(jnp.float32)[..., None] * inv
  return jnp.cos(ang), jnp.sin(ang)


def apply_rotary(x, cos, sin):
  """Rotate interleaved pairs of x [B, T, H, D] by tables [B or 1, T, D/2] (float32 math)."""
  xf = x.astype(jnp.float32)
  x1, x2 = xf[..., 0::2], xf[..., 1::2]
  c, s = cos[..., None, :], sin[..., None, :]
  y1 = x1 * c - x2 * s
  y2 = x1 * s + x2 * c
  return jnp.stack([y1, y2], axis=-1).reshape(x.shape).astype(x.dtype)
