"""Command-line driver shared by the growth transforms:

  python -m growth.dense_to_moe   --src RUN --dst NEW_RUN --config=configs/stage_5b.py --strategy partition [--seed 0]
  python -m growth.depth_map      --src RUN --dst NEW_RUN --config=configs/stage_9b.py --mapping 5b_to_9b
  python -m growth.expand_experts --src RUN --dst NEW_RUN --config=configs/stage_120b.py --ratio 0.5 --router_sigma 0.05 --seed 1337
  python -m growth.to_tqp         --src RUN --dst NEW_RUN --config=configs/stage_120b.py
  python -m growth.expand_to_tqp  --src RUN --dst NEW_RUN --config=configs/stage_120b.py --ratio 0.5 --router_sigma 0.05 --seed 1337
  (expand_experts then to_tqp in one process, without the dense intermediate run: growth/expand_to_tqp.py)

--src: a run directory, its checkpoints/ directory, or one checkpoints/<step> directory (the
newest step by default). The source config is the one saved in the checkpoint. --config is the
TARGET stage's config (any field overrides as --config.section.field=...): pass launch.train
exactly the same --config flags and --workdir=NEW_RUN, and it starts the next stage from the
grown checkpoint.

The grown checkpoint is NEW_RUN/checkpoints/0 in launch.train's format (the frozen buffers, e.g.
the TQP quantized bases, go once to NEW_RUN/checkpoints/frozen/0: lightning_jax/checkpoint.py):
params/frozen/stats from the transform, FRESH optimizer state for the target config (its LR
groups), step 0, a fresh data-loader state, the target config (so the schedule is the new
stage's), and in its meta record the provenance: source path and step, transform, arguments, seed, and the growth report
(`python -m launch.inspect NEW_RUN` shows it). When data.path is empty, the target run's shards
are prepared in NEW_RUN/data exactly as launch.train would.

Growth report (printed, and stored in meta): held-out loss (CE_next) of the source model and of
the grown model on the same held-out batch, and for MoE targets the router load statistics at
init (max/min expert load over the mean, null rate, per layer).
"""
from __future__ import annotations

import json
import pathlib
import sys
import time

import numpy as np

TRANSFORMS = ("dense_to_moe", "depth_map", "expand_experts", "to_tqp", "expand_to_tqp")


# ----------------------------------------------------------------------------- reading
def locate(path: str):
  from launch.inspect import locate as _locate
  return _locate(path)


def _restore_without_opt(c, step: int, abstract: dict) -> dict:
  """Checkpointer.restore's result for params / frozen / stats only: the state item is read with
  orbax's partial restore (the optimizer state's files are never opened), the frozen version
  through the checkpointer (fingerprint-verified), and every restored leaf is checked finite."""
  import orbax.checkpoint as ocp
  from lightning_jax import checkpoint as ck
  d = c.step_dir(step)
  ref = c.frozen_ref(step)
  abstract = dict(abstract)
  abstract_frozen = abstract.pop("frozen", None) if ref is not None else None
  sub = {k: abstract[k] for k in ("params", "frozen", "stats") if k in abstract}
  try:
    with ocp.PyTreeCheckpointer() as pc:
      state = dict(pc.restore(d / "state", args=ocp.args.PyTreeRestore(
          item=sub, restore_args=ocp.checkpoint_utils.construct_restore_args(sub),
          partial_restore=True)))
  except Exception as e:  # orbax / tensorstore raise many types for torn files
    raise ck.CheckpointError(f"checkpoint {d} is unreadable or incomplete "
                             f"({ck._first_line(e)}).") from e
  if ref is not None:
    state["frozen"] = ({} if ref["version"] is None else
                       c._restore_frozen(ref, abstract_frozen, d))
  ck._check_finite_tree(state, d)
  return {"state": state, "config": c.read_json(step, "config"), "meta": c.read_json(step, "meta")}


def read_source(path: str, log=print, *, opt_state: bool = False) -> dict:
  """{"cfg", "variables" (numpy), "step", "dir", "meta"} of a checkpoint; params, frozen (from
  the frozen version the step references) and stats are restored onto one host device.
  opt_state: also restore the optimizer state (into "opt_state", numpy); by default it is not
  read at all (orbax placeholders): the growth transforms only need the variables, and at the
  9B's width the Adam moments are 67 GB of host memory."""
  import jax
  from lightning_jax import checkpoint as ck
  from lightning_jax.config import from_stored
  cdir, step = locate(path)
  c = ck.Checkpointer(cdir, ck.config_ns(keep=0), read_only=True)
  steps = c.steps()
  if not steps:
    raise ck.CheckpointError(f"{cdir} holds no complete checkpoint.")
  step = steps[-1] if step is None else step
  if step not in steps:
    raise ck.CheckpointError(f"step {step} is not among the checkpoints in {cdir}: {steps}.")
  md = c.state_metadata(step)
  dev = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0] if jax.devices("cpu")
                                          else jax.devices()[0])
  abstract = jax.tree_util.tree_map(
      lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=dev), dict(md))
  if opt_state or "opt_state" not in abstract:
    got = c.restore(step, abstract)
  else:
    got = _restore_without_opt(c, step, abstract)
  c.close()
  state = got["state"]
  variables = {k: jax.tree_util.tree_map(np.asarray, state[k]) for k in ("params", "frozen", "stats")}
  cfg = from_stored(got["config"], log)     # data only: nothing in a run directory is executed
  log(f"source: {c.step_dir(step)} (step {step}, stage {cfg.get('stage')!r})")
  out = {"cfg": cfg, "variables": variables, "step": int(step), "dir": str(c.step_dir(step)),
         "meta": got["meta"]}
  if opt_state:
    out["opt_state"] = jax.tree_util.tree_map(np.asarray, state.get("opt_state"))
  return out


# ----------------------------------------------------------------------------- evaluation
def heldout_batch(cfg, data_dir, manifest):
  """The first held-out batch of the first evaluated domain: int32 [eval_batch, seq_len + 2]."""
  from launch import train as train_lib
  c = cfg.copy_and_resolve_references()
  with c.unlocked():
    c.train.eval_every = max(1, int(c.train.eval_every))
    c.train.eval_batches = 1
  _, evals = train_lib.make_data(c, data_dir, manifest)
  for dom in sorted(evals):
    if len(evals[dom]):
      return dom, np.asarray(evals[dom][0], np.int32)
  raise ValueError(f"no held-out batch of train.eval_batch={c.train.eval_batch} windows in "
                   f"{data_dir}; expected a data split with held-out text.")


def evaluate(variables, cfg, ids) -> dict:
  """CE_next on ids, and router load statistics per MoE layer at these weights."""
  import jax
  from lightning_jax import model
  f = jax.jit(lambda v, x: model.loss_fn(v["params"], v["frozen"], v["stats"], {"ids": x}, cfg)[1])
  m = jax.device_get(f(variables, ids))
  out = {"loss": float(m["loss"])}
  if cfg.moe.enabled:
    from lightning_jax.layers import moe
    loads = {}
    groups = m["step_stats"].get("groups", {})
    for lj in sorted(groups):
      st = groups[lj].get("moe")
      if st is None:
        continue
      s = moe.log_summary(st)
      loads[lj] = {k: round(float(v), 4) for k, v in s.items()
                   if k in ("load_max_over_mean", "load_min_over_mean", "null_rate")}
    mtp = m["step_stats"].get("mtp", {}).get("layer", {}).get("moe")
    if mtp is not None:
      s = moe.log_summary(mtp)
      loads["mtp"] = {k: round(float(v), 4) for k, v in s.items()
                      if k in ("load_max_over_mean", "load_min_over_mean", "null_rate")}
    out["router_load"] = loads
  return out


# ----------------------------------------------------------------------------- writing
def write_grown(dst: pathlib.Path, cfg, variables, data_dir, manifest, meta, log=print,
                opt_state=None, loader_state=None, *, on_cpu: bool = False):
  """NEW_RUN/checkpoints/0: the grown variables, fresh optimizer state, step 0, fresh loader.
  opt_state / loader_state (optional; growth.next_phase): written instead of the fresh ones.
  on_cpu: build the state (the variables' device copies, the fresh optimizer state, the frozen
  fingerprint) and save it on the host CPU device instead of the default device, which would
  otherwise hold the whole state at once (the 120B's TQP state: 125 GB). Host memory then holds
  the caller's (numpy) variables plus the state: params + frozen + stats + 2 x params for Adam
  (about 82 + 43 GB at the 120B's full width). The checkpoint is the same either way; launch.train
  restores it with its own shardings. Caveat (lightning_jax/checkpoint.py, not here): the save's
  frozen fingerprint (leaf_sums in one jit over the frozen tree) holds about 8-12x the frozen
  tree's bytes in buffers on the CPU backend (measured: 3.3 GB for one 268 MB uint8 leaf, 8.6 GB
  for four), which at the 120B's 61 GB frozen tree does not fit a 500 GB host."""
  import contextlib
  import jax
  import jax.numpy as jnp
  from launch import train as train_lib
  from lightning_jax import checkpoint as ck, optim
  if on_cpu:
    cpu = jax.devices("cpu")[0]
    where, put = jax.default_device(cpu), (lambda x: jax.device_put(x, cpu))
  else:
    where, put = contextlib.nullcontext(), jnp.asarray
  with where:
    steps_total = optim.total_steps(cfg)
    tx, _ = optim.make_optimizer(cfg, variables["params"], steps_total)
    params = jax.tree_util.tree_map(put, variables["params"])
    state = {"params": params,
             "frozen": jax.tree_util.tree_map(put, variables["frozen"]),
             "stats": jax.tree_util.tree_map(put, variables["stats"]),
             "opt_state": (tx.init(params) if opt_state is None else
                           jax.tree_util.tree_map(put, opt_state)),
             "step": put(np.int32(0))}
    if loader_state is None:
      loader, _ = train_lib.make_data(cfg, data_dir, manifest)
      loader_state = loader.get_state()
    kc = ck.config_ns(keep=0)
    w = ck.Checkpointer(dst / "checkpoints", kc)
    w.save(0, state, loader_state, ck.config_to_json(cfg), meta, frozen_version=0)
    w.close()
  from growth import history      # <dst>/growth_history.json: kept after checkpoints/0 is gone
  history.record(dst, meta, cfg.stage)
  log(f"wrote {dst / 'checkpoints' / '0'}: step 0, "
      f"{'fresh' if opt_state is None else 'given'} optimizer state, schedule of "
      f"{steps_total} steps from the target config (stage {cfg.stage!r})"
      f"{' (built on the host CPU)' if on_cpu else ''}")


def _jsonable(x):
  if isinstance(x, dict):
    return {str(k): _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, np.ndarray):
    return x.tolist()
  if isinstance(x, np.generic):
    return x.item()
  return x


# ----------------------------------------------------------------------------- the driver
def open_target(src: str, dst: str, cfg, what: str, log=print):
  """Shared start of the commands that write a step-0 run from a source checkpoint: refuse a DST
  that already holds checkpoints, read the source, resolve the target config and its data (shards
  prepared in DST/data when data.path is empty). Returns (source, cfg, dst, data_dir, manifest)."""
  from launch import train as train_lib
  from lightning_jax import checkpoint as ck
  from lightning_jax.config import validate
  dst = pathlib.Path(dst)
  if (dst / "checkpoints").exists() and any(p.name.isdigit() for p in (dst / "checkpoints").iterdir()):
    raise ck.CheckpointError(f"--dst {dst} already holds checkpoints; expected a new run directory "
                             f"for {what}.")
  source = read_source(src, log)
  cfg = cfg.copy_and_resolve_references()
  from lightning_jax import optim
  optim.resolve_start_from(cfg)      # the user's target config: stored resolved with the run
  dst.mkdir(parents=True, exist_ok=True)
  data_dir, manifest = train_lib.resolve_data(cfg, dst, log)
  train_lib.apply_data_vocab(cfg, manifest, data_dir)
  validate(cfg)
  return source, cfg, dst, data_dir, manifest


def grow(transform: str, src: str, dst: str, cfg, args: dict, log=print) -> dict:
  """Read the source checkpoint, apply `transform`, evaluate both, write the grown run."""
  t0 = time.perf_counter()
  source, cfg, dst, data_dir, manifest = open_target(src, dst, cfg, "the grown model", log)
  src_cfg = source["cfg"]

  if transform == "dense_to_moe":
    from growth.dense_to_moe import dense_to_moe
    grown, rep = dense_to_moe(source["variables"], src_cfg, cfg, strategy=args["strategy"],
                              seed=args["seed"], return_report=True)
  elif transform == "depth_map":
    from growth.depth_map import depth_map
    grown, rep = depth_map(source["variables"], src_cfg, cfg, mapping=args["mapping"],
                           return_report=True)
  elif transform == "expand_experts":
    from growth.expand_experts import expand_experts
    grown, rep = expand_experts(source["variables"], src_cfg, cfg, ratio=args["ratio"],
                                router_sigma=args["router_sigma"], seed=args["seed"],
                                return_report=True)
  elif transform == "to_tqp":
    from growth.to_tqp import to_tqp
    grown, rep = to_tqp(source["variables"], src_cfg, cfg, return_report=True)
  elif transform == "expand_to_tqp":
    from growth.expand_to_tqp import expand_to_tqp
    grown, rep = expand_to_tqp(source["variables"], src_cfg, cfg, ratio=args["ratio"],
                               router_sigma=args["router_sigma"], seed=args["seed"],
                               return_report=True, log=log)
  else:
    raise ValueError(f"unknown growth transform {transform!r}; expected one of {TRANSFORMS}.")
  if transform not in ("to_tqp", "expand_to_tqp") and cfg.tqp.enabled:
    from growth.common import dense_expert_cfg
    cfg = dense_expert_cfg(cfg)
    log("note: the target config has tqp.enabled; the grown checkpoint holds the routed experts "
        "in dense form (tqp.enabled=False in its config): quantize it with python -m growth.to_tqp.")
  t_grow = time.perf_counter() - t0

  dom, ids = heldout_batch(cfg, data_dir, manifest)
  ev_src = evaluate(source["variables"], src_cfg, ids)
  ev_dst = evaluate(grown, cfg, ids)
  report = {"transform": transform, "args": args, "heldout_domain": dom,
            "heldout_batch": list(ids.shape), "source_loss": ev_src["loss"],
            "grown_loss": ev_dst["loss"], "leaves": rep.summary()["leaves"],
            "fresh": rep.fresh(), "dropped": sorted(rep.dropped)}
  if "router_load" in ev_dst:
    report["router_load_at_init"] = ev_dst["router_load"]
  if transform == "depth_map":
    report["mapping"] = rep.choices["mapping"]
  meta = {"provenance": _jsonable({"source_path": str(pathlib.Path(source["dir"]).absolute()),
                                   "source_step": source["step"],
                                   "source_stage": src_cfg.get("stage"),
                                   "transform": transform, "args": args,
                                   "seed": args.get("seed")}),
          "growth_report": _jsonable(report), "loss": None, "tokens": 0}
  # the TQP targets are the 120B's size: written from the host (write_grown's on_cpu)
  write_grown(dst, cfg, grown, data_dir, manifest, meta, log,
              on_cpu=transform in ("to_tqp", "expand_to_tqp"))
  log("growth report:")
  log(f"  transform {transform} {json.dumps(_jsonable(args))} from {source['dir']} "
      f"(stage {src_cfg.get('stage')!r}, step {source['step']}) to stage {cfg.stage!r}")
  log(f"  leaves: {report['leaves']}; fresh: {len(report['fresh'])}; dropped source leaves: "
      f"{len(report['dropped'])}")
  log(f"  held-out loss on the same batch ({dom}, {ids.shape[0]} x {ids.shape[1] - 2} tokens): "
      f"source {ev_src['loss']:.4f} -> grown {ev_dst['loss']:.4f}")
  for lj, s in report.get("router_load_at_init", {}).items():
    log(f"  router load at init {lj}: " + ", ".join(f"{k} {v}" for k, v in s.items()))
  log(f"  (growth {t_grow:.1f}s, total {time.perf_counter() - t0:.1f}s)")
  return {"report": report, "meta": meta, "dst": str(dst)}


def list_in_help(*names):
  """Make the named flags key flags of the main module, so `--help` lists them (absl lists only
  the flags defined in the __main__ module itself; these are defined here, in a helper)."""
  from absl import flags
  for n in names:
    flags.FLAGS.register_key_flag_for_module(sys.argv[0], flags.FLAGS[n])


def _define_flags(transform: str):
  from absl import flags
  from ml_collections import config_flags
  config_flags.DEFINE_config_file("config", None, "TARGET stage config file, e.g. "
                                  "configs/stage_5b.py (overrides: --config.section.field=...).",
                                  lock_config=True)
  flags.DEFINE_string("src", None, "Source run directory, checkpoints/ dir or checkpoints/<step>.")
  flags.DEFINE_string("dst", None, "New run directory for the grown model.")
  if transform == "dense_to_moe":
    flags.DEFINE_enum("strategy", "partition", ["partition", "drop"], "Expert initialisation.")
    flags.DEFINE_integer("seed", 0, "Seed of every random draw.")
  elif transform == "depth_map":
    flags.DEFINE_string("mapping", "5b_to_9b", "Named mapping or comma-separated source layers.")
  elif transform in ("expand_experts", "expand_to_tqp"):
    flags.DEFINE_float("ratio", 0.5, "Fraction of each target expert's channels re-drawn.")
    flags.DEFINE_float("router_sigma", 0.05, "Router noise std relative to std(source router).")
    flags.DEFINE_integer("seed", 1337, "Seed of every random draw.")
  flags.mark_flags_as_required(["config", "src", "dst"])
  list_in_help("config", "src", "dst", *{"dense_to_moe": ("strategy", "seed"),
                                         "depth_map": ("mapping",),
                                         "expand_experts": ("ratio", "router_sigma", "seed"),
                                         "expand_to_tqp": ("ratio", "router_sigma", "seed")
                                         }.get(transform, ()))


def _args(transform: str) -> dict:
  from absl import flags
  F = flags.FLAGS
  if transform == "dense_to_moe":
    return {"strategy": F.strategy, "seed": F.seed}
  if transform == "depth_map":
    return {"mapping": F.mapping}
  if transform in ("expand_experts", "expand_to_tqp"):
    return {"ratio": F.ratio, "router_sigma": F.router_sigma, "seed": F.seed}
  return {}


def guarded(argv, usage: str, fn) -> int:
  """The growth commands' shared main body: refuse stray arguments (exit 2), run `fn()`, and turn
  the errors a user can act on into one `error: ...` line on stderr (exit 1)."""
  from growth.common import GrowthError
  from lightning_jax import checkpoint as ck
  from lightning_jax.config import ConfigError
  from lightning_jax.data.shards import DataError
  if len(argv) > 1:
    print(f"error: unexpected arguments {argv[1:]}; flags look like {usage}.", file=sys.stderr)
    return 2
  try:
    fn()
  except (GrowthError, ConfigError, ck.CheckpointError, DataError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


def preflight(argv=None) -> None:
  """Before absl parses the flags: a relative --config is found from the repository root too,
  and a missing config file, a bad ':phase' or an unknown/mistyped --config.<field> override
  exits with one sentence (as launch.train does) instead of a traceback."""
  from launch.train import check_overrides
  from lightning_jax.config import ConfigError, resolve_config_argv
  argv = sys.argv if argv is None else argv
  argv[:] = resolve_config_argv(argv)
  try:
    check_overrides(argv)
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


def run(transform: str):
  """Entry point of `python -m growth.<transform>`."""
  from absl import app, flags, logging as absl_logging
  preflight()

  def main(argv):
    F = flags.FLAGS
    def go():
      from lightning_jax.run_checks import enable_compile_cache
      enable_compile_cache(F.config, F.dst, log=lambda *_: None)   # train.compile_cache
      grow(transform, F.src, F.dst, F.config, _args(transform))
    return guarded(argv, "--src=RUN --dst=NEW_RUN --config=configs/x.py", go)

  _define_flags(transform)
  absl_logging.set_verbosity(absl_logging.ERROR)
  app.run(lambda argv: sys.exit(main(argv)))
