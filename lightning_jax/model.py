"""LightningLM: Kronecker embedding -> streams -> DDDG layers -> read-out -> head, + MTP (SPEC §2).

Variables (docs/ARCHITECTURE.md): {"params", "frozen", "stats"}.

    params/embed       {proj [8192, d], norm}
    params/groups/l{j} layer at pattern position j, stacked over groups (leading dim n_groups)
                       {mix_hc, mixer, ffn_hc, ffn | moe}
    params/final_norm  read-out RMSNorm (also used after the MTP block)
    params/head/w      [d, V], untied
    params/mtp         {in_proj [2d, d], layer: <G layer>}   when model.mtp.enabled

Forward, for batch["ids"] int32 [B, T + 2]:
  inputs ids[:, :T], next-token targets ids[:, 1:T+1], MTP targets ids[:, 2:T+2].
  emb = embed(ids[:, :T+1]) (one pass; positions 1..T are the MTP block's emb_{t+1}),
  x = streams.expand(emb[:, :T]) -> run_stack over the groups -> h = RMSNorm(mean of streams),
  logits = h @ head. MTP (as the reference): m = in_proj([h_t ; emb_{t+1}]) -> streams ->
  one GSA sublayer + one FFN/MoE sublayer -> mean of streams -> final_norm -> head.
  loss = CE_next + mtp.weight * CE_mtp + aux, aux = sum over backbone layers, scaled by
  8 / n_layers when n_layers > 8. The MTP block's own aux (router balance) is left out of the
  loss, as in the reference ("ignore aux_loss for clean aux-loss accounting"); set
  model.mtp.include_aux=True to add it. Cross-entropy is chunked over the sequence inside a scan
  whose body is rematerialised, so float32 logits exist for one chunk at a time only.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from lightning_jax import blocks, nn, reversible, sharding, tqp
from lightning_jax import remat as remat_lib
from lightning_jax.config import ConfigError, n_groups, validate
from lightning_jax.layers import kronecker, rotary, streams
from lightning_jax.layers.norms import rms_norm_specs
from lightning_jax.ops.head_ce.api import chunked_cross_entropies, fused_cross_entropy_loss


class InputError(ValueError):
  """A batch does not fit the model; the message names the field and what was expected."""


def _materialise(tree):
  """Stats initialisers may return Spec trees or arrays; give arrays."""
  if tree is None:
    return None
  leaves = jax.tree_util.tree_leaves(tree, is_leaf=nn.is_spec)
  if leaves and any(nn.is_spec(l) for l in leaves):
    return nn.init(tree, jax.random.PRNGKey(0))
  return jax.tree_util.tree_map(jnp.asarray, tree)


# ----------------------------------------------------------------------------- specs
def layer_specs(cfg, kind: str, n_experts: int | None = None) -> dict:
  """Parameter specs of one layer (unstacked): the pattern letter's mixer, the FFN kind."""
  fb = blocks.ffn_block(cfg)
  return {"mix_hc": streams.hc_specs(cfg), "mixer": blocks.mixer(kind).specs(cfg),
          "ffn_hc": streams.hc_specs(cfg), fb.key: fb.specs(cfg, n_experts)}


def layer_stats(cfg, kind: str, n_experts: int | None = None) -> dict:
  """Non-trained statistics of one layer (unstacked arrays)."""
  st = {}
  for key, s in ((blocks.mixer(kind).key, blocks.mixer(kind).stats(cfg)),
                 (blocks.ffn_block(cfg).key, blocks.ffn_block(cfg).stats(cfg, n_experts))):
    if s is not None and jax.tree_util.tree_leaves(s, is_leaf=nn.is_spec):
      st[key] = _materialise(s)
  return st


def param_specs(cfg) -> dict:
  """Spec tree of params (with TQP: routed experts replaced by adapters, see frozen_specs)."""
  return _specs(cfg)[0]


def frozen_specs(cfg) -> dict:
  """Spec tree of the frozen buffers other than the embedding codec (TQP quantized experts)."""
  return _specs(cfg)[1]


def _specs(cfg):
  specs = _dense_param_specs(cfg)
  if cfg.tqp.enabled:
    return tqp.tqp_specs(specs, cfg)
  return specs, {}


def _dense_param_specs(cfg) -> dict:
  m = cfg.model
  d, v = m.d_model, m.vocab_size
  ng = n_groups(cfg)
  specs = {
      "embed": kronecker.embed_specs(cfg),
      "groups": {f"l{j}": nn.stack(layer_specs(cfg, k), ng)
                 for j, k in enumerate(m.pattern)},
      "final_norm": rms_norm_specs(d),
      "head": {"w": nn.Spec((d, v), ("embed", "vocab"), nn.normal(0.02))},
  }
  if m.mtp.enabled:
    specs["mtp"] = {
        "in_proj": nn.Spec((2 * d, d), (None, "embed"), nn.normal(0.02)),
        "layer": layer_specs(cfg, "G", cfg.moe.mtp_n_experts if cfg.moe.enabled else None),
    }
  return specs


def init_stats(cfg) -> dict:
  ng = n_groups(cfg)
  groups = {}
  for j, k in enumerate(cfg.model.pattern):
    one = layer_stats(cfg, k)
    groups[f"l{j}"] = jax.tree_util.tree_map(
        lambda a: jnp.broadcast_to(a, (ng,) + a.shape).copy(), one)
  stats = {"groups": groups}
  if cfg.model.mtp.enabled:
    stats["mtp"] = {"layer": layer_stats(cfg, "G", cfg.moe.mtp_n_experts if cfg.moe.enabled
                                         else None)}
  return stats


def _codec_frozen(codec, cfg) -> dict:
  if codec is None:
    raise ConfigError("init_variables needs a codec: a tiktoken Encoding, a list of token byte "
                      "strings, or frozen['embed'] from kronecker.codec_from_tokenizer.")
  if isinstance(codec, dict):
    if "embed" in codec and isinstance(codec["embed"], dict):
      codec = codec["embed"]
    want_table = cfg.model.embed.form == "table"
    if want_table and "table" in codec:
      return {"table": jnp.asarray(codec["table"], nn.dtype_of(cfg.model.dtype))}
    if "bytes" in codec:
      if want_table:     # the table is built on the host from the byte buffers
        return kronecker.frozen_from_buffers(np.asarray(codec["bytes"]),
                                             np.asarray(codec["lengths"]), cfg)
      return kronecker.frozen_from_buffers(codec["bytes"], codec["lengths"], cfg)  # may be traced
    raise ConfigError(f"the codec holds {sorted(codec)} but model.embed.form="
                      f"{cfg.model.embed.form!r} needs byte buffers ('bytes', 'lengths').")
  return kronecker.codec_from_tokenizer(codec, cfg)


def init_variables(cfg, key, codec) -> dict:
  """{"params", "frozen", "stats"} for `cfg`; `codec`: see kronecker.codec_from_tokenizer."""
  validate(cfg)
  frozen = {"embed": _codec_frozen(codec, cfg)}
  specs, fspecs = _specs(cfg)
  params = jax.jit(lambda k: nn.init(specs, k))(key)   # one compile instead of eager per-leaf ops
  if fspecs:   # TQP: a random quantized base (growth replaces it with the converted experts)
    frozen.update(jax.jit(lambda k: nn.init(fspecs, k))(jax.random.fold_in(key, 1)))
  return {"params": params, "frozen": frozen, "stats": init_stats(cfg)}


def abstract_variables(cfg) -> dict:
  """ShapeDtypeStructs of every variable, without allocating (jax.eval_shape)."""
  validate(cfg)
  specs, fspecs = _specs(cfg)
  params = jax.eval_shape(lambda k: nn.init(specs, k), jax.random.PRNGKey(0))
  stats = jax.eval_shape(lambda: init_stats(cfg))
  frozen = {"embed": kronecker.frozen_abstract(cfg)}
  if fspecs:
    frozen.update(jax.eval_shape(lambda k: nn.init(fspecs, k), jax.random.PRNGKey(0)))
  return {"params": params, "frozen": frozen, "stats": stats}


def param_axes(cfg) -> dict:
  return nn.logical_axes(param_specs(cfg))


def frozen_axes(cfg) -> dict:
  """Logical axes of every frozen leaf (codec buffers or table, TQP bases)."""
  emb = ({"table": ("vocab", "codec")} if cfg.model.embed.form == "table"
         else {"bytes": ("vocab", None), "lengths": ("vocab",)})
  return {"embed": emb, **nn.logical_axes(frozen_specs(cfg))}


# ----------------------------------------------------------------------------- forward pieces
def make_consts(cfg, seq_len: int) -> dict:
  m = cfg.model
  if not m.use_rotary:
    return {"rope_dn": None, "rope_gsa": None}
  pos = jnp.arange(seq_len, dtype=jnp.int32)[None]
  return {"rope_dn": rotary.rotary_tables(pos, m.deltanet.head_dim, m.rope_base),
          "rope_gsa": rotary.rotary_tables(pos, m.gsa.head_dim, m.rope_base)}


_STATE_AXES = ("batch", "seq", "streams", "embed")


def layer_apply(vars_j, x, consts, choices, *, cfg, kind: str, mixer=None):
  """One layer on the stream state (reversible.run_stack's layer_fn interface).

  mixer: None (the layer's own mixer) or a replacement `mixer(vars_j, u, consts, selection) ->
  (y, selection | None, aux, stats)` run in its place inside the streams (lightning_jax.decode:
  the mixer with its decoding state, which it returns as `stats`).
  """
  x, ch, aux, st = mix_sublayer(vars_j, x, consts, choices, cfg=cfg, kind=kind, mixer=mixer)
  x, ch2, aux2, st2 = ffn_sublayer(vars_j, x, consts, choices, cfg=cfg)
  return x, {**ch, **ch2}, aux + aux2, {**st, **st2}


def mix_sublayer(vars_j, x, consts, choices, *, cfg, kind: str, mixer=None):
  """The mixer (DeltaNet or GSA, or a replacement `mixer`, see layer_apply) inside its streams:
  (x, choices, aux, stats)."""
  p = vars_j["params"]
  st = vars_j.get("stats") or {}
  ch = choices or {}
  x = sharding.constrain(x, _STATE_AXES)
  aux = jnp.zeros((), jnp.float32)
  out_choices, out_stats = {}, {}

  if mixer is None:
    mk = blocks.mixer(kind)

    def mixer(vars_j, u, consts, selection):
      return mk.apply(vars_j["params"]["mixer"], None, st.get("mixer"), u, consts, cfg,
                      selection=selection)

  def scoped_mixer(u):
    with jax.named_scope(f"mixer_{kind}"):
      return mixer(vars_j, u, consts, ch.get("mixer"))

  x, (sel, a, s) = streams.apply(p["mix_hc"], x, scoped_mixer, cfg)
  aux = aux + jnp.asarray(a, jnp.float32)
  if s is not None:
    out_stats["mixer"] = s
  if sel is not None:
    out_choices["mixer"] = sel
  return sharding.constrain(x, _STATE_AXES), out_choices, aux, out_stats


def ffn_sublayer(vars_j, x, consts, choices, *, cfg):
  """The FFN or MoE inside its streams: (x, choices, aux, stats)."""
  p = vars_j["params"]
  fr = vars_j.get("frozen") or {}
  st = vars_j.get("stats") or {}
  ch = choices or {}
  aux = jnp.zeros((), jnp.float32)
  out_choices, out_stats = {}, {}
  fb = blocks.ffn_block(cfg)

  def ffn_fn(u):
    with jax.named_scope(fb.key):
      return fb.apply(p[fb.key], fr.get(fb.key), st.get(fb.key), u, consts, cfg,
                      selection=ch.get(fb.key))

  x, (sel, a, s) = streams.apply(p["ffn_hc"], x, ffn_fn, cfg)
  aux = aux + jnp.asarray(a, jnp.float32)
  if sel is not None:
    out_choices[fb.key] = sel
  if s is not None:
    out_stats[fb.key] = s
  return sharding.constrain(x, _STATE_AXES), out_choices, aux, out_stats


def mtp_layer(vars_m, x, consts, cfg):
  """The MTP block's layer (a GSA sublayer and an FFN/MoE sublayer) on the stream state.

  model.mtp.reversible: the two sublayers form a midpoint stack as in the reference's 120B
  (with f(x) = sublayer(x) - x): p1 = x + (h/2) f_mix(x); out = a x + (1-a) p1 + 2h f_ffn(p1),
  h = reversible.h, a = reversible.a. Two sublayers need no activation rebuild: plain autodiff.
  """
  if not cfg.model.mtp.reversible:
    return layer_apply(vars_m, x, consts, None, cfg=cfg, kind="G")
  h, a = float(cfg.reversible.h), float(cfg.reversible.a)
  f32 = jnp.float32
  y0, ch, aux, st = mix_sublayer(vars_m, x, consts, None, cfg=cfg, kind="G")
  p0 = x.astype(f32)
  p1 = (p0 + 0.5 * h * (y0.astype(f32) - p0)).astype(x.dtype)
  y1, ch2, aux2, st2 = ffn_sublayer(vars_m, p1, consts, None, cfg=cfg)
  p1f = p1.astype(f32)
  out = a * p0 + (1.0 - a) * p1f + 2.0 * h * (y1.astype(f32) - p1f)
  return out.astype(x.dtype), {**ch, **ch2}, aux + aux2, {**st, **st2}


def _group_vars(params, frozen, stats, cfg):
  fg = (frozen or {}).get("groups", {})
  sg = (stats or {}).get("groups", {})
  return [{"params": params["groups"][f"l{j}"], "frozen": fg.get(f"l{j}", {}),
           "stats": sg.get(f"l{j}", {})} for j in range(len(cfg.model.pattern))]


def check_batch(batch, cfg):
  """Host-side checks, one clear sentence each. Value checks run only on concrete arrays."""
  if "ids" not in batch:
    raise InputError(f"batch has keys {sorted(batch)}; expected 'ids' int32 [batch, seq_len + 2].")
  ids = batch["ids"]
  if ids.ndim != 2 or ids.shape[1] < 3:
    raise InputError(f"batch['ids'] has shape {tuple(ids.shape)}; expected [batch, seq_len + 2] "
                     "with seq_len >= 1.")
  if not jnp.issubdtype(ids.dtype, jnp.integer):
    raise InputError(f"batch['ids'] has dtype {ids.dtype}; expected an integer dtype (int32).")
  t = ids.shape[1] - 2
  if t > cfg.model.max_seq_len:
    raise InputError(f"batch['ids'] holds sequences of {t} input tokens (shape {tuple(ids.shape)}"
                     f" = seq_len + 2), longer than model.max_seq_len={cfg.model.max_seq_len}.")
  if isinstance(ids, jax.core.Tracer):
    return
  a = np.asarray(ids)
  lo, hi = int(a.min()), int(a.max())
  if lo < 0 or hi >= cfg.model.vocab_size:
    bad = lo if lo < 0 else hi
    raise InputError(f"batch['ids'] contains token id {bad}, outside the vocabulary "
                     f"[0, model.vocab_size={cfg.model.vocab_size}).")


def forward(params, frozen, stats, ids, cfg, with_mtp: bool | None = None, moe_ctl=None):
  """ids int [B, T + 1] (the +1 feeds the MTP block's emb_{t+1}; pass [B, T] for no MTP).
  moe_ctl: optional MoE hot-config controls (moe.HotConfig.ctl(), arrays), as consts["moe_ctl"].

  Returns dict(h [B, T, d] read-out, h_mtp [B, T, d] | None, aux, aux_mtp, step_stats, choices).
  """
  m = cfg.model
  if with_mtp is None:
    with_mtp = bool(m.mtp.enabled)
  dtype = nn.dtype_of(m.dtype)
  t = ids.shape[1] - (1 if with_mtp else 0)
  ids = sharding.constrain(ids, ("batch", "seq"))
  with jax.named_scope("embed"):
    emb = kronecker.embed_apply(params["embed"], frozen["embed"], ids, cfg).astype(dtype)
  emb = sharding.constrain(emb, ("batch", "seq", "embed"))
  consts = make_consts(cfg, t)
  if moe_ctl is not None:
    consts["moe_ctl"] = moe_ctl
  x = streams.expand(emb[:, :t], m.hc.n_streams)
  fns = [functools.partial(layer_apply, cfg=cfg, kind=k) for k in m.pattern]
  x, aux, step_stats, choices = reversible.run_stack(
      cfg.reversible, fns, _group_vars(params, frozen, stats, cfg), x, consts,
      remat=m.remat, unroll=m.unroll_layers)
  h = streams.readout(x, params["final_norm"]["scale"], m.norm_eps)
  h = sharding.constrain(h, ("batch", "seq", "embed"))
  step_stats = {"groups": {f"l{j}": s for j, s in enumerate(step_stats)}}
  out = {"h": h, "h_mtp": None, "aux": aux, "aux_mtp": jnp.zeros((), jnp.float32),
         "step_stats": step_stats, "choices": choices}
  if with_mtp:
    mp = params["mtp"]
    z = jnp.concatenate([h, emb[:, 1:t + 1]], axis=-1)
    # The product in the compute dtype (float32 accumulation inside the GEMM, one rounding, as
    # before): asking for a float32 result made its backward two float32 (TF32) GEMMs.
    z = jnp.einsum("btk,kd->btd", z, mp["in_proj"].astype(dtype))
    xs = streams.expand(z, m.hc.n_streams)
    fz = (frozen or {}).get("mtp", {}).get("layer", {})
    sz = (stats or {}).get("mtp", {}).get("layer", {})
    mtp_fn = remat_lib.wrap(functools.partial(mtp_layer, cfg=cfg), m.remat,
                            prevent_cse=True)
    with jax.named_scope("mtp"):
      xs, _, a, s = mtp_fn({"params": mp["layer"], "frozen": fz, "stats": sz}, xs, consts)
    out["h_mtp"] = streams.readout(xs, params["final_norm"]["scale"], m.norm_eps)
    out["aux_mtp"] = a
    step_stats["mtp"] = {"layer": s}
  return out


def logits(params, h, cfg):
  """Full logits (inference / tests only: [B, T, V] float32)."""
  dtype = nn.dtype_of(cfg.model.dtype)
  return jnp.einsum("btd,dv->btv", h.astype(dtype), params["head"]["w"].astype(dtype),
                    preferred_element_type=jnp.float32)


def aux_scale(cfg) -> float:
  nl = cfg.model.n_layers
  return 8.0 / nl if nl > 8 else 1.0


def loss_fn(params, frozen, stats, batch, cfg, moe_ctl=None):
  """(total, metrics) for batch["ids"] int32 [B, seq_len + 2]; moe_ctl: see forward."""
  check_batch(batch, cfg)
  m = cfg.model
  ids = batch["ids"]
  dtype = nn.dtype_of(m.dtype)
  with_mtp = bool(m.mtp.enabled)
  out = forward(params, frozen, stats, ids[:, :-1] if with_mtp else ids[:, :-2], cfg,
                with_mtp=with_mtp, moe_ctl=moe_ctl)
  w = params["head"]["w"]
  ce_mtp = jnp.zeros((), jnp.float32)
  # both head passes in one chunked scan: one float32 head gradient, not two
  hs, tgts = ([out["h"], out["h_mtp"]], [ids[:, 1:-1], ids[:, 2:]]) if with_mtp else \
      ([out["h"]], [ids[:, 1:-1]])
  with jax.named_scope("head_ce"):
    if m.ce_impl == "fused":     # the CE terms of `total` and their gradient, in one pass
      weights = (1.0, float(m.mtp.weight)) if with_mtp else (1.0,)
      ce_total, ces = fused_cross_entropy_loss(hs, w, tgts, m.ce_chunk, dtype, weights,
                                               m.ce_logits)
    else:
      ces = chunked_cross_entropies(hs, w, tgts, m.ce_chunk, dtype, m.ce_logits)
      ce_total = ces[0] + (m.mtp.weight * ces[1] if with_mtp else 0.0)
  ce_next = ces[0]
  if with_mtp:
    ce_mtp = ces[1]
  aux = out["aux"] * aux_scale(cfg)
  total = ce_total + aux
  if with_mtp:
    if m.mtp.include_aux:
      total = total + out["aux_mtp"]
  metrics = {"loss": ce_next, "ce_mtp": ce_mtp, "aux": aux, "aux_mtp": out["aux_mtp"],
             "total": total, "step_stats": out["step_stats"]}
  return total, metrics


# ----------------------------------------------------------------------------- stats
def update_stats(cfg, stats, step_stats, moe_ctl=None):
  """New stats after an optimizer step from the forward's step_stats (pure).

  moe_ctl: optional hot-config controls (moe.HotConfig.ctl()) for the router bias controller.
  """
  if not stats:
    return stats
  new = jax.tree_util.tree_map(lambda a: a, stats)

  def upd(block, cur, st, stacked):
    def fn(c, s):
      return block.update_stats(c, s, cfg, moe_ctl)
    return jax.vmap(fn)(cur, st) if stacked else fn(cur, st)

  def layer(kind, cur, st, out, stacked):
    for block in (blocks.mixer(kind), blocks.ffn_block(cfg)):
      if block.key in cur and block.update_stats is not None:
        out[block.key] = upd(block, cur[block.key], st[block.key], stacked)

  for j, k in enumerate(cfg.model.pattern):
    lj = f"l{j}"
    layer(k, stats["groups"].get(lj, {}), step_stats["groups"][lj], new["groups"][lj], True)
  if "mtp" in stats and "mtp" in step_stats:
    layer("G", stats["mtp"]["layer"], step_stats["mtp"]["layer"], new["mtp"]["layer"], False)
  return new
