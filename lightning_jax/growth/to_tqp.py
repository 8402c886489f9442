"""Quantize a grown MoE checkpoint to TQP (SPEC §4): `to_tqp(variables, src_cfg, dst_cfg)`.

The last step of the lineage before the 120B trains: every routed-expert stack (`moe.experts`,
backbone and MTP block) becomes a frozen TurboQuant base (`frozen/.../moe/experts`: codes, row
norms, rotation signs) plus freshly initialised rank-r adapters (`params/.../moe/adapters`),
through `lightning_jax.tqp.convert_moe_to_tqp` (signs from tqp.seed). Everything else, the
routers and the shared experts included, is copied. Source and target configs must agree on
everything but `tqp` (the source is the expand_experts output: the same stage with TQP off).

The output is checked against the target model's abstract tree like every growth transform: it
needs a model whose `abstract_variables` builds the TQP layout when tqp.enabled.

CLI: python -m growth.to_tqp --src RUN --dst NEW_RUN --config=configs/stage_120b.py
"""
from __future__ import annotations


import jax
import numpy as np

from lightning_jax import model, nn, tqp
from lightning_jax.growth import common, registry
from lightning_jax.growth.common import GrowthError, GrowthReport


def _target_abstract(dst_cfg, cols):
  ab = model.abstract_variables(dst_cfg)
  flat = common.flatten({c: ab[c] for c in cols})
  if not any("/moe/adapters/" in k for k in flat):
    raise GrowthError("to_tqp: model.abstract_variables(config with tqp.enabled=True) has no "
                      "moe/adapters leaves, so lightning_jax/model.py does not build the TQP layout "
                      "yet and no launch.train run could start from a TQP checkpoint.")
  return ab, flat


def check_configs(src_cfg, dst_cfg):
  """to_tqp only quantizes: TQP on in the target, off in the (MoE) source, the rest equal."""
  if not dst_cfg.tqp.enabled:
    raise GrowthError("to_tqp needs a target config with tqp.enabled=True.")
  if src_cfg.tqp.enabled:
    raise GrowthError(f"to_tqp needs a source with dense routed experts (tqp.enabled=False), but "
                      f"the source ({common.stage_name(src_cfg)}) is already quantized.")
  if not src_cfg.moe.enabled:
    raise GrowthError(f"to_tqp needs an MoE source; the source is {common.stage_name(src_cfg)}.")
  a = common.dense_expert_cfg(dst_cfg).to_dict()
  b = src_cfg.to_dict()
  for sec in ("model", "moe", "mesh"):
    if a.get(sec) != b.get(sec):
      diff = sorted(k for k in set(a[sec]) | set(b[sec]) if a[sec].get(k) != b[sec].get(k))
      raise GrowthError(f"to_tqp only quantizes: source and target configs differ in "
                        f"{sec}.{diff[0]} ({b[sec].get(diff[0])!r} vs {a[sec].get(diff[0])!r}).")


def assemble(out: dict, flat_src: dict, dst_cfg, *, return_report: bool = True):
  """Flat TQP output {path: array} -> (target tree, GrowthReport): provenance per leaf, and the
  guards (exactly the target TQP model's leaves, shapes and dtypes; every source leaf used).
  flat_src: the dense source's flat tree (leaves are only looked up by name)."""
  report = GrowthReport("to_tqp", {"bits": int(dst_cfg.tqp.bits), "rank": int(dst_cfg.tqp.rank),
                                   "tqp_seed": int(dst_cfg.tqp.seed)})
  used = set()
  for k in out:
    if k in flat_src:
      report.provenance[k] = f"copy {k}"
      used.add(k)
    elif "/moe/adapters/" in k:
      report.provenance[k] = "fresh TQP adapter init (A ~ N(0, 1e-4), B ~ N(0, 1/sqrt(r)))"
    elif k.startswith("frozen/") and "/moe/experts/" in k:
      src = "params/" + k[len("frozen/"):].rsplit("/", 1)[0]
      report.provenance[k] = f"grown TurboQuant {dst_cfg.tqp.bits}-bit from {src}"
      used.add(src)
  ab, want = _target_abstract(dst_cfg, common.COLLECTIONS)
  # finish() compares against the TQP-off abstract; compare against the TQP layout here
  missing, extra = set(want) - set(out), set(out) - set(want)
  if missing or extra:
    raise GrowthError(f"to_tqp: the converted tree differs from the target model's: missing "
                      f"{common._names(missing) or 'none'}; unexpected {common._names(extra) or 'none'}.")
  bad = [k for k in want if tuple(out[k].shape) != tuple(want[k].shape)
         or out[k].dtype != np.dtype(want[k].dtype)]
  if bad:
    raise GrowthError(f"to_tqp: leaves do not match the target config's shapes/dtypes: "
                      f"{common._names(bad, 4)}.")
  unused = set(flat_src) - used
  if unused:
    raise GrowthError(f"to_tqp: source leaves were not carried over: {common._names(unused)}.")
  tree = jax.tree_util.tree_map_with_path(lambda p, _: out[nn.path_str(p)], ab)
  return tree, report


def to_tqp(variables, src_cfg, dst_cfg, *, return_report: bool = False):
  t = "to_tqp"
  check_configs(src_cfg, dst_cfg)
  v, was_full = common.as_variables(common.to_host(variables))
  if not was_full:
    raise GrowthError("to_tqp needs the full variables {'params', 'frozen', 'stats'}: the "
                      "quantized bases live in 'frozen'.")
  flat_src = common.flatten(v)
  common.check_source(flat_src, src_cfg, common.COLLECTIONS, t)
  params, qfrozen = tqp.convert_moe_to_tqp(v["params"], dst_cfg)
  frozen = tqp.merge_frozen(v["frozen"], qfrozen)
  out_tree = {"params": params, "frozen": frozen, "stats": v["stats"]}
  out = {k: np.asarray(x) for k, x in common.flatten(out_tree).items()}
  tree, report = assemble(out, flat_src, dst_cfg)
  return (tree, report) if return_report else tree


registry.register(registry.Transform(
    "to_tqp", to_tqp, needs="an MoE run with dense routed experts (tqp.enabled=False)",
    makes="the same model with TQP-quantized experts and fresh adapters (SPEC §4)",
    keeps_tqp=True, on_cpu=True))
