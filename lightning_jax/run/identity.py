"""The resume identity check: a resumed run must be the same run.

What must not change when a run resumes: the architecture, the sequence geometry and seed, and
the data (minus what a new stage may change: pool weights, always_on_fraction). Schedules,
logging, checkpoint policy, mesh shape and hot-tunable router knobs may change.

launch.train runs `check_same_run` against the checkpoint's saved `config` item BEFORE it
restores any array (checkpoint.Checkpointer.restore's check_config): a changed shape field
(model.d_model, moe.n_experts, ...) is then reported as a config difference naming the field,
not as a checkpoint that the new shapes cannot read.
"""
from __future__ import annotations

from lightning_jax.config import ConfigError
from lightning_jax.data.pools import without_stage_fields

MOE_TUNABLE = ("bias_gamma", "bias_cap_lo", "bias_cap_hi", "bias_ema", "bias_guard_k",
               "hot_config", "hot_config_every", "balance_weight", "z_weight", "null_weight",
               "null_target", "capacity_factor")


def resume_view(c: dict) -> dict:
  """The sections of a config json that must not change when a run resumes (module docstring)."""
  t = c.get("train", {})
  return {"model": c.get("model"), "reversible": c.get("reversible"),
          "moe": {k: v for k, v in (c.get("moe") or {}).items() if k not in MOE_TUNABLE},
          "tqp": {k: (c.get("tqp") or {}).get(k) for k in ("enabled", "bits", "rank", "seed")},
          "train": {k: t.get(k) for k in ("seq_len", "global_batch", "seed")},
          "data": {k: v for k, v in without_stage_fields(c.get("data") or {}).items()
                   if k != "ranks"}}     # data.ranks: the loader state's own num_ranks check


def check_same_run(saved: dict, current: dict, where):
  """Resuming with a different architecture or data stream would not continue the same run:
  one ConfigError naming the first differing fields (saved -> current)."""
  a, b = resume_view(saved), resume_view(current)
  diffs = []
  for sec in a:
    x, y = a[sec] or {}, b[sec] or {}
    keys = sorted(k for k in set(x) | set(y) if x.get(k) != y.get(k))
    diffs += [f"{sec}.{k} ({x.get(k)!r} -> {y.get(k)!r})" for k in keys]
  if diffs:
    raise ConfigError(f"checkpoint {where} was written with a different config ({'; '.join(diffs[:4])}"
                      f"{' ...' if len(diffs) > 4 else ''}); use a new --workdir, or restore the "
                      f"original settings.")
