"""GSA attention's one entry point: `attend(q, k, v, selection, query_chunk, mode, options)`.

mode "gather" / "dense_masked": the references (reference.attend). "flash": one fused
flash-attention call under the selection's dense mask (jax.nn.dot_product_attention: cuDNN on
GPU in bf16/f16, causal O(T^2 / 2) FLOPs at flash speed, no [T, T] logits in memory, no
chunking). "kernel": the Pallas kernels gathering the selected keys in-kernel; off GPU they give
way to "gather" (said once per backend on logger "lightning_jax.ops") unless options.interpret
is True (the CPU tests). Flash and the kernels run per device under a mesh (`sharded`).
`indexer_scores`: the lightning indexer's scores (the XLA reference; the Pallas kernel,
kernel.indexer_scores, is not on the production path: benchmarks/gsa_kernel_bench.py).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from lightning_jax import sharding as shd
from lightning_jax.ops.pallas import falls_back, on_gpu
from lightning_jax.ops.sparse_attention import kernel, reference
from lightning_jax.ops.sparse_attention.kernel import GSAKernelOptions
from lightning_jax.ops.sparse_attention.reference import (attend_gathered, from_chunks,
                                                          indexer_scores, selection_to_mask,
                                                          to_chunks)

MODES = ("gather", "dense_masked", "flash", "kernel")
_FALLBACK_LOGGED = set()

__all__ = ["GSAKernelOptions", "MODES", "attend", "attend_gathered", "flash_attention",
           "from_chunks", "indexer_scores", "selection_to_mask", "sharded", "to_chunks"]


def sharded(fn, q, k, v, selection):
  """Run fn(q, k, v, selection) per device under the active mesh: batch over the batch axes,
  heads over "heads"' axes (a pallas_call is never partitioned by XLA); the selection follows
  the batch split and is replicated over heads."""
  mesh = shd.current_mesh()
  if mesh is None or mesh.size == 1:
    return fn(q, k, v, selection)
  spec4 = shd._fits(q.shape, shd.spec_for(("batch", None, "heads", None)), mesh)
  return jax.shard_map(fn, mesh=mesh, in_specs=(spec4, spec4, spec4, P(spec4[0], None, None)),
                       out_specs=spec4, check_vma=False)(q, k, v, selection)


def flash_attention(q, k, v, selection):
  """Fused (flash) attention of q [B, T, H, D] over the selected keys, through
  jax.nn.dot_product_attention with the selection as a [B, 1, T, T] mask and the causal flag
  (cuDNN's flash kernel on GPUs in bf16/f16 skips the blocks above the diagonal; elsewhere
  XLA's implementation). Every query keeps at least its sinks or itself, so no row is empty."""

  def local(q, k, v, selection):
    mask = selection_to_mask(selection, k.shape[1])[:, None]
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True,
                                        implementation=flash_implementation(q.dtype)
                                        ).astype(q.dtype)

  # per device (batch over the batch axes, heads over "heads"), like the Pallas kernels: XLA
  # does not partition the cuDNN call's mask with q, and a global [B, 1, T, T] mask against a
  # per-device q made cuDNN refuse the graph (CUDNN_STATUS_BAD_PARAM, batch dims) on 4 H200s
  # with the batch split.
  return sharded(local, q, k, v, selection)


def flash_implementation(dtype) -> str:
  """jax.nn.dot_product_attention's implementation for "flash": cuDNN on GPU in bf16/f16."""
  return "cudnn" if on_gpu() and dtype in (jnp.bfloat16, jnp.float16) else "xla"


def attend(q, k, v, selection, query_chunk: int, mode: str = "gather",
           options: GSAKernelOptions = GSAKernelOptions()):
  """Attention of q [B, T, H, D] over the selected keys (selection int32 [B, T, K], -1 empty)
  -> [B, T, H, D] in q's dtype; query_chunk: queries per chunk of the references."""
  if mode not in MODES:
    raise ValueError(f"GSA attention: mode={mode!r} must be one of {list(MODES)}.")
  if mode == "flash":
    return flash_attention(q, k, v, selection)
  if mode == "kernel":
    if not falls_back(_FALLBACK_LOGGED, options.interpret is True, "the GSA attention kernels",
                      "the XLA gather attention"):
      return sharded(functools.partial(kernel.gsa_attention, options=options), q, k, v,
                     selection)
    mode = "gather"
  return reference.attend(q, k, v, selection, query_chunk, mode)
