"""Kronecker codec embedding (SPEC §2.7): no embedding table, a fixed byte x position code.

Each token id maps to its UTF-8 bytes b_0..b_{L-1} (L <= max_bytes = 32). The fixed code is

    kappa = (1/sqrt(L)) * sum_p onehot_256(b_p) (x) onehot_32(p),   flat index = byte * 32 + p,

z-normalised per token with the UNBIASED std (ddof=1) and eps added to the std:
z = (kappa - mean) / (std + 1e-6). A learned matrix [8192, d] (no bias, init N(0, 0.02/sqrt(8192)))
projects it, then RMSNorm.

Zero-length tokens (holes in a vocabulary, ids padded past the tokenizer's size): kappa = 0, so
mean = std = 0 and z = 0 / (0 + eps) = 0; their embedding is RMSNorm(0) = 0 (the reference also
encodes an empty token as the zero vector).

Truncation: a token longer than `max_bytes` is cut at the last UTF-8 character boundary at or
before `max_bytes` (never inside a multi-byte character). A boundary is a position whose byte is
not a continuation byte (0b10xxxxxx). For raw byte tokens that are themselves partial UTF-8 and
have no boundary in the last 3 positions before the cut, the cut falls at `max_bytes` exactly.

Two interchangeable forms (cfg.model.embed.form):
  "table"      frozen["embed"]["table"]: the z-normalised [V, 8192] codes (bf16 when the compute
               dtype is bf16); the embedding is table[ids] @ proj.
  "on_the_fly" frozen["embed"]["bytes"] uint8 [V, 32] + ["lengths"] int16 [V] (about 4.5 MB);
               each step rebuilds only the batch's codes (`on_the_fly_codes`) in one elementwise
               pass, with the z-normalisation in closed form: kappa has exactly L non-zero
               entries, all 1/sqrt(L), so mean = sqrt(L)/8192 and the unbiased
               std = sqrt((1 - L/8192) / 8191). Tested equal to the table form.
"""
from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lightning_jax import nn
from lightning_jax.config import ConfigError, compat
from lightning_jax.layers.norms import rms_norm, rms_norm_specs
from lightning_jax.vocab import token_bytes_list

N_BYTES = 256


def codec_dim(max_bytes: int = 32) -> int:
  return N_BYTES * max_bytes


def _is_continuation(b: int) -> bool:
  return (b & 0xC0) == 0x80


def truncate_utf8(raw: bytes, max_bytes: int = 32) -> bytes:
  """Cut `raw` to at most max_bytes at a UTF-8 character boundary (see module docstring)."""
  if len(raw) <= max_bytes:
    return raw
  # The cut at `end` is on a boundary when raw[end] starts a character (is not a continuation).
  for end in range(max_bytes, max(max_bytes - 3, 1) - 1, -1):
    if not _is_continuation(raw[end]):
      return raw[:end]
  return raw[:max_bytes]


def _reference_text_bytes(raw: bytes) -> bytes:
  """The reference's behaviour: decode to text (partial UTF-8 -> U+FFFD), re-encode."""
  return raw.decode("utf-8", errors="replace").encode("utf-8")


def build_byte_buffers(token_bytes: Sequence[bytes], max_bytes: int = 32,
                       reference_text_decode: bool = False):
  """uint8 [V, max_bytes] byte buffers and int16 [V] lengths for a list of token byte strings."""
  v = len(token_bytes)
  buf = np.zeros((v, max_bytes), np.uint8)
  lengths = np.zeros((v,), np.int16)
  for i, raw in enumerate(token_bytes):
    if isinstance(raw, str):
      raw = raw.encode("utf-8")
    if not isinstance(raw, (bytes, bytearray)):
      raise TypeError(f"token {i} is {type(raw).__name__}; expected bytes (or str).")
    raw = bytes(raw)
    if reference_text_decode:
      raw = _reference_text_bytes(raw)
    raw = truncate_utf8(raw, max_bytes)
    n = len(raw)
    if n:
      buf[i, :n] = np.frombuffer(raw, np.uint8)
    lengths[i] = n
  return buf, lengths


def kappa_vectors(bytes_, lengths):
  """The raw code kappa, float32 [N, 256 * max_bytes] (before z-normalisation)."""
  bytes_ = jnp.asarray(bytes_)
  lengths = jnp.asarray(lengths).astype(jnp.int32)
  n, max_bytes = bytes_.shape
  pos = jnp.arange(max_bytes)
  valid = pos[None, :] < lengths[:, None]
  scale = jax.lax.rsqrt(jnp.maximum(lengths, 1).astype(jnp.float32))
  vals = valid.astype(jnp.float32) * scale[:, None]                        # [N, P]
  onehot = jax.nn.one_hot(bytes_.astype(jnp.int32), N_BYTES, dtype=jnp.float32)  # [N, P, 256]
  m = onehot * vals[..., None]
  return jnp.swapaxes(m, 1, 2).reshape(n, N_BYTES * max_bytes)             # byte * P + p


def codec_vectors(bytes_, lengths, eps: float = 1e-6):
  """z-normalised codes float32 [N, 256 * max_bytes]: (kappa - mean) / (std_ddof1 + eps)."""
  k = kappa_vectors(bytes_, lengths)
  mean = jnp.mean(k, axis=-1, keepdims=True)
  std = jnp.std(k, axis=-1, keepdims=True, ddof=1)
  return (k - mean) / (std + eps)


def _z_stats(lengths, dim: int, eps: float):
  """Closed-form mean and 1/(std+eps) of z-normalisation for codes with L ones of 1/sqrt(L)."""
  L = lengths.astype(jnp.float32)
  mean = jnp.sqrt(L) / dim
  sumsq = jnp.where(L > 0, 1.0, 0.0)
  var = jnp.maximum(sumsq - dim * mean * mean, 0.0) / (dim - 1)
  return mean, 1.0 / (jnp.sqrt(var) + eps)


def build_table(bytes_, lengths, dtype=jnp.float32, eps: float = 1e-6, chunk: int = 8192):
  """The [V, 8192] z-normalised table, built in chunks on the host (numpy result)."""
  bytes_ = np.asarray(bytes_)
  lengths = np.asarray(lengths)
  v, p = bytes_.shape
  np_dtype = np.dtype(jnp.dtype(dtype))
  out = np.empty((v, N_BYTES * p), np_dtype)
  fn = jax.jit(lambda b, l: codec_vectors(b, l, eps).astype(dtype))
  for s in range(0, v, chunk):
    e = min(v, s + chunk)
    out[s:e] = np.asarray(fn(bytes_[s:e], lengths[s:e]))
  return out


# ----------------------------------------------------------------------------- variables
def embed_specs(cfg) -> dict:
  d = cfg.model.d_model
  dim = codec_dim(cfg.model.embed.max_bytes)
  return {"proj": nn.Spec((dim, d), ("codec", "embed"), nn.normal(0.02 / math.sqrt(dim))),
          "norm": rms_norm_specs(d)}


def frozen_abstract(cfg) -> dict:
  """Shapes of frozen["embed"] for the configured form (for jax.eval_shape / counting)."""
  v, mb = cfg.model.vocab_size, cfg.model.embed.max_bytes
  if cfg.model.embed.form == "table":
    return {"table": jax.ShapeDtypeStruct((v, N_BYTES * mb), nn.dtype_of(cfg.model.dtype))}
  return {"bytes": jax.ShapeDtypeStruct((v, mb), jnp.uint8),
          "lengths": jax.ShapeDtypeStruct((v,), jnp.int16)}


def frozen_from_buffers(bytes_, lengths, cfg) -> dict:
  """frozen["embed"] for the configured form, from byte buffers of exactly vocab_size rows."""
  v = cfg.model.vocab_size
  if bytes_.shape[0] != v:
    raise ConfigError(f"the codec has {bytes_.shape[0]} token byte rows but model.vocab_size={v}; "
                      "expected one row per vocabulary id.")
  if cfg.model.embed.form == "table":
    table = build_table(bytes_, lengths, nn.dtype_of(cfg.model.dtype), cfg.model.embed.z_eps)
    return {"table": jnp.asarray(table)}
  return {"bytes": jnp.asarray(bytes_, jnp.uint8), "lengths": jnp.asarray(lengths, jnp.int16)}


def codec_from_tokenizer(enc_or_token_bytes, cfg) -> dict:
  """frozen["embed"] for a tiktoken Encoding or a list of token byte strings.

  Ids past the tokenizer's size up to model.vocab_size are padded as zero-length tokens.
  """
  if hasattr(enc_or_token_bytes, "decode_single_token_bytes"):
    token_bytes = token_bytes_list(enc_or_token_bytes)
  else:
    token_bytes = list(enc_or_token_bytes)
  v = cfg.model.vocab_size
  if len(token_bytes) > v:
    raise ConfigError(f"the tokenizer has {len(token_bytes)} tokens but model.vocab_size={v}; "
                      "expected vocab_size >= the tokenizer's size.")
  token_bytes = token_bytes + [b""] * (v - len(token_bytes))
  b, l = build_byte_buffers(token_bytes, cfg.model.embed.max_bytes,
                            cfg.model.embed.reference_text_decode)
  return frozen_from_buffers(b, l, cfg)


# ----------------------------------------------------------------------------- forward
def on_the_fly_codes(bytes_buf, lengths_buf, ids, eps: float = 1e-6):
  """z-normalised codes float32 [..., 8192] of the tokens `ids` only, from the byte buffers.

  One elementwise pass: code[c] = (bytes[c % P] == c // P) * (c % P < L) / sqrt(L), then the
  closed-form z-normalisation (kappa has L entries 1/sqrt(L): sum = sqrt(L), sum of squares = 1).
  """
  bts = jnp.take(bytes_buf, ids, axis=0).astype(jnp.int32)       # [..., P]
  lens = jnp.take(lengths_buf, ids, axis=0).astype(jnp.int32)    # [...]
  max_bytes = bts.shape[-1]
  dim = N_BYTES * max_bytes
  c = jnp.arange(dim, dtype=jnp.int32)
  tiled = jnp.tile(bts, (1,) * (bts.ndim - 1) + (N_BYTES,))        # [..., dim]: bts[c % P]
  hit = (tiled == c // max_bytes) & ((c % max_bytes) < lens[..., None])
  scale = jax.lax.rsqrt(jnp.maximum(lens, 1).astype(jnp.float32))[..., None]
  mean, inv = _z_stats(lens, dim, eps)
  return (jnp.where(hit, scale, 0.0) - mean[..., None]) * inv[..., None]


def embed_apply(p: dict, frozen: dict, ids, cfg):
  """ids int [..., T] -> embeddings [..., T, d] in the compute dtype."""
  dtype = nn.dtype_of(cfg.model.dtype)
  eps = cfg.model.embed.z_eps
  w = p["proj"]
  if "table" in frozen:
    codes = jnp.take(frozen["table"], ids, axis=0)
  else:
    codes = on_the_fly_codes(frozen["bytes"], frozen["lengths"], ids, eps)
  if compat(cfg) == "reference_cuda" or cfg.model.embed.round_codes_bf16:
    codes = codes.astype(jnp.bfloat16)  # the reference rounds the z-normalised codes to bf16
  # The result in the compute dtype: the GEMM accumulates in float32 and rounds once, as a float32
  # result cast down would; a float32 result would make the weight gradient a float32 GEMM.
  e = jnp.einsum("...c,cd->...d", codes.astype(dtype), w.astype(dtype))
  return rms_norm(e, p["norm"]["scale"], cfg.model.norm_eps)
