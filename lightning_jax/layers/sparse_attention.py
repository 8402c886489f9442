"""Gated Sparse Attention with the lightning indexer (SPEC §2.3).

Forward of one GSA mixer, x [B, T, d] -> y [B, T, d]:

  indexer (no gradient):  s(t, j) = sum_h sigmoid(w_h(x_t)) * sigmoid(q_h(x_t) . k(x_j) / sqrt(idx_dim) + b_h)
                          for j <= t (future keys are excluded);
  budget:                 k_t = clamp(floor(k_base * var_t / max(var_ema, 1e-6)), k_min, k_max), then
                          k_t = min(k_t, t + 1);
  selection:              the k_t keys of highest score, the first n_sinks keys always among them;
  attention:              v <- W_v x * sigmoid(W_gv x); interleaved rotary on q, k (consts["rope_gsa"]);
                          softmax(q . k / sqrt(head_dim)) over the selected keys only;
                          y = W_o (attn * sigmoid(W_go x)).

Details settled from the reference (The-School-of-AI/LLM, GatedSparseAttention in
lightninglm/models/recurrence_model_120b_moe.py and fused_indexer_topk in
lightninglm/kernels/triton_indexer_streaming.py):
  * every weight ~ N(0, 0.02), indexer bias 0; the variance EMA starts at 1.0;
  * var_t is the population variance of the query's FULL score row of length T with the
    future (masked) entries counted as 0 ("full_row", the reference's behaviour). The
    alternative "causal" (variance over the t + 1 causal keys only) is available through the
    optional config field model.gsa.var_row; both are causal in the token values;
  * the EMA moves by 0.99 / 0.01 toward the mean of var_t over all queries of the step;
  * the indexer is never trained: its only outputs are integer indices, the reference passes
    no gradient through them and has no auxiliary indexer loss. `aux` is therefore always 0.

Selection format (the `selection` / reversible `choices` of this layer): int32 [B, T, k_max],
row t lists the kept key positions of query t in the indexer's rank order (sinks first),
padded with -1 after the k_t valid entries. A -1 entry is never attended. When a selection
is passed in it is used verbatim (nothing is reselected), which the reversible recompute
relies on.

Memory: queries are processed in chunks of model.gsa.query_chunk with lax.map; a chunk forms
[B, Qc, idx_heads, T] indexer logits and gathers [B, Qc, k_max, H, D] keys and values. The
attention chunk body is rematerialised (jax.checkpoint), so the backward pass never holds the
gathered keys of more than one chunk either. The optional config field model.gsa.attention
picks "gather" (default, O(T k_max)) or "dense_masked" (a chunk's dense [B, H, Qc, T] logits
masked to the selection: O(T^2) FLOPs in plain matmuls instead of gathers; same result), or
"flash" (one fused flash-attention call, cuDNN on GPU, with the selection as a [B, 1, T, T]
mask: causal-dense FLOPs at flash-kernel speed; the stage configs' choice on GPU), or "kernel"
(lightning_jax/ops/sparse_attention: Pallas Triton kernels that gather the selected keys
in-kernel, forward and backward; off GPU it logs once and runs "gather").
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from lightning_jax import nn, remat
from lightning_jax.config import ConfigError
from lightning_jax.layers.rotary import apply_rotary
from lightning_jax.ops import pallas
from lightning_jax.ops.sparse_attention import api as attention_op

INIT_STD = 0.02
VAR_EMA_INIT = 1.0
VAR_EMA_FLOOR = 1e-6
_NEG = -1e30          # finite "minus infinity" for masked attention logits (no NaN gradients)
MODES = attention_op.MODES
_VAR_ROWS = ("full_row", "causal")
# The indexer's parameters: never differentiated (their gradient is identically 0). The
# reference never changes them (torch AdamW skips grad-None params); an optax AdamW with
# decoupled weight decay would shrink them every step unless they are masked out.
INDEXER_PARAMS = ("idx_q", "idx_k", "idx_w", "idx_b")


# ----------------------------------------------------------------------------- variables
def gsa_specs(cfg) -> dict:
  """Parameter specs of one GSA mixer; weights in [in, out] layout, no biases except idx_b."""
  m, g = cfg.model, cfg.model.gsa
  d, hd = m.d_model, g.n_heads * g.head_dim
  w = lambda shape, axes: nn.Spec(shape, axes, nn.normal(INIT_STD))
  return {
      "q": w((d, hd), ("embed", "heads")),
      "k": w((d, hd), ("embed", "heads")),
      "v": w((d, hd), ("embed", "heads")),
      "gv": w((d, hd), ("embed", "heads")),        # value gate
      "go": w((d, hd), ("embed", "heads")),        # output gate
      "o": w((hd, d), ("heads", "embed")),
      "idx_q": w((d, g.idx_heads * g.idx_dim), ("embed", None)),
      "idx_k": w((d, g.idx_dim), ("embed", None)),  # one key shared by the indexer heads
      "idx_w": w((d, g.idx_heads), ("embed", None)),
      "idx_b": nn.Spec((g.idx_heads,), (None,), nn.zeros),
  }


def gsa_stats_init(cfg) -> dict:
  """The non-trained running statistic of one GSA layer (lives in the `stats` tree)."""
  del cfg
  return {"var_ema": jnp.asarray(VAR_EMA_INIT, jnp.float32)}


def gsa_stats_specs(cfg) -> dict:
  """The same as gsa_stats_init, as a Spec tree (for nn.stack / nn.abstract)."""
  del cfg
  return {"var_ema": nn.Spec((), (), nn.constant(VAR_EMA_INIT))}


def gsa_update_stats(stats: dict, step_stats: dict, cfg) -> dict:
  """var_ema <- decay * var_ema + (1 - decay) * mean var_t; unchanged when no query was counted.

  step_stats entries are sums (add them over micro-batches before calling this).
  """
  decay = float(cfg.model.gsa.ema_decay)
  count = jnp.asarray(step_stats["var_count"], jnp.float32)
  mean = jnp.asarray(step_stats["var_sum"], jnp.float32) / jnp.maximum(count, 1.0)
  ema = jnp.asarray(stats["var_ema"], jnp.float32)
  return {**stats, "var_ema": jnp.where(count > 0, decay * ema + (1.0 - decay) * mean, ema)}


def _var_row(g) -> str:
  mode = g.var_row
  if mode not in _VAR_ROWS:
    raise ConfigError(f"model.gsa.var_row={mode!r} must be 'full_row' (reference: variance over "
                      f"the whole row, future keys as 0) or 'causal' (causal keys only).")
  return mode


def _chunk(g, T: int) -> int:
  qc = int(g.query_chunk)
  if qc < 1:
    raise ConfigError(f"model.gsa.query_chunk={qc} must be a positive number of queries.")
  return min(qc, T)


# ----------------------------------------------------------------------------- indexer
def select_from_scores(scores, q_pos, var_ema, g, var_row: str = "full_row",
                       n_keys: int | None = None):
  """Budget and top-k selection from indexer scores [B, Q, W] (-inf after the query).

  n_keys: the row's full length T when the scores hold only its first W keys (every query of
  the block is < W, so the rest are future keys): var_row="full_row" still averages over T,
  the future keys counting as 0, as in the reference. Default W.
  Returns (idx int32 [B, Q, k_max] with -1 padding, k_t int32 [B, Q], var_t float32 [B, Q]).
  """
  T = scores.shape[-1]
  n_all = T if n_keys is None else int(n_keys)
  kpos = jnp.arange(T)
  causal = (kpos[None, :] <= q_pos[:, None])[None]                  # [1, Q, T]
  s0 = jnp.where(causal, scores, 0.0)
  if var_row == "full_row" and n_all == T:
    mean = jnp.mean(s0, axis=-1, keepdims=True)
    var_t = jnp.mean(jnp.square(s0 - mean), axis=-1)
  elif var_row == "full_row":
    # the n_all - T keys not in the block are zeros: each adds mean^2 to the squared deviations
    mean = jnp.sum(s0, axis=-1, keepdims=True) / n_all
    var_t = (jnp.sum(jnp.square(s0 - mean), axis=-1)
             + (n_all - T) * jnp.square(mean[..., 0])) / n_all
  else:
    cnt = jnp.minimum(q_pos + 1, T).astype(jnp.float32)[None, :]     # [1, Q]
    mean = jnp.sum(s0, axis=-1) / cnt
    var_t = jnp.sum(jnp.where(causal, jnp.square(s0 - mean[..., None]), 0.0), axis=-1) / cnt
  ratio = g.k_base * var_t / jnp.maximum(jnp.asarray(var_ema, jnp.float32), VAR_EMA_FLOOR)
  ratio = jnp.where(jnp.isnan(ratio), float(g.k_min), ratio)
  k_t = jnp.floor(jnp.clip(ratio, float(g.k_min), float(g.k_max))).astype(jnp.int32)
  k_t = jnp.minimum(k_t, (q_pos + 1).astype(jnp.int32)[None, :])

  sink = causal & (kpos < g.n_sinks)[None, None, :]
  sel = jnp.where(sink, jnp.inf, jnp.where(causal, scores, -jnp.inf))
  K = min(int(g.k_max), T)
  _, idx = jax.lax.top_k(sel, K)
  valid = (jnp.arange(K)[None, None, :] < k_t[..., None]) & (idx <= q_pos[None, :, None])
  idx = jnp.where(valid, idx, -1).astype(jnp.int32)
  if K < g.k_max:
    idx = jnp.pad(idx, ((0, 0), (0, 0), (0, g.k_max - K)), constant_values=-1)
  return idx, k_t, var_t


def indexer_projections(p, x, g):
  """The indexer's queries qi [B, T, idx_heads, idx_dim], shared key ki [B, T, idx_dim] and head
  weight logits wi [B, T, idx_heads] of x [B, T, d] (in x's dtype)."""
  B, T, _ = x.shape
  dtype = x.dtype
  qi = (x @ p["idx_q"].astype(dtype)).reshape(B, T, g.idx_heads, g.idx_dim)
  ki = x @ p["idx_k"].astype(dtype)
  wi = x @ p["idx_w"].astype(dtype)
  return qi, ki, wi


def gsa_select(p, stats, x, cfg):
  """Indexer + adaptive top-k for every query, chunked over queries; no gradient flows.

  Returns (selection int32 [B, T, k_max], k_t int32 [B, T], var_t float32 [B, T]).
  """
  g = cfg.model.gsa
  var_row = _var_row(g)
  p = jax.lax.stop_gradient(p)
  x = jax.lax.stop_gradient(x)
  var_ema = jax.lax.stop_gradient(jnp.asarray(stats["var_ema"], jnp.float32))
  B, T, _ = x.shape
  qi, ki, wi = indexer_projections(p, x, g)
  qc = _chunk(g, T)
  n = -(-T // qc)
  pos = jnp.arange(n * qc, dtype=jnp.int32).reshape(n, qc)
  qi_n, wi_n = attention_op.to_chunks(qi, n, qc), attention_op.to_chunks(wi, n, qc)
  outs = []
  for c0, c1, width in key_widths(n, qc, T):
    def body(args, width=width):
      qi_c, wi_c, pos_c = args
      s = attention_op.indexer_scores(qi_c, ki[:, :width], wi_c, p["idx_b"], pos_c)
      return select_from_scores(s, pos_c, var_ema, g, var_row, n_keys=T)

    outs.append(jax.lax.map(body, (qi_n[c0:c1], wi_n[c0:c1], pos[c0:c1])))
  idx, k_t, var_t = (jnp.concatenate([o[i] for o in outs], axis=0) for i in range(3))
  return (attention_op.from_chunks(idx, T), attention_op.from_chunks(k_t, T),
          attention_op.from_chunks(var_t, T))


def key_widths(n: int, qc: int, T: int, levels: int = 4) -> list:
  """[(first chunk, end chunk, keys)]: the query chunks grouped by how many leading keys their
  scores need. Chunk c's queries are < (c + 1) qc, so it needs keys [0, (c + 1) qc) only, the
  rest being future keys; each chunk takes the smallest of T, T/2, ..., T/2^(levels-1) (rounded
  up) that covers them. At T = 4096 with 512-query chunks: 512, 1024, 2048 (x2) and 4096 (x4)
  keys, about 0.6 of the indexer's scores and top-k work of T keys for all; at most `levels`
  chunk loops to compile."""
  widths = sorted({min(T, -(-T // 2 ** j)) for j in range(levels)})
  out = []
  for c in range(n):
    need = min(T, (c + 1) * qc)
    w = min(x for x in widths if x >= need)
    if out and out[-1][2] == w:
      out[-1] = (out[-1][0], c + 1, w)
    else:
      out.append((c, c + 1, w))
  return out


# ----------------------------------------------------------------------------- attention
def _projections(p, x, consts, cfg):
  """q, k (rotated) and gated v [B, T, H, D], and the output gate logits [B, T, H*D]."""
  g = cfg.model.gsa
  B, T, _ = x.shape
  dtype = x.dtype
  proj = lambda name: x @ p[name].astype(dtype)
  shape = (B, T, g.n_heads, g.head_dim)
  q = proj("q").reshape(shape)
  k = proj("k").reshape(shape)
  v = (proj("v") * jax.nn.sigmoid(proj("gv"))).reshape(shape)
  rope = (consts or {}).get("rope_gsa")
  if rope is not None:
    cos, sin = rope
    q = apply_rotary(q, cos, sin)
    k = apply_rotary(k, cos, sin)
  return q, k, v, proj("go")


def resolve_attention(g) -> str:
  """model.gsa.attention with "auto" resolved: "flash" on GPU, "gather" elsewhere."""
  mode = g.attention
  if mode == "auto":
    return "flash" if pallas.on_gpu() else "gather"
  if mode not in MODES:
    raise ConfigError(f"model.gsa.attention={mode!r} must be 'auto' or one of {list(MODES)}.")
  return mode


def _check_selection(selection, B: int, T: int, k_max: int):
  shape = tuple(getattr(selection, "shape", ()))
  if shape != (B, T, k_max) or not jnp.issubdtype(selection.dtype, jnp.integer):
    raise ValueError(f"GSA selection must be an integer array [B, T, k_max] = {(B, T, k_max)} "
                     f"of key indices with -1 padding; got shape {shape} dtype "
                     f"{getattr(selection, 'dtype', type(selection))}.")


def gsa_output(p, att, go, cfg):
  """y [B, T, d] from the attention output att [B, T, H, D] and the output gate logits go."""
  g = cfg.model.gsa
  B, T = att.shape[:2]
  out = att.reshape(B, T, g.n_heads * g.head_dim) * jax.nn.sigmoid(go)
  return out @ p["o"].astype(nn.dtype_of(cfg.model.dtype))


def gsa_apply(p, stats, x, consts, cfg, selection=None, return_cache: bool = False):
  """One GSA mixer. Returns (y [B, T, d], selection, aux, step_stats).

  return_cache: also return {"k", "v": [B, T, H, D] (rotated keys, gated values), "ki":
  [B, T, idx_dim] (indexer keys)} as a fifth element, what a decoder keeps per token.

  selection: None -> selected here from the indexer; given -> used verbatim (never reselected).
  aux: float32 0 (the reference has no indexer loss; see the module docstring).
  step_stats: sums for gsa_update_stats: {"var_sum", "var_count", "k_sum"} (float32 scalars);
  all zero when the selection was passed in (nothing was measured).
  """
  g = cfg.model.gsa
  dtype = nn.dtype_of(cfg.model.dtype)
  if x.ndim != 3 or x.shape[-1] != cfg.model.d_model:
    raise ValueError(f"GSA input must be [B, T, d_model={cfg.model.d_model}]; got {x.shape}.")
  B, T, _ = x.shape
  _var_row(g)
  mode = resolve_attention(g)
  x = x.astype(dtype)
  zero = jnp.zeros((), jnp.float32)
  if selection is None:
    selection, k_t, var_t = gsa_select(p, stats, x, cfg)
    selection = remat.keep(selection)     # the indexer does not run again (model.remat)
    step_stats = {"var_sum": jnp.sum(var_t), "var_count": jnp.asarray(B * T, jnp.float32),
                  "k_sum": jnp.sum(k_t).astype(jnp.float32)}
  else:
    _check_selection(selection, B, T, int(g.k_max))
    selection = jax.lax.stop_gradient(selection.astype(jnp.int32))
    step_stats = {"var_sum": zero, "var_count": zero, "k_sum": zero}
  q, k, v, go = _projections(p, x, consts, cfg)
  att = attention_op.attend(q, k, v, selection, _chunk(g, T), mode)
  y = gsa_output(p, att, go, cfg)
  if return_cache:
    return y, selection, zero, step_stats, {"k": k, "v": v, "ki": indexer_projections(p, x, g)[1]}
  return y, selection, zero, step_stats


# ----------------------------------------------------------------------------- references
def selection_mask(selection, T: int):
  """Dense bool [B, T, T] mask: mask[b, t, j] = key j is in query t's selection."""
  hits = selection[..., None] == jnp.arange(T)[None, None, None, :]   # [B, T, K, T]
  return jnp.any(hits & (selection[..., None] >= 0), axis=2)


def gsa_reference(p, x, consts, cfg, mask):
  """Slow obvious GSA: dense softmax attention with a [B, T, T] key mask, no chunking."""
  g = cfg.model.gsa
  dtype = nn.dtype_of(cfg.model.dtype)
  x = x.astype(dtype)
  B, T, _ = x.shape
  q, k, v, go = _projections(p, x, consts, cfg)
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
  logits = logits / math.sqrt(g.head_dim)
  m = mask[:, None]
  probs = jnp.where(m, jax.nn.softmax(jnp.where(m, logits, _NEG), axis=-1), 0.0)
  att = jnp.einsum("bhqk,bkhd->bqhd", probs, v.astype(jnp.float32)).astype(dtype)
  out = att.reshape(B, T, -1) * jax.nn.sigmoid(go)
  return out @ p["o"].astype(dtype)
