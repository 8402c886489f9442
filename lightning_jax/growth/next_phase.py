"""Start the next training phase of a stage from the previous phase's last checkpoint (SPEC §5).

  python -m growth.next_phase --src RUN_P1 --dst RUN_P2 --config=configs/stage_9b.py:p2 \
      [--optimizer carry|fresh]
  python -m launch.train --workdir=RUN_P2 --config=configs/stage_9b.py:p2

A phase changes the schedule, the batch geometry (9B: 4K -> 8K context, batch 120 -> 56) or a
switch such as model.use_rotary (9B p4), never the parameter shapes: the transform is the
identity, and a target config whose params/frozen/stats shapes differ from the source's is
refused (changing the model is growth's job: growth.dense_to_moe, depth_map, expand_experts,
to_tqp). So is a target of another stage.

--src: a run directory (its newest checkpoint), its checkpoints/ directory or one
checkpoints/<step> directory, as for the growth commands. --config: the NEXT phase's config; give
launch.train exactly the same config flags and --workdir=RUN_P2.

The new run is RUN_P2/checkpoints/0 in launch.train's format (lightning_jax.run.checkpoints.write_grown): the
source's params, frozen buffers and running stats unchanged; step 0 (the new phase's LR schedule
starts at its own step 0); the target config; and in `meta.provenance`: source path, step, stage
and phase, the new phase, and what was carried.

Optimizer state (--optimizer): `carry` (default) keeps the Adam moments and Adam's step count
(bias correction continues), as the reference does: at a phase change it resumes the DeepSpeed
checkpoint with its optimizer state and only restarts its staged LR scheduler at the new phase's
step 0 (scripts/train_entrypoint.py, lightninglm/training/staged_lr.py). Here the schedule's own
step counter (optax scale_by_schedule) restarts at 0 the same way. It needs the same LR groups in
both phases (true of every stage config); `fresh` starts new zero moments instead.

Data loader: the source's loader position is carried when the target's loader accepts it (same
data, seed, batch and sequence length: 9B p1 -> p2); otherwise (a new batch or context length)
the new phase starts its loader fresh, and the command says so.
"""
from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

from lightning_jax import checkpoint as ck
from lightning_jax import model, optim
from lightning_jax.config import ConfigError
from lightning_jax.data import shards
from lightning_jax.growth.common import COLLECTIONS, GrowthError, flatten
from lightning_jax.growth.common import _names as names_of
from lightning_jax.growth.driver import open_target
from lightning_jax.run import setup
from lightning_jax.run.checkpoints import jsonable, write_grown

OPTIMIZER = ("carry", "fresh")


def _shapes(tree) -> dict:
  return {k: (tuple(np.shape(v)), np.dtype(v.dtype).name) for k, v in flatten(tree).items()}


def check_same_model(src_vars: dict, src_cfg, cfg):
  """GrowthError unless cfg's params/frozen/stats tree has the source's paths, shapes, dtypes."""
  if src_cfg.stage != cfg.stage:
    raise GrowthError(f"next_phase continues one stage, but the source is stage "
                      f"{src_cfg.get('stage')!r} and --config is stage {cfg.get('stage')!r}; "
                      f"grow between stages with growth.dense_to_moe / depth_map / expand_experts.")
  ab = model.abstract_variables(cfg)
  want = _shapes({c: ab[c] for c in COLLECTIONS})
  got = _shapes({c: src_vars[c] for c in COLLECTIONS})
  missing, extra = set(want) - set(got), set(got) - set(want)
  differ = sorted(k for k in set(want) & set(got) if want[k] != got[k])
  if missing or extra or differ:
    parts = []
    if differ:
      k = differ[0]
      parts.append(f"{len(differ)} leaves differ in shape/dtype (e.g. {k}: source {got[k]} vs "
                   f"target {want[k]})")
    if missing:
      parts.append(f"the target has leaves the source lacks ({names_of(missing, 3)})")
    if extra:
      parts.append(f"the source has leaves the target lacks ({names_of(extra, 3)})")
    raise GrowthError(f"the --config model differs from the source checkpoint's: "
                      f"{'; '.join(parts)}; a phase change keeps the model (use a growth "
                      f"command to change it).")


def restore_opt_state(step_dir: pathlib.Path, cfg, params):
  """The source step's optimizer state, in the target optimizer's tree structure (optax states),
  with every LR-schedule step counter reset to 0. Adam moments and Adam's count are kept."""
  tx, _ = optim.make_optimizer(cfg, params, optim.total_steps(cfg))
  dev = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0] if jax.devices("cpu")
                                          else jax.devices()[0])
  opt_abs = jax.eval_shape(tx.init, jax.tree_util.tree_map(jnp.asarray, params))
  opt_abs = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=dev),
                                   opt_abs)
  item = {"opt_state": opt_abs}
  try:
    with ocp.PyTreeCheckpointer() as pc:
      got = pc.restore(pathlib.Path(step_dir) / "state", args=ocp.args.PyTreeRestore(
          item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
          partial_restore=True))
  except Exception as e:    # orbax raises many types for a tree that does not match
    raise ck.CheckpointError(
        f"the optimizer state in {step_dir} does not match the target config's optimizer "
        f"(LR groups or parameter tree; {type(e).__name__}: {str(e).splitlines()[0][:200]}); "
        f"pass --optimizer=fresh to start the phase with new Adam moments.") from e
  opt = got["opt_state"]

  def reset(node):
    if isinstance(node, optax.ScaleByScheduleState):
      return optax.ScaleByScheduleState(count=jnp.zeros_like(node.count))
    return node
  is_sched = lambda n: isinstance(n, optax.ScaleByScheduleState)   # noqa: E731
  opt = jax.tree_util.tree_map(reset, opt, is_leaf=is_sched)
  return jax.tree_util.tree_map(np.asarray, opt)


def next_phase(src: str, dst: str, cfg, optimizer: str = "carry", log=print) -> dict:
  """Write DST/checkpoints/0: SRC's last (or given) checkpoint continued under phase config cfg."""
  if optimizer not in OPTIMIZER:
    raise ConfigError(f"--optimizer={optimizer!r}; expected one of {', '.join(OPTIMIZER)}.")
  source, cfg, dst, data_dir, manifest = open_target(src, dst, cfg, "the next phase", log)
  src_cfg = source["cfg"]
  variables = source["variables"]
  check_same_model(variables, src_cfg, cfg)

  try:
    src_total = optim.total_steps(src_cfg)
  except ConfigError:
    src_total = None
  if src_total is not None and source["step"] < src_total:
    log(f"warning: the source checkpoint is step {source['step']} of its phase's {src_total} "
        f"steps; the next phase starts before the previous one finished.")

  opt_state = None
  if optimizer == "carry":
    opt_state = restore_opt_state(pathlib.Path(source["dir"]), cfg, variables["params"])

  # the data stream: continue it when the new phase's loader accepts the saved position
  loader, _ = setup.make_data(cfg, data_dir, manifest)
  reader = ck.Checkpointer(pathlib.Path(source["dir"]).parent, ck.config_ns(keep=0),
                           read_only=True)
  try:
    saved_loader = reader.read_json(source["step"], "loader")
  finally:
    reader.close()
  try:
    loader.set_state(saved_loader, log=lambda *_: None)
    loader_state, loader_note = loader.get_state(), "continued from the source's position"
  except (shards.DataError, ConfigError, KeyError, TypeError, ValueError) as e:
    loader_state = None
    loader_note = f"fresh ({str(e).splitlines()[0][:160]})"

  meta = {"provenance": jsonable({
      "source_path": str(pathlib.Path(source["dir"]).absolute()),
      "source_step": source["step"], "source_phase_steps": src_total,
      "source_stage": src_cfg.get("stage"),
      "source_phase": src_cfg.get("phase"), "transform": "next_phase",
      "phase": cfg.get("phase"), "optimizer": "carried" if opt_state is not None else "fresh",
      "loader": "carried" if loader_state is not None else "fresh"}),
      "loss": None, "tokens": 0}
  write_grown(dst, cfg, variables, data_dir, manifest, meta, log, opt_state=opt_state,
              loader_state=loader_state)
  log(f"next phase: stage {cfg.get('stage')!r} phase {src_cfg.get('phase')!r} (step "
      f"{source['step']}) -> phase {cfg.get('phase')!r}; parameters unchanged; optimizer state "
      f"{'carried (Adam moments and count; schedule restarts at 0)' if opt_state is not None else 'fresh'}; "
      f"data loader {loader_note}")
  return {"meta": meta, "dst": str(dst), "source_step": source["step"]}
