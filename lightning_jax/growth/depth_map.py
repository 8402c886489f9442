"""Depth growth (SPEC §3.2): `depth_map(params, src_cfg, dst_cfg, mapping="5b_to_9b" | [ints])`.

Target layer t copies source layer mapping[t], all of it: mixer, hyper-connection coefficients,
FFN or MoE, the layer's running statistics (GSA score EMA, sigmoid-router bias/use) and its
frozen buffers (TQP bases) if any. Layers are stored stacked per pattern position, so layer n
lives at groups/l{n % P}[n // P] (P = len(model.pattern)). Everything outside the layers
(embedding, final norm, head, MTP block) copies unchanged.

Refused, with one sentence:
  * a mapping entry copying a layer of another kind (a D layer into a G position or back),
  * a mapping whose last entry is not the source's last layer: the output head (through the
    final norm) reads the last layer, and must keep reading the layer it was trained with,
  * a mapping of the wrong length, or entries outside the source's layers.
`5b_to_9b` = [0..7, 0..3, 0..7] (8 -> 20 layers).
"""
from __future__ import annotations

import numpy as np

from lightning_jax.config import layer_kinds
from lightning_jax.growth import common, registry
from lightning_jax.growth.common import GrowthError, GrowthReport

MAPPINGS = {
    "5b_to_9b": [0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 6, 7],
}


def parse_mapping(mapping) -> tuple[str, list[int]]:
  """A name from MAPPINGS, a list of ints, or "0,1,2,..." -> (label, list)."""
  if isinstance(mapping, str):
    if mapping in MAPPINGS:
      return mapping, list(MAPPINGS[mapping])
    try:
      return "explicit", [int(x) for x in mapping.replace(" ", "").split(",") if x]
    except ValueError:
      raise GrowthError(f"depth_map mapping={mapping!r} is neither a known name "
                        f"({sorted(MAPPINGS)}) nor a comma-separated list of source layers.") from None
  try:
    return "explicit", [int(x) for x in mapping]
  except (TypeError, ValueError):
    raise GrowthError(f"depth_map mapping={mapping!r}; expected a name ({sorted(MAPPINGS)}) or a "
                      f"list of source layer indices.") from None


def check_mapping(mp: list[int], src_cfg, dst_cfg):
  n_src, n_dst = src_cfg.model.n_layers, dst_cfg.model.n_layers
  if len(mp) != n_dst:
    raise GrowthError(f"depth_map mapping has {len(mp)} entries but the target config has "
                      f"model.n_layers={n_dst}; expected one source layer per target layer.")
  bad = [(t, s) for t, s in enumerate(mp) if not 0 <= s < n_src]
  if bad:
    raise GrowthError(f"depth_map mapping[{bad[0][0]}]={bad[0][1]} is not a source layer; the "
                      f"source has model.n_layers={n_src} (0..{n_src - 1}).")
  ks, kd = layer_kinds(src_cfg), layer_kinds(dst_cfg)
  for t, s in enumerate(mp):
    if ks[s] != kd[t]:
      raise GrowthError(f"depth_map mapping[{t}]={s} copies a {ks[s]} layer into target layer {t}, "
                        f"which is a {kd[t]} layer (pattern {dst_cfg.model.pattern!r}); expected "
                        f"layers of the same kind.")
  if mp[-1] != n_src - 1:
    raise GrowthError(f"depth_map mapping ends with source layer {mp[-1]}, but the output head was "
                      f"trained reading source layer {n_src - 1}: the last trained layer must stay "
                      f"last (mapping[-1] == {n_src - 1}).")


def depth_map(params, src_cfg, dst_cfg, *, mapping="5b_to_9b", return_report: bool = False):
  """Grow depth by copying source layers (module docstring). Returns the same kind of tree as
  given (numpy leaves), or (tree, GrowthReport) with return_report=True."""
  label, mp = parse_mapping(mapping)
  variables, was_full = common.as_variables(common.to_host(params))
  cols = tuple(c for c in common.COLLECTIONS if c in variables)
  flat_src = common.flatten({c: variables[c] for c in cols})
  t = "depth_map"
  if src_cfg.moe.enabled != dst_cfg.moe.enabled:
    raise GrowthError(f"depth_map keeps the layer type, but the source is "
                      f"{common.stage_name(src_cfg)} and the target {common.stage_name(dst_cfg)}; "
                      f"use dense_to_moe first.")
  keep = ["model.d_model", "model.pattern", "model.vocab_size", "model.ffn_width",
          "model.mtp.enabled", "moe.enabled"]
  if src_cfg.moe.enabled:
    keep += ["moe.router", "moe.n_experts", "moe.expert_width", "moe.shared_width",
             "moe.mtp_n_experts", "mesh.expert"]
  common.same_fields(src_cfg, dst_cfg, keep, t)
  check_mapping(mp, src_cfg, dst_cfg)
  common.check_source(flat_src, src_cfg, cols, t)
  report = GrowthReport(t, {"mapping": label if label != "explicit" else mp})
  report.choices["mapping"] = list(mp)
  _, want = common.abstract_flat(dst_cfg, cols)
  out, used = {}, set()
  P = len(dst_cfg.model.pattern)
  by_pos: dict = {}
  for k in flat_src:
    parts = k.split("/")
    if len(parts) > 3 and parts[1] == "groups":
      by_pos.setdefault(parts[2], []).append((parts[0], "/".join(parts[3:]), k))
  for j in range(P):
    lj = f"l{j}"
    n_dst_groups = dst_cfg.model.n_layers // P
    for col, sub, _ in by_pos.get(lj, []):
      dst_key = f"{col}/groups/{lj}/{sub}"
      slices, srcs = [], []
      for g in range(n_dst_groups):
        s = mp[g * P + j]
        sj, sg = common.layer_index(src_cfg, s)
        src_key = f"{col}/groups/{sj}/{sub}"
        if src_key not in flat_src:
          raise GrowthError(f"depth_map: source layer {s} has no leaf {src_key} for target "
                            f"{dst_key}; expected layers of the same kind to have the same leaves.")
        slices.append(np.asarray(flat_src[src_key])[sg])
        srcs.append(f"{src_key}[{sg}]")
        used.add(src_key)
      out[dst_key] = np.stack(slices)
      report.provenance[dst_key] = "copy " + ", ".join(srcs)
  for k, v in flat_src.items():
    if k.split("/")[1:2] == ["groups"]:
      continue
    if k in want:
      out[k] = v
      report.provenance[k] = f"copy {k}"
      used.add(k)
  report.choices["unused_source_layers"] = sorted(set(range(src_cfg.model.n_layers)) - set(mp))
  grown = common.finish(out, report, dst_cfg, cols, flat_src, used, was_full)
  return (grown, report) if return_report else grown


registry.register(registry.Transform(
    "depth_map", depth_map, needs="a run of the source depth",
    makes="a deeper run of the target stage, layers copied by the mapping (SPEC §3.2)",
    flags=(registry.Flag("mapping", "string", "5b_to_9b",
                         "Named mapping or comma-separated source layers."),),
    report_choices=("mapping",)))
