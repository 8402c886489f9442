"""The TQP base matmul's references (SPEC §4), float32 and obvious.

dequantized_matmul: out[e, c, o] = norms[e, o] * sum_n xr[e, c, n] * levels[codes[e, o, n]]
(unpack the codes, look the levels up, scale the rows, one batched matmul).
rotate: R x = H D x / sqrt(n) over the last axis, with H the Sylvester Hadamard matrix built
explicitly (D = diag(signs)): the dense matrix the fast rotations factor.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

F32 = jnp.float32


def unpack(codes, bits: int):
  """uint8 storage [..., n * bits / 8] -> int32 indices [..., n] (4 bits: low nibble first)."""
  if bits == 4:
    codes = jnp.stack([codes & 15, codes >> 4], -1).reshape(codes.shape[:-1] + (-1,))
  return codes.astype(jnp.int32)


def dequantized_matmul(xr, codes, norms, levels, bits: int):
  """xr [E, C, n] x the quantized weight [E, O, n] -> float32 [E, C, O]."""
  w = jnp.asarray(levels, F32)[unpack(codes, bits)] * norms.astype(F32)[..., None]
  return jnp.einsum("ecn,eon->eco", xr.astype(F32), w, precision=jax.lax.Precision.HIGHEST)


def hadamard(n: int):
  """The n x n Sylvester Hadamard matrix (entries +-1), float32."""
  h = jnp.ones((1, 1), F32)
  while h.shape[0] < n:
    h = jnp.block([[h, h], [h, -h]])
  return h


def rotate(x, signs):
  """H D x / sqrt(n) over the last axis of x [..., n], float32."""
  n = x.shape[-1]
  xs = x.astype(F32) * jnp.asarray(signs).astype(F32)
  return jnp.einsum("...m,nm->...n", xs, hadamard(n),
                    precision=jax.lax.Precision.HIGHEST) / jnp.sqrt(jnp.float32(n))


def adapter_matmul(xr, codes, norms, levels, bits: int, xb, a):
  """The base (no gradient) plus the rank-R adapter product xb a^T, float32 [E, C, O]."""
  base = jax.lax.stop_gradient(dequantized_matmul(xr, codes, norms, levels, bits))
  return base + jnp.einsum("ecr,eor->eco", xb.astype(F32), a.astype(F32),
                           precision=jax.lax.Precision.HIGHEST)
