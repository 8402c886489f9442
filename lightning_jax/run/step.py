"""The compiled train step and held-out eval step over the train state (lightning_jax/run/state.py).

The train step: the global batch is split into micro-batches of train.micro_batch sequences per
device and the gradients are accumulated with lax.scan; AdamW (lightning_jax.optim); then
model.update_stats. A step whose loss or gradient norm is not finite does not change the state
(its metrics say finite=False).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

BATCH_AXES = ("data", "expert")    # the batch split (lightning_jax/run/state.py names it too)


def make_train_step(cfg, tx, accum: int, model, mesh):
  """(state, batch[, moe_ctl]) -> (state, metrics). state: params, frozen, stats, opt_state, step.

  moe_ctl: optional dict of float32 scalars (moe.HotConfig.ctl()), a traced argument: the
  forward reads it as consts["moe_ctl"] and the router-bias update as ctl=.
  """
  micro_spec = P(None, BATCH_AXES, None)

  def grads_of(params, frozen, stats, ids, moe_ctl):
    def f(p):
      if moe_ctl is None:
        return model.loss_fn(p, frozen, stats, {"ids": ids}, cfg)
      return model.loss_fn(p, frozen, stats, {"ids": ids}, cfg, moe_ctl=moe_ctl)
    (total, m), g = jax.value_and_grad(f, has_aux=True)(params)
    return total, m, g

  def step_fn(state, batch, moe_ctl=None):
    params, frozen, stats = state["params"], state["frozen"], state["stats"]
    ids = batch["ids"]
    g_rows = ids.shape[0]
    mb = g_rows // accum
    # row r = i * accum + a -> micro-batch a: every device keeps its rows of every micro-batch
    micro = ids.reshape(mb, accum, ids.shape[1]).swapaxes(0, 1)
    micro = jax.lax.with_sharding_constraint(micro, NamedSharding(mesh, micro_spec))

    def body(carry, mids):
      gsum, lsum = carry
      total, m, g = grads_of(params, frozen, stats, mids, moe_ctl)
      gsum = jax.tree_util.tree_map(jnp.add, gsum, g)
      scal = {"total": total, "loss": m["loss"], "ce_mtp": m["ce_mtp"], "aux": m["aux"]}
      lsum = jax.tree_util.tree_map(jnp.add, lsum, scal)
      return (gsum, lsum), m["step_stats"]

    zeros_g = jax.tree_util.tree_map(jnp.zeros_like, params)
    zeros_l = {k: jnp.zeros((), jnp.float32) for k in ("total", "loss", "ce_mtp", "aux")}
    (gsum, lsum), step_stats = jax.lax.scan(body, (zeros_g, zeros_l), micro)
    grads = jax.tree_util.tree_map(lambda g: g / accum, gsum)
    scal = {k: v / accum for k, v in lsum.items()}
    step_stats = jax.tree_util.tree_map(lambda s: jnp.mean(s, axis=0), step_stats)
    grad_norm = (optax.tree.norm(grads) if hasattr(optax, "tree") and hasattr(optax.tree, "norm")
                 else optax.global_norm(grads))
    updates, new_opt = tx.update(grads, state["opt_state"], params)
    new_params = optax.apply_updates(params, updates)
    new_stats = (model.update_stats(cfg, stats, step_stats) if moe_ctl is None else
                 model.update_stats(cfg, stats, step_stats, moe_ctl=moe_ctl))
    ok = jnp.isfinite(scal["total"]) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree_util.tree_map(lambda a, b: jnp.where(ok, a, b), new, old)
    out = {"params": keep(new_params, params), "frozen": frozen,
           "stats": keep(new_stats, stats), "opt_state": keep(new_opt, state["opt_state"]),
           "step": state["step"] + ok.astype(state["step"].dtype)}
    scal["grad_norm"] = grad_norm
    scal["finite"] = ok
    return out, scal
  return step_fn


def make_eval_step(cfg, model):
  """(state, ids [n_batches, batch, seq_len + 2]) -> CE_next per batch, one compiled loop."""
  def eval_fn(state, stacked):
    def one(ids):
      _, m = model.loss_fn(state["params"], state["frozen"], state["stats"], {"ids": ids}, cfg)
      return m["loss"]
    return jax.lax.map(one, stacked)
  return eval_fn
