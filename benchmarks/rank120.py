"""One expert-parallel rank's share of an MoE stage, at full depth, on one device.

    python -m benchmarks.rank120 [--config configs/stage_120b.py] [--batch 1] [--seq 8192]
        [--steps 3] [--ranks 8] [--layers N] [--plan_batches 2,4] [--no_profile]
        [--set section.field=value ...] [--json benchmarks/results/rank120.json]
    python -m benchmarks.rank120 --tiny          # configs/tiny_120b.py at T=64, on CPU (CI)

What one rank of an expert-parallel node computes: the stage's layers at full depth, the routed
experts cut to one rank's share (ceil(n_experts / ranks): 58 of the 120B's 464 slots), top-k
unchanged, and one micro-batch of `--batch` sequences. A rank of the real node sees its own
tokens plus the rows that the other ranks route to its experts; on average that is the same
number of expert rows as one micro-batch routed top-k over the rank's own experts (8,192 x 12 =
98,304 at B1 x T8192), which is what runs here. Differences from a rank of the sharded step:
no all-to-all, no reduce-scatter or all-gather. The optimizer is ZeRO-1 as in the node step
(benchmarks.step.zero1_emulation; --no_zero1 keeps the whole state): each replicated parameter's
moments are held for the rank's 1/ranks slice and updated there, the routed experts' moments
(already the rank's own) whole. The report gives the optimizer bytes held, the whole state's, and
one device's share in the sharded node step computed from that step's own shardings on an
abstract mesh (nothing allocated). The two agree up to what the rank-cut model itself changes:
its router has the rank's expert columns only, and the MTP block's experts (20, fewer per rank
than top-k) stay whole (0.5 MB of 5.36 GB at 120B).

Reported (and written to --json): step time (median over --steps after two warm-up steps),
tokens/s, MFU on counting.flops_per_token (the corrected model count) and XLA's own count of the
compiled step (cost_analysis: what runs, recomputation included); the device peak
(memory_stats peak_bytes_in_use) after building the state and after the steps, XLA's compiled
memory analysis of the step (arguments, outputs, aliased, temporaries) and the difference from
the measured peak; the compiled plan at --plan_batches (compile only) and from those the largest
micro-batch that fits 80 GB and 141 GB; and a per-op profile of one step (jax.profiler trace ->
benchmarks/profile_table, the top 25 ops).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import glob
import json
import math
import os
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
from jax.sharding import AbstractMesh

from benchmarks import profile_table
from benchmarks.step import (apply_overrides, bench_config, compile_for, compile_then_build,
                             step_parts)
from lightning_jax import counting, gpu_target, memory_plan, metrics as metrics_lib, sharding
from lightning_jax import model, optim
from lightning_jax.config import ConfigError, load_config
from lightning_jax.ops import pallas
from lightning_jax.run.state import build_abstract as build

GB = 1e9
TARGETS = {"80gb": 80e9, "141gb": 141e9}


def rank_config(cfg, ranks: int):
  """cfg cut to one expert-parallel rank of `ranks`: its share of the routed experts, one device."""
  if not cfg.moe.enabled:
    raise ConfigError(f"stage {cfg.stage!r} has no routed experts (moe.enabled=False); "
                      "benchmarks.rank120 runs one expert-parallel rank of an MoE stage.")
  if ranks < 1:
    raise ConfigError(f"--ranks={ranks} must be at least 1 (the expert-parallel width).")
  share = -(-int(cfg.moe.n_experts) // ranks)
  if share < cfg.moe.top_k:
    raise ConfigError(f"one rank of {ranks} holds {share} experts, fewer than moe.top_k="
                      f"{cfg.moe.top_k}; expected --ranks <= {cfg.moe.n_experts // cfg.moe.top_k}.")
  cfg.moe.n_experts = share
  cfg.mesh.expert = 1
  cfg.mesh.data = 1
  cfg.mesh.tensor = 1
  return cfg


def _stats(dev) -> dict:
  try:
    st = dev.memory_stats() or {}
  except Exception:  # noqa: BLE001 (backends without stats)
    st = {}
  return {k: float(st[k]) for k in ("bytes_in_use", "peak_bytes_in_use", "bytes_limit") if k in st}


def _xla_flops(compiled) -> float:
  ca = compiled.cost_analysis()
  if isinstance(ca, (list, tuple)):
    ca = ca[0] if ca else {}
  return float((ca or {}).get("flops", float("nan")))


def _opt_bytes(state) -> float:
  return float(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state["opt_state"])))


def plan_step(cfg, batch: int, seq: int, devices=None, zero1_ranks: int = 1):
  """(step_parts, abstract batch, mesh) of the rank's step at `batch` on `devices` (default
  this host's first device). zero1_ranks: the optimizer state the run batch's step holds (its
  ZeRO-1 share, as benchmarks.step.step_parts builds it), so that plans at several batches
  differ only by the batch, not by 21 GB of optimizer moments at 120B."""
  c = bench_config(cfg.copy_and_resolve_references(), seq=seq, batch=batch, n_dev=1)
  mesh = sharding.make_mesh(c.mesh, devices=(devices or jax.devices())[:1])
  batch_abs = {"ids": jax.ShapeDtypeStruct((batch, seq + 2), jnp.int32)}
  return step_parts(c, mesh, zero1_ranks), batch_abs, mesh


def compile_plan(cfg, batch: int, seq: int, devices=None, zero1_ranks: int = 1) -> dict:
  """The compiled memory analysis of `plan_step`'s step (nothing allocated); devices: where to
  compile (default this host's first device; gpu_target's compile-only devices)."""
  # on compile-only devices (gpu_target) the step takes the card's code paths, not this host's
  target = pallas.target_gpu() if devices is not None else contextlib.nullcontext()
  with target:
    parts, batch_abs, mesh = plan_step(cfg, batch, seq, devices, zero1_ranks)
    t0 = time.perf_counter()
    with sharding.use_mesh(mesh):
      compiled = parts["step"].lower(parts["state_abs"], batch_abs).compile()
  return {"batch": batch, **memory_plan.plan_bytes(compiled),
          "compile_s": time.perf_counter() - t0}


def whole_optimizer_bytes(cfg) -> float:
  """The rank's optimizer state without ZeRO-1 (abstract)."""
  params = model.abstract_variables(cfg)["params"]
  tx, _ = optim.make_optimizer(cfg, params, 1000)
  return _opt_bytes({"opt_state": jax.eval_shape(tx.init, params)})


def zero1_optimizer_bytes(a, ranks: int) -> float:
  """One device's optimizer-state bytes in the sharded node step (data 1 x expert `ranks`):
  the uncut config's state shardings (ZeRO-1 included) on an abstract mesh; nothing allocated."""
  cfg = load_config(a.config)
  apply_overrides(cfg, a.set)
  if a.layers:
    cfg.model.n_layers = a.layers
  cfg.mesh.data, cfg.mesh.expert, cfg.mesh.tensor = 1, ranks, 1
  c = bench_config(cfg, seq=a.seq, batch=a.batch, n_dev=ranks)
  mesh = AbstractMesh((1, ranks, 1), sharding.MESH_AXES)
  b = build(c, mesh)
  return float(sum(math.prod(s.shard_shape(x.shape)) * x.dtype.itemsize for x, s in
                   zip(jax.tree.leaves(b["state_abs"]["opt_state"]),
                       jax.tree.leaves(b["state_shard"]["opt_state"]))))


def largest_fitting(plans: list[dict], calib: float, cap: float) -> dict:
  """Largest batch whose calibrated plan (plan total x measured/planned at the run batch) fits;
  beyond the largest planned batch, extrapolated linearly from the two largest plans."""
  pts = sorted((p["batch"], p["total"] * calib) for p in plans)
  fit = [b for b, v in pts if v <= cap]
  best = max(fit) if fit else 0
  how = "planned"
  if len(pts) == 1 and fit:
    how = (f"at least: B{best} is the only batch planned and it fits; pass --plan_batches "
           "for a larger one")
  if len(pts) >= 2 and best == pts[-1][0]:
    (b0, v0), (b1, v1) = pts[-2], pts[-1]
    slope = (v1 - v0) / (b1 - b0)
    if slope > 0:
      best = int(b1 + (cap - v1) // slope)
      how = f"extrapolated from the plans at B{b0} and B{b1}"
  return {"batch": best, "how": how}


def run(cfg, a, command: str) -> dict:
  dev = jax.devices()[0]
  ranks = a.ranks or int(cfg.mesh.expert)
  cfg = rank_config(cfg, ranks)
  cfg = bench_config(cfg, layers=a.layers, seq=a.seq, batch=a.batch, n_dev=1)
  mesh = sharding.make_mesh(cfg.mesh, devices=jax.devices()[:1])  # one rank, one device
  b, t = cfg.train.global_batch, cfg.train.seq_len
  print(f"one rank: {cfg.model.n_layers} layers, {cfg.moe.n_experts} experts top-"
        f"{cfg.moe.top_k}, B{b} x T{t} = {b * t * cfg.moe.top_k:,} expert rows per MoE layer, "
        f"reversible {cfg.reversible.enabled} ({cfg.reversible.mode}), device {dev.device_kind}",
        flush=True)
  mem0 = _stats(dev)
  key = jax.random.PRNGKey(a.seed)
  t0 = time.perf_counter()
  # compiled before the state is built, as launch.train does (benchmarks.step.compile_then_build)
  compiled, state, batch_shard, compile_s = compile_then_build(
      cfg, mesh, key, zero1_ranks=1 if a.no_zero1 else ranks)
  build_s = time.perf_counter() - t0 - compile_s
  mem_built = _stats(dev)
  ids = jax.random.randint(jax.random.fold_in(key, 7), (b, t + 2), 0, cfg.model.vocab_size,
                           jnp.int32)
  ids = jax.device_put(ids, batch_shard)
  with sharding.use_mesh(mesh):
    print(f"step compiled in {compile_s:.1f} s, state built in {build_s:.1f} s", flush=True)
    plan = memory_plan.plan_bytes(compiled)
    holder = {"state": state}
    del state

    def one():
      holder["state"], m = compiled(holder["state"], {"ids": ids})
      return m
    first = None         # the loss before any update: comparable across modes and kernels
    for _ in range(2):
      m = jax.block_until_ready(one())
      first = float(m["loss"]) if first is None else first
    ts = []
    for _ in range(a.steps):
      t1 = time.perf_counter()
      m = jax.block_until_ready(one())
      ts.append(time.perf_counter() - t1)
    mem_steps = _stats(dev)
    prof_rows, prof_info = [], {}
    src_rows = {}
    if not a.no_profile:
      trace = a.keep_trace or os.path.join(tempfile.mkdtemp(prefix="rank120_"), "t.json.gz")
      prof_rows, prof_info = profile_table.profile_ops(one, 1, keep_trace=trace)
      hlo = sorted(glob.glob(os.path.join(a.hlo_dump, "*step_fn*after_optimizations.txt"))) \
          if a.hlo_dump else []
      if hlo:
        src_rows = profile_table.attribution(trace, hlo[-1])
  m = jax.device_get(m)
  step_s = sorted(ts)[len(ts) // 2]
  tokens = b * t
  fpt = counting.flops_per_token(cfg, t)
  xla_fpt = _xla_flops(compiled) / tokens
  peak_flops, peak_note = metrics_lib.peak_flops([dev], cfg.model.dtype)
  tps = tokens / step_s
  mfu = tps * fpt["total"] / peak_flops if peak_flops == peak_flops and peak_flops else float("nan")
  if "peak_bytes_in_use" in mem_steps:
    measured, how = mem_steps["peak_bytes_in_use"], "device.memory_stats peak_bytes_in_use"
  else:                                  # CPU: no allocator statistics, the plan stands in
    measured, how = plan["total"], "no device statistics: the compiled plan"
  opt_b = _opt_bytes(holder["state"])
  opt_z = zero1_optimizer_bytes(a, ranks)
  opt_w = whole_optimizer_bytes(cfg)
  rec = {
      "device": dev.device_kind, "date": f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
      "commit": a.commit or metrics_lib.git_commit(), "command": command, "stage": cfg.stage,
      "layers": cfg.model.n_layers, "experts_per_rank": cfg.moe.n_experts, "top_k": cfg.moe.top_k,
      "batch": b, "seq": t, "reversible_mode": cfg.reversible.mode if cfg.reversible.enabled else "off",
      "mem_fraction": os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", "default (0.75 on GPU)"),
      "step_ms": step_s * 1e3, "step_ms_all": [x * 1e3 for x in ts], "compile_s": compile_s,
      "build_s": build_s, "loss": float(m["loss"]), "loss_first_step": first,
      "finite": bool(m["finite"]),
      "tokens_per_s": tps, "flops_per_token": fpt["total"], "flops_terms": fpt,
      "xla_flops_per_token": xla_fpt, "mfu": mfu, "peak_note": peak_note,
      "peak_gb": measured / GB, "peak_how": how,
      "peak_after_build_gb": mem_built.get("peak_bytes_in_use", float("nan")) / GB,
      "in_use_after_build_gb": mem_built.get("bytes_in_use", float("nan")) / GB,
      "peak_after_steps_gb": mem_steps.get("peak_bytes_in_use", float("nan")) / GB,
      "bytes_limit_gb": mem0.get("bytes_limit", float("nan")) / GB,
      "compiled_plan_gb": plan["total"] / GB, "compiled_plan": {k: v / GB for k, v in plan.items()},
      "peak_minus_plan_gb": measured / GB - plan["total"] / GB,
      "zero1_emulated": not a.no_zero1, "optimizer_state_gb": opt_b / GB,
      "optimizer_state_whole_gb": opt_w / GB, "optimizer_state_zero1_gb": opt_z / GB,
      "peak_with_zero1_gb": (measured - opt_b + opt_z) / GB,
      "profile": prof_rows, "profile_info": prof_info, "profile_by_source": src_rows,
  }
  plans = [{"batch": b, **plan}]
  for pb in a.plan_batches:
    if pb != b:
      p = compile_plan(load_and_cut(a), pb, t, zero1_ranks=1 if a.no_zero1 else ranks)
      print(f"plan at B{pb}: {p['total'] / GB:.2f} GB (compiled in {p['compile_s']:.0f} s)",
            flush=True)
      plans.append(p)
  calib = measured / plan["total"] if measured == measured and plan["total"] else 1.0
  rec["plans_gb"] = [{"batch": p["batch"], "total": p["total"] / GB,
                      "arguments": p["arguments"] / GB, "temporaries": p["temporaries"] / GB}
                     for p in plans]
  rec["plan_calibration"] = calib
  for name, cap in TARGETS.items():
    fit = largest_fitting(plans, calib, cap)
    rec[f"largest_micro_batch_{name}"] = fit["batch"]
    rec[f"largest_micro_batch_{name}_how"] = fit["how"]
  return rec


def compile_only(cfg, a, command: str) -> dict:
  """The rank's step compiled for a card that is not here (--compile_for; gpu_target): the
  GPU compiler's memory plan (with the ZeRO-1 share as in `run`), its FLOP count and, with
  --hlo_out, its optimized HLO. Nothing runs, so no time, peak or profile."""
  card = gpu_target.card_of(a.compile_for)
  ranks = a.ranks or int(cfg.mesh.expert)
  cfg = rank_config(cfg, ranks)
  cfg = bench_config(cfg, layers=a.layers, seq=a.seq, batch=a.batch, n_dev=1)
  out = compile_for(cfg, card, zero1_ranks=1 if a.no_zero1 else ranks, hlo_out=a.hlo_out)
  plan = out["plan"]
  b, t = cfg.train.global_batch, cfg.train.seq_len
  fpt = counting.flops_per_token(cfg, t)
  plans = [{"batch": b, **plan}]
  for pb in a.plan_batches:
    if pb != b:
      plans.append(compile_plan(cfg, pb, t, out["devices"],
                                zero1_ranks=1 if a.no_zero1 else ranks))
  plans.sort(key=lambda p: p["batch"])
  fits = {k: largest_fitting(plans, 1.0, cap) for k, cap in TARGETS.items()}
  plans = [{"batch": p["batch"], "total": p["total"] / GB, "arguments": p["arguments"] / GB,
            "temporaries": p["temporaries"] / GB} for p in plans]
  return {
      "device": f"{gpu_target.CARDS[card]['description']} (compile only, no device)",
      "date": datetime.date.today().isoformat(), "commit": a.commit or metrics_lib.git_commit(),
      "command": command, "stage": cfg.stage, "layers": int(cfg.model.n_layers),
      "experts_per_rank": int(cfg.moe.n_experts), "top_k": int(cfg.moe.top_k), "batch": b,
      "seq": t, "reversible_mode": cfg.reversible.mode if cfg.reversible.enabled else "off",
      "remat": cfg.model.remat, "mem_fraction": memory_plan.mem_fraction(),
      "compile_s": out["compile_s"], "compiled_plan_gb": plan["total"] / GB,
      "xla_remat_ops": out["xla_remat_ops"],
      "compiled_plan": {k: v / GB for k, v in plan.items()},
      "optimizer_state_gb": out["optimizer_bytes"] / GB, "zero1_emulated": not a.no_zero1,
      "flops_per_token": fpt["total"], "flops_terms": fpt,
      "xla_flops_per_token": out["xla_flops"] / (b * t), "plans_gb": plans,
      "largest_micro_batch_80gb": fits["80gb"]["batch"],
      "largest_micro_batch_80gb_how": fits["80gb"]["how"] + " (compile only, uncalibrated)",
      "largest_micro_batch_141gb": fits["141gb"]["batch"],
      "largest_micro_batch_141gb_how": fits["141gb"]["how"] + " (compile only, uncalibrated)"}


def format_plan(rec: dict) -> str:
  p = rec["compiled_plan"]
  return "\n".join([
      f"{rec['device']}: {rec['stage']} rank, {rec['layers']} layers, {rec['experts_per_rank']} "
      f"experts top-{rec['top_k']}, B{rec['batch']} x T{rec['seq']}, reversible "
      f"{rec['reversible_mode']}, remat {rec['remat']}; compiled in {rec['compile_s']:.1f} s",
      f"compiled plan {p['total']:.2f} GB (arguments {p['arguments']:.2f}, temporaries "
      f"{p['temporaries']:.2f}, outputs {p['outputs']:.2f}, aliased {p['aliased']:.2f}; XLA "
      f"rematerialised {rec['xla_remat_ops']} ops to fit); "
      f"optimizer state {rec['optimizer_state_gb']:.2f} GB "
      f"({'ZeRO-1 share' if rec['zero1_emulated'] else 'whole'})",
      f"FLOPs/token: model {rec['flops_per_token'] / 1e9:.2f} G",
      "plans: " + ", ".join(f"B{q['batch']} {q['total']:.2f} GB" for q in rec["plans_gb"])
      + "; largest micro-batch whose plan fits: 80 GB -> "
      f"B{rec['largest_micro_batch_80gb']}, 141 GB -> B{rec['largest_micro_batch_141gb']}"])


def load_and_cut(a):
  cfg = load_config(a.config)
  apply_overrides(cfg, a.set)
  cfg = rank_config(cfg, a.ranks or int(cfg.mesh.expert))
  if a.layers:
    cfg.model.n_layers = a.layers
  return cfg


def format_report(rec: dict) -> str:
  lines = [
      f"# {rec['date']}  {rec['device']}  commit {rec['commit']}",
      f"# {rec['command']}",
      f"stage {rec['stage']} one rank: {rec['layers']} layers, {rec['experts_per_rank']} experts "
      f"top-{rec['top_k']}, B{rec['batch']} x T{rec['seq']}, reversible {rec['reversible_mode']}",
      f"step {rec['step_ms']:.1f} ms (compile {rec['compile_s']:.0f} s), {rec['tokens_per_s']:,.0f} "
      f"tokens/s, MFU {rec['mfu'] * 100:.1f}% on {rec['flops_per_token'] / 1e9:.2f} GFLOP/token "
      f"(XLA cost_analysis of the step: {rec['xla_flops_per_token'] / 1e9:.2f} GFLOP/token, "
      f"recomputation included)",
      f"memory: peak {rec['peak_gb']:.2f} GB ({rec['peak_how']}); after building the state "
      f"{rec['peak_after_build_gb']:.2f} GB peak, {rec['in_use_after_build_gb']:.2f} GB in use",
      "compiled plan: " + ", ".join(f"{k} {v:.2f}" for k, v in rec["compiled_plan"].items())
      + f" GB; measured - plan = {rec['peak_minus_plan_gb']:+.2f} GB",
      f"optimizer state held {rec['optimizer_state_gb']:.2f} GB "
      f"({'ZeRO-1 emulated' if rec['zero1_emulated'] else 'whole'}; whole "
      f"{rec['optimizer_state_whole_gb']:.2f} GB, a device's share in the node step "
      f"{rec['optimizer_state_zero1_gb']:.2f} GB); peak with that share "
      f"{rec['peak_with_zero1_gb']:.2f} GB",
      f"largest micro-batch: 80 GB -> B{rec['largest_micro_batch_80gb']} "
      f"({rec['largest_micro_batch_80gb_how']}), 141 GB -> B{rec['largest_micro_batch_141gb']} "
      f"({rec['largest_micro_batch_141gb_how']}); plans "
      + ", ".join(f"B{p['batch']} {p['total']:.2f} GB" for p in rec["plans_gb"]),
  ]
  if rec["profile"]:
    lines.append(profile_table.format_table(rec["profile"], rec["profile_info"], "profile: "))
  for by, rows in rec.get("profile_by_source", {}).items():
    lines.append(f"device time by Python source ({by}):")
    lines += [f"  {r['ms']:9.2f} ms {r['share'] * 100:5.1f}% {r['calls']:7.0f}  {r['name']}"
              for r in rows]
  return "\n".join(lines)


def main(argv=None):
  ap = argparse.ArgumentParser(prog="python -m benchmarks.rank120",
                               description=__doc__.split("\n")[0])
  ap.add_argument("--config", default="configs/stage_120b.py", help="Config file (MoE stage) "
                  "whose rank is run.")
  ap.add_argument("--tiny", action="store_true",
                  help="configs/tiny_120b.py at T=64, one step, 2 ranks (CPU; what CI runs).")
  ap.add_argument("--ranks", type=int, default=0, help="Expert-parallel width (0: the config's "
                  "mesh.expert).")
  ap.add_argument("--layers", type=int, default=0, help="Override model.n_layers (0: the "
                  "config's).")
  ap.add_argument("--batch", type=int, default=1, help="Sequences per micro-batch.")
  ap.add_argument("--seq", type=int, default=0, help="Sequence length in tokens (0: the "
                  "config's train.seq_len).")
  ap.add_argument("--steps", type=int, default=3, help="Timed steps after two warm-up steps "
                  "(median reported; --tiny caps it at 1).")
  ap.add_argument("--seed", type=int, default=0, help="Random seed of the parameters and token "
                  "ids.")
  ap.add_argument("--plan_batches", default="", help="Comma list of micro-batch sizes "
                  "to plan (compile only, nothing run).")
  ap.add_argument("--no_profile", action="store_true", help="Skip the per-op profile of one "
                  "step (jax.profiler trace).")
  ap.add_argument("--no_zero1", action="store_true",
                  help="Hold the whole optimizer state (default: the rank's ZeRO-1 share).")
  ap.add_argument("--keep_trace", default="", help="Copy the profile's .trace.json.gz "
                  "here.")
  ap.add_argument("--hlo_dump", default="",
                  help="XLA dump directory of this run (XLA_FLAGS=--xla_dump_to=DIR): attribute "
                       "the profile to Python source through the step's HLO (best with "
                       "--xla_gpu_enable_command_buffer= so kernels carry HLO names).")
  ap.add_argument("--compile_for", default="", help="h100 or h200: compile the rank's step "
                  "for that card without one (lightning_jax/gpu_target.py: needs JAX's CUDA "
                  "plugin, no driver) and report its memory plan; nothing runs.")
  ap.add_argument("--hlo_out", default="", help="With --compile_for: write the optimized HLO "
                  "here.")
  ap.add_argument("--commit", default="", help="Commit to record (default: git "
                  "rev-parse).")
  ap.add_argument("--set", action="append", default=[], help="section.field=value config "
                  "override (repeatable).")
  ap.add_argument("--json", default="", help="Write the record here as JSON.")
  a = ap.parse_args(argv)
  if a.tiny:
    a.config, a.seq, a.steps = "configs/tiny_120b.py", a.seq or 64, min(a.steps, 1)
    a.ranks = a.ranks or 2
  try:
    a.plan_batches = [int(x) for x in a.plan_batches.split(",") if x.strip()]
  except ValueError:
    raise ConfigError(f"--plan_batches={a.plan_batches!r} must be a comma list of integers, "
                      "e.g. 2,4.") from None
  cfg = load_config(a.config)
  apply_overrides(cfg, a.set)
  command = "python -m benchmarks.rank120 " + " ".join(argv if argv is not None else sys.argv[1:])
  if a.compile_for:
    rec = compile_only(cfg, a, command.strip())
    print(format_plan(rec), flush=True)
  else:
    rec = run(cfg, a, command.strip())
    print(format_report(rec), flush=True)
  if a.json:
    os.makedirs(os.path.dirname(a.json) or ".", exist_ok=True)
    with open(a.json, "w") as f:
      json.dump(rec, f, indent=1, default=float)
  return rec


if __name__ == "__main__":
  main()
