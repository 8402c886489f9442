"""The growth driver: read a source checkpoint, apply a registered transform, evaluate both
models on the same held-out batch, write the grown run as NEW_RUN/checkpoints/0.

`grow(transform, src, dst, cfg, args)` is what `python -m growth.<transform>` (growth/cli.py)
and the lineage (growth.lineage) call; `open_target` is the shared start of every command that
writes a step-0 run from a source checkpoint (grow, lightning_jax.growth.next_phase).

Growth report (printed, and stored in meta): held-out loss (CE_next) of the source model and of
the grown model on the same held-out batch, and for MoE targets the router load statistics at
init (max/min expert load over the mean, null rate, per layer).
"""
from __future__ import annotations

import json
import pathlib
import time

import jax

from lightning_jax import checkpoint as ck
from lightning_jax import model, optim
from lightning_jax.config import validate
from lightning_jax.growth import dense_to_moe, depth_map, expand_experts, expand_to_tqp, to_tqp
from lightning_jax.growth import registry
from lightning_jax.growth.common import dense_expert_cfg
from lightning_jax.layers import moe
from lightning_jax.run import setup
from lightning_jax.run.checkpoints import jsonable, read_source, write_grown

# every transform module registers itself on import (lightning_jax/growth/registry.py)
TRANSFORM_MODULES = (dense_to_moe, depth_map, expand_experts, to_tqp, expand_to_tqp)
LOAD_KEYS = ("load_max_over_mean", "load_min_over_mean", "null_rate")


def evaluate(variables, cfg, ids) -> dict:
  """CE_next on ids, and router load statistics per MoE layer at these weights."""
  f = jax.jit(lambda v, x: model.loss_fn(v["params"], v["frozen"], v["stats"], {"ids": x}, cfg)[1])
  m = jax.device_get(f(variables, ids))
  out = {"loss": float(m["loss"])}
  if cfg.moe.enabled:
    loads = {}
    groups = m["step_stats"].get("groups", {})
    for lj in sorted(groups):
      st = groups[lj].get("moe")
      if st is None:
        continue
      s = moe.log_summary(st)
      loads[lj] = {k: round(float(v), 4) for k, v in s.items() if k in LOAD_KEYS}
    mtp = m["step_stats"].get("mtp", {}).get("layer", {}).get("moe")
    if mtp is not None:
      s = moe.log_summary(mtp)
      loads["mtp"] = {k: round(float(v), 4) for k, v in s.items() if k in LOAD_KEYS}
    out["router_load"] = loads
  return out


def open_target(src: str, dst: str, cfg, what: str, log=print):
  """Shared start of the commands that write a step-0 run from a source checkpoint: refuse a DST
  that already holds checkpoints, read the source, resolve the target config and its data (shards
  prepared in DST/data when data.path is empty). Returns (source, cfg, dst, data_dir, manifest)."""
  dst = pathlib.Path(dst)
  if (dst / "checkpoints").exists() and any(p.name.isdigit() for p in (dst / "checkpoints").iterdir()):
    raise ck.CheckpointError(f"--dst {dst} already holds checkpoints; expected a new run directory "
                             f"for {what}.")
  source = read_source(src, log)
  cfg = cfg.copy_and_resolve_references()
  optim.resolve_start_from(cfg)      # the user's target config: stored resolved with the run
  dst.mkdir(parents=True, exist_ok=True)
  data_dir, manifest = setup.resolve_data(cfg, dst, log)
  setup.apply_data_vocab(cfg, manifest, data_dir)
  validate(cfg)
  return source, cfg, dst, data_dir, manifest


def grow(transform: str, src: str, dst: str, cfg, args: dict, log=print) -> dict:
  """Read the source checkpoint, apply `transform`, evaluate both, write the grown run."""
  t0 = time.perf_counter()
  t = registry.get(transform)
  source, cfg, dst, data_dir, manifest = open_target(src, dst, cfg, "the grown model", log)
  src_cfg = source["cfg"]

  kwargs = {f.name: args[f.name] for f in t.flags}
  if t.takes_log:
    kwargs["log"] = log
  grown, rep = t.fn(source["variables"], src_cfg, cfg, return_report=True, **kwargs)
  if not t.keeps_tqp and cfg.tqp.enabled:
    cfg = dense_expert_cfg(cfg)
    log("note: the target config has tqp.enabled; the grown checkpoint holds the routed experts "
        "in dense form (tqp.enabled=False in its config): quantize it with python -m growth.to_tqp.")
  t_grow = time.perf_counter() - t0

  dom, ids = setup.heldout_batch(cfg, data_dir, manifest)
  ev_src = evaluate(source["variables"], src_cfg, ids)
  ev_dst = evaluate(grown, cfg, ids)
  report = {"transform": transform, "args": args, "heldout_domain": dom,
            "heldout_batch": list(ids.shape), "source_loss": ev_src["loss"],
            "grown_loss": ev_dst["loss"], "leaves": rep.summary()["leaves"],
            "fresh": rep.fresh(), "dropped": sorted(rep.dropped)}
  if "router_load" in ev_dst:
    report["router_load_at_init"] = ev_dst["router_load"]
  for k in t.report_choices:
    report[k] = rep.choices[k]
  meta = {"provenance": jsonable({"source_path": str(pathlib.Path(source["dir"]).absolute()),
                                   "source_step": source["step"],
                                   "source_stage": src_cfg.get("stage"),
                                   "transform": transform, "args": args,
                                   "seed": args.get("seed")}),
          "growth_report": jsonable(report), "loss": None, "tokens": 0}
  # the TQP targets are the 120B's size: written from the host (write_grown's on_cpu)
  write_grown(dst, cfg, grown, data_dir, manifest, meta, log, on_cpu=t.on_cpu)
  log("growth report:")
  log(f"  transform {transform} {json.dumps(jsonable(args))} from {source['dir']} "
      f"(stage {src_cfg.get('stage')!r}, step {source['step']}) to stage {cfg.stage!r}")
  log(f"  leaves: {report['leaves']}; fresh: {len(report['fresh'])}; dropped source leaves: "
      f"{len(report['dropped'])}")
  log(f"  held-out loss on the same batch ({dom}, {ids.shape[0]} x {ids.shape[1] - 2} tokens): "
      f"source {ev_src['loss']:.4f} -> grown {ev_dst['loss']:.4f}")
  for lj, s in report.get("router_load_at_init", {}).items():
    log(f"  router load at init {lj}: " + ", ".join(f"{k} {v}" for k, v in s.items()))
  log(f"  (growth {t_grow:.1f}s, total {time.perf_counter() - t0:.1f}s)")
  return {"report": report, "meta": meta, "dst": str(dst)}
