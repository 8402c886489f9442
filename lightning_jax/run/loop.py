"""The training loop of a run (lightning_jax/run): `train(cfg, workdir, ...)`.

launch.train is its command line; growth.lineage trains every stage of the tiny lineage in one
process with it. What it does, step by step:

Restarting in the same run directory resumes from the newest complete checkpoint: parameters,
optimizer state, running statistics, step and the data loader's position. The saved config is
checked against this one (run.identity) before any array is read.

The train step (one jit with explicit in/out shardings, run/step.py):
  parameters replicated over (data, expert) except expert axes (sharding.RULES), the batch split
  over ("data", "expert"), optimizer state ZeRO-1 (sharding.zero1_sharding); the global batch is
  split into micro-batches of train.micro_batch sequences per device and the gradients are
  accumulated with lax.scan; AdamW (lightning_jax.optim); then model.update_stats. A step whose
  loss or gradient norm is not finite does not change the state, and the run stops naming the
  step; the last checkpoint written stays as it was. Frozen buffers (codec, TQP quantized
  bases) take model.frozen_axes: the TQP bases are split over "expert" like the experts.

Between steps, on the host: with moe.enabled and moe.hot_config set, moe.HotConfig.poll(step)
re-reads the hot-config JSON and its ctl() values enter the step as an array argument (the
forward's consts["moe_ctl"] and model.update_stats(moe_ctl=...)), so edits apply without a
recompile; with tqp.enabled and tqp.flush_every > 0, tqp.maybe_flush folds the adapters into
the quantized bases every flush_every steps.
"""
from __future__ import annotations

import json
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm import tqdm

from lightning_jax import checkpoint as ckpt_lib
from lightning_jax import distributed
from lightning_jax import memory_plan, metrics as metrics_lib
from lightning_jax import model as model_lib
from lightning_jax import optim, rundir, run_checks, sharding, tqp as tqp_lib, watchdog
from lightning_jax.config import validate
from lightning_jax.data import shards
from lightning_jax.layers import kronecker, moe as moe_lib
from lightning_jax.run import identity, setup
from lightning_jax.run import state as state_lib
from lightning_jax.run import step as step_lib

BATCH_AXES = step_lib.BATCH_AXES


class TrainingStopped(RuntimeError):
  """The run stopped on a non-finite loss; the message names the step."""


_JIT_CACHE: dict = {}


def _compile_key(cfg_json, mesh, accum, model):
  """What the compiled functions depend on (not data paths, logging, checkpoint policy, the
  watchdog or the compilation cache)."""
  sec = {k: cfg_json.get(k) for k in ("model", "moe", "reversible", "tqp", "optim", "train", "mesh")}
  sec["train"] = {k: v for k, v in (sec["train"] or {}).items() if k not in run_checks.HOST_ONLY}
  return (json.dumps(sec, sort_keys=True), tuple(d.id for d in mesh.devices.flat), accum, id(model))


def _cached_jit(key, build):
  if key not in _JIT_CACHE:
    _JIT_CACHE[key] = build()
  return _JIT_CACHE[key]


# ----------------------------------------------------------------------------- training
def train(cfg, workdir, *, fallback_to_previous: bool = False, stop_after: int = 0,
          progress: bool = True, log=print, model=None, debug_poison_step: int = -1,
          checkpointing: bool = True, stage_cfg=None, on_hang=None,
          debug_hang_step: int = -1) -> dict:
  """Run (or resume) training; returns a summary dict (also the last line of metrics.jsonl).

  stage_cfg: (stage file, its config) to log the resolved config's difference from it.
  on_hang(message): the watchdog's action (lightning_jax/watchdog.py; default: end the process).
  """
  if model is None:
    model = model_lib
  t_start = time.perf_counter()
  if not distributed.is_primary():      # several processes: process 0 logs and shows progress
    log, progress = (lambda *a, **k: None), False
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  rundir.lock(workdir, log)     # one process per run directory (released at exit / the end)
  cfg = cfg.copy_and_resolve_references() if hasattr(cfg, "copy_and_resolve_references") else cfg
  optim.resolve_start_from(cfg)   # stored resolved: a stored config is never executed
  validate(cfg)                   # bad sizes in one sentence before any data is prepared
  distributed.check_batch(cfg)
  with distributed.primary_first("data"):      # process 0 prepares shards, the others read them
    data_dir, manifest = setup.resolve_data(cfg, workdir, log)
  setup.apply_data_vocab(cfg, manifest, data_dir)
  if checkpointing and (workdir / "checkpoints").is_dir():   # the run's expert layout, if any
    reader = ckpt_lib.Checkpointer(workdir / "checkpoints", cfg.checkpoint, read_only=True,
                                   log=log)
    try:
      identity.adopt_layout(cfg, reader, log)
    finally:
      reader.close()
  validate(cfg)
  distributed.check_agreement(ckpt_lib.config_to_json(cfg))   # same config and code everywhere
  watchdog.check_config(cfg)
  metrics_lib.check_config(cfg)   # a W&B project needs the wandb package
  if stage_cfg is not None:
    log(run_checks.config_diff_line(cfg, stage_cfg[1], stage_cfg[0]))
  mesh = sharding.make_mesh(cfg.mesh)
  n_batch = mesh.shape["data"] * mesh.shape["expert"]
  accum = state_lib.check_train_config(cfg, n_batch)
  steps_total = optim.total_steps(cfg)
  tps = optim.tokens_per_step(cfg)

  # ---- abstract state and shardings
  abstract = model.abstract_variables(cfg)
  rep = NamedSharding(mesh, P())
  tx, sched = optim.make_optimizer(cfg, abstract["params"], steps_total)
  opt_abs = jax.eval_shape(tx.init, abstract["params"])
  state_abs, state_shard, p_shard, o_shard = state_lib.train_state(cfg, model, mesh, abstract,
                                                                   opt_abs)
  batch_shard = NamedSharding(mesh, P(BATCH_AXES, None))

  # ---- the training step, compiled before anything is built, at a micro-batch that fits
  hot = None
  if cfg.moe.enabled and cfg.moe.hot_config:
    hot = moe_lib.HotConfig(cfg, logger=log)
  step_in = (state_shard, {"ids": batch_shard}) + ((rep,) if hot is not None else ())
  step_args = ((ckpt_lib.abstract_with_shardings(state_abs, state_shard),
                {"ids": jax.ShapeDtypeStruct((cfg.train.global_batch, cfg.train.seq_len + 2),
                                             jnp.int32, sharding=batch_shard)})
               + (({k: jax.ShapeDtypeStruct((), jnp.float32, sharding=rep)
                    for k in hot.values},) if hot is not None else ()))
  # the watchdog covers this compile too (its notes reach metrics.jsonl once the logger exists)
  note_step, logger_ref = [0], [None]
  wd = watchdog.Watchdog.from_config(
      cfg, on_timeout=on_hang or watchdog.exit_process,
      note=lambda msg: (logger_ref[0].write(note_step[0], {"stopped": msg}) if logger_ref[0]
                        else log(msg)))
  step_compile_s = {}

  def compile_step(c, acc):
    def build():
      fn = jax.jit(step_lib.make_train_step(c, tx, acc, model, mesh), in_shardings=step_in,
                   out_shardings=(state_shard, rep), donate_argnums=(0,))
      with sharding.use_mesh(mesh):
        t = watchdog.compile_all(wd, log, [("the training step", lambda: out.append(
            fn.lower(*step_args).compile()))])
      step_compile_s[acc] = t["the training step"]
      return out[-1]
    out = []
    return _cached_jit(("train_aot", hot is not None) +
                       _compile_key(ckpt_lib.config_to_json(c), mesh, acc, model), build)
  capacity, cap_note = memory_plan.device_capacity(distributed.local_devices(mesh.devices.flat),
                                                   cfg.train.device_memory_gb)
  # (under train.fit_memory=auto the plan may choose model.remat or reversible.mode: cfg is its
  # choice)
  accum, step_jit, _, cfg = memory_plan.fit(cfg, n_batch, compile_step, capacity, cap_note, log)

  # ---- data
  batch_shape = (cfg.train.global_batch, cfg.train.seq_len + 2)
  loader, evals = setup.make_data(cfg, data_dir, manifest,
                            rows=distributed.local_rows(batch_shard, batch_shape))
  eval_names, eval_stack = [], None
  for dom, bs in evals.items():
    full = [b for b in bs if b.shape[0] == cfg.train.eval_batch]
    if not full:
      log(f"note: held-out set {dom!r} has fewer than train.eval_batch={cfg.train.eval_batch} "
          f"windows of seq_len + 2 tokens; it is not evaluated.")
    eval_names += [dom] * len(full)
    evals[dom] = full
  if eval_names:
    eval_stack = np.stack([b for bs in evals.values() for b in bs])

  # ---- checkpoints: resume or init
  cfg_json = ckpt_lib.config_to_json(cfg)
  # what the compiled functions depend on (not data paths, logging or checkpoint policy)
  ckey = _compile_key(cfg_json, mesh, accum, model)
  ck = ckpt_lib.Checkpointer(workdir / "checkpoints", cfg.checkpoint)
  restored = None
  if checkpointing:
    # the resume identity check reads the saved config before any array (run/identity.py)
    restored = ck.restore_latest(
        ckpt_lib.abstract_with_shardings(state_abs, state_shard),
        fallback_to_previous=fallback_to_previous, log=log,
        check_config=lambda saved, where: identity.check_same_run(saved, cfg_json, where))
  else:
    log("checkpointing is off (--no_checkpoint): nothing is restored or saved.")
  if restored is not None:
    state = restored["state"]
    # (each process its own state; the pool mixture reports stage notes)
    loader.set_state(distributed.own_loader_state(restored["loader"]), log=log)
    start = int(restored["step"])
    if run_checks.schedule_on_resume(cfg, restored["config"], restored.get("meta"), start, log):
      tx, sched = optim.make_optimizer(cfg, abstract["params"], steps_total)   # restarted LR
      cfg_json = ckpt_lib.config_to_json(cfg)
      ckey = _compile_key(cfg_json, mesh, accum, model)
      step_jit = compile_step(cfg, accum)          # the step closes over the restarted schedule
    frozen_version = restored.get("frozen_version")
    if frozen_version is None:      # a step of the older layout (frozen inside the state)
      frozen_version = start
    log(f"resuming from {ck.step_dir(start)} (step {start}); data loader at "
        f"{restored['loader'].get('iterator')}")
  else:
    start = 0
    frozen_version = 0      # checkpoint.py: the step at which the frozen tree came into being
    token_bytes = shards.token_bytes(data_dir)
    codec = kronecker.codec_from_tokenizer(token_bytes, cfg)
    key = jax.random.PRNGKey(cfg.train.seed)
    # the codec (at 2B a [131072, 8192] table, 2 GB) is an argument, not a captured constant
    init_jit = _cached_jit(("init",) + ckey, lambda: jax.jit(
        lambda k, c: model.init_variables(cfg, k, c),
        out_shardings={"params": p_shard, "frozen": state_shard["frozen"],
                       "stats": state_shard["stats"]}))
    opt_init_jit = _cached_jit(("opt_init",) + ckey, lambda: jax.jit(tx.init,
                                                                   out_shardings=o_shard))
    log("initialising the parameters (compiling the initialiser) ...")
    t_init = time.perf_counter()
    with sharding.use_mesh(mesh):
      var = init_jit(key, codec)
      opt_state = opt_init_jit(var["params"])
    jax.block_until_ready(opt_state)
    log(f"initialised in {time.perf_counter() - t_init:.1f} s")
    state = {**var, "opt_state": opt_state, "step": distributed.from_host(np.int32(0), rep)}

  # ---- host-side controls between steps
  if hot is not None:
    hot.poll(start - start % hot.every)     # a resumed run starts from the file's values
  flush_on = bool(cfg.tqp.enabled) and int(cfg.tqp.flush_every) > 0

  # ---- compiled functions (cached per config within a process: tests resume in-process)
  eval_jit = _cached_jit(("eval",) + ckey, lambda: jax.jit(
      step_lib.make_eval_step(cfg, model), in_shardings=(state_shard, NamedSharding(mesh, P(None, BATCH_AXES,
                                                                              None))),
      out_shardings=rep))

  # ---- metrics
  fpt, fpt_note = metrics_lib.model_flops_per_token(cfg, abstract["params"])
  peak, peak_note = metrics_lib.peak_flops(mesh.devices.flat, cfg.model.dtype)
  thr = metrics_lib.Throughput(fpt, peak)
  # process 0 logs (metrics.jsonl, run_info.jsonl, TensorBoard, W&B); the others log nothing
  logger = (metrics_lib.Logger(workdir, config=cfg_json, step=start,
                               wandb_project=cfg.train.wandb_project)
            if distributed.is_primary() else distributed.NullLogger())
  log(f"MFU: model FLOPs/token {fpt:.4g} ({fpt_note}); {peak_note}")
  log(f"run {workdir}: {steps_total} steps x {tps} tokens (global_batch {cfg.train.global_batch}"
      f" x seq_len {cfg.train.seq_len}; {accum} micro-batch(es) of "
      f"{cfg.train.global_batch // (accum * n_batch)}/device "
      f"on mesh {dict(mesh.shape)}); vocabulary {cfg.model.vocab_size}")
  logger.note(peak_note)

  eval_shard = NamedSharding(mesh, P(None, BATCH_AXES, None))
  hw = setup.heldout_weights(cfg, manifest, list(dict.fromkeys(eval_names))) if eval_names else {}

  # ---- compilation (timed apart from the steps; the training step compiled above)
  note_step[0], logger_ref[0] = start, logger
  compile_s = {"the training step": step_compile_s.get(accum, 0.0)}
  compile_s.update(watchdog.compile_all(
      wd, log, [("the held-out evaluation", lambda: eval_jit.lower(state, jax.ShapeDtypeStruct(
          eval_stack.shape, jnp.int32, sharding=eval_shard)).compile())]
      if eval_stack is not None else []))
  logger.write(start, {"compile_s": sum(compile_s.values()),
                       **{f"compile_s/{k}": v for k, v in compile_s.items()}})

  def run_eval(step):
    out = {}
    if eval_stack is None:
      return out
    wd.begin("eval", f"the held-out evaluation at step {step}")
    with sharding.use_mesh(mesh):
      vals = np.asarray(jax.device_get(eval_jit(state, distributed.from_host(eval_stack,
                                                                             eval_shard))))
    wd.end()
    for dom in dict.fromkeys(eval_names):
      out[f"val/{dom}"] = float(np.mean([v for n, v in zip(eval_names, vals) if n == dom]))
    if out:
      out["val/mean"] = float(np.mean(list(out.values())))
      out["val/mix"] = float(sum(hw[d] * out[f"val/{d}"] for d in hw))
      logger.write(step, out)
    return out

  def save(step, meta):
    if checkpointing:
      wd.begin("save", f"the checkpoint save at step {step}")
      ck.save(step, state, distributed.gather_loader_state(loader.get_state()), cfg_json, meta,
              frozen_version=frozen_version)
      wd.end()

  history, first_eval, last_eval = [], None, None
  if eval_stack is not None and start == 0:
    first_eval = run_eval(0)
    log(f"held-out loss at step 0: {first_eval['val/mix']:.4f} (training-mixture weighted; "
        f"plain mean over {len(hw)} domains {first_eval['val/mean']:.4f})")
  end = steps_total if stop_after <= 0 else min(steps_total, start + stop_after)
  bar = None
  if progress:
    bar = tqdm(total=steps_total, initial=start, dynamic_ncols=True, file=sys.stderr)
  stopped = None
  step = start
  thr.reset()
  try:
    for step in range(start, end):
      note_step[0] = step + 1
      wd.begin("step", f"step {step + 1}")
      batch = next(loader)
      if step == debug_hang_step:        # fault injection for the watchdog test: never returns
        watchdog.hang_forever(wd)
      if step == debug_poison_step:      # fault injection for the NaN-stop test
        state["params"]["head"]["w"] = state["params"]["head"]["w"] * jnp.nan
      extra = ()
      if hot is not None:
        hot.poll(step)
        extra = (hot.ctl(),)
      with sharding.use_mesh(mesh):
        ids = distributed.global_batch(batch_shard, batch["ids"], batch_shape)
        state, m = step_jit(state, {"ids": ids}, *extra)
      m = jax.device_get(m)
      wd.end()
      rec = {k: float(v) for k, v in m.items() if k != "finite"}
      if not bool(m["finite"]):
        stopped = (f"non-finite loss at step {step + 1} (loss={rec['loss']}, grad_norm="
                   f"{rec['grad_norm']}); stopping without applying it. Last good checkpoint: "
                   f"{ck.last_good()}.")
        logger.write(step + 1, {**rec, "stopped": stopped})
        break
      rec["lr"] = float(sched(step))
      if flush_on:
        state, flushed = _maybe_flush(state, cfg, step + 1, tx, state_shard, tqp_lib, rec)
        if flushed:           # requantized bases: a new frozen version, stored at the next save
          frozen_version = step + 1
      rec.update(thr.tick(tps))
      rec["tokens"] = (step + 1) * tps
      history.append((step + 1, rec["loss"]))
      logger.write(step + 1, rec)
      if bar is not None:
        bar.update(1)
        bar.set_postfix(loss=f"{rec['loss']:.3f}", tok_s=f"{rec['tokens_per_s']:.0f}",
                        mfu=f"{rec['mfu']:.2%}" if rec["mfu"] == rec["mfu"] else "n/a")
      elif (step + 1) % cfg.train.log_every == 0:
        log(f"step {step + 1}: loss {rec['loss']:.4f} lr {rec['lr']:.3g} "
            f"{rec['tokens_per_s']:.0f} tok/s")
      done = step + 1
      if eval_stack is not None and done % cfg.train.eval_every == 0 and done < end:
        last_eval = run_eval(done)
        thr.reset()
      if checkpointing and ck.due(done) and done < end:
        save(done, {"loss": rec["loss"], "lr": rec["lr"], "tokens": rec["tokens"]})
        thr.reset()
  except BaseException:
    wd.close()
    raise
  finally:
    if bar is not None:
      bar.close()
  if stopped is not None:
    wd.close()
    ck.close()
    logger.close()
    raise TrainingStopped(stopped)
  final = int(jax.device_get(state["step"]))
  if eval_stack is not None and final > start:
    last_eval = run_eval(final)
  if checkpointing and final > start and (not ck.steps() or ck.steps()[-1] != final):
    save(final, {"loss": history[-1][1] if history else None, "tokens": final * tps,
                 "lr": history and float(sched(final - 1))})
  ck.close()
  wd.close()
  summary = {"final_step": final, "steps_total": steps_total, "wall_s": time.perf_counter() - t_start,
             "compile_s": compile_s,
             "losses": history,
             "heldout_start": first_eval.get("val/mix") if first_eval else None,
             "heldout_end": last_eval.get("val/mix") if last_eval else None,
             "heldout_mean_start": first_eval.get("val/mean") if first_eval else None,
             "heldout_mean_end": last_eval.get("val/mean") if last_eval else None,
             "heldout_end_by_domain": last_eval}
  mem = device_peak_memory(distributed.local_devices(mesh.devices.flat))
  if mem is not None:
    summary.update(mem)
    log(f"peak device memory (peak_bytes_in_use): max {mem['peak_bytes_in_use_max'] / 1e9:.2f} GB; "
        f"per device {[round(b / 1e9, 2) for b in mem['peak_bytes_in_use']]} GB")
  logger.write(final, {"summary": {k: v for k, v in summary.items() if k != "losses"}})
  logger.close()
  rundir.release(workdir)
  return summary


def device_peak_memory(devices) -> dict | None:
  """{"peak_bytes_in_use": [per device], "peak_bytes_in_use_max", "bytes_limit"} from each
  device's memory_stats() (the allocator's peak since the process started: init or restore,
  every step, checkpoint copies); None where the backend keeps no statistics (CPU)."""
  peaks, limits = [], []
  for d in devices:
    try:
      st = d.memory_stats()
    except Exception:       # backends without allocator statistics
      st = None
    if not st or "peak_bytes_in_use" not in st:
      return None
    peaks.append(int(st["peak_bytes_in_use"]))
    limits.append(int(st.get("bytes_limit", 0)))
  if not peaks:
    return None
  return {"peak_bytes_in_use": peaks, "peak_bytes_in_use_max": max(peaks), "bytes_limit": limits}


def _maybe_flush(state, cfg, step, tx, state_shard, tqp_lib, rec):
  """tqp.maybe_flush after optimizer step `step` (outside jit); the results are put back on
  the state's shardings so the next call of the jitted step takes them as they are. Returns
  (state, whether it flushed)."""
  params, frozen, opt_state, fstats = tqp_lib.maybe_flush(state["params"], state["frozen"], cfg,
                                                          step, tx, state["opt_state"])
  if fstats is None:
    return state, False
  rec["tqp_flush_ab_norm"] = float(fstats["ab_norm"])
  rec["tqp_flush_changed_frac"] = float(fstats["changed_frac"])
  new = {"params": params, "frozen": frozen, "opt_state": opt_state}
  new = jax.device_put(new, {k: state_shard[k] for k in new})
  return {**state, **new}, True


__all__ = ["TrainingStopped", "device_peak_memory", "train"]
