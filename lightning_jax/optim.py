"""AdamW with LR groups, global-norm clipping and token-budget schedules (SPEC §4, §5).

* Steps come from a token budget: steps = train.total_tokens // (global_batch * seq_len)
  (train.steps > 0 overrides).
* Schedule: linear warmup from `optim.start_lr` (or, when `optim.start_from` names a previous
  stage's config file, that stage's end LR, resolved once into `optim.start_from_lr` from the
  user's config and stored with the run: a stored config is never executed) to `optim.peak_lr` over `optim.warmup_steps`, then
    cosine    -> peak / decay_ratio at the end of the budget (step = steps, as the reference's
                 staged scheduler: progress = (step - warmup) / (steps - warmup)),
    wsd       -> hold peak for `stable_fraction` of the post-warmup steps, then decay linearly
                 to peak / decay_ratio (warmup-stable-decay),
    constant  -> hold peak.
  `optim.schedule_start` = s0 > 0 (set by train.extend_schedule=restart) shifts all of it to
  begin at step s0 and end at the budget's last step.
* Optimizer: clip_by_global_norm(clip_norm) over all gradients, then per LR group AdamW
  (b1, b2, eps from config; paper 0.9 / 0.95 / 1e-10). Groups are labels on parameter paths:
  "router" (any path through a `router`), "adapters" (through `adapters`), "rest". Their LR
  multipliers are tqp.lr_mult_* when tqp.enabled (SPEC §4: router x1, adapters x3, rest x0.01),
  else 1.
* Weight decay (optim.weight_decay, decoupled, multiplied by the LR) applies only to matrices:
  leaves that have at least 2 dims after removing the layer-stacking axis of `groups/...`.
  Norm scales, biases, per-head vectors (A_log, D, dt_bias), hyper-connection scalars and the
  null-slot logit are not decayed. Neither are the GSA indexer weights
  (sparse_attention.INDEXER_PARAMS): they never get a gradient (the reference never trains
  them), so decoupled decay would be the only thing changing them.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

from lightning_jax import nn
from lightning_jax.config import ConfigError, load_config
from lightning_jax.layers.sparse_attention import INDEXER_PARAMS

GROUPS = ("router", "adapters", "rest")


# ----------------------------------------------------------------------------- budget and LR
def tokens_per_step(cfg) -> int:
  return int(cfg.train.global_batch) * int(cfg.train.seq_len)


def total_steps(cfg) -> int:
  t = cfg.train
  if t.steps and t.steps > 0:
    return int(t.steps)
  if t.total_tokens <= 0:
    raise ConfigError("train.total_tokens and train.steps are both 0; expected a token budget "
                      "(train.total_tokens) or an explicit train.steps > 0.")
  n = int(t.total_tokens) // tokens_per_step(cfg)
  if n < 1:
    raise ConfigError(f"train.total_tokens={t.total_tokens} is less than one step of "
                      f"{tokens_per_step(cfg)} tokens (global_batch x seq_len).")
  return n


def resolve_start_from(cfg):
  """Record in optim.start_from_lr the end LR of the config file optim.start_from names.

  This EXECUTES that file (a config file is Python): call it only on the user's own config
  (launch.train, the growth commands' target config), never on one read from a run directory.
  The resolved value travels in the stored config, so nothing that reads a run directory ever
  needs to open start_from again (config.from_stored). Returns cfg."""
  o = cfg.optim
  if o.start_from and float(o.start_from_lr) < 0:
    o.start_from_lr = float(end_lr(load_config(o.start_from).optim))
  return cfg


def start_lr(cfg) -> float:
  """Warmup start: optim.start_lr, or with optim.start_from the previous stage's end LR (its
  resolved value optim.start_from_lr; resolved here from the file if not done yet)."""
  o = cfg.optim
  if o.start_from:
    return float(resolve_start_from(cfg).optim.start_from_lr)
  return float(o.start_lr)


def end_lr(o) -> float:
  if o.schedule == "constant":
    return float(o.peak_lr)
  return float(o.peak_lr) / float(o.decay_ratio)


def make_schedule(cfg, steps: int | None = None):
  """optax schedule: step -> LR for the whole run (`steps` optimizer steps)."""
  o = cfg.optim
  steps = total_steps(cfg) if steps is None else int(steps)
  lr0, peak, lr_end = start_lr(cfg), float(o.peak_lr), end_lr(o)
  # a schedule restarted at step s0 (train.extend_schedule=restart) spans steps s0..steps
  s0 = int(o.schedule_start)
  if not 0 <= s0 < steps:
    raise ConfigError(f"optim.schedule_start={s0} must be in [0, {steps}) (the run's steps).")
  steps -= s0
  warm = min(int(o.warmup_steps), steps)
  rest = max(steps - warm, 1)
  stable = int(round(o.stable_fraction * rest)) if o.schedule == "wsd" else 0

  def sched(step):
    s = jnp.maximum(jnp.asarray(step, jnp.float32) - s0, 0.0)
    w = jnp.where(warm > 0, lr0 + (peak - lr0) * jnp.minimum(s, warm) / max(warm, 1), peak)
    if o.schedule == "constant":
      after = jnp.full_like(s, peak)
    elif o.schedule == "cosine":
      frac = jnp.clip((s - warm) / rest, 0.0, 1.0)
      after = lr_end + (peak - lr_end) * 0.5 * (1.0 + jnp.cos(math.pi * frac))
    else:
      frac = jnp.clip((s - warm - stable) / max(rest - stable, 1), 0.0, 1.0)
      after = peak + (lr_end - peak) * frac
    return jnp.where(s < warm, w, after)
  return sched


# ----------------------------------------------------------------------------- labels and masks
def group_labels(params):
  """Same tree as params: 'router' | 'adapters' | 'rest' per leaf, by path (the one LR-group
  rule, SPEC §4): a leaf under an MoE's router or its TQP adapters, or anything else. Frozen
  TQP bases are not in params, so they get no optimizer state at all."""
  def label(path, _):
    ks = nn.path_keys(path)
    for a, b in zip(ks, ks[1:]):
      if a == "moe" and b in ("router", "adapters"):
        return b
    return "rest"
  return jax.tree_util.tree_map_with_path(label, params)


def decay_mask(params):
  """True where weight decay applies: matrices (>= 2 dims beyond the group-stacking axis),
  except the never-trained GSA indexer weights (INDEXER_PARAMS)."""
  def m(path, leaf):
    ks = nn.path_keys(path)
    if ks and ks[-1] in INDEXER_PARAMS:
      return False
    nd = len(leaf.shape) - (1 if ks and ks[0] == "groups" else 0)
    return nd >= 2
  return jax.tree_util.tree_map_with_path(m, params)


def lr_multipliers(cfg) -> dict:
  if cfg.tqp.enabled:
    q = cfg.tqp
    return {"router": float(q.lr_mult_router), "adapters": float(q.lr_mult_adapters),
            "rest": float(q.lr_mult_rest)}
  return {g: 1.0 for g in GROUPS}


def make_optimizer(cfg, params, steps: int | None = None):
  """(optax.GradientTransformation, schedule). `params` may be abstract (only paths/shapes used)."""
  o = cfg.optim
  sched = make_schedule(cfg, steps)
  mults = lr_multipliers(cfg)

  def group(mult):
    return optax.chain(
        optax.scale_by_adam(b1=o.b1, b2=o.b2, eps=o.eps),
        optax.add_decayed_weights(o.weight_decay, mask=decay_mask) if o.weight_decay else
        optax.identity(),
        optax.scale_by_learning_rate(lambda s, _m=mult: sched(s) * _m))

  labels = group_labels(params)
  present = set(jax.tree_util.tree_leaves(labels))
  tx = optax.chain(
      optax.clip_by_global_norm(o.clip_norm),
      optax.multi_transform({g: group(mults[g]) for g in GROUPS if g in present}, labels))
  return tx, sched
