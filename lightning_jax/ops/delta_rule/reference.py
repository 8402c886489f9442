"""The gated delta rule's references (SPEC §2.2), float32: token by token and chunked.

Gated delta rule, per batch and head, with state S [Dv, Dk] and scale 1.0:
  S_t = alpha_t S_{t-1} + beta_t (v_t - alpha_t S_{t-1} k_t) k_t^T ,   o_t = S_t q_t .

`recurrent_gated_delta_rule` is the obvious token-by-token `lax.scan` (the test reference).
`chunk_gated_delta_rule` is the chunkwise-parallel form (Yang et al., "Gated Delta Networks",
WY/UT representation). Inside a chunk of C tokens with local cumulative log decay
g_i = sum_{j<=i} log_alpha_j and gamma_i = exp(g_i), write u_i = beta_i (v_i - alpha_i S_{i-1} k_i)
for the value actually written at step i, so that S_t = gamma_t S_0 + sum_{i<=t} e^{g_t-g_i} u_i k_i^T.
Substituting S_{i-1} gives a unit-lower-triangular system for the rows u_i:
  (I + A) U = diag(beta) V - diag(beta gamma) K S_0^T ,  A_ij = beta_i e^{g_i-g_j} k_i.k_j  (j < i)
solved once per chunk (unit_lower_solve: no per-token loop), U = Uv - W S_0^T. Then
  O   = diag(gamma) Q S_0^T + (M o Q K^T) U ,   M_ti = e^{g_t-g_i}  (i <= t)
  S_C = gamma_C S_0 + U^T diag(e^{g_C-g}) K .
Everything that does not depend on S_0 is computed for all chunks at once with dense matmuls;
only the three S_0-dependent matmuls run inside a `lax.scan` over chunks. All of it is plain
jax, so autodiff works through it (the Pallas kernels are kernel.py).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def check_shapes(q, k, v, log_alpha, beta, initial_state):
  if q.ndim != 4 or k.shape != q.shape:
    raise ValueError(f"delta rule: q {q.shape} and k {k.shape} must both be [B, T, H, Dk].")
  bsz, t, h, _ = q.shape
  if v.ndim != 4 or v.shape[:3] != (bsz, t, h):
    raise ValueError(f"delta rule: v {v.shape} must be [B, T, H, Dv] with B, T, H = {(bsz, t, h)}.")
  for name, a in (("log_alpha", log_alpha), ("beta", beta)):
    if a.shape != (bsz, t, h):
      raise ValueError(f"delta rule: {name} {a.shape} must be [B, T, H] = {(bsz, t, h)}.")
  want = (bsz, h, v.shape[-1], q.shape[-1])
  if initial_state is not None and initial_state.shape != want:
    raise ValueError(f"delta rule: initial_state {initial_state.shape} must be [B, H, Dv, Dk] = "
                     f"{want}.")


def state0(initial_state, q, v):
  bsz, _, h, dk = q.shape
  if initial_state is None:
    return jnp.zeros((bsz, h, v.shape[-1], dk), jnp.float32)
  return initial_state.astype(jnp.float32)


# ----------------------------------------------------------------------------- (I + A)^-1
def unit_lower_inverse(a):
  """(I + a)^-1 for strictly lower-triangular a [..., C, C] (any C), by batched matmuls only.

  Recursive 2 x 2 block inversion done bottom-up: pad C to a power of two P (the padding is an
  identity block, so the leading C x C of the result is exact); X = the inverse of the
  block-diagonal part at block size s (X = I at s = 1: unit diagonal); with O the off-diagonal
  s-blocks inside each 2s-block, (X^-1 + O)^-1 = X - X O X exactly (O X O = 0). log2(P) levels of
  two matmuls; no pivoting and no LAPACK custom call.
  """
  c = a.shape[-1]
  p = 1 << max(c - 1, 0).bit_length()
  if p != c:
    a = jnp.pad(a, [(0, 0)] * (a.ndim - 2) + [(0, p - c), (0, p - c)])
  pos = jnp.arange(p)
  mm = lambda x, y: jnp.matmul(x, y, precision=jax.lax.Precision.HIGHEST)
  eye = jnp.eye(p, dtype=a.dtype)
  # every term derives from `a`, so the result keeps a's sharding (explicit-axis meshes)
  inv = eye + jnp.zeros_like(a)
  s = 1
  while s < p:
    off = ((pos[:, None] // s) != (pos[None, :] // s)) & \
          ((pos[:, None] // (2 * s)) == (pos[None, :] // (2 * s)))
    o = jnp.where(off, a, 0.0)
    inv = inv - o if s == 1 else inv - mm(inv, mm(o, inv))     # X = I at s = 1
    s *= 2
  return inv[..., :c, :c]


def unit_lower_solve(a, rhs):
  """(I + a)^-1 rhs for strictly lower-triangular a [..., C, C] and rhs [..., C, D], float32.

  On CPU: unit_lower_inverse then a matmul. XLA:CPU runs LAPACK's batched trsm (what
  jax.scipy.linalg.solve_triangular lowers to) as a custom call that splits its batch over the
  intra-op thread pool and blocks a pool thread until the pieces finish; two such solves
  scheduled at once on a 2-thread pool wait on each other forever (seen with
  --xla_cpu_multi_thread_eigen=false, docs/RELIABILITY.md). Elsewhere: the triangular solve.
  """
  if jax.default_backend() == "cpu":
    return jnp.matmul(unit_lower_inverse(a), rhs, precision=jax.lax.Precision.HIGHEST)
  lower = a + jnp.eye(a.shape[-1], dtype=a.dtype)
  return jax.scipy.linalg.solve_triangular(lower, rhs, lower=True, unit_diagonal=True)


# ----------------------------------------------------------------------------- delta rule
def recurrent_gated_delta_rule(q, k, v, log_alpha, beta, initial_state=None):
  """Token-by-token reference. Returns (o [B, T, H, Dv] in v's dtype, S_T [B, H, Dv, Dk] f32)."""
  check_shapes(q, k, v, log_alpha, beta, initial_state)
  f32 = jnp.float32
  s0 = state0(initial_state, q, v)
  xs = tuple(jnp.moveaxis(a.astype(f32), 1, 0) for a in (q, k, v, log_alpha, beta))

  def step(s, x):
    q_t, k_t, v_t, la_t, b_t = x                       # [B, H, D] / [B, H]
    s = jnp.exp(la_t)[..., None, None] * s             # alpha_t S_{t-1}
    pred = jnp.einsum("bhvk,bhk->bhv", s, k_t)
    s = s + jnp.einsum("bhv,bhk->bhvk", b_t[..., None] * (v_t - pred), k_t)
    return s, jnp.einsum("bhvk,bhk->bhv", s, q_t)

  s, o = jax.lax.scan(step, s0, xs)
  return jnp.moveaxis(o, 0, 1).astype(v.dtype), s


def chunk_gated_delta_rule(q, k, v, log_alpha, beta, chunk_size: int = 64, initial_state=None):
  """Chunkwise-parallel gated delta rule (see module docstring); same contract as the reference.

  T need not be a multiple of chunk_size: the tail is padded with beta = 0, log_alpha = 0
  (and zero q, k, v), which leaves the state untouched, and the pad outputs are dropped.
  """
  check_shapes(q, k, v, log_alpha, beta, initial_state)
  if int(chunk_size) < 1:
    raise ValueError(f"delta rule: chunk_size={chunk_size} must be at least 1.")
  f32 = jnp.float32
  bsz, t, h, dk = q.shape
  dv = v.shape[-1]
  c = int(min(chunk_size, t)) if t > 0 else 1
  n = -(-t // c)
  pad = n * c - t
  s0 = state0(initial_state, q, v)

  def prep(a):  # [B, T, H, ...] -> [B, H, N, C, ...] float32
    a = a.astype(f32)
    if pad:
      a = jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2))
    a = a.reshape((bsz, n, c) + a.shape[2:])
    return jnp.moveaxis(a, 3, 1)

  qc, kc, vc, lac, bc = (prep(a) for a in (q, k, v, log_alpha, beta))
  g = jnp.cumsum(lac, axis=-1)                                   # [B, H, N, C]
  idx = jnp.arange(c)
  incl = idx[:, None] >= idx[None, :]                            # [t, i]: i <= t
  strict = idx[:, None] > idx[None, :]
  diff = g[..., :, None] - g[..., None, :]
  # mask BEFORE exp: above the diagonal g_t - g_i > 0 could overflow.
  decay = jnp.exp(jnp.where(incl, diff, -jnp.inf))               # [B, H, N, C, C]

  kk = jnp.einsum("bhntd,bhnsd->bhnts", kc, kc)
  a_mat = jnp.where(strict, bc[..., :, None] * decay * kk, 0.0)
  gamma = jnp.exp(g)
  rhs = jnp.concatenate([kc * (bc * gamma)[..., None], vc * bc[..., None]], axis=-1)
  sol = unit_lower_solve(a_mat, rhs)
  w_mat, u_v = sol[..., :dk], sol[..., dk:]                      # [B, H, N, C, Dk|Dv]

  p_mat = decay * jnp.einsum("bhntd,bhnsd->bhnts", qc, kc)       # intra-chunk attention
  q_g = qc * gamma[..., None]
  k_d = kc * jnp.exp(g[..., -1:] - g)[..., None]
  g_end = jnp.exp(g[..., -1])                                    # [B, H, N]

  def step(s, x):
    w_c, uv_c, p_c, qg_c, kd_c, ge_c = x
    u = uv_c - jnp.einsum("bhck,bhvk->bhcv", w_c, s)
    o = jnp.einsum("bhck,bhvk->bhcv", qg_c, s) + jnp.einsum("bhts,bhsv->bhtv", p_c, u)
    s = ge_c[..., None, None] * s + jnp.einsum("bhcv,bhck->bhvk", u, kd_c)
    return s, o

  xs = tuple(jnp.moveaxis(a, 2, 0) for a in (w_mat, u_v, p_mat, q_g, k_d, g_end))
  s, o = jax.lax.scan(step, s0, xs)                              # o [N, B, H, C, Dv]
  o = jnp.transpose(o, (1, 0, 3, 2, 4)).reshape(bsz, n * c, h, dv)[:, :t]
  return o.astype(v.dtype), s
