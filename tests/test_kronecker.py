"""Kronecker codec (SPEC §2.7): byte buffers, hand-computed codes, table == on-the-fly."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from lightning_jax import nn
from lightning_jax.config import ConfigError
from lightning_jax.layers import kronecker

DIM = 8192


def hand_code(raw: bytes) -> np.ndarray:
  """kappa by the definition, then z-normalisation with the unbiased std, by plain loops."""
  k = [0.0] * DIM
  n = len(raw)
  for p, b in enumerate(raw):
    k[b * 32 + p] += 1.0 / math.sqrt(n)
  mean = sum(k) / DIM
  var = sum((v - mean) ** 2 for v in k) / (DIM - 1)
  std = math.sqrt(var)
  return np.array([(v - mean) / (std + 1e-6) for v in k])


def codes_of(tokens):
  b, l = kronecker.build_byte_buffers(tokens)
  return np.asarray(kronecker.codec_vectors(b, l)), b, l


def test_one_byte_token_matches_hand_values():
  z, b, l = codes_of([b"A"])
  assert l[0] == 1 and b[0, 0] == 65 and not b[0, 1:].any()
  # one entry 1 at 65*32 + 0; mean 1/8192; unbiased var = (1 - 1/8192) / 8191 = 1/8192
  std = 1 / math.sqrt(8192)
  hit, rest = (1 - 1 / 8192) / (std + 1e-6), (-1 / 8192) / (std + 1e-6)
  assert abs(hit - 90.4904) < 1e-3
  np.testing.assert_allclose(z[0, 65 * 32], hit, rtol=1e-6)
  others = np.delete(z[0], 65 * 32)
  np.testing.assert_allclose(others, rest, rtol=1e-6)
  np.testing.assert_allclose(z[0], hand_code(b"A"), rtol=1e-5, atol=1e-6)


def test_devanagari_token_matches_hand_values():
  tok = "नम".encode()       # E0 A4 A8 E0 A4 AE
  assert len(tok) == 6
  z, b, l = codes_of([tok])
  assert l[0] == 6 and bytes(b[0, :6]) == tok
  ref = hand_code(tok)
  np.testing.assert_allclose(z[0], ref, rtol=1e-5, atol=1e-6)
  hits = [0xE0 * 32 + 0, 0xA4 * 32 + 1, 0xA8 * 32 + 2, 0xE0 * 32 + 3, 0xA4 * 32 + 4, 0xAE * 32 + 5]
  mean = math.sqrt(6) / DIM
  std = math.sqrt((1 - 6 / DIM) / (DIM - 1))
  for i in hits:
    np.testing.assert_allclose(z[0, i], (1 / math.sqrt(6) - mean) / (std + 1e-6), rtol=1e-5)
  assert np.sum(z[0] > 0) == 6


def test_40_byte_token_truncated_at_character_boundary():
  tok = b"abcdefghij" * 3 + "न".encode() + "म".encode() + b"wxyz"   # 40 bytes, "न" spans 30..32
  assert len(tok) == 40
  z, b, l = codes_of([tok])
  assert l[0] == 30, "the cut must not split the 3-byte character that straddles byte 32"
  assert bytes(b[0, :30]) == tok[:30] and not b[0, 30:].any()
  np.testing.assert_allclose(z[0], hand_code(tok[:30]), rtol=1e-5, atol=1e-6)
  # exactly at the limit: a 3-byte char ending at byte 32 is kept
  tok2 = b"x" * 29 + "न".encode() + b"yy"
  _, _, l2 = codes_of([tok2])
  assert l2[0] == 32


def test_zero_length_token_is_zero_vector():
  z, _, l = codes_of([b""])
  assert l[0] == 0
  assert np.all(z[0] == 0.0)


def test_reference_text_decode_collapses_partial_utf8():
  partial = [b"\xe0\xa4", b"\xe0\xa5"]
  b_raw, l_raw = kronecker.build_byte_buffers(partial)
  b_ref, l_ref = kronecker.build_byte_buffers(partial, reference_text_decode=True)
  assert bytes(b_raw[0, :2]) == b"\xe0\xa4" and l_raw[0] == 2
  assert not np.array_equal(b_raw[0], b_raw[1])
  assert bytes(b_ref[0, :l_ref[0]]) == "\ufffd".encode()
  # the reference's decode-to-text makes these two distinct tokens identical
  assert np.array_equal(b_ref[0], b_ref[1]) and l_ref[0] == l_ref[1]


def _small_cfg(form, vocab):
  c = tiny.get_config()
  c.model.vocab_size = vocab
  c.model.embed.form = form
  return c


def test_on_the_fly_equals_table():
  seed = np.random.randint(1 << 30)
  rng = np.random.default_rng(seed)
  words = ["", "a", "the", " Hello", "नमस्ते", "হ্যালো", "<|endoftext|>", "x" * 45,
           "அ" * 12] + [bytes(rng.integers(0, 256, rng.integers(1, 40)).astype(np.uint8))
                        for _ in range(23)]
  vocab = 40
  cfg_t, cfg_f = _small_cfg("table", vocab), _small_cfg("on_the_fly", vocab)
  fr_t = kronecker.codec_from_tokenizer(words, cfg_t)
  fr_f = kronecker.codec_from_tokenizer(words, cfg_f)
  assert set(fr_t) == {"table"} and set(fr_f) == {"bytes", "lengths"}
  assert fr_f["bytes"].dtype == jnp.uint8 and fr_f["lengths"].dtype == jnp.int16
  # the closed-form codes equal the explicit z-normalised vectors
  ids = jnp.asarray(rng.integers(0, vocab, (3, 11)), jnp.int32)
  codes = kronecker.on_the_fly_codes(fr_f["bytes"], fr_f["lengths"], ids)
  np.testing.assert_allclose(codes, np.asarray(fr_t["table"])[np.asarray(ids)], rtol=1e-5,
                             atol=1e-5, err_msg=f"seed {seed}")
  p = nn.init(kronecker.embed_specs(cfg_t), jax.random.PRNGKey(seed))
  p["norm"]["scale"] = jnp.asarray(rng.normal(size=p["norm"]["scale"].shape), jnp.float32)
  e_t = kronecker.embed_apply(p, fr_t, ids, cfg_t)
  e_f = kronecker.embed_apply(p, fr_f, ids, cfg_f)
  assert e_t.shape == (3, 11, cfg_t.model.d_model)
  np.testing.assert_allclose(e_f, e_t, rtol=1e-4, atol=1e-5, err_msg=f"seed {seed}")
  # gradients of the projection agree too
  g_t = jax.grad(lambda w: jnp.sum(kronecker.embed_apply({**p, "proj": w}, fr_t, ids, cfg_t) ** 3))
  g_f = jax.grad(lambda w: jnp.sum(kronecker.embed_apply({**p, "proj": w}, fr_f, ids, cfg_f) ** 3))
  gf, gt = np.asarray(g_f(p["proj"])), np.asarray(g_t(p["proj"]))
  rel = np.linalg.norm(gf - gt) / np.linalg.norm(gt)
  assert rel < 1e-5, f"seed {seed}: normwise relative error {rel:.2e}"


def test_projection_init_and_padding():
  cfg = _small_cfg("on_the_fly", 10)
  specs = kronecker.embed_specs(cfg)
  assert specs["proj"].shape == (8192, cfg.model.d_model)
  w = nn.init(specs, jax.random.PRNGKey(0))["proj"]
  assert abs(float(jnp.std(w)) - 0.02 / math.sqrt(8192)) < 0.05 * 0.02 / math.sqrt(8192)
  fr = kronecker.codec_from_tokenizer([b"ab", b"c"], cfg)
  assert fr["bytes"].shape == (10, 32) and int(fr["lengths"][5]) == 0
  with pytest.raises(ConfigError, match="model.vocab_size"):
    kronecker.codec_from_tokenizer([b"a"] * 11, cfg)
