"""MoE dispatch / combine references: the same maps as plain indexing, differentiated by
autodiff (a gather's transpose is a scatter-add), float32.

dispatch_rows: xs[r] = x[src[r] // k] (zero for an empty row, src[r] = N k).
combine_rows:  out[n] = sum_j gates[n, j] ys[slot[n, j]] (zero where slot[n, j] = R).
"""
from __future__ import annotations

import jax.numpy as jnp


def dispatch_rows(x, src, slot):
  n, k = slot.shape
  tok = src // k
  rows = jnp.where((tok < n)[:, None], x[jnp.minimum(tok, n - 1)], 0)
  return rows.astype(x.dtype)


def combine_rows(ys, gates, src, slot):
  del src
  r = ys.shape[0]
  picked = jnp.where((slot < r)[..., None], ys[jnp.minimum(slot, r - 1)], 0)    # [N, k, d]
  return jnp.einsum("nk,nkd->nd", gates.astype(jnp.float32), picked.astype(jnp.float32))
