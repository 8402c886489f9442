"""Checkpoint paths beyond a run's own save/restore (lightning_jax/checkpoint.py):

  locate(path)       a run directory, its checkpoints/ directory or one checkpoints/<step>
  read_source(path)  a checkpoint's config and variables onto one host device, params-only
                     (Checkpointer.restore_variables: the optimizer state is never opened)
  read_params(...)   one step's params alone (orbax partial restore; launch.ema)
  write_grown(...)   a step-0 run: NEW_RUN/checkpoints/0 in launch.train's format (growth
                     transforms, growth.init, growth.next_phase, launch.ema)
"""
from __future__ import annotations

import contextlib
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from lightning_jax import checkpoint as ck
from lightning_jax import optim
from lightning_jax.config import from_stored
from lightning_jax.run import history
from lightning_jax.run import setup


def locate(path: str) -> tuple[pathlib.Path, int | None]:
  """(checkpoints directory, step or None) for a run dir, checkpoints dir or step dir."""
  p = pathlib.Path(path).absolute()     # orbax wants absolute paths; users type relative ones
  if not p.exists():
    raise ck.CheckpointError(f"{p} does not exist; expected a run directory, its checkpoints/ "
                             f"directory or one checkpoints/<step> directory.")
  if (p / "checkpoints").is_dir():
    return p / "checkpoints", None
  if p.name.isdigit() and (p / "state").is_dir():
    return p.parent, int(p.name)
  if any(c.name.isdigit() for c in p.iterdir()):
    return p, None
  raise ck.CheckpointError(f"{p} holds no checkpoints; expected a run directory (with "
                           f"checkpoints/) or a checkpoints directory.")


def read_source(path: str, log=print, *, opt_state: bool = False) -> dict:
  """{"cfg", "variables" (numpy), "step", "dir", "meta"} of a checkpoint; params, frozen (from
  the frozen version the step references) and stats are restored onto one host device.
  opt_state: also restore the optimizer state (into "opt_state", numpy); by default it is not
  read at all (orbax placeholders): the growth transforms only need the variables, and at the
  9B's width the Adam moments are 67 GB of host memory."""
  cdir, step = locate(path)
  c = ck.Checkpointer(cdir, ck.config_ns(keep=0), read_only=True)
  steps = c.steps()
  if not steps:
    raise ck.CheckpointError(f"{cdir} holds no complete checkpoint.")
  step = steps[-1] if step is None else step
  if step not in steps:
    raise ck.CheckpointError(f"step {step} is not among the checkpoints in {cdir}: {steps}.")
  md = c.state_metadata(step)
  dev = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0] if jax.devices("cpu")
                                          else jax.devices()[0])
  abstract = jax.tree_util.tree_map(
      lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=dev), dict(md))
  if opt_state or "opt_state" not in abstract:
    got = c.restore(step, abstract)
  else:
    got = c.restore_variables(step, abstract)
  c.close()
  state = got["state"]
  variables = {k: jax.tree_util.tree_map(np.asarray, state[k]) for k in ("params", "frozen", "stats")}
  cfg = from_stored(got["config"], log)     # data only: nothing in a run directory is executed
  log(f"source: {c.step_dir(step)} (step {step}, stage {cfg.get('stage')!r})")
  out = {"cfg": cfg, "variables": variables, "step": int(step), "dir": str(c.step_dir(step)),
         "meta": got["meta"]}
  if opt_state:
    out["opt_state"] = jax.tree_util.tree_map(np.asarray, state.get("opt_state"))
  return out


def read_params(step_dir: pathlib.Path, abstract_params):
  """The params tree of one checkpoint step (numpy), restored alone (orbax partial restore)."""
  dev = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0] if jax.devices("cpu")
                                          else jax.devices()[0])
  item = {"params": jax.tree_util.tree_map(
      lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=dev), abstract_params)}
  try:
    with ocp.PyTreeCheckpointer() as pc:
      got = pc.restore(pathlib.Path(step_dir) / "state", args=ocp.args.PyTreeRestore(
          item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
          partial_restore=True))
  except Exception as e:   # orbax / tensorstore raise many types for torn files
    raise ck.CheckpointError(f"checkpoint {step_dir} is unreadable ({type(e).__name__}: "
                             f"{str(e).splitlines()[0][:200]}).") from e
  return jax.tree_util.tree_map(np.asarray, got["params"])


def jsonable(x):
  """x with numpy arrays and scalars as lists and numbers, keys as strings (meta records)."""
  if isinstance(x, dict):
    return {str(k): jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [jsonable(v) for v in x]
  if isinstance(x, np.ndarray):
    return x.tolist()
  if isinstance(x, np.generic):
    return x.item()
  return x


def write_grown(dst, cfg, variables, data_dir, manifest, meta, log=print,
                opt_state=None, loader_state=None, *, on_cpu: bool = False):
  """NEW_RUN (dst)/checkpoints/0: the grown variables, fresh optimizer state, step 0, fresh loader.
  opt_state / loader_state (optional; growth.next_phase): written instead of the fresh ones.
  on_cpu: build the state (the variables' device copies, the fresh optimizer state, the frozen
  fingerprint) and save it on the host CPU device instead of the default device, which would
  otherwise hold the whole state at once (the 120B's TQP state: 125 GB). Host memory then holds
  the caller's (numpy) variables plus the state: params + frozen + stats + 2 x params for Adam
  (about 82 + 43 GB at the 120B's full width). The checkpoint is the same either way; launch.train
  restores it with its own shardings. Caveat (lightning_jax/checkpoint.py, not here): the save's
  frozen fingerprint (leaf_sums in one jit over the frozen tree) holds about 8-12x the frozen
  tree's bytes in buffers on the CPU backend (measured: 3.3 GB for one 268 MB uint8 leaf, 8.6 GB
  for four), which at the 120B's 61 GB frozen tree does not fit a 500 GB host."""
  dst = pathlib.Path(dst)
  if on_cpu:
    cpu = jax.devices("cpu")[0]
    where, put = jax.default_device(cpu), (lambda x: jax.device_put(x, cpu))
  else:
    where, put = contextlib.nullcontext(), jnp.asarray
  with where:
    steps_total = optim.total_steps(cfg)
    tx, _ = optim.make_optimizer(cfg, variables["params"], steps_total)
    params = jax.tree_util.tree_map(put, variables["params"])
    state = {"params": params,
             "frozen": jax.tree_util.tree_map(put, variables["frozen"]),
             "stats": jax.tree_util.tree_map(put, variables["stats"]),
             "opt_state": (tx.init(params) if opt_state is None else
                           jax.tree_util.tree_map(put, opt_state)),
             "step": put(np.int32(0))}
    if loader_state is None:
      loader, _ = setup.make_data(cfg, data_dir, manifest)
      loader_state = loader.get_state()
    kc = ck.config_ns(keep=0)
    w = ck.Checkpointer(dst / "checkpoints", kc)
    w.save(0, state, loader_state, ck.config_to_json(cfg), meta, frozen_version=0)
    w.close()
  history.record(dst, meta, cfg.stage)   # <dst>/growth_history.json: kept after checkpoints/0 is gone
  log(f"wrote {dst / 'checkpoints' / '0'}: step 0, "
      f"{'fresh' if opt_state is None else 'given'} optimizer state, schedule of "
      f"{steps_total} steps from the target config (stage {cfg.stage!r})"
      f"{' (built on the host CPU)' if on_cpu else ''}")
