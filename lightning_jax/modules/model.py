"""The LightningLM as Flax NNX modules: the stacks and the whole model (SPEC §2).

    lm = LightningLM.init(cfg, jax.random.PRNGKey(0), codec)      # or .from_variables(cfg, v)
    nnx.display(lm)                                                # the module tree
    out = lm(ids)                                                  # model.forward's dict
    total, metrics = lm.loss(batch)
    variables = lm.variables()     # {"params", "frozen", "stats"}: the trees the step,
                                   # checkpoints, growth, TQP and the optimizer work on

The step's boundary: training jits `model.loss_fn(params, frozen, stats, batch, cfg)` on the
split trees (`nnx.split(lm, nnx.Param, Frozen, Stat)`, as pure dicts), because the reversible
stack is a `jax.custom_vjp` and the layer groups are a `lax.scan` over stacked variables; both
want pure functions of pytrees. The modules call those same functions on their own variables.
"""
from __future__ import annotations

import jax
from flax import nnx
from ml_collections import FrozenConfigDict

from lightning_jax import model, reversible
from lightning_jax.config import n_groups, validate
from lightning_jax.modules.core import Frozen, Stat, Vars, fill
from lightning_jax.modules.layers import (
  Block,
  KroneckerEmbedding,
  Layer,
  RMSNorm,
  _child,
)


class Stack(Block):
  """The layers, one `Layer` per pattern position stacked over the n_groups groups (l0..l3).

  `__call__(x, consts) -> (x, aux, step_stats, choices)`: `reversible.run_stack`, the plain
  scan over groups, or the midpoint reversible stack (its custom_vjp rebuilds activations by
  inversion) when reversible.enabled."""

  def __init__(self, trees: dict, axes: dict, cfg):
    pattern = cfg.model.pattern
    super().__init__(trees, axes, cfg, children={
        f"l{j}": _child(Layer, cfg, kind=k) for j, k in enumerate(pattern)})

  def __call__(self, x, consts):
    fns = [lambda vj, xx, cc, ch, k=k: model.layer_apply(vj, xx, cc, ch, cfg=self.cfg, kind=k)
           for k in self.cfg.model.pattern]
    t = self.trees()
    group_vars = [{kind: t[kind].get(f"l{j}", {}) for kind in t}
                  for j in range(len(self.cfg.model.pattern))]
    return reversible.run_stack(self.cfg.reversible, fns, group_vars, x, consts,
                                remat=self.cfg.model.remat)

  def n_groups(self) -> int:
    return n_groups(self.cfg)


class MTP(Block):
  """The multi-token prediction block: in_proj([h_t ; emb_{t+1}]) -> one G layer."""

  def __init__(self, trees: dict, axes: dict, cfg):
    super().__init__(trees, axes, cfg, children={"layer": _child(Layer, cfg, kind="G")})


class LightningLM(Block):
  """Kronecker embedding -> streams -> the stack -> read-out -> head, + MTP."""

  def __init__(self, trees: dict, axes: dict, cfg):
    children = {"embed": _child(KroneckerEmbedding, cfg), "groups": _child(Stack, cfg),
                "final_norm": _child(RMSNorm, cfg)}
    if "mtp" in trees["params"]:
      children["mtp"] = _child(MTP, cfg)
    super().__init__(trees, axes, cfg, children=children)

  # ---------------------------------------------------------------- construction
  @classmethod
  def from_variables(cls, cfg, variables: dict) -> "LightningLM":
    """Wrap {"params", "frozen", "stats"} (from init, a checkpoint, growth, an import)."""
    validate(cfg)
    axes = {"params": model.param_axes(cfg), "frozen": model.frozen_axes(cfg),
            "stats": jax.tree_util.tree_map(lambda a: (None,) * a.ndim, variables["stats"])}
    return cls({k: variables[k] for k in ("params", "frozen", "stats")}, axes,
               FrozenConfigDict(cfg))

  @classmethod
  def init(cls, cfg, key, codec) -> "LightningLM":
    """A fresh model: the same values as model.init_variables(cfg, key, codec)."""
    return cls.from_variables(cfg, model.init_variables(cfg, key, codec))

  # ---------------------------------------------------------------- the three trees
  def variables(self) -> dict:
    """{"params", "frozen", "stats"} in exactly model.abstract_variables' structure."""
    skeleton = model.abstract_variables(self.cfg)
    return {"params": fill(skeleton["params"], self.tree("params")),
            "frozen": fill(skeleton["frozen"], self.tree("frozen")),
            "stats": fill(skeleton["stats"], self.tree("stats"))}

  def split(self):
    """(graphdef, params, frozen, stats): nnx.split by variable type."""
    return nnx.split(self, nnx.Param, Frozen, Stat)

  # ---------------------------------------------------------------- compute
  def __call__(self, ids, with_mtp: bool | None = None):
    """ids int [B, T (+1 with MTP)] -> model.forward's dict (h, h_mtp, aux, ...)."""
    v = self.variables()
    return model.forward(v["params"], v["frozen"], v["stats"], ids, self.cfg, with_mtp)

  def loss(self, batch):
    v = self.variables()
    return model.loss_fn(v["params"], v["frozen"], v["stats"], batch, self.cfg)

  def logits(self, h):
    return model.logits(self.tree("params"), h, self.cfg)


__all__ = ["LightningLM", "MTP", "Stack", "Vars"]
