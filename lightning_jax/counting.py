"""Stored and active parameter counts by component, and training FLOPs per token (no allocation).

Shapes come from `model.abstract_variables` (jax.eval_shape over the parameter initialisers).
Components:
  kronecker_projection  params/embed/proj (8192 x d)
  mixer_deltanet        D-layer mixers (projections, convs, gates, A_log, dt_bias, D)
  mixer_gsa             G-layer mixers (attention projections, gates, lightning indexer)
  ffn                   dense SwiGLU FFNs
  shared_experts        moe/shared
  routed_experts        moe/experts: stored = n_layers x moe.n_experts x 3 x d x expert_width
                        (padding experts, if the expert dim is padded, are excluded by using
                        cfg.moe.n_experts; with TQP they are counted at their logical size although
                        they live quantized in `frozen`); active fraction = top_k / n_experts
                        (null slots compute nothing, so the null-slot router is an upper bound)
  tqp_adapters          moe/adapters (same active fraction as the routed experts)
  router                everything else under moe/ (router weights, logit bias, null logit)
  streams               mHC coefficient projections and their a/b scalars
  norms                 every RMSNorm scale (embedding, stream pre-norms, sublayer inputs,
                        DeltaNet output norm, final norm)
  head                  params/head/w (d x V)
The MTP block (params/mtp) is counted with the same components but reported separately and
left out of the totals, as the paper does.
"""
from __future__ import annotations

import collections
import math

from lightning_jax import model, nn, tqp
from lightning_jax.config import layer_kinds

COMPONENTS = ("kronecker_projection", "mixer_deltanet", "mixer_gsa", "ffn", "shared_experts",
              "routed_experts", "tqp_adapters", "router", "streams", "norms", "head")


def _component(parts: list[str], kind: str | None) -> str:
  if parts[-1] == "scale":
    return "norms"
  if parts[0] == "embed":
    return "kronecker_projection"
  if parts[0] == "head":
    return "head"
  if "mix_hc" in parts or "ffn_hc" in parts:
    return "streams"
  if "mixer" in parts:
    return "mixer_deltanet" if kind == "D" else "mixer_gsa"
  if "ffn" in parts:
    return "ffn"
  if "moe" in parts:
    i = parts.index("moe")
    sub = parts[i + 1] if i + 1 < len(parts) else ""
    return {"shared": "shared_experts", "experts": "routed_experts",
            "adapters": "tqp_adapters"}.get(sub, "router")
  if parts[0] == "mtp" and parts[1] == "in_proj":
    return "mtp_in_proj"
  return "other"


def _kind_of(parts: list[str], pattern: str) -> str | None:
  if parts[0] == "groups":
    return pattern[int(parts[1][1:])]
  if parts[0] == "mtp":
    return "G"
  return None


def count_params(cfg) -> dict:
  """{'stored': {comp: n}, 'active': {...}, 'mtp_stored': {...}, 'mtp_active': {...}, totals}."""
  abstract = model.abstract_variables(cfg)
  flat = nn.flatten(abstract["params"])
  pattern = cfg.model.pattern
  e = cfg.moe
  stored = collections.Counter()
  active = collections.Counter()
  mtp_s = collections.Counter()
  mtp_a = collections.Counter()
  routed_seen = {"backbone": False, "mtp": False}
  for path, leaf in flat.items():
    parts = path.split("/")
    kind = _kind_of(parts, pattern)
    comp = _component(parts, kind)
    n = math.prod(leaf.shape)
    a = n
    if comp in ("routed_experts", "tqp_adapters"):
      n_real = e.mtp_n_experts if parts[0] == "mtp" else e.n_experts
      e_dim = leaf.shape[1] if parts[0] == "groups" else leaf.shape[0]
      n = n * n_real // e_dim                   # drop padding experts, if any
      a = n * e.top_k / n_real
      if comp == "routed_experts":
        routed_seen["mtp" if parts[0] == "mtp" else "backbone"] = True
    if parts[0] == "mtp":
      mtp_s[comp] += n
      mtp_a[comp] += a
    else:
      stored[comp] += n
      active[comp] += a
  if e.enabled:
    # routed experts quantized into `frozen` (TQP): count them at their logical size
    per = 3 * cfg.model.d_model * e.expert_width
    if not routed_seen["backbone"]:
      stored["routed_experts"] += cfg.model.n_layers * e.n_experts * per
      active["routed_experts"] += cfg.model.n_layers * e.top_k * per
    if cfg.model.mtp.enabled and not routed_seen["mtp"]:
      mtp_s["routed_experts"] += e.mtp_n_experts * per
      mtp_a["routed_experts"] += e.top_k * per
  out = {"stored": dict(stored), "active": {k: int(round(v)) for k, v in active.items()},
         "mtp_stored": dict(mtp_s), "mtp_active": {k: int(round(v)) for k, v in mtp_a.items()}}
  out["total_stored"] = sum(out["stored"].values())
  out["total_active"] = sum(out["active"].values())
  # the paper's 120B figures (118.67B / 5.93B) count the quantized experts, not the adapters
  out["total_stored_no_adapters"] = out["total_stored"] - out["stored"].get("tqp_adapters", 0)
  out["total_active_no_adapters"] = out["total_active"] - out["active"].get("tqp_adapters", 0)
  out["mtp_total_stored"] = sum(out["mtp_stored"].values())
  out["mtp_total_active"] = sum(out["mtp_active"].values())
  return out


def _matmul_terms(cfg, include_mtp: bool = True) -> dict:
  """Per-token matmul FLOPs of one training step by term, each matmul of one forward and its
  backward counted once (module docstring of flops_per_token says which backward each has)."""
  m, e = cfg.model, cfg.moe
  out = collections.Counter()

  def active(path_parts, shape, n):
    comp = _component(path_parts, _kind_of(path_parts, m.pattern))
    if comp in ("routed_experts", "tqp_adapters"):
      return comp, n / shape[0] * e.top_k          # per token: top_k of the expert stack
    return comp, float(n)

  for path, leaf in nn.flatten(model.abstract_variables(cfg)["params"]).items():
    parts = path.split("/")
    if parts[0] == "mtp" and not include_mtp:
      continue
    shape = leaf.shape[1:] if parts[0] == "groups" else leaf.shape
    if len(shape) < 2:
      continue                                     # vectors: scales, biases, per-head scalars
    comp, n = active(parts, shape, math.prod(leaf.shape))
    if comp == "head":
      # the output head runs once for the next-token loss and once more for the MTP loss
      passes = 2 if (include_mtp and m.mtp.enabled) else 1
      out["head"] += 6 * n * passes
    elif comp == "kronecker_projection":
      out["embed"] += 4 * n                        # its input is the fixed codec: no input grad
    elif comp == "mixer_gsa" and parts[-1].startswith("idx_"):
      out["indexer_proj"] += 2 * n                 # stop_gradient: forward only, no gradient
    elif comp == "tqp_adapters":
      out["tqp_adapters"] += 6 * n
    elif comp == "routed_experts":
      out["routed_experts"] += 6 * n
    else:
      out["trainable"] += 6 * n
  if e.enabled and cfg.tqp.enabled:
    # the frozen quantized base (SPEC §4): forward only, its output is stop_gradient, so neither
    # an input gradient nor a weight gradient is computed through it; its input is rotated
    # (a Walsh-Hadamard transform, one small dense matmul per factor) once per dispatched row
    layers = m.n_layers + (1 if include_mtp and m.mtp.enabled else 0)
    for mat in tqp.MATRICES:
      d_out, d_in = tqp._dims(cfg, mat)
      n = tqp.pow2_dim(d_in)
      out["tqp_base"] += layers * e.top_k * 2 * d_out * d_in
      out["tqp_rotation"] += layers * e.top_k * 2 * n * sum(tqp._factors(n))
  return dict(out)


def flops_per_token(cfg, seq_len: int, include_mtp: bool = True) -> dict:
  """Model FLOPs per token of one training step (for MFU), by term.

  Each matmul of one forward and its backward is counted once; recomputation (remat, the
  reversible stack's rebuild) is not counted (compare with the compiled step's cost_analysis,
  which counts what runs: benchmarks/step.py and benchmarks/rank120.py print both):
  * trainable matmul weights: 6 x active parameters (2 forward, 2 input gradient, 2 weight
    gradient); routed experts and TQP adapters are active for top_k of the expert stack (the
    null-slot router's null slots compute nothing, so there this is an upper bound);
  * the output head: 6 x d x V per pass, two passes with MTP (next token and MTP);
  * the Kronecker projection: 4 x (its input is the fixed codec, no input gradient);
  * the lightning indexer's projections: 2 x (stop_gradient: forward only);
  * TQP frozen base experts: 2 x d_out x d_in per active expert and matrix (forward only: the
    base output is stop_gradient, SPEC §4), plus the input rotation of each dispatched row;
  * GSA attention: q.k and p.v over the kept keys, k_eff = mean_t min(k_base, t + 1):
    3 x 4 x n_heads x head_dim x k_eff;
  * lightning indexer scores, causal-halved, forward only: 2 x idx_heads x idx_dim x (T + 1) / 2;
  * chunked delta rule per head, chunk C, dims dk, dv (forward): intra-chunk Q K^T and K K^T
    (causal halves) C (2 dk), the triangular solves C (dk + dv), (M o Q K^T) U: C dv, and the
    three state matmuls 6 dk dv; x 3 for forward + backward.
  MTP block compute is included (it runs every step) unless include_mtp=False.
  """
  m = cfg.model
  t = int(seq_len)
  kinds = layer_kinds(cfg)
  n_g = kinds.count("G") + (1 if include_mtp and m.mtp.enabled else 0)
  n_d = kinds.count("D")
  g, dn = m.gsa, m.deltanet
  k_eff = sum(min(g.k_base, i + 1) for i in range(t)) / t
  attn = 3 * 4 * g.n_heads * g.head_dim * k_eff
  indexer = 2 * g.idx_heads * g.idx_dim * (t + 1) / 2
  c, dk, dv = dn.chunk_size, dn.head_dim, dn.head_dim
  delta = 3 * dn.n_heads * (c * (2 * dk) + c * (dk + dv) + c * dv + 6 * dk * dv)
  out = dict(_matmul_terms(cfg, include_mtp))
  out["matmul"] = sum(out.values())
  out.update({"attention": n_g * attn, "indexer": n_g * indexer, "delta_rule": n_d * delta})
  out["total"] = out["matmul"] + out["attention"] + out["indexer"] + out["delta_rule"]
  return out


def format_report(cfg, counts: dict | None = None, seq_len: int | None = None) -> str:
  counts = counts or count_params(cfg)
  seq_len = seq_len or cfg.train.seq_len
  lines = [f"stage {cfg.stage}: d_model {cfg.model.d_model}, {cfg.model.n_layers} layers "
           f"({''.join(layer_kinds(cfg))}), vocab {cfg.model.vocab_size}, "
           f"{'MoE ' + str(cfg.moe.n_experts) + ' experts top-' + str(cfg.moe.top_k) if cfg.moe.enabled else 'dense FFN ' + str(cfg.model.ffn_width)}",
           f"{'component':<22}{'stored':>16}{'active':>16}"]
  for comp in COMPONENTS:
    s, a = counts["stored"].get(comp, 0), counts["active"].get(comp, 0)
    if s or a:
      lines.append(f"{comp:<22}{s:>16,}{a:>16,}  ({s / 1e6:,.2f}M / {a / 1e6:,.2f}M)")
  lines.append(f"{'TOTAL (no MTP)':<22}{counts['total_stored']:>16,}{counts['total_active']:>16,}"
               f"  ({counts['total_stored'] / 1e9:.3f}B / {counts['total_active'] / 1e9:.3f}B)")
  if counts["stored"].get("tqp_adapters"):
    lines.append(f"{'TOTAL w/o adapters':<22}{counts['total_stored_no_adapters']:>16,}"
                 f"{counts['total_active_no_adapters']:>16,}"
                 f"  ({counts['total_stored_no_adapters'] / 1e9:.3f}B / "
                 f"{counts['total_active_no_adapters'] / 1e9:.3f}B)")
  if counts["mtp_stored"]:
    lines.append("MTP block (excluded from the totals):")
    for comp in ("mtp_in_proj",) + COMPONENTS:
      s, a = counts["mtp_stored"].get(comp, 0), counts["mtp_active"].get(comp, 0)
      if s or a:
        lines.append(f"  {comp:<20}{s:>16,}{a:>16,}")
    lines.append(f"  {'MTP total':<20}{counts['mtp_total_stored']:>16,}"
                 f"{counts['mtp_total_active']:>16,}")
    lines.append(f"{'TOTAL with MTP':<22}"
                 f"{counts['total_stored'] + counts['mtp_total_stored']:>16,}"
                 f"{counts['total_active'] + counts['mtp_total_active']:>16,}")
  f = flops_per_token(cfg, seq_len)
  lines.append(f"training FLOPs/token at T={seq_len}: {f['total'] / 1e9:.2f} GFLOP "
               f"(matmul {f['matmul'] / 1e9:.2f}, attention {f['attention'] / 1e9:.3f}, "
               f"indexer {f['indexer'] / 1e9:.3f}, delta rule {f['delta_rule'] / 1e9:.3f})")
  return "\n".join(lines)
