"""A run's growth history: <run>/growth_history.json, the chain of growth steps that made it.

Every run written by lightning_jax.run.checkpoints.write_grown (the growth CLIs, growth.init, growth.next_phase,
launch.ema) gets the file: the source run's history (read from the source's run directory, when
it has one) plus one entry for this step: the new run, its stage, the transform and its
arguments, the source checkpoint, step and stage, and, for a growth transform, the held-out loss
of the source and of the grown model on the same batch. The checkpoint's own meta record holds
the same provenance, but only in checkpoints/0, which checkpoint retention deletes once the run
trains on; this file stays, so `python -m launch.inspect RUN` shows the lineage after training.
"""
from __future__ import annotations

import json
import os
import pathlib
import time

FILE = "growth_history.json"
# entry keys the one-line format shows itself; the others (args, phase, ema, ...) follow as JSON
SHOWN = ("run", "stage", "time", "transform", "source_path", "source_step", "source_stage",
         "heldout", "seed")


def run_of(path) -> pathlib.Path | None:
  """The run directory of <run>/checkpoints/<step> or <run>/checkpoints, else None."""
  p = pathlib.Path(path)
  if p.name == "checkpoints":
    return p.parent
  return p.parent.parent if p.parent.name == "checkpoints" else None


def read(run_dir) -> list[dict]:
  """The run's history ([] when it has none: a run trained from scratch, or an older run)."""
  p = pathlib.Path(run_dir) / FILE
  if not p.exists():
    return []
  try:
    h = json.loads(p.read_text())
  except json.JSONDecodeError:
    return []
  return h if isinstance(h, list) else []


def record(dst, meta: dict, stage) -> list[dict]:
  """Write dst/growth_history.json: the source run's history plus this step (from the meta
  record write_grown saves). Atomic (a temporary file renamed over it). Returns the history."""
  dst = pathlib.Path(dst)
  prov = meta.get("provenance") or {}
  src_run = run_of(prov["source_path"]) if prov.get("source_path") else None
  entry = {"run": str(dst.absolute()), "stage": stage,
           "time": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
           **prov}
  rep = meta.get("growth_report") or {}
  if "source_loss" in rep:
    entry["heldout"] = {"source": rep["source_loss"], "grown": rep["grown_loss"],
                        "domain": rep.get("heldout_domain")}
  history = (read(src_run) if src_run is not None else []) + [entry]
  dst.mkdir(parents=True, exist_ok=True)
  tmp = dst / (FILE + ".tmp")
  tmp.write_text(json.dumps(history, indent=1) + "\n")
  os.replace(tmp, dst / FILE)
  return history


def format_lines(history: list[dict]) -> list[str]:
  """One line per step, oldest first."""
  out = []
  for i, e in enumerate(history, 1):
    src = (f"from {e['source_path']} (stage {e.get('source_stage')!r}, step "
           f"{e.get('source_step')})" if e.get("source_path") else "from scratch")
    line = f"  {i}. {e.get('transform')} -> stage {e.get('stage')!r} in {e.get('run')}, {src}"
    extra = {k: v for k, v in e.items() if k not in SHOWN and v not in (None, {}, [])}
    if extra:
      line += f"; {json.dumps(extra, sort_keys=True)}"
    if e.get("heldout"):
      h = e["heldout"]
      line += f"; held-out loss {h['source']:.4f} -> {h['grown']:.4f}"
    out.append(line)
  return out
