"""Mixture of experts (SPEC §2.4): shared SwiGLU + routed SwiGLU experts, two routers,
dropless expert-parallel dispatch with dense grouped matmuls.

Variables (names are part of the contract, docs/ARCHITECTURE.md)
----------------------------------------------------------------
params["moe"] = {
  "router":  null_slot: {"w" [d, E], "logit_bias" [E], "null_logit" []};  sigmoid: {"w" [d, E]}
  "shared":  SwiGLU {"gate" [d, Fs], "up" [d, Fs], "down" [Fs, d]}
  "experts": {"gate" [Ep, d, f], "up" [Ep, d, f], "down" [Ep, f, d]}   (logical axis "expert" on Ep)
}
stats["moe"] = sigmoid router: {"bias" [E], "use_ema" [E]};  null-slot router: {}.

E is the number of real experts; Ep = E rounded up to a multiple of `cfg.mesh.expert` (the
expert-parallel size). Padding experts occupy the LAST Ep - E slots of the stacked arrays
(460 experts on 8 devices: Ep = 464, devices 0-6 hold 58 real experts each, device 7 holds 54
real + 4 padding). The router only has E outputs, so routing can never select a padding
expert; padding weights are initialised to zero, get zero gradient and are excluded from
counts (`expert_layout`).

Routing (router matmul in the compute dtype, float32 logits and everything after)
-----------------------------------------------------------------------------------
* null_slot (5B/9B): logits = [x W + logit_bias, null_logit repeated n_null]; top-k over the
  E + n_null slots; weights = softmax over the k picked logits, null picks zeroed, the rest
  renormalised (sum clamped at 1e-6, so a token with only null picks gets no routed output).
  aux = balance_w * E sum_e f_e p_e + z_w * mean(lse(all slot logits)^2)
        + null_w * (null_rate - null_target)^2
  with p_e = mean over tokens of softmax over the REAL logits, f_e = real picks of e / all real
  picks (null picks count for neither), as in the reference. null_rate is a hard count, so its
  term has no gradient (reference behaviour).
* sigmoid (120B): s = sigmoid(x W); picks = top-k of s + bias (bias: non-trained buffer in
  stats); gates = s at the picks, renormalised to sum 1. aux = z_w * mean(lse(x W)^2) with
  z_w = 0 by default (logged). The balance value is logged, not trained.

`selection` = {"idx": int32 [B, T, k] slot ids}. Given, it is reused (never re-selected): the
gates are recomputed from it differentiably, which is what the reversible recompute needs.

Dispatch (`moe.dispatch`)
-------------------------
Assignments (token, pick) are sorted by expert and packed into groups of a static capacity
C0 = round_up(capacity_factor * N k / Ep, group_pad / n_ep) rows per (sending device, expert)
(N = the device's tokens, n_ep = expert-parallel devices: an expert's matmul then sees n_ep
groups, a multiple of group_pad rows), so the expert compute is one batched einsum
[Ep_local, n_ep C0, d] x [Ep_local, d, f] (`grouped_swiglu`, the one function every routed expert
computation goes through; TQP swaps in `tqp.tqp_grouped_swiglu`). See `capacities`.
Packing and combining are gathers in both directions (`dispatch_rows`, `combine_rows`: custom
VJPs over a round's two index maps, assignment -> row and row -> assignment), so no backward
scatter-add runs and no [N, k, d] tensor of picked rows is built.
* capacity: one round of C0 rows per expert; rows past C0 are dropped (counted in step_stats).
* dropless (default): the same first round, then overflow rounds of C1 = round_up(C0 *
  overflow_round, group_pad) rows for positions [C0 + r C1, C0 + (r+1) C1). The number of rounds
  is bounded statically (an expert receives at most one pick per token, so at most N rows), and
  the overflow rounds actually needed (from the mesh-wide max load) run in a `lax.fori_loop`
  with a traced trip count, forward and backward (`_overflow_rounds`, a custom VJP that
  recomputes each round in the backward), so the result is exact for any routing, costs
  nothing extra when loads fit in C0, and stores no per-round activations.
With an "expert" mesh axis of size n > 1 (sharding.current_mesh()), the dispatch runs inside
`jax.shard_map`: tokens are split over (data, expert), experts over expert, and each round sends
rows with one all_to_all and brings results back with another. Without a mesh, or with expert
axis size 1, the same code runs locally.

The test reference `moe_reference` computes every expert on every token, masked by the gates.

Hot config
----------
`HotConfig` re-reads the JSON file named by `cfg.moe.hot_config` every `hot_config_every` steps;
keys gamma, cap_lo, cap_hi, guard_k, z_weight (or their config names bias_gamma, ...) override
the config at run time and every change is logged. `HotConfig.ctl()` returns the current values
as float32 arrays: pass them as `consts["moe_ctl"]` to the forward (z weight) and as `ctl=` to
`moe_update_stats`, so a change takes effect without recompiling.
"""
from __future__ import annotations

import json
import logging
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from lightning_jax import nn, remat, sharding, tqp
from lightning_jax.config import ConfigError, expert_slots
from lightning_jax.layers import ffn
from lightning_jax.ops.dispatch.api import combine_rows, dispatch_rows

log = logging.getLogger(__name__)

ROUTER_STD = 0.02
EXPERT_STD = 0.02


# ----------------------------------------------------------------------------- layout
def ep_size(cfg) -> int:
  """Expert-parallel devices of the mesh (mesh.expert)."""
  return max(1, int(cfg.mesh.expert))


def padded_experts(cfg, n_experts: int) -> int:
  """Stored expert slots: n_experts rounded up to the layout's multiple (moe.expert_pad, a model
  field: 0 means mesh.expert when the run is created; config.expert_slots)."""
  return expert_slots(cfg, n_experts)


def expert_layout(cfg, n_experts: int) -> dict:
  """{"real", "padded", "per_device", "padding"}: padding experts are the last slots."""
  ep = padded_experts(cfg, n_experts)
  return {"real": n_experts, "padded": ep, "per_device": ep // ep_size(cfg),
          "padding": ep - n_experts}


def aux_layer_scale(n_layers: int) -> float:
  """Summed aux over layers is scaled by 8/N_layers when N_layers > 8 (SPEC §2.4)."""
  return 8.0 / n_layers if n_layers > 8 else 1.0


def validate_moe(cfg, n_experts: int):
  """Build-time checks of one MoE sublayer with n_experts experts: top-k against the router's
  slots, experts against the mesh (the fields themselves: config.validate)."""
  e = cfg.moe
  if n_experts < 1:
    raise ConfigError(f"moe expert count {n_experts} must be at least 1.")
  n_slots = n_experts + (int(e.n_null) if e.router == "null_slot" else 0)
  if not 1 <= e.top_k <= n_slots:
    raise ConfigError(f"moe.top_k={e.top_k} does not fit the {e.router} router's {n_slots} slots "
                      f"({n_experts} experts"
                      + (f" + {e.n_null} null" if e.router == "null_slot" else "") + ").")
  ep = ep_size(cfg)
  if n_experts < ep:
    raise ConfigError(f"moe expert count {n_experts} is smaller than mesh.expert={ep}; expected "
                      f"at least one real expert per expert-parallel device.")


# ----------------------------------------------------------------------------- specs
def _expert_init(n_real: int, std: float):
  """N(0, std) for real experts, zeros for the padding slots at the end."""
  def f(key, shape, dtype):
    w = std * jax.random.normal(key, shape, jnp.float32)
    keep = (jnp.arange(shape[0]) < n_real).reshape((-1,) + (1,) * (len(shape) - 1))
    return jnp.where(keep, w, 0.0).astype(dtype)
  return f


def moe_specs(cfg, n_experts: int) -> dict:
  """Spec tree {router, shared, experts} for one MoE sublayer with n_experts real experts."""
  validate_moe(cfg, n_experts)
  e, d = cfg.moe, cfg.model.d_model
  f, ep = e.expert_width, padded_experts(cfg, n_experts)
  router = {"w": nn.Spec((d, n_experts), ("embed", None), nn.normal(ROUTER_STD))}
  if e.router == "null_slot":
    router["logit_bias"] = nn.Spec((n_experts,), (None,), nn.zeros)
    router["null_logit"] = nn.Spec((), (), nn.zeros)
  init = _expert_init(n_experts, EXPERT_STD)
  experts = {
      "gate": nn.Spec((ep, d, f), ("expert", "embed", "expert_mlp"), init),
      "up": nn.Spec((ep, d, f), ("expert", "embed", "expert_mlp"), init),
      "down": nn.Spec((ep, f, d), ("expert", "expert_mlp", "embed"), init),
  }
  return {"router": router, "shared": ffn.swiglu_specs(d, e.shared_width), "experts": experts}


def moe_stats_specs(cfg, n_experts: int) -> dict:
  """Non-trained buffers: sigmoid router {bias [E], use_ema [E]}; null-slot router {}."""
  if cfg.moe.router != "sigmoid":
    return {}
  return {"bias": nn.Spec((n_experts,), (None,), nn.zeros),
          "use_ema": nn.Spec((n_experts,), (None,), nn.constant(1.0 / n_experts))}


def moe_stats_init(cfg, n_experts: int) -> dict:
  return nn.init(moe_stats_specs(cfg, n_experts), jax.random.PRNGKey(0))


# ----------------------------------------------------------------------------- routing
def _ctl(consts, name, default):
  ctl = (consts or {}).get("moe_ctl") if isinstance(consts, dict) else None
  if ctl is not None and name in ctl:
    return jnp.asarray(ctl[name], jnp.float32)
  return jnp.float32(default)


def route(p_router, stats, x2, cfg, consts=None, idx=None):
  """x2 [N, d] -> (idx [N, k] slot ids, eid [N, k] expert id or -1, gates [N, k] f32, aux, st)."""
  e = cfg.moe
  k = e.top_k
  n_exp = p_router["w"].shape[-1]
  # router matmul in the compute dtype with float32 accumulation/output (SPEC: softmaxes f32)
  raw = jnp.einsum("nd,de->ne", x2, p_router["w"].astype(x2.dtype),
                   preferred_element_type=jnp.float32)                    # [N, E]
  if e.router == "null_slot":
    real = raw + p_router["logit_bias"].astype(jnp.float32)
    null = jnp.broadcast_to(p_router["null_logit"].astype(jnp.float32), real.shape[:-1] + (e.n_null,))
    logits = jnp.concatenate([real, null], -1)                              # [N, E + n_null]
    if idx is None:
      _, idx = jax.lax.top_k(jax.lax.stop_gradient(logits), k)
    w = jax.nn.softmax(jnp.take_along_axis(logits, idx, -1), -1)
    is_real = idx < n_exp
    w = w * is_real
    gates = w / jnp.maximum(w.sum(-1, keepdims=True), 1e-6)
    p_mean = jax.nn.softmax(real, -1).mean(0)
    z = jnp.mean(jax.nn.logsumexp(logits, -1) ** 2)
  else:
    s = jax.nn.sigmoid(raw)
    if idx is None:
      _, idx = jax.lax.top_k(jax.lax.stop_gradient(s) + stats["bias"].astype(jnp.float32), k)
    g = jnp.take_along_axis(s, idx, -1)
    gates = g / jnp.maximum(g.sum(-1, keepdims=True), 1e-6)
    is_real = jnp.ones(idx.shape, bool)
    p_mean = jax.nn.softmax(raw, -1).mean(0)
    z = jnp.mean(jax.nn.logsumexp(raw, -1) ** 2)
  eid = jnp.where(is_real, idx, -1).astype(jnp.int32)
  load = jnp.zeros((n_exp,), jnp.float32).at[jnp.where(is_real, idx, 0).reshape(-1)].add(
      is_real.reshape(-1).astype(jnp.float32))
  f_e = jax.lax.stop_gradient(load / jnp.maximum(load.sum(), 1e-6))
  balance = n_exp * jnp.sum(f_e * p_mean)
  null_rate = jnp.mean(1.0 - is_real.astype(jnp.float32))
  zw = _ctl(consts, "z_weight", e.z_weight)
  if e.router == "null_slot":
    aux = (e.balance_weight * balance + zw * z
           + e.null_weight * jax.lax.stop_gradient((null_rate - e.null_target) ** 2))
  else:
    aux = zw * z
  st = {"load": load, "z": jax.lax.stop_gradient(z), "balance": jax.lax.stop_gradient(balance),
        "null_rate": null_rate, "assignments": load.sum()}
  return idx.astype(jnp.int32), eid, gates, aux.astype(jnp.float32), st


# ----------------------------------------------------------------------------- experts
def grouped_swiglu(experts_params, experts_frozen, xg, cfg):
  """The per-group expert SwiGLU: xg [E_local, C, d] -> [E_local, C, d] in the compute dtype."""
  if cfg.tqp.enabled:
    return tqp.tqp_grouped_swiglu(experts_params, experts_frozen, xg, cfg)
  del experts_frozen
  dt = nn.dtype_of(cfg.model.dtype)
  x = xg.astype(dt)
  # the expert matmuls batch over experts, so model.remat=selective keeps them by name
  g, u = remat.keep((jnp.einsum("ecd,edf->ecf", x, experts_params["gate"].astype(dt)),
                     jnp.einsum("ecd,edf->ecf", x, experts_params["up"].astype(dt))))
  return remat.keep(jnp.einsum("ecf,efd->ecd", jax.nn.silu(g) * u,
                               experts_params["down"].astype(dt)))


def _round_up(n: int, m: int) -> int:
  return max(m, -(-int(n) // m) * m)


def capacities(cfg, n_tokens_local: int, n_padded: int, n_dev: int = 1):
  """Static (C0, C1, n_overflow_rounds) of one (sending device, expert) group for a device
  holding n_tokens_local tokens. With n_dev expert-parallel devices an expert's matmul sees
  n_dev such groups, so each is padded to group_pad / n_dev rows (the matmul to group_pad)."""
  e = cfg.moe
  pad = max(1, int(e.group_pad) // n_dev)
  mean = n_tokens_local * e.top_k / n_padded
  c0 = min(_round_up(math.ceil(e.capacity_factor * mean), pad), _round_up(n_tokens_local, pad))
  if e.dispatch == "capacity":
    return c0, 0, 0
  frac = float(e.overflow_round)
  c1 = _round_up(math.ceil(frac * c0), pad)
  rounds = max(0, -(-(n_tokens_local - c0) // c1))    # a group holds at most n_tokens_local rows
  return c0, c1, rounds

def _round_maps(key, pos, order, counts, offsets, start, cap, n, k):
  """(src [E_tot cap], slot [N, k]) of the round holding group positions [start, start + cap).
  key/pos [A]: expert (sentinel E_tot) and position in its group of each flat assignment;
  order [A]: assignments sorted by expert; counts/offsets [E_tot]: group sizes and starts."""
  e_tot = counts.shape[0]
  a = key.shape[0]
  rows = e_tot * cap
  rel = pos - start
  hit = (key < e_tot) & (rel >= 0) & (rel < cap)
  slot = jnp.where(hit, key * cap + rel, rows).astype(jnp.int32).reshape(n, k)
  s = start + jnp.arange(cap, dtype=jnp.int32)
  ok = s[None, :] < counts[:, None]                                    # [E_tot, cap]
  src = jnp.where(ok, order[jnp.clip(offsets[:, None] + s[None, :], 0, a - 1)], a)
  return src.astype(jnp.int32).reshape(rows), slot


def _dispatch_local(wp, wf, x, eid, gates, cfg, n_dev, axis, reduce_axes):
  """Per-device dispatch. x [N, d], eid/gates [N, k]; experts local [E_loc, ...]."""
  n, d = x.shape
  k = eid.shape[1]
  a = n * k
  e_loc = jax.tree_util.tree_leaves(wp)[0].shape[0]
  e_tot = n_dev * e_loc
  c0, c1, rounds = capacities(cfg, n, e_tot, n_dev)

  key = jnp.where(eid >= 0, eid, e_tot).reshape(-1).astype(jnp.int32)   # sentinel sorts last
  order = jnp.argsort(key, stable=True).astype(jnp.int32)
  # group starts/sizes from the sorted keys (a binary search; a scatter-add of A ones into
  # E_tot + 1 bins would serialise on atomics)
  bounds = jnp.searchsorted(key[order], jnp.arange(e_tot + 1, dtype=jnp.int32),
                            side="left").astype(jnp.int32)
  offsets, counts = bounds[:-1], bounds[1:] - bounds[:-1]
  rank = jnp.zeros((a,), jnp.int32).at[order].set(jnp.arange(a, dtype=jnp.int32))
  pos = rank - jnp.concatenate([offsets, jnp.zeros((1,), jnp.int32)])[key]   # position in group
  gates = gates.astype(jnp.float32)
  maps = (key, pos, order, counts, offsets)

  def one_round(wp, wf, x, gates, maps, start, cap):
    src, slot = _round_maps(*maps, start, cap, n, k)
    with jax.named_scope("gather_rows"):
      xs = dispatch_rows(x, src, slot)                                 # [E_tot cap, d]
    if axis is not None:
      xs = jax.lax.all_to_all(xs.reshape(n_dev, e_loc, cap, d), axis, 0, 0, tiled=True)
      xg = xs.transpose(1, 0, 2, 3).reshape(e_loc, n_dev * cap, d)
    else:
      xg = xs.reshape(e_tot, cap, d)
    # kept inside a reversible rebuild under model.remat=selective: the adapters' weight
    # gradients read these rows, and gathering them again (plus, on an expert mesh, the
    # all-to-all) cost 26.5 ms of the 120B rank's step on an H100
    xg = remat.keep_in_rebuild(xg)
    with jax.named_scope("experts"):
      yg = grouped_swiglu(wp, wf, xg, cfg)
    if axis is not None:
      ys = yg.reshape(e_loc, n_dev, cap, d).transpose(1, 0, 2, 3)
      ys = jax.lax.all_to_all(ys, axis, 0, 0, tiled=True).reshape(e_tot * cap, d)
    else:
      ys = yg.reshape(e_tot * cap, d)
    with jax.named_scope("combine_rows"):
      return combine_rows(ys, gates, src, slot)                        # [N, d] float32

  out = one_round(wp, wf, x, gates, maps, 0, c0)
  if cfg.moe.dispatch == "capacity":
    dropped = jnp.sum(jnp.maximum(counts - c0, 0)).astype(jnp.float32)
  else:
    dropped = jnp.zeros((), jnp.float32)
    if rounds > 0:
      maxc = jnp.max(counts)
      if reduce_axes:
        maxc = jax.lax.pmax(maxc, reduce_axes)
      # rounds actually needed (the same on every device: maxc is the mesh-wide max)
      n_run = jnp.clip((maxc - c0 + c1 - 1) // c1, 0, rounds).astype(jnp.int32)
      tail = _overflow_rounds(lambda wp_, wf_, x_, g_, m_, r: one_round(
          wp_, wf_, x_, g_, m_, c0 + r * c1, c1), (n, d))
      # kept by name under model.remat=selective: its custom VJP would otherwise run the
      # rounds' forward once more just to give this sum
      out = out + remat.keep(tail(wp, wf, x, gates, maps, n_run))
  if reduce_axes:
    dropped = jax.lax.psum(dropped, reduce_axes)
  return out, dropped


def _overflow_rounds(round_fn, out_shape):
  """sum_{r < n_run} round_fn(wp, wf, x, gates, maps, r) as a custom VJP whose forward AND
  backward are while loops over the n_run rounds actually needed (a traced count): rounds that
  are not needed cost nothing (no zero-valued round outputs, no per-round weight-cotangent adds),
  and a round's activations are never stored: the backward recomputes each round under jax.vjp.
  wf (frozen experts) and the integer maps get no cotangent."""
  @jax.custom_vjp
  def tail(wp, wf, x, gates, maps, n_run):
    return jax.lax.fori_loop(
        0, n_run, lambda r, acc: acc + round_fn(wp, wf, x, gates, maps, r),
        jnp.zeros(out_shape, jnp.float32))

  def fwd(wp, wf, x, gates, maps, n_run):
    return tail(wp, wf, x, gates, maps, n_run), (wp, wf, x, gates, maps, n_run)

  def bwd(res, dout):
    wp, wf, x, gates, maps, n_run = res

    def body(r, acc):
      _, vjp = jax.vjp(lambda wp_, x_, g_: round_fn(wp_, wf, x_, g_, maps, r), wp, x, gates)
      return jax.tree_util.tree_map(lambda s, t: s + t.astype(s.dtype), acc, vjp(dout))
    zeros = jax.tree_util.tree_map(
        jnp.zeros_like, (wp, x.astype(jnp.float32), gates.astype(jnp.float32)))
    dwp, dx, dg = jax.lax.fori_loop(0, n_run, body, zeros)
    return dwp, None, dx.astype(x.dtype), dg.astype(gates.dtype), None, None

  tail.defvjp(fwd, bwd)
  return tail


def dispatch(wp, wf, x2, eid, gates, cfg):
  """Routed expert output [N, d] (float32) and the dropped-row count, on the current mesh."""
  mesh = sharding.current_mesh()
  n_ep = mesh.shape["expert"] if (mesh is not None and "expert" in mesh.axis_names) else 1
  e_pad = jax.tree_util.tree_leaves(wp)[0].shape[0]
  if n_ep == 1:
    return _dispatch_local(wp, wf, x2, eid, gates, cfg, 1, None, ())
  if e_pad % n_ep:
    raise ConfigError(f"{e_pad} stored experts do not split over the mesh's expert axis of size "
                      f"{n_ep}; expected mesh.expert={n_ep} in the config that built the layer.")
  tok_axes = tuple(a for a in ("data", "expert") if mesh.shape[a] > 1)
  n_tok_dev = math.prod(mesh.shape[a] for a in tok_axes)
  if x2.shape[0] % n_tok_dev:
    raise ConfigError(f"{x2.shape[0]} tokens do not split over the {n_tok_dev} data x expert "
                      f"devices; expected a batch x sequence divisible by {n_tok_dev}.")
  tok = P(tok_axes, None)
  # expert-stacked leaves ([Ep, ...]) split over "expert"; 1-D leaves (TQP's shared rotation
  # signs) stay replicated
  exp_spec = lambda t: jax.tree_util.tree_map(lambda l: P("expert") if l.ndim >= 2 else P(), t)
  fn = lambda wp_, wf_, x_, e_, g_: _dispatch_local(wp_, wf_, x_, e_, g_, cfg, n_ep, "expert",
                                                      tok_axes)
  smap = jax.shard_map(fn, mesh=mesh, in_specs=(exp_spec(wp), exp_spec(wf), tok, tok, tok),
                       out_specs=(tok, P()), check_vma=False)
  return smap(wp, wf, x2, eid, gates)


def _expert_vars(p, frozen, cfg):
  if cfg.tqp.enabled:
    return p["adapters"], (frozen or {})["experts"]
  return p["experts"], None


def moe_apply(p, frozen, stats, x, consts, cfg, selection=None):
  """x [B, T, d] -> (y [B, T, d], selection, aux, step_stats)."""
  b, t, d = x.shape
  dt = nn.dtype_of(cfg.model.dtype)
  x2 = x.reshape(b * t, d)
  idx = None if selection is None else selection["idx"].reshape(b * t, -1)
  with jax.named_scope("route"):
    idx, eid, gates, aux, st = route(p["router"], stats, x2.astype(dt), cfg, consts, idx)
  wp, wf = _expert_vars(p, frozen, cfg)
  with jax.named_scope("routed"):
    routed, dropped = dispatch(wp, wf, x2.astype(dt), eid, gates, cfg)
  with jax.named_scope("shared"):
    y = ffn.swiglu(p["shared"], x2.astype(dt)).astype(jnp.float32) + routed
  st["dropped"] = dropped
  st["dropped_fraction"] = dropped / jnp.maximum(st["assignments"], 1.0)
  return (y.astype(dt).reshape(b, t, d), {"idx": idx.reshape(b, t, -1)}, aux, st)


def moe_reference(p, frozen, stats, x, consts, cfg, selection=None):
  """Test reference: every real expert on every token, masked by the gates (same routing)."""
  b, t, d = x.shape
  dt = nn.dtype_of(cfg.model.dtype)
  x2 = x.reshape(b * t, d)
  idx = None if selection is None else selection["idx"].reshape(b * t, -1)
  idx, eid, gates, aux, st = route(p["router"], stats, x2.astype(dt), cfg, consts, idx)
  n_exp = p["router"]["w"].shape[-1]
  wp, wf = _expert_vars(p, frozen, cfg)
  real = lambda l: l[:n_exp] if l.ndim >= 2 else l
  wp = jax.tree_util.tree_map(real, wp)
  wf = None if wf is None else jax.tree_util.tree_map(real, wf)
  dense_gates = jnp.zeros((b * t, n_exp + 1), jnp.float32).at[
      jnp.arange(b * t)[:, None], jnp.where(eid >= 0, eid, n_exp)].add(gates)[:, :n_exp]
  ye = grouped_swiglu(wp, wf, jnp.broadcast_to(x2.astype(dt), (n_exp, b * t, d)), cfg)
  routed = jnp.einsum("end,ne->nd", ye.astype(jnp.float32), dense_gates)
  y = ffn.swiglu(p["shared"], x2.astype(dt)).astype(jnp.float32) + routed
  st["dropped"] = jnp.zeros((), jnp.float32)
  st["dropped_fraction"] = jnp.zeros((), jnp.float32)
  return (y.astype(dt).reshape(b, t, d), {"idx": idx.reshape(b, t, -1)}, aux, st)


# ----------------------------------------------------------------------------- bias controller
def moe_update_stats(stats, step_stats, cfg, ctl=None):
  """Loss-free balancing: move each expert's selection bias toward balanced use.

  use_ema <- (1 - alpha) use_ema + alpha f, f = this step's share of real picks. Inside
  [cap_lo, cap_hi] the bias moves by gamma toward the uniform share 1/E; below cap_lo it rises
  by gamma * min(1 + k ((cap_lo - u)/cap_lo)^2, 20), above cap_hi it falls by
  gamma * min(1 + k ((u - cap_hi)/cap_hi)^2, 20). Works on stacked stats ([..., E]).
  `ctl` (HotConfig.ctl()) overrides gamma, cap_lo, cap_hi, guard_k without recompiling.
  """
  if not stats or "bias" not in stats:
    return stats
  e = cfg.moe
  ctl = ctl or {}
  gamma = jnp.asarray(ctl.get("gamma", e.bias_gamma), jnp.float32)
  lo = jnp.asarray(ctl.get("cap_lo", e.bias_cap_lo), jnp.float32)
  hi = jnp.asarray(ctl.get("cap_hi", e.bias_cap_hi), jnp.float32)
  gk = jnp.asarray(ctl.get("guard_k", e.bias_guard_k), jnp.float32)
  load = step_stats["load"].astype(jnp.float32)
  f = load / jnp.maximum(load.sum(-1, keepdims=True), 1e-6)
  ema = (1.0 - e.bias_ema) * stats["use_ema"] + e.bias_ema * f
  target = 1.0 / load.shape[-1]
  below, above = ema < lo, ema > hi
  up = gamma * jnp.minimum(1.0 + gk * ((lo - ema) / lo) ** 2, 20.0)
  down = -gamma * jnp.minimum(1.0 + gk * ((ema - hi) / hi) ** 2, 20.0)
  band = gamma * jnp.where(ema < target, 1.0, -1.0)
  step = jnp.where(below, up, jnp.where(above, down, band))
  return {**stats, "bias": stats["bias"] + step, "use_ema": ema}


def log_summary(step_stats, stats=None) -> dict:
  """Scalars for the metrics log from one layer's (or stacked layers') step_stats and stats:
  load max/min over mean (per-expert use), dropped fraction, null rate, z, balance, and the
  selection-bias range of the sigmoid router."""
  load = step_stats["load"]
  mean = jnp.maximum(load.mean(-1), 1e-6)
  out = {"load_max_over_mean": jnp.max(load.max(-1) / mean),
         "load_min_over_mean": jnp.min(load.min(-1) / mean),
         "dropped_fraction": jnp.max(step_stats["dropped_fraction"]),
         "null_rate": jnp.mean(step_stats["null_rate"]),
         "z": jnp.mean(step_stats["z"]), "balance": jnp.mean(step_stats["balance"])}
  if stats and "bias" in stats:
    out.update(bias_min=stats["bias"].min(), bias_max=stats["bias"].max(),
               bias_mean=stats["bias"].mean())
  return out


# ----------------------------------------------------------------------------- hot config
class HotConfig:
  """Runtime overrides of the controller values from a JSON file (cfg.moe.hot_config).

  Call `poll(step)` once per step; every `hot_config_every` steps the file is re-read, changed
  values are applied and logged (also kept in `self.changes`). Unknown keys and non-numbers
  are logged and ignored (a typo must not kill a long run). `ctl()` gives the current values as
  float32 arrays for consts["moe_ctl"] / moe_update_stats(ctl=...); `apply(cfg)` returns a copy
  of cfg with them written in.
  """
  FIELDS = {"gamma": "bias_gamma", "cap_lo": "bias_cap_lo", "cap_hi": "bias_cap_hi",
            "guard_k": "bias_guard_k", "z_weight": "z_weight"}
  # allowed range of each value (inclusive bounds; cap_lo > 0: the controller divides by it),
  # and cap_lo <= cap_hi. A file with any value outside them changes nothing (one sentence).
  RANGES = {"gamma": (0.0, 1.0), "cap_lo": (1e-12, 1.0), "cap_hi": (1e-12, 1.0),
            "guard_k": (0.0, 1e3), "z_weight": (0.0, 1.0)}

  def __init__(self, cfg, logger=None):
    self.path = cfg.moe.hot_config
    self.every = max(1, int(cfg.moe.hot_config_every))
    self.values = {k: float(cfg.moe[v]) for k, v in self.FIELDS.items()}
    self.changes: list = []
    self._log = logger or log.info
    self._mtime = None

  def poll(self, step: int) -> dict:
    """Re-read the file on every `every`-th step; return {key: (old, new)} of changed values."""
    if not self.path or step % self.every:
      return {}
    try:
      with open(self.path) as fh:
        data = json.load(fh)
    except FileNotFoundError:
      return {}
    except (OSError, json.JSONDecodeError) as err:
      self._log(f"moe hot config {self.path} unreadable at step {step} ({err}); keeping "
                f"current values.")
      return {}
    names = {**{k: k for k in self.FIELDS}, **{v: k for k, v in self.FIELDS.items()}}
    new = dict(self.values)
    for key, val in (data.items() if isinstance(data, dict) else []):
      if key not in names or isinstance(val, bool) or not isinstance(val, (int, float)):
        self._log(f"moe hot config {self.path}: ignoring {key}={val!r}; expected one of "
                  f"{sorted(self.FIELDS)} with a number.")
        continue
      k = names[key]
      lo, hi = self.RANGES[k]
      if not (math.isfinite(float(val)) and lo <= float(val) <= hi):
        self._log(f"moe hot config {self.path} at step {step}: {key}={val!r} is outside "
                  f"[{lo:g}, {hi:g}] (or not finite); keeping all current values "
                  f"({', '.join(f'{n}={v:g}' for n, v in self.values.items())}).")
        return {}
      new[k] = float(val)
    if new["cap_lo"] > new["cap_hi"]:
      self._log(f"moe hot config {self.path} at step {step}: cap_lo={new['cap_lo']:g} exceeds "
                f"cap_hi={new['cap_hi']:g}; keeping all current values.")
      return {}
    changed = {k: (self.values[k], v) for k, v in new.items() if v != self.values[k]}
    self.values = new
    for k, (old, new) in changed.items():
      self._log(f"moe hot config step {step}: {k} {old:g} -> {new:g}")
      self.changes.append((step, k, old, new))
    return changed

  def ctl(self) -> dict:
    return {k: jnp.float32(v) for k, v in self.values.items()}

  def apply(self, cfg):
    c = cfg.copy_and_resolve_references()
    for k, v in self.values.items():
      c.moe[self.FIELDS[k]] = v
    return c
