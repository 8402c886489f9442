"""Gated DeltaNet mixer (SPEC §2.2): parameters, the gated delta rule (reference + chunked), mixer.

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
jax, so autodiff works through it (a custom kernel is a separate module).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from lightning_jax import nn
from lightning_jax.config import ConfigError, compat
from lightning_jax.layers import norms, rotary
from lightning_jax.sharding import constrain

PROJ_STD = 0.02          # q, k, v, g, o
GATE_STD = 0.002         # b (beta) and gk (decay) projections
A_MAX = 16.0             # A = exp(A_log) ~ U(0, 16)
DT_BIAS_RANGE = 0.01     # dt_bias ~ U(-0.01, 0.01)
ALPHA_MIN = 1e-6         # alpha clamped >= 1e-6 (log_alpha >= log 1e-6)
L2_EPS = 1e-12           # as torch.nn.functional.normalize: x / max(||x||, eps)


# ----------------------------------------------------------------------------- parameters
def _a_log_init(key, shape, dtype):
  # log(U(0, 16)); the open lower end keeps log finite (minval = tiny positive).
  a = jax.random.uniform(key, shape, jnp.float32, minval=jnp.finfo(jnp.float32).tiny,
                         maxval=A_MAX)
  return jnp.log(a).astype(dtype)


def _conv_specs(channels: int, kernel: int) -> dict:
  # The reference leaves its depthwise Conv1d at PyTorch's default init: fan_in = kernel
  # (one input channel per group), weight and bias ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
  bound = 1.0 / math.sqrt(kernel)
  return {"w": nn.Spec((kernel, channels), (None, "heads"), nn.uniform(-bound, bound)),
          "b": nn.Spec((channels,), ("heads",), nn.uniform(-bound, bound))}


def deltanet_specs(cfg) -> dict:
  """Spec tree of one Gated DeltaNet mixer.

  Layout (weights [in, out]): q, k, v, g [d, H*Dh], o [H*Dh, d]; conv_q/conv_k/conv_v
  {w [K, H*Dh], b [H*Dh]} (w[K-1] multiplies the current token); b, gk {w [d, H], b [H]};
  A_log, dt_bias, D [H]; o_norm {scale [Dh]} (one RMSNorm over each head's Dh channels,
  the scale shared by the heads as in the reference).
  """
  m = cfg.model
  dn = m.deltanet
  d, h, dh, kern = int(m.d_model), int(dn.n_heads), int(dn.head_dim), int(dn.conv_kernel)
  if kern < 1:
    raise ConfigError(f"model.deltanet.conv_kernel={kern} must be at least 1.")
  hd = h * dh
  proj = nn.normal(PROJ_STD)
  return {
      "q": nn.Spec((d, hd), ("embed", "heads"), proj),
      "k": nn.Spec((d, hd), ("embed", "heads"), proj),
      "v": nn.Spec((d, hd), ("embed", "heads"), proj),
      "g": nn.Spec((d, hd), ("embed", "heads"), proj),
      "o": nn.Spec((hd, d), ("heads", "embed"), proj),
      "conv_q": _conv_specs(hd, kern),
      "conv_k": _conv_specs(hd, kern),
      "conv_v": _conv_specs(hd, kern),
      "b": {"w": nn.Spec((d, h), ("embed", "heads"), nn.normal(GATE_STD)),
            "b": nn.Spec((h,), ("heads",), nn.zeros)},
      "gk": {"w": nn.Spec((d, h), ("embed", "heads"), nn.normal(GATE_STD)),
             "b": nn.Spec((h,), ("heads",), nn.zeros)},
      "A_log": nn.Spec((h,), ("heads",), _a_log_init),
      "dt_bias": nn.Spec((h,), ("heads",), nn.uniform(-DT_BIAS_RANGE, DT_BIAS_RANGE)),
      "D": nn.Spec((h,), ("heads",), nn.ones),
      "o_norm": norms.rms_norm_specs(dh, axis="kv"),
  }


# ----------------------------------------------------------------------------- helpers
def causal_conv1d(x, w, b=None, history=None):
  """Causal depthwise conv over time: y_t = b + sum_j w[j] * x_{t-K+1+j}.

  x [B, T, C], w [K, C], b [C] -> [B, T, C] (PyTorch Conv1d(groups=C, padding=K-1) with the
  right overhang dropped; w[j] is torch's weight[:, 0, j]). history [B, K-1, C]: the inputs of
  the K-1 tokens before x (decoding); None: zeros, the start of a sequence.
  """
  kern = w.shape[0]
  t = x.shape[1]
  if history is None:
    xp = jnp.pad(x, ((0, 0), (kern - 1, 0), (0, 0)))
  else:
    xp = jnp.concatenate([history.astype(x.dtype), x], axis=1)
  w = w.astype(x.dtype)
  y = xp[:, 0:t] * w[0]
  for j in range(1, kern):
    y = y + xp[:, j:j + t] * w[j]
  if b is not None:
    y = y + b.astype(x.dtype)
  return y


def l2_normalize(x, eps: float = L2_EPS):
  """x / max(||x||, eps) over the last axis, in float32 (torch F.normalize semantics)."""
  xf = x.astype(jnp.float32)
  ss = jnp.sum(jnp.square(xf), axis=-1, keepdims=True)
  y = xf * jax.lax.rsqrt(jnp.maximum(ss, eps * eps))
  return y.astype(x.dtype)


def qk_normalize_rotate(q, k, rope=None):
  """Per-head L2 normalisation of q and k [B, T, H, Dh], THEN interleaved rotary (SPEC §2.2).

  rope = (cos, sin) from rotary.rotary_tables or None. (Rotary is orthogonal, so in exact
  arithmetic the order does not change the result; the SPEC's order is kept regardless.)
  """
  q, k = l2_normalize(q), l2_normalize(k)
  if rope is not None:
    cos, sin = rope
    q, k = rotary.apply_rotary(q, cos, sin), rotary.apply_rotary(k, cos, sin)
  return q, k


def decay_log_alpha(gk, A_log, dt_bias):
  """log alpha = max(-exp(A_log) * softplus(gk + dt_bias), log 1e-6), float32, gk [..., H]."""
  a = jnp.exp(A_log.astype(jnp.float32))
  la = -a * jax.nn.softplus(gk.astype(jnp.float32) + dt_bias.astype(jnp.float32))
  return jnp.maximum(la, math.log(ALPHA_MIN))


def _check_rule_shapes(q, k, v, log_alpha, beta, initial_state):
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


def _state0(initial_state, q, v):
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
  _check_rule_shapes(q, k, v, log_alpha, beta, initial_state)
  f32 = jnp.float32
  s0 = _state0(initial_state, q, v)
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
  _check_rule_shapes(q, k, v, log_alpha, beta, initial_state)
  if int(chunk_size) < 1:
    raise ValueError(f"delta rule: chunk_size={chunk_size} must be at least 1.")
  f32 = jnp.float32
  bsz, t, h, dk = q.shape
  dv = v.shape[-1]
  c = int(min(chunk_size, t)) if t > 0 else 1
  n = -(-t // c)
  pad = n * c - t
  s0 = _state0(initial_state, q, v)

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


# ----------------------------------------------------------------------------- mixer
def resolve_impl(cfg) -> str:
  """model.deltanet.impl with "auto" resolved: the Pallas kernels on GPU, chunked elsewhere."""
  impl = cfg.model.deltanet.impl
  if impl == "auto":
    return "kernel" if jax.default_backend() == "gpu" else "chunked"
  return impl


def _delta_rule(cfg, q, k, v, log_alpha, beta):
  impl = resolve_impl(cfg)
  if impl == "chunked":
    return chunk_gated_delta_rule(q, k, v, log_alpha, beta,
                                  chunk_size=int(cfg.model.deltanet.chunk_size))
  if impl == "recurrent":
    return recurrent_gated_delta_rule(q, k, v, log_alpha, beta)
  if impl == "kernel":   # Pallas kernels (lightning_jax/kernels/delta_rule.py); GPU only
    from lightning_jax.kernels import delta_rule as kernel
    return kernel.select_and_run(cfg, q, k, v, log_alpha, beta)
  raise ConfigError(f"model.deltanet.impl={impl!r} is not available in layers/deltanet.py; "
                    f"expected 'auto', 'chunked', 'recurrent' or 'kernel'.")


def deltanet_inputs(p: dict, x, consts, cfg, conv_state=None):
  """Everything the delta rule takes, from x [B, T, d] (shared by training and decoding).

  conv_state: None (the sequence starts here) or {"q", "k", "v": [B, K-1, H*Dh]}, the pre-conv
  projections of the K-1 tokens before x. Returns (inputs, raw): inputs = {"q", "k" (normalised,
  rotated), "v", "gate" [B, T, H, Dh], "beta", "log_alpha" [B, T, H] float32}; raw = the pre-conv
  projections {"q", "k", "v": [B, T, H*Dh]} (a decoder keeps the last K-1 of them).
  """
  m = cfg.model
  h, dh = int(m.deltanet.n_heads), int(m.deltanet.head_dim)
  dtype = nn.dtype_of(m.dtype)
  bsz, t, d = x.shape
  if d != m.d_model:
    raise ValueError(f"deltanet_apply: x has width {d} but model.d_model={m.d_model}.")
  p = jax.tree_util.tree_map(jnp.asarray, p)       # numpy leaves would compute in numpy
  x = jnp.asarray(x).astype(dtype)

  def proj(name):
    return x @ p[name].astype(dtype)

  raw = {n: proj(n) for n in ("q", "k", "v")}

  def conv_silu(n):
    hist = None if conv_state is None else conv_state[n]
    return jax.nn.silu(causal_conv1d(raw[n], p["conv_" + n]["w"], p["conv_" + n]["b"], hist))

  heads = ("batch", "seq", "heads", "kv")
  q = conv_silu("q").reshape(bsz, t, h, dh)
  k = conv_silu("k").reshape(bsz, t, h, dh)
  v = conv_silu("v").reshape(bsz, t, h, dh)
  gate = proj("g").reshape(bsz, t, h, dh)
  q, k, v = (constrain(a, heads) for a in (q, k, v))

  q, k = qk_normalize_rotate(q, k, consts.get("rope_dn") if consts else None)

  beta = jax.nn.sigmoid(x.astype(jnp.float32) @ p["b"]["w"].astype(jnp.float32)
                        + p["b"]["b"].astype(jnp.float32))
  gk = x.astype(jnp.float32) @ p["gk"]["w"].astype(jnp.float32) + p["gk"]["b"].astype(jnp.float32)
  log_alpha = decay_log_alpha(gk, p["A_log"], p["dt_bias"])
  return {"q": q, "k": k, "v": v, "gate": gate, "beta": beta, "log_alpha": log_alpha}, raw


def deltanet_output(p: dict, o, inputs, cfg):
  """The mixer's output from the delta rule's o [B, T, H, Dv]: the D (q.k) v term, the per-head
  RMSNorm, the output gate and the o-projection -> [B, T, d] in cfg.model.dtype."""
  m = cfg.model
  dtype = nn.dtype_of(m.dtype)
  q, k, v, gate = inputs["q"], inputs["k"], inputs["v"], inputs["gate"]
  bsz, t, h, dh = gate.shape
  o = o.astype(jnp.float32)
  qk = jnp.sum(q.astype(jnp.float32) * k.astype(jnp.float32), axis=-1, keepdims=True)
  o = o + p["D"].astype(jnp.float32)[:, None] * qk * v.astype(jnp.float32)
  o = norms.rms_norm(o, p["o_norm"]["scale"], eps=float(m.norm_eps)).astype(dtype)
  if compat(cfg) == "reference_cuda":   # the reference's fused CUDA tail: RMSNorm(o) w sigmoid(g)
    o = o * jax.nn.sigmoid(gate)
  else:                                 # SPEC §2.2 (and the reference's CPU code)
    o = gate * jax.nn.silu(o)
  return o.reshape(bsz, t, h * dh) @ p["o"].astype(dtype)


def deltanet_apply(p: dict, x, consts, cfg):
  """Gated DeltaNet mixer: x [B, T, d] -> [B, T, d] in cfg.model.dtype, float32 state.

  consts["rope_dn"] = (cos, sin) from rotary.rotary_tables (or None: no rotary).
  """
  inp, _ = deltanet_inputs(p, x, consts, cfg)
  o, _ = _delta_rule(cfg, inp["q"], inp["k"], inp["v"], inp["log_alpha"], inp["beta"])
  return deltanet_output(jax.tree_util.tree_map(jnp.asarray, p), o, inp, cfg)
