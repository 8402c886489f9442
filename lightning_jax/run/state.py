"""The train state's abstract tree and shardings, and the train section's check against the mesh.

State: {"params", "frozen", "stats", "opt_state", "step"}. Parameters take sharding.RULES by
their logical axes (model.param_axes), frozen buffers model.frozen_axes (the TQP quantized bases
split over "expert" like the experts they replace; the codec by its vocab rule), running
statistics and the step are replicated, and the optimizer state is ZeRO-1: each moment takes its
parameter's sharding plus a split over the free batch axes (sharding.zero1_sharding).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from lightning_jax import model as model_lib
from lightning_jax import nn, optim, sharding, tqp
from lightning_jax.config import ConfigError
from lightning_jax.layers import kronecker
from lightning_jax.run import step as step_lib

BATCH_AXES = step_lib.BATCH_AXES


def check_train_config(cfg, n_batch_shards: int) -> int:
  """Validate the train section against the mesh; returns gradient-accumulation steps."""
  t = cfg.train
  if t.seq_len < 1:
    raise ConfigError(f"train.seq_len={t.seq_len} must be positive.")
  if t.micro_batch < 0:
    raise ConfigError(f"train.micro_batch={t.micro_batch} must be >= 1 sequence per device (or 0: "
                      f"no gradient accumulation).")
  if t.eval_every > 0 and (t.eval_batch < 1 or t.eval_batch % n_batch_shards):
    raise ConfigError(f"train.eval_batch={t.eval_batch} must be a positive multiple of the "
                      f"{n_batch_shards} batch shards (mesh data x expert).")
  if t.micro_batch == 0:          # no accumulation: the whole global batch in one forward
    if t.global_batch < n_batch_shards or t.global_batch % n_batch_shards:
      raise ConfigError(f"train.global_batch={t.global_batch} must be a positive multiple of the "
                        f"{n_batch_shards} batch shards (mesh data x expert).")
    return 1
  micro_global = t.micro_batch * n_batch_shards
  if t.global_batch < 1 or t.global_batch % micro_global:
    raise ConfigError(
        f"train.global_batch={t.global_batch} must be a positive multiple of train.micro_batch="
        f"{t.micro_batch} x {n_batch_shards} batch shards (mesh data x expert) = {micro_global}.")
  return t.global_batch // micro_global


def opt_state_shardings(mesh, opt_abstract, param_shardings):
  """ZeRO-1: each moment leaf takes its parameter's sharding plus a split over free batch axes."""
  by_path = {}
  for path, s in jax.tree_util.tree_flatten_with_path(param_shardings)[0]:
    by_path[tuple(nn.path_keys(path))] = s
  rep = NamedSharding(mesh, P())

  def one(path, leaf):
    # the parameter path is the trailing run of dict keys
    tail = []
    for p in reversed(path):
      if isinstance(p, jax.tree_util.DictKey):
        tail.append(str(p.key))
      else:
        break
    tail = tuple(reversed(tail))
    for k in range(len(tail)):
      s = by_path.get(tail[k:])
      if s is not None:
        return sharding.zero1_sharding(mesh, s, leaf.shape)
    return rep
  return jax.tree_util.tree_map_with_path(one, opt_abstract)


def frozen_shardings(mesh, model, cfg, frozen_abstract):
  """Frozen buffers by their logical axes (model.frozen_axes): the TQP quantized bases split
  over "expert" like the experts they replace; the codec by its vocab rule."""
  return sharding.tree_shardings(mesh, model.frozen_axes(cfg), frozen_abstract)


def train_state(cfg, model, mesh, abstract, opt_abstract):
  """(abstract state, its shardings, parameter shardings, optimizer-state shardings) of the
  train state from the model's abstract variables and the optimizer's abstract state."""
  p_shard = sharding.tree_shardings(mesh, model.param_axes(cfg), abstract["params"])
  rep = NamedSharding(mesh, P())
  o_shard = opt_state_shardings(mesh, opt_abstract, p_shard)
  state_abs = {"params": abstract["params"], "frozen": abstract["frozen"],
               "stats": abstract["stats"], "opt_state": opt_abstract,
               "step": jax.ShapeDtypeStruct((), jnp.int32)}
  state_shard = {"params": p_shard,
                 "frozen": frozen_shardings(mesh, model, cfg, abstract["frozen"]),
                 "stats": jax.tree_util.tree_map(lambda _: rep, abstract["stats"]),
                 "opt_state": o_shard, "step": rep}
  return state_abs, state_shard, p_shard, o_shard


def build_abstract(cfg, mesh, accum: int | None = None):
  """Abstract state, shardings and the jitted step for `cfg` on `mesh` (nothing allocated);
  `accum` overrides the accumulation steps that train.micro_batch gives (launch.plan, the
  one-rank benchmark)."""
  model = model_lib
  specs = model.param_specs(cfg)
  frozen_specs = model.frozen_specs(cfg) if hasattr(model, "frozen_specs") else {}
  if cfg.tqp.enabled and any("experts" in n for _, n in tqp._moe_nodes(specs)):
    specs, frozen_specs = tqp.tqp_specs(specs, cfg)     # a model without the TQP layout
  params = nn.abstract(specs)
  p_shard = sharding.tree_shardings(mesh, nn.logical_axes(specs), params)
  rep = NamedSharding(mesh, P())
  f_abs = {"embed": kronecker.frozen_abstract(cfg)}
  f_shard = {"embed": jax.tree.map(lambda _: rep, f_abs["embed"])}
  if frozen_specs:     # TQP bases: split over the expert axis like the experts they replace
    q_abs = nn.abstract(frozen_specs)
    q_shard = sharding.tree_shardings(mesh, nn.logical_axes(frozen_specs), q_abs)
    f_abs, f_shard = tqp.merge_frozen(f_abs, q_abs), tqp.merge_frozen(f_shard, q_shard)
  stats = jax.eval_shape(lambda: model.init_stats(cfg))
  s_shard = jax.tree.map(lambda _: rep, stats)
  steps = max(1, optim.total_steps(cfg)) if cfg.train.total_tokens or cfg.train.steps else 1000
  tx, _ = optim.make_optimizer(cfg, params, steps)
  opt_abs = jax.eval_shape(tx.init, params)
  o_shard = opt_state_shardings(mesh, opt_abs, p_shard)
  n_batch = mesh.shape["data"] * mesh.shape["expert"]
  accum = check_train_config(cfg, n_batch) if accum is None else accum
  state_abs = {"params": params, "frozen": f_abs, "stats": stats, "opt_state": opt_abs,
               "step": jax.ShapeDtypeStruct((), jnp.int32)}
  state_shard = {"params": p_shard, "frozen": f_shard, "stats": s_shard, "opt_state": o_shard,
                 "step": rep}
  batch_abs = {"ids": jax.ShapeDtypeStruct((cfg.train.global_batch, cfg.train.seq_len + 2),
                                           jnp.int32)}
  batch_shard = {"ids": NamedSharding(mesh, P(BATCH_AXES, None))}
  step = jax.jit(step_lib.make_train_step(cfg, tx, accum, model, mesh),
                 in_shardings=(state_shard, batch_shard), out_shardings=(state_shard, rep),
                 donate_argnums=(0,))
  return {"state_abs": state_abs, "state_shard": state_shard, "batch_abs": batch_abs,
          "batch_shard": batch_shard, "step": step, "accum": accum}
