"""Sinkhorn normalisation of the mHC residual mixing logits (SPEC §2.5): the op's entry point.

impl: "rolled" (a lax.fori_loop over the rounds; reference.py: the same rounds unrolled in
Python), "kernel" (kernel.py: one Pallas launch for the forward, one for the backward; off GPU
it gives way to "rolled", said once per backend on logger "lightning_jax.ops", unless
interpret=True: then the kernels run in the Pallas interpreter, which is how the CPU tests run
them), "auto" (the kernel on GPU, "rolled" elsewhere). Under a mesh (sharding.use_mesh) the
kernel runs per device (`sharded`).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from lightning_jax import sharding as shd
from lightning_jax.ops.pallas import falls_back, on_gpu
from lightning_jax.ops.sinkhorn import kernel

IMPLS = ("auto", "rolled", "kernel")
_FALLBACK_LOGGED = set()


def _round(m, eps):
  """One Sinkhorn round: rows, then columns, normalised."""
  m = m / (jnp.sum(m, axis=-1, keepdims=True) + eps)
  return m / (jnp.sum(m, axis=-2, keepdims=True) + eps)


def rolled(logits, iters: int = 20, eps: float = 1e-6, unroll: int = 1):
  """[..., n, n] logits -> doubly stochastic [..., n, n] (float32), the rounds in a rolled loop,
  `unroll` rounds to a trip (the same arithmetic in the same order for any unroll).

  The gradient is `_rolled`'s custom VJP: the forward keeps each round's input in one float32
  [iters, ..., n, n] stack and the backward runs the rounds' VJPs in reverse, recomputing each
  round's sums from its input. Autodiff through the loop kept four stacks (the matrix before
  each half-round and both sums) and started each from a zero array that XLA shared between
  the loops and copied into every one of them; on an H100 those device-to-device copies ran at
  about 100 GB/s and took 19.8 ms of stage_2b's B4 step (docs/PERFORMANCE.md, session 18).
  """
  if int(unroll) < 1:
    raise ValueError(f"sinkhorn: unroll={unroll!r} must be a whole number of rounds >= 1.")
  if int(iters) < 0:
    raise ValueError(f"sinkhorn: iters={iters!r} must be an integer >= 0.")
  return _rolled(logits.astype(jnp.float32), int(iters), float(eps),
                 min(int(unroll), max(int(iters), 1)))


# A rolled loop, not an unrolled one: unrolled, the 20 rounds' backward becomes ~100 separate
# small reductions per call (x2 per layer); on GPU every one is a kernel to compile, and the
# tiny model's training step did not finish compiling in 4 minutes (47 s rolled; PERFORMANCE.md).
# A few rounds to a trip, though: XLA copies the carried [..., n, n] matrix once per trip (the
# normalisation cannot write over its own input), and on stage_2b's step those copies were 738
# device-to-device memcpys per step at 1 round a trip (PERFORMANCE.md, session 18).
@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _rolled(x, iters, eps, unroll):
  return _rolled_fwd(x, iters, eps, unroll)[0]


def _rolled_fwd(x, iters, eps, unroll):
  m0 = jnp.exp(x - jnp.max(x, axis=-1, keepdims=True))    # the max is a constant (no gradient)
  # slot i: the matrix entering round i. The stack starts as copies of m0 (slot 0 is m0), written
  # by a fusion of this call's own, not from a shared zero array that XLA would copy in.
  stack = jnp.broadcast_to(m0, (max(iters, 1),) + m0.shape)

  def body(i, carry):
    m, st = carry
    return _round(m, eps), jax.lax.dynamic_update_index_in_dim(st, m, i, 0)

  m, stack = jax.lax.fori_loop(0, iters, body, (m0, stack), unroll=unroll)
  return m, stack


def _rolled_bwd(iters, eps, unroll, stack, g):
  def body(j, g):
    m_in = jax.lax.dynamic_index_in_dim(stack, iters - 1 - j, 0, keepdims=False)
    return jax.vjp(lambda m: _round(m, eps), m_in)[1](g)[0]

  g = jax.lax.fori_loop(0, iters, body, g.astype(jnp.float32), unroll=unroll)
  return (g * stack[0],)                                    # d exp(x - c) = exp(x - c) dx


_rolled.defvjp(_rolled_fwd, _rolled_bwd)


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
