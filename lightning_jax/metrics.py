"""Throughput, MFU and logging sinks (JSONL, TensorBoard, optional Weights & Biases), plus the
PNG curves of launch.plot.

Sinks: run_dir/metrics.jsonl keeps the plain record keys (`loss`, `val/en`, `mfu`, ...; launch.plot
and the tests read those). TensorBoard (run_dir/tb) and W&B get the same scalars under namespaced
tags (`tb_tag`): `val/...` as written, throughput and compile times under `perf/`, everything else
under `train/`. Each launch of a run appends one line to run_dir/run_info.jsonl (time, start step,
git commit, the resolved config) and writes the same as TensorBoard text (`run/commit`,
`run/config`). W&B is on when train.wandb_project names a project (`pip install wandb`).

MFU = achieved model FLOP/s / peak FLOP/s of the devices in use. Model FLOPs per token come
from the model's own count (lightning_jax.counting.flops_per_token, forward + backward); the
peak is looked up in PEAK_FLOPS below by device kind and compute dtype (dense, no sparsity).
CPUs have no published peak: we assume a nominal 32 FLOP/cycle (two 8-wide FP32 FMA units) at
2.5 GHz per core in use, so CPU MFU is only a rough relative figure.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import pathlib
import secrets
import subprocess
import time

import jax

from lightning_jax import counting
from lightning_jax.config import ConfigError

# device kind substring -> {compute dtype: dense peak FLOP/s per device}
PEAK_FLOPS = {
    "H200": {"bfloat16": 989e12, "float16": 989e12, "float32": 67e12},
    "H100": {"bfloat16": 989e12, "float16": 989e12, "float32": 67e12},   # SXM
    "A100": {"bfloat16": 312e12, "float16": 312e12, "float32": 19.5e12},
    "L4": {"bfloat16": 121e12, "float16": 121e12, "float32": 30e12},
    "TPU v5 lite": {"bfloat16": 197e12, "float32": 197e12},
    "TPU v4": {"bfloat16": 275e12, "float32": 275e12},
}
CPU_FLOPS_PER_CORE = 32 * 2.5e9


def cpu_cores() -> int:
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:
    return os.cpu_count() or 1


def peak_flops(devices=None, dtype: str = "bfloat16") -> tuple[float, str]:
  """(total peak FLOP/s of `devices`, a sentence saying where the number comes from)."""
  devices = list(devices if devices is not None else jax.devices())
  d = devices[0]
  if d.platform == "cpu":
    n = cpu_cores()
    return (n * CPU_FLOPS_PER_CORE,
            f"peak = nominal CPU {n} cores x 32 FLOP/cycle x 2.5 GHz = "
            f"{n * CPU_FLOPS_PER_CORE / 1e9:.0f} GFLOP/s (assumed; CPU MFU is only indicative)")
  kind = getattr(d, "device_kind", str(d))
  for key, table in PEAK_FLOPS.items():
    if key.lower() in kind.lower():
      per = table.get(dtype, table.get("bfloat16"))
      return (per * len(devices),
              f"peak = {len(devices)} x {kind} {dtype} dense {per / 1e12:.0f} TFLOP/s "
              f"(lightning_jax.metrics.PEAK_FLOPS)")
  return (float("nan"), f"peak unknown for device kind {kind!r}: MFU not reported")


def model_flops_per_token(cfg, abstract_params=None) -> tuple[float, str]:
  """(training FLOPs per token, where it comes from): the model's own count when available."""
  try:
    fn = counting.flops_per_token
  except (ImportError, AttributeError):
    fn = None
  if fn is not None:
    f = fn(cfg, cfg.train.seq_len)
    f = f["total"] if isinstance(f, dict) else f
    return float(f), "lightning_jax.counting.flops_per_token, fwd+bwd"
  n = sum(math.prod(l.shape) for l in jax.tree_util.tree_leaves(abstract_params))
  return 6.0 * n, "fallback 6 x stored parameters (counting.flops_per_token not available)"


class Throughput:
  """Tokens/s and MFU over the steps since the last call to `tick`."""

  def __init__(self, flops_per_token: float, peak: float):
    self.fpt, self.peak = float(flops_per_token), float(peak)
    self.t = time.perf_counter()

  def reset(self):
    self.t = time.perf_counter()

  def tick(self, tokens: int) -> dict:
    now = time.perf_counter()
    dt = max(now - self.t, 1e-9)
    self.t = now
    tps = tokens / dt
    mfu = tps * self.fpt / self.peak if self.peak == self.peak and self.peak > 0 else float("nan")
    return {"tokens_per_s": tps, "mfu": mfu, "step_time_s": dt}


# record keys logged under perf/ (the rest of a step's scalars go under train/)
PERF_KEYS = ("tokens_per_s", "mfu", "step_time_s", "compile_s")
NAMESPACES = ("train", "val", "perf")
REPO = pathlib.Path(__file__).resolve().parents[1]


def tb_tag(key: str) -> str:
  """The TensorBoard / W&B tag of a metrics record key: keys already under train/, val/ or perf/
  keep it; `tokens_per_s`, `mfu`, `step_time_s`, `compile_s` and `compile_s/<phase>` go under
  perf/; everything else (loss, ce_mtp, aux, grad_norm, lr, tokens, ...) under train/. Spaces
  become underscores (as TensorBoard would make them)."""
  key = key.replace(" ", "_")
  head = key.split("/", 1)[0]
  if head in NAMESPACES:
    return key
  return ("perf/" if head in PERF_KEYS else "train/") + key


def git_commit(repo=REPO) -> str:
  """The repository's HEAD commit, with "+dirty" when tracked files differ from it; "unknown"
  outside a git checkout (e.g. an installed wheel)."""
  try:
    run = lambda *a: subprocess.run(["git", "-C", str(repo), *a], capture_output=True, text=True,
                                    timeout=10)
    head = run("rev-parse", "HEAD")
    if head.returncode != 0:
      return "unknown"
    dirty = run("status", "--porcelain", "--untracked-files=no").stdout.strip()
    return head.stdout.strip() + ("+dirty" if dirty else "")
  except (OSError, subprocess.SubprocessError):
    return "unknown"


def check_config(cfg):
  """Refuse, before anything is compiled, a W&B project when the wandb package is missing."""
  project = cfg.train.wandb_project
  if project and importlib.util.find_spec("wandb") is None:
    raise ConfigError(f"train.wandb_project={project!r} asks for Weights & Biases logging, but "
                      f"the wandb package is not installed; expected `pip install wandb` (or "
                      f"'.[wandb]'), or an empty train.wandb_project.")


class Logger:
  """One record per call to JSONL (run_dir/metrics.jsonl), TensorBoard (run_dir/tb) and, when
  `wandb_project` is set, Weights & Biases.

  config: the resolved config (JSON-able dict) of this launch; with it, run_info.jsonl gets a
  line {time, step, commit, config} and TensorBoard the text summaries run/commit and run/config.
  """

  def __init__(self, run_dir, tensorboard: bool = True, config: dict | None = None,
               step: int = 0, wandb_project: str = ""):
    self.dir = pathlib.Path(run_dir)
    self.dir.mkdir(parents=True, exist_ok=True)
    self.f = open(self.dir / "metrics.jsonl", "a", buffering=1)
    self.tb = None
    if tensorboard:
      try:
        from tensorboardX import SummaryWriter
        self.tb = SummaryWriter(str(self.dir / "tb"))
      except ImportError:    # optional on machines without tensorboardX
        self.tb = None
    self.commit = git_commit()
    self.wandb = self._wandb(wandb_project, config) if wandb_project else None
    if config is not None:
      self.record_run(config, step)

  def _wandb(self, project: str, config):
    """A W&B run for this run directory: one id kept in run_dir/wandb_id, so a resumed run
    continues the same W&B run."""
    import wandb      # checked by check_config before anything was compiled
    id_file = self.dir / "wandb_id"
    if not id_file.exists():
      id_file.write_text(secrets.token_hex(8) + "\n")
    return wandb.init(project=project, name=self.dir.resolve().name, id=id_file.read_text().strip(),
                      resume="allow", dir=str(self.dir), config=config or {},
                      notes=f"commit {self.commit}")

  def record_run(self, config: dict, step: int):
    info = {"time": time.time(), "step": int(step), "commit": self.commit, "config": config}
    with open(self.dir / "run_info.jsonl", "a") as f:
      f.write(json.dumps(info, sort_keys=True) + "\n")
    if self.tb is not None:
      self.tb.add_text("run/commit", self.commit, step)
      # markdown: a code block keeps the JSON's indentation
      self.tb.add_text("run/config", "```\n" + json.dumps(config, indent=1, sort_keys=True)
                       + "\n```", step)

  def write(self, step: int, record: dict):
    rec = {"step": int(step), "time": time.time()}
    for k, v in record.items():
      rec[k] = _plain(v)
    self.f.write(json.dumps(rec) + "\n")
    scalars = {tb_tag(k): v for k, v in rec.items()
               if k not in ("step", "time") and isinstance(v, (int, float))
               and not isinstance(v, bool) and math.isfinite(v)}
    if self.tb is not None:
      for tag, v in scalars.items():
        self.tb.add_scalar(tag, v, step)
      if isinstance(rec.get("stopped"), str):
        self.tb.add_text("run/stopped", rec["stopped"], step)
    if self.wandb is not None and scalars:
      self.wandb.log(scalars, step=int(step))

  def note(self, text: str):
    self.f.write(json.dumps({"note": text, "time": time.time()}) + "\n")
    if self.tb is not None:
      self.tb.add_text("run/note", text)

  def close(self):
    self.f.close()
    if self.tb is not None:
      self.tb.close()
    if self.wandb is not None:
      self.wandb.finish()
      self.wandb = None


def _plain(v):
  if hasattr(v, "item"):
    v = v.item()
  if isinstance(v, float) and not math.isfinite(v):
    return str(v)
  return v


def read_jsonl(path) -> list[dict]:
  out = []
  with open(path) as f:
    for line in f:
      line = line.strip()
      if line:
        try:
          out.append(json.loads(line))
        except json.JSONDecodeError:
          continue      # a line cut by a kill
  return out


def plot_run(run_dir, out_dir=None) -> list[pathlib.Path]:
  """PNG curves from run_dir/metrics.jsonl: loss, held-out loss per domain, LR, throughput."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  run_dir = pathlib.Path(run_dir)
  mf = run_dir / "metrics.jsonl"
  if not mf.exists():
    raise FileNotFoundError(f"run directory {run_dir} has no metrics.jsonl; expected a directory "
                            f"written by launch.train --workdir.")
  recs = [r for r in read_jsonl(mf) if "step" in r]
  # a resumed run appends: keep the last record written for each (step, key)
  out_dir = pathlib.Path(out_dir) if out_dir else run_dir / "plots"
  out_dir.mkdir(parents=True, exist_ok=True)

  def series(key):
    pts = {}
    for r in recs:
      v = r.get(key)
      if isinstance(v, (int, float)):
        pts[r["step"]] = v
    ks = sorted(pts)
    return ks, [pts[k] for k in ks]

  written = []

  from matplotlib.ticker import FuncFormatter, MaxNLocator

  def panel(ax, keys, ylabel, logy=False, scale=1.0):
    """One axis of curves; True when it has data. Steps are whole numbers on the x axis."""
    any_data = False
    for k in keys:
      xs, ys = series(k)
      if xs:
        any_data = True
        ax.plot(xs, [y * scale for y in ys], label=k, marker="." if len(xs) < 40 else None)
    if not any_data:
      return False
    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(ylabel)
    if logy:
      ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return True

  def save(f, name):
    f.tight_layout()
    p = out_dir / f"{name}.png"
    f.savefig(p, dpi=110)
    plt.close(f)
    written.append(p)

  def fig(name, keys, ylabel, logy=False, scale=1.0, pct=False):
    f, ax = plt.subplots(figsize=(7, 4))
    if not panel(ax, keys, ylabel, logy, scale):
      plt.close(f)
      return
    if pct:
      ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}%"))
    save(f, name)

  # the loss keeps its own axis: aux (MoE balance terms, ~1e-2) gets a panel below it, so it
  # neither squashes the loss curves nor disappears at their scale
  if series("aux")[0]:
    f, (a1, a2) = plt.subplots(2, 1, figsize=(7, 6), sharex=True,
                               gridspec_kw={"height_ratios": [3, 1]})
    if panel(a1, ["loss", "ce_mtp"], "loss"):
      panel(a2, ["aux"], "aux")
      save(f, "loss")
    else:
      plt.close(f)
  else:
    fig("loss", ["loss", "ce_mtp"], "loss")
  all_keys = sorted({k for r in recs for k in r})
  fig("heldout", [k for k in all_keys if k.startswith("val/")], "held-out CE_next")
  fig("lr", ["lr"], "learning rate")
  fig("throughput", ["tokens_per_s"], "tokens / s")
  fig("mfu", ["mfu"], "MFU (%)", scale=100.0, pct=True)
  fig("grad_norm", ["grad_norm"], "global grad norm", logy=True)
  return written
