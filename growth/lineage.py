"""The tiny lineage in one command (docs/cookbook.md lists the same steps as separate commands):

  python -m growth.lineage --workdir=runs/lineage --steps=20 [--set=train.seq_len=64 ...]

train configs/tiny.py -> dense_to_moe -> train configs/tiny_moe.py -> depth_map -> train
configs/tiny_deep.py -> expand_experts -> to_tqp -> train configs/tiny_120b.py. Each stage's run
directory is written by the growth step (checkpoints/0: grown weights, fresh optimizer, step 0) and
launch.train starts from it. The same `--set section.field=value` overrides go to every stage
(they must keep the lineage consistent: e.g. model widths apply to every stage). All stages use
the dense run's prepared data. Writes <workdir>/lineage.json: per stage the training losses,
and per growth step the held-out loss of the source and of the grown model on the same batch.
"""
from __future__ import annotations

import json
import math
import pathlib
import sys
import time

from absl import app, flags, logging as absl_logging

from lightning_jax import checkpoint as ck, run_checks
from lightning_jax.config import ConfigError, load_config
from lightning_jax.growth import driver
from lightning_jax.growth.common import GrowthError
from lightning_jax.run import loop

REPO = pathlib.Path(__file__).resolve().parents[1]
STAGES = ("tiny", "tiny_moe", "tiny_deep", "tiny_120b")
GROWTH = (("dense_to_moe", "tiny_moe", "dense", "moe", {"strategy": "partition", "seed": 0}),
          ("depth_map", "tiny_deep", "moe", "deep", {"mapping": "0,1,2,3,0,1,2,3"}),
          ("expand_experts", "tiny_120b", "deep", "big_bf16",
           {"ratio": 0.5, "router_sigma": 0.05, "seed": 1337}),
          ("to_tqp", "tiny_120b", "big_bf16", "big", {}))
TRAIN_AFTER = {"dense_to_moe", "depth_map", "to_tqp"}


def _parse_value(old, text: str):
  if isinstance(old, bool):
    if text.lower() not in ("true", "false", "1", "0"):
      raise ValueError(f"--set value {text!r} for a boolean field; expected true or false.")
    return text.lower() in ("true", "1")
  return type(old)(text) if old is not None else text


def stage_config(name: str, steps: int, data_path: str, overrides: list[str]):
  c = load_config(str(REPO / "configs" / f"{name}.py"))
  c.data.path = data_path
  c.train.steps = int(steps)
  c.checkpoint.async_save = False
  for kv in overrides:
    if "=" not in kv:
      raise ConfigError(f"--set {kv!r}; expected section.field=value.")
    key, val = kv.split("=", 1)
    node, parts = c, key.split(".")
    for p in parts[:-1]:
      node = node[p]
    node[parts[-1]] = _parse_value(node[parts[-1]], val)
  if c.moe.enabled and name != "tiny":     # the shared expert is the dense FFN (dense_to_moe)
    c.moe.shared_width = c.model.ffn_width
  return c


def run_lineage(workdir, steps: int = 20, overrides: list[str] = (), log=print) -> dict:
  t0 = time.perf_counter()
  root = pathlib.Path(workdir)
  runs = {k: root / k for k in ("dense", "moe", "deep", "big_bf16", "big")}
  record = {"steps_per_stage": steps, "overrides": list(overrides), "stages": []}

  def train(name, run, data):
    t = time.perf_counter()
    s = loop.train(stage_config(name, steps, data, overrides), run, progress=False, log=log)
    losses = [l for _, l in s["losses"]]
    rec = {"stage": name, "run": str(run), "final_step": s["final_step"], "train_losses": losses,
           "heldout_start": s.get("heldout_start"), "heldout_end": s.get("heldout_end"),
           "seconds": round(time.perf_counter() - t, 1)}
    record["stages"].append(rec)
    log(f"[lineage] trained {name}: losses {[round(l, 4) for l in losses]}")
    return rec

  train("tiny", runs["dense"], "")
  data = str(runs["dense"] / "data")
  for transform, name, src, dst, args in GROWTH:
    t = time.perf_counter()
    out = driver.grow(transform, str(runs[src]), str(runs[dst]),
                   stage_config(name, steps, data, overrides), args, log=log)
    r = out["report"]
    record["stages"].append({"growth": transform, "args": args, "src": str(runs[src]),
                             "dst": str(runs[dst]), "source_loss": r["source_loss"],
                             "grown_loss": r["grown_loss"],
                             "router_load_at_init": r.get("router_load_at_init"),
                             "seconds": round(time.perf_counter() - t, 1)})
    if transform in TRAIN_AFTER:
      train(name, runs[dst], data)
  record["seconds"] = round(time.perf_counter() - t0, 1)
  (root / "lineage.json").write_text(json.dumps(record, indent=1))
  return record


def define_flags():
  flags.DEFINE_string("workdir", None, "Root directory: one run directory per stage below it, and "
                      "lineage.json.")
  flags.DEFINE_integer("steps", 20, "Training steps per stage.")
  flags.DEFINE_multi_string("set", [], "section.field=value applied to every stage config "
                            "(repeatable).")
  flags.mark_flag_as_required("workdir")


def main(argv):
  a = flags.FLAGS
  if len(argv) > 1:
    print(f"error: unexpected arguments {argv[1:]}; flags look like --workdir=DIR --steps=N.",
          file=sys.stderr)
    return 2
  try:
    # as launch.train: JAX's compilation cache per train.compile_cache (the dense stage's config;
    # a later lineage, and each growth's evaluation of a model the previous stage compiled,
    # load their programs instead of compiling them again)
    run_checks.enable_compile_cache(stage_config(STAGES[0], a.steps, "", a.set), a.workdir)
    rec = run_lineage(a.workdir, a.steps, a.set)
  except (GrowthError, ConfigError, ck.CheckpointError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print("\nlineage summary:")
  for s in rec["stages"]:
    if "growth" in s:
      print(f"  {s['growth']:<15} held-out loss source {s['source_loss']:.4f} -> grown "
            f"{s['grown_loss']:.4f}")
    else:
      l = s["train_losses"]
      print(f"  train {s['stage']:<9} {len(l)} steps: loss {l[0]:.4f} -> {l[-1]:.4f}")
  print(f"  total {rec['seconds']:.0f}s; {pathlib.Path(a.workdir) / 'lineage.json'}")
  bad = [s for s in rec["stages"] if "train_losses" in s and not all(map(math.isfinite, s["train_losses"]))]
  return 1 if bad else 0


if __name__ == "__main__":
  absl_logging.set_verbosity(absl_logging.ERROR)
  define_flags()
  app.run(lambda argv: sys.exit(main(argv)))
