"""Chunked gated delta rule with the sequential part as Pallas kernels (forward and backward).

Same contract as lightning_jax.layers.deltanet.chunk_gated_delta_rule (the reference):
  o [B, T, H, Dv] in v's dtype, S_T [B, H, Dv, Dk] float32.

Split of the work (the math is the reference's, see layers/deltanet.py's docstring):
  * prep, per chunk: the local cumulative log decay g, W = (I+A)^-1 diag(beta gamma) K and
    Uv = (I+A)^-1 diag(beta) V, the intra-chunk attention P = M o Q K^T, Qg = diag(gamma) Q,
    Kd = diag(e^{g_C - g}) K and the chunk decay ge = e^{g_C}. prep="xla": plain JAX over all
    chunks at once, float32, differentiated by autodiff. prep="pallas": one Pallas program per
    (batch, head, chunk) reading bf16 q/k/v straight from [B, T, H, D] and writing W, Uv, P, Qg,
    Kd in dot_dtype; (I+A)^-1 is built in registers in 16 x 16 sub-blocks (forward substitution
    on the diagonal blocks, T_ij = -T_ii sum_{j<=m<i} A_im T_mj below them, float32 IEEE dots).
    When differentiated the forward also saves T = (I+A)^-1 (float32 [C, C] per chunk). Its
    backward (prep_bwd="pallas") is a second per-chunk kernel on full [C, C] tiles and [C, bk]
    column slabs: dA = -T^T dT T^T, the M / diagonal scalings' terms and dlog_alpha = reverse
    cumsum(dg) (see _prep_bwd_kernel); prep_bwd="xla" differentiates the XLA prep instead;
  * the recurrence over chunks, one Pallas program per (batch x head, block of Dv rows of the
    state), the state block [BV, Dk] held in registers across a loop over the chunks:
        U_n = Uv_n - W_n S_n^T ;  O_n = Qg_n S_n^T + P_n U_n ;  S_{n+1} = ge_n S_n + U_n^T Kd_n
    (rows of the state over Dv are independent, which is what makes the Dv split exact). The
    forward kernel writes O in v's dtype into [B, T, H, Dv] and the state at each chunk start
    (state_dtype, float32 by default) for the backward;
  * the backward of the recurrence, in reverse over chunks with dS [BV, Dk]:
        dS_{n+1} -> dU += Kd dS^T, dKd = U dS, dge = <S_n, dS>, dS_n = ge dS
        dO       -> dQg = dO S_n, dS_n += dO^T Qg, dP = dO U^T, dU += P^T dO
        U        -> dUv = dU, dW = -dU S_n, dS_n -= dU^T W
    bwd="fused": one reverse kernel computes all of it (dW, dQg, dKd, dP, dge contract over Dv:
    float32 partials per Dv block, summed outside). bwd="split": a reverse kernel carries only dS
    and writes dS_{n+1} per chunk; the rest are batched XLA einsums. bwd="split_pallas": the same
    dS kernel, then one parallel Pallas kernel per (batch x head, chunk) for every chunk-local
    gradient (U and dU on full [C, Dv] tiles, then dKd, dQg, dW per Dk column block, written in
    the operands' dtype). bwd="merged" (prep="pallas" only): the same dS kernel, then ONE
    per-(batch, head, chunk) kernel that recomputes W, P, Kd from T, computes the chunk-local
    gradients and goes straight on through the prep's backward (_bwd_merged_kernel): only
    q, k, v, dO, T, the saved states and dS are read, only dq, dk, dv, dlog_alpha, dbeta
    written.
Everything is tied together by jax.custom_vjp (prep and recurrence separately; with
bwd="merged" one custom_vjp around both).

Predicted cost, B4 T4096, 32 heads x 128, chunk 64, bf16 (8192 chunks; counted before any GPU
run; 2.55 TB/s measured copy bandwidth, docs/PERFORMANCE.md). Bytes dominate, FLOPs are small.
Registers / spills per thread for sm_90 from `python -m benchmarks.kernels_bench --only
resources` (ptxas via the triton package, no GPU), at the benchmark's default settings:
  prep fwd (pallas)   reads q, k, v 384 MiB, writes W, Uv, Qg, Kd 512 MiB + P 64 MiB + ge 2 MiB
                      (+ T 128 MiB f32 when differentiated) = 1.0-1.15 GB -> 0.4-0.45 ms; ~3
                      MFLOP/chunk in small dots; 15-step forward substitution (latency); 8 warps,
                      255 regs + 48 B spill -> predicted 0.5-0.7 ms (XLA prep: 4.28 ms).
  recurrence fwd      measured 0.65 ms with float32 states (512 MiB written); bf16 states -0.1 ms
                      (255 regs + 24 B spill).
  dS kernel           512 programs (BV 32, 4 warps, 182 regs, no spill) x 64 steps of 4 small
                      dots + a 16 KiB store: latency, predicted 0.2-0.4 ms.
  grads kernel        reads S, dS (2 x 512 MiB f32) + W, Kd, Uv, P, dO (~330 MiB), writes dUv,
                      dW, dP, dQg, dKd bf16 (~580 MiB) = 2.0 GB -> 0.8 ms (0.6 ms with bf16
                      states); 8 warps, 243 regs, no spill -> predicted 0.8-1.1 ms.
  prep bwd (pallas)   reads q, k, v, T + dW, dUv, dQg, dKd, dP (1.1 GiB), writes dq, dk, dv
                      384 MiB = 1.6 GB -> 0.6 ms; 8 warps, 254 regs, no spill -> predicted
                      0.6-0.9 ms (XLA prep fwd+bwd: 12.1 ms).
  merged bwd kernel   reads q, k, v, dO, T 640 MiB + S, dS 1 GiB f32 (512 MiB bf16), writes dq,
                      dk, dv 384 MiB = 2.1 (1.6) GB -> 0.8 (0.6) ms, but 255 regs + ~1 KiB spill
                      per thread at 8 warps -> predicted 0.9-1.6 ms (vs 1.4-2.0 for grads + prep
                      bwd): timing decides.
  (the old fused recurrence backward, BV 128 / 8 warps: 255 regs + 1.7 KiB spill, which is why it
  measured ~5 ms.)
  total               forward ~1.2 ms (now 4.93); forward+backward with prep="pallas",
                      bwd="split_pallas": 1.2 + 0.3 + 1.0 + 0.75 + glue ~ 3.0-3.6 ms (now 17.79;
                      FLA 0.6.0: 4.60).

Backends: on GPU the kernels lower through Pallas' Triton backend; elsewhere (CPU) they run with
`interpret=True` (slow; for tests) — `impl_note()` says which. Matmul operands inside the kernels
are cast to `dot_dtype` (float32 for float32 inputs, else bfloat16) with float32 accumulation; the
state and every carried quantity stay float32 (the saved per-chunk states: state_dtype). In the
Pallas prep the 16 x 16 inverse dots are float32 IEEE; the other float32 dots (T Kb, T Vb,
-T^T dT T^T) use default precision, i.e. TF32 on GPU (below the bf16 rounding of their results).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from lightning_jax.kernels.common import compiler_params, falls_back, on_gpu

F32 = jnp.float32
_DN_T = (((1,), (1,)), ((), ()))     # a @ b.T
_DN_TA = (((0,), (0,)), ((), ()))    # a.T @ b
_DN = (((1,), (0,)), ((), ()))       # a @ b


def impl_note() -> str:
  return ("Pallas Triton kernels on GPU" if on_gpu() else
          f"Pallas interpreter on {jax.default_backend()} (no GPU: correct but slow)")


def _dot(a, b, dn, dt, precision=None):
  return jax.lax.dot_general(a.astype(dt), b.astype(dt), dn, precision=precision,
                             preferred_element_type=F32)


def _compiler_params(num_warps, num_stages, force=False):
  return compiler_params(num_warps, num_stages, force=force)


# ----------------------------------------------------------------------------- kernels
def _fwd_kernel(w_ref, uv_ref, p_ref, qg_ref, kd_ref, ge_ref, s0_ref,
                o_ref, hs_ref, sn_ref, *, n_chunks, dot_dtype):
  c = uv_ref.shape[1]

  def body(i, s):
    hs_ref[i] = s.astype(hs_ref.dtype)
    u = uv_ref[i].astype(F32) - _dot(w_ref[i], s, _DN_T, dot_dtype)            # [C, BV]
    o = _dot(qg_ref[i], s, _DN_T, dot_dtype) + _dot(p_ref[i], u, _DN, dot_dtype)
    o_ref[pl.ds(i * c, c), :] = o.astype(o_ref.dtype)                          # [B, T, H, Dv]
    ge = jnp.max(ge_ref[i].astype(F32))                                         # all equal
    return ge * s + _dot(u, kd_ref[i], _DN_TA, dot_dtype)                       # [BV, Dk]
  s = jax.lax.fori_loop(0, n_chunks, body, s0_ref[...].astype(F32))
  sn_ref[...] = s


def _bwd_kernel(w_ref, uv_ref, p_ref, qg_ref, kd_ref, ge_ref, hs_ref, do_ref, dsn_ref,
                duv_ref, dw_ref, dp_ref, dqg_ref, dkd_ref, dge_ref, ds0_ref, *, n_chunks,
                dot_dtype):
  def body(j, ds):
    i = n_chunks - 1 - j
    s = hs_ref[i].astype(F32)                                                   # [BV, Dk]
    w = w_ref[i]
    kd = kd_ref[i]
    qg = qg_ref[i]
    p = p_ref[i]
    do = do_ref[i].astype(F32)                                                  # [C, BV]
    u = uv_ref[i].astype(F32) - _dot(w, s, _DN_T, dot_dtype)
    ge_vec = ge_ref[i].astype(F32)
    ge = jnp.max(ge_vec)
    # S_{n+1} = ge S_n + U^T Kd
    du = _dot(kd, ds, _DN_T, dot_dtype)                                         # [C, BV]
    dkd_ref[i] = _dot(u, ds, _DN, dot_dtype)                                    # [C, Dk]
    dge = jnp.sum(s * ds)
    dge_ref[i] = jnp.zeros_like(ge_vec) + dge
    ds_new = ge * ds
    # O = Qg S^T + P U
    dqg_ref[i] = _dot(do, s, _DN, dot_dtype)
    ds_new = ds_new + _dot(do, qg, _DN_TA, dot_dtype)
    dp_ref[i] = _dot(do, u, _DN_T, dot_dtype)                                   # [C, C]
    du = du + _dot(p, do, _DN_TA, dot_dtype)
    # U = Uv - W S^T
    duv_ref[i] = du
    dw_ref[i] = -_dot(du, s, _DN, dot_dtype)
    return ds_new - _dot(du, w, _DN_TA, dot_dtype)
  ds = jax.lax.fori_loop(0, n_chunks, body, dsn_ref[...].astype(F32))
  ds0_ref[...] = ds


def _bwd_states_kernel(w_ref, p_ref, qg_ref, kd_ref, ge_ref, do_ref, dsn_ref, dss_ref, ds0_ref,
                       *, n_chunks, dot_dtype):
  """Only the sequential part of the backward: dS entering each chunk from the right.
  do_ref: this (batch, head)'s [T, BV] slab of dO in the [B, T, H, Dv] layout."""
  c = p_ref.shape[1]

  def body(j, ds):
    i = n_chunks - 1 - j
    dss_ref[i] = ds.astype(dss_ref.dtype)                                        # dS_{i+1}
    do = do_ref[pl.ds(i * c, c), :].astype(F32)
    du = _dot(kd_ref[i], ds, _DN_T, dot_dtype) + _dot(p_ref[i], do, _DN_TA, dot_dtype)
    ge = jnp.max(ge_ref[i].astype(F32))
    return (ge * ds + _dot(do, qg_ref[i], _DN_TA, dot_dtype)
            - _dot(du, w_ref[i], _DN_TA, dot_dtype))
  ds = jax.lax.fori_loop(0, n_chunks, body, dsn_ref[...].astype(F32))
  ds0_ref[...] = ds


def _specs(n, c, dk, bv, nv_axis: bool):
  """BlockSpecs: per-(bh) full chunk slabs; Dv-blocked slabs; the partial outputs' NV axis."""
  sq = pl.squeezed if hasattr(pl, "squeezed") else None
  full_k = pl.BlockSpec((sq, n, c, dk), lambda i, j: (i, 0, 0, 0))
  full_c = pl.BlockSpec((sq, n, c, c), lambda i, j: (i, 0, 0, 0))
  vec = pl.BlockSpec((sq, n, c), lambda i, j: (i, 0, 0))
  blk_v = pl.BlockSpec((sq, n, c, bv), lambda i, j: (i, 0, 0, j))
  state = pl.BlockSpec((sq, bv, dk), lambda i, j: (i, j, 0))
  states = pl.BlockSpec((sq, n, bv, dk), lambda i, j: (i, 0, j, 0))
  part_k = pl.BlockSpec((sq, sq, n, c, dk), lambda i, j: (i, j, 0, 0, 0))
  part_c = pl.BlockSpec((sq, sq, n, c, c), lambda i, j: (i, j, 0, 0, 0))
  part_vec = pl.BlockSpec((sq, sq, n, c), lambda i, j: (i, j, 0, 0))
  return dict(full_k=full_k, full_c=full_c, vec=vec, blk_v=blk_v, state=state, states=states,
              part_k=part_k, part_c=part_c, part_vec=part_vec)


def _seq_spec(n, c, bv, heads):
  """[T, BV] slab of (batch x head) i, Dv block j, of an array laid out [B, T, H, Dv]."""
  sq = pl.squeezed if hasattr(pl, "squeezed") else None
  return pl.BlockSpec((sq, n * c, sq, bv), lambda i, j: (i // heads, 0, i % heads, j))


def _to_chunks(x, n, c):
  """[B, T, H, D] -> [B*H, N, C, D] float32 (the fused / XLA backward's layout of dO)."""
  b, _, h, d = x.shape
  return jnp.moveaxis(x.astype(F32), 2, 1).reshape(b * h, n, c, d)


def _block_v(dv, want, name="block_v", dim="Dv"):
  bv = min(int(want), dv)
  if dv % bv or bv & (bv - 1):
    raise ValueError(f"delta rule kernel: {name}={want} must be a power of two dividing "
                     f"{dim}={dv}.")
  return bv


def _fwd_call(w, uv, p, qg, kd, gev, s0, opts):
  bh, n, c, dk = w.shape
  dv = uv.shape[-1]
  bv = _block_v(dv, opts["block_v"])
  sp = _specs(n, c, dk, bv, False)
  kern = functools.partial(_fwd_kernel, n_chunks=n, dot_dtype=opts["dot_dtype"])
  return pl.pallas_call(
      kern, grid=(bh, dv // bv),
      in_specs=[sp["full_k"], sp["blk_v"], sp["full_c"], sp["full_k"], sp["full_k"], sp["vec"],
                sp["state"]],
      out_specs=[_seq_spec(n, c, bv, opts["heads"]), sp["states"], sp["state"]],
      out_shape=[jax.ShapeDtypeStruct((bh // opts["heads"], n * c, opts["heads"], dv),
                                      opts["out_dtype"]),
                 jax.ShapeDtypeStruct((bh, n, dv, dk), opts["state_dtype"]),
                 jax.ShapeDtypeStruct((bh, dv, dk), F32)],
      interpret=opts["interpret"], name="gdr_chunk_fwd",
      compiler_params=_compiler_params(opts["num_warps"], opts["num_stages"],
                                       opts["gpu_lowering"]),
  )(w, uv, p, qg, kd, gev, s0)


def _bwd_call(w, uv, p, qg, kd, gev, hs, do, dsn, opts):
  bh, n, c, dk = w.shape
  dv = uv.shape[-1]
  bv = _block_v(dv, opts["block_v_bwd"])
  nv = dv // bv
  sp = _specs(n, c, dk, bv, True)
  kern = functools.partial(_bwd_kernel, n_chunks=n, dot_dtype=opts["dot_dtype"])
  outs = pl.pallas_call(
      kern, grid=(bh, nv),
      in_specs=[sp["full_k"], sp["blk_v"], sp["full_c"], sp["full_k"], sp["full_k"], sp["vec"],
                sp["states"], sp["blk_v"], sp["state"]],
      out_specs=[sp["blk_v"], sp["part_k"], sp["part_c"], sp["part_k"], sp["part_k"],
                 sp["part_vec"], sp["state"]],
      out_shape=[jax.ShapeDtypeStruct((bh, n, c, dv), F32),
                 jax.ShapeDtypeStruct((bh, nv, n, c, dk), F32),
                 jax.ShapeDtypeStruct((bh, nv, n, c, c), F32),
                 jax.ShapeDtypeStruct((bh, nv, n, c, dk), F32),
                 jax.ShapeDtypeStruct((bh, nv, n, c, dk), F32),
                 jax.ShapeDtypeStruct((bh, nv, n, c), F32),
                 jax.ShapeDtypeStruct((bh, dv, dk), F32)],
      interpret=opts["interpret"], name="gdr_chunk_bwd",
      compiler_params=_compiler_params(opts["num_warps_bwd"], opts["num_stages"],
                                       opts["gpu_lowering"]),
  )(w, uv, p, qg, kd, gev, hs, do, dsn)
  duv, dw, dp, dqg, dkd, dge, ds0 = outs
  return duv, dw.sum(1), dp.sum(1), dqg.sum(1), dkd.sum(1), dge.sum(1), ds0


def _states_call(w, p, qg, kd, gev, do, dsn, opts):
  """The reverse dS kernel: dS_{n+1} for every chunk n (in state_dtype) and dS_0 (float32)."""
  bh, n, c, dk = w.shape
  dv = do.shape[-1]
  bv = _block_v(dv, opts["block_v_bwd"])
  sp = _specs(n, c, dk, bv, True)
  kern = functools.partial(_bwd_states_kernel, n_chunks=n, dot_dtype=opts["dot_dtype"])
  return pl.pallas_call(
      kern, grid=(bh, dv // bv),
      in_specs=[sp["full_k"], sp["full_c"], sp["full_k"], sp["full_k"], sp["vec"],
                _seq_spec(n, c, bv, opts["heads"]), sp["state"]],
      out_specs=[sp["states"], sp["state"]],
      out_shape=[jax.ShapeDtypeStruct((bh, n, dv, dk), opts["state_dtype"]),
                 jax.ShapeDtypeStruct((bh, dv, dk), F32)],
      interpret=opts["interpret"], name="gdr_chunk_bwd_states",
      compiler_params=_compiler_params(opts["num_warps_bwd"], opts["num_stages"],
                                       opts["gpu_lowering"]),
  )(w, p, qg, kd, gev, do, dsn)


def _bwd_call_split(w, uv, p, qg, kd, gev, hs, do, dsn, opts):
  """Backward as a sequential dS kernel + every other gradient as batched einsums over chunks."""
  bh, n, c, dk = w.shape
  dss, ds0 = _states_call(w, p, qg, kd, gev, do, dsn, dict(opts, state_dtype=F32))
  do = _to_chunks(do, n, c)
  f = lambda a: a.astype(F32)
  w, uv, p, qg, kd, hs = f(w), f(uv), f(p), f(qg), f(kd), f(hs)
  es = functools.partial(jnp.einsum, preferred_element_type=F32)
  u = uv - es("...ck,...vk->...cv", w, hs)
  du = es("...ck,...vk->...cv", kd, dss) + es("...ts,...tv->...sv", p, do)
  dkd = es("...cv,...vk->...ck", u, dss)
  dge = jnp.sum(hs * dss, axis=(-2, -1))
  dqg = es("...cv,...vk->...ck", do, hs)
  dp = es("...tv,...sv->...ts", do, u)
  dw = -es("...cv,...vk->...ck", du, hs)
  dgev = jnp.broadcast_to(dge[..., None], dge.shape + (c,))
  return du, dw, dp, dqg, dkd, dgev, ds0


def _bwd_grads_kernel(w_ref, uv_ref, p_ref, kd_ref, hs_ref, dss_ref, do_ref,
                      duv_ref, dw_ref, dp_ref, dqg_ref, dkd_ref, dge_ref, *, bk, dot_dtype):
  """Every chunk-local gradient of one chunk, given S_n (hs [Dv, Dk]) and dS_{n+1} (dss), with
  Dk in column blocks of bk (only [C, Dv] tiles and [., bk] slabs live, no accumulators):
    pass A: W S^T, Kd dS^T; then U = Uv - W S^T, dU = Kd dS^T + P^T dO (= dUv), dP = dO U^T;
    pass B: dKd = U dS, dQg = dO S, dW = -dU S per column block, and dge = <S, dS>."""
  c, dk = w_ref.shape
  dt = dot_dtype
  f = lambda x: x.astype(F32)
  zs = jnp.zeros((c, uv_ref.shape[1]), F32)

  def pass_a(j, carry):
    ws, kds = carry
    cols = pl.ds(j * bk, bk)
    return (ws + _dot(w_ref[:, cols], hs_ref[:, cols], _DN_T, dt),
            kds + _dot(kd_ref[:, cols], dss_ref[:, cols], _DN_T, dt))
  ws, kds = jax.lax.fori_loop(0, dk // bk, pass_a, (zs, zs))
  do = do_ref[...]
  u = f(uv_ref[...]) - ws
  du = kds + _dot(p_ref[...], do, _DN_TA, dt)
  duv_ref[...] = du.astype(duv_ref.dtype)
  dp_ref[...] = _dot(do, u, _DN_T, dt).astype(dp_ref.dtype)
  u, du = u.astype(dt), du.astype(dt)

  def pass_b(j, dge):
    cols = pl.ds(j * bk, bk)
    s, ds = hs_ref[:, cols], dss_ref[:, cols]                   # [Dv, bk]
    dkd_ref[:, cols] = _dot(u, ds, _DN, dt).astype(dkd_ref.dtype)
    dqg_ref[:, cols] = _dot(do, s, _DN, dt).astype(dqg_ref.dtype)
    dw_ref[:, cols] = (-_dot(du, s, _DN, dt)).astype(dw_ref.dtype)
    return dge + jnp.sum(f(s) * f(ds))
  dge = jax.lax.fori_loop(0, dk // bk, pass_b, jnp.zeros((), F32))
  # every entry of a chunk's gev row holds the same ge: its cotangent is spread evenly
  dge_ref[...] = jnp.zeros((c,), F32) + dge / c


def _bwd_call_split_pallas(w, uv, p, qg, kd, gev, hs, do, dsn, opts):
  """Backward as the sequential dS kernel (Dv blocks of block_v_bwd rows) + one parallel Pallas
  kernel over (batch x head, chunk) for every chunk-local gradient, written in the operands'
  dtype (no float32 partials)."""
  bh, n, c, dk = w.shape
  dv = uv.shape[-1]
  dss, ds0 = _states_call(w, p, qg, kd, gev, do, dsn, opts)
  heads = opts["heads"]
  sq = pl.squeezed if hasattr(pl, "squeezed") else None
  do_spec = pl.BlockSpec((sq, c, sq, dv), lambda i, j: (i // heads, j, i % heads, 0))
  ck = lambda d: pl.BlockSpec((sq, sq, c, d), lambda i, j: (i, j, 0, 0))
  st = pl.BlockSpec((sq, sq, dv, dk), lambda i, j: (i, j, 0, 0))
  cv = pl.BlockSpec((sq, sq, c), lambda i, j: (i, j, 0))
  kern = functools.partial(_bwd_grads_kernel, bk=_block_v(dk, opts["block_k_grads"], "block_k_grads", "Dk"),
                           dot_dtype=opts["dot_dtype"])
  like = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype)
  duv, dw, dp, dqg, dkd, dgev = pl.pallas_call(
      kern, grid=(bh, n),
      in_specs=[ck(dk), ck(dv), ck(c), ck(dk), st, st, do_spec],
      out_specs=[ck(dv), ck(dk), ck(c), ck(dk), ck(dk), cv],
      out_shape=[like(uv), like(w), like(p), like(qg), like(kd),
                 jax.ShapeDtypeStruct(gev.shape, F32)],
      interpret=opts["interpret"], name="gdr_chunk_bwd_grads",
      compiler_params=_compiler_params(opts["num_warps_grads"], opts["num_stages"],
                                       opts["gpu_lowering"]),
  )(w, uv, p, kd, hs, dss, do)
  return duv, dw, dp, dqg, dkd, dgev * c, ds0


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _recurrence(w, uv, p, qg, kd, gev, s0, opts_key):
  o, _, sn = _fwd_call(w, uv, p, qg, kd, gev, s0, dict(opts_key))
  return o, sn


def _recurrence_fwd(w, uv, p, qg, kd, gev, s0, opts_key):
  o, hs, sn = _fwd_call(w, uv, p, qg, kd, gev, s0, dict(opts_key))
  return (o, sn), (w, uv, p, qg, kd, gev, hs)


def _recurrence_bwd(opts_key, res, cts):
  w, uv, p, qg, kd, gev, hs = res
  do, dsn = cts
  opts = dict(opts_key)
  call = {"split": _bwd_call_split, "fused": _bwd_call,
          "split_pallas": _bwd_call_split_pallas}[opts["bwd"]]
  if opts["bwd"] == "fused":
    do = _to_chunks(do, w.shape[1], w.shape[2])
  duv, dw, dp, dqg, dkd, dge, ds0 = call(w, uv, p, qg, kd, gev, hs, do, dsn.astype(F32), opts)
  return (dw.astype(w.dtype), duv.astype(uv.dtype), dp.astype(p.dtype), dqg.astype(qg.dtype),
          dkd.astype(kd.dtype), (dge / gev.shape[-1]).astype(gev.dtype), ds0)
  # (every entry of a chunk's gev row holds the same ge, broadcast over C outside: its
  # cotangent is spread evenly so that the broadcast's transpose sums back to dge)


_recurrence.defvjp(_recurrence_fwd, _recurrence_bwd)


# ----------------------------------------------------------------------------- prep + wrapper
@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def unit_lower_inverse(a, block: int = 16, precision=jax.lax.Precision.HIGHEST):
  return _unit_lower_inverse(a, block, precision)


def _uli_fwd(a, block, precision):
  inv = _unit_lower_inverse(a, block, precision)
  return inv, inv


def _uli_bwd(block, precision, inv, d_inv):
  # d(L^-1) = -L^-1 dL L^-1  =>  dA = -(L^-1)^T dInv (L^-1)^T, on the strictly lower entries only
  # (the others do not enter the result): two matmuls instead of the ~20 of autodiff through
  # the power series and merges.
  c = inv.shape[-1]
  it = jnp.swapaxes(inv, -1, -2)
  da = -jnp.matmul(jnp.matmul(it, d_inv, precision=precision), it, precision=precision)
  pos = jnp.arange(c)
  return (jnp.where(pos[:, None] > pos[None, :], da, 0.0).astype(inv.dtype),)


unit_lower_inverse.defvjp(_uli_fwd, _uli_bwd)


def _unit_lower_inverse(a, block: int = 16, precision=jax.lax.Precision.HIGHEST):
  """(I + a)^-1 for strictly lower-triangular a [..., C, C] (C a power of two), by matmuls only.

  Diagonal blocks of `block` rows: I + D with D nilpotent of order `block`, so
  (I + D)^-1 = (I - D)(I + D^2)(I + D^4)... exactly (log2(block) factors). Then blocks are merged
  pairwise: with X the inverse of the block-diagonal part at size s and O the off-diagonal
  s-blocks inside each 2s-block, (X^-1 + O)^-1 = X - X O X exactly (O X O = 0). Entries of D^m
  stay bounded by binomial(block-1, m) for |a| <= 1 (|beta| < 1, decay <= 1, |k| = 1), which is
  why the power series is confined to small blocks. Replaces a batched triangular solve (slow on
  GPUs for many small systems) with ~10 batched C x C matmuls.
  """
  c = a.shape[-1]
  b = min(int(block), c)
  pos = jnp.arange(c)
  eye = jnp.eye(c, dtype=a.dtype)
  mm = lambda x, y: jnp.matmul(x, y, precision=precision)
  same = (pos[:, None] // b) == (pos[None, :] // b)
  x = -jnp.where(same, a, 0.0)
  inv = eye + x
  p = x
  s = 2
  while s < b:
    p = mm(p, p)
    inv = inv + mm(inv, p)
    s *= 2
  s = b
  while s < c:
    off = ((pos[:, None] // s) != (pos[None, :] // s)) & \
          ((pos[:, None] // (2 * s)) == (pos[None, :] // (2 * s)))
    inv = inv - mm(inv, mm(jnp.where(off, a, 0.0), inv))
    s *= 2
  return inv


def _prep(q, k, v, log_alpha, beta, c, precision=jax.lax.Precision.HIGHEST):
  """Chunk quantities in float32: W, Uv, P, Qg, Kd [B, H, N, C, .], ge [B, H, N]."""
  bsz, t, h, dk = q.shape
  n = -(-t // c)
  pad = n * c - t

  def chunks(a):  # [B, T, H, ...] -> [B, H, N, C, ...]
    a = a.astype(F32)
    if pad:
      a = jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2))
    return jnp.moveaxis(a.reshape((bsz, n, c) + a.shape[2:]), 3, 1)

  qc, kc, vc, lac, bc = (chunks(a) for a in (q, k, v, log_alpha, beta))
  g = jnp.cumsum(lac, axis=-1)                                   # [B, H, N, C]
  pos = jnp.arange(c)
  incl = pos[:, None] >= pos[None, :]
  strict = pos[:, None] > pos[None, :]
  decay = jnp.exp(jnp.where(incl, g[..., :, None] - g[..., None, :], -jnp.inf))
  a_mat = jnp.where(strict, bc[..., :, None] * decay * jnp.einsum("...td,...sd->...ts", kc, kc),
                    0.0)
  gamma = jnp.exp(g)
  t_inv = unit_lower_inverse(a_mat, precision=precision)
  w = jnp.einsum("...ts,...sd->...td", t_inv, kc * (bc * gamma)[..., None])
  uv = jnp.einsum("...ts,...sd->...td", t_inv, vc * bc[..., None])
  p = decay * jnp.einsum("...td,...sd->...ts", qc, kc)
  qg = qc * gamma[..., None]
  kd = kc * jnp.exp(g[..., -1:] - g)[..., None]
  ge = jnp.exp(g[..., -1])
  return w, uv, p, qg, kd, ge


# ----------------------------------------------------------------------------- Pallas prep
# One program per (batch, head, chunk): reads the chunk's q, k, v (input dtype) and log decay /
# beta (float32) once, keeps every C x C quantity in registers as _SB x _SB sub-blocks (Triton
# cannot slice a register tile, so the triangular inverse is built block by block: forward
# substitution on each diagonal block, then T_ij = -T_ii sum_{j<=m<i} A_im T_mj below it), and
# writes W, Uv, P, Qg, Kd in dot_dtype and the chunk decay ge (float32) — the recurrence's inputs.
_SB = 16          # sub-block rows (Triton dots need every dim >= 16)
_HI = jax.lax.Precision.HIGHEST


def _iota(shape, dim):
  return jax.lax.broadcasted_iota(jnp.int32, shape, dim)


def _mm(a, b, dn=_DN, precision=None):
  """float32 dot, float32 accumulation (TF32 on GPU unless precision=HIGHEST)."""
  return jax.lax.dot_general(a.astype(F32), b.astype(F32), dn, precision=precision,
                             preferred_element_type=F32)


def _cum_blocks(la, nb, sb):
  """Sub-blocks of g = cumsum(la): g_i[r] = sum_{t <= i sb + r} la_t (masked sums, no scan)."""
  c = la.shape[0]
  t, r = _iota((sb, c), 1), _iota((sb, c), 0)
  return [jnp.sum(jnp.where(t <= r + i * sb, la[None, :], 0.0), axis=1) for i in range(nb)]


def _cum_full(la):
  c = la.shape[0]
  return jnp.sum(jnp.where(_iota((c, c), 1) <= _iota((c, c), 0), la[None, :], 0.0), axis=1)


def _bwd_chunk_setup(la_ref, b_ref, t_ref, c):
  """What both backward kernels of the prep start from, float32: the chunk's log decays and betas,
  the saved T = (I+A)^-1, row/col iotas, the cumulative decay g, its total g_C, gamma = e^g,
  e^{g_C - g}, beta gamma, and [C, C] / [C] zeros."""
  la, beta = la_ref[...].astype(F32), b_ref[...].astype(F32)
  t = t_ref[...].astype(F32)
  row, col = _iota((c, c), 0), _iota((c, c), 1)
  g = _cum_full(la)
  gc = jnp.sum(la)
  gam = jnp.exp(g)
  return (la, beta, t, row, col, g, gc, gam, jnp.exp(gc - g), beta * gam,
          jnp.zeros((c, c), F32), jnp.zeros((c,), F32))


def _inverse_grads(t, dtt, kk, beta, g, row, col, db):
  """Through T = (I + A)^-1, A = diag(beta) (M o K K^T), M_ts = e^{g_t - g_s}: from dT to
  M, d(K K^T), db + rowsum(dA o M o KK) and the dg of A (rowsum - colsum of dA o A)."""
  m = _decay_block(g, g, True)
  dam = jnp.where(col < row, -_mm(t, _mm(dtt, t, _DN_T), _DN_TA), 0.0) * m  # -T^T dT T^T o M
  e = dam * kk                                                 # dA o M o KK
  y = e * beta[:, None]                                        # dA o A
  return (m, dam * beta[:, None], db + jnp.sum(e, axis=1),
          jnp.sum(y, axis=1) - jnp.sum(y, axis=0))


def _decay_block(gi, gj, diag):
  """e^{g_t - g_s} for t in block i, s in block j (masked to s <= t on a diagonal block,
  before the exp: above the diagonal the exponent is positive and could overflow)."""
  diff = gi[:, None] - gj[None, :]
  if diag:
    sb = gi.shape[0]
    diff = jnp.where(_iota((sb, sb), 1) <= _iota((sb, sb), 0), diff, -jnp.inf)
  return jnp.exp(diff)


def _inv_unit_lower(blocks):
  """(I + a)^-1 for each strictly lower [sb, sb] float32 tile in `blocks`: forward substitution
  row by row (row r of the inverse = e_r - a_r X, rows read and written through masks), all
  tiles in one loop so that their independent steps overlap."""
  sb = blocks[0].shape[0]
  rows = _iota((sb, sb), 0)
  eye = jnp.where(rows == _iota((sb, sb), 1), 1.0, 0.0).astype(F32)

  def body(r, xs):
    out = []
    for a, x in zip(blocks, xs):
      a_r = jnp.sum(jnp.where(rows == r, a, 0.0), axis=0)             # row r of a, over j
      new = -jnp.sum(a_r[:, None] * x, axis=0)                         # - a_r @ X
      out.append(jnp.where(rows == r, x + new[None, :], x))
    return tuple(out)
  return list(jax.lax.fori_loop(1, sb, body, tuple(eye for _ in blocks)))


def _chunk_inverse(k, beta, g, dot_dtype):
  """Sub-blocks (i >= j) of KK^T, the decay mask M, and T = (I + A)^-1,
  A = strictly-lower(diag(beta) (M o K K^T)). k: list of [sb, Dk] tiles; beta, g: [sb] lists."""
  nb = len(k)
  kk, m, a, t = {}, {}, {}, {}
  for i in range(nb):
    for j in range(i + 1):
      kk[i, j] = _dot(k[i], k[j], _DN_T, dot_dtype)
      m[i, j] = _decay_block(g[i], g[j], i == j)
      a_ij = beta[i][:, None] * m[i, j] * kk[i, j]
      if i == j:
        sb = a_ij.shape[0]
        a_ij = jnp.where(_iota((sb, sb), 1) < _iota((sb, sb), 0), a_ij, 0.0)
      a[i, j] = a_ij
  for i, ti in enumerate(_inv_unit_lower([a[i, i] for i in range(nb)])):
    t[i, i] = ti
  for i in range(nb):
    for j in range(i - 1, -1, -1):
      acc = _mm(a[i, j], t[j, j], precision=_HI)
      for mm_ in range(j + 1, i):
        acc = acc + _mm(a[i, mm_], t[mm_, j], precision=_HI)
      t[i, j] = -_mm(t[i, i], acc, precision=_HI)
  return kk, m, a, t


def _prep_fwd_kernel(q_ref, k_ref, v_ref, la_ref, b_ref,
                     w_ref, uv_ref, p_ref, qg_ref, kd_ref, ge_ref, *t_out, sb, dot_dtype):
  c = q_ref.shape[0]
  nb = c // sb
  rows = [pl.ds(i * sb, sb) for i in range(nb)]
  la = la_ref[...].astype(F32)
  g = _cum_blocks(la, nb, sb)
  beta = [b_ref[rows[i]].astype(F32) for i in range(nb)]
  k = [k_ref[rows[i], :] for i in range(nb)]
  _, _, _, t = _chunk_inverse(k, beta, g, dot_dtype)
  for i in range(nb):
    w = uv = None
    for j in range(i + 1):
      kb = k[j].astype(F32) * (beta[j] * jnp.exp(g[j]))[:, None]
      vb = v_ref[rows[j], :].astype(F32) * beta[j][:, None]
      w = _mm(t[i, j], kb) if w is None else w + _mm(t[i, j], kb)
      uv = _mm(t[i, j], vb) if uv is None else uv + _mm(t[i, j], vb)
    w_ref[rows[i], :] = w.astype(w_ref.dtype)
    uv_ref[rows[i], :] = uv.astype(uv_ref.dtype)
  if t_out:          # T = (I + A)^-1 for the backward, stored block by block (zeros above)
    for i in range(nb):
      for j in range(nb):
        t_out[0][rows[i], rows[j]] = t[i, j] if j <= i else jnp.zeros((sb, sb), F32)
  gf = _cum_full(la)
  gc = jnp.sum(la)
  q = q_ref[...]
  kf = k_ref[...]
  p_ref[...] = (_decay_block(gf, gf, True) * _dot(q, kf, _DN_T, dot_dtype)).astype(p_ref.dtype)
  qg_ref[...] = (q.astype(F32) * jnp.exp(gf)[:, None]).astype(qg_ref.dtype)
  kd_ref[...] = (kf.astype(F32) * jnp.exp(gc - gf)[:, None]).astype(kd_ref.dtype)
  ge_ref[...] = jnp.zeros((c,), F32) + jnp.exp(gc)


def _prep_specs(c, dk, dv):
  sq = pl.squeezed if hasattr(pl, "squeezed") else None
  seq = lambda d: pl.BlockSpec((sq, c, sq, d), lambda b, h, n: (b, n, h, 0))
  vec = pl.BlockSpec((sq, c, sq), lambda b, h, n: (b, n, h))
  chunk = lambda d: pl.BlockSpec((sq, sq, sq, c, d), lambda b, h, n: (b, h, n, 0, 0))
  cvec = pl.BlockSpec((sq, sq, sq, c), lambda b, h, n: (b, h, n, 0))
  return seq, vec, chunk, cvec


def _prep_fwd_call(q, k, v, la, beta, opts, with_t=False):
  """W, Uv, P, Qg, Kd [B, H, N, C, .] in dot_dtype, gev [B, H, N, C] float32 (and with_t:
  T = (I + A)^-1 [B, H, N, C, C] float32, the backward's residual)."""
  bsz, t, h, dk = q.shape
  dv = v.shape[-1]
  c = opts["chunk"]
  n = t // c
  dt = opts["dot_dtype"]
  seq, vec, chunk, cvec = _prep_specs(c, dk, dv)
  kern = functools.partial(_prep_fwd_kernel, sb=min(_SB, c), dot_dtype=dt)
  shp = lambda d, dtype=dt: jax.ShapeDtypeStruct((bsz, h, n, c, d), dtype)
  return pl.pallas_call(
      kern, grid=(bsz, h, n),
      in_specs=[seq(dk), seq(dk), seq(dv), vec, vec],
      out_specs=[chunk(dk), chunk(dv), chunk(c), chunk(dk), chunk(dk), cvec] + (
          [chunk(c)] if with_t else []),
      out_shape=[shp(dk), shp(dv), shp(c), shp(dk), shp(dk),
                 jax.ShapeDtypeStruct((bsz, h, n, c), F32)] + ([shp(c, F32)] if with_t else []),
      interpret=opts["interpret"], name="gdr_prep_fwd",
      compiler_params=_compiler_params(opts["num_warps_prep"], opts["num_stages"],
                                       opts["gpu_lowering"]),
  )(q, k, v, la, beta)


def _prep_bwd_kernel(q_ref, k_ref, v_ref, la_ref, b_ref, t_ref, dw_ref, duv_ref, dp_ref,
                     dqg_ref, dkd_ref, dge_ref, dq_ref, dk_ref, dv_ref, dla_ref, db_ref, *,
                     bk, dot_dtype):
  """Cotangents of W, Uv, P, Qg, Kd, ge -> of q, k, v, log_alpha, beta for one chunk, with the
  forward's T = (I + A)^-1 (Kb = diag(beta gamma) K, Vb = diag(beta) V, W = T Kb, Uv = T Vb).
  Every [C, D] operand is taken in column blocks of bk (loops over D), so that only [C, C]
  tiles and [C, bk] slabs are live (registers; no spills at 8 warps per ptxas):
    pass 1: dT = dW Kb^T + dUv Vb^T, K K^T, Q K^T (contractions over D); dv = beta T^T dUv;
    [C, C]: dA = -T^T dT T^T (strict), d(K K^T), dP o M, and their dbeta / dg terms
      (A = diag(beta) (M o K K^T), P = M o Q K^T, M_ts = e^{g_t - g_s}: dg_t += rowsum(dA o A
      + dP o P), dg_s -= colsum(...));
    pass 2: dq, dk per column block (W = T Kb: dKb = T^T dW; Qg, Kd: diagonal scalings), with
      the row sums that feed dbeta and dg; dlog_alpha = reverse cumsum of dg (+ dg_C)."""
  c, dk_total = q_ref.shape
  dv_total = v_ref.shape[1]
  dt = dot_dtype
  f = lambda x: x.astype(F32)
  la, beta, t, row, col, g, gc, gam, kdec, bg, zc, zv = _bwd_chunk_setup(la_ref, b_ref, t_ref, c)

  def pass1_k(j, carry):
    dtt, kk, qk = carry
    cols = pl.ds(j * bk, bk)
    k_b = k_ref[:, cols]
    kb = f(k_b) * bg[:, None]
    return (dtt + _dot(dw_ref[:, cols], kb, _DN_T, dt), kk + _dot(k_b, k_b, _DN_T, dt),
            qk + _dot(q_ref[:, cols], k_b, _DN_T, dt))
  dtt, kk, qk = jax.lax.fori_loop(0, dk_total // bk, pass1_k, (zc, zc, zc))

  def pass1_v(j, carry):
    dtt, db = carry
    cols = pl.ds(j * bk, bk)
    v_b = f(v_ref[:, cols])
    duv = duv_ref[:, cols]
    dvb = _dot(t, duv, _DN_TA, dt)
    dv_ref[:, cols] = (dvb * beta[:, None]).astype(dv_ref.dtype)
    return dtt + _dot(duv, v_b * beta[:, None], _DN_T, dt), db + jnp.sum(dvb * v_b, axis=1)
  dtt, db = jax.lax.fori_loop(0, dv_total // bk, pass1_v, (dtt, zv))

  m, dkk, db, dg = _inverse_grads(t, dtt, kk, beta, g, row, col, db)
  dpm = f(dp_ref[...]) * m
  z = dpm * qk                                                 # dP o P
  dg = dg + jnp.sum(z, axis=1) - jnp.sum(z, axis=0)

  def pass2(j, carry):
    h, gq, s = carry
    cols = pl.ds(j * bk, bk)
    k_b, q_b = k_ref[:, cols], q_ref[:, cols]
    kf, qf = f(k_b), f(q_b)
    dkb = _dot(t, dw_ref[:, cols], _DN_TA, dt)
    dqg = f(dqg_ref[:, cols])
    dkd = f(dkd_ref[:, cols])
    dq_ref[:, cols] = (dqg * gam[:, None] + _dot(dpm, k_b, _DN, dt)).astype(dq_ref.dtype)
    dk = (dkd * kdec[:, None] + dkb * bg[:, None] + _dot(dkk, k_b, _DN, dt)
          + _dot(dkk, k_b, _DN_TA, dt) + _dot(dpm, q_b, _DN_TA, dt))
    dk_ref[:, cols] = dk.astype(dk_ref.dtype)
    return (h + jnp.sum(dkb * kf, axis=1), gq + jnp.sum(dqg * qf, axis=1),
            s + jnp.sum(dkd * kf, axis=1))
  h, gq, s = jax.lax.fori_loop(0, dk_total // bk, pass2, (zv, zv, zv))
  s = kdec * s
  db = db + gam * h
  dg = dg + bg * h + gam * gq - s
  dgc = jnp.sum(f(dge_ref[...])) * jnp.exp(gc) + jnp.sum(s)
  db_ref[...] = db.astype(db_ref.dtype)
  dla_ref[...] = (jnp.sum(jnp.where(col >= row, dg[None, :], 0.0), axis=1) + dgc
                  ).astype(dla_ref.dtype)


def _prep_bwd_call(q, k, v, la, beta, t, dw, duv, dp, dqg, dkd, dge, opts):
  bsz, tt, h, dk = q.shape
  dv = v.shape[-1]
  c = opts["chunk"]
  seq, vec, chunk, cvec = _prep_specs(c, dk, dv)
  kern = functools.partial(_prep_bwd_kernel, bk=_block_v(min(dk, dv), opts["block_k_grads"],
                                                 "block_k_grads", "min(Dk, Dv)"),
                           dot_dtype=opts["dot_dtype"])
  return tuple(pl.pallas_call(
      kern, grid=(bsz, h, tt // c),
      in_specs=[seq(dk), seq(dk), seq(dv), vec, vec, chunk(c),
                chunk(dk), chunk(dv), chunk(c), chunk(dk), chunk(dk), cvec],
      out_specs=[seq(dk), seq(dk), seq(dv), vec, vec],
      out_shape=[jax.ShapeDtypeStruct(a.shape, a.dtype) for a in (q, k, v, la, beta)],
      interpret=opts["interpret"], name="gdr_prep_bwd",
      compiler_params=_compiler_params(opts["num_warps_prep_bwd"], opts["num_stages"],
                                       opts["gpu_lowering"]),
  )(q, k, v, la, beta, t, dw, duv, dp, dqg, dkd, dge))


def _bwd_merged_kernel(q_ref, k_ref, v_ref, la_ref, b_ref, t_ref, hs_ref, dss_ref, do_ref,
                       dq_ref, dk_ref, dv_ref, dla_ref, db_ref, *, bk, dot_dtype):
  """bwd="merged": the per-chunk gradients of the recurrence and the prep's backward in one
  program per (batch, head, chunk), from T (saved by the forward), S_n (hs [Dv, Dk]),
  dS_{n+1} (dss) and dO; nothing chunk-sized goes through HBM. Dk is taken in column blocks of
  bk so that only [C, C] tiles, [C, Dv] tiles and [., bk] slabs are live:
    pass A: Kb S^T, Kd dS^T, Q K^T (contractions over Dk);
    then U = T (Vb - Kb S^T) (= Uv - W S^T), dU = Kd dS^T + P^T dO, dT = dU Vb^T,
    dv = beta T^T dU;
    pass B: dKd = U dS, dQg = dO S, dW = -dU S per column block: dT += dW Kb^T and the row sums
    that feed dbeta / dg; then K K^T, Q K^T again, dA = -T^T dT T^T, dP = dO U^T and the
    [C, C] terms;
    pass C: dKd, dQg, dW again per column block -> dq, dk.
  (ptxas, sm_90, 8 warps, Dk = Dv = 128, bk 32: 255 registers and ~0.9 KiB of spills per thread;
  the split_pallas kernels do not spill.)""" 
  c, dk_total = q_ref.shape
  dt = dot_dtype
  f = lambda x: x.astype(F32)
  nk = dk_total // bk
  la, beta, t, row, col, g, gc, gam, kdec, bg, zc, zv = _bwd_chunk_setup(la_ref, b_ref, t_ref, c)
  zs = jnp.zeros((c, v_ref.shape[1]), F32)

  def pass_a(j, carry):
    ks, kds, qk = carry
    cols = pl.ds(j * bk, bk)
    k_b = k_ref[:, cols]
    kf = f(k_b)
    return (ks + _dot(kf * bg[:, None], hs_ref[:, cols], _DN_T, dt),       # Kb S^T [C, Dv]
            kds + _dot(kf * kdec[:, None], dss_ref[:, cols], _DN_T, dt),   # Kd dS^T
            qk + _dot(q_ref[:, cols], k_b, _DN_T, dt))
  ks, kds, qk = jax.lax.fori_loop(0, nk, pass_a, (zs, zs, zc))
  do = do_ref[...]
  du = kds + _dot(_decay_block(g, g, True) * qk, do, _DN_TA, dt)  # Kd dS^T + P^T dO
  dvb = _dot(t, du, _DN_TA, dt)
  dv_ref[...] = (dvb * beta[:, None]).astype(dv_ref.dtype)
  db = jnp.sum(dvb * f(v_ref[...]), axis=1)
  dtt = _dot(du, f(v_ref[...]) * beta[:, None], _DN_T, dt)     # dUv Vb^T
  du = du.astype(dt)
  u = _mm(t, f(v_ref[...]) * beta[:, None] - ks).astype(dt)    # Uv - W S^T

  def grads(cols):
    s_b, ds_b = hs_ref[:, cols], dss_ref[:, cols]               # [Dv, bk]
    return (s_b, ds_b, _dot(u, ds_b, _DN, dt), _dot(do, s_b, _DN, dt),
            -_dot(du, s_b, _DN, dt))                            # dKd, dQg, dW [C, bk]

  def pass_b(j, carry):
    dtt, h, gq, s, dge = carry
    cols = pl.ds(j * bk, bk)
    s_b, ds_b, dkd, dqg, dw = grads(cols)
    kf = f(k_ref[:, cols])
    dkb = _dot(t, dw, _DN_TA, dt)
    return (dtt + _dot(dw, kf * bg[:, None], _DN_T, dt), h + jnp.sum(dkb * kf, axis=1),
            gq + jnp.sum(dqg * f(q_ref[:, cols]), axis=1), s + jnp.sum(dkd * kf, axis=1),
            dge + jnp.sum(f(s_b) * f(ds_b)))
  dtt, h, gq, s, dge = jax.lax.fori_loop(0, nk, pass_b,
                                         (dtt, zv, zv, zv, jnp.zeros((), F32)))
  # [C, C] terms (K K^T and Q K^T recomputed: fewer live registers through the passes)
  def pass_kk(j, carry):
    kk, qk = carry
    cols = pl.ds(j * bk, bk)
    k_b = k_ref[:, cols]
    return kk + _dot(k_b, k_b, _DN_T, dt), qk + _dot(q_ref[:, cols], k_b, _DN_T, dt)
  kk, qk = jax.lax.fori_loop(0, nk, pass_kk, (zc, zc))
  m, dkk, db, dg = _inverse_grads(t, dtt, kk, beta, g, row, col, db)
  dpm = _dot(do, u, _DN_T, dt) * m                             # dP o M, dP = dO U^T
  z = dpm * qk                                                 # dP o P
  dg = dg + jnp.sum(z, axis=1) - jnp.sum(z, axis=0)

  def pass_c(j, carry):
    cols = pl.ds(j * bk, bk)
    s_b, ds_b = hs_ref[:, cols], dss_ref[:, cols]
    k_b, q_b = k_ref[:, cols], q_ref[:, cols]
    dq = _dot(do, s_b, _DN, dt) * gam[:, None] + _dot(dpm, k_b, _DN, dt)     # dQg gamma + ...
    dq_ref[:, cols] = dq.astype(dq_ref.dtype)
    dk = _dot(u, ds_b, _DN, dt) * kdec[:, None] + _dot(dpm, q_b, _DN_TA, dt)  # dKd kdec + ...
    dk = dk + _dot(dkk, k_b, _DN, dt) + _dot(dkk, k_b, _DN_TA, dt)
    dkb = _dot(t, -_dot(du, s_b, _DN, dt), _DN_TA, dt)                       # T^T dW
    dk_ref[:, cols] = (dk + dkb * bg[:, None]).astype(dk_ref.dtype)
    return carry
  jax.lax.fori_loop(0, nk, pass_c, 0)
  s = kdec * s
  db = db + gam * h
  dg = dg + bg * h + gam * gq - s
  dgc = dge * jnp.exp(gc) + jnp.sum(s)
  db_ref[...] = db.astype(db_ref.dtype)
  dla_ref[...] = (jnp.sum(jnp.where(col >= row, dg[None, :], 0.0), axis=1) + dgc
                  ).astype(dla_ref.dtype)


def _bwd_merged_call(q, k, v, la, beta, t, hs, dss, do, opts):
  bsz, tt, h, dk = q.shape
  dv = v.shape[-1]
  c = opts["chunk"]
  seq, vec, chunk, _ = _prep_specs(c, dk, dv)
  sq = pl.squeezed if hasattr(pl, "squeezed") else None
  st = pl.BlockSpec((sq, sq, dv, dk), lambda b, hh, n: (b * h + hh, n, 0, 0))
  kern = functools.partial(_bwd_merged_kernel, bk=_block_v(dk, opts["block_k_grads"], "block_k_grads", "Dk"),
                           dot_dtype=opts["dot_dtype"])
  return tuple(pl.pallas_call(
      kern, grid=(bsz, h, tt // c),
      in_specs=[seq(dk), seq(dk), seq(dv), vec, vec, chunk(c), st, st, seq(dv)],
      out_specs=[seq(dk), seq(dk), seq(dv), vec, vec],
      out_shape=[jax.ShapeDtypeStruct(a.shape, a.dtype) for a in (q, k, v, la, beta)],
      interpret=opts["interpret"], name="gdr_bwd_merged",
      compiler_params=_compiler_params(opts["num_warps_grads"], opts["num_stages"],
                                       opts["gpu_lowering"]),
  )(q, k, v, la, beta, t, hs, dss, do))


def _merged_forward(q, k, v, la, beta, s0, opts):
  bsz, t, h, _ = q.shape
  w, uv, p, qg, kd, gev, tinv = _prep_fwd_call(q, k, v, la, beta, opts, with_t=True)
  flat = lambda a: a.reshape((bsz * h,) + a.shape[2:])
  w, uv, p, qg, kd, gev = (flat(a) for a in (w, uv, p, qg, kd, gev))
  o, hs, sn = _fwd_call(w, uv, p, qg, kd, gev, s0, opts)
  return (o, sn), (q, k, v, la, beta, tinv, w, p, qg, kd, gev, hs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _rule_merged(q, k, v, la, beta, s0, opts_key):
  """prep='pallas' with bwd='merged': Pallas prep + recurrence forward; backward = the reverse dS
  kernel + _bwd_merged_kernel. q, k, v, la, beta: T a multiple of the chunk."""
  return _merged_forward(q, k, v, la, beta, s0, dict(opts_key))[0]


def _rule_merged_fwd(q, k, v, la, beta, s0, opts_key):
  return _merged_forward(q, k, v, la, beta, s0, dict(opts_key))


def _rule_merged_bwd(opts_key, res, cts):
  opts = dict(opts_key)
  q, k, v, la, beta, tinv, w, p, qg, kd, gev, hs = res
  do, dsn = cts
  dss, ds0 = _states_call(w, p, qg, kd, gev, do, dsn.astype(F32), opts)
  dq, dk, dv, dla, dbeta = _bwd_merged_call(q, k, v, la, beta, tinv, hs, dss, do, opts)
  return dq, dk, dv, dla, dbeta, ds0


_rule_merged.defvjp(_rule_merged_fwd, _rule_merged_bwd)


def _prep_xla_cast(q, k, v, la, beta, opts):
  """The XLA prep with the Pallas prep's outputs: dot_dtype tiles and ge broadcast over C."""
  c = opts["chunk"]
  w, uv, p, qg, kd, ge = _prep(q, k, v, la, beta, c, precision=_HI)
  dt = opts["dot_dtype"]
  return (w.astype(dt), uv.astype(dt), p.astype(dt), qg.astype(dt), kd.astype(dt),
          jnp.broadcast_to(ge[..., None], ge.shape + (c,)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _prep_pallas(q, k, v, la, beta, opts_key):
  """Pallas prep on inputs whose T is a multiple of the chunk -> W, Uv, P, Qg, Kd, gev."""
  return tuple(_prep_fwd_call(q, k, v, la, beta, dict(opts_key)))


def _prep_pallas_fwd(q, k, v, la, beta, opts_key):
  opts = dict(opts_key)
  if opts["prep_bwd"] != "pallas":
    return _prep_pallas(q, k, v, la, beta, opts_key), (q, k, v, la, beta, None)
  *out, tinv = _prep_fwd_call(q, k, v, la, beta, opts, with_t=True)
  return tuple(out), (q, k, v, la, beta, tinv)


def _prep_pallas_bwd(opts_key, res, cts):
  opts = dict(opts_key)
  if opts["prep_bwd"] == "pallas":
    return _prep_bwd_call(*res, *cts, opts)
  _, vjp = jax.vjp(lambda *a: _prep_xla_cast(*a, opts), *res[:5])
  return vjp(tuple(cts))


_prep_pallas.defvjp(_prep_pallas_fwd, _prep_pallas_bwd)


_OPT_NAMES = ("block_v", "block_v_bwd", "num_warps", "num_warps_bwd", "num_stages", "bwd",
              "inverse_precision", "prep", "prep_bwd", "num_warps_prep", "num_warps_prep_bwd",
              "block_k_grads", "num_warps_grads", "state_dtype")


def _check_opts(bwd="fused", prep="xla", prep_bwd="pallas", inverse_precision="highest", **rest):
  """The kernel options' values (ValueError naming the bad one); unknown names are a TypeError."""
  unknown = sorted(set(rest) - set(_OPT_NAMES))
  if unknown:
    raise TypeError(f"unknown delta rule kernel option(s) {unknown}; expected some of "
                    f"{list(_OPT_NAMES)}.")
  if bwd not in ("fused", "split", "split_pallas", "merged"):
    raise ValueError(f"delta rule kernel: bwd={bwd!r} must be 'fused', 'split', "
                     f"'split_pallas' or 'merged'.")
  if bwd == "merged" and prep != "pallas":
    raise ValueError("delta rule kernel: bwd='merged' needs prep='pallas' (its backward kernel "
                     "is the prep's backward merged with the per-chunk gradients).")
  if inverse_precision not in ("highest", "default"):
    raise ValueError(f"delta rule kernel: inverse_precision={inverse_precision!r} must be "
                     f"'highest' or 'default'.")
  if prep not in ("xla", "pallas"):
    raise ValueError(f"delta rule kernel: prep={prep!r} must be 'xla' or 'pallas'.")
  if prep_bwd not in ("xla", "pallas"):
    raise ValueError(f"delta rule kernel: prep_bwd={prep_bwd!r} must be 'xla' or 'pallas'.")


def chunk_gated_delta_rule(q, k, v, log_alpha, beta, chunk_size: int = 64, initial_state=None,
                           *, block_v: int = 64, block_v_bwd: int = 128, num_warps: int = 4,
                           num_warps_bwd: int = 8, num_stages: int = 1, dot_dtype=None,
                           bwd: str = "fused", inverse_precision: str = "highest",
                           prep: str = "xla", prep_bwd: str = "pallas", num_warps_prep: int = 8,
                           num_warps_prep_bwd: int = 8, block_k_grads: int = 32,
                           num_warps_grads: int = 8, state_dtype=None,
                           interpret: bool | None = None, gpu_lowering: bool = False):
  """Gated delta rule, chunked, with the recurrence over chunks in Pallas kernels.

  Same arguments and results as layers.deltanet.chunk_gated_delta_rule. chunk_size must be a
  power of two (Triton tensor sizes); head dims must be powers of two. interpret=None runs the
  kernels natively on GPU and in the Pallas interpreter elsewhere.

  prep: "xla" (the chunk quantities W, Uv, P, Qg, Kd, ge in plain JAX, float32, differentiated
  by autodiff) or "pallas" (one Pallas program per (batch, head, chunk); chunk_size, Dk, Dv
  >= 16; num_warps_prep warps). prep_bwd (with prep="pallas"): "pallas" (its backward kernel,
  num_warps_prep_bwd warps) or "xla" (autodiff of the XLA prep, recomputed).
  bwd: "fused" (one reverse kernel computes every gradient), "split" (a reverse kernel for dS
  only, the rest as batched einsums over all chunks), "split_pallas" (the same reverse dS
  kernel, then one parallel Pallas kernel over (batch x head, chunk) for the rest, with
  num_warps_grads warps) or "merged" (prep="pallas" only: the dS kernel, then one per-chunk
  kernel doing the chunk-local gradients and the prep's backward together, num_warps_grads
  warps; prep_bwd unused). block_k_grads: the column block (over Dk, and Dv in the prep's
  backward) that those per-chunk backward kernels loop over.
  state_dtype: dtype of the per-chunk states the forward saves for the backward and of the dS
  the split / merged backwards pass on (None: float32; bfloat16 halves that traffic, the states
  entering the backward's matmuls as bf16 operands anyway when dot_dtype is bf16).
  inverse_precision: matmul precision of the XLA prep's (I + A)^-1 build ("highest" |
  "default"). gpu_lowering=True builds every kernel for the GPU (no interpreter, Triton compiler
  parameters on any host) so that common.lower_for_gpu can lower it on a CPU machine.
  Defaults: the fastest setting measured on one H100 at B4 T4096, 32 x 128 (docs/PERFORMANCE.md,
  "Kernels"); "split", "default", prep="pallas", "split_pallas", "merged" and bf16 states were
  not measured on GPU yet (prediction: prep="pallas", bwd="merged" fastest, module docstring).
  """
  _check_opts(bwd=bwd, prep=prep, prep_bwd=prep_bwd, inverse_precision=inverse_precision)
  from lightning_jax.layers.deltanet import _check_rule_shapes, _state0
  _check_rule_shapes(q, k, v, log_alpha, beta, initial_state)
  bsz, t, h, dk = q.shape
  dv = v.shape[-1]
  c = int(chunk_size)
  for name, val in (("chunk_size", c), ("Dk", dk), ("Dv", dv)):
    if val < 1 or val & (val - 1):
      raise ValueError(f"delta rule kernel: {name}={val} must be a power of two.")
  if prep == "pallas" and (c < _SB or dk < 16 or dv < 16):
    raise ValueError(f"delta rule kernel: prep='pallas' needs chunk_size, Dk and Dv >= 16 "
                     f"(got {c}, {dk}, {dv}).")
  if gpu_lowering:
    interpret = False
  elif interpret is None:
    interpret = not on_gpu()
  if dot_dtype is None:
    dot_dtype = F32 if jnp.dtype(v.dtype) == jnp.dtype(F32) else jnp.bfloat16
  s0 = _state0(initial_state, q, v).reshape(bsz * h, dv, dk)
  cast = lambda a: a.astype(dot_dtype)
  flat = lambda a: a.reshape((bsz * h,) + a.shape[2:])
  opts = (("block_v", int(block_v)), ("block_v_bwd", int(block_v_bwd)),
          ("num_warps", int(num_warps)), ("num_warps_bwd", int(num_warps_bwd)),
          ("num_stages", int(num_stages)), ("dot_dtype", jnp.dtype(dot_dtype)),
          ("interpret", bool(interpret)), ("bwd", bwd), ("gpu_lowering", bool(gpu_lowering)),
          ("block_k_grads", int(block_k_grads)), ("num_warps_grads", int(num_warps_grads)),
          ("state_dtype", jnp.dtype(F32 if state_dtype is None else state_dtype)),
          ("heads", int(h)), ("out_dtype", jnp.dtype(v.dtype)))
  if prep == "pallas":
    n = -(-t // c)
    pad = n * c - t
    if pad:   # beta = 0, log_alpha = 0 on the tail: the state passes through unchanged
      padt = lambda a: jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2))
      q, k, v, log_alpha, beta = (padt(a) for a in (q, k, v, log_alpha, beta))
    popts = (("chunk", c), ("dot_dtype", jnp.dtype(dot_dtype)), ("interpret", bool(interpret)),
             ("num_warps_prep", int(num_warps_prep)), ("num_stages", int(num_stages)),
             ("num_warps_prep_bwd", int(num_warps_prep_bwd)),
             ("gpu_lowering", bool(gpu_lowering)), ("prep_bwd", prep_bwd),
             ("block_k_grads", int(block_k_grads)))
    la32, b32 = log_alpha.astype(F32), beta.astype(F32)
    if bwd == "merged":
      o, sn = _rule_merged(q, k, v, la32, b32, s0, tuple(sorted(dict(opts + popts).items())))
      return o[:, :t], sn.reshape(bsz, h, dv, dk)
    w, uv, p, qg, kd, gev = _prep_pallas(q, k, v, la32, b32, popts)
  else:
    w, uv, p, qg, kd, ge = _prep(q, k, v, log_alpha, beta, c,
                                 precision=getattr(jax.lax.Precision, inverse_precision.upper()))
    n = w.shape[2]
    w, uv, p, qg, kd = (cast(a) for a in (w, uv, p, qg, kd))
    gev = jnp.broadcast_to(ge[..., None], ge.shape + (c,))
  o, sn = _recurrence(flat(w), flat(uv), flat(p), flat(qg), flat(kd), flat(gev), s0, opts)
  return o[:, :t], sn.reshape(bsz, h, dv, dk)


# ----------------------------------------------------------------------------- config selection
_FALLBACK_LOGGED = set()


def select_and_run(cfg, q, k, v, log_alpha, beta):
  """model.deltanet.impl == "kernel": the Pallas kernels on GPU; elsewhere the chunked reference.

  Off GPU the fallback is logged once per backend (logging.WARNING, logger
  "lightning_jax.kernels"); a chunk size the kernels cannot take is a ConfigError.
  """
  from lightning_jax.config import ConfigError
  from lightning_jax.layers import deltanet
  c = int(cfg.model.deltanet.chunk_size)
  if c < 1 or c & (c - 1):
    raise ConfigError(f"model.deltanet.chunk_size={c} must be a power of two with "
                      f"model.deltanet.impl='kernel' (Triton tensor sizes).")
  if falls_back(_FALLBACK_LOGGED, _FORCE_INTERPRET, "model.deltanet.impl='kernel'",
                "the pure-JAX chunked delta rule"):
    return deltanet.chunk_gated_delta_rule(q, k, v, log_alpha, beta, chunk_size=c)
  opts = dict(cfg.model.deltanet.get("kernel", {}))
  try:     # bad values fail here, before anything is traced
    _check_opts(**opts)
  except (TypeError, ValueError) as e:
    raise ConfigError(f"model.deltanet.kernel={opts}: {e}") from None
  rule = functools.partial(chunk_gated_delta_rule, chunk_size=c,
                           interpret=True if _FORCE_INTERPRET else None, **opts)
  return sharded(rule, q, k, v, log_alpha, beta)


_FORCE_INTERPRET = False     # tests: run the kernels (interpreted) through select_and_run on CPU


def sharded(rule, q, k, v, log_alpha, beta):
  """Run `rule` per device under the active mesh (sharding.use_mesh): batch over the batch axes,
  heads over "heads"' axes (every (batch, head) pair is independent), so a pallas_call, which XLA
  cannot partition, never sees a global array. Axes that do not divide B or H stay unsplit."""
  from jax.sharding import PartitionSpec as P
  from lightning_jax import sharding as shd
  mesh = shd.current_mesh()
  if mesh is None or mesh.size == 1:
    return rule(q, k, v, log_alpha, beta)
  spec4 = shd._fits(q.shape, shd.spec_for(("batch", None, "heads", None)), mesh)
  b_ax, h_ax = spec4[0], spec4[2]
  spec3 = P(b_ax, None, h_ax)
  spec_s = P(b_ax, h_ax, None, None)
  fn = lambda *a: rule(*a)
  return jax.shard_map(fn, mesh=mesh, in_specs=(spec4, spec4, spec4, spec3, spec3),
                       out_specs=(spec4, spec_s), check_vma=False)(q, k, v, log_alpha, beta)
