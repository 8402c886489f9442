"""Hyper-connection streams (mHC, SPEC §2.5).

The residual state is S parallel streams x [B, T, S, d]. Around every sublayer:
  x~     = RMSNorm(flatten(x))                        over S*d, learnable scale (init 1)
  H_pre  = sigmoid(a_pre * phi_pre(x~) + b_pre)        [S]
  H_post = 2 * sigmoid(a_post * phi_post(x~) + b_post) [S]
  H_res  = Sinkhorn(a_res * phi_res(x~) + b_res)       [S, S], doubly stochastic
  u      = RMSNorm(sum_s H_pre[s] x_s)                 the sublayer's input (own scale)
  y      = sublayer(u)
  x'_s   = sum_t H_res[s, t] x_t + H_post[s] * y
phi_*: S*d -> S / S / S*S without bias, init N(0, 0.02); a_* scalars init 0.1; b_* init 0.

Sinkhorn follows the reference: subtract the row max (stability; Sinkhorn's result does not
change under row scaling), exponentiate, then `iters` rounds of (rows /= row sum + eps;
columns /= column sum + eps). The last step normalises columns, so column sums are 1 up to eps
and row sums converge geometrically (20 rounds on 4x4 leave them within 1e-6 for the logits the
model produces; tested to 1e-5).

Coefficients and Sinkhorn run in float32; the stream mixing runs in the compute dtype with
float32 accumulation.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from lightning_jax import nn, remat
from lightning_jax.config import compat
from lightning_jax.layers.norms import rms_norm
from lightning_jax.ops.sinkhorn.api import sinkhorn
from lightning_jax.ops.stream_grad import api as stream_grad

PHI_STD = 0.02
A_INIT = 0.1


def hc_specs(cfg) -> dict:
  s, d = cfg.model.hc.n_streams, cfg.model.d_model
  return {
      "norm": {"scale": nn.Spec((s * d,), (None,), nn.ones)},
      "phi_pre": nn.Spec((s * d, s), (None, None), nn.normal(PHI_STD)),
      "phi_post": nn.Spec((s * d, s), (None, None), nn.normal(PHI_STD)),
      "phi_res": nn.Spec((s * d, s * s), (None, None), nn.normal(PHI_STD)),
      "a_pre": nn.Spec((), (), nn.constant(A_INIT)),
      "a_post": nn.Spec((), (), nn.constant(A_INIT)),
      "a_res": nn.Spec((), (), nn.constant(A_INIT)),
      "b_pre": nn.Spec((s,), (None,), nn.zeros),
      "b_post": nn.Spec((s,), (None,), nn.zeros),
      "b_res": nn.Spec((s, s), (None, None), nn.zeros),
      "in_norm": {"scale": nn.Spec((d,), ("embed",), nn.ones)},
  }


def _phi(p: dict, dtype):
  """The three projections side by side [S*d, S + S + S*S] in `dtype`."""
  return jnp.concatenate([p["phi_pre"], p["phi_post"], p["phi_res"]], axis=1).astype(dtype)


def _h_pre(p: dict, raw, s: int):
  """H_pre [B, T, S] float32 from the projections raw."""
  return jax.nn.sigmoid(p["a_pre"] * raw[..., :s] + p["b_pre"])


def _from_raw(p: dict, raw, s: int, cfg):
  """(H_pre, H_post, H_res) float32 from the projections raw [B, T, S + S + S*S] float32."""
  post = raw[..., s:2 * s]
  res = raw[..., 2 * s:].reshape(raw.shape[:-1] + (s, s))
  h_pre = _h_pre(p, raw, s)
  h_post = 2.0 * jax.nn.sigmoid(p["a_post"] * post + p["b_post"])
  h_res = sinkhorn(p["a_res"] * res + p["b_res"], cfg.model.hc.sinkhorn_iters,
                   cfg.model.hc.sinkhorn_eps, impl=cfg.model.hc.sinkhorn_impl,
                   unroll=cfg.model.hc.sinkhorn_unroll)
  return h_pre, h_post, h_res


def _raw(p: dict, x, cfg):
  """The normalised state's projections [B, T, S + S + S*S] float32.

  RMSNorm(x) W = r (x (g W)) with r = 1 / rms(x) per token and g the norm's scale, so the
  projections read the bf16 state itself: the norm's scale is folded into the [S*d, n] weights
  and r scales the n outputs. Written as the norm followed by the projection, XLA kept a float32
  copy of the normalised [B, T, S*d] state and a bf16 one for the GEMM (about 1 GB written and
  read again per sublayer at B1 x T4096 on stage_2b, compiled for an H100). The two forms are the
  same function; in float32 they agree to rounding, and in bf16 the GEMM's rounded operand is g W
  instead of x r g. model.compat=reference_cuda keeps the norm-then-projection form, whose
  roundings are the reference's.
  """
  b, t, s, d = x.shape
  x2 = x.reshape(b, t, s * d)
  eps = cfg.model.norm_eps
  if compat(cfg) == "reference_cuda":
    xf = rms_norm(x2, p["norm"]["scale"], eps)
    return jnp.einsum("btk,kn->btn", xf, _phi(p, x.dtype), preferred_element_type=jnp.float32)
  xf = x2.astype(jnp.float32)
  r = jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + eps)    # [B, T, 1]
  return r * jnp.einsum("btk,kn->btn", x2, _gw(p, x.dtype), preferred_element_type=jnp.float32)


def _gw(p: dict, dtype):
  """The projections [S*d, n] with the norm's scale folded in, in `dtype` (see _raw)."""
  return (p["norm"]["scale"].astype(jnp.float32)[:, None] * _phi(p, jnp.float32)).astype(dtype)


def coefficients(p: dict, x, cfg):
  """x [B, T, S, d] -> H_pre [B, T, S], H_post [B, T, S], H_res [B, T, S, S] (float32)."""
  out = _from_raw(p, _raw(p, x, cfg), x.shape[2], cfg)
  return remat.keep(out)     # small; Sinkhorn is not run again (model.remat)


def pre(p: dict, x, cfg):
  """Coefficients and the sublayer input RMSNorm(sum_s H_pre[s] x_s) [B, T, d].

  model.hc.pre: "autodiff" (the default) under JAX's autodiff, the read-in as an einsum;
  "fused" the same forward with a written-out backward (`_pre_fused`). "kernel" pairs pre with
  post (`apply`); pre alone then runs the autodiff form, whose forward is the same."""
  impl = cfg.model.hc.pre
  if impl == "fused":
    u, h_post, h_res = _pre_fused(p, x, cfg)
    return u, remat.keep((h_post, h_res))
  if impl not in ("autodiff", "kernel"):
    raise ValueError(f"model.hc.pre={impl!r} is not a stream read-in; expected autodiff, "
                     f"fused or kernel.")
  h_pre, h_post, h_res = coefficients(p, x, cfg)
  u = jnp.einsum("bts,btsd->btd", h_pre.astype(x.dtype), x, preferred_element_type=jnp.float32)
  u = rms_norm(u.astype(x.dtype), p["in_norm"]["scale"], cfg.model.norm_eps)
  return u, (h_post, h_res)


def _read_in(h_pre, x):
  """sum_s H_pre[s] x_s in float32 (H_pre rounded to x's dtype, as the einsum reads it)."""
  hp = h_pre.astype(x.dtype).astype(jnp.float32)
  return sum(hp[..., j, None] * x[..., j, :].astype(jnp.float32) for j in range(x.shape[-2]))


def _pre_fused(p: dict, x, cfg):
  """pre()'s forward with a backward written for the stream state's traffic.

  The forward is the autodiff path's, except that sum_s H_pre[s] x_s is summed as S broadcast
  products in float32 (the einsum's math in one pass). Under autodiff the backward of the
  normalised projection materialises float32 copies of the [B, T, S*d] state (the norm's
  backward, the projection's input gradient, their sums): about 33 passes over the bf16 state per
  layer on the 120B rank, compiled for an H100. Here, with r = 1 / rms(x) per token, g the norm's
  scale, W the projections [S*d, n], raw = (x r g) W their outputs (n = 2S + S^2 per token) and
  dz their cotangent:
    M = x^T (r dz)  (one GEMM over the state),  dW = g M,  dg = sum_n W M
    dx = r g (dz W^T) - (r^2 / (S d)) (sum_n dz raw) x + H_pre (x) dv
  where dv is the read-in's cotangent: the norm's mean term is a per-token scalar from the n
  projections, and dz W^T is summed as n broadcast products inside the one elementwise pass that
  writes dx. The state is read three times and dx written once. The forward keeps r's
  ingredients (x, which the stack keeps anyway), raw and the read-in v (bf16)."""
  eps = float(cfg.model.norm_eps)
  b, t, s, d = x.shape

  def forward(p, x):
    raw = _raw(p, x, cfg)
    h_pre, h_post, h_res = _from_raw(p, raw, s, cfg)
    v = _read_in(h_pre, x).astype(x.dtype)
    return (rms_norm(v, p["in_norm"]["scale"], eps), h_post, h_res), (raw, v)

  @jax.custom_vjp
  def f(p, x):
    return forward(p, x)[0]

  def f_fwd(p, x):
    out, (raw, v) = forward(p, x)
    return out, (p, x, remat.keep(raw), remat.keep(v))

  def f_bwd(res, cts):
    p, x, raw, v = res
    du, dh_post, dh_res = cts
    # the read-in's RMSNorm, then the read-in
    dv, d_in = jax.vjp(lambda v_, g_: rms_norm(v_, g_, eps), v, p["in_norm"]["scale"])[1](
        du.astype(v.dtype))
    dvf = dv.astype(jnp.float32)
    xf32 = x.astype(jnp.float32)
    dh_pre = jnp.sum(dvf[..., None, :] * xf32, axis=-1)                  # [B, T, S]
    # the coefficients (sigmoids, Sinkhorn) back to the projections and their scalars
    _, coef_vjp = jax.vjp(lambda p_, r_: _from_raw(p_, r_, s, cfg), p, raw)
    dp, dz = coef_vjp((dh_pre, dh_post.astype(jnp.float32), dh_res.astype(jnp.float32)))
    # the normalised projection raw = (x r g) W
    g = p["norm"]["scale"].astype(jnp.float32)
    w = _phi(p, jnp.float32)                                              # [S*d, n]
    x2 = xf32.reshape(b, t, s * d)
    r = jax.lax.rsqrt(jnp.mean(jnp.square(x2), axis=-1) + eps)          # [B, T]
    m = jnp.einsum("btk,btn->kn", x2, dz * r[..., None],
                   precision=jax.lax.Precision.HIGHEST)                   # [S*d, n]
    c = jnp.sum(dz * raw, axis=-1) * (r * r / (s * d))                    # [B, T]
    dzw = sum(dz[..., j, None] * w[:, j] for j in range(w.shape[1]))      # [B, T, S*d]
    hp = _h_pre(p, raw, s).astype(x.dtype).astype(jnp.float32)
    dx = ((r[..., None] * g * dzw - c[..., None] * x2).reshape(b, t, s, d)
          + hp[..., None] * dvf[..., None, :])
    dw = g[:, None] * m
    n0, n1 = p["phi_pre"].shape[1], p["phi_pre"].shape[1] + p["phi_post"].shape[1]
    dp = {**dp,
          "norm": {"scale": jnp.sum(w * m, axis=-1).astype(p["norm"]["scale"].dtype)},
          "in_norm": {"scale": d_in.astype(p["in_norm"]["scale"].dtype)},
          "phi_pre": dw[:, :n0].astype(p["phi_pre"].dtype),
          "phi_post": dw[:, n0:n1].astype(p["phi_post"].dtype),
          "phi_res": dw[:, n1:].astype(p["phi_res"].dtype)}
    return dp, dx.astype(x.dtype)

  f.defvjp(f_fwd, f_bwd)
  return f(p, x)


def post(coeffs, x, y, mix: str = "elementwise"):
  """New state: H_res @ x + H_post (outer) y, in x's dtype.

  H_res is rounded to x's dtype and the products summed in float32 either way. mix
  "elementwise" writes the S x S mix as S broadcast products (one fused pass over the state,
  forward and backward); "einsum" as a batched matmul per token, which XLA on GPU lowers to a
  Triton GEMM with 4-row tiles (about 0.63 ms per call on the 120B's float32 [8192, 4, 4096]
  state on an H100, against about 0.34 ms for the bytes it moves)."""
  h_post, h_res = coeffs
  if mix == "einsum":
    mixed = jnp.einsum("btsu,btud->btsd", h_res.astype(x.dtype), x,
                       preferred_element_type=jnp.float32)
  elif mix == "elementwise":
    hr = h_res.astype(x.dtype).astype(jnp.float32)
    xf = x.astype(jnp.float32)
    mixed = sum(hr[..., :, u, None] * xf[..., u, None, :] for u in range(x.shape[-2]))
  else:
    raise ValueError(f"model.hc.mix={mix!r} is not a stream mix; expected elementwise or einsum.")
  out = mixed + h_post[..., None] * y.astype(jnp.float32)[:, :, None, :]
  # the barrier makes the mix write the new state in x's dtype: without it XLA wrote the float32
  # sum and left the rounding to the next sublayer's read-in, which then read float32 and wrote
  # the bf16 state itself (268 MB more each way per sublayer at B1 x T4096 on stage_2b)
  return jax.lax.optimization_barrier(out.astype(x.dtype))


def apply(p: dict, x, sublayer, cfg, *, interpret: bool | None = None):
  """Run `sublayer(u) -> (y, *extras)` inside the streams; returns (new_x, extras).

  model.hc.pre=kernel: pre and post as a pair of custom VJPs whose backward writes the state's
  gradient in one kernel (`_paired`); interpret: that kernel in the Pallas interpreter (tests)."""
  if cfg.model.hc.pre == "kernel":
    return _paired(p, x, sublayer, cfg, interpret)
  with jax.named_scope("hc_pre"):
    u, coeffs = pre(p, x, cfg)
  out = sublayer(u)
  y, extras = out[0], out[1:]
  with jax.named_scope("hc_post"):
    return post(coeffs, x, y, cfg.model.hc.mix), extras


def _paired(p: dict, x, sublayer, cfg, interpret):
  """apply() with the state's whole gradient written by one kernel (ops/stream_grad).

  The state x feeds the read-in and the projections (pre) and the mix (post), so under autodiff
  its gradient is a sum that XLA fuses into one pass, but that pass reads the output of a
  separate GEMM, dz W^T ([B T, S d], K = 24), written only to be read back. A kernel can form
  that product in registers, but it cannot join XLA's sum of the two uses' cotangents.
  So the forward is the autodiff path's, split differently: `pre_` returns, besides u and the
  coefficients, x itself as `xa`, and `post_` mixes `xa`. Their backward rules keep a private
  contract: post_'s rule returns, as xa's cotangent, the new state's gradient dx' itself (not
  the mix's H_res^T dx'), and pre_'s rule, receiving it, adds the mix's term inside the kernel:
    dx = H_res^T dx' + r (dz gw^T) - c x + H_pre (x) dv     (ops/stream_grad/reference.py)
  xa must therefore reach post_ and nothing else (both live only here). The values, forward
  and backward, are those of the autodiff path up to float32 rounding (tests/test_streams.py)."""
  eps = float(cfg.model.norm_eps)
  b, t, s, d = x.shape
  mix = cfg.model.hc.mix
  if compat(cfg) == "reference_cuda":
    raise ValueError("model.hc.pre=kernel needs the projections that read the state "
                     "(model.compat other than reference_cuda); expected autodiff or fused "
                     "with reference_cuda.")
  scale = lambda p_: p_["in_norm"]["scale"]

  def read_in(h_pre, x):
    return jnp.einsum("bts,btsd->btd", h_pre.astype(x.dtype), x,
                      preferred_element_type=jnp.float32).astype(x.dtype)

  def forward(p, x):
    x2 = x.reshape(b, t, s * d)
    r = jax.lax.rsqrt(jnp.mean(jnp.square(x2.astype(jnp.float32)), axis=-1) + eps)   # [B, T]
    raw = r[..., None] * jnp.einsum("btk,kn->btn", x2, _gw(p, x.dtype),
                                    preferred_element_type=jnp.float32)     # = _raw(p, x, cfg)
    h_pre, h_post, h_res = _from_raw(p, raw, s, cfg)
    v = read_in(h_pre, x)
    return (rms_norm(v, scale(p), eps), h_post, h_res, x), (raw, r, v)

  @jax.custom_vjp
  def pre_(p, x):
    return forward(p, x)[0]

  def pre_fwd(p, x):
    out, (raw, r, v) = forward(p, x)
    # v is not named: under model.remat=selective it is recomputed, as the autodiff path does;
    # raw and r are a few floats a token
    return out, (p, x, remat.keep(raw), remat.keep(r), v)

  def pre_bwd(res, cts):
    p, x, raw, r, v = res
    du, dh_post, dh_res, dxp = cts             # dxp: the new state's gradient (post_'s contract)
    f32 = jnp.float32
    # the read-in's RMSNorm, then the read-in (H_pre rounded to x's dtype, as the forward)
    dp_in, dv = jax.vjp(lambda p_, v_: rms_norm(v_, scale(p_), eps), p, v)[1](du.astype(v.dtype))
    hp = _h_pre(p, raw, s).astype(x.dtype)
    (dh_pre,) = jax.vjp(lambda h: read_in(h, x), hp)[1](dv)
    # the coefficients (sigmoids, Sinkhorn) back to the projections
    (_, _, h_res), coef_vjp = jax.vjp(lambda p_, r_: _from_raw(p_, r_, s, cfg), p, raw)
    dp_coef, dz = coef_vjp((dh_pre.astype(f32), dh_post.astype(f32), dh_res.astype(f32)))
    # raw = r (x2 gw): the weights' gradient x2^T (r dz) as the autodiff path forms it
    x2 = x.reshape(b, t, s * d)
    gw, gw_vjp = jax.vjp(lambda p_: _gw(p_, x.dtype), p)
    (dgw,) = jax.vjp(lambda w: jnp.einsum("btk,kn->btn", x2, w, preferred_element_type=f32),
                     gw)[1](dz * r[..., None])
    (dp_gw,) = gw_vjp(dgw)
    c = jnp.sum(dz * raw, axis=-1) * (r * r / (s * d))
    dx = stream_grad.state_grad(x, dxp, dv, r, c, hp.astype(f32),
                                h_res.astype(x.dtype).astype(f32), dz, gw,
                                interpret=interpret)
    dp = jax.tree_util.tree_map(lambda a, b_, c_: (a + b_ + c_).astype(a.dtype), dp_in,
                                dp_coef, dp_gw)
    return dp, dx

  pre_.defvjp(pre_fwd, pre_bwd)

  @jax.custom_vjp
  def post_(h_post, h_res, xa, y):
    return post((h_post, h_res), xa, y, mix)

  def post_fwd(h_post, h_res, xa, y):
    return post_(h_post, h_res, xa, y), (h_post, h_res, xa, y)

  def post_bwd(res, dxp):
    h_post, h_res, xa, y = res
    # dy, and the coefficients' sums over the width, in one pass over dxp, xa and y
    dy, dh_post, dh_res = stream_grad.mix_grads(dxp, xa, y, h_post, interpret=interpret)
    # H_res entered the mix rounded to the state's dtype: its cotangent is rounded likewise
    dh_res = dh_res.astype(xa.dtype).astype(jnp.float32)
    return dh_post.astype(h_post.dtype), dh_res.astype(h_res.dtype), dxp, dy

  post_.defvjp(post_fwd, post_bwd)

  with jax.named_scope("hc_pre"):
    u, h_post, h_res, xa = pre_(p, x)
    h_post, h_res = remat.keep((h_post, h_res))
  out = sublayer(u)
  y, extras = out[0], out[1:]
  with jax.named_scope("hc_post"):
    return post_(h_post, h_res, xa, y), extras


def expand(e, n_streams: int):
  """Embedding [B, T, d] -> stream state [B, T, S, d]: stream 0 = e, others 0."""
  z = jnp.zeros(e.shape[:-1] + (n_streams - 1, e.shape[-1]), e.dtype)
  return jnp.concatenate([e[..., None, :], z], axis=-2)


def readout(x, scale, eps: float = 1e-6):
  """RMSNorm(mean over streams) [B, T, d]."""
  m = jnp.mean(x.astype(jnp.float32), axis=-2).astype(x.dtype)
  return rms_norm(m, scale, eps)
