"""Sinkhorn normalisation of the mHC residual mixing logits (SPEC §2.5): the op's entry point.

impl: "rolled" (a lax.fori_loop over the rounds; reference.py: the same rounds unrolled in
Python), "kernel" (kernel.py: one Pallas launch for the forward, one for the backward; off GPU
it gives way to "rolled", said once per backend on logger "lightning_jax.ops", unless
interpret=True: then the kernels run in the Pallas interpreter, which is how the CPU tests run
them), "auto" (the kernel on GPU, "rolled" elsewhere). Under a mesh (sharding.use_mesh) the
kernel runs per device (`sharded`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from lightning_jax import sharding as shd
from lightning_jax.ops.pallas import falls_back, on_gpu
from lightning_jax.ops.sinkhorn import kernel

IMPLS = ("auto", "rolled", "kernel")
_FALLBACK_LOGGED = set()


def rolled(logits, iters: int = 20, eps: float = 1e-6, unroll: int = 1):
  """[..., n, n] logits -> doubly stochastic [..., n, n] (float32), the rounds in a rolled loop,
  `unroll` rounds to a trip (the same rounds in the same order for any unroll; XLA may fuse them
  differently, so results agree to float32 rounding)."""
  if int(unroll) < 1:
    raise ValueError(f"sinkhorn: unroll={unroll!r} must be a whole number of rounds >= 1.")
  x = logits.astype(jnp.float32)
  m = jnp.exp(x - jax.lax.stop_gradient(jnp.max(x, axis=-1, keepdims=True)))

  def body(_, m):
    m = m / (jnp.sum(m, axis=-1, keepdims=True) + eps)
    return m / (jnp.sum(m, axis=-2, keepdims=True) + eps)

  # A rolled loop, not an unrolled one: unrolled, the 20 rounds' backward becomes ~100 separate
  # small reductions per call (x2 per layer); on GPU every one is a kernel to compile, and the
  # tiny model's training step did not finish compiling in 4 minutes (47 s rolled; PERFORMANCE.md).
  # A few rounds to a trip, though: XLA copies the carried [..., n, n] matrix once per trip (the
  # normalisation cannot write over its own input): 738 copies per stage_2b B1 step at 1 round a
  # trip, each a memcpy launch on the compute stream (PERFORMANCE.md, session 18).
  return jax.lax.fori_loop(0, iters, body, m, unroll=min(int(unroll), max(int(iters), 1)))


def sharded(fn, logits):
  """Run fn(logits) per device under the active mesh, the leading dim split over the batch axes
  (every matrix is independent; a pallas_call is never partitioned by XLA)."""
  mesh = shd.current_mesh()
  if mesh is None or mesh.size == 1:
    return fn(logits)
  axes = ("batch",) + (None,) * (logits.ndim - 1) if logits.ndim > 2 else (None, None)
  spec = shd._fits(logits.shape, shd.spec_for(axes), mesh)
  return jax.shard_map(fn, mesh=mesh, in_specs=(spec,), out_specs=spec,
                       check_vma=False)(logits)


def sinkhorn(logits, iters: int = 20, eps: float = 1e-6, impl: str = "auto", *,
             interpret: bool | None = None, unroll: int = 1):
  """[..., n, n] logits -> doubly stochastic [..., n, n] (float32). unroll: rounds to a trip of
  the rolled loop (the kernel ignores it)."""
  if impl not in IMPLS:
    raise ValueError(f"sinkhorn: impl={impl!r} must be one of {list(IMPLS)}.")
  if impl == "auto":
    impl = "kernel" if on_gpu() else "rolled"
  if impl == "kernel" and not falls_back(_FALLBACK_LOGGED, interpret is True,
                                         "the Sinkhorn Pallas kernel", "the rolled loop"):
    return sharded(lambda x: kernel.sinkhorn(x, int(iters), float(eps), interpret=interpret),
                   logits)
  return rolled(logits, iters, eps, unroll)
