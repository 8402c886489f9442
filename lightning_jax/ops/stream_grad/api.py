"""The streams' state gradient: the op's entry point (reference.py has the formula).

impl: "auto" (the Pallas kernel on GPU where the shapes fit its blocks, the reference elsewhere),
"reference", or "kernel" (off GPU it gives way to the reference, said once per backend on logger
"lightning_jax.ops", unless interpret=True: then it runs in the Pallas interpreter, which is how
the CPU tests run it). Under a mesh (sharding.use_mesh) the kernel runs per device over the
batch axes (`sharded`): every token is independent.
"""
from __future__ import annotations

import math

import jax
from jax.sharding import PartitionSpec as P

from lightning_jax import sharding as shd
from lightning_jax.ops.pallas import falls_back, on_gpu
from lightning_jax.ops.stream_grad import kernel, reference

IMPLS = ("auto", "reference", "kernel")
_FALLBACK_LOGGED = set()


def _flat(fn, x, dxp, dv, r, c, hp, hr, dz, gw):
  """fn on the [N, ...] forms of [B, T, ...] inputs; dx back as [B, T, S, d]."""
  lead = x.shape[:-2]
  n = math.prod(lead)
  f = lambda a: a.reshape((n,) + a.shape[len(lead):])
  return fn(f(x), f(dxp), f(dv), f(r), f(c), f(hp), f(hr), f(dz), gw).reshape(x.shape)


def sharded(fn, x, dxp, dv, r, c, hp, hr, dz, gw):
  """fn per device under the active mesh, the batch dim over the batch axes (a pallas_call is
  never partitioned by XLA); gw replicated."""
  mesh = shd.current_mesh()
  if mesh is None or mesh.size == 1:
    return fn(x, dxp, dv, r, c, hp, hr, dz, gw)
  b_ax = shd._fits(x.shape, shd.spec_for(("batch",)), mesh)[0]
  spec = lambda a: P(b_ax, *([None] * (a.ndim - 1)))
  args = (x, dxp, dv, r, c, hp, hr, dz)
  return jax.shard_map(fn, mesh=mesh, in_specs=tuple(spec(a) for a in args) + (P(None, None),),
                       out_specs=spec(x), check_vma=False)(*args, gw)


def _fits(x, block_n, block_d) -> bool:
  n = math.prod(x.shape[:-2])
  mesh = shd.current_mesh()
  if mesh is not None and mesh.size > 1:
    b_ax = shd._fits(x.shape, shd.spec_for(("batch",)), mesh)[0]
    axes = () if b_ax is None else ((b_ax,) if isinstance(b_ax, str) else tuple(b_ax))
    n //= math.prod(mesh.shape[a] for a in axes)
  return n % block_n == 0 and x.shape[-1] % block_d == 0 and 2 + x.shape[-2] * (x.shape[-2] + 1) <= kernel.ROWS


def state_grad(x, dxp, dv, r, c, hp, hr, dz, gw, *, impl: str = "auto",
               interpret: bool | None = None, block_n: int = 16, block_d: int = 128,
               num_warps: int = 4):
  """x, dxp [B, T, S, d]; dv [B, T, d]; r, c [B, T]; hp [B, T, S]; hr [B, T, S, S]; dz [B, T, m];
  gw [S d, m] -> dx [B, T, S, d] in x's dtype (reference.py's formula)."""
  if impl not in IMPLS:
    raise ValueError(f"stream_grad: impl={impl!r} must be one of {list(IMPLS)}.")
  if impl == "auto":
    impl = "kernel" if on_gpu() and _fits(x, block_n, block_d) else "reference"
  args = (x, dxp, dv, r, c, hp, hr, dz, gw)
  if impl == "kernel" and not falls_back(_FALLBACK_LOGGED, interpret is True,
                                         "the streams' state-gradient kernel", "its reference"):
    run = lambda *a: _flat(lambda *f: kernel.state_grad(
        *f, block_n=block_n, block_d=block_d, num_warps=num_warps, interpret=interpret), *a)
    return sharded(run, *args)
  return _flat(reference.state_grad, *args).astype(x.dtype)
