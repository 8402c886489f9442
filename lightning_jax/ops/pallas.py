"""What the ops' Pallas kernels share: backend choice, Triton compiler parameters, a GPU lowering check.

Every Pallas kernel under lightning_jax/ops lowers through Pallas' Triton backend on GPU (the compiler parameters
below select it) and runs with `interpret=True` elsewhere, so CPU tests exercise the kernel bodies.
`lower_for_gpu` lowers a function for CUDA on any host: the Pallas -> Triton-IR step runs in Python,
so unsupported indexing or primitives inside a kernel body fail on CPU in CI, not only on a GPU.
(What it cannot catch: Triton's own compile, e.g. shared memory over the SM's limit.)
"""
from __future__ import annotations

import logging

import jax
import jax.numpy as jnp

F32 = jnp.float32


def on_gpu() -> bool:
  return jax.default_backend() == "gpu"


def interpret_default(interpret: bool | None) -> bool:
  """None -> run natively on GPU, in the Pallas interpreter elsewhere."""
  return (not on_gpu()) if interpret is None else bool(interpret)


def compiler_params(num_warps: int, num_stages: int, force: bool = False):
  """Triton compiler parameters on GPU (they pick Pallas' Triton backend); None when interpreted.

  force=True returns them on any host (for `lower_for_gpu`)."""
  if not (force or on_gpu()):
    return None
  from jax.experimental.pallas import triton as plt
  return plt.CompilerParams(num_warps=int(num_warps), num_stages=int(num_stages))


def lower_for_gpu(fn, *args, **kwargs) -> str:
  """Lower jit(fn)(*args, **kwargs) for CUDA on this host and return the StableHLO text.

  Kernels called inside must be built with interpret=False and compiler_params(..., force=True)
  (their `gpu_lowering=True` switch, where they have one). Raises what the Triton lowering raises."""
  lowered = jax.jit(fn).trace(*args, **kwargs).lower(lowering_platforms=("cuda",))
  return lowered.as_text()


def dot(a, b, dims, dtype):
  """dot_general with operands cast to `dtype` and float32 accumulation."""
  return jax.lax.dot_general(a.astype(dtype), b.astype(dtype), dims, preferred_element_type=F32)


def falls_back(logged: set, force_interpret: bool, what: str, instead: str) -> bool:
  """True when the kernels `what` must give way to its reference (no GPU and
  not forced into the interpreter by a test); says so once per backend (logging.WARNING, logger
  "lightning_jax.ops"), remembering it in `logged`."""
  if on_gpu() or force_interpret:
    return False
  be = jax.default_backend()
  if be not in logged:
    logged.add(be)
    logging.getLogger("lightning_jax.ops").warning(
        "%s: no GPU (backend %s), running %s instead (the kernels run off GPU only in tests, "
        "through the Pallas interpreter).", what, be, instead)
  return True
