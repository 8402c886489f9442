"""What the backward pass keeps: traced residual bytes per layer and per step, for each model.remat mode.

    python -m benchmarks.residuals --config configs/stage_2b.py [--batch 1] [--seq 4096]
        [--modes none,selective,full] [--no_step] [--set section.field=value ...] [--json out.json]

No device memory is used: everything is traced (jax.make_jaxpr), nothing compiled or run.
For each layer kind of the pattern (D, G) and each remat mode, one layer under value_and_grad:
  residual_gb      the values its forward keeps for its backward, layer inputs and parameters
                   excluded (jax's saved_residuals: what print_saved_residuals lists)
  top              the largest of them by source line
  dot_gflop        matmul FLOPs of the layer's forward + backward that are live (used), counting
                   recomputation: the cost side of a remat mode
  pallas_calls     live Pallas kernel launches (a kernel run twice shows here)
and, for a plain (non-reversible) stack, the whole loss's residuals per micro-batch (`step`).
In a reversible stack the layers' residuals live one layer at a time (inside its rebuild), so the
per-layer figure is the one that adds to the peak.

Off GPU the GPU code paths are traced (`gpu_paths`): the delta rule's and Sinkhorn's Pallas
kernels, cuDNN flash attention for GSA and the TQP Pallas rotation, as "auto" picks them on a
GPU. The residual bytes of a plain stack matched the measured activation memory of stage_2b on
one H200 (26.85 GB traced at B1 against 27.2 GB measured between B1 and B2; PERFORMANCE.md).
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import functools
import json
import re
import sys
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np

# print_saved_residuals' list (no public twin); cuDNN attention's version checks (gpu_paths)
from jax._src.ad_checkpoint import saved_residuals
from jax._src.cudnn import fused_attention_stablehlo as cudnn_attention
from jax.extend import core as jax_core

from benchmarks.step import apply_overrides
from lightning_jax import metrics, model, nn, remat
from lightning_jax.config import load_config
from lightning_jax.ops import pallas

GB = 1e9


@contextlib.contextmanager
def gpu_paths():
  """Trace the kernels a GPU would run (no-op on a GPU): ops.pallas.target_gpu, plus a cuDNN
  version for jax's attention checks where this host's jaxlib has no CUDA plugin to ask.
  Tracing only: nothing here can run."""
  if jax.default_backend() == "gpu":
    yield
    return
  with pallas.target_gpu(), \
      mock.patch.object(cudnn_attention, "check_cudnn_version", lambda *a: 91000):
    yield


def gpu_choices(cfg) -> None:
  """Resolve the config's "auto" kernel choices as on a GPU (in place)."""
  m = cfg.model
  if m.deltanet.impl == "auto":
    m.deltanet.impl = "kernel"
  if m.gsa.attention == "auto":
    m.gsa.attention = "flash"
  if m.hc.sinkhorn_impl == "auto":
    m.hc.sinkhorn_impl = "kernel"


def _source(src: str) -> str:
  m = re.search(r"lightning_jax/(\S+?):(\d+):\d+ \((\S+)\)", src)
  return f"{m.group(1)}:{m.group(2)} {m.group(3)}" if m else src.strip()[-60:]


def residuals(fn, *args, top: int = 8) -> dict:
  """Bytes of fn's residuals (arguments excluded) and the largest by source line."""
  res = saved_residuals(fn, *args)
  by = collections.Counter()
  total = 0
  for aval, src in res:
    if "from the argument" in src:
      continue
    n = int(np.prod(aval.shape)) * aval.dtype.itemsize
    total += n
    by[_source(src)] += n
  return {"residual_gb": total / GB,
          "top": [{"source": s, "gb": n / GB} for s, n in by.most_common(top)]}


def _dot_flops(eq) -> int:
  (ca, _), _ = eq.params["dimension_numbers"]
  k = int(np.prod([eq.invars[0].aval.shape[i] for i in ca])) if ca else 1
  return 2 * int(np.prod(eq.outvars[0].aval.shape)) * k


def live_cost(jaxpr) -> dict:
  """Matmul FLOPs and Pallas launches of the equations whose results are used (XLA drops the
  others; jax keeps unused pallas_calls in a jaxpr), nested jaxprs included."""
  acc = {"dot_flops": 0, "pallas_calls": 0, "attention_calls": 0, "gathers": 0}

  def walk(j):
    live = {id(v) for v in j.outvars}
    for eq in reversed(j.eqns):
      if not eq.effects and not any(id(v) in live for v in eq.outvars):
        continue
      live.update(id(v) for v in eq.invars)
      if eq.primitive.name == "dot_general":
        acc["dot_flops"] += _dot_flops(eq)
      acc["pallas_calls"] += eq.primitive.name == "pallas_call"
      acc["attention_calls"] += "attention" in eq.primitive.name    # cuDNN's fused attention
      acc["gathers"] += eq.primitive.name == "gather"
      for sub in jax_core.jaxprs_in_params(eq.params):
        walk(sub)

  walk(jaxpr)
  return acc


def layer_report(cfg, kind: str, batch: int, seq: int, mode: str, rebuild: bool = False) -> dict:
  """One layer of pattern letter `kind` under value_and_grad with model.remat=mode (rebuild:
  with the policy of the reversible stack's per-layer rebuild)."""
  av = model.abstract_variables(cfg)
  j = cfg.model.pattern.index(kind)
  gv = model._group_vars(av["params"], av["frozen"], av["stats"], cfg)[j]
  gv = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), gv)
  x = jax.ShapeDtypeStruct((batch, seq, cfg.model.hc.n_streams, cfg.model.d_model),
                           nn.dtype_of(cfg.model.dtype))
  consts = model.make_consts(cfg, seq)
  layer = remat.wrap(functools.partial(model.layer_apply, cfg=cfg, kind=kind), mode,
                     prevent_cse=True, rebuild=rebuild)

  def loss(gv, x):
    y, _, aux, _ = layer(gv, x, consts, None)
    return jnp.sum(y.astype(jnp.float32)) + aux

  out = residuals(loss, gv, x)
  cost = live_cost(jax.make_jaxpr(jax.value_and_grad(loss, argnums=(0, 1), allow_int=True))(
      gv, x).jaxpr)
  out.update(dot_gflop=cost["dot_flops"] / 1e9, pallas_calls=cost["pallas_calls"],
             attention_calls=cost["attention_calls"], gathers=cost["gathers"],
             residual_kb_per_token=out["residual_gb"] * GB / 1e3 / (batch * seq))
  return out


def step_report(cfg, batch: int, seq: int) -> dict:
  """The whole loss's residuals (embedding, every layer, MTP, head) for one micro-batch."""
  av = model.abstract_variables(cfg)
  ids = jax.ShapeDtypeStruct((batch, seq + 2), jnp.int32)

  def loss(params, frozen, stats, ids):
    return model.loss_fn(params, frozen, stats, {"ids": ids}, cfg)[0]

  return residuals(loss, av["params"], av["frozen"], av["stats"], ids, top=12)


def main(argv=None):
  ap = argparse.ArgumentParser(prog="python -m benchmarks.residuals",
                               description=__doc__.split("\n")[0])
  ap.add_argument("--config", required=True, help="Stage config to trace.")
  ap.add_argument("--batch", type=int, default=1, help="Sequences per micro-batch.")
  ap.add_argument("--seq", type=int, default=0, help="Sequence length (default: train.seq_len).")
  ap.add_argument("--modes", default=",".join(remat.MODES), help="Comma list of model.remat "
                  "modes to trace.")
  ap.add_argument("--no_step", action="store_true", help="Per layer only (skip the whole loss).")
  ap.add_argument("--set", action="append", default=[], help="section.field=value override "
                  "(repeatable).")
  ap.add_argument("--json", default="", help="Write the record here (default: print only).")
  ap.add_argument("--commit", default="", help="Commit to record (default: the checkout's HEAD).")
  a = ap.parse_args(argv)
  cfg = load_config(a.config)
  apply_overrides(cfg, a.set)
  gpu_choices(cfg)
  seq = a.seq or int(cfg.train.seq_len)
  modes = [remat.mode_of(m) for m in a.modes.split(",")]
  report = {"command": "python -m benchmarks.residuals " + " ".join(
                sys.argv[1:] if argv is None else argv),
            "config": a.config, "sets": a.set, "batch": a.batch, "seq": seq,
            "date": datetime.date.today().isoformat(),
            "commit": a.commit or metrics.git_commit(), "traced_as": "gpu",
            "reversible": bool(cfg.reversible.enabled), "layers": {}, "step": {}}
  with gpu_paths():
    for kind in sorted(set(cfg.model.pattern)):
      for mode in modes:
        r = layer_report(cfg, kind, a.batch, seq, mode)
        report["layers"].setdefault(kind, {})[mode] = r
        print(f"layer {kind} remat={mode:9s} residuals {r['residual_gb']:7.3f} GB "
              f"({r['residual_kb_per_token']:7.1f} KB/token)  live matmul "
              f"{r['dot_gflop']:9.1f} GFLOP  pallas calls {r['pallas_calls']}  attention calls "
              f"{r['attention_calls']}", flush=True)
    if not a.no_step and not cfg.reversible.enabled:
      for mode in modes:
        cfg.model.remat = mode
        r = step_report(cfg, a.batch, seq)
        report["step"][mode] = r
        print(f"step  remat={mode:9s} residuals {r['residual_gb']:7.3f} GB", flush=True)
  if a.json:
    with open(a.json, "w") as f:
      json.dump(report, f, indent=1)
  return report


if __name__ == "__main__":
  main()
