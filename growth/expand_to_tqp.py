"""expand_experts then to_tqp in one process, without the dense intermediate checkpoint:

  python -m growth.expand_to_tqp --src RUN --dst NEW_RUN --config=configs/stage_120b.py \
      --ratio 0.5 --router_sigma 0.05 --seed 1337

The result is the one `growth.expand_experts` followed by `growth.to_tqp` writes (same variables,
bit for bit: tests/test_run_120b_reduced.py); only the intermediate run with the routed experts
in dense float32 form is never written. That intermediate is what makes the two-command path
heavy at the 120B's width: 460 x 3 x 4096 x 1024 float32 expert weights are 23.2 GB per layer, and
growth.cli.write_grown stores them with two fresh Adam moments (3x: 70 GB per layer, 278 GB at
4 layers, on disk and in memory), which growth.to_tqp's read_source then restores again. Here
only the TQP run is written (4-bit bases: 2.9 GB per layer; the dense experts live in host memory
for the duration of the process: 23.2 GB per layer, plus one layer's stack copy).

The meta provenance records transform "expand_to_tqp" with the expand_experts arguments; the
growth report's provenance of each leaf chains both steps.
"""
from __future__ import annotations

from growth import common
from growth.common import GrowthReport


def expand_to_tqp(variables, src_cfg, dst_cfg, *, ratio: float = 0.5, router_sigma: float = 0.05,
                  seed: int = 1337, return_report: bool = False):
  """to_tqp(expand_experts(variables, src_cfg, dense(dst_cfg)), dense(dst_cfg), dst_cfg).
  variables: the full {"params", "frozen", "stats"} (the quantized bases go to "frozen")."""
  from growth.expand_experts import expand_experts
  from growth.to_tqp import to_tqp
  mid_cfg = common.dense_expert_cfg(dst_cfg)
  grown, r1 = expand_experts(variables, src_cfg, mid_cfg, ratio=ratio, router_sigma=router_sigma,
                             seed=seed, return_report=True)
  out, r2 = to_tqp(grown, mid_cfg, dst_cfg, return_report=True)
  del grown
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
  return (out, report) if return_report else out


if __name__ == "__main__":
  from growth import cli
  cli.run("expand_to_tqp")
