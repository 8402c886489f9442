"""Chunked gated delta rule with the sequential part as Pallas kernels (forward and backward).

Same contract as lightning_jax.layers.deltanet.chunk_gated_delta_rule (the reference):
  o [B, T, H, Dv] in v's dtype, S_T [B, H, Dv, Dk] float32.

Split of the work (the math is the reference's, see layers/deltanet.py's docstring):
  * prep (plain JAX, all chunks at once, float32, differentiated by autodiff): the local cumulative
    log decay g, the unit-lower-triangular solve giving W = (I+A)^-1 diag(beta gamma) K and
    Uv = (I+A)^-1 diag(beta) V, the intra-chunk attention P = M o Q K^T, Qg = diag(gamma) Q,
    Kd = diag(e^{g_C - g}) K and the chunk decay ge = e^{g_C};
  * the recurrence over chunks, one Pallas program per (batch x head, block of Dv rows of the
    state), the state block [BV, Dk] held in registers across a loop over the chunks:
        U_n = Uv_n - W_n S_n^T ;  O_n = Qg_n S_n^T + P_n U_n ;  S_{n+1} = ge_n S_n + U_n^T Kd_n
    (rows of the state over Dv are independent, which is what makes the Dv split exact). The
    forward kernel also writes the state at each chunk start (float32) for the backward;
  * the backward kernel runs the same loop in reverse with dS [BV, Dk] in registers:
        dS_{n+1} -> dU += Kd dS^T, dKd = U dS, dge = <S_n, dS>, dS_n = ge dS
        dO       -> dQg = dO S_n, dS_n += dO^T Qg, dP = dO U^T, dU += P^T dO
        U        -> dUv = dU, dW = -dU S_n, dS_n -= dU^T W
    dW, dQg, dKd, dP and dge contract over Dv, so each Dv block writes a partial that is summed
    outside (nothing to sum when BV = Dv).
The two kernels are tied together by jax.custom_vjp; the prep and the final gathers are plain JAX.

Backends: on GPU the kernels lower through Pallas' Triton backend; elsewhere (CPU) they run with
`interpret=True` (slow; for tests) — `impl_note()` says which. Matmul operands inside the kernels
are cast to `dot_dtype` (float32 for float32 inputs, else bfloat16) with float32 accumulation; the
state and every carried quantity stay float32.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

F32 = jnp.float32
_DN_T = (((1,), (1,)), ((), ()))     # a @ b.T
_DN_TA = (((0,), (0,)), ((), ()))    # a.T @ b
_DN = (((1,), (0,)), ((), ()))       # a @ b


def on_gpu() -> bool:
  return jax.default_backend() == "gpu"


def impl_note() -> str:
  return ("Pallas Triton kernels on GPU" if on_gpu() else
          f"Pallas interpreter on {jax.default_backend()} (no GPU: correct but slow)")


def _dot(a, b, dn, dt):
  return jax.lax.dot_general(a.astype(dt), b.astype(dt), dn, preferred_element_type=F32)


def _compiler_params(num_warps, num_stages):
  if not on_gpu():
    return None
  from jax.experimental.pallas import triton as plt
  return plt.CompilerParams(num_warps=num_warps, num_stages=num_stages)


# ----------------------------------------------------------------------------- kernels
def _fwd_kernel(w_ref, uv_ref, p_ref, qg_ref, kd_ref, ge_ref, s0_ref,
                o_ref, hs_ref, sn_ref, *, n_chunks, dot_dtype):
  def body(i, s):
    hs_ref[i] = s
    u = uv_ref[i].astype(F32) - _dot(w_ref[i], s, _DN_T, dot_dtype)            # [C, BV]
    o = _dot(qg_ref[i], s, _DN_T, dot_dtype) + _dot(p_ref[i], u, _DN, dot_dtype)
    o_ref[i] = o.astype(o_ref.dtype)
    ge = jnp.max(ge_ref[i].astype(F32))                                         # all equal
    return ge * s + _dot(u, kd_ref[i], _DN_TA, dot_dtype)                       # [BV, Dk]
  s = jax.lax.fori_loop(0, n_chunks, body, s0_ref[...].astype(F32))
  sn_ref[...] = s


def _bwd_kernel(w_ref, uv_ref, p_ref, qg_ref, kd_ref, ge_ref, hs_ref, do_ref, dsn_ref,
                duv_ref, dw_ref, dp_ref, dqg_ref, dkd_ref, dge_ref, ds0_ref, *, n_chunks,
                dot_dtype):
  def body(j, ds):
    i = n_chunks - 1 - j
    s = hs_ref[i]                                                               # [BV, Dk]
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
  """Only the sequential part of the backward: dS entering each chunk from the right."""
  def body(j, ds):
    i = n_chunks - 1 - j
    dss_ref[i] = ds                                                             # dS_{i+1}
    do = do_ref[i].astype(F32)
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


def _block_v(dv, want):
  bv = min(int(want), dv)
  if dv % bv or bv & (bv - 1):
    raise ValueError(f"delta rule kernel: block_v={want} must be a power of two dividing "
                     f"Dv={dv}.")
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
      out_specs=[sp["blk_v"], sp["states"], sp["state"]],
      out_shape=[jax.ShapeDtypeStruct((bh, n, c, dv), F32),
                 jax.ShapeDtypeStruct((bh, n, dv, dk), F32),
                 jax.ShapeDtypeStruct((bh, dv, dk), F32)],
      interpret=opts["interpret"], name="gdr_chunk_fwd",
      compiler_params=_compiler_params(opts["num_warps"], opts["num_stages"]),
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
      compiler_params=_compiler_params(opts["num_warps_bwd"], opts["num_stages"]),
  )(w, uv, p, qg, kd, gev, hs, do, dsn)
  duv, dw, dp, dqg, dkd, dge, ds0 = outs
  return duv, dw.sum(1), dp.sum(1), dqg.sum(1), dkd.sum(1), dge.sum(1), ds0


def _bwd_call_split(w, uv, p, qg, kd, gev, hs, do, dsn, opts):
  """Backward as a sequential dS kernel + every other gradient as batched einsums over chunks."""
  bh, n, c, dk = w.shape
  dv = uv.shape[-1]
  bv = _block_v(dv, opts["block_v_bwd"])
  sp = _specs(n, c, dk, bv, True)
  kern = functools.partial(_bwd_states_kernel, n_chunks=n, dot_dtype=opts["dot_dtype"])
  dss, ds0 = pl.pallas_call(
      kern, grid=(bh, dv // bv),
      in_specs=[sp["full_k"], sp["full_c"], sp["full_k"], sp["full_k"], sp["vec"], sp["blk_v"],
                sp["state"]],
      out_specs=[sp["states"], sp["state"]],
      out_shape=[jax.ShapeDtypeStruct((bh, n, dv, dk), F32),
                 jax.ShapeDtypeStruct((bh, dv, dk), F32)],
      interpret=opts["interpret"], name="gdr_chunk_bwd_states",
      compiler_params=_compiler_params(opts["num_warps_bwd"], opts["num_stages"]),
  )(w, p, qg, kd, gev, do, dsn)
  f = lambda a: a.astype(F32)
  w, uv, p, qg, kd = f(w), f(uv), f(p), f(qg), f(kd)
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
  call = _bwd_call_split if opts["bwd"] == "split" else _bwd_call
  duv, dw, dp, dqg, dkd, dge, ds0 = call(w, uv, p, qg, kd, gev, hs, do.astype(F32),
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


def chunk_gated_delta_rule(q, k, v, log_alpha, beta, chunk_size: int = 64, initial_state=None,
                           *, block_v: int = 64, block_v_bwd: int = 128, num_warps: int = 4,
                           num_warps_bwd: int = 8, num_stages: int = 1, dot_dtype=None,
                           bwd: str = "fused", inverse_precision: str = "highest",
                           interpret: bool | None = None):
  """Gated delta rule, chunked, with the recurrence over chunks in Pallas kernels.

  Same arguments and results as layers.deltanet.chunk_gated_delta_rule. chunk_size must be a
  power of two (Triton tensor sizes); head dims must be powers of two. interpret=None runs the
  kernels natively on GPU and in the Pallas interpreter elsewhere. bwd: "fused" (one reverse
  kernel computes every gradient) or "split" (a reverse kernel for dS only, the rest as batched
  einsums over all chunks). inverse_precision: matmul precision of the (I + A)^-1 build
  ("highest" | "default"). Defaults: the fastest setting measured on one H100 at B4 T4096,
  32 x 128 (docs/PERFORMANCE.md, "Kernels"); "split" and "default" were not measured on GPU.
  """
  if bwd not in ("fused", "split"):
    raise ValueError(f"delta rule kernel: bwd={bwd!r} must be 'fused' or 'split'.")
  if inverse_precision not in ("highest", "default"):
    raise ValueError(f"delta rule kernel: inverse_precision={inverse_precision!r} must be "
                     f"'highest' or 'default'.")
  from lightning_jax.layers.deltanet import _check_rule_shapes, _state0
  _check_rule_shapes(q, k, v, log_alpha, beta, initial_state)
  bsz, t, h, dk = q.shape
  dv = v.shape[-1]
  c = int(chunk_size)
  for name, val in (("chunk_size", c), ("Dk", dk), ("Dv", dv)):
    if val < 1 or val & (val - 1):
      raise ValueError(f"delta rule kernel: {name}={val} must be a power of two.")
  if interpret is None:
    interpret = not on_gpu()
  if dot_dtype is None:
    dot_dtype = F32 if jnp.dtype(v.dtype) == jnp.dtype(F32) else jnp.bfloat16
  s0 = _state0(initial_state, q, v).reshape(bsz * h, dv, dk)
  w, uv, p, qg, kd, ge = _prep(q, k, v, log_alpha, beta, c,
                               precision=getattr(jax.lax.Precision, inverse_precision.upper()))
  n = w.shape[2]
  cast = lambda a: a.astype(dot_dtype)
  flat = lambda a: a.reshape((bsz * h,) + a.shape[2:])
  gev = jnp.broadcast_to(ge[..., None], ge.shape + (c,))
  opts = (("block_v", int(block_v)), ("block_v_bwd", int(block_v_bwd)),
          ("num_warps", int(num_warps)), ("num_warps_bwd", int(num_warps_bwd)),
          ("num_stages", int(num_stages)), ("dot_dtype", jnp.dtype(dot_dtype)),
          ("interpret", bool(interpret)), ("bwd", bwd))
  o, sn = _recurrence(cast(flat(w)), cast(flat(uv)), cast(flat(p)), cast(flat(qg)),
                      cast(flat(kd)), flat(gev), s0, opts)
  o = o.reshape(bsz, h, n * c, dv)[:, :, :t]
  o = jnp.moveaxis(o, 1, 2).astype(v.dtype)
  return o, sn.reshape(bsz, h, dv, dk)


# ----------------------------------------------------------------------------- config selection
_FALLBACK_LOGGED = set()


def select_and_run(cfg, q, k, v, log_alpha, beta):
  """model.deltanet.impl == "kernel": the Pallas kernels on GPU; elsewhere the chunked reference.

  Off GPU the fallback is logged once per backend (logging.WARNING, logger
  "lightning_jax.kernels"); a chunk size the kernels cannot take is a ConfigError.
  """
  import logging
  from lightning_jax.config import ConfigError
  from lightning_jax.layers import deltanet
  c = int(cfg.model.deltanet.chunk_size)
  if c < 1 or c & (c - 1):
    raise ConfigError(f"model.deltanet.chunk_size={c} must be a power of two with "
                      f"model.deltanet.impl='kernel' (Triton tensor sizes).")
  if not on_gpu() and not _FORCE_INTERPRET:
    be = jax.default_backend()
    if be not in _FALLBACK_LOGGED:
      _FALLBACK_LOGGED.add(be)
      logging.getLogger("lightning_jax.kernels").warning(
          "model.deltanet.impl='kernel': no GPU (backend %s), running the pure-JAX chunked "
          "delta rule instead (the kernels run off GPU only in tests, through the Pallas "
          "interpreter).", be)
    return deltanet.chunk_gated_delta_rule(q, k, v, log_alpha, beta, chunk_size=c)
  rule = functools.partial(chunk_gated_delta_rule, chunk_size=c,
                           interpret=True if _FORCE_INTERPRET else None)
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
