"""RMSNorm's parameters (SPEC §2.8); the norm itself is the op lightning_jax/ops/rms_norm."""
from lightning_jax import nn
from lightning_jax.ops.rms_norm.api import rms_norm

__all__ = ["rms_norm", "rms_norm_specs"]


def rms_norm_specs(dim: int, axis: str | None = "embed") -> dict:
  return {"scale": nn.Spec((dim,), (axis,), nn.ones)}
