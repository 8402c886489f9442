"""Flax NNX modules for the building blocks of SPEC.md §2.

Each module owns its variables (core.Vars: nnx.Param / Frozen / Stat with logical axes) and its
`__call__` computes the block by calling the block's pure function on its own variables: the
same function the training step's scans and the reversible custom_vjp call on the split trees.
So a module and the step compute the same thing by construction, and tests check it.

  KroneckerEmbedding  ids -> embeddings                       (layers/kronecker.py)
  DeltaNet            gated delta rule mixer                  (layers/deltanet.py)
  GSA                 gated sparse attention; .select: its indexer's top-k selection
                                                              (layers/sparse_attention.py)
  Streams             hyper-connections around a sublayer     (layers/streams.py)
  SwiGLU              dense FFN                               (layers/ffn.py)
  SoftmaxRouter       null-slot softmax router (5B / 9B)      (layers/moe.py route)
  SigmoidRouter       sigmoid router + loss-free bias (120B)  (layers/moe.py route)
  Experts / TQPExperts  routed experts: trained [E, d, f], or the frozen TQP base with its
                      adapters (lightning_jax/tqp.py)
  MoE                 router + shared expert + routed experts (layers/moe.py)
  Layer               mixer and FFN, each inside its streams  (model.layer_apply)
"""
from __future__ import annotations

import functools

from flax import nnx

from lightning_jax import blocks, model, nn
from lightning_jax.layers import deltanet, ffn, kronecker, moe, norms, sparse_attention, streams
from lightning_jax.modules.core import Vars


class Block(Vars):
  """A Vars node that knows the config it computes with (static, hashable)."""

  def __init__(self, trees: dict, axes: dict, cfg, children: dict | None = None):
    super().__init__(trees, axes, children)
    self.cfg = cfg

  def trees(self) -> dict:
    return {kind: self.tree(kind) for kind in ("params", "frozen", "stats")}


def _child(cls, cfg, **kw):
  return functools.partial(cls, cfg=cfg, **kw)


# ----------------------------------------------------------------------------- embedding
class RMSNorm(Block):
  def __call__(self, x):
    return norms.rms_norm(x, self.tree("params")["scale"], self.cfg.model.norm_eps)


class KroneckerEmbedding(Block):
  """The Kronecker byte codec (frozen) -> projection -> RMSNorm (SPEC §2.2)."""

  def __init__(self, trees: dict, axes: dict, cfg):
    super().__init__(trees, axes, cfg, children={"norm": _child(RMSNorm, cfg)})

  def __call__(self, ids):
    return kronecker.embed_apply(self.tree("params"), self.tree("frozen"), ids, self.cfg)


# ----------------------------------------------------------------------------- mixers
class DeltaNet(Block):
  """Gated DeltaNet (SPEC §2.3): u [B, T, d] -> y [B, T, d]."""

  def __call__(self, u, consts):
    return deltanet.deltanet_apply(self.tree("params"), u, consts, self.cfg)


class GSA(Block):
  """Gated sparse attention with its lightning indexer (SPEC §2.3).

  `__call__(u, consts, selection=None) -> (y, selection, aux, step_stats)`; `select(u)` is the
  indexer alone: the kept keys per query, with the variance-adaptive k."""

  def __call__(self, u, consts, selection=None):
    return sparse_attention.gsa_apply(self.tree("params"), self.tree("stats"), u, consts,
                                      self.cfg, selection=selection)

  def select(self, u):
    return sparse_attention.gsa_select(self.tree("params"), self.tree("stats"), u, self.cfg)


# ----------------------------------------------------------------------------- streams, FFN
class Streams(Block):
  """Manifold hyper-connections (SPEC §2.5): `__call__(x, sublayer)` runs `sublayer(u) ->
  (y, *extras)` on the streams' mixed input and returns (new stream state, extras)."""

  def __call__(self, x, sublayer):
    return streams.apply(self.tree("params"), x, sublayer, self.cfg)


class SwiGLU(Block):
  def __call__(self, u):
    return ffn.swiglu(self.tree("params"), u, nn.dtype_of(self.cfg.model.dtype))


# ----------------------------------------------------------------------------- MoE (SPEC §2.4)
class SoftmaxRouter(Block):
  """Top-k over experts and null slots with a softmax over the picks (5B / 9B)."""

  def __call__(self, x2, stats=None, consts=None):
    """x2 [N, d] -> (slot ids, expert ids or -1, gates, aux, step_stats)."""
    return moe.route(self.tree("params"), stats, x2, self.cfg, consts)


class SigmoidRouter(SoftmaxRouter):
  """Sigmoid scores, top-k on score + selection bias (the MoE's Stat `bias`), gates
  normalised over the picks without the bias (120B)."""


class Experts(Block):
  """Trained routed experts: stacked SwiGLU gate/up [E, d, f], down [E, f, d]."""


class TQPExperts(Block):
  """TQP's frozen quantized base experts (codes, row norms, rotation signs; SPEC §4). Their
  trained low-rank adapters are the MoE's `adapters` (TQPAdapters)."""


class TQPAdapters(Block):
  """The trained low-rank adapters a [.., in, r], b [.., r, out] of the TQP expert path."""


class MoE(Block):
  """Router + shared expert + routed experts; `__call__(u, consts, selection=None) ->
  (y, selection, aux, step_stats)`."""

  def __init__(self, trees: dict, axes: dict, cfg):
    router = SigmoidRouter if cfg.moe.router == "sigmoid" else SoftmaxRouter
    experts = TQPExperts if cfg.tqp.enabled else Experts
    super().__init__(trees, axes, cfg, children={"router": _child(router, cfg),
                                                 "shared": _child(SwiGLU, cfg),
                                                 "experts": _child(experts, cfg),
                                                 "adapters": _child(TQPAdapters, cfg)})

  def __call__(self, u, consts, selection=None):
    return moe.moe_apply(self.tree("params"), self.tree("frozen"), self.tree("stats"), u,
                         consts, self.cfg, selection=selection)


# the module of each registered block kind (lightning_jax/blocks.py), by the kind's name
MODULES: dict[str, type] = {"deltanet": DeltaNet, "gsa": GSA, "swiglu": SwiGLU, "moe": MoE}


# ----------------------------------------------------------------------------- layer
class Layer(Block):
  """One layer: the pattern letter's mixer and the FFN kind, each inside its streams.

  Built from one layer's variables, or from a layer group's (every leaf with a leading
  n_groups axis, as the scans take them); call only an unstacked layer."""

  def __init__(self, trees: dict, axes: dict, cfg, kind: str):
    mixer, fb = blocks.mixer(kind), blocks.ffn_block(cfg)
    super().__init__(trees, axes, cfg, children={
        "mix_hc": _child(Streams, cfg), "mixer": _child(MODULES[mixer.name], cfg),
        "ffn_hc": _child(Streams, cfg), fb.key: _child(MODULES[fb.name], cfg)})
    self.kind = kind

  def __call__(self, x, consts, choices=None):
    """Stream state x [B, T, S, d] -> (x, choices, aux, step_stats)."""
    return model.layer_apply(self.trees(), x, consts, choices, cfg=self.cfg, kind=self.kind)


def named(module: nnx.Module) -> dict:
  """{path: class name} of every submodule (what `nnx.display` draws), for tests and docs."""
  out = {}
  for path, node in nnx.iter_graph(module):
    if isinstance(node, nnx.Module):
      out["/".join(str(p) for p in path)] = type(node).__name__
  return out
