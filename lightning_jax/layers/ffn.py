"""SwiGLU FFN: down(silu(gate(x)) * up(x)) (SPEC §2.4), weights in [in, out] layout."""
import jax

from lightning_jax import nn

INIT_STD = 0.02


def swiglu_specs(d_model: int, width: int) -> dict:
  return {
      "gate": nn.Spec((d_model, width), ("embed", "mlp"), nn.normal(INIT_STD)),
      "up": nn.Spec((d_model, width), ("embed", "mlp"), nn.normal(INIT_STD)),
      "down": nn.Spec((width, d_model), ("mlp", "embed"), nn.normal(INIT_STD)),
  }


def swiglu(p: dict, x, dtype=None):
  """x [..., d] -> [..., d]; weights cast to x's (compute) dtype unless dtype is given."""
  dtype = dtype or x.dtype
  x = x.astype(dtype)
  g = x @ p["gate"].astype(dtype)
  u = x @ p["up"].astype(dtype)
  return (jax.nn.silu(g) * u) @ p["down"].astype(dtype)
