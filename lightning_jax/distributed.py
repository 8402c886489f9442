"""Multi-process (multi-host) training through JAX's own distributed runtime.

One process per host, each driving its local devices (`jax.distributed.initialize`); every
process runs the same program on the global mesh and JAX's collectives (NCCL on GPU, gloo on CPU)
join them. This module holds what launch.train needs beyond one process:

  * `from_environment`: who this process is, from flags (coordinator address, number of processes,
    process id), else from the environment: JAX's own variables (JAX_COORDINATOR_ADDRESS,
    JAX_NUM_PROCESSES, JAX_PROCESS_ID), SLURM (SLURM_NTASKS, SLURM_PROCID, the first host of
    SLURM_STEP_NODELIST / SLURM_JOB_NODELIST), or the variables torchrun-style launchers set
    (MASTER_ADDR, MASTER_PORT, WORLD_SIZE, RANK; OpenMPI's OMPI_COMM_WORLD_SIZE / _RANK with
    MASTER_ADDR). One process (or none of these) means a plain single-process run.
  * `initialize`: jax.distributed.initialize with a timeout; an unreachable coordinator is one
    sentence (DistributedError). On CPU the collectives are gloo's.
  * `ordered_devices`: the global devices process by process, so a (data, expert, tensor) mesh
    built from them puts "data" across hosts and "expert" / "tensor" inside a host whenever
    mesh.expert x mesh.tensor divides the local device count (sharding.make_mesh).
  * `check_agreement`: every process hashes its resolved config and the package's code at start;
    a process that disagrees with process 0 is named, with the fields or files that differ.
  * `check_batch`: the process count must divide the global (and held-out) batch.
  * `local_rows` / `global_batch`: each process holds only its own contiguous rows of the global
    batch, assembled with jax.make_array_from_process_local_data.
  * `gather_loader_state` / `own_loader_state`: the checkpoint's loader record holds every
    process's own loader state; on resume each process takes its own back.
  * failures: `fail(message)` publishes one process's failure in the coordination service and
    ends that process; a watcher thread in every other process sees it within POLL_S seconds and
    ends its process naming the failing one (no process waits forever in a collective). A
    process that loses the coordinator (process 0 gone) ends too, saying so.

Logging: metrics, the progress bar and notes come from process 0 only (`is_primary`).
"""
from __future__ import annotations

import atexit
import contextlib
import dataclasses
import hashlib
import json
import os
import pathlib
import re
import socket
import sys
import threading
import time

import jax
import numpy as np
from jax._src import distributed as _dist

from lightning_jax.config import ConfigError

REPO = pathlib.Path(__file__).resolve().parents[1]
CODE_DIRS = ("lightning_jax", "launch", "configs")   # hashed for the code-version agreement
POLL_S = 0.5                   # how often the failure watcher looks at the coordination service
KV_TIMEOUT_S = 300             # waiting for another process's record (it may still be compiling)
EXIT_PEER = 4                  # exit code of a process stopped because another one failed
SLURM_PORT_BASE = 61440        # SLURM: coordinator port = base + job id mod 4096 (like JAX's own)


class DistributedError(ConfigError):
  """A multi-process launch is wrong or broken; one sentence names the process and the cause."""


@dataclasses.dataclass(frozen=True)
class Launch:
  coordinator: str            # host:port of process 0's coordination service
  num_processes: int
  process_id: int
  source: str                 # where these came from (flags, SLURM, ...), for messages


# ----------------------------------------------------------------------------- who am I
def _int(env, name, source) -> int:
  v = env.get(name, "")
  try:
    return int(v)
  except ValueError:
    raise DistributedError(f"{source}: {name}={v!r} is not an integer.") from None


def slurm_first_host(nodelist: str) -> str:
  """The first host of a SLURM node list: 'gpu[03-05,9],cpu1' -> 'gpu03'."""
  first = re.split(r",(?![^\[]*\])", nodelist.strip())[0]
  m = re.fullmatch(r"([^\[]*)\[([^\]]+)\](.*)", first)
  if not m:
    return first
  prefix, ranges, suffix = m.groups()
  return prefix + ranges.split(",")[0].split("-")[0] + suffix


def from_environment(coordinator: str = "", num_processes: int = 0, process_id: int = -1,
                     env=None) -> Launch | None:
  """This process's place in a multi-process launch, or None for a single process.

  Flags win; then JAX_*, SLURM, torchrun / OpenMPI variables (module docstring)."""
  env = os.environ if env is None else env
  if coordinator or num_processes or process_id >= 0:
    missing = [f for f, ok in (("--coordinator_address", coordinator),
                               ("--num_processes", num_processes > 0),
                               ("--process_id", process_id >= 0)) if not ok]
    if missing:
      raise DistributedError(f"a multi-process launch by flags needs --coordinator_address, "
                             f"--num_processes and --process_id; {', '.join(missing)} "
                             f"{'is' if len(missing) == 1 else 'are'} missing.")
    launch = Launch(coordinator, int(num_processes), int(process_id), "flags")
  elif env.get("JAX_COORDINATOR_ADDRESS") and env.get("JAX_NUM_PROCESSES"):
    launch = Launch(env["JAX_COORDINATOR_ADDRESS"], _int(env, "JAX_NUM_PROCESSES", "environment"),
                    _int(env, "JAX_PROCESS_ID", "environment"), "JAX_* variables")
  elif env.get("SLURM_JOB_ID") and (env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS")):
    n = _int(env, "SLURM_STEP_NUM_TASKS" if env.get("SLURM_STEP_NUM_TASKS") else "SLURM_NTASKS",
             "SLURM")
    nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or ""
    if n > 1 and not nodes:
      raise DistributedError("SLURM: SLURM_NTASKS > 1 but neither SLURM_STEP_NODELIST nor "
                             "SLURM_JOB_NODELIST is set; expected srun to set them (or pass "
                             "--coordinator_address).")
    port = (int(env["LJX_COORDINATOR_PORT"]) if env.get("LJX_COORDINATOR_PORT") else
            SLURM_PORT_BASE + _int(env, "SLURM_JOB_ID", "SLURM") % 4096)
    launch = Launch(f"{slurm_first_host(nodes)}:{port}" if nodes else "", n,
                    _int(env, "SLURM_PROCID", "SLURM"), "SLURM")
  elif env.get("MASTER_ADDR") and (env.get("WORLD_SIZE") or env.get("OMPI_COMM_WORLD_SIZE")):
    size, rank = (("WORLD_SIZE", "RANK") if env.get("WORLD_SIZE") else
                  ("OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK"))
    port = env.get("MASTER_PORT") or "29500"
    launch = Launch(f"{env['MASTER_ADDR']}:{port}", _int(env, size, "launcher"),
                    _int(env, rank, "launcher"), f"{size}/{rank}/MASTER_ADDR")
  else:
    return None
  if launch.num_processes < 1 or not 0 <= launch.process_id < launch.num_processes:
    raise DistributedError(f"{launch.source}: process id {launch.process_id} must be in "
                           f"[0, {launch.num_processes}) (the number of processes).")
  if launch.num_processes == 1:
    return None
  if ":" not in launch.coordinator:
    raise DistributedError(f"{launch.source}: coordinator address {launch.coordinator!r} must be "
                           f"host:port (process 0's host and a free port).")
  return launch


# ----------------------------------------------------------------------------- start / stop
_STATE: dict = {"launch": None, "watcher": None, "stop": None, "calls": 0}


def active() -> bool:
  return _STATE["launch"] is not None


def is_primary() -> bool:
  return jax.process_index() == 0


def _client():
  return _dist.global_state.client


def initialize(launch: Launch, timeout_s: int = 300, heartbeat_s: int = 100) -> None:
  """jax.distributed.initialize for `launch`; an unreachable coordinator is one sentence."""
  if launch.process_id != 0:     # XLA ends the process (no exception) on an unreachable one
    _wait_for_coordinator(launch, timeout_s)
  if hasattr(jax.config, "jax_cpu_collectives_implementation"):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  try:
    jax.distributed.initialize(coordinator_address=launch.coordinator,
                               num_processes=launch.num_processes,
                               process_id=launch.process_id,
                               initialization_timeout=int(timeout_s),
                               heartbeat_timeout_seconds=int(heartbeat_s))
  except Exception as e:     # XLA raises its own status types (DEADLINE_EXCEEDED, UNAVAILABLE)
    first = (str(e).strip().splitlines() or [""])[0][:200]
    raise _unreachable(launch, timeout_s, f"{type(e).__name__}: {first}") from None
  _STATE["launch"] = launch
  stop = threading.Event()
  t = threading.Thread(target=_watch, args=(stop,), name="ljx-failure-watcher", daemon=True)
  _STATE["stop"], _STATE["watcher"] = stop, t
  t.start()
  atexit.register(stop_watching)     # runs before jax's own shutdown (atexit is LIFO)


def _unreachable(launch: Launch, timeout_s, why: str) -> DistributedError:
  return DistributedError(
      f"process {launch.process_id} of {launch.num_processes} ({launch.source}) could not reach "
      f"the coordinator at {launch.coordinator} within {timeout_s} s ({why}); expected process 0 "
      f"to be running with the same coordinator address and that port to be open from this host.")


def _wait_for_coordinator(launch: Launch, timeout_s) -> None:
  """Wait until process 0's coordination service accepts TCP connections (at most timeout_s)."""
  host, _, port = launch.coordinator.rpartition(":")
  host = host.strip("[]")
  deadline = time.monotonic() + float(timeout_s)
  why = "no answer"
  while True:
    try:
      with socket.create_connection((host, int(port)), timeout=max(0.1, min(
          2.0, deadline - time.monotonic()))):
        return
    except ValueError:
      raise DistributedError(f"{launch.source}: coordinator port {port!r} of "
                             f"{launch.coordinator!r} is not a number.") from None
    except OSError as e:
      why = f"{type(e).__name__}: {e.strerror or e}"
    if time.monotonic() >= deadline:
      raise _unreachable(launch, timeout_s, why)
    time.sleep(0.2)


def stop_watching() -> None:
  if _STATE["stop"] is not None:
    _STATE["stop"].set()


def _watch(stop: threading.Event) -> None:
  me = jax.process_index()
  while not stop.wait(POLL_S):
    try:
      entries = _client().key_value_dir_get("ljx/failed/")
    except Exception as e:       # the coordination service (process 0) is gone
      if stop.is_set():
        return
      _die(f"error: process {me} lost the coordinator at {_STATE['launch'].coordinator} "
           f"({(str(e).splitlines() or [''])[0][:160]}): process 0 ended or is unreachable; "
           f"stopping process {me} as well.", EXIT_PEER)
    others = sorted((k, v) for k, v in entries if not k.endswith(f"/{me}"))
    if others and not stop.is_set():
      _die(f"error: stopping process {me} because {others[0][1]}", EXIT_PEER)


def _die(message: str, code: int) -> None:
  try:
    sys.stdout.flush()
    print(message, file=sys.stderr, flush=True)
  finally:
    os._exit(code)


def fail(message: str, code: int = 1) -> None:
  """Publish this process's failure (`message`: one sentence) to every other process and end
  this process with `code` (without JAX's shutdown barrier, which would wait for the others)."""
  me = jax.process_index()
  stop_watching()
  text = f"process {me} ({socket.gethostname()}) failed: {message}"
  sys.stdout.flush()
  print(f"error: {message}" if not message.startswith("error:") else message, file=sys.stderr,
        flush=True)
  try:
    _client().key_value_set(f"ljx/failed/{me}", text)
    if me == 0:                  # the coordination service lives here: let the others read it
      time.sleep(3 * POLL_S)
  except Exception:              # the service is gone already: the others notice that instead
    pass
  os._exit(code)


# ----------------------------------------------------------------------------- agreement
def _kv_exchange(name: str, value: str) -> list[str]:
  """Every process's `value` for this exchange (a fresh key per call), in process order."""
  _STATE["calls"] += 1
  key = f"ljx/x/{_STATE['calls']}/{name}"
  c = _client()
  c.key_value_set(f"{key}/{jax.process_index()}", value)
  out = []
  for q in range(jax.process_count()):
    try:
      out.append(c.blocking_key_value_get(f"{key}/{q}", KV_TIMEOUT_S * 1000))
    except Exception as e:
      raise DistributedError(f"process {q} did not report its {name} within {KV_TIMEOUT_S} s "
                             f"({(str(e).splitlines() or [''])[0][:120]}); expected every "
                             f"process to start the same run.") from None
  return out


def code_files(root: pathlib.Path = REPO) -> dict[str, str]:
  """{relative path: sha256} of the package, launchers and stage configs (*.py)."""
  out = {}
  for d in CODE_DIRS:
    for p in sorted((root / d).rglob("*.py")):
      out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
  return out


def _flat(d, prefix=""):
  if isinstance(d, dict):
    for k, v in d.items():
      yield from _flat(v, f"{prefix}{k}.")
  else:
    yield prefix[:-1], d


def digest(obj) -> str:
  return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def check_agreement(config_json: dict, files: dict | None = None) -> None:
  """Every process must run the same resolved config and the same code: hashes are compared
  with process 0's; a disagreement names the process and the first fields / files that differ.
  `files`: {path: hash} of the code (default: code_files())."""
  if not active():
    return
  files = code_files() if files is None else files
  mine = {"config": config_json, "code": files,
          "config_hash": digest(config_json), "code_hash": digest(files)}
  allv = [json.loads(v) for v in _kv_exchange("config and code hashes", json.dumps(mine))]
  ref = allv[0]
  for q, v in enumerate(allv[1:], 1):
    for what, key, name in (("config", "config", "fields"), ("code", "code", "files")):
      if v[f"{what}_hash"] == ref[f"{what}_hash"]:
        continue
      a, b = dict(_flat(ref[key])), dict(_flat(v[key]))
      diffs = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
      shown = ", ".join(diffs[:3]) + (" ..." if len(diffs) > 3 else "")
      raise DistributedError(
          f"process {q}'s {what} (hash {v[f'{what}_hash']}) differs from process 0's (hash "
          f"{ref[f'{what}_hash']}) in {name} {shown}; every process must run the same {what} "
          f"(same flags and the same checkout on every host).")


def check_batch(cfg) -> None:
  """The process count must divide the global batch (and the held-out batch)."""
  n = jax.process_count()
  if n == 1:
    return
  t = cfg.train
  if t.global_batch % n:
    raise DistributedError(f"train.global_batch={t.global_batch} is not divisible by the {n} "
                           f"processes; expected a multiple of {n} (each process feeds an equal "
                           f"share of every batch).")
  if t.eval_every > 0 and t.eval_batch % n:
    raise DistributedError(f"train.eval_batch={t.eval_batch} is not divisible by the {n} "
                           f"processes; expected a multiple of {n}.")


@contextlib.contextmanager
def primary_first(name: str):
  """Process 0 runs the block first (e.g. preparing shards in a shared run directory); the others
  run it once process 0 has finished it. A no-op with one process."""
  if not active():
    yield
    return
  _STATE["calls"] += 1
  barrier = f"ljx/b/{_STATE['calls']}/{name}"
  if is_primary():
    yield
    _client().wait_at_barrier(barrier, KV_TIMEOUT_S * 1000 * 4)
  else:
    _client().wait_at_barrier(barrier, KV_TIMEOUT_S * 1000 * 4)
    yield


# ----------------------------------------------------------------------------- devices / data
def ordered_devices() -> list:
  """All devices, process by process (then by id): the order the mesh is built in."""
  return sorted(jax.devices(), key=lambda d: (d.process_index, d.id))


def local_rows(sharding, global_shape) -> tuple[int, int]:
  """[lo, hi): the rows of a global batch of `global_shape` that this process's devices hold
  under `sharding` (one contiguous run: the mesh is built process by process)."""
  idx = sharding.addressable_devices_indices_map(tuple(global_shape))
  rows = set()
  for sl in idx.values():
    s = sl[0] if sl else slice(None)
    rows.update(range(*s.indices(global_shape[0])))
  lo, hi = min(rows), max(rows) + 1
  if len(rows) != hi - lo:
    raise DistributedError(f"this process's devices hold rows {sorted(rows)[:8]}... of the "
                           f"global batch, not one contiguous run; expected the batch axes to be "
                           f"laid out process by process (mesh built from ordered_devices()).")
  return lo, hi


def global_batch(sharding, local: np.ndarray, global_shape):
  """The global batch from this process's rows (all of it when there is one process)."""
  return jax.make_array_from_process_local_data(sharding, np.asarray(local), tuple(global_shape))


def from_host(value, sharding):
  """A host value (the same on every process) placed by `sharding` (works across processes)."""
  arr = np.asarray(value)
  return jax.make_array_from_callback(arr.shape, sharding, lambda idx: arr[idx])


def local_devices(devices) -> list:
  me = jax.process_index()
  return [d for d in devices if d.process_index == me]


class NullLogger:
  """The metrics logger of processes other than 0: every call does nothing."""

  def __getattr__(self, name):
    return lambda *a, **k: None


PER_PROCESS = "per_process/v1"


def gather_loader_state(state: dict) -> dict:
  """The checkpoint's loader record: this process's state with one process; with several,
  {"kind": "per_process/v1", "states": [process 0's, process 1's, ...]} (process 0 writes it)."""
  if not active():
    return state
  states = [json.loads(v) for v in _kv_exchange("loader state", json.dumps(state))]
  return {"kind": PER_PROCESS, "states": states}


def own_loader_state(record: dict) -> dict:
  """This process's state from a checkpoint's loader record (see gather_loader_state). A record
  of another process count is taken only when every process's state in it is the same."""
  if not (isinstance(record, dict) and record.get("kind") == PER_PROCESS):
    return record
  states = record["states"]
  n, me = jax.process_count(), jax.process_index()
  if len(states) == n:
    return states[me]
  if all(s == states[0] for s in states):
    return states[0]
  raise DistributedError(f"the checkpoint's loader state was written by {len(states)} processes "
                         f"with different positions, but this run has {n}; resume with "
                         f"{len(states)} processes.")


def free_port() -> int:
  """A free TCP port on this host (bind to port 0), for a localhost coordinator."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]
