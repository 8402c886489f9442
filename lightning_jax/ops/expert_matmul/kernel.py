"""Dequantising grouped matmul for the TQP base experts (SPEC §4), as a Pallas (Triton) kernel.

The contract is reference.dequantized_matmul (and reference.rotate for `rotate`).

  out[e, c, o] = norms[e, o] * sum_n xr[e, c, n] * levels[codes[e, o, n]]

xr [E, C, n] is the rotated expert input (tqp.rotate; reference.rotate), codes uint8 [E, O, n * bits / 8] the packed
codebook indices (tqp.pack: 4 bits = two indices per byte, low nibble = even column; 8 bits = one
per byte), levels [2^bits] the scalar codebook, norms [E, O] float32 the row norms.

One program per (block of outputs, block of rows, expert); the K loop over n runs inside. Per K
step it loads a [BN, BK * bits / 8] byte tile of codes, unpacks the nibbles (4 bits: even columns
from the low nibble, odd from the high, multiplied against the even / odd columns of x, which the
wrapper permutes to [even | odd] in XLA so both load contiguously; nothing is interleaved in
registers), looks each index up in the codebook (a gather load from the tiny `levels` array,
L1-resident; or, 4 bits, a tree of 15 selects: `lookup`), and accumulates x W^T (or W x^T,
`w_first`) in float32 on the tensor cores (operands in the dot dtype: bfloat16 for bf16 inputs, float32 for float32). The norms
scale the accumulator in the epilogue. The dequantised weights never reach HBM: the base reads 0.5
(4-bit) or 1 (8-bit) byte per weight and tile instead of writing and re-reading a bf16 copy.

Forward only: `tqp_matmul` stops the gradient of its inputs (the TQP base output is
stop-gradient; the input gets its gradient through the adapters), so no tangent ever reaches the
pallas_call. `tqp_matmul_adapter` adds the rank-R adapter product xb A^T in the epilogue (one
K = R dot per tile) and differentiates only that part, by a custom VJP in XLA.

`rotate` is the TQP input rotation H D x / sqrt(n) as one Pallas pass per row (two small
Hadamard dots per row), optionally writing the 4-bit kernel's [even | odd] layout.

Backends: Triton on GPU, the Pallas interpreter elsewhere (tests). `gpu_lowering=True` builds the
native call with Triton compiler parameters on any host, for ops.pallas.lower_for_gpu.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from lightning_jax.ops import pallas as common

F32 = common.F32
_DN_T = (((1,), (1,)), ((), ()))     # a @ b.T


def _lookup_select(idx, vals):
  """levels[idx] for 4-bit idx as a binary tree of 15 selects on the index bits (ALU work
  instead of one L1 gather load per weight); vals: the 16 levels as scalars."""
  for bit in range(4):
    on = (idx & (1 << bit)) != 0
    vals = [jnp.where(on, vals[2 * i + 1], vals[2 * i]) for i in range(len(vals) // 2)]
  return vals[0]


def _kernel(x_ref, c_ref, lv_ref, nrm_ref, *refs, bits, bk, n_k, dot_dtype, split, lookup,
            w_first, adapter):
  """x_ref [BM, n], c_ref [BN, n bits / 8] uint8, lv_ref [2^bits], nrm_ref [BN], o_ref [BM, BN];
  with adapter=True refs = (xb_ref [BM, R], a_ref [BN, R], o_ref) and the epilogue adds
  xb a^T (the rank-R adapter's output) to the scaled base.

  4 bits with split=True: x's columns are [even | odd] (see `split_even_odd`), so both halves load
  contiguously; split=False loads the even / odd columns of the natural layout with stride 2.
  lookup: "gather" (levels[idx] as a gather load) or "select" (4 bits: a select tree).
  w_first: accumulate out^T = W x^T ([BN, BM]; the dequantised tile is the dot's first operand,
  which tensor-core MMAs may read from registers) and transpose in the epilogue."""
  o_ref = refs[-1]
  bm, bn = o_ref.shape
  n = x_ref.shape[-1]

  if lookup == "select":
    vals = [lv_ref[i].astype(dot_dtype) for i in range(16)]     # loaded once, outside the K loop

  def deq(idx):
    if lookup == "select":
      return _lookup_select(idx, vals)
    return lv_ref[idx].astype(dot_dtype)

  def mm(acc, xt, wt):
    if w_first:
      return acc + common.dot(wt, xt, _DN_T, dot_dtype)
    return acc + common.dot(xt, wt, _DN_T, dot_dtype)

  def body(i, acc):
    if bits == 4:
      half = bk // 2
      h0 = pl.multiple_of(i * half, half)
      c = c_ref[:, pl.ds(h0, half)].astype(jnp.int32)                          # [BN, BK/2]
      w_even = deq(c & 15)
      w_odd = deq(c >> 4)
      if split:
        x_even = x_ref[:, pl.ds(h0, half)]
        x_odd = x_ref[:, pl.ds(pl.multiple_of(n // 2 + h0, half), half)]
      else:
        k0 = pl.multiple_of(i * bk, bk)
        x_even = x_ref[:, pl.ds(k0, half, stride=2)]
        x_odd = x_ref[:, pl.ds(k0 + 1, half, stride=2)]
      return mm(mm(acc, x_even, w_even), x_odd, w_odd)
    k0 = pl.multiple_of(i * bk, bk)
    c = c_ref[:, pl.ds(k0, bk)].astype(jnp.int32)                                # [BN, BK]
    return mm(acc, x_ref[:, pl.ds(k0, bk)], deq(c))

  shape = (bn, bm) if w_first else (bm, bn)
  acc = jax.lax.fori_loop(0, n_k, body, jnp.zeros(shape, F32))
  if w_first:
    acc = acc.T
  acc = acc * nrm_ref[...].astype(F32)[None, :]
  if adapter:
    xb_ref, a_ref = refs[0], refs[1]
    acc = acc + common.dot(xb_ref[...], a_ref[...], _DN_T, dot_dtype)
  o_ref[...] = acc.astype(o_ref.dtype)


def split_even_odd(x):
  """[..., n] -> [..., n] with the even columns first, then the odd ones (the 4-bit kernel's
  contiguous input layout; XLA fuses this permutation into the producer of x)."""
  lead, n = x.shape[:-1], x.shape[-1]
  return jnp.swapaxes(x.reshape(lead + (n // 2, 2)), -1, -2).reshape(x.shape)


def _pow2(v: int) -> bool:
  return v >= 1 and v & (v - 1) == 0


def _next_pow2(v: int) -> int:
  return 1 << max(0, int(v) - 1).bit_length()


def _tile(dim: int, want: int, what: str, least: int) -> int:
  """A power-of-two tile: `want`, shrunk to the (power-of-two-rounded) dimension, >= least."""
  if not _pow2(int(want)) or want < least:
    raise ValueError(f"expert_matmul: {what}={want} must be a power of two >= {least}.")
  return max(least, min(int(want), _next_pow2(dim)))


def default_blocks(bits: int) -> dict:
  """Tile sizes for H100-class GPUs (modest, powers of two; shared memory well under 228 KB)."""
  return {"block_m": 128, "block_n": 128, "block_k": 128 if bits == 4 else 64,
          "num_warps": 8, "num_stages": 3, "x_layout": "split", "lookup": "gather",
          "w_first": False}


def _pad_to(a, axis, size):
  if a.shape[axis] == size:
    return a
  pad = [(0, 0)] * a.ndim
  pad[axis] = (0, size - a.shape[axis])
  return jnp.pad(a, pad)


def _call(xr, codes, norms, levels, *, bits, block_m, block_n, block_k, num_warps, num_stages,
          x_layout, lookup, w_first, interpret, force_params, xb=None, a=None):
  e, c, n = xr.shape
  o = codes.shape[1]
  per_byte = 2 if bits == 4 else 1
  # tiles: powers of two, dot dims >= 16 (4 bits: each half of a K step is one dot, so BK >= 32).
  # Dimensions that are not a multiple of their tile are zero-padded (zero x columns meet code 0,
  # zero norms give zero output rows), then cut off again.
  bm = _tile(c, block_m, "block_m", 16)
  bn = _tile(o, block_n, "block_n", 16)
  bk = _tile(n, block_k, "block_k", 16 * per_byte)
  c_pad, o_pad, n_pad = (-(-v // t) * t for v, t in ((c, bm), (o, bn), (n, bk)))
  if x_layout == "presplit" and n_pad != n:
    raise ValueError(f"expert_matmul: x_layout='presplit' needs n={n} to be a multiple of "
                     f"block_k={bk} (a split input cannot be padded).")
  xr = _pad_to(_pad_to(xr, 1, c_pad), 2, n_pad)
  codes = _pad_to(_pad_to(codes, 1, o_pad), 2, n_pad // per_byte)
  norms = _pad_to(norms, 1, o_pad)
  if x_layout not in ("split", "strided", "presplit"):
    raise ValueError(f"expert_matmul: x_layout={x_layout!r} must be 'split', 'strided' or "
                     "'presplit'.")
  if lookup not in ("gather", "select") or (lookup == "select" and bits != 4):
    raise ValueError(f"expert_matmul: lookup={lookup!r} must be 'gather' or (4 bits) 'select'.")
  split = bits == 4 and x_layout in ("split", "presplit")
  if bits == 4 and x_layout == "split":
    xr = split_even_odd(xr)
  dot_dtype = F32 if xr.dtype == F32 else jnp.bfloat16
  sq = pl.squeezed if hasattr(pl, "squeezed") else None
  adapter = xb is not None
  kern = functools.partial(_kernel, bits=bits, bk=bk, n_k=n_pad // bk, dot_dtype=dot_dtype,
                           split=split, lookup=lookup, w_first=bool(w_first), adapter=adapter)
  extra_in, extra_specs = [], []
  if adapter:
    r_pad = max(16, _next_pow2(xb.shape[-1]))          # dot dims >= 16: zero-pad the rank
    extra_in = [_pad_to(_pad_to(xb, 1, c_pad), 2, r_pad), _pad_to(_pad_to(a, 1, o_pad), 2, r_pad)]
    extra_specs = [pl.BlockSpec((sq, bm, r_pad), lambda j, i, g: (g, i, 0)),
                   pl.BlockSpec((sq, bn, r_pad), lambda j, i, g: (g, j, 0))]
  params = (common.compiler_params(num_warps, num_stages, force=True) if force_params else
            common.compiler_params(num_warps, num_stages))
  out = pl.pallas_call(
      # output blocks vary fastest (grid x), so the programs running together share one expert's
      # x row tiles and codes in L2: x is read from HBM about once
      kern, grid=(o_pad // bn, c_pad // bm, e),
      in_specs=[pl.BlockSpec((sq, bm, n_pad), lambda j, i, g: (g, i, 0)),
                pl.BlockSpec((sq, bn, n_pad // per_byte), lambda j, i, g: (g, j, 0)),
                pl.BlockSpec((levels.shape[0],), lambda j, i, g: (0,)),
                pl.BlockSpec((sq, bn), lambda j, i, g: (g, j))] + extra_specs,
      out_specs=pl.BlockSpec((sq, bm, bn), lambda j, i, g: (g, i, j)),
      out_shape=jax.ShapeDtypeStruct((e, c_pad, o_pad), xr.dtype),
      interpret=interpret, name=f"tqp{bits}_expert_matmul", compiler_params=params,
  )(xr, codes, levels.astype(F32), norms.astype(F32), *extra_in)
  return out[:, :c, :o] if (c_pad, o_pad) != (c, o) else out


def check_shapes(xr, codes, norms, levels, bits: int):
  e, c, n = xr.shape
  per_byte = 2 if bits == 4 else 1
  if bits not in (4, 8):
    raise ValueError(f"expert_matmul: bits={bits} is unsupported; expected 4 or 8.")
  if codes.ndim != 3 or codes.shape[0] != e or codes.shape[2] * per_byte != n:
    raise ValueError(f"expert_matmul: codes {tuple(codes.shape)} do not match xr {tuple(xr.shape)} "
                     f"at {bits} bits; expected uint8 [{e}, d_out, {n // per_byte}].")
  if codes.dtype != jnp.uint8:
    raise ValueError(f"expert_matmul: codes must be uint8, got {codes.dtype}.")
  if norms.shape != codes.shape[:2]:
    raise ValueError(f"expert_matmul: norms {tuple(norms.shape)} must be [E, d_out] = "
                     f"{tuple(codes.shape[:2])}.")
  if levels.shape != (2 ** bits,):
    raise ValueError(f"expert_matmul: levels {tuple(levels.shape)} must hold 2^{bits} values.")


def tqp_matmul(xr, codes, norms, levels, bits: int, *, interpret: bool | None = None,
               gpu_lowering: bool = False, **blocks):
  """[E, C, n] x quantized [E, O, n] -> [E, C, O] in xr's dtype; no gradient flows through it.

  blocks: block_m, block_n, block_k, num_warps, num_stages, x_layout ("split": even/odd columns
  permuted in XLA so the 4-bit kernel loads contiguously; "strided": stride-2 loads in the kernel;
  "presplit": xr is already in that layout, e.g. from `rotate(..., split=True)`),
  lookup ("gather" | "select", see `_kernel`), w_first (bool) (defaults: `default_blocks(bits)`).
  interpret=None runs natively on GPU and in the Pallas interpreter elsewhere; gpu_lowering=True
  forces the native Triton call on any host (for lowering checks)."""
  check_shapes(xr, codes, norms, levels, bits)
  opts = {**default_blocks(bits), **blocks}
  interp = False if gpu_lowering else common.interpret_default(interpret)
  xr, norms, levels = (jax.lax.stop_gradient(a) for a in (xr, norms, jnp.asarray(levels)))
  return _call(xr, codes, norms, levels, bits=bits, interpret=interp,
               force_params=gpu_lowering, **opts)


def tqp_matmul_adapter(xr, codes, norms, levels, bits: int, xb, a, *,
                       interpret: bool | None = None, gpu_lowering: bool = False, **blocks):
  """stop_gradient(tqp_matmul(xr, ...)) + xb a^T, the adapter product added in the kernel's
  epilogue (the base output never round-trips through HBM before the add).

  xb [E, C, R] (the adapter's input projection), a [E, O, R]. Differentiable in xb and a only
  (custom VJP: dxb = dy a, da = dy^T xb, in XLA); xr, codes, norms, levels get no gradient."""
  check_shapes(xr, codes, norms, levels, bits)
  e, c, _ = xr.shape
  if xb.shape[:2] != (e, c) or a.shape[:2] != codes.shape[:2] or xb.shape[2] != a.shape[2]:
    raise ValueError(f"expert_matmul: adapter xb {tuple(xb.shape)} / a {tuple(a.shape)} must be "
                     f"[{e}, {c}, R] / [{e}, {codes.shape[1]}, R].")
  opts = {**default_blocks(bits), **blocks}
  interp = False if gpu_lowering else common.interpret_default(interpret)
  fixed = tuple(jax.lax.stop_gradient(v) for v in (xr, norms, jnp.asarray(levels)))
  return _fused_adapter(fixed[0], codes, fixed[1], fixed[2], xb, a, bits,
                        tuple(sorted(opts.items())), interp, gpu_lowering)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9))
def _fused_adapter(xr, codes, norms, levels, xb, a, bits, opts, interp, force):
  return _call(xr, codes, norms, levels, bits=bits, interpret=interp, force_params=force,
               xb=xb.astype(xr.dtype), a=a.astype(xr.dtype), **dict(opts))


def _fused_adapter_fwd(xr, codes, norms, levels, xb, a, bits, opts, interp, force):
  return _fused_adapter(xr, codes, norms, levels, xb, a, bits, opts, interp, force), (xb, a)


def _fused_adapter_bwd(bits, opts, interp, force, res, dy):
  xb, a = res
  dxb = jnp.einsum("eco,eor->ecr", dy, a.astype(dy.dtype), preferred_element_type=F32)
  da = jnp.einsum("eco,ecr->eor", dy, xb.astype(dy.dtype), preferred_element_type=F32)
  return None, None, None, None, dxb.astype(xb.dtype), da.astype(a.dtype)


_fused_adapter.defvjp(_fused_adapter_fwd, _fused_adapter_bwd)


# ----------------------------------------------------------------------------- rotation
def rotation_factors(n: int) -> tuple[int, int] | None:
  """(A, B) with n = A B, A >= B, both powers of two >= 16 and <= 128, or None when n has no
  such split (n < 256 or n > 16384): the Pallas rotation needs two tensor-core-sized factors."""
  if n < 256 or n > 128 * 128 or n & (n - 1):
    return None
  k = n.bit_length() - 1
  b = 1 << (k // 2)
  return n // b, b


def _hadamard(m: int) -> jax.Array:
  h = jnp.ones((1, 1), F32)
  while h.shape[0] < m:
    h = jnp.block([[h, h], [h, -h]])
  return h


def _rotate_kernel(x_ref, s_ref, ha_ref, hb_ref, o_ref, *, rows, scale, dot_dtype, split):
  """x_ref [rows, A, B]; s_ref [A, B] signs; ha [A, A], hb [B, B] Hadamard matrices.
  Per row X [A, B] (the row of length n = A B, row-major): Y = H_A (X * S) H_B * scale, which is
  H_n D x / sqrt(n) for H_n = H_A (x) H_B (Sylvester order), as tqp.rotate.
  split: o_ref [rows, 2, A, B/2] gets Y's even columns then its odd ones (the 4-bit matmul's
  [even | odd] layout, `split_even_odd`), from the even / odd columns of H_B; else o_ref [rows,
  A, B]."""
  s = s_ref[...].astype(F32)
  ha = ha_ref[...].astype(dot_dtype)
  hb = hb_ref[...].astype(dot_dtype)
  nn_ = (((1,), (0,)), ((), ()))
  if split:
    b = hb.shape[1]
    hb_even = hb_ref[:, pl.ds(0, b // 2, stride=2)].astype(dot_dtype)
    hb_odd = hb_ref[:, pl.ds(1, b // 2, stride=2)].astype(dot_dtype)

  def rot(xs, h):
    z = jax.lax.dot_general(xs, h, nn_, preferred_element_type=F32)
    y = jax.lax.dot_general(ha, z.astype(dot_dtype), nn_, preferred_element_type=F32)
    return y * scale

  def body(r, carry):
    xs = (x_ref[r].astype(F32) * s).astype(dot_dtype)
    if split:
      o_ref[r, 0] = rot(xs, hb_even).astype(o_ref.dtype)
      o_ref[r, 1] = rot(xs, hb_odd).astype(o_ref.dtype)
    else:
      o_ref[r] = rot(xs, hb).astype(o_ref.dtype)
    return carry

  jax.lax.fori_loop(0, rows, body, 0)


def rotate(x, signs, *, split: bool = False, block_rows: int = 16, num_warps: int = 4,
           num_stages: int = 2, interpret: bool | None = None, gpu_lowering: bool = False):
  """tqp.rotate (R x = H D x / sqrt(n) over the last axis) as one Pallas pass: each row is read
  once and written once (XLA's fwht makes one pass per Hadamard factor plus the sign and scale
  passes). n must have `rotation_factors` (and B >= 32 with split=True). split=True returns the
  result in the 4-bit matmul's [even | odd] column layout (`split_even_odd` of the rotation), for
  tqp_matmul(..., x_layout="presplit"). No gradient flows through it (the TQP base, its only
  user, is stop-gradient)."""
  lead, n = x.shape[:-1], x.shape[-1]
  fac = rotation_factors(n)
  if fac is None or (split and fac[1] < 32):
    raise ValueError(f"expert_matmul.rotate: n={n} must be a power of two in [256, 16384] "
                     f"({'>= 1024 ' if split else ''}for two tensor-core-sized factors).")
  fa, fb = fac
  rows = 1
  for v in lead:
    rows *= int(v)
  br = max(1, min(int(block_rows), rows))
  r_pad = -(-rows // br) * br
  x3 = _pad_to(jax.lax.stop_gradient(x).reshape(rows, fa, fb), 0, r_pad)
  s2 = jnp.asarray(signs).astype(F32).reshape(fa, fb)
  dot_dtype = F32 if x.dtype == F32 else jnp.bfloat16
  interp = False if gpu_lowering else common.interpret_default(interpret)
  params = (common.compiler_params(num_warps, num_stages, force=True) if gpu_lowering else
            common.compiler_params(num_warps, num_stages))
  kern = functools.partial(_rotate_kernel, rows=br, scale=float(n) ** -0.5, dot_dtype=dot_dtype,
                           split=split)
  if split:
    out_spec = pl.BlockSpec((br, 2, fa, fb // 2), lambda i: (i, 0, 0, 0))
    out_shape = jax.ShapeDtypeStruct((r_pad, 2, fa, fb // 2), x.dtype)
  else:
    out_spec = pl.BlockSpec((br, fa, fb), lambda i: (i, 0, 0))
    out_shape = jax.ShapeDtypeStruct((r_pad, fa, fb), x.dtype)
  out = pl.pallas_call(
      kern, grid=(r_pad // br,),
      in_specs=[pl.BlockSpec((br, fa, fb), lambda i: (i, 0, 0)),
                pl.BlockSpec((fa, fb), lambda i: (0, 0)),
                pl.BlockSpec((fa, fa), lambda i: (0, 0)),
                pl.BlockSpec((fb, fb), lambda i: (0, 0))],
      out_specs=out_spec, out_shape=out_shape,
      interpret=interp, name="tqp_rotate", compiler_params=params,
  )(x3, s2, _hadamard(fa), _hadamard(fb))
  return out[:rows].reshape(x.shape)
