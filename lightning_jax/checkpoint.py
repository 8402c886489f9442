"""Checkpoints with orbax: async save, keep-N, step and time intervals, validated resume, and the
frozen base stored once per run.

A run directory holds `checkpoints/<step>/` with five items:
  state       params, stats, opt_state, step  (orbax StandardSave: sharded arrays)
  frozen_ref  JSON: which frozen version the step uses and that version's fingerprint
  loader      the data loader's small JSON state record (continues the same data stream)
  config      the run's config as JSON
  meta        JSON: loss, LR, tokens seen, wall time of the save
and `checkpoints/frozen/<version>/` (items `frozen`: the frozen tree, `info`: its fingerprint).

The frozen tree (codec buffers, the TQP quantized routed-expert bases: ~58 GB at 120B) does not
change between steps, so it is written ONCE per version rather than at every save. Its version
is the step at which it came into being: 0 for an initialised or grown model, the flush step
after a tqp flush (which requantizes the bases). `save(..., frozen_version=v)` writes version v
only if it is not on disk yet (synchronously, before the step that references it, so a
committed step never points at an uncommitted version); without frozen_version the tree's
fingerprint is compared with the versions present and a new one (numbered by the step) is
written only when none matches. The fingerprint: every leaf's path, shape, dtype and a cheap
position-weighted uint32 checksum (computed on the devices for big trees), plus tqp.bits. Keep-N
also applies to the frozen versions: a version is deleted once no kept step references it.

orbax writes each step (and each frozen version) into a temporary directory and renames it when
complete, so a process killed during a save leaves the previous checkpoints as they were (the
partial temporary directory is ignored, and removed on the next start). A committed step that
cannot be read (files missing or corrupt, its frozen version missing, unreadable or not matching
the recorded fingerprint) is never skipped silently: `restore_latest` raises CheckpointError
naming it, unless the caller passes fallback_to_previous=True, which restores the newest
readable older step and says which one it skipped (an unreadable frozen version is moved aside
with it, so no later save reuses it). A frozen base whose shapes do not match the
model being restored is refused before anything is read (a TQP base of other bits than
tqp.bits: one sentence naming both). Step directories of the older layout (`frozen` inside
`state`, no `frozen_ref`) are still read.

Integrity (issues 21 and 23):
  * every step also holds `checksums` (JSON): per state leaf its shape, dtype and the same cheap
    uint32 sums as the frozen fingerprint (any single flipped bit changes the plain sum), plus
    the largest |parameter|. `restore` recomputes them and names the array that differs.
  * the frozen base is kept twice (checkpoint.frozen_copies, default 2): checkpoints/frozen/<v>/
    and checkpoints/frozen_copy/<v>/. A damaged or missing first copy is read from the second
    (and rewritten from it, the damaged one moved aside), so one bad file does not take every
    checkpoint with it.
  * --fallback_to_previous moves unreadable steps aside only once an older readable step has
    been found: it never leaves a run without a checkpoint.
  * <run>/checkpoints.history.json records the newest step ever committed; a later start that
    finds no checkpoint at all refuses (one sentence) instead of silently starting from step 0,
    until the user deletes that file.
  * a failed save (disk full, permission denied, a directory gone) is one CheckpointSaveError
    sentence; the previous checkpoint is untouched (orbax commits by renaming a finished
    temporary directory).
"""
from __future__ import annotations

import errno as _errno
import hashlib
import json
import logging
import math
import os
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging as absl_logging
from ml_collections import ConfigDict

from lightning_jax import nn

ITEMS = ("state", "frozen_ref", "loader", "config", "meta", "checksums")
FROZEN_DIR = "frozen"
FROZEN_COPY_DIR = "frozen_copy"
FROZEN_ITEMS = ("frozen", "info")
CHECKSUM_FORMAT = "u32-sums/1"
HISTORY_SUFFIX = ".history.json"   # <run>/checkpoints.history.json beside checkpoints/
SANE_PARAM_ABS = 1e4      # a checkpoint whose largest |parameter| exceeds this is not "good"

# orbax's default "replica-parallel" save slices every replicated array across its replicas
# with a small jitted slice per shape: hundreds of compilations for a model's parameter and
# optimizer trees (minutes on a busy CPU). Save each array from its first replica instead.
def _register_array_handler():
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


class CheckpointSaveError(CheckpointError):
  """Writing a checkpoint failed (disk full, permissions, a directory gone); the previous
  checkpoint is intact."""


class FrozenVersionError(CheckpointError):
  """The frozen version a step references is unreadable or does not match its fingerprint."""

  def __init__(self, msg, version):
    super().__init__(msg)
    self.version = version


def _options(cfg_ckpt, read_only=False):
  return ocp.CheckpointManagerOptions(
      max_to_keep=int(cfg_ckpt.keep) if cfg_ckpt.keep > 0 else None,
      enable_async_checkpointing=bool(cfg_ckpt.async_save),
      cleanup_tmp_directories=not read_only,
      create=not read_only,
      read_only=read_only)


def _handlers():
  return {"state": ocp.StandardCheckpointHandler(), "frozen_ref": ocp.JsonCheckpointHandler(),
          "loader": ocp.JsonCheckpointHandler(), "config": ocp.JsonCheckpointHandler(),
          "meta": ocp.JsonCheckpointHandler(), "checksums": ocp.JsonCheckpointHandler()}


def _first_line(e: Exception, n=300) -> str:
  s = str(e).splitlines()
  return f"{type(e).__name__}: {(s[0] if s else '')[:n]}"


def _save_failure(e: Exception) -> str:
  """What went wrong in a failed save, in words, with what to do about it."""
  text = f"{type(e).__name__}: {e}"
  no = getattr(e, "errno", None)
  if no == _errno.ENOSPC or "No space left" in text or "RESOURCE_EXHAUSTED" in text:
    return "the disk is full", "free some space"
  if no in (_errno.EACCES, _errno.EPERM, _errno.EROFS) or "Permission denied" in text or \
      "PERMISSION_DENIED" in text or "Read-only file system" in text:
    return "permission denied", "make the run directory writable"
  if no == _errno.ENOENT or "No such file" in text or "NOT_FOUND" in text:
    return "a directory it writes into is missing (deleted while training?)", \
        "make sure the run directory exists"
  return _first_line(e, 200), "fix the cause"


class _OrbaxTracebackFilter:
  """Orbax logs a failed background save at ERROR with a full traceback, once per thread; keep
  its one-line message (the CheckpointSaveError sentence says what happened and what to do)."""

  def filter(self, record):
    if "/orbax/" in str(getattr(record, "pathname", "")):
      record.exc_info = None
      record.exc_text = None
    return True


def _install_log_filter():
  f = _OrbaxTracebackFilter()
  for name in ("absl", ""):
    logger = logging.getLogger(name)
    if not any(isinstance(x, _OrbaxTracebackFilter) for x in logger.filters):
      logger.addFilter(f)


_install_log_filter()


class Checkpointer:
  """Save policy (every N steps or T seconds) + orbax manager for one run directory."""

  def __init__(self, directory, cfg_ckpt, read_only: bool = False, log=print):
    self.directory = pathlib.Path(directory).absolute()
    self.cfg = cfg_ckpt
    self.read_only = read_only
    self.log = log
    # tools and tests may pass a checkpoint section without the field: two copies by default
    self.frozen_copies = int(cfg_ckpt["frozen_copies"]) if "frozen_copies" in cfg_ckpt else 2
    if read_only and not self.directory.exists():
      raise CheckpointError(f"checkpoint directory {self.directory} does not exist.")
    try:
      self.manager = ocp.CheckpointManager(self.directory, options=_options(cfg_ckpt, read_only),
                                           item_names=ITEMS, item_handlers=_handlers())
    except OSError as e:
      what, todo = _save_failure(e)
      raise CheckpointSaveError(f"cannot open the checkpoint directory {self.directory}: {what} "
                                f"({_first_line(e, 160)}); {todo} and run again.") from e
    self._frozen_managers: dict = {}
    self._refs: dict = {}          # step -> frozen_ref record (committed steps do not change)
    self._verified: dict = {}      # frozen version -> fingerprint known to match the disk
    self._pending: set = set()     # version used by the step save in flight
    self._in_flight = None         # step of the (async) save not yet known to be committed
    self._last_save_time = time.monotonic()

  # ---------------------------------------------------------------------------- saving
  def due(self, step: int) -> bool:
    every = int(self.cfg.every_steps)
    if every > 0 and step % every == 0:
      return True
    secs = float(self.cfg.every_seconds)
    return secs > 0 and time.monotonic() - self._last_save_time >= secs

  def _save_error(self, step, e) -> CheckpointSaveError:
    what, todo = _save_failure(e)
    try:
      prev = [s for s in self.steps() if s != step]
    except Exception:     # the directory itself may be gone
      prev = []
    keep = (f"the previous checkpoint {self.step_dir(prev[-1])} is intact" if prev else
            "no earlier checkpoint exists")
    where = self.step_dir(step) if step is not None else self.directory
    return CheckpointSaveError(
        f"could not write checkpoint {where}: {what} ({_first_line(e, 160)}); "
        f"{keep}: {todo} and rerun the same command to resume.")

  def _finish_in_flight(self):
    """Wait for the save in flight; a failure becomes one CheckpointSaveError sentence."""
    try:
      self.manager.wait_until_finished()
    except Exception as e:   # orbax re-raises the background thread's error here
      step, self._in_flight = self._in_flight, None
      raise self._save_error(step, e) from e
    self._in_flight = None
    self._record_history(self.steps())

  def save(self, step: int, state: dict, loader_state: dict, config_json: dict, meta: dict,
           frozen_version: int | None = None):
    """Start an (async) save of `state` at `step`; returns once the device arrays are copied.

    state["frozen"] (if present) goes to checkpoints/frozen/<version>/ (and its second copy),
    written only when that version is not on disk yet; frozen_version: the step at which this
    frozen tree came into being (launch.train passes it); None: found by fingerprint, else a
    new version = step. A failed write raises CheckpointSaveError (one sentence)."""
    step = int(step)
    self._finish_in_flight()      # orbax's save waits for the previous one anyway
    if not self.directory.is_dir():
      raise CheckpointSaveError(
          f"could not write checkpoint {self.step_dir(step)}: the checkpoint directory "
          f"{self.directory} no longer exists (deleted or unmounted while training?); restore it "
          f"and rerun the same command to resume from its newest checkpoint.")
    state = dict(state)
    ref = None
    try:
      if "frozen" in state:
        ref = self._store_frozen(step, state.pop("frozen"), config_json, frozen_version)
    except CheckpointError:
      raise
    except Exception as e:  # orbax / tensorstore wrap OS errors in many types
      raise self._save_error(step, e) from e
    sums = state_checksums(state)
    items = {"state": ocp.args.StandardSave(state), "loader": ocp.args.JsonSave(loader_state),
             "config": ocp.args.JsonSave(config_json), "meta": ocp.args.JsonSave(meta),
             "checksums": ocp.args.JsonSave(sums)}
    if ref is not None:
      items["frozen_ref"] = ocp.args.JsonSave(ref)
      self._pending = {ref["version"]}
    self._refs.pop(step, None)
    self._gc_frozen()
    self._in_flight = step
    try:
      self.manager.save(step, args=ocp.args.Composite(**items), force=True)
    except Exception as e:
      self._in_flight = None
      self._abandon()
      raise self._save_error(step, e) from e
    if not bool(self.cfg.async_save):
      self._finish_in_flight()
    self._last_save_time = time.monotonic()

  def _abandon(self):
    """After a failed save: let orbax's remaining background threads end (errors ignored)."""
    try:
      self.manager.wait_until_finished()
    except Exception:   # the first error was already reported
      pass

  def wait(self):
    try:
      self._finish_in_flight()
    except CheckpointSaveError:
      self._abandon()
      raise
    self._pending = set()
    self._gc_frozen()

  def close(self):
    try:
      self.wait()
    finally:
      self.manager.close()
      for fm in self._frozen_managers.values():
        fm.close()

  # ---------------------------------------------------------------------------- history
  def history_path(self) -> pathlib.Path:
    return self.directory.parent / f"{self.directory.name}{HISTORY_SUFFIX}"

  def history(self):
    """{"newest_step", "steps", "time"} recorded by this run directory's saves, or None."""
    p = self.history_path()
    if not p.exists():
      return None
    try:
      return json.loads(p.read_text())
    except (OSError, ValueError):
      return {"newest_step": None, "steps": []}

  def _record_history(self, steps):
    if self.read_only or not steps:
      return
    h = self.history() or {}
    if h.get("steps") == list(steps):
      return
    rec = {"newest_step": max(max(steps), h.get("newest_step") or 0), "steps": list(steps),
           "time": time.time()}
    tmp = self.history_path().with_suffix(".tmp")
    try:
      tmp.write_text(json.dumps(rec))
      os.replace(tmp, self.history_path())
    except OSError:       # a full disk here is reported by the save itself
      pass

  def _refuse_silent_restart(self):
    h = self.history()
    if h is None:
      return
    aside = self.directory.parent / f"{self.directory.name}.unreadable"
    raise CheckpointError(
        f"run directory {self.directory.parent} had checkpoints (up to step "
        f"{h.get('newest_step')}, recorded in {self.history_path()}) but {self.directory} holds "
        f"none now, so this run would silently start again from step 0; put the checkpoints back"
        f"{f' (set-aside ones are in {aside})' if aside.exists() else ''}, use a new --workdir, "
        f"or delete {self.history_path()} to start this run over from step 0.")

  # ---------------------------------------------------------------------------- frozen versions
  def frozen_root(self, copy: bool = False) -> pathlib.Path:
    return self.directory / (FROZEN_COPY_DIR if copy else FROZEN_DIR)

  def frozen_dir(self, version: int, copy: bool = False) -> pathlib.Path:
    return self.frozen_root(copy) / str(version)

  def _fm(self, create: bool = False, copy: bool = False):
    """The orbax manager of checkpoints/frozen/ (copy: frozen_copy/); None while it does not
    exist and create=False."""
    if copy not in self._frozen_managers:
      root = self.frozen_root(copy)
      if not root.is_dir() and (self.read_only or not create):
        return None
      ro = self.read_only
      self._frozen_managers[copy] = ocp.CheckpointManager(
          root,
          options=ocp.CheckpointManagerOptions(
              max_to_keep=None, enable_async_checkpointing=False, cleanup_tmp_directories=not ro,
              create=not ro, read_only=ro),
          item_names=FROZEN_ITEMS,
          item_handlers={"frozen": ocp.StandardCheckpointHandler(),
                         "info": ocp.JsonCheckpointHandler()})
    return self._frozen_managers[copy]

  def frozen_versions(self, copy: bool = False) -> list[int]:
    fm = self._fm(copy=copy)
    return [] if fm is None else sorted(int(v) for v in fm.all_steps())

  def frozen_info(self, version: int, copy: bool | None = None) -> dict:
    """{"version", "fingerprint", "written_at_step", "time"} of a stored frozen version (copy
    None: the first copy, else the second)."""
    if copy is None:
      try:
        return self.frozen_info(version, False)
      except CheckpointError:
        if self.frozen_copies < 2 or int(version) not in self.frozen_versions(True):
          raise
        return self.frozen_info(version, True)
    fm = self._fm(copy=copy)
    if fm is None or int(version) not in fm.all_steps():
      raise CheckpointError(f"frozen base {self.frozen_dir(version, copy)} does not exist.")
    try:
      return fm.restore(int(version), args=ocp.args.Composite(info=ocp.args.JsonRestore()))["info"]
    except Exception as e:
      raise CheckpointError(f"frozen base {self.frozen_dir(version, copy)} is unreadable or "
                            f"incomplete ({_first_line(e)}).") from e

  def frozen_ref(self, step: int):
    """The step's frozen_ref record {"version", "fingerprint"}, or None for a step without one
    (the older layout, with frozen inside state, or a state without a frozen tree)."""
    step = int(step)
    if step in self._refs:
      return self._refs[step]
    if not (self.step_dir(step) / "frozen_ref").exists():
      ref = None
    else:
      ref = self.manager.restore(step, args=ocp.args.Composite(
          frozen_ref=ocp.args.JsonRestore()))["frozen_ref"]
    self._refs[step] = ref
    return ref

  def frozen_users(self, version: int) -> list[int]:
    """Committed steps whose frozen_ref names `version`."""
    out = []
    for s in self.steps():
      try:
        r = self.frozen_ref(s)
      except Exception:
        continue
      if r is not None and r.get("version") == int(version):
        out.append(s)
    return out

  def _write_frozen(self, version: int, frozen, info: dict, copies=(False, True)):
    for copy in copies:
      if copy and self.frozen_copies < 2:
        continue
      fm = self._fm(create=True, copy=copy)
      if int(version) in fm.all_steps():
        fm.delete(int(version))
      fm.save(int(version), args=ocp.args.Composite(
          frozen=ocp.args.StandardSave(frozen), info=ocp.args.JsonSave(info)), force=True)
      fm.wait_until_finished()

  def _ensure_copy(self, version: int, frozen, fp):
    """Write the second copy of a version whose first copy is on disk (a kill between the two
    writes, or a run saved with one copy)."""
    if self.frozen_copies < 2 or self.read_only or version in self.frozen_versions(True):
      return
    info = {"version": version, "fingerprint": fp, "written_at_step": version, "time": time.time()}
    self._write_frozen(version, frozen, info, copies=(True,))

  def _store_frozen(self, step, frozen, config_json, version) -> dict:
    bits = _tqp_bits(config_json)
    if not jax.tree_util.tree_leaves(frozen):
      return {"version": None, "fingerprint": None}
    fp = None
    if version is None:
      fp = frozen_fingerprint(frozen, bits)
      for v in reversed(self.frozen_versions()):
        known = self._verified.get(v)
        if known is None:
          try:
            known = self.frozen_info(v)["fingerprint"]
          except CheckpointError:
            continue
        if same_fingerprint(known, fp):
          self._verified[v] = known
          self._ensure_copy(v, frozen, known)
          return {"version": v, "fingerprint": known}
      version = step
    version = int(version)
    known = self._verified.get(version)
    if known is not None and self.frozen_dir(version).is_dir():
      # written or verified by this process: only the (free) structure is compared here
      if _structure(known) == _structure(frozen_fingerprint(frozen, bits, sums=False)):
        self._ensure_copy(version, frozen, known)
        return {"version": version, "fingerprint": known}
      self._verified.pop(version)
    if fp is None:
      fp = frozen_fingerprint(frozen, bits)
    if version in self.frozen_versions():
      try:
        stored = self.frozen_info(version)["fingerprint"]
      except CheckpointError:
        stored = None
      if stored is not None and same_fingerprint(stored, fp):
        self._verified[version] = stored
        self._ensure_copy(version, frozen, stored)
        return {"version": version, "fingerprint": stored}     # on disk already: not rewritten
      users = self.frozen_users(version)
      if users:
        raise CheckpointError(
            f"frozen base {self.frozen_dir(version)} already exists with different contents "
            f"({fingerprint_diff(stored, fp) if stored else 'unreadable'}) and checkpoints "
            f"{users} use it; expected the same frozen tree for version {version} (use a new "
            f"run directory, or delete those checkpoints).")
    info = {"version": version, "fingerprint": fp, "written_at_step": int(step),
            "time": time.time()}
    self._write_frozen(version, frozen, info)   # also replaces a version no step committed
    self._verified[version] = fp
    return {"version": version, "fingerprint": fp}

  def _gc_frozen(self):
    """Delete frozen versions (both copies) that no kept step (nor the save in flight) uses."""
    if self.read_only:
      return
    versions = sorted(set(self.frozen_versions()) | set(self.frozen_versions(True)))
    if not versions:
      return
    used = set(self._pending)
    for s in self.steps():
      try:
        r = self.frozen_ref(s)
      except Exception:       # a step we cannot read: keep every version (it may need one)
        return
      if r is not None:
        used.add(r.get("version"))
    for v in versions:
      if v not in used:
        for copy in (False, True):
          if v in self.frozen_versions(copy):
            self._fm(copy=copy).delete(v)
        self._verified.pop(v, None)

  def _read_frozen(self, ref, abstract_frozen, d, copy: bool):
    """One copy of a frozen version, verified against the step's fingerprint. Returns (tree,
    None) or (None, (kind, words)) with kind "missing" | "damaged"."""
    v = ref["version"]
    if v not in self.frozen_versions(copy):
      return None, ("missing", "", "")
    try:
      frozen = self._fm(copy=copy).restore(int(v), args=ocp.args.Composite(
          frozen=ocp.args.StandardRestore(abstract_frozen)))["frozen"]
    except Exception as e:  # orbax / tensorstore raise many types for torn files
      return None, ("unreadable", f"is unreadable or incomplete ({_first_line(e)})", "")
    want = ref["fingerprint"]
    got = frozen_fingerprint(frozen, want.get("tqp_bits"))
    if not same_fingerprint(want, got):
      return None, ("mismatch", f"does not match the fingerprint recorded by checkpoint {d} "
                                f"({fingerprint_diff(want, got)}); it is corrupt or was replaced",
                    fingerprint_diff(want, got))
    return frozen, None

  def _restore_frozen(self, ref, abstract_frozen, d):
    v = ref["version"]
    fdir, cdir = self.frozen_dir(v), self.frozen_dir(v, copy=True)
    hint = (f"pass --fallback_to_previous to resume from an older checkpoint instead, or "
            f"delete {d}.")
    frozen, bad = self._read_frozen(ref, abstract_frozen, d, copy=False)
    if frozen is not None:
      self._verified[v] = ref["fingerprint"]
      if not self.read_only and self.frozen_copies > 1 and v not in self.frozen_versions(True):
        self._ensure_copy(v, frozen, ref["fingerprint"])
      return frozen
    first = {"missing": f"checkpoint {d} uses the frozen base {fdir}, which is missing",
             "unreadable": f"frozen base {fdir} (used by checkpoint {d}) {bad[1]}",
             "mismatch": f"frozen base {fdir} {bad[1]}"}[bad[0]]
    frozen, bad2 = (None, ("missing", "", ""))
    if self.frozen_copies > 1 or v in self.frozen_versions(True):
      frozen, bad2 = self._read_frozen(ref, abstract_frozen, d, copy=True)
    if frozen is not None:
      self._verified[v] = ref["fingerprint"]
      note = f"warning: {first}; read its second copy {cdir} instead"
      if not self.read_only:
        moved = self.set_aside_frozen(v, copies=(False,)) if v in self.frozen_versions() else None
        info = dict(self.frozen_info(v, copy=True))
        self._write_frozen(v, frozen, info, copies=(False,))
        note += f" and rewrote {fdir} from it" + (f" (the damaged one is in {moved})" if moved
                                                   else "")
      self.log(note + ".")
      return frozen
    if bad[0] == "missing" and bad2[0] == "missing":
      also = f" (and so is its second copy {cdir})" if self.frozen_copies > 1 else ""
      raise CheckpointError(f"{first}{also}; restore that directory, or {hint}")
    second = {"missing": f", and its second copy {cdir} is missing",
              "unreadable": f", and its second copy {cdir} {bad2[1]}",
              "mismatch": f", and its second copy {cdir} does not match it either ({bad2[2]})"
              }[bad2[0]] if self.frozen_copies > 1 or bad2[0] != "missing" else ""
    raise FrozenVersionError(f"{first}{second}; {hint}", v)

  # ---------------------------------------------------------------------------- reading
  def steps(self) -> list[int]:
    return sorted(int(s) for s in self.manager.all_steps())

  def step_dir(self, step: int) -> pathlib.Path:
    return self.directory / str(step)

  def checksums(self, step: int):
    """The step's checksums record, or None for a step saved before checksums existed."""
    if not (self.step_dir(step) / "checksums").exists():
      return None
    return self.read_json(step, "checksums")

  def verify_checksums(self, step: int, state: dict, d=None, hint: str = ""):
    """Compare restored (sub)trees of the step's state with the recorded checksums; a leaf that
    differs is named (CheckpointError). Leaves not restored, or restored as another shape or
    dtype, are not compared. Returns the number of leaves checked (0: nothing recorded)."""
    d = self.step_dir(step) if d is None else d
    try:
      rec = self.checksums(step)
    except Exception as e:
      raise CheckpointError(f"checkpoint {d}'s checksums record is unreadable "
                            f"({_first_line(e)}); {hint}") from e
    if rec is None:
      return 0
    want = rec["leaves"]
    flat = [(nn.path_str(p), x) for p, x in jax.tree_util.tree_flatten_with_path(state)[0]]
    check = [(p, x) for p, x in flat if p in want and
             want[p][:2] == [list(np.shape(x)), str(np.dtype(x.dtype))]]
    got = leaf_sums([x for _, x in check], on_device=_sums_on_device([x for _, x in check]))
    for (p, _), g in zip(check, got):
      if list(g) != list(want[p][2]):
        raise CheckpointError(
            f"checkpoint {d} is damaged: the array {p} (in {d / 'state'}) does not match the "
            f"checksum recorded when it was saved (sums {list(g)}, expected {want[p][2]}); "
            f"{hint}")
    return len(check)

  def restore(self, step: int, abstract_state, check_config=None) -> dict:
    """Restore one step and the frozen version it references; abstract_state: ShapeDtypeStructs
    with shardings (or None: as saved). Returns {"state", "loader", "config", "meta", "step",
    "frozen_version"} (frozen_version None for a step of the older layout). Every array is
    compared with the checksums recorded at save time.

    check_config(saved config json, step dir): called with the step's saved `config` item BEFORE
    any array is read (lightning_jax/run/identity.py: a run resumed with another architecture
    is reported as a config difference, not as a checkpoint the new shapes cannot read)."""
    d = self.step_dir(step)
    hint = (f"pass --fallback_to_previous to resume from the previous checkpoint instead, or "
            f"delete {d}.")
    if check_config is not None:
      try:
        saved = self.read_json(step, "config")
      except Exception as e:  # orbax raises many types for torn files
        raise CheckpointError(f"checkpoint {d} is unreadable or incomplete ({_first_line(e)}); "
                              f"{hint}") from e
      check_config(saved, d)
    try:
      ref = self.frozen_ref(step)
    except Exception as e:
      raise CheckpointError(f"checkpoint {d} is unreadable or incomplete ({_first_line(e)}); "
                            f"{hint}") from e
    abstract_frozen = None
    if ref is not None and abstract_state is not None:
      abstract_state = dict(abstract_state)
      abstract_frozen = abstract_state.pop("frozen", None)
      if abstract_frozen is not None and ref["fingerprint"] is not None:
        check_frozen_matches(ref, abstract_frozen, d, self.frozen_dir(ref["version"]))
    try:
      out = self.manager.restore(int(step), args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state),
          loader=ocp.args.JsonRestore(), config=ocp.args.JsonRestore(),
          meta=ocp.args.JsonRestore()))
    except Exception as e:  # orbax / tensorstore raise many types for torn files
      raise CheckpointError(f"checkpoint {d} is unreadable or incomplete "
                            f"({_first_line(e)}); {hint}") from e
    state = dict(out["state"])
    self.verify_checksums(step, state, d, hint)
    if ref is not None:
      state["frozen"] = ({} if ref["version"] is None else
                         self._restore_frozen(ref, abstract_frozen, d))
    _check_finite_tree(state, d)
    return {"state": state, "loader": out["loader"], "config": out["config"],
            "meta": out["meta"], "step": int(step),
            "frozen_version": None if ref is None else ref["version"]}

  def restore_variables(self, step: int, abstract: dict) -> dict:
    """restore's result for params / frozen / stats only ({"state", "config", "meta"}): the state
    item is read with orbax's partial restore (the optimizer state's files are never opened), the
    frozen version through the checkpointer (fingerprint-verified), and every restored leaf is
    checked finite. abstract: the saved state's abstract tree (its opt_state is ignored)."""
    d = self.step_dir(step)
    ref = self.frozen_ref(step)
    abstract = dict(abstract)
    abstract_frozen = abstract.pop("frozen", None) if ref is not None else None
    sub = {k: abstract[k] for k in ("params", "frozen", "stats") if k in abstract}
    try:
      with ocp.PyTreeCheckpointer() as pc:
        state = dict(pc.restore(d / "state", args=ocp.args.PyTreeRestore(
            item=sub, restore_args=ocp.checkpoint_utils.construct_restore_args(sub),
            partial_restore=True)))
    except Exception as e:  # orbax / tensorstore raise many types for torn files
      raise CheckpointError(f"checkpoint {d} is unreadable or incomplete "
                            f"({_first_line(e)}).") from e
    if ref is not None:
      state["frozen"] = ({} if ref["version"] is None else
                         self._restore_frozen(ref, abstract_frozen, d))
    _check_finite_tree(state, d)
    return {"state": state, "config": self.read_json(step, "config"),
            "meta": self.read_json(step, "meta")}

  def restore_latest(self, abstract_state, fallback_to_previous: bool = False, log=print,
                     check_config=None):
    """Newest readable checkpoint, or None when there is none at all (and none was ever
    recorded: a run directory whose checkpoints vanished refuses, see history_path).
    check_config: see restore (its error is the user's, never skipped by the fallback).

    fallback_to_previous: an unreadable newest step is skipped for the newest readable older
    one; the skipped steps (and their unreadable frozen versions) are moved aside only once a
    readable step was found, so the run is never left without a checkpoint."""
    self.log = log
    steps = self.steps()
    if not steps:
      self._refuse_silent_restart()
      return None
    self._record_history(steps)
    errors = []
    for step in reversed(steps):
      try:
        out = self.restore(step, abstract_state, check_config)
      except CheckpointError as e:
        if not fallback_to_previous:
          raise
        errors.append((step, e))
        continue
      for s, e in errors:
        moved = self.set_aside(s)
        log(f"warning: skipping checkpoint {self.step_dir(s)}: it is unreadable "
            f"(--fallback_to_previous); moved it to {moved}.")
      for v in sorted({e.version for _, e in errors if isinstance(e, FrozenVersionError)}):
        if v != out["frozen_version"] and not self.frozen_users(v):
          moved = self.set_aside_frozen(v)   # never reused by a later save of that version
          log(f"warning: moved the unreadable frozen base {self.frozen_dir(v)} to {moved}.")
      return out
    raise CheckpointError(
        f"no checkpoint in {self.directory} is readable (tried steps {steps[::-1]}; the newest "
        f"failed with: {str(errors[0][1]).rstrip('.')}); nothing was moved aside, so no "
        f"checkpoint is lost: repair or restore the files named above, or to start this run "
        f"over from step 0 move {self.directory} away and delete {self.history_path()}.")

  def set_aside(self, step: int) -> pathlib.Path:
    """Move an unreadable step out of the manager's sight (kept for inspection, not deleted)."""
    src = self.step_dir(step)
    dst = self.directory.parent / f"{self.directory.name}.unreadable" / f"{step}-{int(time.time())}"
    dst.parent.mkdir(parents=True, exist_ok=True)
    src.rename(dst)
    self._refs.pop(int(step), None)
    self.manager.reload()
    return dst

  def set_aside_frozen(self, version: int, copies=(False, True)) -> pathlib.Path | None:
    """Move an unreadable frozen version (both copies by default) out of sight (steps using it
    then report it missing). Returns where the first moved copy went."""
    first = None
    for copy in copies:
      src = self.frozen_dir(version, copy)
      if not src.exists():
        continue
      dst = (self.directory.parent / f"{self.directory.name}.unreadable" /
             f"{'frozen_copy' if copy else 'frozen'}-{version}-{int(time.time())}")
      dst.parent.mkdir(parents=True, exist_ok=True)
      src.rename(dst)
      self._fm(copy=copy).reload()
      first = first or dst
    self._verified.pop(int(version), None)
    return first

  def read_json(self, step: int, item: str):
    out = self.manager.restore(int(step), args=ocp.args.Composite(
        **{item: ocp.args.JsonRestore()}))
    return out[item]

  def last_good(self, bound: float = SANE_PARAM_ABS) -> str:
    """Words naming the newest checkpoint whose loss was finite and whose largest |parameter|
    was within `bound` when saved (for the non-finite stop), or saying none is known good."""
    try:
      self._finish_in_flight()
    except CheckpointSaveError:
      pass
    steps = self.steps()
    if not steps:
      return "none yet"
    skipped = []
    for s in reversed(steps):
      try:
        loss = self.read_json(s, "meta").get("loss")
        rec = self.checksums(s)
      except Exception:
        skipped.append(f"{s} (unreadable)")
        continue
      if loss is not None and not math.isfinite(float(loss)):
        skipped.append(f"{s} (loss {loss})")
        continue
      absmax = None if rec is None else rec.get("param_absmax")
      if rec is not None and (absmax is None or absmax > bound):
        skipped.append(f"{s} (largest |parameter| {absmax if absmax is not None else 'non-finite'})")
        continue
      note = ("" if rec is not None else "; its parameters were not measured when it was saved, "
              "so it may already be bad")
      sk = f"; skipped newer {', '.join(skipped)}" if skipped else ""
      return f"{self.step_dir(s)} (left intact{note}{sk})"
    return (f"none: every checkpoint in {self.directory} has a non-finite loss or parameters "
            f"beyond {bound:g} ({', '.join(skipped)}), so they may already be bad (left intact)")

  def state_metadata(self, step: int):
    """Metadata tree of the step's state, its frozen version's tree under "frozen"."""
    md = self.manager.item_metadata(int(step))["state"]
    ref = self.frozen_ref(step)
    if ref is None or ref["version"] is None:
      return md
    md = dict(md)
    md["frozen"] = self.frozen_metadata(ref["version"])
    return md

  def frozen_metadata(self, version: int):
    for copy in (False, True):
      fm = self._fm(copy=copy)
      if fm is not None and int(version) in fm.all_steps():
        try:
          return fm.item_metadata(int(version))["frozen"]
        except Exception:
          continue
    raise CheckpointError(f"frozen base {self.frozen_dir(version)} does not exist.")


# ------------------------------------------------------------------------------ state checksums
def _sums_on_device(leaves) -> bool:
  """Sum on the devices where the arrays are not all on this host's CPU (GPU: no host copy)."""
  if jax.process_count() > 1:
    return True
  for x in leaves:
    if isinstance(x, jax.Array):
      if not x.is_fully_addressable:
        return True
      if any(dv.platform != "cpu" for dv in x.devices()):
        return True
  return False


def _absmax(leaves) -> float:
  floats = [x for x in leaves if np.issubdtype(np.dtype(x.dtype), np.floating) and np.size(x)]
  if not floats:
    return 0.0
  if _sums_on_device(floats):
    return float(jax.device_get(_ABSMAX_JIT([jnp.asarray(x) for x in floats])))
  out = 0.0
  for x in floats:
    a = np.asarray(x)
    m = float(np.max(np.abs(a)).astype(np.float64))
    out = max(out, m) if m == m else float("nan")
    if out != out:
      return out
  return out


_ABSMAX_JIT = jax.jit(lambda xs: jnp.max(jnp.stack(
    [jnp.max(jnp.abs(x.astype(jnp.float32))) for x in xs])))


def state_checksums(state: dict) -> dict:
  """The `checksums` record of a step: per leaf [shape, dtype, [weighted sum, sum]] of its
  bits (leaf_sums), and the largest |parameter| (None when a parameter is not finite)."""
  flat = [(nn.path_str(p), x) for p, x in jax.tree_util.tree_flatten_with_path(state)[0]]
  leaves = [x if hasattr(x, "dtype") else np.asarray(x) for _, x in flat]
  sums = leaf_sums(leaves, on_device=_sums_on_device(leaves))
  rec = {p: [list(np.shape(x)), str(np.dtype(x.dtype)), s]
         for (p, _), x, s in zip(flat, leaves, sums)}
  params = jax.tree_util.tree_leaves(state.get("params", {}))
  m = _absmax(params)
  return {"format": CHECKSUM_FORMAT, "leaves": rec,
          "param_absmax": m if math.isfinite(m) else None}


# ------------------------------------------------------------------------------ fingerprints
def _tqp_bits(config_json):
  t = (config_json or {}).get("tqp") or {}
  return int(t["bits"]) if t.get("enabled") and t.get("bits") is not None else None


_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32}
_HOST_BLOCK = 1 << 24      # elements per block of the host checksum
_WEIGHT_MOD = 65521


def _u32_host(a: np.ndarray) -> np.ndarray:
  a = np.ascontiguousarray(a)
  if a.dtype == np.bool_:
    return a.astype(np.uint32)
  if a.dtype.itemsize == 8:
    return a.view(np.uint32)
  return a.view(_UINT[a.dtype.itemsize]).astype(np.uint32)


def _leaf_sums_host(a, block: int = _HOST_BLOCK) -> list[int]:
  """In blocks of `block` elements: the working memory is a few blocks, not a multiple of the
  leaf (the 120B's frozen tree is 61 GB; whole-leaf uint32 copies would need ~8x that)."""
  flat = np.asarray(a).reshape(-1)
  mask = (1 << 32) - 1
  wsum = tot = pos = 0          # pos: offset in uint32 words (8-byte values are two words)
  for i in range(0, flat.size, block):
    u = _u32_host(flat[i:i + block]).reshape(-1)
    w = ((np.arange(pos, pos + u.size, dtype=np.uint64) % _WEIGHT_MOD) + 1).astype(np.uint32)
    wsum += int((u * w).sum(dtype=np.uint64))
    tot += int(u.sum(dtype=np.uint64))
    pos += u.size
  return [wsum & mask, tot & mask]


def _u32_device(x):
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  n = np.dtype(x.dtype).itemsize
  if n == 8:
    return jax.lax.bitcast_convert_type(x, jnp.uint32)
  return jax.lax.bitcast_convert_type(x, jnp.dtype(_UINT[n])).astype(jnp.uint32)


def _leaf_sums_device_one(x):
  u = _u32_device(x)
  idx = jnp.zeros(u.shape, jnp.uint32)
  stride = 1
  for ax in reversed(range(u.ndim)):          # the row-major linear index, modulo 2**32
    idx = idx + jax.lax.broadcasted_iota(jnp.uint32, u.shape, ax) * jnp.uint32(stride % (1 << 32))
    stride *= u.shape[ax]
  w = idx % jnp.uint32(_WEIGHT_MOD) + jnp.uint32(1)
  return jnp.stack([jnp.sum(u * w, dtype=jnp.uint32), jnp.sum(u, dtype=jnp.uint32)])


_SUMS_JIT: dict = {}


def _leaf_sums_device(leaves):
  """One jit over the tree; the sums come back replicated (readable on every process)."""
  mesh = next((x.sharding.mesh for x in leaves
               if isinstance(getattr(x, "sharding", None), jax.sharding.NamedSharding)), None)
  if mesh not in _SUMS_JIT:
    out = None if mesh is None else jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    _SUMS_JIT[mesh] = jax.jit(lambda xs: [_leaf_sums_device_one(x) for x in xs],
                              out_shardings=out)
  return _SUMS_JIT[mesh](leaves)


def leaf_sums(leaves, on_device: bool | None = None) -> list[list[int]]:
  """Per leaf [position-weighted sum, plain sum] of its bits as uint32 words, modulo 2**32
  (integer sums: the same for any sharding or reduction order)."""
  if on_device is None:      # the host path, leaf by leaf in blocks, unless the arrays are not all here
    on_device = jax.process_count() > 1 or not all(
        getattr(x, "is_fully_addressable", True) for x in leaves)
  if not on_device:
    return [_leaf_sums_host(x) for x in leaves]
  out = jax.device_get(_leaf_sums_device([jnp.asarray(x) for x in leaves]))
  return [[int(v) for v in np.asarray(o)] for o in out]


def frozen_fingerprint(frozen, tqp_bits=None, sums: bool = True) -> dict:
  """{"leaves": {path: [shape, dtype, [wsum, sum]]}, "n_bytes", "tqp_bits", "checksum"}."""
  flat = jax.tree_util.tree_flatten_with_path(frozen)[0]
  paths = [nn.path_str(p) for p, _ in flat]
  leaves = [x for _, x in flat]
  s = leaf_sums(leaves) if sums else [None] * len(leaves)
  rec = {p: [list(np.shape(x)), str(np.dtype(x.dtype)), v] for p, x, v in zip(paths, leaves, s)}
  n_bytes = sum(math.prod(np.shape(x)) * np.dtype(x.dtype).itemsize for x in leaves)
  digest = hashlib.sha256(json.dumps(rec, sort_keys=True).encode()).hexdigest()[:16]
  return {"leaves": rec, "n_bytes": int(n_bytes), "tqp_bits": tqp_bits,
          "checksum": digest if sums else None}


def _structure(fp) -> dict:
  return {p: v[:2] for p, v in fp["leaves"].items()}


def same_fingerprint(a, b) -> bool:
  return a is not None and b is not None and a["leaves"] == b["leaves"]


def fingerprint_diff(want, got) -> str:
  """The first difference between two fingerprints, in words."""
  for p in sorted(set(want["leaves"]) | set(got["leaves"])):
    a, b = want["leaves"].get(p), got["leaves"].get(p)
    if a is None or b is None:
      return f"{p} is {'missing' if b is None else 'unexpected'}"
    if a[:2] != b[:2]:
      return f"{p} is {b[0]}/{b[1]}, expected {a[0]}/{a[1]}"
    if a[2] != b[2]:
      return f"{p} has checksum {b[2]}, expected {a[2]}"
  return "no difference"


def _codes_bits(struct: dict, codes_path: str):
  signs = struct.get(codes_path[:-len("codes")] + "signs")
  if not signs or not struct[codes_path][0] or not signs[0][-1:]:
    return None
  return struct[codes_path][0][-1] * 8 // signs[0][-1]


def check_frozen_matches(ref, abstract_frozen, d, fdir):
  """Refuse a stored frozen tree whose leaves do not match the model being restored (before
  any array is read): a TQP base of other bits gets one sentence naming both."""
  have = _structure(ref["fingerprint"])
  want = {nn.path_str(p): [list(x.shape), str(np.dtype(x.dtype))]
          for p, x in jax.tree_util.tree_flatten_with_path(abstract_frozen)[0]}
  if have == want:
    return
  for p in sorted(set(have) & set(want)):
    if p.endswith("/codes") and have[p] != want[p]:
      got, exp = ref["fingerprint"].get("tqp_bits") or _codes_bits(have, p), _codes_bits(want, p)
      if got and exp and got != exp:
        raise CheckpointError(
            f"checkpoint {d} holds a {got}-bit TQP quantized base ({fdir}) but the config has "
            f"tqp.bits={exp}; set tqp.bits={got} to resume it, or quantize the source again "
            f"(python -m growth.to_tqp) with tqp.bits={exp}.")
  missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
  if missing or extra:
    what = (f"lacks {missing[0]}" if missing else f"has {extra[0]}, which the model does not")
  else:
    p = next(p for p in sorted(want) if have[p] != want[p])
    what = f"has {p} as {have[p][0]}/{have[p][1]} but the model expects {want[p][0]}/{want[p][1]}"
  raise CheckpointError(f"checkpoint {d}'s frozen base {fdir} does not match the model being "
                        f"restored: it {what}; expected a checkpoint of the same architecture.")


def _check_finite_tree(state, d):
  """Every floating leaf finite: one compiled reduction over the tree (not one small program per
  leaf shape, which costs a compile each on a restore of a sharded, multi-process state)."""
  flat = [(path, np.asarray(leaf) if not isinstance(leaf, jax.Array) else leaf)
          for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]]
  flat = [(p, a) for p, a in flat if hasattr(a, "dtype") and np.issubdtype(a.dtype, np.floating)]
  if not flat:
    return
  groups: dict = {}              # leaves on the same devices go through one program
  for i, (_, a) in enumerate(flat):
    if isinstance(a, jax.Array):
      groups.setdefault(frozenset(d.id for d in a.sharding.device_set), []).append(i)
  ok = {}
  for idx in groups.values():
    ok.update(zip(idx, np.asarray(jax.device_get(_finite_device([flat[i][1] for i in idx])))))
  for i, (path, a) in enumerate(flat):
    if not (bool(ok[i]) if i in ok else bool(np.isfinite(a).all())):
      raise CheckpointError(f"checkpoint {d} holds non-finite values at "
                            f"{jax.tree_util.keystr(path)}; it is corrupt.")


def _finite_device(leaves):
  """[all finite] per leaf, one jit over the list; the result replicated (read on any process)."""
  mesh = next((x.sharding.mesh for x in leaves
               if isinstance(getattr(x, "sharding", None), jax.sharding.NamedSharding)
               and x.sharding.mesh.size == len(x.sharding.device_set)), None)
  key = ("finite", mesh)
  if key not in _SUMS_JIT:
    out = None if mesh is None else jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    _SUMS_JIT[key] = jax.jit(lambda xs: jnp.stack([jnp.isfinite(x).all() for x in xs]),
                             out_shardings=out)
  return _SUMS_JIT[key](leaves)


def abstract_with_shardings(tree, shardings):
  return jax.tree_util.tree_map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def config_to_json(cfg) -> dict:
  return json.loads(cfg.to_json_best_effort())


def config_ns(keep=3, every_steps=0, every_seconds=0, async_save=False):
  """A checkpoint config section for tools that only read (launch.inspect)."""
  return ConfigDict({"keep": keep, "every_steps": every_steps, "every_seconds": every_seconds,
                     "async_save": async_save, "frozen_copies": 2})
