"""A watchdog for the training loop: a phase that runs far longer than it should stops the run.

launch.train wraps each phase of a run in `Watchdog.phase(kind, label)`: "compile" (building the
train step and the held-out evaluation), "step" (one optimizer step: the next batch, the step
and reading its loss back), "eval" and "save". A thread checks the running phase's deadline:

  * a kind with measured history (the last `HISTORY` completed phases of that kind):
      budget = max(train.watchdog_min_s, train.watchdog_factor x their median time);
  * a kind with none yet (compile, the first step, the first eval or save, each of which may
    include compiling): budget = train.watchdog_compile_s.

A phase past its budget cannot be interrupted from Python (the main thread waits inside XLA),
so the watchdog reports one sentence naming the phase ("step 12", "compile", "eval at step 25",
"save at step 50"), its time and budget, and calls `on_timeout(message)`; the default action
(`exit_process`) writes the message to stderr and ends the process with exit code `EXIT_CODE`.
Checkpoints are written atomically, so the last complete checkpoint stays readable and the same
command resumes from it.

Config (configs/common.py, train.*): watchdog_factor (0 = no step budget), watchdog_min_s,
watchdog_compile_s (0 = no budget for phases without history); `check_config` validates them.
"""
from __future__ import annotations

import contextlib
import math
import os
import statistics
import sys
import threading
import time
from typing import Callable

from lightning_jax.config import ConfigError

EXIT_CODE = 3          # the process exit code when the watchdog stops a run
HISTORY = 50           # completed phases per kind kept for the median
POLL_S = 0.5           # how often the thread checks the deadline (at most)


def check_config(cfg) -> None:
  """One sentence per bad watchdog field."""
  t = cfg.train
  f, lo, c = t.watchdog_factor, t.watchdog_min_s, t.watchdog_compile_s
  for name, v in (("watchdog_factor", f), ("watchdog_min_s", lo), ("watchdog_compile_s", c)):
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
      raise ConfigError(f"train.{name}={v!r} must be a finite number.")
  if f != 0 and f < 2:
    raise ConfigError(f"train.watchdog_factor={f} must be 0 (off) or at least 2 (a step may "
                      f"take this many times the median step time before the run stops).")
  if lo <= 0:
    raise ConfigError(f"train.watchdog_min_s={lo} must be positive (the least time any step "
                      f"is allowed before the watchdog stops the run).")
  if c < 0:
    raise ConfigError(f"train.watchdog_compile_s={c} must be >= 0 (0: no budget for compiling "
                      f"and the first step).")


def exit_process(message: str) -> None:
  """Default timeout action: the sentence on stderr, then end the process (no cleanup: the
  main thread is stuck inside XLA and would never reach it)."""
  try:
    sys.stdout.flush()
    print(f"error: {message}", file=sys.stderr, flush=True)
  finally:
    os._exit(EXIT_CODE)


class Watchdog:
  """Deadlines for the phases of a training run (see module docstring).

  `on_timeout(message)` runs on the watchdog thread once, when a phase overruns; `note(message)`
  (optional) is called first, e.g. to append the message to metrics.jsonl.
  """

  def __init__(self, factor: float, min_s: float, compile_s: float, *,
               on_timeout: Callable[[str], None] = exit_process,
               note: Callable[[str], None] | None = None, clock=time.monotonic,
               poll_s: float = POLL_S):
    self.factor, self.min_s, self.compile_s = float(factor), float(min_s), float(compile_s)
    self.on_timeout, self.note, self.clock, self.poll_s = on_timeout, note, clock, poll_s
    self.history: dict[str, list[float]] = {}
    self._lock = threading.Lock()
    self._current = None          # (label, started, budget, why, kind)
    self._wake = threading.Event()
    self._closed = False
    self.fired: str | None = None
    self.acted = False            # on_timeout returned (an embedding's or a test's action)
    self._thread = None

  @classmethod
  def from_config(cls, cfg, **kw) -> "Watchdog":
    check_config(cfg)
    t = cfg.train
    return cls(t.watchdog_factor, t.watchdog_min_s, t.watchdog_compile_s, **kw)

  # -------------------------------------------------------------------- budgets
  def budget(self, kind: str) -> tuple[float, str]:
    """(seconds, how it was chosen) for the next phase of `kind`; inf when unbounded."""
    hist = self.history.get(kind, [])
    if kind != "compile" and hist and self.factor > 0:
      med = statistics.median(hist)
      b = max(self.min_s, self.factor * med)
      return b, (f"train.watchdog_factor={self.factor:g} x the median {kind} time {med:.3g} s, "
                 f"at least train.watchdog_min_s={self.min_s:g}")
    if (kind == "compile" or not hist) and self.compile_s > 0:
      return self.compile_s, (f"train.watchdog_compile_s={self.compile_s:g} for compiling and "
                              f"each first {kind}" if kind != "compile" else
                              f"train.watchdog_compile_s={self.compile_s:g}")
    return math.inf, "no budget"

  # -------------------------------------------------------------------- phases
  @contextlib.contextmanager
  def phase(self, kind: str, label: str | None = None):
    """Run the body under `kind`'s budget; its time joins the kind's history on success."""
    self.begin(kind, label)
    ok = False
    try:
      yield
      ok = True
    finally:
      if ok:
        self.end()
      else:
        with self._lock:
          self._current = None

  def begin(self, kind: str, label: str | None = None):
    """Start a phase (the statement form of `phase`; `end` closes it)."""
    label = label or kind
    budget, why = self.budget(kind)
    with self._lock:
      self._current = (label, self.clock(), budget, why, kind)
    if budget < math.inf:
      self._ensure_thread()
      self._wake.set()

  def end(self) -> float:
    """Close the running phase; its time joins its kind's history. Returns the time."""
    with self._lock:
      cur, self._current = self._current, None
    if cur is None:
      return 0.0
    label, t0, budget, why, kind = cur
    dt = self.clock() - t0
    h = self.history.setdefault(kind, [])
    h.append(dt)
    del h[:-HISTORY]
    return dt

  def _ensure_thread(self):
    if self._thread is None:
      self._thread = threading.Thread(target=self._run, name="lightning_jax-watchdog", daemon=True)
      self._thread.start()

  def check(self) -> str | None:
    """The timeout message if the running phase is past its budget (and fire once), else None."""
    with self._lock:
      cur = self._current
    if cur is None or self.fired is not None:
      return None
    label, t0, budget, why, _ = cur
    ran = self.clock() - t0
    if ran <= budget:
      return None
    msg = (f"the watchdog stopped the run: {label} has run {ran:.1f} s, past its budget of "
           f"{budget:.1f} s ({why}); the last complete checkpoint is intact and the same command "
           f"resumes from it (raise the train.watchdog_* fields if this phase is legitimately "
           f"slow).")
    self.fired = msg
    if self.note is not None:
      try:
        self.note(msg)
      except Exception:       # the note is best effort; stopping is what matters
        pass
    self.on_timeout(msg)
    self.acted = True
    return msg

  def _run(self):
    while not self._closed:
      with self._lock:
        cur = self._current
      if cur is None:
        self._wake.wait(self.poll_s)
        self._wake.clear()
        continue
      _, t0, budget, _, _ = cur
      left = budget - (self.clock() - t0)
      if left > 0:
        time.sleep(min(self.poll_s, max(left, 0.01)))
        continue
      self.check()
      if self.fired is not None:
        return

  def close(self):
    self._closed = True
    self._wake.set()


def compile_all(wd: Watchdog, log, parts) -> dict:
  """Compile each (name, thunk) under the "compile" budget, logging "compiling <name> ..." and
  its time; returns {name: seconds}."""
  out = {}
  for name, thunk in parts:
    log(f"compiling {name} ...")
    with wd.phase("compile", f"compiling {name}"):
      t0 = time.perf_counter()
      thunk()
      out[name] = time.perf_counter() - t0
    log(f"compiled {name} in {out[name]:.1f} s")
  return out


class Stopped(RuntimeError):
  """The watchdog fired during an injected hang and its action returned instead of ending the
  process (an embedding's or a test's on_timeout); the message is the watchdog's."""


def hang_forever(wd: Watchdog | None = None, poll_s: float = 0.1):
  """Fault injection (launch.train --debug_hang_step): block like a step that never finishes.

  The default watchdog action ends the process from the watchdog thread, so this never returns.
  When the action returns instead (`wd.acted`), raise Stopped with the watchdog's message, so a
  caller's action needs no way of interrupting the main thread."""
  while True:
    time.sleep(poll_s)
    if wd is not None and wd.acted:
      raise Stopped(wd.fired)
