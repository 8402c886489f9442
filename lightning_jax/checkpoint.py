"""Checkpoints with orbax: async save, keep-N, step and time intervals, validated resume.

A run directory holds `checkpoints/<step>/` with four items:
  state   params, frozen, stats, opt_state, step  (orbax StandardSave: sharded arrays)
  loader  the data loader's small JSON state record (continues the same data stream)
  config  the run's config as JSON
  meta    JSON: loss, LR, tokens seen, wall time of the save

orbax writes each step into a temporary directory and renames it when complete, so a process
killed during a save leaves the previous checkpoints as they were (the partial temporary
directory is ignored, and removed on the next start). A committed step that cannot be read
(files missing or corrupt) is never skipped silently: `restore_latest` raises CheckpointError
naming it, unless the caller passes fallback_to_previous=True, which restores the newest
readable older step and says which one it skipped.
"""
from __future__ import annotations

import json
import pathlib
import time

import jax
import numpy as np
import orbax.checkpoint as ocp

ITEMS = ("state", "loader", "config", "meta")

# orbax's default "replica-parallel" save slices every replicated array across its replicas
# with a small jitted slice per shape: hundreds of compilations for a model's parameter and
# optimizer trees (minutes on a busy CPU). Save each array from its first replica instead.
def _register_array_handler():
  from absl import logging as absl_logging
  level = absl_logging.get_verbosity()
  absl_logging.set_verbosity(absl_logging.ERROR)      # "overriding jax.Array" is intended
  try:
    ocp.type_handlers.register_type_handler(
        jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False), override=True)
  finally:
    absl_logging.set_verbosity(level)


_register_array_handler()


class CheckpointError(RuntimeError):
  """A checkpoint cannot be used; the message names its directory."""


def _options(cfg_ckpt, read_only=False):
  return ocp.CheckpointManagerOptions(
      max_to_keep=int(cfg_ckpt.keep) if cfg_ckpt.keep > 0 else None,
      enable_async_checkpointing=bool(cfg_ckpt.async_save),
      cleanup_tmp_directories=not read_only,
      create=not read_only,
      read_only=read_only)


def _handlers():
  return {"state": ocp.StandardCheckpointHandler(), "loader": ocp.JsonCheckpointHandler(),
          "config": ocp.JsonCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}


class Checkpointer:
  """Save policy (every N steps or T seconds) + orbax manager for one run directory."""

  def __init__(self, directory, cfg_ckpt, read_only: bool = False):
    self.directory = pathlib.Path(directory).absolute()
    self.cfg = cfg_ckpt
    if read_only and not self.directory.exists():
      raise CheckpointError(f"checkpoint directory {self.directory} does not exist.")
    self.manager = ocp.CheckpointManager(self.directory, options=_options(cfg_ckpt, read_only),
                                         item_names=ITEMS, item_handlers=_handlers())
    self._last_save_time = time.monotonic()

  # ---------------------------------------------------------------------------- saving
  def due(self, step: int) -> bool:
    every = int(self.cfg.every_steps)
    if every > 0 and step % every == 0:
      return True
    secs = float(self.cfg.every_seconds)
    return secs > 0 and time.monotonic() - self._last_save_time >= secs

  def save(self, step: int, state: dict, loader_state: dict, config_json: dict, meta: dict):
    """Start an (async) save of `state` at `step`; returns once the device arrays are copied."""
    self.manager.save(int(step), args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        loader=ocp.args.JsonSave(loader_state),
        config=ocp.args.JsonSave(config_json),
        meta=ocp.args.JsonSave(meta)), force=True)
    self._last_save_time = time.monotonic()

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()

  # ---------------------------------------------------------------------------- reading
  def steps(self) -> list[int]:
    return sorted(int(s) for s in self.manager.all_steps())

  def step_dir(self, step: int) -> pathlib.Path:
    return self.directory / str(step)

  def restore(self, step: int, abstract_state) -> dict:
    """Restore one step; abstract_state: ShapeDtypeStructs with shardings (or None: as saved)."""
    d = self.step_dir(step)
    try:
      out = self.manager.restore(int(step), args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state),
          loader=ocp.args.JsonRestore(), config=ocp.args.JsonRestore(),
          meta=ocp.args.JsonRestore()))
    except Exception as e:  # orbax / tensorstore raise many types for torn files
      raise CheckpointError(f"checkpoint {d} is unreadable or incomplete "
                            f"({type(e).__name__}: {str(e).splitlines()[0][:300]}); pass "
                            f"--fallback_to_previous to resume from the previous checkpoint "
                            f"instead, or delete {d}.") from e
    state = out["state"]
    _check_finite_tree(state, d)
    return {"state": state, "loader": out["loader"], "config": out["config"],
            "meta": out["meta"], "step": int(step)}

  def restore_latest(self, abstract_state, fallback_to_previous: bool = False, log=print):
    """Newest readable checkpoint, or None when there is none at all."""
    steps = self.steps()
    if not steps:
      return None
    errors = []
    for step in reversed(steps):
      try:
        return self.restore(step, abstract_state)
      except CheckpointError as e:
        if not fallback_to_previous:
          raise
        errors.append(str(e))
        moved = self.set_aside(step)
        log(f"warning: skipping checkpoint {self.step_dir(step)}: it is unreadable "
            f"(--fallback_to_previous); moved it to {moved}.")
    raise CheckpointError(f"no readable checkpoint in {self.directory} (tried steps {steps}); "
                          f"first error: {errors[0]}")

  def set_aside(self, step: int) -> pathlib.Path:
    """Move an unreadable step out of the manager's sight (kept for inspection, not deleted)."""
    src = self.step_dir(step)
    dst = self.directory.parent / f"{self.directory.name}.unreadable" / f"{step}-{int(time.time())}"
    dst.parent.mkdir(parents=True, exist_ok=True)
    src.rename(dst)
    self.manager.reload()
    return dst

  def read_json(self, step: int, item: str):
    out = self.manager.restore(int(step), args=ocp.args.Composite(
        **{item: ocp.args.JsonRestore()}))
    return out[item]

  def state_metadata(self, step: int):
    return self.manager.item_metadata(int(step))["state"]


def _check_finite_tree(state, d):
  for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
    a = np.asarray(leaf) if not isinstance(leaf, jax.Array) else leaf
    if hasattr(a, "dtype") and np.issubdtype(a.dtype, np.floating):
      if not bool(jax.numpy.isfinite(a).all()):
        raise CheckpointError(f"checkpoint {d} holds non-finite values at "
                              f"{jax.tree_util.keystr(path)}; it is corrupt.")


def abstract_with_shardings(tree, shardings):
  return jax.tree_util.tree_map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def config_to_json(cfg) -> dict:
  return json.loads(cfg.to_json_best_effort())


def config_ns(keep=3, every_steps=0, every_seconds=0, async_save=False):
  """A checkpoint config section for tools that only read (launch.inspect)."""
  from ml_collections import ConfigDict
  return ConfigDict({"keep": keep, "every_steps": every_steps, "every_seconds": every_seconds,
                     "async_save": async_save})
