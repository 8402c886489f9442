"""The streams' state gradient (reference.state_grad) as one Pallas launch, and the mix's
backward sums (reference.mix_grads) as another.

What it replaces: under JAX's autodiff the state's gradient is one XLA loop fusion that reads
the state, the new state's gradient, the read-in's gradient and the output of a separate GEMM,
dz gw^T ([N, S d] with K = m = 24 for four streams), written only to be read back (537 MB per
sublayer at stage_2b's B4 x T4096). Here that product is formed inside the kernel.

Layout: one program per (token block, column block) writes all S streams of dx there: it
reads the state and the new state's gradient as [block_n, S, block_d] blocks of [N, S, d] (each
once), the read-in's gradient [block_n, block_d] and gw^T's columns of every stream. The
per-token scalars come transposed, [ROWS, N] (r, c, hp[0..S-1], hr[t, s] at 2 + S + t S + s,
zero padding), so each is one row load over the block's tokens (as the Sinkhorn kernels do).

The product r (dz gw^T) (`product`, see state_grad): m float32 rank-1 updates on the CUDA
cores ("fma", the default), or one tensor-core dot a stream from bf16 high / low parts ("mma").

Blocks (Triton 3.5 and ptxas for sm_90 at stage_2b's shape, docs/PERFORMANCE.md session 20):
"fma" at 16 tokens x 128 columns and 4 warps: 139 registers, no spill, 4 layout conversions
(of a [128] row of gw, inside the loop over m) and 8 barriers in the code; 32 x 128 at 8
warps: 162 registers, none of either. "mma" at 16 x 128: 168 registers, 13 conversions (of
[16, 128] tiles) and 61 barriers, measured at 0.66 TB/s on an H100. (2-D loads of gw's row or
dz's column in place of the [128] / [16] row loads bring tile conversions back into the fma
loop: 8, tried.)

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
ROWS = 32         # per-token scalars: r, c, hp [S], hr [S, S] (S <= 5), padding


def _body(dxp_ref, x_ref, dv_ref, coef_ref, dz_ref, gw_ref, o_ref, *, n_streams, m, product):
  ns = n_streams
  col = lambda ref, k: ref[k, :][:, None]
  dv = dv_ref[...].astype(F32)
  dxp = [dxp_ref[:, t, :] for t in range(ns)]              # kept in the state's dtype
  if product == "mma":
    dz = dz_ref[...]
  for s in range(ns):
    # "mma" as measured in session 20: the dot's result first, the elementwise terms onto it
    out = col(coef_ref, 0) * jax.lax.dot_general(
        dz, gw_ref[:, s, :], (((1,), (0,)), ((), ())),
        preferred_element_type=F32) if product == "mma" else 0.0
    out = out - col(coef_ref, 1) * x_ref[:, s, :].astype(F32) + col(coef_ref, 2 + s) * dv
    for t in range(ns):
      out = out + col(coef_ref, 2 + ns + t * ns + s) * dxp[t].astype(F32)
    if product == "fma":
      # a loop (the m rows of gw are not all live at once) carrying the sum so far, whose
      # layout is the loaded tiles': only the [block_d] rows and [block_n] columns convert
      out = jax.lax.fori_loop(
          0, m, lambda k, acc, s=s: acc + col(dz_ref, k) * gw_ref[k, s, :][None, :].astype(F32),
          out)
    o_ref[:, s, :] = out.astype(o_ref.dtype)


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
  if not 1 <= n_streams or 2 + n_streams + n_streams ** 2 > ROWS:
    raise ValueError(f"stream_grad kernel: {n_streams} streams; expected 1 to 5.")


PRODUCTS = ("fma", "mma")


def state_grad(x, dxp, dv, r, c, hp, hr, dz, gw, *, block_n: int = 16, block_d: int = 128,
               num_warps: int = 4, interpret: bool | None = None, gpu_lowering: bool = False,
               product: str = "fma"):
  """reference.state_grad's dx [N, S, d], in x's dtype, from one Pallas launch.

  product: how r (dz gw^T) is formed. "mma": one tensor-core dot a stream from bf16 high / low
  parts of dz (and of gw when float32), about 2^-16 relative. Triton then holds the whole
  elementwise sum in the dot's MMA layout: the loaded tiles go through shared memory to get
  there (13 layout conversions of [16, 128] tiles and 61 barriers at 16 x 128 for sm_90), and
  the kernel measured 0.66 TB/s on an H100 (docs/PERFORMANCE.md, session 20). "fma": m
  float32 rank-1 updates (r dz_k) (x) gw_k on the CUDA cores, all in the loads' layout (m + 30
  multiply-adds an element; no dot, no conversion of the state tiles). Measured alone on an H100
  at stage_2b's B4 shape (session 21): fma 2.05-3.01 ms by block, mma 1.75-2.46 ms, the XLA
  formula 3.52 ms; inside the B4 step both leave `model.hc.pre=kernel` slower than autodiff."""
  n, s, d = x.shape
  m = dz.shape[-1]
  check_shapes(n, d, block_n, block_d, s)
  if product not in PRODUCTS:
    raise ValueError(f"stream_grad kernel: product={product!r} must be one of {list(PRODUCTS)}.")
  mp = max(16, 1 << (m - 1).bit_length())
  rows = [r, c] + [hp[:, j] for j in range(s)] + [hr[:, t, j] for t in range(s) for j in range(s)]
  coef = jnp.stack(rows + [jnp.zeros_like(r)] * (ROWS - len(rows))).astype(F32)   # [ROWS, N]
  gwt = jnp.pad(gw.T.astype(F32), ((0, mp - m), (0, 0)))                   # [mp, S d]
  if product == "fma":
    dz2 = jnp.pad((dz.astype(F32) * r.astype(F32)[:, None]).T, ((0, mp - m), (0, 0)))  # [mp, N]
    gw2 = gwt.astype(gw.dtype).reshape(mp, s, d)
    dz_spec = pl.BlockSpec((mp, block_n), lambda i, j: (0, i))
  else:
    dz_hi, dz_lo = _split(_pad_cols(dz.astype(F32), mp), 2)
    if gw.dtype == F32:
      g_hi, g_lo = _split(gwt, 2)
      a_parts, b_parts = [dz_hi, dz_lo, dz_hi], [g_hi, g_hi, g_lo]
    else:
      g = gwt.astype(BF16)
      a_parts, b_parts = [dz_hi, dz_lo], [g, g]
    if len(a_parts) & (len(a_parts) - 1):                 # pad the contraction to a power of 2
      a_parts.append(jnp.zeros_like(dz_hi))
      b_parts.append(jnp.zeros_like(b_parts[0]))
    dz2 = jnp.concatenate(a_parts, axis=1)                                   # [N, K]
    gw2 = jnp.concatenate(b_parts, axis=0).reshape(-1, s, d)                 # [K, S, d]
    dz_spec = pl.BlockSpec((block_n, dz2.shape[1]), lambda i, j: (i, 0))
  state = pl.BlockSpec((block_n, s, block_d), lambda i, j: (i, 0, j))
  interp = False if gpu_lowering else interpret_default(interpret)
  return pl.pallas_call(
      functools.partial(_body, n_streams=s, m=m, product=product),
      grid=(n // block_n, d // block_d),
      in_specs=[state, state,
                pl.BlockSpec((block_n, block_d), lambda i, j: (i, j)),
                pl.BlockSpec((ROWS, block_n), lambda i, j: (0, i)),
                dz_spec,
                pl.BlockSpec((gw2.shape[0], s, block_d), lambda i, j: (0, 0, j))],
      out_specs=state,
      out_shape=jax.ShapeDtypeStruct((n, s, d), x.dtype),
      interpret=interp, name="stream_state_grad",
      compiler_params=compiler_params(num_warps, 1, force=gpu_lowering),
  )(dxp, x, dv, coef, dz2, gw2)


def _mix_body(dxp_ref, x_ref, y_ref, hp_ref, dy_ref, sums_ref, *, n_streams, block_d, width):
  ns = n_streams
  h_post = [hp_ref[s, :][:, None] for s in range(ns)]

  def chunk(j, acc):
    cols = pl.ds(j * block_d, block_d)
    dxp = [dxp_ref[:, s, cols].astype(F32) for s in range(ns)]
    y = y_ref[:, cols].astype(F32)
    dy = h_post[0] * dxp[0]
    for s in range(1, ns):
      dy = dy + h_post[s] * dxp[s]
    dy_ref[:, cols] = dy.astype(dy_ref.dtype)
    new = [a + jnp.sum(dxp[s] * y, axis=1) for s, a in zip(range(ns), acc[:ns])]
    for t in range(ns):
      xt = x_ref[:, t, cols].astype(F32)
      new += [acc[ns + s * ns + t] + jnp.sum(dxp[s] * xt, axis=1) for s in range(ns)]
    # reorder the t-major list built above to acc's s-major order
    res = new[ns:]
    new = new[:ns] + [res[t * ns + s] for s in range(ns) for t in range(ns)]
    return tuple(new)

  zero = jnp.zeros((dxp_ref.shape[0],), F32)
  acc = jax.lax.fori_loop(0, width // block_d, chunk, (zero,) * (ns + ns * ns))
  for k, a in enumerate(acc):
    sums_ref[k, :] = a
  for k in range(len(acc), sums_ref.shape[0]):
    sums_ref[k, :] = zero


def mix_grads(dxp, x, y, h_post, *, block_n: int = 16, block_d: int = 128, num_warps: int = 4,
              interpret: bool | None = None, gpu_lowering: bool = False):
  """reference.mix_grads from one Pallas launch: dy in y's dtype, dh_post and dh_res float32.

  One program per block of tokens walks the width in `block_d` columns, reading the new state's
  gradient, the state and y once and writing dy; the S + S^2 sums stay in registers and leave
  transposed ([ROWS, N]), as the scalars enter state_grad."""
  n, s, d = x.shape
  check_shapes(n, d, block_n, block_d, s)
  hp = jnp.concatenate([h_post.T.astype(F32), jnp.zeros((ROWS - s, n), F32)])      # [ROWS, N]
  state = pl.BlockSpec((block_n, s, d), lambda i: (i, 0, 0))
  rows = pl.BlockSpec((ROWS, block_n), lambda i: (0, i))
  interp = False if gpu_lowering else interpret_default(interpret)
  dy, sums = pl.pallas_call(
      functools.partial(_mix_body, n_streams=s, block_d=block_d, width=d),
      grid=(n // block_n,),
      in_specs=[state, state, pl.BlockSpec((block_n, d), lambda i: (i, 0)), rows],
      out_specs=[pl.BlockSpec((block_n, d), lambda i: (i, 0)), rows],
      out_shape=[jax.ShapeDtypeStruct((n, d), y.dtype), jax.ShapeDtypeStruct((ROWS, n), F32)],
      interpret=interp, name="stream_mix_grads",
      compiler_params=compiler_params(num_warps, 1, force=gpu_lowering),
  )(dxp, x, y, hp)
  return dy, sums[:s].T, sums[s:s + s * s].T.reshape(n, s, s)
