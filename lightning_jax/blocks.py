"""Blocks: what a model.pattern letter and the FFN choice name, behind one protocol (issue 19).

A layer is a token mixer and a feed-forward block, each inside its hyper-connection streams
(model.layer_apply). Every mixer kind and every FFN kind is registered here with the same five
parts, so the model never switches on a kind's name:

  specs(cfg)                    -> the parameter Spec tree of one (unstacked) block
  stats(cfg)                    -> its non-trained statistics (arrays), or None
  apply(params, frozen, stats, u, consts, cfg, selection)
                                -> (y, selection | None, aux float32 scalar, step_stats | None)
  update_stats(stats, step_stats, cfg, ctl) -> new stats (after an optimizer step), or None
  key                           -> the block's name in a layer's variables ("mixer", "ffn", "moe")

`selection` is the block's routing decision (GSA's kept keys, MoE's expert picks), reused
unchanged by the reversible stack's recompute; blocks without one return None.
MoE kinds take their expert count from `n_experts` (the MTP block keeps moe.mtp_n_experts).
A new kind registers itself with `register_mixer` / `register_ffn`.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax.numpy as jnp

from lightning_jax import nn
from lightning_jax.config import ConfigError
from lightning_jax.layers import deltanet, ffn, moe, sparse_attention


@dataclasses.dataclass(frozen=True)
class Block:
  name: str
  key: str
  specs: Callable
  stats: Callable
  apply: Callable
  update_stats: Callable | None = None


MIXERS: dict[str, Block] = {}
FFNS: dict[str, Block] = {}


def register_mixer(letter: str, block: Block) -> Block:
  """Make `letter` usable in model.pattern."""
  MIXERS[letter] = block
  return block


def register_ffn(name: str, block: Block) -> Block:
  FFNS[name] = block
  return block


def mixer(letter: str) -> Block:
  if letter not in MIXERS:
    raise ConfigError(f"model.pattern has layer kind {letter!r}; expected one of "
                      f"{', '.join(repr(k) for k in MIXERS)}.")
  return MIXERS[letter]


def ffn_block(cfg) -> Block:
  """The feed-forward kind of cfg: routed experts when moe.enabled, else the dense SwiGLU."""
  return FFNS["moe" if cfg.moe.enabled else "swiglu"]


def _none(*_args, **_kw):
  return None


# ----------------------------------------------------------------------------- DeltaNet (D)
def _deltanet_apply(p, frozen, stats, u, consts, cfg, selection=None):
  del frozen, stats, selection
  return deltanet.deltanet_apply(p, u, consts, cfg), None, jnp.zeros((), jnp.float32), None


register_mixer("D", Block("deltanet", "mixer", specs=deltanet.deltanet_specs, stats=_none,
                          apply=_deltanet_apply))


# ----------------------------------------------------------------------------- GSA (G)
def _gsa_apply(p, frozen, stats, u, consts, cfg, selection=None):
  del frozen
  return sparse_attention.gsa_apply(p, stats, u, consts, cfg, selection=selection)


def _gsa_update(stats, step_stats, cfg, ctl=None):
  del ctl
  return sparse_attention.gsa_update_stats(stats, step_stats, cfg)


register_mixer("G", Block("gsa", "mixer", specs=sparse_attention.gsa_specs,
                          stats=sparse_attention.gsa_stats_init, apply=_gsa_apply,
                          update_stats=_gsa_update))


# ----------------------------------------------------------------------------- FFN kinds
def _swiglu_specs(cfg, n_experts=None):
  del n_experts
  return ffn.swiglu_specs(cfg.model.d_model, cfg.model.ffn_width)


def _swiglu_apply(p, frozen, stats, u, consts, cfg, selection=None):
  del frozen, stats, consts, selection
  return ffn.swiglu(p, u, nn.dtype_of(cfg.model.dtype)), None, jnp.zeros((), jnp.float32), None


register_ffn("swiglu", Block("swiglu", "ffn", specs=_swiglu_specs, stats=_none,
                             apply=_swiglu_apply))


def _n(cfg, n_experts):
  return cfg.moe.n_experts if n_experts is None else n_experts


def _moe_specs(cfg, n_experts=None):
  return moe.moe_specs(cfg, _n(cfg, n_experts))


def _moe_stats(cfg, n_experts=None):
  return moe.moe_stats_init(cfg, _n(cfg, n_experts))


def _moe_apply(p, frozen, stats, u, consts, cfg, selection=None):
  return moe.moe_apply(p, frozen, stats, u, consts, cfg, selection=selection)


def _moe_update(stats, step_stats, cfg, ctl=None):
  return moe.moe_update_stats(stats, step_stats, cfg, ctl=ctl)


register_ffn("moe", Block("moe", "moe", specs=_moe_specs, stats=_moe_stats, apply=_moe_apply,
                          update_stats=_moe_update))
