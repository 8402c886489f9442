"""Memory plan: lower and compile the full training step abstractly and print per-device bytes.

  python -m launch.plan --config=configs/stage_120b.py [--devices=8] [--device=h100|h200]
      [--compile_for=h100|h200] [--mem_fraction=0.95] [--config.train.micro_batch=8]

It answers what launch.train answers before its first step (lightning_jax/memory_plan.fit, the
same function): does the configured micro-batch fit, and if not, which largest one does (with
train.fit_memory=auto it is the one training uses; with check, launch.train refuses naming it).
The capacity is --device's memory x --mem_fraction (XLA_PYTHON_CLIENT_MEM_FRACTION by default,
else 0.75), or on a GPU host without --device the allocator's own limit. Run on a GPU host the
figures are the GPU compile's (the one-rank benchmark, benchmarks/rank120.py, measured the
device peak equal to it); on a CPU host they are XLA:CPU's, an upper bound (XLA:CPU computes
bf16 dots in float32), unless --compile_for=h100|h200 compiles with XLA:GPU for --devices such
cards without one (lightning_jax/gpu_target.py; JAX's CUDA plugin, no driver): then the figures
are the GPU compiler's on any host. The step's collectives (all-to-all of the expert dispatch, all-gathers
and reduce-scatters of ZeRO-1, all-reduces) are listed with their bytes as they appear in the
compiled program (a loop body's once).

Nothing is allocated: the state is ShapeDtypeStructs carrying the training shardings (parameters
by sharding.RULES, TQP bases split over the expert axis like the experts they replace, optimizer
state ZeRO-1 as in launch.train), the step is lightning_jax.run.step.make_train_step (lightning_jax.run.state.build_abstract), and the numbers come
from XLA's compiled memory analysis of the SPMD-partitioned program (per device). On CPU
`peak_memory_in_bytes` only repeats the argument size, so the total reported is
  arguments + outputs - aliased (donated state) + temporaries.
The breakdown of the arguments (parameters, frozen, optimizer state, stats, batch) is computed
from the per-device shard shapes; "activations etc." is the temporaries (activations kept for
the backward, gradient accumulators, workspace).
Run on a CPU host it forces `--devices` virtual CPU devices (before jax is imported).

Several processes (one per host; lightning_jax/distributed.py): the same flags as launch.train
(--coordinator_address, --num_processes, --process_id, or from JAX_* / SLURM / torchrun
variables); --devices is then the per-process count, the mesh spans every process's devices
("data" across processes, "expert" inside one) and process 0 prints the plan, e.g. two processes
of 8 virtual CPU devices: data 2 x expert 8 (docs/cookbook.md).
"""
from __future__ import annotations

import contextlib
import math
import os
import re
import sys
import time


def _parse_devices(argv) -> int:
  """--devices=N or --devices N (absl accepts both), read before jax is imported."""
  for i, a in enumerate(argv):
    if a.startswith("--devices="):
      return int(a.split("=", 1)[1])
    if a == "--devices" and i + 1 < len(argv):
      return int(argv[i + 1])
  return 8


if __name__ == "__main__":
  _n = _parse_devices(sys.argv)
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_force_host_platform_device_count={_n}").strip()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from lightning_jax import distributed, gpu_target, memory_plan, sharding  # noqa: E402
from lightning_jax.config import ConfigError, validate  # noqa: E402
from lightning_jax.ops import pallas  # noqa: E402
from lightning_jax.run import state as state_lib  # noqa: E402

GB = 1e9
TARGETS = {"H100 80 GB": 80e9, "H200 141 GB": 141e9}


def _per_device_bytes(abstract, shardings) -> int:
  total = 0
  for a, s in zip(jax.tree.leaves(abstract), jax.tree.leaves(
      shardings, is_leaf=lambda x: isinstance(x, NamedSharding))):
    shape = s.shard_shape(a.shape) if hasattr(s, "shard_shape") else a.shape
    total += math.prod(shape) * jnp.dtype(a.dtype).itemsize
  return total


_COLLECTIVES = ("all-to-all", "all-gather", "all-reduce", "reduce-scatter", "collective-permute")
_SHAPE = re.compile(r"(pred|s8|u8|s16|u16|s32|u32|s64|u64|bf16|f16|f32|f64)\[([\d,]*)\]")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4,
          "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8}


def collectives(hlo_text: str) -> list[dict]:
  """[{kind, shape, bytes, count}] of the collective instructions in a compiled HLO module (the
  result shapes; start/done pairs counted once; a loop body's instructions once)."""
  acc = {}
  for line in hlo_text.splitlines():
    if "=" not in line:
      continue
    rhs = line.split("=", 1)[1]
    kind = next((k for k in _COLLECTIVES if f" {k}(" in rhs or f" {k}-start(" in rhs), None)
    if kind is None:
      continue
    head = rhs.split(kind, 1)[0]
    shapes = _SHAPE.findall(head)
    nbytes = sum(_BYTES[t] * math.prod(int(x) for x in dims.split(",") if x)
                 for t, dims in shapes)
    key = (kind, " ".join(f"{t}[{d}]" for t, d in shapes))
    acc.setdefault(key, [0, nbytes])[0] += 1
  return sorted(({"kind": k, "shape": sh, "bytes": b, "count": c}
                 for (k, sh), (c, b) in acc.items()), key=lambda r: -r["bytes"] * r["count"])


def plan(cfg, mesh, log=print, device: str = "", mem_fraction: float | None = None,
         compile_for: str = "") -> dict:
  n_batch = mesh.shape["data"] * mesh.shape["expert"]
  built = {}
  times = {}

  def compile_at(c, acc):
    b = state_lib.build_abstract(c, mesh, acc)
    t0 = time.perf_counter()
    with sharding.use_mesh(mesh):
      lowered = b["step"].lower(b["state_abs"], b["batch_abs"])
    t1 = time.perf_counter()
    compiled = lowered.compile()
    times[acc] = (t1 - t0, time.perf_counter() - t1)
    built[acc] = (b, compiled, c)
    return compiled

  if mem_fraction is not None and not device:
    raise ConfigError("--mem_fraction applies to the card named by --device (h100 or h200); "
                      "expected both, e.g. --device=h100 --mem_fraction=0.95.")
  capacity, note = memory_plan.device_capacity(mesh.devices.flat, cfg.train.device_memory_gb,
                                               device=device, fraction=mem_fraction)
  fit_cfg = cfg.copy_and_resolve_references()
  if fit_cfg.train.fit_memory == "off":
    fit_cfg.train.fit_memory = "check"
  try:
    accum, compiled, _, _ = memory_plan.fit(fit_cfg, n_batch, compile_at, capacity, note, log)
    refusal = None
  except ConfigError as err:          # launch.train would refuse with this sentence
    refusal = str(err)
    if not built:
      raise
    accum = max(built)                  # the smallest micro-batch tried
    compiled = built[accum][1]
  b, _, used = built[accum]        # the last compile at that micro-batch (fit's choice)
  rev = used.reversible.mode if used.reversible.enabled else "off"
  sa, ss = b["state_abs"], b["state_shard"]
  parts = {
      "parameters (trainable, f32)": _per_device_bytes(sa["params"], ss["params"]),
      "frozen (TQP base, codec)": _per_device_bytes(sa["frozen"], ss["frozen"]),
      "optimizer state": _per_device_bytes(sa["opt_state"], ss["opt_state"]),
      "stats + step": _per_device_bytes(sa["stats"], ss["stats"]) + 4,
      "batch": _per_device_bytes(b["batch_abs"], b["batch_shard"]),
  }
  ma = compiled.memory_analysis()
  arg, out = ma.argument_size_in_bytes, ma.output_size_in_bytes
  alias, temp = ma.alias_size_in_bytes, ma.temp_size_in_bytes
  total = arg + out - alias + temp
  coll = collectives(compiled.as_text())
  t = cfg.train
  micro = t.global_batch // (accum * n_batch)
  backend = (f"XLA:GPU for {compile_for} (compile only, no device)" if compile_for
             else jax.default_backend())
  res = {"arguments": arg, "outputs": out, "aliased": alias, "temporaries": temp, "total": total,
         "breakdown": parts, "lower_s": times[accum][0], "compile_s": times[accum][1],
         "accum": accum, "micro_batch": micro, "mesh": dict(mesh.shape), "capacity": capacity,
         "capacity_note": note, "refusal": refusal, "collectives": coll,
         "backend": backend, "reversible_mode": rev, "remat": used.model.remat}
  log(f"stage {cfg.stage}: mesh {dict(mesh.shape)}, global batch {t.global_batch} x {t.seq_len}, "
      f"micro-batch {micro}/device ({accum} accumulation step(s)), reversible {rev}, "
      f"remat {used.model.remat}; "
      f"tqp {'%d-bit' % cfg.tqp.bits if cfg.tqp.enabled else 'off'}; {backend} "
      f"compile" + (" (XLA:CPU: an upper bound of the GPU's)" if backend == "cpu" else ""))
  log(f"lowered in {res['lower_s']:.1f} s, compiled in {res['compile_s']:.1f} s")
  log("per-device bytes (compiled memory analysis):")
  for k in ("arguments", "outputs", "aliased", "temporaries", "total"):
    log(f"  {k:<28s} {res[k] / GB:9.2f} GB")
  log("arguments by part (from shard shapes):")
  for k, v in parts.items():
    log(f"  {k:<28s} {v / GB:9.2f} GB")
  log(f"  {'sum':<28s} {sum(parts.values()) / GB:9.2f} GB")
  log(f"activations etc. (temporaries) {temp / GB:9.2f} GB")
  for name, cap in TARGETS.items():
    verdict = "fits" if total <= cap else f"over by {(total - cap) / GB:.2f} GB"
    log(f"vs {name}: {verdict} ({total / cap * 100:.0f}%)")
  if refusal:
    log(f"launch.train would refuse: {refusal}")
  if coll:
    log("collectives in the compiled step (a loop body's once):")
    for c in coll:
      log(f"  {c['kind']:<18s} x{c['count']:<3d} {c['bytes'] / 1e6:10.2f} MB  {c['shape']}")
  return res


def _define_flags():
  config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/stage_120b.py "
                                  "(overrides: --config.section.field=...).")
  flags.DEFINE_integer("devices", 8, "Virtual CPU devices to plan for (set before jax starts).")
  flags.DEFINE_string("device", "", "Plan for this card: h100 (80 GB) or h200 (141 GB); default: "
                      "the allocator limit of the device here, or train.device_memory_gb.")
  flags.DEFINE_string("compile_for", "", "h100 or h200: compile the step with XLA:GPU for a node "
                      "of --devices such cards without one (lightning_jax/gpu_target.py: needs "
                      "JAX's CUDA plugin, no driver), so the plan is the GPU compiler's; implies "
                      "--device of the same card.")
  flags.DEFINE_float("mem_fraction", None, "Fraction of --device's memory the allocator may use "
                     "(default: XLA_PYTHON_CLIENT_MEM_FRACTION, else 0.75).")
  flags.DEFINE_string("coordinator_address", "", "host:port of process 0 (multi-process plan).")
  flags.DEFINE_integer("num_processes", 0, "Number of processes (0: from the environment, else 1).")
  flags.DEFINE_integer("process_id", -1, "This process's id in [0, num_processes).")
  flags.DEFINE_integer("distributed_timeout_s", 300, "Seconds to wait for the coordinator.")


def main(argv):
  fl = flags.FLAGS
  if len(argv) > 1:
    print(f"error: unexpected arguments {argv[1:]}; flags look like "
          f"--config=configs/stage_120b.py.", file=sys.stderr)
    return 2
  cfg = fl.config
  try:
    launch = distributed.from_environment(fl.coordinator_address, fl.num_processes,
                                          fl.process_id)
    if launch is not None:
      distributed.initialize(launch, fl.distributed_timeout_s)
    if cfg is None:
      raise ConfigError("--config is required, e.g. --config=configs/stage_120b.py.")
    validate(cfg)
    device = fl.device
    if fl.compile_for:
      if launch is not None:
        raise ConfigError("--compile_for plans one node on this host; expected no "
                          "multi-process flags with it.")
      device = device or fl.compile_for
      if device.lower() != fl.compile_for.lower():
        raise ConfigError(f"--compile_for={fl.compile_for} with --device={fl.device}: expected "
                          "the same card (or --device left out).")
      devs = gpu_target.compile_only_devices(fl.compile_for, fl.devices, fl.mem_fraction)
      n = len(devs)
    else:
      devs = None
      n = jax.local_device_count()
    if n != fl.devices:
      raise ConfigError(f"--devices={fl.devices} but jax sees {n} devices; run launch.plan as a "
                        "fresh process so it can set the virtual device count.")
    mesh = sharding.make_mesh(cfg.mesh, devices=devs)
    log = print if distributed.is_primary() else (lambda *a, **k: None)
    t0 = time.perf_counter()
    # compiling for a card that is not here: trace the card's code paths, not this host's
    with pallas.target_gpu() if fl.compile_for else contextlib.nullcontext():
      plan(cfg, mesh, log=log, device=device, mem_fraction=fl.mem_fraction,
           compile_for=fl.compile_for)
    log(f"{jax.process_count()} process(es) x {n} devices; wall {time.perf_counter() - t0:.1f} s")
  except ConfigError as e:
    if distributed.active():
      distributed.fail(str(e))
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  _define_flags()
  app.run(lambda argv: sys.exit(main(argv)))
