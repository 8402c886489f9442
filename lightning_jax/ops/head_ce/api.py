"""The LM head and its cross-entropy (the op's entry point): `head_logits` (custom VJP: the
logit cotangent rounded to the compute dtype before both backward matmuls) and
`chunked_cross_entropy` (never all float32 logits at once; `chunked_cross_entropies` takes
several passes through the same head in one scan; its custom VJP converts the head weight to
the compute dtype once per forward and once per backward, not per chunk, with the same
rounding as `head_logits`), and `fused_cross_entropy_loss` (the training loss's head,
model.ce_impl=fused: the passes' weighted CE with each chunk's gradient computed in the forward,
so the backward runs no matmul). reference.py: the same loss from full float32 logits by plain
autodiff.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


LOGITS = ("float32", "compute")


def _check_logits(logits: str):
  if logits not in LOGITS:
    raise ValueError(f"head_ce: logits={logits!r} must be one of {list(LOGITS)} (the dtype the "
                     f"logits GEMM writes: float32, or the compute dtype as the reference's "
                     f"fused cross-entropy does).")


def _chunk_logits(hd, wc, logits: str):
  """One chunk's logits hd @ wc as float32 values. logits="compute": the GEMM writes them in
  the compute dtype (accumulating in float32, rounded once) and the softmax reads them as
  float32 (the reference's fused cross-entropy, lightninglm/kernels/triton_cross_entropy.py,
  keeps bf16 logits the same way): half the bytes of the largest tensors of the head."""
  if logits == "compute":
    return jnp.einsum("btd,dv->btv", hd, wc).astype(jnp.float32)
  return jnp.einsum("btd,dv->btv", hd, wc, preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def head_logits(h, w, dtype):
  """float32 logits h [B, t, d] @ w [d, V] with both operands in the compute dtype.

  Plain autodiff would hand the float32 logit cotangent to both backward matmuls, which then
  run in float32 (the largest matmuls of a step at 131K vocabulary). Here the cotangent is
  rounded to the compute dtype first, as for every other layer, and both gradients accumulate
  in float32; dw comes back in w's dtype (the float32 master). Equal to autodiff in float32.
  """
  return jnp.einsum("btd,dv->btv", h.astype(dtype), w.astype(dtype),
                    preferred_element_type=jnp.float32)


def _head_logits_fwd(h, w, dtype):
  return head_logits(h, w, dtype), (h, w)


def _head_logits_bwd(dtype, res, g):
  h, w = res
  gd = g.astype(dtype)
  dh = jnp.einsum("btv,dv->btd", gd, w.astype(dtype), preferred_element_type=jnp.float32)
  dw = jnp.einsum("btd,btv->dv", h.astype(dtype), gd, preferred_element_type=jnp.float32)
  return dh.astype(h.dtype), dw.astype(w.dtype)


head_logits.defvjp(_head_logits_fwd, _head_logits_bwd)


def chunked_cross_entropy(h, w, targets, chunk_tokens: int, dtype=jnp.float32,
                          logits: str = "float32"):
  """Mean CE of logits h @ w against targets, chunked over the sequence.

  The chunk holds `chunk_tokens` tokens of the whole traced batch (seq chunk of
  max(1, chunk_tokens // B) positions); forward and backward each recompute one chunk's
  float32 logits [B, chunk, V] at a time (see `chunked_cross_entropies`).
  """
  return chunked_cross_entropies([h], w, [targets], chunk_tokens, dtype, logits)[0]


def _stack_passes(hs, targets, chunk_tokens: int):
  """The passes stacked on the batch axis and cut into sequence chunks: (hc_all [n, b, tc, d],
  ts [n, b, tc] int32, p, b1, t)."""
  p = len(hs)
  shapes = {tuple(x.shape) for x in hs}
  if p == 0 or len(shapes) != 1 or len(targets) != p or \
      any(tuple(tg.shape) != tuple(hs[0].shape[:2]) for tg in targets):
    raise ValueError(f"chunked_cross_entropies takes passes of one shape [B, T, d] with targets "
                     f"[B, T]; got h shapes {[tuple(x.shape) for x in hs]} and target shapes "
                     f"{[tuple(tg.shape) for tg in targets]}.")
  h = hs[0] if p == 1 else jnp.concatenate(hs, axis=0)
  tgts = targets[0] if p == 1 else jnp.concatenate(targets, axis=0)
  b1, t, d = hs[0].shape
  b = p * b1
  tc = max(1, min(t, chunk_tokens // max(b, 1)))
  n = -(-t // tc)
  pad = n * tc - t
  if pad:
    h = jnp.pad(h, ((0, 0), (0, pad), (0, 0)))
    tgts = jnp.pad(tgts, ((0, 0), (0, pad)))
  hc_all = jnp.swapaxes(h.reshape(b, n, tc, d), 0, 1)
  ts = jnp.swapaxes(tgts.reshape(b, n, tc), 0, 1).astype(jnp.int32)
  return hc_all, ts, p, b1, t


def chunked_cross_entropies(hs, w, targets, chunk_tokens: int, dtype=jnp.float32,
                            logits: str = "float32"):
  """[mean CE of hs[i] @ w against targets[i] for each i], in ONE chunked scan.

  Several passes through the same head (the next-token and the MTP read-outs) share the scan,
  so the backward accumulates one float32 dw [d, V] for all of them instead of one per pass
  (at the 120B's 4096 x 131072 head that is 2.1 GB less at the peak). The passes are stacked
  on the batch axis, all of shape [B, T, d] with targets [B, T]; a chunk holds `chunk_tokens`
  tokens of the stacked batch, so the float32 logits of one chunk are as large as with one pass.
  With one pass this is `chunked_cross_entropy`. The gradient is `_chunk_sums`' custom VJP,
  which computes every chunk's logits again (see `fused_cross_entropy_loss` for the training
  loss, which does not).
  """
  _check_logits(logits)
  hc_all, ts, p, b1, t = _stack_passes(hs, targets, chunk_tokens)
  total = _chunk_sums(hc_all, w, ts, p, t, dtype, logits)
  return [total[i] / (b1 * t) for i in range(p)]


def fused_cross_entropy_loss(hs, w, targets, chunk_tokens: int, dtype=jnp.float32,
                             weights=None, logits: str = "float32"):
  """(sum_i weights[i] * mean CE of pass i, [mean CE of pass i]) with the gradient computed in
  the forward: the training loss's head (model.ce_impl=fused).

  The loss is the only differentiable output: the per-pass means come back under
  stop_gradient, for metrics. Because the loss is linear in the per-pass sums with weights
  fixed at trace time, the logit gradient of every chunk, (softmax - onehot) * weight / tokens,
  is known while its logits are: each chunk's forward runs its three matmuls (logits, dh, dw)
  at once, keeps dh [B, T, d] per pass and one dw [d, V] (summed in float32, kept in `dtype`),
  and the backward only scales both by the loss's cotangent. Against `chunked_cross_entropies`
  it saves the backward's second pass over every chunk's logits (one [chunk, d] x [d, V] matmul
  in four, and the softmax over the float32 logits again). The rounding points are the same: the logit gradient
  is rounded to `dtype` before the dh and dw matmuls, which accumulate in float32. One more:
  the summed dw is rounded to `dtype` (no-op in float32), as a compute-dtype weight's gradient
  is.
  """
  _check_logits(logits)
  hc_all, ts, p, b1, t = _stack_passes(hs, targets, chunk_tokens)
  weights = (1.0,) * p if weights is None else tuple(float(x) for x in weights)
  if len(weights) != p:
    raise ValueError(f"fused_cross_entropy_loss takes one weight per pass; got {len(weights)} "
                     f"weights for {p} passes.")
  # The custom VJP sees w already in the compute dtype, so the head's gradient leaves it in that
  # dtype: dw is summed over the chunks in float32 and rounded once (every other weight's
  # gradient comes out of a compute-dtype matmul the same way). The cast's own transpose turns
  # it into float32 for the master weight, and XLA places that conversion at the update. Between
  # the head and the update, the whole backward, the gradient then takes half the memory: 1 GiB
  # less at the 131K x 4096 head.
  wc = w.astype(dtype)
  loss, sums = _fused_sums(hc_all, wc, ts, tuple(x / (b1 * t) for x in weights), t, dtype,
                           logits)
  sums = jax.lax.stop_gradient(sums)
  return loss, [sums[i] / (b1 * t) for i in range(p)]


def _chunk_mask(i, tc, t):
  """[tc] float32: 1 where chunk i's position is < t (not padding)."""
  return (i * tc + jnp.arange(tc) < t).astype(jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _chunk_sums(hc_all, w, ts, p, t, dtype, logits="float32"):
  """[p] sums of CE over chunks hc_all [n, b, tc, d] (targets ts [n, b, tc]; the p passes
  stacked on b; positions >= t padding). w [d, V] is converted to `dtype` once in the forward
  and once in the backward, not per chunk; the backward reconverts it rather than keep a copy,
  rounds the logit cotangent to `dtype` before both matmuls and accumulates one float32 dw.
  """
  return _chunk_sums_fwd(hc_all, w, ts, p, t, dtype, logits)[0]


def _chunk_sums_fwd(hc_all, w, ts, p, t, dtype, logits="float32"):
  wc = w.astype(dtype)
  tc = hc_all.shape[2]

  def body(acc, xs):
    hc, tgt, i = xs
    lg = _chunk_logits(hc.astype(dtype), wc, logits)
    lse = jax.nn.logsumexp(lg, axis=-1)
    picked = jnp.take_along_axis(lg, tgt[..., None], axis=-1)[..., 0]
    ce = (lse - picked) * _chunk_mask(i, tc, t)
    return acc + jnp.sum(ce.reshape(p, -1), axis=1), lse

  n = hc_all.shape[0]
  total, lse = jax.lax.scan(body, jnp.zeros((p,), jnp.float32), (hc_all, ts, jnp.arange(n)))
  return total, (hc_all, w, ts, lse)


def _chunk_sums_bwd(p, t, dtype, logits, res, g):
  hc_all, w, ts, lse_all = res
  # the barrier ties the conversion to the cotangent, so that it is not scheduled early nor
  # merged with the forward's into one [d, V] copy kept alive in between (XLA on CPU drops
  # the barrier and merges them anyway)
  w, g = jax.lax.optimization_barrier((w, g))
  wc = w.astype(dtype)
  n, b, tc, _ = hc_all.shape
  g_row = jnp.repeat(g.astype(jnp.float32), b // p)[:, None]             # [b, 1]
  vocab = jnp.arange(w.shape[1])

  def body(dw, xs):
    hc, tgt, lse, i = xs
    hd = hc.astype(dtype)
    lg = _chunk_logits(hd, wc, logits)
    sm = jnp.exp(lg - lse[..., None])
    scale = g_row * _chunk_mask(i, tc, t)                                # [b, tc]
    dl = jnp.where(vocab == tgt[..., None], sm - 1.0, sm) * scale[..., None]
    gd = dl.astype(dtype)
    dh = jnp.einsum("btv,dv->btd", gd, wc, preferred_element_type=jnp.float32)
    dw = dw + jnp.einsum("btd,btv->dv", hd, gd, preferred_element_type=jnp.float32)
    return dw, dh.astype(hc_all.dtype)

  dw, dh = jax.lax.scan(body, jnp.zeros(w.shape, jnp.float32),
                        (hc_all, ts, lse_all, jnp.arange(n)))
  return dh, dw.astype(w.dtype), None


_chunk_sums.defvjp(_chunk_sums_fwd, _chunk_sums_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _fused_sums(hc_all, w, ts, coef, t, dtype, logits="float32"):
  """(sum_p coef[p] * CE sum of pass p, [p] CE sums) over chunks hc_all [n, b, tc, d] (see
  fused_cross_entropy_loss); the custom VJP's residuals are the gradients themselves. Called
  without differentiation (evaluation) it runs the forward alone, without the gradient
  matmuls."""
  sums = _chunk_sums_fwd(hc_all, w, ts, len(coef), t, dtype, logits)[0]
  return jnp.sum(jnp.asarray(coef, jnp.float32) * sums), sums


def _fused_sums_fwd(hc_all, w, ts, coef, t, dtype, logits="float32"):
  wc = w.astype(dtype)
  n, b, tc, _ = hc_all.shape
  p = len(coef)
  row_coef = jnp.repeat(jnp.asarray(coef, jnp.float32), b // p)[:, None]   # [b, 1]
  vocab = jnp.arange(w.shape[1])

  def chunk(hc, tgt, i):
    """chunk i's (CE sums per pass, dw part in float32, dh)."""
    hd = hc.astype(dtype)
    lg = _chunk_logits(hd, wc, logits)
    lse = jax.nn.logsumexp(lg, axis=-1)
    picked = jnp.take_along_axis(lg, tgt[..., None], axis=-1)[..., 0]
    mask = _chunk_mask(i, tc, t)
    ce = (lse - picked) * mask
    sm = jnp.exp(lg - lse[..., None])
    scale = row_coef * mask                                              # [b, tc]
    gd = (jnp.where(vocab == tgt[..., None], sm - 1.0, sm) * scale[..., None]).astype(dtype)
    dh = jnp.einsum("btv,dv->btd", gd, wc, preferred_element_type=jnp.float32)
    dw = jnp.einsum("btd,btv->dv", hd, gd, preferred_element_type=jnp.float32)
    return jnp.sum(ce.reshape(p, -1), axis=1), dw, dh.astype(hc_all.dtype)

  def body(carry, xs):
    acc, dw = carry
    s_i, dw_i, dh = chunk(*xs)
    return (acc + s_i, dw + dw_i), dh

  # The first chunk outside the loop: its dw product starts the float32 sum, rather than adding
  # into a zero-filled [d, V] one (a 2 GiB fill and read at the 131K x 4096 head). The rest add
  # in chunk order, so the sum is the same.
  sums, dw, dh0 = chunk(hc_all[0], ts[0], 0)
  if n > 1:
    (sums, dw), dh = jax.lax.scan(body, (sums, dw), (hc_all[1:], ts[1:], jnp.arange(1, n)))
    dh = jnp.concatenate([dh0[None], dh], axis=0)
  else:
    dh = dh0[None]
  loss = jnp.sum(jnp.asarray(coef, jnp.float32) * sums)
  # the barrier makes XLA write dw in w's dtype here: without it, XLA fuses the round trip into
  # the optimizer update and keeps the float32 sum alive through the whole backward
  return (loss, sums), (dh, jax.lax.optimization_barrier(dw.astype(w.dtype)))


def _fused_sums_bwd(coef, t, dtype, logits, res, g):
  # g[1], the per-pass sums' cotangent, is zero: fused_cross_entropy_loss stops their gradient
  dh, dw = res
  gl = g[0].astype(jnp.float32)
  return ((dh.astype(jnp.float32) * gl).astype(dh.dtype),
          (dw.astype(jnp.float32) * gl).astype(dw.dtype), None)


_fused_sums.defvjp(_fused_sums_fwd, _fused_sums_bwd)
