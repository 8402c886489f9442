"""The run-directory lock: one training process per run directory.

`lock(workdir, log)` creates (or takes over) `<workdir>/run.lock` holding {"pid", "host",
"time"}, and holds an exclusive `fcntl.flock` on it for as long as the process lives. A second
process on the same directory gets one sentence (RunDirLocked) naming the holder's pid and host.

Stale locks (a holder killed with -9, a crashed node): the kernel drops the flock when its holder
dies, so a lock file whose flock is free is stale; it is taken over with a message naming the
previous holder. Where the file system has no flock (some network file systems), the recorded pid
decides: a dead pid on this host is stale and taken over; a live pid, or any pid on another host,
is a holder (delete the file by hand if that host's process is really gone).

Within one process the lock is re-entrant (tests and tools call launch.train's train() several
times on one directory); `release(workdir)` drops it, and it is dropped at interpreter exit. With
several JAX processes (multi-host), process i locks `run.lock.<i>`, so two launches still collide.
"""
from __future__ import annotations

import atexit
import errno
import fcntl
import json
import os
import pathlib
import socket
import time

import jax

from lightning_jax.checkpoint import CheckpointError

LOCK_NAME = "run.lock"


class RunDirLocked(CheckpointError):
  """Another process holds the run directory (one sentence names its pid and host)."""


_HELD: dict[pathlib.Path, int] = {}      # lock path -> open file descriptor (this process)


def _lock_path(workdir) -> pathlib.Path:
  name = LOCK_NAME
  try:
    if jax.process_count() > 1:
      name = f"{LOCK_NAME}.{jax.process_index()}"
  except Exception:       # jax not initialised for several processes: one process
    pass
  return pathlib.Path(workdir).absolute() / name


def _read(fd) -> dict | None:
  os.lseek(fd, 0, os.SEEK_SET)
  raw = os.read(fd, 4096)
  if not raw.strip():
    return None
  try:
    rec = json.loads(raw.decode("utf-8", "replace"))
    return rec if isinstance(rec, dict) else {}
  except ValueError:
    return {}


def _pid_alive(pid) -> bool:
  try:
    os.kill(int(pid), 0)
  except ProcessLookupError:
    return False
  except PermissionError:     # exists, owned by someone else
    return True
  except (TypeError, ValueError, OverflowError):
    return False
  return True


def _describe(rec) -> str:
  if not rec:
    return "an unknown process (the lock file is empty or unreadable)"
  since = rec.get("time")
  when = (f", since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(since))}"
          if isinstance(since, (int, float)) else "")
  return f"pid {rec.get('pid')} on host {rec.get('host')}{when}"


def lock(workdir, log=print) -> pathlib.Path:
  """Take the run directory's lock (or raise RunDirLocked naming the holder)."""
  path = _lock_path(workdir)
  if path in _HELD:
    return path
  path.parent.mkdir(parents=True, exist_ok=True)
  host = socket.gethostname()
  for _ in range(5):
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    flock_ok = True
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      rec = _read(fd)
      os.close(fd)
      raise RunDirLocked(
          f"run directory {path.parent} is in use by {_describe(rec)} (lock {path}); wait for "
          f"that run to finish or stop it, or use another --workdir.") from None
    except (ImportError, OSError) as e:   # no flock here: the recorded pid decides
      if isinstance(e, OSError) and e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS,
                                                     errno.EINVAL):
        os.close(fd)
        raise
      flock_ok = False
    try:
      st_fd, st_path = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
      st_path = None
    if st_path is None or st_fd.st_ino != st_path.st_ino:
      os.close(fd)             # released and removed meanwhile by its holder: try again
      continue
    rec = _read(fd)
    if rec is not None and rec.get("pid") != os.getpid():
      same_host = rec.get("host") == host
      if not flock_ok and (not same_host or _pid_alive(rec.get("pid"))):
        os.close(fd)
        raise RunDirLocked(
            f"run directory {path.parent} is in use by {_describe(rec)} (lock {path}; this file "
            f"system has no flock, so the recorded process decides); wait for it, stop it, or "
            f"delete {path} if that process is gone.")
      log(f"note: taking over the stale lock {path} of {_describe(rec)}: that process is gone.")
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, json.dumps({"pid": os.getpid(), "host": host, "time": time.time()}).encode())
    os.fsync(fd)
    _HELD[path] = fd
    return path
  raise RunDirLocked(f"could not take the lock {path}: it kept being replaced by another process.")


def release(workdir) -> None:
  """Drop this process's lock on the run directory (nothing if it holds none)."""
  path = _lock_path(workdir)
  fd = _HELD.pop(path, None)
  if fd is None:
    return
  try:
    os.unlink(path)          # while still holding the flock: nobody else has taken it
  except OSError:
    pass
  os.close(fd)


def _release_all():
  for path in list(_HELD):
    release(path.parent)


atexit.register(_release_all)
