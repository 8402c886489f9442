"""Exponential moving average of a run's parameters over its last N checkpoints (SPEC §5: the 9B
final weights are the EMA (0.2) over the last 6 checkpoints of the last phase).

  python -m launch.ema RUN --alpha 0.2 --last 6 --dst RUN_EMA
  python -m launch.inspect RUN_EMA                               # provenance: steps, alpha
  python -m growth.expand_experts --src RUN_EMA --dst ... --config=configs/stage_120b.py ...

Weights: the checkpoints are taken oldest to newest, x_1 .. x_N, and
    ema_1 = x_1,   ema_k = alpha * x_k + (1 - alpha) * ema_(k-1),
so alpha is the weight of each newer checkpoint; with alpha 0.2 and N 6 the weights, newest
first, are 0.2, 0.16, 0.128, 0.1024, 0.08192 and 0.32768 (oldest): all six checkpoints count,
which is how the reference's schedule describes it ("EMA alpha=0.2 over the last 6 checkpoints,
saved every 500 steps, covers the last ~3,000 steps"; configs/lr_schedule_8b_growth.yaml). The
reference has no code for this step; the formula above is the standard EMA with alpha as the
smoothing factor. Only `params` are averaged (float32 on the host, numpy); frozen buffers and
running stats are the newest checkpoint's.

Checkpoints are read with orbax, one step at a time, params only. The run must hold at least N
checkpoints: launch.train keeps checkpoint.keep of them (3 by default), so for the 9B p4 run set
--config.checkpoint.keep=6 (or more) and checkpoint.every_steps=500 as the reference did.

Output: RUN_EMA/checkpoints/0 in launch.train's format (lightning_jax.run.checkpoints.write_grown): the EMA params,
the newest checkpoint's frozen/stats/config/loader record, fresh optimizer state and step 0; its
meta.provenance names the source run, the averaged steps and alpha. It is a weights artifact for
evaluation and as the --src of the next growth step, not a point to resume the phase from.
"""
from __future__ import annotations

import json
import pathlib
import sys

import jax
import numpy as np
from absl import app, flags, logging as absl_logging

from lightning_jax import checkpoint as ck
from lightning_jax.config import ConfigError
from lightning_jax.run import checkpoints as run_ckpt


def ema_weights(n: int, alpha: float) -> list[float]:
  """Weight of each of n checkpoints, oldest first, in the EMA above (they sum to 1)."""
  w = [(1.0 - alpha) ** (n - 1)] + [alpha * (1.0 - alpha) ** (n - 1 - k) for k in range(1, n)]
  return w


def ema(run: str, dst: str, alpha: float = 0.2, last: int = 6, log=print) -> dict:
  """Write DST/checkpoints/0 with the EMA of RUN's last `last` checkpoints' params."""
  if not 0.0 < alpha <= 1.0:
    raise ConfigError(f"--alpha={alpha} must be in (0, 1] (the weight of each newer checkpoint).")
  if last < 1:
    raise ConfigError(f"--last={last} must be at least 1 checkpoint.")
  dst = pathlib.Path(dst)
  if (dst / "checkpoints").exists() and any(p.name.isdigit() for p in (dst / "checkpoints").iterdir()):
    raise ck.CheckpointError(f"--dst {dst} already holds checkpoints; expected a new run directory "
                             f"for the averaged weights.")
  cdir, upto = run_ckpt.locate(run)
  c = ck.Checkpointer(cdir, ck.config_ns(keep=0), read_only=True)
  try:
    steps = c.steps()
    if upto is not None:
      steps = [s for s in steps if s <= upto]
    if len(steps) < last:
      raise ck.CheckpointError(
          f"{cdir} holds {len(steps)} checkpoint(s) (steps {steps}) but --last={last} were asked "
          f"for; keep more with --config.checkpoint.keep={last} while training, or pass "
          f"--last={len(steps)}.")
    use = steps[-last:]
    md = c.state_metadata(use[-1])
    abstract_params = dict(md)["params"]
    loader_state = c.read_json(use[-1], "loader")
  finally:
    c.close()

  newest = run_ckpt.read_source(str(cdir / str(use[-1])), log)      # frozen, stats, config, meta
  weights = ema_weights(len(use), alpha)
  acc = None
  for s, w in zip(use, weights):
    p = run_ckpt.read_params(cdir / str(s), abstract_params)
    if acc is None:
      acc = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32) * np.float32(w), p)
    else:
      acc = jax.tree_util.tree_map(lambda a, x: a + np.asarray(x, np.float32) * np.float32(w),
                                   acc, p)
    log(f"  step {s}: weight {w:.5f}")
  ref = newest["variables"]["params"]
  params = jax.tree_util.tree_map(lambda a, r: a.astype(r.dtype), acc, ref)
  variables = dict(newest["variables"], params=params)
  cfg = newest["cfg"]
  meta = {"provenance": run_ckpt.jsonable({
      "source_path": str(pathlib.Path(cdir).absolute()), "source_step": use[-1],
      "source_stage": cfg.get("stage"), "source_phase": cfg.get("phase"), "transform": "ema",
      "ema": {"alpha": alpha, "steps": use, "weights": weights,
              "formula": "ema_1 = x_oldest; ema_k = alpha * x_k + (1 - alpha) * ema_(k-1)"}}),
      "loss": None, "tokens": 0}
  dst.mkdir(parents=True, exist_ok=True)
  run_ckpt.write_grown(dst, cfg, variables, None, None, meta, log, loader_state=loader_state)
  log(f"EMA (alpha {alpha}) of params over steps {use} of {cdir} -> {dst / 'checkpoints' / '0'}")
  return {"meta": meta, "steps": use, "weights": weights, "dst": str(dst)}


def main(argv):
  F = flags.FLAGS
  if len(argv) != 2:
    print("error: expected one run directory, e.g. python -m launch.ema runs/9b_p4 --alpha 0.2 "
          "--last 6 --dst runs/9b_ema.", file=sys.stderr)
    return 2
  try:
    out = ema(argv[1], F.dst, alpha=F.alpha, last=F.last)
  except (ConfigError, ck.CheckpointError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(json.dumps(out["meta"]["provenance"]))
  return 0


if __name__ == "__main__":
  flags.DEFINE_float("alpha", 0.2, "Weight of each newer checkpoint: ema = alpha * x + "
                     "(1 - alpha) * ema, oldest to newest.")
  flags.DEFINE_integer("last", 6, "Number of newest checkpoints averaged.")
  flags.DEFINE_string("dst", None, "New run directory for the averaged weights.")
  flags.mark_flag_as_required("dst")
  absl_logging.set_verbosity(absl_logging.ERROR)
  app.run(lambda argv: sys.exit(main(argv)))
