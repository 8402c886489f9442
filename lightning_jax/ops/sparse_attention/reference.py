"""GSA attention over a selection, and the lightning indexer's scores: the float32-obvious
references (SPEC §2.3).

`attend(q, k, v, selection, query_chunk, mode)`: softmax attention of every query over its
selected keys (selection int32 [B, T, K], -1 = none), chunked over queries and rematerialised
per chunk. mode "gather" gathers the K selected keys/values per query (O(T K) work and memory);
"dense_masked" computes dense logits of a query chunk against all T keys under the selection's
mask (O(T^2) FLOPs, plain matmuls). Same result.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

_NEG = -1e30          # finite "minus infinity" for masked attention logits (no NaN gradients)


def indexer_scores(qi, ki, wi, bias, q_pos):
  """Lightning-indexer scores of a block of queries against all keys, float32 [B, Q, T].

  qi [B, Q, Hi, Di] indexer queries, ki [B, T, Di] the shared indexer key, wi [B, Q, Hi] raw
  head-weight logits, bias [Hi], q_pos [Q] absolute query positions. Keys after the query
  (j > q_pos) get -inf.
  """
  scale = 1.0 / math.sqrt(qi.shape[-1])
  raw = jnp.einsum("bqhd,btd->bqht", qi.astype(jnp.float32), ki.astype(jnp.float32),
                   preferred_element_type=jnp.float32) * scale
  gated = jax.nn.sigmoid(raw + bias.astype(jnp.float32)[:, None])
  s = jnp.einsum("bqh,bqht->bqt", jax.nn.sigmoid(wi.astype(jnp.float32)), gated)
  causal = jnp.arange(ki.shape[1])[None, :] <= q_pos[:, None]
  return jnp.where(causal[None], s, -jnp.inf)


def to_chunks(a, n: int, qc: int):
  """[B, T, ...] -> [n, B, qc, ...], zero-padding T up to n * qc."""
  B, T = a.shape[:2]
  pad = n * qc - T
  if pad:
    a = jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2))
  return jnp.moveaxis(a.reshape((B, n, qc) + a.shape[2:]), 1, 0)


def from_chunks(a, T: int):
  """[n, B, qc, ...] -> [B, T, ...]."""
  n, B, qc = a.shape[:3]
  return jnp.moveaxis(a, 0, 1).reshape((B, n * qc) + a.shape[3:])[:, :T]


def _attend_chunk(q_c, k, v, idx_c, scale):
  """Softmax attention of q_c [B, Q, H, D] over the keys idx_c [B, Q, K] (-1 = none), by gather."""
  valid = idx_c >= 0
  safe = jnp.maximum(idx_c, 0)
  take = jax.vmap(lambda a, i: a[i])                                  # [T,H,D],[Q,K] -> [Q,K,H,D]
  return attend_gathered(q_c, take(k, safe), take(v, safe), valid, scale)


def attend_gathered(q_c, ks, vs, valid, scale):
  """Softmax attention of q_c [B, Q, H, D] over gathered keys/values ks, vs [B, Q, K, H, D];
  valid [B, Q, K] marks the real ones (a row with none gives 0)."""
  logits = jnp.einsum("bqhd,bqkhd->bhqk", q_c, ks, preferred_element_type=jnp.float32) * scale
  mask = valid[:, None]                                               # [B, 1, Q, K]
  probs = jax.nn.softmax(jnp.where(mask, logits, _NEG), axis=-1)
  probs = jnp.where(mask, probs, 0.0)                                 # a row with no key -> 0
  out = jnp.einsum("bhqk,bqkhd->bqhd", probs.astype(vs.dtype), vs,
                   preferred_element_type=jnp.float32)
  return out.astype(q_c.dtype)


def _attend_chunk_masked(q_c, k, v, idx_c, scale):
  """The same result by dense [B, H, Q, T] logits under the selection's mask (matmul-friendly)."""
  B, Q, K = idx_c.shape
  T = k.shape[1]
  tgt = jnp.where(idx_c >= 0, idx_c, T)                               # -1 -> a dropped column
  bi = jnp.arange(B)[:, None, None]
  qi = jnp.arange(Q)[None, :, None]
  mask = jnp.zeros((B, Q, T + 1), bool).at[bi, qi, tgt].set(True)[..., :T][:, None]
  logits = jnp.einsum("bqhd,bkhd->bhqk", q_c, k, preferred_element_type=jnp.float32) * scale
  probs = jax.nn.softmax(jnp.where(mask, logits, _NEG), axis=-1)
  probs = jnp.where(mask, probs, 0.0)
  out = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
  return out.astype(q_c.dtype)


ATTENDS = {"gather": _attend_chunk, "dense_masked": _attend_chunk_masked}


def selection_to_mask(selection, T: int):
  """Selection int32 [B, T, K] (-1 padding) -> bool [B, T, T] key mask, by one scatter."""
  B, Tq, _ = selection.shape
  tgt = jnp.where(selection >= 0, selection, T)                       # -1 -> a dropped column
  bi = jnp.arange(B)[:, None, None]
  qi = jnp.arange(Tq)[:, None][None]
  return jnp.zeros((B, Tq, T + 1), bool).at[bi, qi, tgt].set(True)[..., :T]


def attend(q, k, v, selection, query_chunk: int, mode: str = "gather"):
  """Attention of q [B, T, H, D] over the selected keys, chunked over queries (see the module
  docstring); mode "gather" or "dense_masked"."""
  body_fn = ATTENDS[mode]
  B, T, H, D = q.shape
  qc = min(int(query_chunk), T)
  n = -(-T // qc)
  scale = 1.0 / math.sqrt(D)
  idx = selection
  if n * qc > T:
    idx = jnp.pad(idx, ((0, 0), (0, n * qc - T), (0, 0)), constant_values=-1)
  idx = jnp.moveaxis(idx.reshape(B, n, qc, -1), 1, 0)
  body = jax.checkpoint(lambda args: body_fn(args[0], k, v, args[1], scale))
  out = jax.lax.map(body, (to_chunks(q, n, qc), idx))
  return from_chunks(out, T)
