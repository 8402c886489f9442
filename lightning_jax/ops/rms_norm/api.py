"""RMSNorm with float32 variance (SPEC §2.8: eps 1e-6): the op's entry point `rms_norm`.

The backward is written out (custom_vjp) so that only the input is kept for it: plain autodiff of
the float32 formula keeps up to five float32 copies of x (the cast, x * r, the scaled product),
which at the mHC streams' flattened width (4 x d_model = 16,384 at 2B) was 1.5 GB per norm per
layer at B1 x T4096 — more than half of a layer's saved activations. The forward is the
reference's computation (bit for bit), which the reversible stack's exact recompute relies on.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from lightning_jax.ops.rms_norm.reference import rms_norm as _forward


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _rms_norm_scaled(x, scale, eps):
  return _forward(x, scale, eps)


def _scaled_fwd(x, scale, eps):
  return _forward(x, scale, eps), (x, scale)


def _scaled_bwd(eps, res, g):
  x, scale = res
  xf = x.astype(jnp.float32)
  r = jnp.reciprocal(jnp.sqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + eps))
  n = xf * r
  gf = g.astype(jnp.float32)
  dscale = jnp.sum(gf * n, axis=tuple(range(x.ndim - 1))).reshape(scale.shape)
  gs = gf * scale.astype(jnp.float32)
  dx = r * (gs - n * jnp.mean(gs * n, axis=-1, keepdims=True))
  return dx.astype(x.dtype), dscale.astype(scale.dtype)


_rms_norm_scaled.defvjp(_scaled_fwd, _scaled_bwd)


def rms_norm(x, scale=None, eps: float = 1e-6):
  """x / sqrt(mean(x^2) + eps) * scale over the last axis; variance in float32."""
  if scale is None or jnp.ndim(scale) != 1:
    return _forward(x, scale, eps)       # no learnable scale (or an unusual one): plain autodiff
  return _rms_norm_scaled(x, scale, float(eps))
