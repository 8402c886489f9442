"""MoE dispatch and combine as gathers in both directions (the op's entry point).

A round's packing is a partial bijection between assignments (token n,
pick j) and rows of the packed [E_tot * C, d] buffer: every row holds at most one assignment
and every assignment sits in at most one row. Given both directions of that map, the forward
AND the backward of dispatch and combine are gathers (autodiff of a gather is a scatter-add,
slow on GPU), and the combine never materialises the [N, k, d] tensor of picked rows.
  slot [N, k] int32: packed row of (n, j), or R (= rows) when it is not in this round;
  src  [R]    int32: flat assignment n k + j held by a row, or N k for an empty row.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def _take(a, idx):
  """a[idx] along axis 0 with zeros for out-of-range indices (the sentinels)."""
  return jnp.take(a, idx, axis=0, mode="fill", fill_value=0)


@jax.custom_vjp
def dispatch_rows(x, src, slot):
  """x [N, d] -> packed rows xs [R, d]: xs[r] = x[src[r] // k] (zero for empty rows)."""
  return _take(x, src // slot.shape[1])


def _dispatch_rows_fwd(x, src, slot):
  return dispatch_rows(x, src, slot), slot


def _dispatch_rows_bwd(slot, dxs):
  # dx[n] = sum_j dxs[slot[n, j]]: k gathers of [N, d], accumulated in float32
  acc = sum(_take(dxs, slot[:, j]).astype(jnp.float32) for j in range(slot.shape[1]))
  return acc.astype(dxs.dtype), None, None


dispatch_rows.defvjp(_dispatch_rows_fwd, _dispatch_rows_bwd)


@jax.custom_vjp
def combine_rows(ys, gates, src, slot):
  """ys [R, d], gates [N, k] -> out [N, d] float32 = sum_j gates[n, j] ys[slot[n, j]]."""
  out = jnp.zeros((slot.shape[0], ys.shape[1]), jnp.float32)
  for j in range(slot.shape[1]):
    out = out + gates[:, j, None].astype(jnp.float32) * _take(ys, slot[:, j]).astype(jnp.float32)
  return out


def _combine_rows_fwd(ys, gates, src, slot):
  return combine_rows(ys, gates, src, slot), (ys, gates, src, slot)


def _combine_rows_bwd(res, dout):
  ys, gates, src, slot = res
  k = slot.shape[1]
  # dys[r] = gate(r) dout[token(r)]: one gather of [R, d]; empty rows read the sentinel (zero)
  # dout is float32 [N, d]; it is read in ys's dtype (dys ends there anyway; the k dgates
  # reductions below each read it: half the bytes), products and sums in float32
  dout_c = dout.astype(ys.dtype)
  g_row = _take(gates.reshape(-1).astype(jnp.float32), src)
  dys = (g_row[:, None] * _take(dout_c, src // k).astype(jnp.float32)).astype(ys.dtype)
  # dgates[n, j] = <ys[slot[n, j]], dout[n]>
  dg = jnp.stack([jnp.sum(_take(ys, slot[:, j]).astype(jnp.float32)
                          * dout_c.astype(jnp.float32), -1) for j in range(k)], -1)
  return dys, dg.astype(gates.dtype), None, None


combine_rows.defvjp(_combine_rows_fwd, _combine_rows_bwd)
