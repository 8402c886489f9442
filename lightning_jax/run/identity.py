"""The resume identity check: a resumed run must be the same run.

What must not change when a run resumes is declared per field in the config schema
(lightning_jax/config/schema.py, `resume`: "fixed" or "free"; the table: docs/config.md): the
architecture, the sequence geometry and seed, and the data stream (pool sources; not their
weights, which a new stage may change). Implementations, schedules, logging, checkpoint policy,
the mesh and the hot-tunable router knobs may change. The expert layout (moe.expert_pad) is
compared resolved, and a config that leaves it to the mesh adopts the run's
(`adopt_layout`), so a run resumes on another mesh.expert.

launch.train runs `check_same_run` against the checkpoint's saved `config` item BEFORE it
restores any array (checkpoint.Checkpointer.restore's check_config): a changed shape field
(model.d_model, moe.n_experts, ...) is then reported as a config difference naming the field,
not as a checkpoint that the new shapes cannot read.
"""
from __future__ import annotations

from lightning_jax import config as config_lib
from lightning_jax.config import ConfigError


def check_same_run(saved: dict, current: dict, where):
  """Resuming with a different architecture or data stream would not continue the same run:
  one ConfigError naming the first differing fields (saved -> current)."""
  a, b = config_lib.resume_view(saved), config_lib.resume_view(current)
  diffs = [f"{k} ({a.get(k)!r} -> {b.get(k)!r})" for k in sorted(set(a) | set(b))
           if a.get(k) != b.get(k)]
  if diffs:
    raise ConfigError(f"checkpoint {where} was written with a different config ({'; '.join(diffs[:4])}"
                      f"{' ...' if len(diffs) > 4 else ''}); use a new --workdir, or restore the "
                      f"original settings.")


def adopt_layout(cfg, ck, log=print) -> None:
  """Before anything is built: a config that leaves moe.expert_pad to the mesh takes the layout
  of the run's newest checkpoint (config.adopt_stored_layout), logging a note when that differs
  from what this mesh alone would give. Nothing to do for a new run or an unreadable record
  (the restore then says what is wrong)."""
  steps = ck.steps()
  if not steps:
    return
  try:
    saved = ck.read_json(steps[-1], "config")
  except Exception:      # a torn or missing record: restore_latest names it
    return
  if isinstance(saved, dict):
    note = config_lib.adopt_stored_layout(cfg, config_lib.from_stored(saved))
    if note:
      log(note)
