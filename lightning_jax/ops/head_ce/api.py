"""The LM head and its cross-entropy (the op's entry point): `head_logits` (custom VJP: the
logit cotangent rounded to the compute dtype before both backward matmuls) and
`chunked_cross_entropy` (never all float32 logits at once). reference.py: the same loss from
full float32 logits by plain autodiff.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def head_logits(h, w, dtype):
  """float32 logits h [B, t, d] @ w [d, V] with both operands in the compute dtype.

  Plain autodiff would hand the float32 logit cotangent to both backward matmuls, which then
  run in float32 (the largest matmuls of a step at 131K vocabulary). Here the cotangent is
  rounded to the compute dtype first, as for every other layer, and both gradients accumulate
  in float32; dw comes back in w's dtype (the float32 master). Equal to autodiff in float32.
  """
  return jnp.einsum("btd,dv->btv", h.astype(dtype), w.astype(dtype),
                    preferred_element_type=jnp.float32)


def _head_logits_fwd(h, w, dtype):
  return head_logits(h, w, dtype), (h, w)


def _head_logits_bwd(dtype, res, g):
  h, w = res
  gd = g.astype(dtype)
  dh = jnp.einsum("btv,dv->btd", gd, w.astype(dtype), preferred_element_type=jnp.float32)
  dw = jnp.einsum("btd,btv->dv", h.astype(dtype), gd, preferred_element_type=jnp.float32)
  return dh.astype(h.dtype), dw.astype(w.dtype)


head_logits.defvjp(_head_logits_fwd, _head_logits_bwd)


def chunked_cross_entropy(h, w, targets, chunk_tokens: int, dtype=jnp.float32):
  """Mean CE of logits h @ w against targets, chunked over the sequence.

  The chunk holds `chunk_tokens` tokens of the whole traced batch (seq chunk of
  max(1, chunk_tokens // B) positions); each chunk's body is rematerialised in the backward
  pass, so only one chunk's float32 logits [B, chunk, V] exist at any time.
  """
  b, t, d = h.shape
  tc = max(1, min(t, chunk_tokens // max(b, 1)))
  n = -(-t // tc)
  pad = n * tc - t
  mask = jnp.ones((b, t), jnp.float32)
  if pad:
    h = jnp.pad(h, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, pad)))
    mask = jnp.pad(mask, ((0, 0), (0, pad)))
  hs = jnp.swapaxes(h.reshape(b, n, tc, d), 0, 1)
  ts = jnp.swapaxes(targets.reshape(b, n, tc), 0, 1)
  ms = jnp.swapaxes(mask.reshape(b, n, tc), 0, 1)

  @jax.checkpoint
  def chunk(hc, tgt, mc):
    lg = head_logits(hc, w, dtype)
    lse = jax.nn.logsumexp(lg, axis=-1)
    picked = jnp.take_along_axis(lg, tgt[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return jnp.sum((lse - picked) * mc)

  def body(acc, xs):
    return acc + chunk(*xs), None

  total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), (hs, ts, ms))
  return total / (b * t)
