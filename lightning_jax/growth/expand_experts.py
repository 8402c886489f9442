"""Expert expansion (SPEC §3.3): `expand_experts(params, src_cfg, dst_cfg, ratio=0.5,
router_sigma=0.05, seed=1337)`, 20 -> 460 routed experts per layer.

Experts: 460 = 23 clones x 20 source experts, clone-major: target expert c * 20 + s is clone c of
source expert s. For every target expert independently, a random `ratio` of its intermediate
channels S (|S| = round(ratio * f)) is re-drawn: gate[:, S] ~ N(mean, std of source gate[:, S]),
up[:, S] likewise, down[S, :] ~ N(mean, std of source down[S, :]); the other channels are exact
copies of the source expert. The same S serves gate, up and down (Drop-Upcycling, the reference's
scripts/build_120b_init.py). Padding expert slots (expert parallelism) are 0.

Router, null-slot (9B) -> sigmoid (120B): the two routers share one weight, w [d, E] (logits
x w). Its columns are the learned per-expert directions, so they carry over: w is tiled 23x along
the expert axis (column c * 20 + s = column s) plus N(0, (router_sigma * std(source w))^2)
noise, so clones of one expert start near-equal but not tied. The null-slot router's other
parameters have no sigmoid counterpart and are dropped deliberately (listed in the report):
`logit_bias` [20] (a softmax prior over the real experts; the reference zeroes it for the 460) and
`null_logit` (the null slots do not exist at 120B). The sigmoid router's selection bias (stats)
starts at 0 and its use EMA at the uniform 1/E. If the target router is also null-slot (an
expansion without the router change), logit_bias starts at 0 and null_logit is copied. A sigmoid
source keeps w's mapping; its stats are reset (bias 0, use 1/E) as for the null-slot source.

The MTP block keeps moe.mtp_n_experts (20) experts: experts, shared expert and router w are
copied unchanged; the router-kind change applies to it as above (its stats start fresh).
Everything else copies unchanged. Depth is kept (run depth_map first).
"""
from __future__ import annotations

import concurrent.futures
import os

import numpy as np

from lightning_jax.growth import common, registry
from lightning_jax.growth.common import GrowthError, GrowthReport
from lightning_jax.growth.dense_to_moe import fresh_sigmoid_stats


def _check_stages(flat_src, src_cfg, dst_cfg, ratio, router_sigma):
  t = "expand_experts"
  if not src_cfg.moe.enabled or not any("/moe/" in k for k in flat_src):
    raise GrowthError(f"expand_experts needs an MoE source (moe.enabled=True, e.g. the 9B stage), but "
                      f"the source is dense ({common.stage_name(src_cfg)}); run dense_to_moe first.")
  if not dst_cfg.moe.enabled:
    raise GrowthError(f"expand_experts needs an MoE target config; the target is "
                      f"{common.stage_name(dst_cfg)}.")
  if src_cfg.model.n_layers != dst_cfg.model.n_layers:
    raise GrowthError(f"expand_experts keeps the depth: the source has model.n_layers="
                      f"{src_cfg.model.n_layers} but the target {dst_cfg.model.n_layers}; run "
                      f"depth_map first.")
  common.same_fields(src_cfg, dst_cfg, ("model.d_model", "model.pattern", "model.vocab_size",
                                        "model.mtp.enabled", "moe.expert_width", "moe.shared_width",
                                        "moe.mtp_n_experts"), t)
  es, ed = src_cfg.moe.n_experts, dst_cfg.moe.n_experts
  if ed % es or ed < es:
    raise GrowthError(f"expand_experts makes clones of every source expert: the target's "
                      f"moe.n_experts={ed} must be a multiple of the source's {es}.")
  if not 0.0 <= ratio <= 1.0:
    raise GrowthError(f"expand_experts ratio={ratio}; expected a fraction of channels in [0, 1].")
  if router_sigma < 0:
    raise GrowthError(f"expand_experts router_sigma={router_sigma}; expected >= 0.")


def expand_one(gate, up, down, n_clones, n_padded, ratio, rng):
  """Source experts of one layer (gate/up [Es, d, f], down [Es, f, d], real ones only) ->
  ({gate, up, down} [Ep, ...], redrawn channel sets [n_clones * Es, n_re])."""
  es, d, f = gate.shape
  n_re = int(round(ratio * f))
  out = {"gate": np.zeros((n_padded, d, f), np.float32), "up": np.zeros((n_padded, d, f), np.float32),
         "down": np.zeros((n_padded, f, d), np.float32)}
  sets = np.zeros((n_clones * es, n_re), np.int64)
  for c in range(n_clones):
    for s in range(es):
      t = c * es + s
      S = np.sort(rng.permutation(f)[:n_re])
      sets[t] = S
      g, u, dn = gate[s].copy(), up[s].copy(), down[s].copy()
      if n_re:
        for w in (g, u):
          sel = w[:, S]
          w[:, S] = rng.normal(sel.mean(dtype=np.float64), sel.std(ddof=1, dtype=np.float64)
                               if sel.size > 1 else 0.0, sel.shape).astype(np.float32)
        sel = dn[S, :]
        dn[S, :] = rng.normal(sel.mean(dtype=np.float64), sel.std(ddof=1, dtype=np.float64)
                              if sel.size > 1 else 0.0, sel.shape).astype(np.float32)
      out["gate"][t], out["up"][t], out["down"][t] = g, u, dn
  return out, sets


class Plan:
  """Everything expand_experts writes except the routed experts of the layer groups: `out` (flat
  {path: array}, routers, MTP block, copies), `report`, `used`, and per pattern position j
  `layers[j] = (prefix, lead, n_pad, g_n, flat_in)` (flat_in: the source experts [g_n, Es, ...],
  views). The experts of (j, g) come from `expand_layer(plan, j, g)`; every (j, g) has its own
  random stream, so they can be expanded in any order, one at a time (growth.expand_to_tqp) or
  all at once (expand_experts), with the same result."""

  def __init__(self, **kw):
    self.__dict__.update(kw)

  def jobs(self) -> list:
    return [(j, g) for j in self.layers for g in range(self.layers[j][3])]

  def expert_keys(self):
    """(j, prefix, lead, {matrix: params/<prefix>/experts/<matrix>}) per pattern position."""
    for j, (prefix, lead, _, _, _) in self.layers.items():
      yield j, prefix, lead, {k: f"params/{prefix}/experts/{k}" for k in ("gate", "up", "down")}


def plan(params, src_cfg, dst_cfg, *, ratio: float = 0.5, router_sigma: float = 0.05,
         seed: int = 1337) -> Plan:
  """Checks, routers, MTP block and copies of expand_experts (see Plan)."""
  variables, was_full = common.as_variables(common.to_host(params))
  cols = tuple(c for c in common.COLLECTIONS if c in variables)
  flat_src = common.flatten({c: variables[c] for c in cols})
  t = "expand_experts"
  _check_stages(flat_src, src_cfg, dst_cfg, ratio, router_sigma)
  common.check_source(flat_src, src_cfg, cols, t)
  report = GrowthReport(t, {"ratio": float(ratio), "router_sigma": float(router_sigma),
                            "seed": int(seed)})
  _, want = common.abstract_flat(dst_cfg, cols)
  es, ed = src_cfg.moe.n_experts, dst_cfg.moe.n_experts
  n_clones = ed // es
  dst_router = dst_cfg.moe.router
  out, used = {}, set()

  def router_params(prefix, lead, n_dst, tiled: bool):
    w_key = f"params/{prefix}/router/w"
    w = common.np32(flat_src[w_key])
    used.add(w_key)
    if tiled:
      rng = common.rng_for(seed, "expand_experts/router", prefix)
      sd = float(np.std(w, ddof=1, dtype=np.float64)) if w.size > 1 else 0.0
      new = np.tile(w, (1,) * (w.ndim - 1) + (n_clones,))
      new = new + rng.normal(0.0, router_sigma * sd, new.shape).astype(np.float32)
      out[w_key] = new.astype(np.float32)
      report.provenance[w_key] = (f"grown tiled {n_clones}x clone-major + N(0, ({router_sigma} x "
                                  f"std {sd:.4g})^2) from {w_key}")
      report.choices.setdefault(prefix, {})["router_noise_std"] = router_sigma * sd
    else:
      out[w_key] = w
      report.provenance[w_key] = f"copy {w_key}"
    src_kind = "null_slot" if f"params/{prefix}/router/null_logit" in flat_src else "sigmoid"
    for k in ("logit_bias", "null_logit"):
      key = f"params/{prefix}/router/{k}"
      if key in flat_src and dst_router != "null_slot":
        report.dropped[key] = f"null-slot router parameter; no counterpart in the {dst_router} router"
    if dst_router == "null_slot":
      lb = f"params/{prefix}/router/logit_bias"
      nl = f"params/{prefix}/router/null_logit"
      if src_kind == "null_slot" and not tiled:
        for key in (lb, nl):
          out[key] = common.np32(flat_src[key])
          report.provenance[key] = f"copy {key}"
          used.add(key)
      else:
        out[lb] = np.zeros(lead + (n_dst,), np.float32)
        report.provenance[lb] = "fresh zeros (selection bias starts at 0)"
        if lb in flat_src:
          report.dropped[lb] = "per-expert logit bias restarts at 0 for the cloned experts"
        if nl in flat_src:
          out[nl] = common.np32(flat_src[nl])
          report.provenance[nl] = f"copy {nl}"
          used.add(nl)
        else:
          out[nl] = np.zeros(lead, np.float32)
          report.provenance[nl] = "fresh zeros"
    else:
      fresh_sigmoid_stats(n_dst, lead, prefix, out, report)
      for k in ("bias", "use_ema"):
        if f"stats/{prefix}/{k}" in flat_src:
          report.dropped[f"stats/{prefix}/{k}"] = "router statistics restart with the new experts"

  layers = {}
  for j in range(len(dst_cfg.model.pattern)):
    prefix = f"groups/l{j}/moe"
    src = {k: common.np32(flat_src[f"params/{prefix}/experts/{k}"]) for k in ("gate", "up", "down")}
    used.update(f"params/{prefix}/experts/{k}" for k in src)
    lead = src["gate"].shape[:-3]
    n_pad = want[f"params/{prefix}/experts/gate"].shape[-3]
    g_n = int(np.prod(lead))
    flat_in = {k: v.reshape((g_n,) + v.shape[-3:])[:, :es] for k, v in src.items()}
    layers[j] = (prefix, lead, n_pad, g_n, flat_in)
  for j, (prefix, lead, n_pad, g_n, _) in layers.items():
    for k in ("gate", "up", "down"):
      key = f"params/{prefix}/experts/{k}"
      report.provenance[key] = (f"grown {n_clones} clones x {es} (clone-major), ratio {ratio} of "
                                f"channels re-drawn, from {key}")
    report.choices.setdefault(prefix, {})["redrawn"] = None      # filled in by the expansion
    router_params(prefix, lead, ed, tiled=True)

  if dst_cfg.model.mtp.enabled:
    prefix = "mtp/layer/moe"
    n_mtp = dst_cfg.moe.mtp_n_experts
    for k in ("gate", "up", "down"):
      key = f"params/{prefix}/experts/{k}"
      w = common.np32(flat_src[key])[:n_mtp]
      n_pad = want[key].shape[0]
      full = np.zeros((n_pad,) + w.shape[1:], np.float32)
      full[:n_mtp] = w
      out[key] = full
      report.provenance[key] = f"copy {key} (the MTP block keeps {n_mtp} experts)"
      used.add(key)
    router_params(prefix, (), n_mtp, tiled=False)

  for k, v in flat_src.items():
    if k in used or k in report.dropped or k in out:
      continue
    if k in want:
      out[k] = v
      report.provenance[k] = f"copy {k}"
      used.add(k)
  return Plan(out=out, report=report, used=used, layers=layers, flat_src=flat_src, cols=cols,
              was_full=was_full, n_clones=n_clones, ratio=ratio, seed=seed, dst_cfg=dst_cfg)


def expand_layer(p: Plan, j: int, g: int):
  """The routed experts of pattern position j, group g: ({gate, up, down} [n_pad, ...] float32,
  redrawn channel sets [n_clones * Es, n_re]) from that (layer, group)'s own random stream."""
  prefix, _, n_pad, _, flat_in = p.layers[j]
  rng = common.rng_for(p.seed, "expand_experts", prefix, g)
  return expand_one(flat_in["gate"][g], flat_in["up"][g], flat_in["down"][g], p.n_clones, n_pad,
                    p.ratio, rng)


def expand_experts(params, src_cfg, dst_cfg, *, ratio: float = 0.5, router_sigma: float = 0.05,
                   seed: int = 1337, return_report: bool = False):
  """Clone and drop-upcycle routed experts (module docstring). Returns the same kind of tree as
  given (numpy leaves), or (tree, GrowthReport); the report's `choices[<moe node>]["redrawn"]`
  holds the re-drawn channel sets [G, E_target, round(ratio * f)]. Holds every layer's dense
  experts at once; growth.expand_to_tqp expands and quantizes one (layer, group) at a time."""
  p = plan(params, src_cfg, dst_cfg, ratio=ratio, router_sigma=router_sigma, seed=seed)
  # every (layer position, group) is expanded from its own random stream, so the layers run in
  # parallel threads (numpy's draws and copies release the GIL) with the same result as in order
  jobs = p.jobs()
  with concurrent.futures.ThreadPoolExecutor(max(1, min(len(jobs), os.cpu_count() or 1))) as pool:
    done = dict(zip(jobs, pool.map(lambda jg: expand_layer(p, *jg), jobs)))
  for j, prefix, lead, keys in p.expert_keys():
    g_n = p.layers[j][3]
    res = {k: [done[j, g][0][k] for g in range(g_n)] for k in keys}
    sets = [done.pop((j, g))[1] for g in range(g_n)]
    for k, key in keys.items():
      # one group: a view, not a second copy of the layer's experts (23 GB at the 120B's width)
      p.out[key] = (np.stack(res[k]) if g_n > 1 else res[k][0][None]).reshape(lead + res[k][0].shape)
      res[k] = None
    p.report.choices[prefix]["redrawn"] = np.stack(sets)
  grown = common.finish(p.out, p.report, dst_cfg, p.cols, p.flat_src, p.used, p.was_full)
  return (grown, p.report) if return_report else grown


EXPAND_FLAGS = (
    registry.Flag("ratio", "float", 0.5, "Fraction of each target expert's channels re-drawn."),
    registry.Flag("router_sigma", "float", 0.05,
                  "Router noise std relative to std(source router)."),
    registry.Flag("seed", "integer", 1337, "Seed of every random draw."))

registry.register(registry.Transform(
    "expand_experts", expand_experts, needs="an MoE run of the source expert count",
    makes="the target stage's experts, cloned and partly re-drawn (SPEC §3.3)",
    flags=EXPAND_FLAGS))
