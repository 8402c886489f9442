"""The streams' state gradient (reference.py's formula) as one Pallas launch.

What it replaces: under JAX's autodiff the state's gradient is one XLA loop fusion that reads
the state, the new state's gradient, the read-in's gradient and the output of a separate GEMM,
dz gw^T ([N, S d] with K = m = 24 for four streams), written only to be read back (537 MB per
sublayer at stage_2b's B4 x T4096). Here that product runs on the tensor cores inside the kernel.

Layout: the state and its gradients as [N, S d] (N tokens), one program per (token block,
output stream s, column block): it reads the new state's gradient of all S streams for its
columns, the state's stream s, the read-in's gradient, and writes stream s of dx. The per-token
scalars come transposed, [S K, N] (K = 8 rows a stream: r, c, hp[s], hr[0..S-1, s], zero
padding), so each is one row load over the block's tokens (as the Sinkhorn kernels do).

The product dz gw^T: dz is float32 [N, m]; it is split into bf16 high and low parts (and gw too
when it is float32), padded to 32 columns a part, so one bf16 dot with float32 accumulation
gives dz gw^T to about 2^-16 relative (float32 gw: the three largest of the four part products).

Backends: Triton on GPU, the Pallas interpreter elsewhere (interpret=None); gpu_lowering=True
builds the native call with Triton compiler parameters on any host (ops.pallas.lower_for_gpu).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from lightning_jax.ops.pallas import compiler_params, interpret_default

F32 = jnp.float32
BF16 = jnp.bfloat16
ROWS = 8          # per-token scalars a stream: r, c, hp[s], hr[:, s] (S <= 5), padding


def _body(*refs, n_streams):
  dxp = refs[:n_streams]
  x_ref, dv_ref, coef_ref, dz_ref, gw_ref, o_ref = refs[n_streams:]
  acc = jax.lax.dot_general(dz_ref[...], gw_ref[...], (((1,), (0,)), ((), ())),
                            preferred_element_type=F32)                   # [bn, bd]
  col = lambda k: coef_ref[k, :][:, None]
  out = col(0) * acc - col(1) * x_ref[...].astype(F32) + col(2) * dv_ref[...].astype(F32)
  for t in range(n_streams):
    out = out + col(3 + t) * dxp[t][...].astype(F32)
  o_ref[...] = out.astype(o_ref.dtype)


def _split(a, parts: int):
  """a float32 -> `parts` bf16 arrays summing to a (hi, then the remainder's hi, ...)."""
  out, rest = [], a.astype(F32)
  for _ in range(parts):
    p = rest.astype(BF16)
    out.append(p)
    rest = rest - p.astype(F32)
  return out


def _pad_cols(a, width):
  return jnp.pad(a, ((0, 0), (0, width - a.shape[1])))


def check_shapes(n: int, d: int, block_n: int, block_d: int, n_streams: int):
  """The kernel's shape rules; a ValueError naming the first one broken."""
  for name, v in (("block_n", block_n), ("block_d", block_d)):
    if not isinstance(v, int) or v < 16 or v & (v - 1):
      raise ValueError(f"stream_grad kernel: {name}={v!r} must be a power of two >= 16.")
  if n % block_n or d % block_d:
    raise ValueError(f"stream_grad kernel: {n} tokens and width {d} must be multiples of "
                     f"block_n={block_n} and block_d={block_d}.")
  if not 1 <= n_streams <= ROWS - 3:
    raise ValueError(f"stream_grad kernel: {n_streams} streams; expected 1 to {ROWS - 3}.")


def state_grad(x, dxp, dv, r, c, hp, hr, dz, gw, *, block_n: int = 64, block_d: int = 128,
               num_warps: int = 4, interpret: bool | None = None, gpu_lowering: bool = False):
  """reference.state_grad's dx [N, S, d], in x's dtype, from one Pallas launch."""
  n, s, d = x.shape
  m = dz.shape[-1]
  check_shapes(n, d, block_n, block_d, s)
  nd = d // block_d
  mp = max(16, 1 << (m - 1).bit_length())
  # the per-token scalars, stream by stream: [S, ROWS, N] -> [S ROWS, N]
  per_s = [jnp.stack([r, c, hp[:, j]] + [hr[:, t, j] for t in range(s)]
                     + [jnp.zeros_like(r)] * (ROWS - 3 - s)).astype(F32) for j in range(s)]
  coef = jnp.concatenate(per_s, axis=0)
  gwt = jnp.pad(gw.T.astype(F32), ((0, mp - m), (0, 0)))                   # [mp, S d]
  dzp = _pad_cols(dz.astype(F32), mp)                                       # [N, mp]
  dz_hi, dz_lo = _split(dzp, 2)
  if gw.dtype == F32:
    g_hi, g_lo = _split(gwt, 2)
    a_parts, b_parts = [dz_hi, dz_lo, dz_hi], [g_hi, g_hi, g_lo]
  else:
    g = gwt.astype(BF16)
    a_parts, b_parts = [dz_hi, dz_lo], [g, g]
  if len(a_parts) & (len(a_parts) - 1):                   # pad the contraction to a power of 2
    a_parts.append(jnp.zeros_like(dz_hi))
    b_parts.append(jnp.zeros_like(b_parts[0]))
  dz2 = jnp.concatenate(a_parts, axis=1)                                     # [N, K]
  gw2 = jnp.concatenate(b_parts, axis=0)                                     # [K, S d]
  kk = dz2.shape[1]
  x2, dxp2 = x.reshape(n, s * d), dxp.reshape(n, s * d)
  blk = (block_n, block_d)
  stream_t = [pl.BlockSpec(blk, functools.partial(lambda i, j, col, t: (i, t * nd + col), t=t))
              for t in range(s)]
  own = pl.BlockSpec(blk, lambda i, j, col: (i, j * nd + col))
  interp = False if gpu_lowering else interpret_default(interpret)
  out = pl.pallas_call(
      functools.partial(_body, n_streams=s),
      grid=(n // block_n, s, nd),
      in_specs=stream_t + [
          own,
          pl.BlockSpec(blk, lambda i, j, col: (i, col)),
          pl.BlockSpec((ROWS, block_n), lambda i, j, col: (j, i)),
          pl.BlockSpec((block_n, kk), lambda i, j, col: (i, 0)),
          pl.BlockSpec((kk, block_d), lambda i, j, col: (0, j * nd + col))],
      out_specs=own,
      out_shape=jax.ShapeDtypeStruct((n, s * d), x.dtype),
      interpret=interp, name="stream_state_grad",
      compiler_params=compiler_params(num_warps, 1, force=gpu_lowering),
  )(*([dxp2] * s), x2, dv, coef, dz2, gw2)
  return out.reshape(n, s, d)
