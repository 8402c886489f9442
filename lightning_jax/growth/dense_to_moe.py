"""Dense seed -> MoE (SPEC §3.1): `dense_to_moe(params, src_cfg, dst_cfg, strategy=, seed=)`.

Everything but the FFNs is copied. In every layer (and in the MTP block) the trained dense
SwiGLU (gate/up [d, F], down [F, d], our [in, out] layout) becomes
  * the shared expert, unchanged (moe.shared_width must equal the dense width F);
  * each routed expert e: the dense SwiGLU restricted to a random set of `moe.expert_width`
    intermediate channels (drawn without replacement within the expert, sorted; different experts'
    sets may overlap): gate/up COLUMNS [:, S_e], down ROWS [S_e, :]. (SPEC's "rows of gate/up,
    columns of down" is PyTorch's [out, in] wording for the same channels.)
  * strategy "drop" (Drop-Upcycling): then a random half of each expert's channels is re-drawn
    from N(mean, std) of the whole source matrix (gate, up and down each from their own
    statistics; the same channel positions in all three).
  * router w ~ N(0, 0.02); null-slot logit bias and null logit 0; a sigmoid router's selection
    bias 0 and use EMA at its uniform start 1/E; padding expert slots (expert parallelism) 0.
The MTP block's FFN is grown the same way into moe.mtp_n_experts experts.
All randomness comes from `seed` (per layer: seed, MoE node path, group index).

CLI: python -m growth.dense_to_moe --src RUN_OR_CKPT --dst NEW_RUN --strategy partition \
       --config=configs/stage_5b.py [--seed 0]   (see growth/cli.py)
"""
from __future__ import annotations

import numpy as np

from lightning_jax.growth import common, registry
from lightning_jax.growth.common import GrowthError, GrowthReport

ROUTER_STD = 0.02
DROP_FRACTION = 0.5
STRATEGIES = ("partition", "drop")


def _check_stages(flat_src, src_cfg, dst_cfg):
  t = "dense_to_moe"
  if src_cfg.moe.enabled or any("/moe/" in k for k in flat_src):
    raise GrowthError(f"dense_to_moe needs a dense source (moe.enabled=False, FFNs at .../ffn), but "
                      f"the source is an MoE model ({common.stage_name(src_cfg)}); use depth_map or "
                      f"expand_experts to grow an MoE checkpoint.")
  if not dst_cfg.moe.enabled:
    raise GrowthError(f"dense_to_moe needs an MoE target config (moe.enabled=True), but the "
                      f"target is dense ({common.stage_name(dst_cfg)}).")
  common.same_fields(src_cfg, dst_cfg, ("model.d_model", "model.n_layers", "model.pattern",
                                        "model.vocab_size", "model.mtp.enabled"), t)
  f_src, e = src_cfg.model.ffn_width, dst_cfg.moe
  if e.shared_width != f_src:
    raise GrowthError(f"dense_to_moe copies the dense FFN into the shared expert: moe.shared_width="
                      f"{e.shared_width} must equal the source's model.ffn_width={f_src}.")
  if not 1 <= e.expert_width <= f_src:
    raise GrowthError(f"dense_to_moe takes moe.expert_width={e.expert_width} of the {f_src} dense "
                      f"channels per expert; expected 1 <= expert_width <= {f_src}.")


def grow_ffn(gate, up, down, n_experts, n_padded, width, strategy, rng):
  """One dense SwiGLU -> (experts {gate [Ep, d, f], up, down [Ep, f, d]}, channels [E, f],
  dropped positions [E, n_drop] (within the expert) or None)."""
  gate, up, down = common.np32(gate), common.np32(up), common.np32(down)
  d, f_src = gate.shape
  out = {"gate": np.zeros((n_padded, d, width), np.float32),
         "up": np.zeros((n_padded, d, width), np.float32),
         "down": np.zeros((n_padded, width, d), np.float32)}
  stats = {k: (float(np.mean(w, dtype=np.float64)), float(np.std(w, ddof=1, dtype=np.float64)))
           for k, w in (("gate", gate), ("up", up), ("down", down))}
  n_drop = int(round(DROP_FRACTION * width)) if strategy == "drop" else 0
  chans = np.zeros((n_experts, width), np.int64)
  drops = np.zeros((n_experts, n_drop), np.int64)
  for e in range(n_experts):
    s = np.sort(rng.permutation(f_src)[:width])
    chans[e] = s
    out["gate"][e] = gate[:, s]
    out["up"][e] = up[:, s]
    out["down"][e] = down[s, :]
    if n_drop:
      p = np.sort(rng.permutation(width)[:n_drop])
      drops[e] = p
      for k in ("gate", "up"):
        mu, sd = stats[k]
        out[k][e][:, p] = rng.normal(mu, sd, (d, n_drop)).astype(np.float32)
      mu, sd = stats["down"]
      out["down"][e][p, :] = rng.normal(mu, sd, (n_drop, d)).astype(np.float32)
  return out, chans, (drops if n_drop else None)


def fresh_router(cfg, n_experts, lead, rng, prefix, out, report):
  """Router (and sigmoid-router stats) at their documented fresh init, stacked over `lead`."""
  d = cfg.model.d_model
  out[f"params/{prefix}/router/w"] = rng.normal(0.0, ROUTER_STD, lead + (d, n_experts)).astype(
      np.float32)
  report.provenance[f"params/{prefix}/router/w"] = f"fresh N(0, {ROUTER_STD})"
  if cfg.moe.router == "null_slot":
    for k, shp in (("logit_bias", (n_experts,)), ("null_logit", ())):
      out[f"params/{prefix}/router/{k}"] = np.zeros(lead + shp, np.float32)
      report.provenance[f"params/{prefix}/router/{k}"] = "fresh zeros"
  else:
    fresh_sigmoid_stats(n_experts, lead, prefix, out, report)


def fresh_sigmoid_stats(n_experts, lead, prefix, out, report):
  out[f"stats/{prefix}/bias"] = np.zeros(lead + (n_experts,), np.float32)
  report.provenance[f"stats/{prefix}/bias"] = "fresh zeros (selection bias starts at 0)"
  out[f"stats/{prefix}/use_ema"] = np.full(lead + (n_experts,), 1.0 / n_experts, np.float32)
  report.provenance[f"stats/{prefix}/use_ema"] = f"fresh 1/E (uniform use)"


def dense_to_moe(params, src_cfg, dst_cfg, *, strategy: str = "partition", seed: int = 0,
                 return_report: bool = False):
  """Grow a dense checkpoint tree into the MoE layout of dst_cfg (module docstring).

  params: a params tree, or {"params", "frozen", "stats"}; returns the same kind (numpy leaves),
  or (tree, GrowthReport) with return_report=True. The report's `choices` hold, per MoE node
  path ("groups/l0/moe" or "mtp/layer/moe"), the channel sets [G, E, f] (G = stacked groups, 1
  for the MTP block) and, for `drop`, the re-drawn positions within each expert [G, E, f/2].
  """
  if strategy not in STRATEGIES:
    raise GrowthError(f"dense_to_moe strategy={strategy!r}; expected one of {STRATEGIES}.")
  variables, was_full = common.as_variables(common.to_host(params))
  cols = tuple(c for c in common.COLLECTIONS if c in variables)
  flat_src = common.flatten({c: variables[c] for c in cols})
  _check_stages(flat_src, src_cfg, dst_cfg)
  common.check_source(flat_src, src_cfg, cols, "dense_to_moe")
  report = GrowthReport("dense_to_moe", {"strategy": strategy, "seed": int(seed)})
  _, want = common.abstract_flat(dst_cfg, cols)
  e = dst_cfg.moe
  out, used = {}, set()

  # MoE nodes: every layer's ffn (stacked over groups) and the MTP block's ffn
  nodes = [(f"groups/l{j}", e.n_experts, True) for j in range(len(dst_cfg.model.pattern))]
  if dst_cfg.model.mtp.enabled:
    nodes.append(("mtp/layer", e.mtp_n_experts, False))
  for base, n_exp, stacked in nodes:
    src = {k: common.np32(flat_src[f"params/{base}/ffn/{k}"]) for k in ("gate", "up", "down")}
    used.update(f"params/{base}/ffn/{k}" for k in src)
    prefix = f"{base}/moe"
    n_pad = want[f"params/{prefix}/experts/gate"].shape[-3]
    lead = src["gate"].shape[:-2]
    g_n = int(np.prod(lead)) if stacked else 1
    flat_in = {k: v.reshape((g_n,) + v.shape[-2:]) for k, v in src.items()}
    exps = {k: [] for k in ("gate", "up", "down")}
    chans, drops = [], []
    for g in range(g_n):
      rng = common.rng_for(seed, "dense_to_moe", prefix, g)
      ex, ch, dr = grow_ffn(flat_in["gate"][g], flat_in["up"][g], flat_in["down"][g], n_exp,
                            n_pad, e.expert_width, strategy, rng)
      for k in exps:
        exps[k].append(ex[k])
      chans.append(ch)
      drops.append(dr)
    for k in exps:
      out[f"params/{prefix}/experts/{k}"] = np.stack(exps[k]).reshape(lead + exps[k][0].shape)
      report.provenance[f"params/{prefix}/experts/{k}"] = (
          f"grown {strategy} channel subsets from params/{base}/ffn/{k}")
      out[f"params/{prefix}/shared/{k}"] = src[k]
      report.provenance[f"params/{prefix}/shared/{k}"] = f"copy params/{base}/ffn/{k}"
    report.choices[prefix] = {"channels": np.stack(chans)}
    if strategy == "drop":
      report.choices[prefix]["redrawn"] = np.stack(drops)
    fresh_router(dst_cfg, n_exp, lead, common.rng_for(seed, "dense_to_moe/router", prefix), prefix,
                 out, report)

  # everything else copies by name
  for k, v in flat_src.items():
    if k in used:
      continue
    if k in want and k not in out:
      out[k] = v
      report.provenance[k] = f"copy {k}"
      used.add(k)
  grown = common.finish(out, report, dst_cfg, cols, flat_src, used, was_full)
  return (grown, report) if return_report else grown


registry.register(registry.Transform(
    "dense_to_moe", dense_to_moe, needs="a dense run (moe.enabled=False)",
    makes="an MoE run of the target stage (SPEC §3.1)",
    flags=(registry.Flag("strategy", "enum", "partition", "Expert initialisation.",
                         choices=STRATEGIES),
           registry.Flag("seed", "integer", 0, "Seed of every random draw."))))
