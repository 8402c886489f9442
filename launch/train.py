"""Train LightningLM: `python -m launch.train --config=configs/tiny.py [--config.optim.peak_lr=3e-3]`.

Flags: --config (ml_collections config file; any field overrides as --config.section.field=...),
--workdir (run directory; default runs/<stage>), --fallback_to_previous (resume from the newest
READABLE checkpoint when the newest one is torn; otherwise that is an error), --stop_after
(stop, with a checkpoint, after this many steps of this invocation: the schedule still spans the
whole budget), --no_progress; several processes (one per host, lightning_jax/distributed.py):
--coordinator_address, --num_processes, --process_id (or JAX_* / SLURM / torchrun variables),
--distributed_timeout_s, --heartbeat_timeout_s (docs/cookbook.md, "Beyond one node").

Restarting the same command in the same run directory resumes from the newest complete
checkpoint: parameters, optimizer state, running statistics, step and the data loader's position.
The loop itself is the library's (lightning_jax/run/loop.py: the step, sharding, resume and
what happens between steps); this module is its command line.

Run directory: checkpoints/<step>/ (+ checkpoints/frozen/<version>/: the frozen buffers, written
once per version, see lightning_jax/checkpoint.py), metrics.jsonl, tb/ (TensorBoard), data/ (shards prepared
from data.build_from when data.path is empty), plots/ (launch.plot).

"""
from __future__ import annotations

import sys

from absl import app, flags, logging as absl_logging
from ml_collections import config_flags

from lightning_jax import checkpoint as ckpt_lib
from lightning_jax import distributed, run_checks, watchdog
from lightning_jax.config import ConfigError, resolve_config_argv
from lightning_jax.data import shards
from lightning_jax.run.loop import TrainingStopped, device_peak_memory, train
from lightning_jax.run_checks import check_overrides

__all__ = ["TrainingStopped", "device_peak_memory", "main", "train"]


# ----------------------------------------------------------------------------- CLI
def main(argv):
  FLAGS = flags.FLAGS
  if len(argv) > 1:
    print(f"error: unexpected arguments {argv[1:]}; flags look like --config=configs/tiny.py.",
          file=sys.stderr)
    return 2
  cfg = FLAGS.config
  workdir = FLAGS.workdir or f"runs/{cfg.stage}"
  try:
    launch = distributed.from_environment(FLAGS.coordinator_address, FLAGS.num_processes,
                                          FLAGS.process_id)
    if launch is not None:       # one process per host (lightning_jax/distributed.py)
      distributed.initialize(launch, FLAGS.distributed_timeout_s, FLAGS.heartbeat_timeout_s)
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  many = launch is not None
  try:
    stage_cfg = run_checks.stage_config(FLAGS["config"])
    run_checks.enable_compile_cache(cfg, workdir, log=print if not many or
                                    launch.process_id == 0 else (lambda *_: None))
    s = train(cfg, workdir, fallback_to_previous=FLAGS.fallback_to_previous,
              stop_after=FLAGS.stop_after, progress=not FLAGS.no_progress,
              debug_poison_step=FLAGS.debug_poison_step,
              checkpointing=not FLAGS.no_checkpoint, stage_cfg=stage_cfg,
              debug_hang_step=FLAGS.debug_hang_step,
              on_hang=(lambda msg: distributed.fail(msg, watchdog.EXIT_CODE)) if many else None)
  except (ConfigError, shards.DataError, ckpt_lib.CheckpointError, TrainingStopped) as e:
    if many:                     # every other process stops too, naming this one
      distributed.fail(str(e))
    print(f"error: {e}", file=sys.stderr)
    return 1
  except Exception as e:
    if many:
      distributed.fail(f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}")
    raise
  if not distributed.is_primary():
    return 0
  hs, he = s["heldout_start"], s["heldout_end"]
  print(f"done: step {s['final_step']}/{s['steps_total']} in {s['wall_s']:.1f}s; "
        f"final loss {s['losses'][-1][1]:.4f}" if s["losses"] else
        f"done: step {s['final_step']}/{s['steps_total']} (nothing to do)")
  if hs is not None and he is not None:
    print(f"held-out loss (weighted like the training mixture): {hs:.4f} at step 0 -> {he:.4f} "
          f"at step {s['final_step']}; plain mean over domains {s['heldout_mean_start']:.4f} -> "
          f"{s['heldout_mean_end']:.4f}; per domain: " + ", ".join(
              f"{k[4:]} {v:.2f}" for k, v in (s["heldout_end_by_domain"] or {}).items()
              if k not in ("val/mean", "val/mix")))
  elif he is not None:
    print(f"held-out loss (weighted like the training mixture) at step {s['final_step']}: "
          f"{he:.4f}")
  return 0


def _define_flags():
  config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/tiny.py.",
                                  lock_config=True)
  flags.DEFINE_string("workdir", "", "Run directory (default runs/<stage>).")
  flags.DEFINE_bool("fallback_to_previous", False, "If the newest checkpoint is unreadable, "
                    "resume from the newest readable one instead of stopping with an error.")
  flags.DEFINE_integer("stop_after", 0, "Stop (with a checkpoint) after this many steps of this "
                       "invocation; 0 = run to the end of the budget.")
  flags.DEFINE_bool("no_progress", False, "No progress bar (log lines every train.log_every).")
  flags.DEFINE_bool("no_checkpoint", False, "Neither restore nor save checkpoints (benchmarks).")
  flags.DEFINE_integer("debug_poison_step", -1, "Fault injection: make the parameters NaN "
                       "before this step (tests the non-finite stop).")
  flags.DEFINE_integer("debug_hang_step", -1, "Fault injection: block forever in this step "
                       "(tests the watchdog).")
  # multi-process runs (lightning_jax/distributed.py; also from JAX_*, SLURM or torchrun variables)
  flags.DEFINE_string("coordinator_address", "", "host:port of process 0's coordination service "
                      "(multi-process runs; default: from the environment).")
  flags.DEFINE_integer("num_processes", 0, "Number of processes (one per host); 0: from the "
                       "environment, else 1.")
  flags.DEFINE_integer("process_id", -1, "This process's id in [0, num_processes).")
  flags.DEFINE_integer("distributed_timeout_s", 300, "Seconds to wait for the coordinator and "
                       "the other processes at start.")
  flags.DEFINE_integer("heartbeat_timeout_s", 100, "Seconds without a heartbeat after which "
                       "JAX's coordination service declares a process dead and stops the others.")
  flags.mark_flag_as_required("config")


if __name__ == "__main__":
  absl_logging.set_verbosity(absl_logging.WARNING)   # orbax logs every save at INFO
  sys.argv = resolve_config_argv(sys.argv)   # --config=configs/x.py from outside the repo root
  try:
    check_overrides(sys.argv)
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  _define_flags()
  app.run(lambda argv: sys.exit(main(argv)))
