"""Chunked gated delta rule with the sequential part as Pallas kernels (forward and backward).

Same contract as ops/delta_rule/reference.py's chunked and recurrent rules:
  o [B, T, H, Dv] in v's dtype, S_T [B, H, Dv, Dk] float32.
Config-free: every choice comes in a `DeltaRuleOptions`; ops/delta_rule/api.py builds it from
the config and picks this module or the reference.

Split of the work (the math is the reference's, see reference.py's docstring):
  * prep, per chunk: the local cumulative log decay g, W = (I+A)^-1 diag(beta gamma) K and
    Uv = (I+A)^-1 diag(beta) V, the intra-chunk attention P = M o Q K^T, Qg = diag(gamma) Q,
    Kd = diag(e^{g_C - g}) K and the chunk decay ge = e^{g_C}. prep="xla": plain JAX over all
    chunks at once, float32, differentiated by autodiff. prep="pallas": one Pallas program per
    (batch, head, chunk) reading bf16 q/k/v straight from [B, T, H, D] and writing W, Uv, P, Qg,
    Kd in dot_dtype; (I+A)^-1 is built in registers in 16 x 16 sub-blocks (forward substitution
    on the diagonal blocks, T_ij = -T_ii sum_{j<=m<i} A_im T_mj below them, float32 IEEE dots);
    prep_fwd="split" (the default) runs the same forward as three kernels on full tiles (A; the
    inverse from A's sub-blocks read back from memory, at num_warps_inv = 2 warps; W and Uv), for
    register pressure (see _prep_split_call): on an H100 at B4 x T4096 x 32 x 128 the forward
    takes 1.47 ms split against 2.51 ms fused at 8 warps (docs/PERFORMANCE.md).
    When differentiated the forward also saves T = (I+A)^-1 (float32 [C, C] per chunk); its
    backward is a second per-chunk kernel on full [C, C] tiles and [C, bk] column slabs:
    dA = -T^T dT T^T, the M / diagonal scalings' terms and dlog_alpha = reverse cumsum(dg)
    (see _prep_bwd_kernel);
  * the recurrence over chunks, one Pallas program per (batch x head, block of Dv rows of the
    state), the state block [BV, Dk] held in registers across a loop over the chunks (fwd_o=
    "split" leaves O to a second kernel over (batch x head, chunk, Dv block) reading the states):
        U_n = Uv_n - W_n S_n^T ;  O_n = Qg_n S_n^T + P_n U_n ;  S_{n+1} = ge_n S_n + U_n^T Kd_n
    (rows of the state over Dv are independent, which is what makes the Dv split exact). The
    forward kernel writes O in v's dtype into [B, T, H, Dv] and the state at each chunk start
    for the backward (state_dtype: by default the values' dtype, bf16 in the model, as FLA
    saves them);
  * the backward of the recurrence, in reverse over chunks with dS [BV, Dk]:
        dS_{n+1} -> dU += Kd dS^T, dKd = U dS, dge = <S_n, dS>, dS_n = ge dS
        dO       -> dQg = dO S_n, dS_n += dO^T Qg, dP = dO U^T, dU += P^T dO
        U        -> dUv = dU, dW = -dU S_n, dS_n -= dU^T W
    as a reverse kernel that carries only dS and writes dS_{n+1} per chunk, then one parallel
    Pallas kernel per (batch x head, chunk) for every chunk-local gradient (U and dU on full
    [C, Dv] tiles, then dKd, dQg, dW per Dk column block, written in the operands' dtype).
Everything is tied together by jax.custom_vjp (prep and recurrence separately).

Backward variants that lost on GPU were removed (a fused reverse kernel, dS kernel + XLA
einsums, the prep's backward merged with the per-chunk gradients, the prep's backward by XLA
autodiff); their measurements are in docs/PERFORMANCE.md ("Gated delta rule"); their code is
in the history as lightning_jax/kernels/delta_rule.py.

Backends: on GPU the kernels lower through Pallas' Triton backend; elsewhere (CPU) they run with
`interpret=True` (slow; for tests) — `impl_note()` says which. Matmul operands inside the kernels
are cast to `dot_dtype` (float32 for float32 inputs, else bfloat16) with float32 accumulation; the
state and every carried quantity stay float32 (the saved per-chunk states: state_dtype). In the
Pallas prep the 16 x 16 inverse dots are float32 IEEE; the other float32 dots (T Kb, T Vb,
-T^T dT T^T) use default precision, i.e. TF32 on GPU (below the bf16 rounding of their results).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from lightning_jax import remat
from lightning_jax.ops.delta_rule.reference import check_shapes, state0
from lightning_jax.ops.pallas import compiler_params, on_gpu

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
def _chunk_from_qk(q_ref, k_ref, la_ref, rows, dot_dtype):
  """One chunk's P = M o Q K^T, Qg = diag(gamma) Q and Kd = diag(e^{g_C - g}) K, rounded to the
  dot dtype as the prep stores them (and half the registers), and its decay e^{g_C}, from the
  chunk's rows of q, k [., Dk] and log decays [.] (the log decays are loaded first: ptxas gives
  the forward kernel less spill in that order)."""
  la = la_ref[rows].astype(F32)
  g = _cum_full(la)
  gc = jnp.sum(la)
  q, k = q_ref[rows, :], k_ref[rows, :]
  p = (_decay_block(g, g, True) * _dot(q, k, _DN_T, dot_dtype)).astype(dot_dtype)
  qg = (q.astype(F32) * jnp.exp(g)[:, None]).astype(dot_dtype)
  kd = (k.astype(F32) * jnp.exp(gc - g)[:, None]).astype(dot_dtype)
  return p, qg, kd, jnp.exp(gc)


def _chunk_source(refs, from_qk, c, dot_dtype):
  """(refs left over, chunk(i) -> (P, Qg, Kd, ge) of chunk i) for the sequential kernels: read
  back from the prep's [N, C, .] outputs (p, qg, kd, gev refs), or (from_qk) made from the
  [T, .] slabs of q, k and the log decays (q, k, la refs)."""
  if from_qk:
    q_ref, k_ref, la_ref, *rest = refs
    rows = lambda i: pl.ds(i * c, c)
    return rest, lambda i: _chunk_from_qk(q_ref, k_ref, la_ref, rows(i), dot_dtype)
  p_ref, qg_ref, kd_ref, ge_ref, *rest = refs
  # every entry of a chunk's gev row holds the same ge
  return rest, lambda i: (p_ref[i], qg_ref[i], kd_ref[i], jnp.max(ge_ref[i].astype(F32)))


def _fwd_kernel(w_ref, uv_ref, *refs, n_chunks, dot_dtype, from_qk=False, with_states=True):
  """The forward recurrence for one (batch x head, Dv block): refs are the chunk source
  (_chunk_source), s0, then the outputs o, hs (with_states: the state entering every chunk,
  for the backward; the primal writes none) and sn. from_qk: P, Qg, Kd and the decay are made
  here from the chunk's q, k and log decays instead of read back from the prep."""
  c = uv_ref.shape[1]
  (s0_ref, o_ref, *out_refs), chunk = _chunk_source(refs, from_qk, c, dot_dtype)
  hs_ref, sn_ref = out_refs if with_states else (None, out_refs[0])

  def body(i, s):
    if hs_ref is not None:
      hs_ref[i] = s.astype(hs_ref.dtype)
    p, qg, kd, ge = chunk(i)
    u = uv_ref[i].astype(F32) - _dot(w_ref[i], s, _DN_T, dot_dtype)            # [C, BV]
    o = _dot(qg, s, _DN_T, dot_dtype) + _dot(p, u, _DN, dot_dtype)
    o_ref[pl.ds(i * c, c), :] = o.astype(o_ref.dtype)                          # [B, T, H, Dv]
    return ge * s + _dot(u, kd, _DN_TA, dot_dtype)                              # [BV, Dk]
  sn_ref[...] = jax.lax.fori_loop(0, n_chunks, body, s0_ref[...].astype(F32))


def _fwd_states_kernel(w_ref, uv_ref, kd_ref, ge_ref, s0_ref, hs_ref, sn_ref, *, n_chunks,
                       dot_dtype):
  """fwd_o="split": only the sequential part of the forward (the states), two dots per chunk
  instead of four; the outputs come from _fwd_out_kernel, parallel over chunks."""
  def body(i, s):
    hs_ref[i] = s.astype(hs_ref.dtype)
    u = uv_ref[i].astype(F32) - _dot(w_ref[i], s, _DN_T, dot_dtype)            # [C, BV]
    ge = jnp.max(ge_ref[i].astype(F32))
    return ge * s + _dot(u, kd_ref[i], _DN_TA, dot_dtype)
  sn_ref[...] = jax.lax.fori_loop(0, n_chunks, body, s0_ref[...].astype(F32))


def _fwd_out_kernel(w_ref, uv_ref, p_ref, qg_ref, hs_ref, o_ref, *, dot_dtype):
  """One (batch x head, chunk, Dv block): O = Qg S^T + P (Uv - W S^T) from the saved state S
  entering the chunk (exact with float32 saved states; rounded ones with state_dtype bf16)."""
  s = hs_ref[...].astype(F32)                                                   # [BV, Dk]
  u = uv_ref[...].astype(F32) - _dot(w_ref[...], s, _DN_T, dot_dtype)           # [C, BV]
  o = _dot(qg_ref[...], s, _DN_T, dot_dtype) + _dot(p_ref[...], u, _DN, dot_dtype)
  o_ref[...] = o.astype(o_ref.dtype)




def _bwd_states_kernel(w_ref, *refs, n_chunks, dot_dtype, from_qk=False):
  """Only the sequential part of the backward: dS entering each chunk from the right. refs:
  the chunk source (_chunk_source), then do (this (batch, head)'s [T, BV] slab of dO in the
  [B, T, H, Dv] layout), dsn, and the outputs dss, ds0."""
  c = w_ref.shape[1]
  (do_ref, dsn_ref, dss_ref, ds0_ref), chunk = _chunk_source(refs, from_qk, c, dot_dtype)

  def body(j, ds):
    i = n_chunks - 1 - j
    dss_ref[i] = ds.astype(dss_ref.dtype)                                        # dS_{i+1}
    p, qg, kd, ge = chunk(i)
    do = do_ref[pl.ds(i * c, c), :].astype(F32)
    du = _dot(kd, ds, _DN_T, dot_dtype) + _dot(p, do, _DN_TA, dot_dtype)
    return (ge * ds + _dot(do, qg, _DN_TA, dot_dtype)
            - _dot(du, w_ref[i], _DN_TA, dot_dtype))
  ds0_ref[...] = jax.lax.fori_loop(0, n_chunks, body, dsn_ref[...].astype(F32))




def _specs(n, c, dk, bv):
  """BlockSpecs: per-(bh) full chunk slabs; Dv-blocked slabs; one Dv block of the state(s)."""
  sq = pl.squeezed if hasattr(pl, "squeezed") else None
  full_k = pl.BlockSpec((sq, n, c, dk), lambda i, j: (i, 0, 0, 0))
  full_c = pl.BlockSpec((sq, n, c, c), lambda i, j: (i, 0, 0, 0))
  vec = pl.BlockSpec((sq, n, c), lambda i, j: (i, 0, 0))
  blk_v = pl.BlockSpec((sq, n, c, bv), lambda i, j: (i, 0, 0, j))
  state = pl.BlockSpec((sq, bv, dk), lambda i, j: (i, j, 0))
  states = pl.BlockSpec((sq, n, bv, dk), lambda i, j: (i, 0, j, 0))
  return dict(full_k=full_k, full_c=full_c, vec=vec, blk_v=blk_v, state=state, states=states)


def _seq_spec(n, c, bv, heads):
  """[T, BV] slab of (batch x head) i, Dv block j, of an array laid out [B, T, H, Dv]."""
  sq = pl.squeezed if hasattr(pl, "squeezed") else None
  return pl.BlockSpec((sq, n * c, sq, bv), lambda i, j: (i // heads, 0, i % heads, j))




def _block_v(dv, want, name="block_v", dim="Dv"):
  bv = min(int(want), dv)
  if dv % bv or bv & (bv - 1):
    raise ValueError(f"delta rule kernel: {name}={want} must be a power of two dividing "
                     f"{dim}={dv}.")
  return bv


def _source_specs(src, n, c, dk, heads):
  """BlockSpecs (grid (batch x head, Dv block)) of a sequential kernel's chunk source: the
  prep's P, Qg, Kd, gev [BH, N, C, .], or (three arrays) q, k [B, T, H, Dk] and the log decays
  [B, T, H] as [T, .] slabs of one (batch, head)."""
  if len(src) == 3:
    sq = pl.squeezed if hasattr(pl, "squeezed") else None
    seq_k = pl.BlockSpec((sq, n * c, sq, dk), lambda i, j: (i // heads, 0, i % heads, 0))
    return [seq_k, seq_k, pl.BlockSpec((sq, n * c, sq), lambda i, j: (i // heads, 0, i % heads))]
  sp = _specs(n, c, dk, 1)
  return [sp["full_c"], sp["full_k"], sp["full_k"], sp["vec"]]


def _fwd_call(w, uv, src, s0, opts, with_states=True):
  """(o, hs, sn) from W, Uv and the chunk source src: (P, Qg, Kd, gev) from the prep, or
  (q, k, log_alpha) in their [B, T, H, .] layouts (the kernel makes P, Qg, Kd:
  gdr_chunk_fwd_qk). with_states=False (the primal): hs is None and the kernel writes no
  per-chunk states (a quarter of the forward kernel's traffic at D = 128)."""
  if opts.fwd_o == "split":
    return _fwd_split_call(w, uv, *src, s0, opts)
  bh, n, c, dk = w.shape
  dv = uv.shape[-1]
  bv = _block_v(dv, opts.block_v)
  sp = _specs(n, c, dk, bv)
  from_qk = len(src) == 3
  kern = functools.partial(_fwd_kernel, n_chunks=n, dot_dtype=opts.dot_dtype, from_qk=from_qk,
                           with_states=with_states)
  states = ([sp["states"]], [jax.ShapeDtypeStruct((bh, n, dv, dk), opts.state_dtype)]
            ) if with_states else ([], [])
  out = pl.pallas_call(
      kern, grid=(bh, dv // bv),
      in_specs=[sp["full_k"], sp["blk_v"]] + _source_specs(src, n, c, dk, opts.heads) +
               [sp["state"]],
      out_specs=[_seq_spec(n, c, bv, opts.heads)] + states[0] + [sp["state"]],
      out_shape=[jax.ShapeDtypeStruct((bh // opts.heads, n * c, opts.heads, dv),
                                      opts.out_dtype)] + states[1] +
                [jax.ShapeDtypeStruct((bh, dv, dk), F32)],
      interpret=opts.interpret, name="gdr_chunk_fwd_qk" if from_qk else "gdr_chunk_fwd",
      compiler_params=_compiler_params(opts.num_warps, opts.num_stages,
                                       opts.gpu_lowering),
  )(w, uv, *src, s0)
  return tuple(out) if with_states else (out[0], None, out[1])


def _fwd_split_call(w, uv, p, qg, kd, gev, s0, opts):
  """The forward as FLA splits it: the states by a sequential kernel over chunks
  (gdr_chunk_fwd_states, grid (B H, Dv blocks)), then the outputs by a kernel parallel over
  (B H, chunk, Dv block) (gdr_chunk_fwd_out). Same results as _fwd_call's fused kernel."""
  bh, n, c, dk = w.shape
  dv = uv.shape[-1]
  bv = _block_v(dv, opts.block_v)
  sp = _specs(n, c, dk, bv)
  hs, sn = pl.pallas_call(
      functools.partial(_fwd_states_kernel, n_chunks=n, dot_dtype=opts.dot_dtype),
      grid=(bh, dv // bv),
      in_specs=[sp["full_k"], sp["blk_v"], sp["full_k"], sp["vec"], sp["state"]],
      out_specs=[sp["states"], sp["state"]],
      out_shape=[jax.ShapeDtypeStruct((bh, n, dv, dk), opts.state_dtype),
                 jax.ShapeDtypeStruct((bh, dv, dk), F32)],
      interpret=opts.interpret, name="gdr_chunk_fwd_states",
      compiler_params=_compiler_params(opts.num_warps, opts.num_stages, opts.gpu_lowering),
  )(w, uv, kd, gev, s0)
  sq = pl.squeezed if hasattr(pl, "squeezed") else None
  heads = opts.heads
  k_blk = pl.BlockSpec((sq, sq, c, dk), lambda i, j, v: (i, j, 0, 0))
  o = pl.pallas_call(
      functools.partial(_fwd_out_kernel, dot_dtype=opts.dot_dtype),
      grid=(bh, n, dv // bv),
      in_specs=[k_blk, pl.BlockSpec((sq, sq, c, bv), lambda i, j, v: (i, j, 0, v)),
                pl.BlockSpec((sq, sq, c, c), lambda i, j, v: (i, j, 0, 0)), k_blk,
                pl.BlockSpec((sq, sq, bv, dk), lambda i, j, v: (i, j, v, 0))],
      out_specs=pl.BlockSpec((sq, c, sq, bv), lambda i, j, v: (i // heads, j, i % heads, v)),
      out_shape=jax.ShapeDtypeStruct((bh // heads, n * c, heads, dv), opts.out_dtype),
      interpret=opts.interpret, name="gdr_chunk_fwd_out",
      compiler_params=_compiler_params(opts.num_warps, opts.num_stages, opts.gpu_lowering),
  )(w, uv, p, qg, hs)
  return o, hs, sn




def _states_call(w, src, do, dsn, opts):
  """The reverse dS kernel: dS_{n+1} for every chunk n (in state_dtype) and dS_0 (float32);
  src as _fwd_call's."""
  bh, n, c, dk = w.shape
  dv = do.shape[-1]
  bv = _block_v(dv, opts.block_v_bwd)
  sp = _specs(n, c, dk, bv)
  from_qk = len(src) == 3
  kern = functools.partial(_bwd_states_kernel, n_chunks=n, dot_dtype=opts.dot_dtype,
                           from_qk=from_qk)
  return pl.pallas_call(
      kern, grid=(bh, dv // bv),
      in_specs=[sp["full_k"]] + _source_specs(src, n, c, dk, opts.heads) +
               [_seq_spec(n, c, bv, opts.heads), sp["state"]],
      out_specs=[sp["states"], sp["state"]],
      out_shape=[jax.ShapeDtypeStruct((bh, n, dv, dk), opts.state_dtype),
                 jax.ShapeDtypeStruct((bh, dv, dk), F32)],
      interpret=opts.interpret,
      name="gdr_chunk_bwd_states_qk" if from_qk else "gdr_chunk_bwd_states",
      compiler_params=_compiler_params(opts.num_warps_bwd, opts.num_stages,
                                       opts.gpu_lowering),
  )(w, *src, do, dsn)




def _bwd_grads_kernel(w_ref, uv_ref, *refs, bk, dot_dtype, from_qk=False):
  """Every chunk-local gradient of one chunk, given S_n (hs [Dv, Dk]) and dS_{n+1} (dss), with
  Dk in column blocks of bk (only [C, Dv] tiles and [., bk] slabs live, no accumulators):
    pass A: W S^T, Kd dS^T; then U = Uv - W S^T, dU = Kd dS^T + P^T dO (= dUv), dP = dO U^T;
    pass B: dKd = U dS, dQg = dO S, dW = -dU S per column block, and dge = <S, dS>.
  refs: the chunk's P and Kd from the prep, or (from_qk) its q, k and log decays (P made here,
  Kd a column block at a time), then hs, dss, do and the outputs."""
  c, dk = w_ref.shape
  dt = dot_dtype
  f = lambda x: x.astype(F32)
  if from_qk:
    q_ref, k_ref, la_ref, hs_ref, dss_ref, do_ref, *outs = refs
    p, _, _, _ = _chunk_from_qk(q_ref, k_ref, la_ref, slice(None), dt)
    la = la_ref[...].astype(F32)
    kdec = jnp.exp(jnp.sum(la) - _cum_full(la))[:, None]
    kd_cols = lambda cols: (f(k_ref[:, cols]) * kdec).astype(dt)
  else:
    p_ref, kd_ref, hs_ref, dss_ref, do_ref, *outs = refs
    p = p_ref[...]
    kd_cols = lambda cols: kd_ref[:, cols]
  duv_ref, dw_ref, dp_ref, dqg_ref, dkd_ref, dge_ref = outs
  zs = jnp.zeros((c, uv_ref.shape[1]), F32)

  def pass_a(j, carry):
    ws, kds = carry
    cols = pl.ds(j * bk, bk)
    return (ws + _dot(w_ref[:, cols], hs_ref[:, cols], _DN_T, dt),
            kds + _dot(kd_cols(cols), dss_ref[:, cols], _DN_T, dt))
  ws, kds = jax.lax.fori_loop(0, dk // bk, pass_a, (zs, zs))
  do = do_ref[...]
  u = f(uv_ref[...]) - ws
  du = kds + _dot(p, do, _DN_TA, dt)
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


def _bwd_call_split_pallas(w, uv, src, hs, do, dsn, opts):
  """Backward as the sequential dS kernel (Dv blocks of block_v_bwd rows) + one parallel Pallas
  kernel over (batch x head, chunk) for every chunk-local gradient, written in the operands'
  dtype (no float32 partials); src as _fwd_call's. Returns dUv, dW, dP, dQg, dKd (as the prep
  stores P, Qg, Kd), d(gev) [BH, N, C] (each entry the chunk's whole dge) and dS_0."""
  bh, n, c, dk = w.shape
  dv = uv.shape[-1]
  dss, ds0 = _states_call(w, src, do, dsn, opts)
  heads = opts.heads
  sq = pl.squeezed if hasattr(pl, "squeezed") else None
  do_spec = pl.BlockSpec((sq, c, sq, dv), lambda i, j: (i // heads, j, i % heads, 0))
  ck = lambda d: pl.BlockSpec((sq, sq, c, d), lambda i, j: (i, j, 0, 0))
  st = pl.BlockSpec((sq, sq, dv, dk), lambda i, j: (i, j, 0, 0))
  cv = pl.BlockSpec((sq, sq, c), lambda i, j: (i, j, 0))
  from_qk = len(src) == 3
  if from_qk:
    q, k, la = src
    src_specs = [pl.BlockSpec((sq, c, sq, dk), lambda i, j: (i // heads, j, i % heads, 0))] * 2 \
        + [pl.BlockSpec((sq, c, sq), lambda i, j: (i // heads, j, i % heads))]
    src_in = (q, k, la)
  else:
    p, _, kd, _ = src
    src_specs, src_in = [ck(c), ck(dk)], (p, kd)
  kern = functools.partial(_bwd_grads_kernel, bk=_block_v(dk, opts.block_k_grads,
                                                           "block_k_grads", "Dk"),
                           dot_dtype=opts.dot_dtype, from_qk=from_qk)
  shp = lambda d, dtype=opts.dot_dtype: jax.ShapeDtypeStruct((bh, n, c) + ((d,) if d else ()),
                                                              dtype)
  duv, dw, dp, dqg, dkd, dgev = pl.pallas_call(
      kern, grid=(bh, n),
      in_specs=[ck(dk), ck(dv)] + src_specs + [st, st, do_spec],
      out_specs=[ck(dv), ck(dk), ck(c), ck(dk), ck(dk), cv],
      out_shape=[jax.ShapeDtypeStruct(uv.shape, uv.dtype), jax.ShapeDtypeStruct(w.shape, w.dtype),
                 shp(c), shp(dk), shp(dk), shp(None, F32)],
      interpret=opts.interpret,
      name="gdr_chunk_bwd_grads_qk" if from_qk else "gdr_chunk_bwd_grads",
      compiler_params=_compiler_params(opts.num_warps_grads, opts.num_stages,
                                       opts.gpu_lowering),
  )(w, uv, *src_in, hs, dss, do)
  return duv, dw, dp, dqg, dkd, dgev * c, ds0


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _recurrence(w, uv, p, qg, kd, gev, s0, opts):
  o, _, sn = _fwd_call(w, uv, (p, qg, kd, gev), s0, opts, with_states=False)
  return o, sn


def _recurrence_fwd(w, uv, p, qg, kd, gev, s0, opts):
  o, hs, sn = _fwd_call(w, uv, (p, qg, kd, gev), s0, opts)
  # named so that a selective jax.checkpoint (model.remat) keeps them: no kernel runs twice
  return (o, sn), remat.keep((w, uv, p, qg, kd, gev, hs))


def _recurrence_bwd(opts, res, cts):
  w, uv, p, qg, kd, gev, hs = res
  do, dsn = cts
  duv, dw, dp, dqg, dkd, dge, ds0 = _bwd_call_split_pallas(w, uv, (p, qg, kd, gev), hs, do,
                                                           dsn.astype(F32), opts)
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
  """What the prep's backward kernel starts from, float32: the chunk's log decays and betas,
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
  kk, m, a = {}, {}, {}
  for i in range(nb):
    for j in range(i + 1):
      kk[i, j] = _dot(k[i], k[j], _DN_T, dot_dtype)
      m[i, j] = _decay_block(g[i], g[j], i == j)
      a_ij = beta[i][:, None] * m[i, j] * kk[i, j]
      if i == j:
        sb = a_ij.shape[0]
        a_ij = jnp.where(_iota((sb, sb), 1) < _iota((sb, sb), 0), a_ij, 0.0)
      a[i, j] = a_ij
  return kk, m, a, _block_inverse(a, nb)


def _inv_unit_lower_series(blocks):
  """(I + a)^-1 for each strictly lower [sb, sb] float32 tile, by matmuls only: with x = -a
  nilpotent of order sb, (I - x)^-1 = (I + x)(I + x^2)(I + x^4)...(I + x^{sb/2}), exactly
  (2 log2(sb) - 2 dots a tile, float32 IEEE; the XLA prep's _unit_lower_inverse does the same
  on its diagonal blocks). Entries of x^m stay below binomial(sb - 1, m) for |a| <= 1."""
  sb = blocks[0].shape[0]
  eye = jnp.where(_iota((sb, sb), 0) == _iota((sb, sb), 1), 1.0, 0.0).astype(F32)
  out = []
  for a in blocks:
    x = -a
    inv, pw, s = eye + x, x, 2
    while s < sb:
      pw = _mm(pw, pw, precision=_HI)
      inv = inv + _mm(inv, pw, precision=_HI)
      s *= 2
    out.append(inv)
  return out


INVERSE_DIAGS = ("substitution", "series")


def _block_inverse(a, nb, diag="substitution"):
  """T = (I + A)^-1 as {(i, j): [sb, sb]} for i >= j, from A's sub-blocks {(i, j): [sb, sb]}
  (strictly lower on the diagonal): the diagonal blocks by forward substitution
  (diag="substitution": a row at a time, cross-thread sums) or by the power series
  (diag="series": six [sb, sb] dots), then T_ij = -T_ii sum_{j <= m < i} A_im T_mj, float32
  IEEE dots."""
  inv = _inv_unit_lower if diag == "substitution" else _inv_unit_lower_series
  t = {(i, i): ti for i, ti in enumerate(inv([a[i, i] for i in range(nb)]))}
  for i in range(nb):
    for j in range(i - 1, -1, -1):
      acc = _mm(a[i, j], t[j, j], precision=_HI)
      for mm_ in range(j + 1, i):
        acc = acc + _mm(a[i, mm_], t[mm_, j], precision=_HI)
      t[i, j] = -_mm(t[i, i], acc, precision=_HI)
  return t


def _wy_mm(wy_dt):
  """T x (scaled K or V): float32 operands (TF32 on GPU) for wy_dt None, else wy_dt operands;
  float32 accumulation either way."""
  return (lambda x, y: _mm(x, y)) if wy_dt is None else (lambda x, y: _dot(x, y, _DN, wy_dt))


def _wy_blocks(t, k, v_ref, beta, g, rows, w_ref, uv_ref, wy_dt):
  """W = T diag(beta gamma) K and Uv = T diag(beta) V by 16-row blocks from T's sub-blocks
  {(i, j)}: W_i = sum_{j <= i} T_ij Kb_j. k: the chunk's [sb, Dk] row blocks of K (tiles or
  refs' loads); wy_dt as _wy_mm's."""
  mm = _wy_mm(wy_dt)
  for i in range(len(rows)):
    w = uv = None
    for j in range(i + 1):
      kb = k[j].astype(F32) * (beta[j] * jnp.exp(g[j]))[:, None]
      vb = v_ref[rows[j], :].astype(F32) * beta[j][:, None]
      w = mm(t[i, j], kb) if w is None else w + mm(t[i, j], kb)
      uv = mm(t[i, j], vb) if uv is None else uv + mm(t[i, j], vb)
    w_ref[rows[i], :] = w.astype(w_ref.dtype)
    uv_ref[rows[i], :] = uv.astype(uv_ref.dtype)


def _store_blocks(t_ref, t, rows):
  """A lower block-triangular {(i, j): [sb, sb]} written whole (zeros above the diagonal)."""
  nb, sb = len(rows), t[0, 0].shape[0]
  for i in range(nb):
    for j in range(nb):
      t_ref[rows[i], rows[j]] = t[i, j] if j <= i else jnp.zeros((sb, sb), F32)


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
  _wy_blocks(t, k, v_ref, beta, g, rows, w_ref, uv_ref, None)
  if t_out:          # T = (I + A)^-1 for the backward
    _store_blocks(t_out[0], t, rows)
  gf = _cum_full(la)
  gc = jnp.sum(la)
  q = q_ref[...]
  kf = k_ref[...]
  p_ref[...] = (_decay_block(gf, gf, True) * _dot(q, kf, _DN_T, dot_dtype)).astype(p_ref.dtype)
  qg_ref[...] = (q.astype(F32) * jnp.exp(gf)[:, None]).astype(qg_ref.dtype)
  kd_ref[...] = (kf.astype(F32) * jnp.exp(gc - gf)[:, None]).astype(kd_ref.dtype)
  ge_ref[...] = jnp.zeros((c,), F32) + jnp.exp(gc)


def _a_tile(k, beta, m, dot_dtype):
  """A = strictly-lower(diag(beta) (M o K K^T)) [C, C] float32 from the chunk's k [C, Dk]."""
  c = k.shape[0]
  return jnp.where(_iota((c, c), 1) < _iota((c, c), 0),
                   beta[:, None] * m * _dot(k, k, _DN_T, dot_dtype), 0.0)


def _prep_a_kernel(q_ref, k_ref, la_ref, b_ref, a_ref, p_ref, qg_ref, kd_ref, ge_ref, *,
                   dot_dtype):
  """Split prep, kernel 1 of 3, on full [C, C] / [C, D] tiles: A = strictly-lower(diag(beta)
  (M o K K^T)) in float32 for the inverse kernel, and P, Qg, Kd, ge as the fused prep writes them."""
  c = q_ref.shape[0]
  g = _cum_full(la_ref[...].astype(F32))
  a_ref[...] = _a_tile(k_ref[...], b_ref[...].astype(F32), _decay_block(g, g, True), dot_dtype)
  p, qg, kd, ge = _chunk_from_qk(q_ref, k_ref, la_ref, slice(None), dot_dtype)
  p_ref[...], qg_ref[...], kd_ref[...] = p, qg, kd
  ge_ref[...] = jnp.zeros((c,), F32) + ge


def _read_blocks(a_ref, sb):
  """The row slices of a [C, C] ref's sb-row blocks and its lower sub-blocks {(i, j)}."""
  nb = a_ref.shape[0] // sb
  rows = [pl.ds(i * sb, sb) for i in range(nb)]
  return rows, {(i, j): a_ref[rows[i], rows[j]] for i in range(nb) for j in range(i + 1)}


def _prep_a_only_kernel(k_ref, la_ref, b_ref, a_ref, *, dot_dtype):
  """The lean forward's prep kernel 1: only A (the recurrence kernel makes P, Qg, Kd)."""
  g = _cum_full(la_ref[...].astype(F32))
  a_ref[...] = _a_tile(k_ref[...], b_ref[...].astype(F32), _decay_block(g, g, True), dot_dtype)


def _prep_inv_kernel(a_ref, t_ref, *, sb, diag):
  """Split prep, kernel 2 of 3: T = (I + A)^-1 from A's [sb, sb] sub-blocks, read from memory
  (_block_inverse), written whole (zeros above the diagonal blocks)."""
  rows, a = _read_blocks(a_ref, sb)
  _store_blocks(t_ref, _block_inverse(a, len(rows), diag), rows)


def _prep_inv_wy_kernel(a_ref, k_ref, v_ref, la_ref, b_ref, w_ref, uv_ref, *t_out, sb, diag,
                        wy_dt):
  """prep_fwd="split2", kernel 2 of 2: the inverse kernel's T = (I + A)^-1 kept in registers
  as sub-blocks, then W and Uv from them by 16-row blocks (_wy_blocks): T goes through memory
  only when the backward needs it (t_out)."""
  rows, a = _read_blocks(a_ref, sb)
  nb = len(rows)
  t = _block_inverse(a, nb, diag)
  g = _cum_blocks(la_ref[...].astype(F32), nb, sb)
  beta = [b_ref[rows[i]].astype(F32) for i in range(nb)]
  _wy_blocks(t, [k_ref[rows[i], :] for i in range(nb)], v_ref, beta, g, rows, w_ref, uv_ref,
             wy_dt)
  if t_out:
    _store_blocks(t_out[0], t, rows)


def _prep_wy_kernel(k_ref, v_ref, la_ref, b_ref, t_ref, w_ref, uv_ref, *, wy_dt):
  """Split prep, kernel 3 of 3: W = T diag(beta gamma) K and Uv = T diag(beta) V as two
  [C, C] x [C, D] dots (wy_dt None: float32 operands, TF32 on GPU, as the fused prep's; else
  T and the scaled K / V in that dtype, float32 accumulation)."""
  la, beta = la_ref[...].astype(F32), b_ref[...].astype(F32)
  t = t_ref[...]
  kb = k_ref[...].astype(F32) * (beta * jnp.exp(_cum_full(la)))[:, None]
  vb = v_ref[...].astype(F32) * beta[:, None]
  mm = _wy_mm(wy_dt)
  w_ref[...] = mm(t, kb).astype(w_ref.dtype)
  uv_ref[...] = mm(t, vb).astype(uv_ref.dtype)


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
  if opts.prep_fwd in ("split", "split2"):
    return _prep_split_call(q, k, v, la, beta, opts, with_t)
  c, dk, dv, dt, seq, vec, chunk, cvec, shp, call = _prep_forward_parts(q, v, opts)
  return call(functools.partial(_prep_fwd_kernel, sb=min(_SB, c), dot_dtype=dt), "gdr_prep_fwd",
              in_specs=[seq(dk), seq(dk), seq(dv), vec, vec],
              out_specs=[chunk(dk), chunk(dv), chunk(c), chunk(dk), chunk(dk), cvec] + (
                  [chunk(c)] if with_t else []),
              out_shape=[shp(dk), shp(dv), shp(c), shp(dk), shp(dk), shp(None, F32)] + (
                  [shp(c, F32)] if with_t else []))(q, k, v, la, beta)


def _prep_forward_parts(q, v, opts):
  """What every prep-forward kernel call shares: chunk, Dk, Dv, the dot dtype, the block specs,
  shp(d, dtype) (an output [B, H, N, C, d], or [B, H, N, C] for d=None) and
  call(kernel, name, warps=num_warps_prep, **pallas_call kwargs) over the (B, H, N) grid."""
  bsz, t, h, dk = q.shape
  dv = v.shape[-1]
  c = opts.chunk
  n = t // c
  dt = opts.dot_dtype
  shp = lambda d, dtype=dt: jax.ShapeDtypeStruct((bsz, h, n, c) + ((d,) if d else ()), dtype)
  call = lambda kern, name, warps=opts.num_warps_prep, **kw: pl.pallas_call(
      kern, grid=(bsz, h, n), interpret=opts.interpret, name=name,
      compiler_params=_compiler_params(warps, opts.num_stages, opts.gpu_lowering), **kw)
  return (c, dk, dv, dt, *_prep_specs(c, dk, dv), shp, call)


def _prep_split_call(q, k, v, la, beta, opts, with_t=False, lean=False):
  """The prep's forward as three kernels per (batch, head, chunk), with A and T passed through
  memory (float32 [C, C] each): W, Uv, P, Qg, Kd, gev (and with_t: T). The fused kernel's
  16 x 16 sub-block dots over D hold 255 registers per thread at 8 warps (one program per SM
  on sm_90, ptxas); here every dot over D is one [C, C] or [C, D] tile (123, 128 and 73
  registers). prep_fwd="split2": two kernels, the inverse and W / Uv in one (T stays in
  registers; written only with_t). lean=True (the primal): the first kernel writes only A and
  the call returns (W, Uv) (with_t: and T); the recurrence kernels make the rest from q, k."""
  c, dk, dv, dt, seq, vec, chunk, cvec, shp, call = _prep_forward_parts(q, v, opts)
  if lean:
    a = call(functools.partial(_prep_a_only_kernel, dot_dtype=dt), "gdr_prep_a_only",
             in_specs=[seq(dk), vec, vec], out_specs=chunk(c), out_shape=shp(c, F32)
             )(k, la, beta)
    mid = ()
  else:
    a, *mid = call(
        functools.partial(_prep_a_kernel, dot_dtype=dt), "gdr_prep_a",
        in_specs=[seq(dk), seq(dk), vec, vec],
        out_specs=[chunk(c), chunk(c), chunk(dk), chunk(dk), cvec],
        out_shape=[shp(c, F32), shp(c), shp(dk), shp(dk), shp(None, F32)])(q, k, la, beta)
    mid = tuple(mid)
  sb = min(_SB, c)
  wy_dt = None if opts.wy_dtype == "float32" else dt
  if opts.prep_fwd == "split2":
    out = call(functools.partial(_prep_inv_wy_kernel, sb=sb, diag=opts.inverse_diag,
                                 wy_dt=wy_dt), "gdr_prep_inv_wy",
               opts.num_warps_inv or opts.num_warps_prep,
               in_specs=[chunk(c), seq(dk), seq(dv), vec, vec],
               out_specs=[chunk(dk), chunk(dv)] + ([chunk(c)] if with_t else []),
               out_shape=[shp(dk), shp(dv)] + ([shp(c, F32)] if with_t else [])
               )(a, k, v, la, beta)
    return (out[0], out[1]) + mid + ((out[2],) if with_t else ())
  tinv = call(functools.partial(_prep_inv_kernel, sb=sb, diag=opts.inverse_diag),
              "gdr_prep_inv", opts.num_warps_inv or opts.num_warps_prep,
              in_specs=[chunk(c)], out_specs=chunk(c), out_shape=shp(c, F32))(a)
  w, uv = call(functools.partial(_prep_wy_kernel, wy_dt=wy_dt), "gdr_prep_wy",
               in_specs=[seq(dk), seq(dv), vec, vec, chunk(c)],
               out_specs=[chunk(dk), chunk(dv)], out_shape=[shp(dk), shp(dv)]
               )(k, v, la, beta, tinv)
  return (w, uv) + mid + ((tinv,) if with_t else ())


def _prep_bwd_kernel(q_ref, k_ref, v_ref, la_ref, b_ref, t_ref, dw_ref, duv_ref, dp_ref,
                     dqg_ref, dkd_ref, dge_ref, *refs, bk, dot_dtype, with_p=False):
  """Cotangents of W, Uv, P, Qg, Kd, ge -> of q, k, v, log_alpha, beta for one chunk, with the
  forward's T = (I + A)^-1 (Kb = diag(beta gamma) K, Vb = diag(beta) V, W = T Kb, Uv = T Vb).
  Every [C, D] operand is taken in column blocks of bk (loops over D), so that only [C, C]
  tiles and [C, bk] slabs are live (registers; no spills at 8 warps per ptxas):
    pass 1: dT = dW Kb^T + dUv Vb^T, K K^T, Q K^T (contractions over D); dv = beta T^T dUv;
    [C, C]: dA = -T^T dT T^T (strict), d(K K^T), dP o M, and their dbeta / dg terms
      (A = diag(beta) (M o K K^T), P = M o Q K^T, M_ts = e^{g_t - g_s}: dg_t += rowsum(dA o A
      + dP o P), dg_s -= colsum(...));
    pass 2: dq, dk per column block (W = T Kb: dKb = T^T dW; Qg, Kd: diagonal scalings), with
      the row sums that feed dbeta and dg; dlog_alpha = reverse cumsum of dg (+ dg_C).
  with_p: refs start with the forward's P (as the recurrence saved it), and dP o P is formed
  from it instead of from Q K^T accumulated in pass 1 (one [C, C] float32 tile fewer live)."""
  p_ref, (dq_ref, dk_ref, dv_ref, dla_ref, db_ref) = (refs[0] if with_p else None), refs[-5:]
  c, dk_total = q_ref.shape
  dv_total = v_ref.shape[1]
  dt = dot_dtype
  f = lambda x: x.astype(F32)
  la, beta, t, row, col, g, gc, gam, kdec, bg, zc, zv = _bwd_chunk_setup(la_ref, b_ref, t_ref, c)

  def pass1_k(j, carry):
    dtt, kk, qk = carry               # qk: None with_p (P is read instead)
    cols = pl.ds(j * bk, bk)
    k_b = k_ref[:, cols]
    kb = f(k_b) * bg[:, None]
    return (dtt + _dot(dw_ref[:, cols], kb, _DN_T, dt), kk + _dot(k_b, k_b, _DN_T, dt),
            None if with_p else qk + _dot(q_ref[:, cols], k_b, _DN_T, dt))
  dtt, kk, qk = jax.lax.fori_loop(0, dk_total // bk, pass1_k,
                                  (zc, zc, None if with_p else zc))

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
  z = f(dp_ref[...]) * f(p_ref[...]) if with_p else dpm * qk        # dP o P
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


def _prep_bwd_call(q, k, v, la, beta, t, dw, duv, dp, dqg, dkd, dge, opts, p=None):
  """dq, dk, dv, dlog_alpha, dbeta; p: the forward's P [B, H, N, C, C] (prep_bwd_p), or None."""
  bsz, tt, h, dk = q.shape
  dv = v.shape[-1]
  c = opts.chunk
  seq, vec, chunk, cvec = _prep_specs(c, dk, dv)
  kern = functools.partial(_prep_bwd_kernel, bk=_block_v(min(dk, dv), opts.block_k_grads,
                                                 "block_k_grads", "min(Dk, Dv)"),
                           dot_dtype=opts.dot_dtype, with_p=p is not None)
  extra = () if p is None else (p,)
  return tuple(pl.pallas_call(
      kern, grid=(bsz, h, tt // c),
      in_specs=[seq(dk), seq(dk), seq(dv), vec, vec, chunk(c),
                chunk(dk), chunk(dv), chunk(c), chunk(dk), chunk(dk), cvec] +
               [chunk(c)] * len(extra),
      out_specs=[seq(dk), seq(dk), seq(dv), vec, vec],
      out_shape=[jax.ShapeDtypeStruct(a.shape, a.dtype) for a in (q, k, v, la, beta)],
      interpret=opts.interpret, name="gdr_prep_bwd",
      compiler_params=_compiler_params(opts.num_warps_prep_bwd, opts.num_stages,
                                       opts.gpu_lowering),
  )(q, k, v, la, beta, t, dw, duv, dp, dqg, dkd, dge, *extra))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _prep_pallas(q, k, v, la, beta, opts):
  """Pallas prep on inputs whose T is a multiple of the chunk -> W, Uv, P, Qg, Kd, gev."""
  return tuple(_prep_fwd_call(q, k, v, la, beta, opts))


def _prep_pallas_fwd(q, k, v, la, beta, opts):
  *out, tinv = _prep_fwd_call(q, k, v, la, beta, opts, with_t=True)
  return tuple(out), (q, k, v, la, beta, remat.keep(tinv))


def _prep_pallas_bwd(opts, res, cts):
  return _prep_bwd_call(*res, *cts, opts)


_prep_pallas.defvjp(_prep_pallas_fwd, _prep_pallas_bwd)


# ----------------------------------------------------------------------------- the whole rule
def _lean(plan) -> bool:
  """Whether the primal can take the lean path (prep writes A, W, Uv only; no states)."""
  return plan.prep_fwd in ("split", "split2") and plan.fwd_o == "fused"


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _pallas_rule(q, k, v, la, beta, s0, plan):
  """The rule with the Pallas prep, on inputs whose T is a multiple of the chunk: o [B, T, H,
  Dv], S_T [BH, Dv, Dk]. Undifferentiated it writes nothing for a backward: the prep gives A,
  then W and Uv, and the recurrence kernel makes P, Qg, Kd from q, k and the decays itself.
  Differentiated (_pallas_rule_fwd): residuals="chunks" runs the prep's and the recurrence's
  forwards with their residuals (W, Uv, P, Qg, Kd, ge, T and the states), and the backward
  theirs in reverse; residuals="qk" keeps only W, Uv, T and the states, and the recurrence's
  kernels, forward and backward, make P, Qg, Kd from q, k and the decays as the primal does."""
  bsz, t, h, _ = q.shape
  flat = lambda a: a.reshape((bsz * h,) + a.shape[2:])
  if _lean(plan):
    w, uv = _prep_split_call(q, k, v, la, beta, plan, lean=True)
    o, _, sn = _fwd_call(flat(w), flat(uv), (q, k, la), s0, plan, with_states=False)
    return o, sn
  w, uv, p, qg, kd, gev = _prep_fwd_call(q, k, v, la, beta, plan)
  o, _, sn = _fwd_call(flat(w), flat(uv), tuple(flat(a) for a in (p, qg, kd, gev)), s0, plan,
                       with_states=False)
  return o, sn


def _pallas_rule_fwd(q, k, v, la, beta, s0, plan):
  bsz, t, h, _ = q.shape
  flat = lambda a: a.reshape((bsz * h,) + a.shape[2:])
  if _lean(plan) and plan.residuals == "qk":
    w, uv, tinv = _prep_split_call(q, k, v, la, beta, plan, with_t=True, lean=True)
    o, hs, sn = _fwd_call(flat(w), flat(uv), (q, k, la), s0, plan)
    # named so that a selective jax.checkpoint (model.remat) keeps them: no kernel runs twice
    return (o, sn), ((q, k, v, la, beta, remat.keep(tinv)),
                     remat.keep((flat(w), flat(uv), hs)))
  chunks, prep_res = _prep_pallas_fwd(q, k, v, la, beta, plan)
  out, rec_res = _recurrence_fwd(*(flat(a) for a in chunks), s0, plan)
  return out, (prep_res, rec_res)


def _pallas_rule_bwd(plan, res, cts):
  prep_res, rec_res = res
  bsz, _, h, _ = prep_res[0].shape
  if _lean(plan) and plan.residuals == "qk":
    q, k, _, la, _, _ = prep_res
    w, uv, hs = rec_res
    do, dsn = cts
    duv, dw, dp, dqg, dkd, dgev, ds0 = _bwd_call_split_pallas(
        w, uv, (q, k, la), hs, do, dsn.astype(F32), plan)
    # in the prep's output order; as _recurrence_bwd, the chunk's dge spread over its C entries
    d_chunks = (dw, duv, dp, dqg, dkd, dgev / plan.chunk)
    p = None
  else:
    *d_chunks, ds0 = _recurrence_bwd(plan, rec_res, cts)
    p = rec_res[2].reshape((bsz, h) + rec_res[2].shape[1:]) if plan.prep_bwd_p else None
  d_chunks = tuple(a.reshape((bsz, h) + a.shape[1:]) for a in d_chunks)
  return tuple(_prep_bwd_call(*prep_res, *d_chunks, plan, p=p)) + (ds0,)


_pallas_rule.defvjp(_pallas_rule_fwd, _pallas_rule_bwd)


# ----------------------------------------------------------------------------- options
PREPS = ("pallas", "xla")
PREP_FWDS = ("fused", "split", "split2")
WY_DTYPES = ("float32", "dot")
RESIDUALS = ("chunks", "qk")
PRECISIONS = ("highest", "default")
FWD_OS = ("fused", "split")


@dataclasses.dataclass(frozen=True)
class DeltaRuleOptions:
  """How the Pallas delta rule runs. Defaults: the fastest setting measured on one H100 at
  B4 x T4096, 32 heads x 128 (session 19: forward 1.00 ms, forward + backward 3.81 ms, queued;
  docs/PERFORMANCE.md, "Session 19"): the prep's forward split with its inverse at 2 warps and
  the power series on the diagonal blocks, W / Uv from bf16 operands, the per-chunk backward
  kernels on 64-column blocks, the gradient kernel at 4 warps.

  chunk: tokens per chunk (a power of two for the kernels; any size for the chunked
  reference). prep: "pallas" (one Pallas program per (batch,
  head, chunk); chunk, Dk, Dv >= 16; num_warps_prep / num_warps_prep_bwd warps for its forward /
  backward kernels; prep_fwd: its forward as one kernel, "fused", as three, "split": A,
  (I + A)^-1 and W / Uv, with A and the inverse passed through memory, or as two, "split2":
  A, then the inverse and W / Uv in one kernel (T written only for the backward);
  num_warps_inv: the inverse kernel's warps, 0 = num_warps_prep; inverse_diag: the inverse's
  16 x 16 diagonal blocks by forward substitution or by the power series ("substitution" |
  "series"); wy_dtype: the operands of W = T Kb and Uv = T Vb, "float32" (TF32 on GPU) or
  "dot" (dot_dtype, bf16 for bf16 inputs, as FLA's recompute_w_u); residuals: what the
  differentiated forward keeps for the backward with the split prep and fused outputs:
  "chunks" (the prep's W, Uv, P, Qg, Kd, ge, its T and the states) or "qk" (W, Uv, T and the
  states; the recurrence's kernels make P, Qg, Kd from q, k and the decays, forward and
  backward); prep_bwd_p (residuals "chunks"): the prep's backward reads the saved P for the
  decay gradient's dP o P instead of rebuilding Q K^T) or "xla" (the chunk quantities in plain JAX,
  float32, differentiated by autodiff; inverse_precision: the matmul precision of its
  (I + A)^-1, "highest" | "default").
  block_v / num_warps: Dv rows of the state per program of the forward recurrence kernel;
  fwd_o: the outputs inside that sequential kernel ("fused": four dots per chunk) or, as FLA
  does, from the saved states by a second kernel parallel over chunks ("split": the sequential
  kernel keeps two dots per chunk; with bf16 saved states the outputs see the rounded states);
  block_v_bwd / num_warps_bwd: the same for the reverse dS kernel; block_k_grads: the column
  block (over Dk, and Dv in the prep's backward) the per-chunk backward kernels loop over,
  num_warps_grads warps for the per-chunk gradient kernel. num_stages: Triton pipeline stages.
  state_dtype: the per-chunk states saved for the backward and the dS passed on ("auto" |
  "float32" | "bfloat16"; bf16 halves their memory and traffic; "auto": bfloat16 for bfloat16
  values, else float32, which is FLA's choice: its chunk_gated_delta_rule saves h and dh in the
  inputs' dtype, so the reference model's backward sees bf16-rounded states too).
  dot_dtype: matmul operand dtype (None: float32 for float32 inputs, else bfloat16).
  interpret: None runs natively on GPU and in the Pallas interpreter elsewhere.
  gpu_lowering=True builds every kernel for the GPU (no interpreter, Triton compiler parameters
  on any host) so that ops.pallas.lower_for_gpu can lower it on CPU.
  """
  chunk: int = 64
  prep: str = "pallas"
  prep_fwd: str = "split"
  fwd_o: str = "fused"
  block_v: int = 64
  block_v_bwd: int = 32
  num_warps: int = 4
  num_warps_bwd: int = 4
  num_stages: int = 2
  num_warps_prep: int = 8
  num_warps_inv: int = 2
  num_warps_prep_bwd: int = 4
  block_k_grads: int = 64
  num_warps_grads: int = 4
  state_dtype: str = "auto"
  inverse_diag: str = "series"
  wy_dtype: str = "dot"
  residuals: str = "chunks"
  prep_bwd_p: bool = False
  inverse_precision: str = "highest"
  dot_dtype: str | None = None
  interpret: bool | None = None
  gpu_lowering: bool = False

  def __post_init__(self):
    if not isinstance(self.chunk, int) or self.chunk < 1:
      raise ValueError(f"delta rule: chunk={self.chunk!r} must be a positive integer.")
    for name in ("block_v", "block_v_bwd", "block_k_grads"):
      val = getattr(self, name)
      if not isinstance(val, int) or val < 1 or val & (val - 1):
        raise ValueError(f"delta rule kernel: {name}={val!r} must be a power of two.")
    if not isinstance(self.num_warps_inv, int) or self.num_warps_inv < 0:
      raise ValueError(f"delta rule kernel: num_warps_inv={self.num_warps_inv!r} must be a "
                       f"non-negative integer (0: num_warps_prep).")
    for name in ("num_warps", "num_warps_bwd", "num_stages", "num_warps_prep",
                 "num_warps_prep_bwd", "num_warps_grads"):
      val = getattr(self, name)
      if not isinstance(val, int) or val < 1:
        raise ValueError(f"delta rule kernel: {name}={val!r} must be a positive integer.")
    if not isinstance(self.prep_bwd_p, bool):
      raise ValueError(f"delta rule kernel: prep_bwd_p={self.prep_bwd_p!r} must be True or "
                       f"False.")
    if self.prep not in PREPS:
      raise ValueError(f"delta rule kernel: prep={self.prep!r} must be 'pallas' or 'xla'.")
    for name, allowed in (("prep_fwd", PREP_FWDS), ("inverse_diag", INVERSE_DIAGS),
                          ("wy_dtype", WY_DTYPES), ("residuals", RESIDUALS)):
      if getattr(self, name) not in allowed:
        raise ValueError(f"delta rule kernel: {name}={getattr(self, name)!r} must be one of "
                         f"{list(allowed)}.")
    if self.fwd_o not in FWD_OS:
      raise ValueError(f"delta rule kernel: fwd_o={self.fwd_o!r} must be 'fused' or 'split'.")
    if self.inverse_precision not in PRECISIONS:
      raise ValueError(f"delta rule kernel: inverse_precision={self.inverse_precision!r} must "
                       f"be 'highest' or 'default'.")
    for name in ("state_dtype", "dot_dtype"):
      val = getattr(self, name)
      if val is None or (name == "state_dtype" and val == "auto"):
        continue
      if str(jnp.dtype(val)) not in ("float32", "bfloat16"):
        extra = ", 'auto'" if name == "state_dtype" else ""
        raise ValueError(f"delta rule kernel: {name}={val!r} must be 'float32' or "
                         f"'bfloat16'{extra}.")


@dataclasses.dataclass(frozen=True)
class _Plan:
  """DeltaRuleOptions resolved for one call (hashable: the custom_vjps' static argument)."""
  options: DeltaRuleOptions
  chunk: int
  heads: int
  out_dtype: jnp.dtype
  dot_dtype: jnp.dtype
  state_dtype: jnp.dtype
  interpret: bool

  def __getattr__(self, name):       # the options' fields, read through the plan
    if name.startswith("_") or name == "options":
      raise AttributeError(name)
    return getattr(self.options, name)


def chunk_gated_delta_rule(q, k, v, log_alpha, beta, initial_state=None,
                           options: DeltaRuleOptions = DeltaRuleOptions()):
  """Gated delta rule, chunked, with the recurrence over chunks in Pallas kernels.

  Same arguments and results as reference.chunk_gated_delta_rule, the chunk size and every
  other choice in `options`. Head dims must be powers of two.
  """
  check_shapes(q, k, v, log_alpha, beta, initial_state)
  o_ = options
  bsz, t, h, dk = q.shape
  dv = v.shape[-1]
  c = o_.chunk
  for name, val in (("chunk", c), ("Dk", dk), ("Dv", dv)):
    if val < 1 or val & (val - 1):
      raise ValueError(f"delta rule kernel: {name}={val} must be a power of two.")
  if o_.prep == "pallas" and (c < _SB or dk < 16 or dv < 16):
    raise ValueError(f"delta rule kernel: prep='pallas' needs chunk, Dk and Dv >= 16 "
                     f"(got {c}, {dk}, {dv}).")
  interpret = False if o_.gpu_lowering else ((not on_gpu()) if o_.interpret is None
                                             else bool(o_.interpret))
  dot_dtype = jnp.dtype(o_.dot_dtype if o_.dot_dtype is not None else
                        (F32 if jnp.dtype(v.dtype) == jnp.dtype(F32) else jnp.bfloat16))
  state_dtype = jnp.dtype(o_.state_dtype if o_.state_dtype != "auto" else
                          (jnp.bfloat16 if jnp.dtype(v.dtype) == jnp.dtype(jnp.bfloat16) else F32))
  plan = _Plan(o_, c, int(h), jnp.dtype(v.dtype), dot_dtype, state_dtype, bool(interpret))
  s0 = state0(initial_state, q, v).reshape(bsz * h, dv, dk)
  flat = lambda a: a.reshape((bsz * h,) + a.shape[2:])
  if o_.prep == "pallas":
    n = -(-t // c)
    pad = n * c - t
    if pad:   # beta = 0, log_alpha = 0 on the tail: the state passes through unchanged
      padt = lambda a: jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2))
      q, k, v, log_alpha, beta = (padt(a) for a in (q, k, v, log_alpha, beta))
    o, sn = _pallas_rule(q, k, v, log_alpha.astype(F32), beta.astype(F32), s0, plan)
  else:
    w, uv, p, qg, kd, ge = _prep(q, k, v, log_alpha, beta, c,
                                 precision=getattr(jax.lax.Precision, o_.inverse_precision.upper()))
    w, uv, p, qg, kd = (a.astype(dot_dtype) for a in (w, uv, p, qg, kd))
    gev = jnp.broadcast_to(ge[..., None], ge.shape + (c,))
    o, sn = _recurrence(flat(w), flat(uv), flat(p), flat(qg), flat(kd), flat(gev), s0, plan)
  o = remat.keep(o)    # else a selective jax.checkpoint recomputes o by running both kernels again
  return o[:, :t], sn.reshape(bsz, h, dv, dk)
