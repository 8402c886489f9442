"""The streams' backward kernels: the op's entry points, `state_grad` (the state's whole
gradient) and `mix_grads` (the mix's sums); reference.py has both formulas.

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


def _flat(fn, n_tok: int, *args):
  """fn on the [N, ...] forms of the first n_tok args ([B, T, ...] each; the rest pass as they
  are); every output back to [B, T, ...]."""
  lead = args[0].shape[:2]
  n = math.prod(lead)
  f = lambda a: a.reshape((n,) + a.shape[2:])
  out = fn(*[f(a) for a in args[:n_tok]], *args[n_tok:])
  return jax.tree_util.tree_map(lambda o: o.reshape(lead + o.shape[1:]), out)


def sharded(fn, n_tok: int, *args):
  """fn per device under the active mesh: the first n_tok args ([B, T, ...]) and every output
  split over the batch axes (a pallas_call is never partitioned by XLA), the rest replicated."""
  mesh = shd.current_mesh()
  if mesh is None or mesh.size == 1:
    return fn(*args)
  b_ax = shd._fits(args[0].shape, shd.spec_for(("batch",)), mesh)[0]
  spec = lambda a: P(b_ax, *([None] * (a.ndim - 1)))
  out_shapes = jax.eval_shape(fn, *args)
  return jax.shard_map(fn, mesh=mesh,
                       in_specs=tuple(spec(a) if i < n_tok else P(*([None] * a.ndim))
                                      for i, a in enumerate(args)),
                       out_specs=jax.tree_util.tree_map(spec, out_shapes),
                       check_vma=False)(*args)


def _use_kernel(impl: str, x, block_n: int, block_d: int, interpret) -> bool:
  if impl not in IMPLS:
    raise ValueError(f"stream_grad: impl={impl!r} must be one of {list(IMPLS)}.")
  if impl == "auto":
    impl = "kernel" if on_gpu() and _fits(x, block_n, block_d) else "reference"
  return impl == "kernel" and not falls_back(
      _FALLBACK_LOGGED, interpret is True, "the streams' gradient kernels", "their reference")


def _fits(x, block_n, block_d) -> bool:
  n = math.prod(x.shape[:-2])
  mesh = shd.current_mesh()
  if mesh is not None and mesh.size > 1:
    b_ax = shd._fits(x.shape, shd.spec_for(("batch",)), mesh)[0]
    axes = () if b_ax is None else ((b_ax,) if isinstance(b_ax, str) else tuple(b_ax))
    n //= math.prod(mesh.shape[a] for a in axes)
  s = x.shape[-2]
  return n % block_n == 0 and x.shape[-1] % block_d == 0 and 2 + s * (s + 1) <= kernel.ROWS


def state_grad(x, dxp, dv, r, c, hp, hr, dz, gw, *, impl: str = "auto",
               interpret: bool | None = None, block_n: int = 16, block_d: int = 128,
               num_warps: int = 4):
  """x, dxp [B, T, S, d]; dv [B, T, d]; r, c [B, T]; hp [B, T, S]; hr [B, T, S, S]; dz [B, T, m];
  gw [S d, m] -> dx [B, T, S, d] in x's dtype (reference.py's formula)."""
  args = (x, dxp, dv, r, c, hp, hr, dz, gw)
  if _use_kernel(impl, x, block_n, block_d, interpret):
    run = lambda *a: _flat(lambda *f: kernel.state_grad(
        *f, block_n=block_n, block_d=block_d, num_warps=num_warps, interpret=interpret), 8, *a)
    return sharded(run, 8, *args)
  return _flat(reference.state_grad, 8, *args).astype(x.dtype)


def mix_grads(dxp, x, y, h_post, *, impl: str = "auto", interpret: bool | None = None,
              block_n: int = 16, block_d: int = 128, num_warps: int = 4):
  """The mix's backward (reference.mix_grads): dxp, x [B, T, S, d], y [B, T, d], h_post
  [B, T, S] -> dy [B, T, d] in y's dtype, dh_post [B, T, S], dh_res [B, T, S, S] float32."""
  args = (dxp, x, y, h_post)
  if _use_kernel(impl, x, block_n, block_d, interpret):
    run = lambda *a: _flat(lambda *f: kernel.mix_grads(
        *f, block_n=block_n, block_d=block_d, num_warps=num_warps, interpret=interpret), 4, *a)
    return sharded(run, 4, *args)
  dy, dh_post, dh_res = _flat(reference.mix_grads, 4, *args)
  return dy.astype(y.dtype), dh_post, dh_res
