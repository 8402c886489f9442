"""The README's main job as a results record (benchmarks/results/tiny_main_job.json):

  python -m launch.train --config=configs/tiny.py --workdir=RUN --no_progress
  python -m benchmarks.tiny_main_job RUN [--json=benchmarks/results/tiny_main_job.json]

Reads RUN/metrics.jsonl (held-out CE_next per domain at step 0 and at the last evaluation, the
mixture-weighted and plain means, wall time), RUN/run_info.jsonl (commit and resolved config of
the last launch) and replays the data loader's row allocation for the run's steps (data only, no
model) to count the training tokens each domain supplied. launch.docs_numbers turns the record
into the per-domain table of docs/PERFORMANCE.md and the README's sentence about it.
"""
from __future__ import annotations

import collections
import json
import os
import pathlib
import platform
import sys
import time

if __name__ == "__main__":      # reads a run directory: no accelerator, before jax is imported
  os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import app, flags  # noqa: E402

from lightning_jax import metrics  # noqa: E402
from lightning_jax.config import from_stored  # noqa: E402
from lightning_jax.data import pools, shards  # noqa: E402

flags.DEFINE_string("json", "", "Write the record to this file (default: print it).")
flags.DEFINE_string("device", "", "Where the run ran, in words (default: this host's CPU).")
FLAGS = flags.FLAGS


def tokens_by_domain(cfg, data_dir, steps: int) -> dict:
  """Training tokens each domain supplied in `steps` steps of a fresh run (one process): the rows
  the mixture gives each pool, read along that pool's stream of shards."""
  man = shards.load_manifest(data_dir)
  domain_of = {str(pathlib.Path(data_dir) / e["file"]): e["domain"] for e in man["shards"]}
  loader = pools.mixture_loader(cfg, data_dir, man, rank=0, num_ranks=1)
  rows = collections.Counter()
  for _ in range(steps):
    rows.update(loader.pool_names[int(i)] for i in next(loader)["pool"])
  seen = collections.Counter()
  for name, n in rows.items():
    stream = loader.streams[name]
    for pos in range(n * cfg.train.seq_len):
      _, i, _ = stream.locate(pos)
      seen[domain_of.get(str(pathlib.Path(stream.shards[i].path)), "?")] += 1
  return dict(seen)


def record(run_dir, device: str = "") -> dict:
  run = pathlib.Path(run_dir)
  recs = [r for r in metrics.read_jsonl(run / "metrics.jsonl") if "step" in r]
  evals = [r for r in recs if "val/mix" in r]
  if len(evals) < 2:
    raise ValueError(f"{run}/metrics.jsonl has {len(evals)} held-out evaluations; expected the "
                     f"step-0 one and a later one (a finished launch.train run).")
  first, last = evals[0], evals[-1]
  info = [json.loads(l) for l in (run / "run_info.jsonl").read_text().splitlines() if l.strip()]
  cfg = from_stored(info[-1]["config"])
  summary = [r["summary"] for r in recs if "summary" in r]
  doms = [k[4:] for k in first if k.startswith("val/") and k not in ("val/mix", "val/mean")]
  pool_doms = {p: [d.strip() for d in spec["domains"].split(",") if d.strip()]
               for p, spec in cfg.data.pools.items() if spec["weight"] > 0}
  return {
      "what": "the README's main job: python -m launch.train --config=configs/tiny.py",
      "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(info[-1]["time"])),
      "commit": info[-1]["commit"],
      "device": device or f"CPU ({platform.machine()}, {metrics.cpu_cores()} cores in use)",
      "steps": last["step"],
      "wall_s": round(summary[-1]["wall_s"], 1) if summary else None,
      "heldout_mix": [first["val/mix"], last["val/mix"]],
      "heldout_mean": [first["val/mean"], last["val/mean"]],
      "heldout_start": {d: first[f"val/{d}"] for d in doms},
      "heldout_end": {d: last[f"val/{d}"] for d in doms},
      "pools": pool_doms,
      "train_tokens_by_domain": tokens_by_domain(cfg, str(run / "data"), last["step"]),
  }


def main(argv):
  if len(argv) != 2:
    print("usage: python -m benchmarks.tiny_main_job RUN [--json=FILE]", file=sys.stderr)
    return 2
  try:
    rec = record(argv[1], FLAGS.device)
  except (OSError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  text = json.dumps(rec, indent=1) + "\n"
  if FLAGS.json:
    pathlib.Path(FLAGS.json).write_text(text)
    print(f"wrote {FLAGS.json}")
  else:
    print(text, end="")
  return 0


if __name__ == "__main__":
  app.run(lambda argv: sys.exit(main(argv)))
