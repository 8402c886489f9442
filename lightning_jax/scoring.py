"""Score text with a trained model: mean cross-entropy, perplexity and bits per byte.

Windows are the training loop's held-out windows: a token stream is cut at starts 0, S, 2S, ...
(S = the run's train.seq_len unless given); window w feeds tokens [wS, wS + S) and predicts
tokens [wS + 1, wS + S], so every token after the first is predicted exactly once, with the
context the training evaluation gives it (launch.train's eval: pipeline / pools.eval_batches,
windows of seq_len + 2 tokens at stride seq_len, CE_next over positions 1..seq_len). The last,
partial window is padded and its padding masked out; the forward is the training forward
(model.forward, model.gsa.var_row as trained) at the one window length S, so the training
evaluation's windows get the same CE here (tests/test_generate.py checks it).

Bits per byte = total CE in bits / the UTF-8 bytes of the predicted tokens' text (end-of-text
counts 0 bytes). A .txt file is one document, a .jsonl file one document per line ("text"),
each followed by end-of-text as prepare_data stores them; a prepared shard directory is scored
shard by shard, as stored.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from lightning_jax import model, nn, sharding
from lightning_jax.ops.head_ce.api import head_logits
from lightning_jax.decode import GenerationError


def windows(tokens, seq_len: int):
  """(inputs int32 [W, S], targets int32 [W, S], mask float32 [W, S]) of a token stream."""
  a = np.asarray(tokens, np.int64)
  n = len(a)
  if n < 2:
    return (np.zeros((0, seq_len), np.int32),) * 2 + (np.zeros((0, seq_len), np.float32),)
  starts = list(range(0, n - 1, seq_len))
  W = len(starts)
  inp = np.zeros((W, seq_len), np.int32)
  tgt = np.zeros((W, seq_len), np.int32)
  msk = np.zeros((W, seq_len), np.float32)
  for w, s in enumerate(starts):
    x = a[s:s + seq_len]
    y = a[s + 1:s + seq_len + 1]
    inp[w, :len(x)] = x
    tgt[w, :len(y)] = y
    msk[w, :len(y)] = 1.0
  return inp, tgt, msk


def token_nll(h, w, targets, chunk_tokens: int, dtype):
  """-log p(target) per position, float32 [B, T], chunked over the sequence like the training
  loss (float32 logits exist for one chunk at a time)."""
  b, t, d = h.shape
  tc = max(1, min(t, chunk_tokens // max(b, 1)))
  n = -(-t // tc)
  pad = n * tc - t
  if pad:
    h = jnp.pad(h, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, pad)))
  hs = jnp.swapaxes(h.reshape(b, n, tc, d), 0, 1)
  ts = jnp.swapaxes(targets.reshape(b, n, tc), 0, 1)

  def body(_, xs):
    hc, tg = xs
    lg = head_logits(hc, w, dtype)
    lse = jax.nn.logsumexp(lg, axis=-1)
    picked = jnp.take_along_axis(lg, tg[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return None, lse - picked

  _, out = jax.lax.scan(body, None, (hs, ts))
  return jnp.swapaxes(out, 0, 1).reshape(b, n * tc)[:, :t]


def make_score_fn(cfg):
  """jit'able (variables, inputs [B, S], targets [B, S], mask [B, S]) -> (nll sum [B], count [B])."""
  m = cfg.model
  dtype = nn.dtype_of(m.dtype)

  def fn(variables, inputs, targets, mask):
    out = model.forward(variables["params"], variables["frozen"], variables["stats"], inputs, cfg,
                        with_mtp=False)
    nll = token_nll(out["h"], variables["params"]["head"]["w"], targets, m.ce_chunk, dtype)
    return jnp.sum(nll * mask, axis=-1), jnp.sum(mask, axis=-1)
  return fn


class Scorer:
  """Per-window CE of token streams for one run; one compile per (batch, seq_len)."""

  def __init__(self, cfg, variables, seq_len: int | None = None, batch: int | None = None,
               mesh=None):
    self.cfg, self.variables, self.mesh = cfg, variables, mesh
    self.seq_len = int(seq_len or cfg.train.seq_len)
    if self.seq_len > int(cfg.model.max_seq_len):
      raise GenerationError(f"--seq_len={self.seq_len} is longer than the model's context of "
                            f"model.max_seq_len={cfg.model.max_seq_len} tokens.")
    mult = 1 if mesh is None else int(mesh.shape["data"] * mesh.shape["expert"])
    b = int(batch or cfg.train.eval_batch)
    self.batch = -(-b // mult) * mult
    self._fn = jax.jit(make_score_fn(cfg))

  def window_scores(self, tokens):
    """(nll sum per window, predicted tokens per window, targets [W, S], mask [W, S])."""
    inp, tgt, msk = windows(tokens, self.seq_len)
    W = len(inp)
    sums, counts = np.zeros(W, np.float64), np.zeros(W, np.float64)
    B = self.batch
    for s in range(0, W, B):
      sl = slice(s, min(W, s + B))
      k = sl.stop - sl.start
      pad = lambda a: np.concatenate([a[sl], np.zeros((B - k,) + a.shape[1:], a.dtype)])
      with sharding.use_mesh(self.mesh):
        ns, cs = self._fn(self.variables, pad(inp), pad(tgt), pad(msk))
      sums[sl] = np.asarray(ns, np.float64)[:k]
      counts[sl] = np.asarray(cs, np.float64)[:k]
    return sums, counts, tgt, msk


def summary(nll: float, tokens: int, n_bytes: int) -> dict:
  ce = nll / tokens if tokens else float("nan")
  return {"tokens": int(tokens), "bytes": int(n_bytes), "ce": ce,
          "perplexity": math.exp(ce) if tokens and ce < 700 else float("inf" if tokens else "nan"),
          "bits_per_byte": nll / math.log(2.0) / n_bytes if n_bytes else float("nan"),
          "nll_sum": nll}
