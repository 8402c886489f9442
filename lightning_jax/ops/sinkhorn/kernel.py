"""Sinkhorn as two Pallas kernels: one launch for the forward, one for the backward.

Same math as api.rolled (and reference.py): m = exp(x - stop_gradient(row max)), then `iters`
rounds of (rows /= row sum + eps; columns /= column sum + eps), float32.

Layout: the logits [..., n, n] are flattened to N tokens and transposed to [n*n, N] (padded to a
multiple of `block` tokens; padded tokens hold zeros, harmless, and are sliced off), so that
every matrix entry is one contiguous row over tokens. One program handles `block` tokens and
loads each entry as a [block] vector; row and column sums are sums of n vectors, so a round is
elementwise arithmetic only (no reductions, no slicing inside a tensor). For Triton the rounds
are unrolled in Python (iters is static); interpreted they run under lax.fori_loop (see
_fwd_kernel's comment).

Backward (derived by hand; no autodiff through Pallas). A row step m' = m / d, d_i = sum_j
m_ij + eps, has the VJP  g_ij = (g'_ij - sum_k g'_ik m'_ik) / d_i ; a column step
m' = m / e, e_j = sum_i m_ij + eps, likewise  g_ij = (g'_ij - sum_k g'_kj m'_kj) / e_j ; the
exponential with its stop-gradient shift gives dx = g0 * m0. The backward kernel recomputes the
forward from x keeping only the 2n denominators of every round (for n = 4 and 20 rounds, 160
values per token) and the final state; it then walks the rounds in reverse, rebuilding each
step's input from its output as m = m' * d (one rounding per step, not amplified), and m0 from x.
The only residual saved between forward and backward is the transposed input.

Backends: Triton on GPU, the Pallas interpreter elsewhere (interpret=None). gpu_lowering=True
builds the native call with Triton compiler parameters on any host (ops.pallas.lower_for_gpu).
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from lightning_jax.ops.pallas import compiler_params, interpret_default

F32 = jnp.float32
MAX_N = 8


@dataclasses.dataclass(frozen=True)
class _Plan:
  """Everything static about one call (hashable: the custom_vjp's non-differentiable argument)."""
  n: int
  iters: int
  eps: float
  block: int
  num_warps: int
  interpret: bool
  gpu_lowering: bool
  rolled: bool        # the rounds under lax.fori_loop (interpreted), else unrolled (Triton)


# ----------------------------------------------------------------------------- kernel bodies
def _load(ref, n):
  """The entries as an n x n nested list of [block] float32 vectors."""
  return [[ref[i * n + j, :].astype(F32) for j in range(n)] for i in range(n)]


def _store(ref, m, n):
  for i in range(n):
    for j in range(n):
      ref[i * n + j, :] = m[i][j]


def _total(vs):
  return functools.reduce(jnp.add, vs)


def _exp_shifted(x, n):
  """exp(x - row max) entrywise (the max is a constant for the gradient)."""
  out = []
  for row in x:
    mx = functools.reduce(jnp.maximum, row)
    out.append([jnp.exp(v - mx) for v in row])
  return out


def _round(m, n, eps):
  """One round: m / (row sums + eps), then / (column sums + eps); returns the new state and the
  2n denominators (rows, then columns)."""
  d = [_total(m[i]) + eps for i in range(n)]
  m = [[m[i][j] / d[i] for j in range(n)] for i in range(n)]
  e = [_total([m[i][j] for i in range(n)]) + eps for j in range(n)]
  m = [[m[i][j] / e[j] for j in range(n)] for i in range(n)]
  return m, d + e


def _round_vjp(g, m, de, n):
  """The VJP of one round: g, m = the cotangent and the value of its output, de its
  denominators -> the cotangent and the value of its input."""
  d, e = de[:n], de[n:]
  s = [_total([g[i][j] * m[i][j] for i in range(n)]) for j in range(n)]
  g = [[(g[i][j] - s[j]) / e[j] for j in range(n)] for i in range(n)]
  m = [[m[i][j] * e[j] for j in range(n)] for i in range(n)]          # after the row step
  t = [_total([g[i][j] * m[i][j] for j in range(n)]) for i in range(n)]
  g = [[(g[i][j] - t[i]) / d[i] for j in range(n)] for i in range(n)]
  m = [[m[i][j] * d[i] for j in range(n)] for i in range(n)]          # the round's input
  return g, m


# The rounds run unrolled in Python for Triton (the backward keeps every round's denominators as
# separate vectors, i.e. in registers). Interpreted (rolled=True) the same per-round functions
# run under lax.fori_loop, the denominators in a [iters, 2n, block] array: XLA's CPU compile of
# the unrolled backward grew quadratically with iters (about 2 minutes at 20 rounds; its fusion
# pass duplicates the cheap products into every consumer), rolled it is a few seconds.
def _fwd_kernel(x_ref, o_ref, *, n, iters, eps, rolled):
  m = _exp_shifted(_load(x_ref, n), n)
  if rolled:
    m = jax.lax.fori_loop(0, iters, lambda _, m: _round(m, n, eps)[0], m)
  else:
    for _ in range(iters):
      m, _ = _round(m, n, eps)
  _store(o_ref, m, n)


def _bwd_kernel(x_ref, g_ref, dx_ref, *, n, iters, eps, rolled):
  # live at the turn from the forward to the reverse pass (n = 4, 20 rounds): 160 denominators,
  # the state and the cotangent, 192 values a token; m0 is recomputed at the end, not kept
  m = _exp_shifted(_load(x_ref, n), n)
  if rolled:
    def forward(r, carry):
      m, dens = carry
      m, de = _round(m, n, eps)
      return m, dens.at[r].set(jnp.stack(de))

    dens = jnp.zeros((iters, 2 * n, x_ref.shape[1]), F32)
    m, dens = jax.lax.fori_loop(0, iters, forward, (m, dens))

    def backward(k, carry):
      de = dens[iters - 1 - k]
      return _round_vjp(*carry, [de[i] for i in range(2 * n)], n)
    g, _ = jax.lax.fori_loop(0, iters, backward, (_load(g_ref, n), m))
  else:
    dens = []
    for _ in range(iters):
      m, de = _round(m, n, eps)
      dens.append(de)
    g = _load(g_ref, n)
    for de in reversed(dens):
      g, m = _round_vjp(g, m, de, n)
  # dx = g0 * m0, with m0 = exp(x - row max) recomputed exactly (not the rebuilt one)
  m0 = _exp_shifted(_load(x_ref, n), n)
  _store(dx_ref, [[g[i][j] * m0[i][j] for j in range(n)] for i in range(n)], n)


# ----------------------------------------------------------------------------- calls
def _call(kern, name, plan, *arrays):
  nn, width = arrays[0].shape
  spec = pl.BlockSpec((nn, plan.block), lambda b: (0, b))
  body = functools.partial(kern, n=plan.n, iters=plan.iters, eps=plan.eps,
                           rolled=plan.rolled)
  return pl.pallas_call(
      body, grid=(width // plan.block,),
      in_specs=[spec] * len(arrays), out_specs=spec,
      out_shape=jax.ShapeDtypeStruct((nn, width), F32),
      interpret=plan.interpret, name=name,
      compiler_params=compiler_params(plan.num_warps, 1, force=plan.gpu_lowering),
  )(*arrays)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _sinkhorn_t(xt, plan):
  return _call(_fwd_kernel, "sinkhorn_fwd", plan, xt)


def _sinkhorn_t_fwd(xt, plan):
  return _call(_fwd_kernel, "sinkhorn_fwd", plan, xt), xt


def _sinkhorn_t_bwd(plan, xt, g):
  return (_call(_bwd_kernel, "sinkhorn_bwd", plan, xt, g.astype(F32)),)


_sinkhorn_t.defvjp(_sinkhorn_t_fwd, _sinkhorn_t_bwd)


def sinkhorn(logits, iters: int = 20, eps: float = 1e-6, *, interpret: bool | None = None,
             gpu_lowering: bool = False, block: int = 128, num_warps: int = 4):
  """[..., n, n] logits (n <= 8) -> doubly stochastic [..., n, n] float32, as api.rolled.

  block: tokens per program (a power of two); num_warps: Triton warps per program (block = 32 x
  num_warps gives each thread one token: the backward keeps 2 n iters values per token)."""
  shape = tuple(logits.shape)
  if len(shape) < 2 or shape[-1] != shape[-2] or not 1 <= shape[-1] <= MAX_N:
    raise ValueError(f"sinkhorn kernel: logits of shape {shape} must be [..., n, n] with "
                     f"1 <= n <= {MAX_N}.")
  if not isinstance(block, int) or block < 1 or block & (block - 1):
    raise ValueError(f"sinkhorn kernel: block={block!r} must be a power of two.")
  if not isinstance(iters, int) or iters < 0:
    raise ValueError(f"sinkhorn kernel: iters={iters!r} must be an integer >= 0.")
  n = shape[-1]
  tokens = math.prod(shape[:-2])
  if tokens == 0:
    return logits.astype(F32)
  interp = False if gpu_lowering else interpret_default(interpret)
  plan = _Plan(n, iters, float(eps), block, int(num_warps), interp, bool(gpu_lowering), interp)
  xt = logits.astype(F32).reshape(tokens, n * n).T
  width = -(-tokens // block) * block
  if width != tokens:
    xt = jnp.pad(xt, ((0, 0), (0, width - tokens)))
  yt = _sinkhorn_t(xt, plan)
  return yt[:, :tokens].T.reshape(shape)
