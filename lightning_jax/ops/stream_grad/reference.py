"""The streams' state gradient written out in float32: the obvious form the kernel is tested
against.

Around a sublayer the streams compute, per token (layers/streams.py, S streams of width d):
  mixed[s] = sum_t hr[s, t] x[t]                 the mix (the new state before H_post y)
  raw      = r (x_flat gw),  r = 1 / rms(x_flat)  the coefficients' projections; gw [S d, m]
                                                  holds the norm's scale folded in
  v        = sum_s hp[s] x[s]                     the read-in, before its RMSNorm
so the state x gets three cotangents: the new state's (dxp, through the mix), the projections'
(dz [m]) and the read-in's (dv [d]). With c = (r^2 / (S d)) sum_m dz_m raw_m (the norm's mean):
  dx[s] = sum_t hr[t, s] dxp[t] + r (dz gw^T)[s] - c x[s] + hp[s] dv
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

F32 = jnp.float32
HI = jax.lax.Precision.HIGHEST


def state_grad(x, dxp, dv, r, c, hp, hr, dz, gw):
  """x, dxp [N, S, d]; dv [N, d]; r, c [N]; hp [N, S]; hr [N, S, S]; dz [N, m]; gw [S d, m]
  -> dx [N, S, d] float32."""
  n, s, d = x.shape
  f = lambda a: jnp.asarray(a).astype(F32)
  mix = jnp.einsum("nts,ntd->nsd", f(hr), f(dxp), precision=HI)
  proj = jnp.einsum("nm,cm->nc", f(dz), f(gw), precision=HI).reshape(n, s, d)
  return (mix + f(r)[:, None, None] * proj - f(c)[:, None, None] * f(x)
          + f(hp)[..., None] * f(dv)[:, None, :])


def mix_grads(dxp, x, y, h_post):
  """The mix's backward, out[s] = sum_t hr[s, t] x[t] + h_post[s] y: dxp, x [N, S, d], y [N, d],
  h_post [N, S] -> dy [N, d], dh_post [N, S], dh_res [N, S, S] (float32), with
  dy = sum_s h_post[s] dxp[s], dh_post[s] = dxp[s] . y, dh_res[s, t] = dxp[s] . x[t]."""
  f = lambda a: jnp.asarray(a).astype(F32)
  dxf = f(dxp)
  return (jnp.einsum("ns,nsd->nd", f(h_post), dxf, precision=HI),
          jnp.einsum("nsd,nd->ns", dxf, f(y), precision=HI),
          jnp.einsum("nsd,ntd->nst", dxf, f(x), precision=HI))
