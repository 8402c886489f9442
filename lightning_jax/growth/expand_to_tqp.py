"""expand_experts then to_tqp in one process, one layer at a time, without the dense intermediate:

  python -m growth.expand_to_tqp --src RUN --dst NEW_RUN --config=configs/stage_120b.py \
      --ratio 0.5 --router_sigma 0.05 --seed 1337

The result is the one `growth.expand_experts` followed by `growth.to_tqp` writes (same variables,
bit for bit, and the same report: tests/test_run_120b_reduced.py); only the intermediate with the
routed experts in dense float32 form is never built. That intermediate is what makes the
two-command path heavy at the 120B's width: 464 (460 + padding) x 3 x 4096 x 1024 float32 expert
weights are 23.35 GB per layer, 467 GB at 20 layers, and lightning_jax.run.checkpoints.write_grown stores them with
two fresh Adam moments (3x).

Per layer: every (pattern position j, group g) of the stacked layer groups is expanded from its
own random stream (lightning_jax.growth.expand_experts.expand_layer: the draws expand_experts makes for it),
each of its three matrices is quantized, 16 experts per call (lightning_jax.tqp.convert_layer: the slice
lightning_jax.tqp.convert_moe_to_tqp writes for it, key from tqp.seed and the layer's path), the
codes / norms / signs and the fresh adapters are copied into the preallocated output stacks, and
the dense copy is dropped. `workers` layers are expanded in parallel threads (numpy releases the
GIL) while the main thread quantizes the oldest; the order does not change the result.

Peak host memory (bytes; D = d_model, F = moe.expert_width, Ep = padded experts, r = tqp.rank,
b = tqp.bits, W = workers):
  source variables (lightning_jax.run.checkpoints.read_source, which no longer reads the optimizer state: 35.4 GB
  for the 9B at 20 layers; the Adam moments would be 67 GB more)
  + the TQP output variables, filled in as the layers finish (params + frozen of the target; per
    expert layer 3 Ep D F b/8 codes + 4 Ep (2 F + D) norms + 12 Ep r (D + F) adapters = 3.39 GB
    at the 120B's width; 82.3 GB for the whole 120B at 20 layers, its other params included)
  + W dense expanded layers, 12 Ep D F bytes each (23.35 GB at the 120B's width)
  + the quantizer's buffers for one batch of 16 experts: about 5 x 16 x 4 D F (1.3 GB)
  + the MTP block's dense experts until they are quantized (12 x 20 D F: 1 GB).
At the 120B's width and 20 layers: W = 1: 35.4 + 82.3 + 23.4 + 1.3 + 1 = 143 GB; W = 4 (the
default on a large host): 213 GB. The whole-tree path held all layers' dense experts and
quantized each stack in one call (about 5x a matrix in buffers): 35.4 (+ 67 optimizer state) +
467 + 82.3 + 39 > 620 GB. lightning_jax.growth.driver.grow then writes with write_grown(on_cpu=True): + 82.3 GB of
device (host) copies and 42.9 GB of fresh Adam moments. Measured on a 2-core CPU host at d_model 512,
expert_width 1024, 4 layers, 16 -> 64 experts (benchmarks/expand_to_tqp_memory.py; source 613 MB,
output 387 MB, one dense layer 403 MB): peak RSS growth during the transform, whole-tree path
+2990 MB, per-layer W = 1 +969 MB, W = 2 +1124 MB (the same checksum).
The default W is min(4, CPU count, available memory / (3 x 12 Ep D F)).

The meta provenance records transform "expand_to_tqp" with the expand_experts arguments; the
growth report's provenance of each leaf chains both steps.
"""
from __future__ import annotations

import collections
import concurrent.futures
import itertools
import os

import numpy as np

from lightning_jax import tqp
from lightning_jax.growth import common, registry
from lightning_jax.growth.common import GrowthError, GrowthReport
from lightning_jax.growth.expand_experts import EXPAND_FLAGS, expand_layer, plan
from lightning_jax.growth.to_tqp import assemble, check_configs

MATRICES = ("gate", "up", "down")


def chain_reports(r1: GrowthReport, r2: GrowthReport) -> GrowthReport:
  """The expand_to_tqp report from expand_experts' (r1) and to_tqp's (r2)."""
  report = GrowthReport("expand_to_tqp", {**r1.args, **r2.args})
  for k, how in r2.provenance.items():
    if how.startswith("copy ") and how[5:] in r1.provenance:
      report.provenance[k] = r1.provenance[how[5:]]
    elif how.startswith("grown TurboQuant"):
      src = how.rsplit(" from ", 1)[1]
      report.provenance[k] = f"{how} ({r1.provenance.get(src, 'copy')})"
    else:
      report.provenance[k] = how
  report.dropped = dict(r1.dropped)
  report.choices = dict(r1.choices)
  return report


def _stand_in(s):
  """A zero-byte array of ShapeDtypeStruct s's shape and dtype (for the name/shape guards)."""
  return np.broadcast_to(np.zeros((), np.dtype(s.dtype)), tuple(s.shape))


def default_workers(layer_bytes: int) -> int:
  """min(4, CPU count, available host memory / (3 x one dense expanded layer)), at least 1."""
  n = min(4, os.cpu_count() or 1)
  try:
    avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
  except (ValueError, OSError, AttributeError):
    return n
  return max(1, min(n, int(avail // max(1, 3 * layer_bytes))))


def expand_to_tqp(variables, src_cfg, dst_cfg, *, ratio: float = 0.5, router_sigma: float = 0.05,
                  seed: int = 1337, return_report: bool = False, workers: int | None = None,
                  log=None):
  """to_tqp(expand_experts(variables, src_cfg, dense(dst_cfg)), dense(dst_cfg), dst_cfg), one
  (layer, group) at a time (module docstring). variables: the full {"params", "frozen", "stats"}
  (the quantized bases go to "frozen"). workers: layers expanded in parallel (None: default_workers).
  log: called with a line per finished layer (None: quiet). Returns numpy leaves."""
  mid_cfg = common.dense_expert_cfg(dst_cfg)
  check_configs(mid_cfg, dst_cfg)
  if not (isinstance(variables, dict) and "params" in variables):
    raise GrowthError("expand_to_tqp needs the full variables {'params', 'frozen', 'stats'}: the "
                      "quantized bases live in 'frozen'.")
  p = plan(variables, src_cfg, mid_cfg, ratio=ratio, router_sigma=router_sigma, seed=seed)
  _, want_mid = common.abstract_flat(mid_cfg, p.cols)
  # zero-byte stand-ins for the group experts: finish() checks the whole dense tree's names,
  # shapes and dtypes without the experts being materialised
  layer_bytes = 0
  for j, prefix, lead, keys in p.expert_keys():
    for key in keys.values():
      s = want_mid[key]
      p.out[key] = _stand_in(s)
      layer_bytes += int(np.prod(s.shape[len(lead):])) * np.dtype(s.dtype).itemsize
  layer_bytes //= max(1, len(p.layers))
  common.finish(p.out, p.report, mid_cfg, p.cols, p.flat_src, p.used, p.was_full)
  flat_mid = dict(p.out)
  group_keys = {key for _, _, _, keys in p.expert_keys() for key in keys.values()}

  out = {k: v for k, v in p.out.items() if not (k.startswith("params/") and "/moe/experts/" in k)}
  p.out.clear()

  def store(prefix, lead, li, mat, q, ad):
    n = int(np.prod(lead))
    for kind, d in (("frozen", q), ("params", ad)):
      for name, x in d.items():
        key = (f"frozen/{prefix}/experts/{mat}/{name}" if kind == "frozen" else
               f"params/{prefix}/adapters/{mat}/{name}")
        if key not in out:
          out[key] = np.empty(tuple(lead) + x.shape, x.dtype)
        out[key].reshape((n,) + x.shape)[li] = x

  # the MTP block (and any other expert stack that is not a layer group): already dense in plan
  for key in sorted(k for k in flat_mid if k.startswith("params/") and k.endswith("/moe/experts/gate")
                    and k not in group_keys):
    prefix = key[len("params/"):-len("/experts/gate")]
    for mat in MATRICES:
      w = flat_mid[f"params/{prefix}/experts/{mat}"]
      lead = w.shape[:-3]
      wl = w.reshape((-1,) + w.shape[-3:])
      for li in range(wl.shape[0]):
        store(prefix, lead, li, mat, *tqp.convert_layer(wl[li], dst_cfg, f"{prefix}/{mat}", li))
      del w, wl
      flat_mid[f"params/{prefix}/experts/{mat}"] = _stand_in(want_mid[f"params/{prefix}/experts/{mat}"])

  # the layer groups: expand W at a time in threads, quantize in order on this thread
  jobs = p.jobs()
  w_n = max(1, int(workers) if workers is not None else default_workers(layer_bytes))
  sets = {}
  with concurrent.futures.ThreadPoolExecutor(w_n) as pool:
    it = iter(jobs)
    pending = collections.deque((jg, pool.submit(expand_layer, p, *jg))
                                for jg in itertools.islice(it, w_n))
    while pending:
      (j, g), fut = pending.popleft()
      dense, sets[j, g] = fut.result()
      prefix, lead = p.layers[j][0], p.layers[j][1]
      for mat in MATRICES:
        store(prefix, lead, g, mat, *tqp.convert_layer(dense[mat], dst_cfg, f"{prefix}/{mat}", g))
        dense[mat] = None                                  # this matrix's dense copy is freed
      del dense, fut
      nxt = next(it, None)
      if nxt is not None:
        pending.append((nxt, pool.submit(expand_layer, p, *nxt)))
      if log is not None:
        log(f"expand_to_tqp: {prefix} group {g} expanded and quantized "
            f"({len(sets)}/{len(jobs)})")
  for j, prefix, _, _ in p.expert_keys():
    p.report.choices[prefix]["redrawn"] = np.stack([sets.pop((j, g)) for g in range(p.layers[j][3])])

  tree, r2 = assemble(out, flat_mid, dst_cfg)
  report = chain_reports(p.report, r2)
  return (tree, report) if return_report else tree


registry.register(registry.Transform(
    "expand_to_tqp", expand_to_tqp, needs="an MoE run of the source expert count",
    makes="expand_experts then to_tqp in one process, without the dense intermediate",
    flags=EXPAND_FLAGS, keeps_tqp=True, on_cpu=True, takes_log=True))
