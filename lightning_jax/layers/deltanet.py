"""Gated DeltaNet mixer (SPEC §2.2): parameters, projections, conv, gates and output around the
gated delta rule, which is the op lightning_jax/ops/delta_rule (references, Pallas kernels, api).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from lightning_jax import nn
from lightning_jax.config import ConfigError, compat
from lightning_jax.layers import norms, rotary
from lightning_jax.ops import pallas
from lightning_jax.ops.delta_rule import api as delta_rule_op
from lightning_jax.sharding import constrain

PROJ_STD = 0.02          # q, k, v, g, o
GATE_STD = 0.002         # b (beta) and gk (decay) projections
A_MAX = 16.0             # A = exp(A_log) ~ U(0, 16)
DT_BIAS_RANGE = 0.01     # dt_bias ~ U(-0.01, 0.01)
ALPHA_MIN = 1e-6         # alpha clamped >= 1e-6 (log_alpha >= log 1e-6)
L2_EPS = 1e-12           # as torch.nn.functional.normalize: x / max(||x||, eps)


# ----------------------------------------------------------------------------- parameters
# log(U(0, 16)); the open lower end keeps log finite (the lower bound is the smallest positive
# float32).
_a_log_init = nn.Draws("uniform", lo=float(jnp.finfo(jnp.float32).tiny), hi=A_MAX, post=jnp.log)


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


# ----------------------------------------------------------------------------- mixer
def resolve_impl(cfg) -> str:
  """model.deltanet.impl with "auto" resolved: the Pallas kernels on GPU, chunked elsewhere."""
  impl = cfg.model.deltanet.impl
  if impl == "auto":
    return "kernel" if pallas.on_gpu() else "chunked"
  return impl


def rule_options(cfg, kernel: bool = True) -> delta_rule_op.DeltaRuleOptions:
  """model.deltanet.chunk_size and (kernel=True) model.deltanet.kernel.* as the op's typed
  options; a bad value or an unknown name is one ConfigError naming it. The kernel options are
  read only where the kernels run, as before the op had options."""
  dn = cfg.model.deltanet
  opts = dict(dn.get("kernel", {})) if kernel else {}
  try:
    return delta_rule_op.options_from(int(dn.chunk_size), **opts)
  except (TypeError, ValueError) as e:
    raise ConfigError(f"model.deltanet.kernel={opts} with model.deltanet.chunk_size="
                      f"{dn.chunk_size}: {e}") from None


def delta_rule(cfg, q, k, v, log_alpha, beta, initial_state=None):
  """The delta rule as model.deltanet.impl selects it (auto | chunked | recurrent | kernel)."""
  impl = resolve_impl(cfg)
  if impl not in delta_rule_op.IMPLS:
    raise ConfigError(f"model.deltanet.impl={impl!r} is not a delta rule implementation; "
                      f"expected 'auto' or one of {list(delta_rule_op.IMPLS)}.")
  c = int(cfg.model.deltanet.chunk_size)
  if impl == "kernel" and (c < 1 or c & (c - 1)):
    raise ConfigError(f"model.deltanet.chunk_size={c} must be a power of two with "
                      f"model.deltanet.impl='kernel' (Triton tensor sizes).")
  return delta_rule_op.delta_rule(q, k, v, log_alpha, beta, initial_state, impl=impl,
                                  options=rule_options(cfg, kernel=impl == "kernel"))


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
  o, _ = delta_rule(cfg, inp["q"], inp["k"], inp["v"], inp["log_alpha"], inp["beta"])
  return deltanet_output(jax.tree_util.tree_map(jnp.asarray, p), o, inp, cfg)
