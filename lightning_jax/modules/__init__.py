"""Flax NNX modules of the LightningLM (issue 19): variable types, the blocks and the model.

See lightning_jax/modules/model.py for the model and its boundary with the training step, and
docs/ARCHITECTURE.md ("Modules") for why NNX and how the trees split.
"""
from lightning_jax.modules.core import Frozen, Stat, Vars, logical_axes, shardings
from lightning_jax.modules.layers import (GSA, MODULES, DeltaNet, Experts, KroneckerEmbedding,
                                          Layer, MoE, RMSNorm, SigmoidRouter, SoftmaxRouter,
                                          Streams, SwiGLU, TQPAdapters, TQPExperts, named)
from lightning_jax.modules.model import MTP, LightningLM, Stack

__all__ = ["Frozen", "Stat", "Vars", "logical_axes", "shardings", "GSA", "MODULES", "DeltaNet", "Experts",
           "KroneckerEmbedding", "Layer", "MoE", "RMSNorm", "SigmoidRouter", "SoftmaxRouter",
           "Streams", "SwiGLU", "TQPAdapters", "TQPExperts", "named", "MTP", "LightningLM",
           "Stack"]
