"""Decoding with the architecture's own state: prefill a prompt, then one token at a time.

Nothing here re-runs the prefix. Per layer (stacked over groups like the parameters):

  D (Gated DeltaNet)  {"S": float32 [B, H, Dv, Dk], the delta-rule state;
                       "conv": {"q", "k", "v": [B, K-1, H*Dh]}, the pre-conv projections of
                       the last K-1 tokens (the causal conv's input window)}
  G (sparse attn.)    {"k", "v": [B, L, H, D] rotated keys and gated values; "ki": [B, L, idx_dim]
                       the indexer's shared key}, L = the cache length (prompt + new tokens)

The streams (mHC) are a per-token map, the FFN / MoE too (routing by the trained router and, for
the sigmoid router, its trained selection bias from `stats`), and the stack (plain or reversible)
is `reversible.run_stack` itself, run on one token: the reversible midpoint integrator's forward
p_{n+1} = a p_{n-1} + (1-a) p_n + 2h f_n(p_n) acts on each position separately, so decoding
applies it to the new token with nothing to invert. Every layer is `model.layer_apply` with its
mixer replaced by the same mixer computed from its state (`layer_apply(..., mixer=)`), and the
mixers reuse the layers' own projection, gate and norm code (deltanet.deltanet_inputs /
deltanet_output, sparse_attention.indexer_projections / _projections / select_from_scores /
gsa_output), so training and decoding share one definition of every formula.

Prefill runs the prompt through the training forward's code: the DeltaNet mixer runs the
chunked delta rule (or the Pallas kernel on GPU) over the whole prompt and keeps its final state;
the GSA mixer is gsa_apply with its keys, values and indexer keys written into the cache. Prompts
of different lengths share one padded batch: a row's padding positions get beta = 0 and
log alpha = 0 (the delta-rule state passes through them unchanged), its conv window is taken at
its own last tokens, and its decoding positions start at its own length (rotary per row); a
query never sees keys past its own position, so padding never reaches a real token.

GSA selection while decoding is exactly training's: the new query's indexer scores against every
cached key, the budget k_t = clamp(floor(k_base var_t / var_ema), k_min, k_max) clamped to the
causal count, the sinks always kept, top-k_t, softmax over the kept keys, with var_ema frozen at
the checkpoint's value. var_t is the variance over the query's causal keys: that is what the
training rule gives the LAST query of a window (model.gsa.var_row "full_row" counts a window's
not-yet-seen keys as zeros, so in training an earlier query's budget depends on how long the
window is; a decoder, where every position is the last one when it is computed, cannot depend on
the future length). Decoding therefore equals the training forward with var_row = "causal" at
every position, and, for any var_row, the training forward's last position on the same prefix.

`Decoder` jit-compiles prefill once per padded prompt shape and the one-token step once.
Under a mesh (sharding.use_mesh) the MoE dispatch runs expert-parallel as in training; the batch
is padded to a multiple of the (data x expert) devices.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from lightning_jax import model, nn, reversible, sharding
from lightning_jax.config import n_groups
from lightning_jax.layers import deltanet as dn
from lightning_jax.layers import kronecker, rotary, streams
from lightning_jax.layers import sparse_attention as gsa
from lightning_jax.ops.delta_rule import api as delta_rule_op
from lightning_jax.ops.sparse_attention import api as attention_op


class GenerationError(ValueError):
  """A generation request does not fit the model; one sentence says what and what was expected."""


def decode_config(cfg):
  """The config decoding runs under: var_row "causal" (see the module docstring)."""
  c = cfg.copy_and_resolve_references() if hasattr(cfg, "copy_and_resolve_references") else cfg
  with c.unlocked() if hasattr(c, "unlocked") else _nullctx():
    c.model.gsa.var_row = "causal"
  return c


class _nullctx:
  def __enter__(self):
    return self

  def __exit__(self, *a):
    return False


# ----------------------------------------------------------------------------- the state
def init_cache(cfg, batch: int, max_len: int):
  """Zero decoding state for `batch` rows and `max_len` positions: a tuple over pattern
  positions, each leaf stacked over the layer groups [n_groups, ...]."""
  m = cfg.model
  dtype = nn.dtype_of(m.dtype)
  ng = n_groups(cfg)
  out = []
  for kind in m.pattern:
    if kind == "D":
      h, dh, kern = int(m.deltanet.n_heads), int(m.deltanet.head_dim), int(m.deltanet.conv_kernel)
      one = {"S": jnp.zeros((ng, batch, h, dh, dh), jnp.float32),
             "conv": {n: jnp.zeros((ng, batch, kern - 1, h * dh), dtype) for n in "qkv"}}
    else:
      g = m.gsa
      one = {"k": jnp.zeros((ng, batch, max_len, g.n_heads, g.head_dim), dtype),
             "v": jnp.zeros((ng, batch, max_len, g.n_heads, g.head_dim), dtype),
             "ki": jnp.zeros((ng, batch, max_len, g.idx_dim), dtype)}
    out.append(one)
  return tuple(out)


def cache_bytes(cfg, batch: int, max_len: int) -> int:
  """Bytes of the decoding state (from shapes, nothing allocated)."""
  ab = jax.eval_shape(lambda: init_cache(cfg, batch, max_len))
  return sum(int(np.prod(a.shape)) * jnp.dtype(a.dtype).itemsize for a in jax.tree.leaves(ab))


# ----------------------------------------------------------------------------- mixers
def _conv_window(raw, hist, ends):
  """The K-1 pre-conv inputs before position `ends` [B] of each row, from the previous window
  hist [B, K-1, C] followed by this call's inputs raw [B, T, C]."""
  full = jnp.concatenate([hist.astype(raw.dtype), raw], axis=1)           # [B, K-1+T, C]
  kern1 = hist.shape[1]
  idx = ends[:, None] + jnp.arange(kern1)[None, :]                        # [B, K-1]
  return jnp.take_along_axis(full, idx[..., None], axis=1)


def _deltanet_mixer(vars_j, u, consts, selection, *, cfg, mode):
  del selection
  p = vars_j["params"]["mixer"]
  c = vars_j["cache"]
  if mode == "prefill":
    inp, raw = dn.deltanet_inputs(p, u, consts, cfg)
    valid = (jnp.arange(u.shape[1])[None, :] < consts["lengths"][:, None])[..., None]
    beta = jnp.where(valid, inp["beta"], 0.0)            # padding: the state passes unchanged
    log_alpha = jnp.where(valid, inp["log_alpha"], 0.0)
    o, s = dn.delta_rule(cfg, inp["q"], inp["k"], inp["v"], log_alpha, beta)
    ends = consts["lengths"]
  else:
    inp, raw = dn.deltanet_inputs(p, u, consts, cfg, conv_state=c["conv"])
    o, s = delta_rule_op.recurrent(inp["q"], inp["k"], inp["v"], inp["log_alpha"], inp["beta"],
                                   initial_state=c["S"])
    ends = jnp.ones_like(consts["pos"])
  conv = {n: _conv_window(raw[n], c["conv"][n], ends) for n in "qkv"}
  y = dn.deltanet_output(p, o, inp, cfg)
  return y, None, jnp.zeros((), jnp.float32), {"S": s.astype(jnp.float32), "conv": conv}


def _gsa_mixer(vars_j, u, consts, selection, *, cfg, mode, j):
  """GSA on the new tokens. The cache of this pattern position (all groups) is read from
  consts["gsa_cache"][j] at the layer's group vars_j["group"], by gathers of the kept keys only;
  the new tokens' keys, values and indexer keys are returned (written after the stack)."""
  p = vars_j["params"]["mixer"]
  stats = vars_j["stats"]["mixer"]
  g = cfg.model.gsa
  dtype = nn.dtype_of(cfg.model.dtype)
  if mode == "prefill":
    y, sel, aux, _, kv = gsa.gsa_apply(p, stats, u, consts, cfg, selection=selection,
                                       return_cache=True)
    return y, sel, aux, kv
  cache = consts["gsa_cache"][j]
  gi = vars_j["group"]
  x = u.astype(dtype)
  pos = consts["pos"]                                                   # [B]
  q, k, v, go = gsa._projections(p, x, consts, cfg)                     # [B, 1, H, D]
  qi, ki, wi = gsa.indexer_projections(jax.lax.stop_gradient(p), x, g)
  if selection is None:
    L = cache["ki"].shape[2]
    here = (jnp.arange(L)[None, :] == pos[:, None])[..., None]          # [B, L, 1]
    ki_all = jnp.where(here, ki.astype(cache["ki"].dtype), cache["ki"][gi])
    var_ema = jnp.asarray(stats["var_ema"], jnp.float32)

    def select_row(qi_b, ki_b, wi_b, pos_b):
      s = attention_op.indexer_scores(qi_b[None], ki_b[None], wi_b[None], p["idx_b"], pos_b[None])
      idx, _, _ = gsa.select_from_scores(s, pos_b[None], var_ema, g, "causal")
      return idx[0]

    selection = jax.vmap(select_row)(qi, ki_all, wi, pos)               # [B, 1, k_max]
  valid = selection >= 0
  safe = jnp.maximum(selection, 0)
  rows = jnp.arange(safe.shape[0])[:, None, None]
  mine = (selection == pos[:, None, None])[..., None, None]             # the new token's own key

  def gather(buf, new):
    return jnp.where(mine, new[:, :, None].astype(buf.dtype), buf[gi, rows, safe])

  att = attention_op.attend_gathered(q, gather(cache["k"], k), gather(cache["v"], v), valid,
                                     1.0 / math.sqrt(g.head_dim))
  y = gsa.gsa_output(p, att, go, cfg)
  return y, selection, jnp.zeros((), jnp.float32), {"k": k, "v": v, "ki": ki}


# ----------------------------------------------------------------------------- the stack
def _layer_fns(cfg, mode):
  fns = []
  for j, kind in enumerate(cfg.model.pattern):
    mix = (functools.partial(_deltanet_mixer, cfg=cfg, mode=mode) if kind == "D" else
           functools.partial(_gsa_mixer, cfg=cfg, mode=mode, j=j))
    fns.append(functools.partial(model.layer_apply, cfg=cfg, kind=kind, mixer=mix))
  return fns


def _write(buf, new, start):
  """buf [G, B, L, ...] with new [G, B, T, ...] written at positions start [B] .. start + T - 1."""
  def one(b, n, s):           # [G, L, ...], [G, T, ...], []
    return jax.lax.dynamic_update_slice_in_dim(b, n.astype(b.dtype), s, axis=1)
  return jax.vmap(one, in_axes=(1, 1, 0), out_axes=1)(buf, new, start)


def _run(variables, cache, ids, positions, start, consts_extra, cfg, mode):
  """Embed ids [B, T] at positions [B, T], run the stack with the state; (h [B, T, d], cache).
  start [B]: where this call's tokens go in the GSA caches."""
  m = cfg.model
  dtype = nn.dtype_of(m.dtype)
  params, frozen, stats = variables["params"], variables["frozen"], variables["stats"]
  emb = kronecker.embed_apply(params["embed"], frozen["embed"], ids, cfg).astype(dtype)
  consts = dict(consts_extra)
  if m.use_rotary:
    consts["rope_dn"] = rotary.rotary_tables(positions, m.deltanet.head_dim, m.rope_base)
    consts["rope_gsa"] = rotary.rotary_tables(positions, m.gsa.head_dim, m.rope_base)
  else:
    consts["rope_dn"] = consts["rope_gsa"] = None
  consts["gsa_cache"] = tuple(c if k == "G" else None for k, c in zip(m.pattern, cache))
  x = streams.expand(emb, m.hc.n_streams)
  gvars = model._group_vars(params, frozen, stats, cfg)
  groups = jnp.arange(n_groups(cfg), dtype=jnp.int32)
  for j, (gv, kind) in enumerate(zip(gvars, m.pattern)):
    if kind == "D":
      gv["cache"] = cache[j]
    else:
      gv["group"] = groups
  x, _, st, _ = reversible.run_stack(cfg.reversible, _layer_fns(cfg, mode), gvars, x, consts)
  new_cache = []
  for j, kind in enumerate(m.pattern):
    s = st[j]["mixer"]
    if kind == "D":
      new_cache.append(s)
    else:
      new_cache.append({n: _write(cache[j][n], s[n], start) for n in ("k", "v", "ki")})
  h = streams.readout(x, params["final_norm"]["scale"], m.norm_eps)
  return h, tuple(new_cache)


def prefill(variables, ids, lengths, cfg, max_len: int, all_logits: bool = False):
  """Run prompts ids int32 [B, P] (row b's prompt is ids[b, :lengths[b]], right-padded).

  Returns (logits float32 [B, V] at each row's last prompt token (or [B, P, V] at every
  position with all_logits), cache for decode_step)."""
  b, t = ids.shape
  cache = init_cache(cfg, b, max_len)
  pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[None], (b, t))
  lengths = jnp.asarray(lengths, jnp.int32)
  h, cache = _run(variables, cache, ids, pos, jnp.zeros((b,), jnp.int32), {"lengths": lengths},
                  cfg, "prefill")
  if not all_logits:
    h = jnp.take_along_axis(h, (lengths - 1)[:, None, None], axis=1)
  lg = model.logits(variables["params"], h, cfg)
  return (lg if all_logits else lg[:, 0]), cache


def decode_step(variables, cache, tokens, pos, cfg):
  """One new token per row: tokens int32 [B] at positions pos int32 [B] (= the number of tokens
  before it). Returns (logits float32 [B, V], cache)."""
  pos = jnp.asarray(pos, jnp.int32)
  h, cache = _run(variables, cache, tokens[:, None], pos[:, None], pos, {"pos": pos}, cfg,
                  "decode")
  return model.logits(variables["params"], h, cfg)[:, 0], cache


# ----------------------------------------------------------------------------- compiled
class Decoder:
  """Compiled prefill / one-token step for one config, batch and cache length.

  `cfg` is the run's config; decoding runs under decode_config(cfg). `mesh`: optional device
  mesh (the variables should already be placed on it); the batch must be a multiple of its
  data x expert size (pad_batch gives the size to pad to).
  """

  def __init__(self, cfg, batch: int, max_len: int, mesh=None):
    self.cfg = decode_config(cfg)
    self.batch, self.max_len, self.mesh = int(batch), int(max_len), mesh
    if self.max_len > int(cfg.model.max_seq_len):
      raise GenerationError(f"a decoding cache of {self.max_len} positions exceeds the model's "
                            f"context of model.max_seq_len={cfg.model.max_seq_len} tokens.")
    c = self.cfg
    self._prefill = jax.jit(functools.partial(prefill, cfg=c, max_len=self.max_len),
                            static_argnames=("all_logits",))
    self._step = jax.jit(functools.partial(decode_step, cfg=c), donate_argnums=(1,))

  def _ctx(self):
    return sharding.use_mesh(self.mesh)

  def prefill(self, variables, ids, lengths, all_logits: bool = False):
    with self._ctx():
      return self._prefill(variables, jnp.asarray(ids, jnp.int32), jnp.asarray(lengths, jnp.int32),
                           all_logits=all_logits)

  def step(self, variables, cache, tokens, pos):
    with self._ctx():
      return self._step(variables, cache, jnp.asarray(tokens, jnp.int32),
                        jnp.asarray(pos, jnp.int32))


def batch_multiple(mesh) -> int:
  """Rows a batch must be a multiple of under `mesh` (its data x expert devices), else 1."""
  if mesh is None:
    return 1
  return int(mesh.shape.get("data", 1) * mesh.shape.get("expert", 1))
