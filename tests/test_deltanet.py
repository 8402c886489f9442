"""Gated DeltaNet (SPEC §2.2): the delta rule's references (the token recurrence vs numpy, the
CPU triangular inverse), the mixer vs a hand-written float64 numpy token loop, causality, q/k
entry order, init statistics, the config's choice of implementation and options. (The chunked
rule and the Pallas kernels against the recurrence: tests/test_ops.py.)"""
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import stage_2b, tiny
from lightning_jax import nn
from lightning_jax.config import ConfigError
from lightning_jax.layers import deltanet as dn
from lightning_jax.layers import rotary
from lightning_jax.ops.delta_rule import api as delta_rule_op
from lightning_jax.ops.delta_rule import reference as ref


def _seed():
  return int(np.random.randint(1 << 30))


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _rule_inputs(seed, b=2, t=130, h=2, dk=16, dv=8):
  """float32 numpy inputs (numpy keeps eager jax compiles out of the test time)."""
  rng = np.random.default_rng(seed)
  unit = lambda a: a / np.linalg.norm(a, axis=-1, keepdims=True)
  q = unit(rng.standard_normal((b, t, h, dk)))
  k = unit(rng.standard_normal((b, t, h, dk)))
  v = rng.standard_normal((b, t, h, dv))
  # head 0: mild decay (the initial state matters across chunks); head 1: model-like decay
  # (A = 8 of U(0,16)), with tokens at the 1e-6 clamp.
  u = rng.standard_normal((b, t, h)) - 2.0
  softplus = np.log1p(np.exp(u))
  log_alpha = np.maximum(-np.array([0.1, 8.0]) * softplus, np.log(1e-6))
  log_alpha[:, :7, 1] = np.log(1e-6)
  beta = 1.0 / (1.0 + np.exp(-rng.standard_normal((b, t, h))))
  s0 = rng.standard_normal((b, h, dv, dk))
  return tuple(a.astype(np.float32) for a in (q, k, v, log_alpha, beta, s0))


# ----------------------------------------------------------------------------- delta rule
def test_recurrence_matches_definition_in_numpy():
  seed = _seed()
  q, k, v, la, beta, s0 = (np.asarray(a, np.float64) for a in _rule_inputs(seed, b=1, t=9))
  s = s0.copy()
  out = np.zeros(v.shape)
  for t in range(q.shape[1]):
    for h in range(q.shape[2]):
      al = np.exp(la[0, t, h])
      kt, vt = k[0, t, h], v[0, t, h]
      s[0, h] = al * s[0, h] + beta[0, t, h] * np.outer(vt - al * s[0, h] @ kt, kt)
      out[0, t, h] = s[0, h] @ q[0, t, h]
  o_r, s_r = ref.recurrent_gated_delta_rule(*_rule_inputs(seed, b=1, t=9))
  assert _rel(o_r, out) <= 1e-5 and _rel(s_r, s) <= 1e-5, f"seed={seed}"
  # the initial state does reach the outputs (the harness's cases carry one)
  o_0, _ = ref.recurrent_gated_delta_rule(*_rule_inputs(seed, b=1, t=9)[:5])
  assert _rel(o_0, o_r) > 1e-2, f"seed={seed}"


def test_unit_lower_solve_matches_triangular_solve_without_lapack():
  """The CPU path's (I + A)^-1 (batched matmuls) equals jax.scipy's triangular solve and the
  float64 inverse, for any chunk length; the chunked rule and its gradient contain no
  triangular solve (a LAPACK custom call on CPU that deadlocked the 2-thread pool)."""
  seed = _seed()
  rng = np.random.default_rng(seed)
  for c in (1, 37, 64):
    a = np.tril(rng.uniform(-1, 1, (3, c, c)), -1).astype(np.float32)
    rhs = rng.standard_normal((3, c, 6)).astype(np.float32)
    exact = np.linalg.inv(np.eye(c) + a.astype(np.float64)) @ rhs
    tri = jax.scipy.linalg.solve_triangular(a + np.eye(c, dtype=np.float32), rhs, lower=True,
                                            unit_diagonal=True)
    got = jax.jit(ref.unit_lower_solve)(a, rhs)
    assert _rel(got, exact) <= 2e-6, f"seed={seed} C={c} vs float64 {_rel(got, exact)}"
    assert _rel(got, tri) <= 2e-6, f"seed={seed} C={c} vs solve_triangular {_rel(got, tri)}"
  q, k, v, la, beta, _ = (jnp.asarray(x) for x in _rule_inputs(seed, b=1, t=40, h=2))
  f = lambda q, k, v, la, b: jnp.sum(ref.chunk_gated_delta_rule(q, k, v, la, b, 16)[0])
  text = str(jax.make_jaxpr(jax.grad(f, argnums=(0, 1, 2, 3, 4)))(q, k, v, la, beta))
  assert "triangular_solve" not in text and "custom_call" not in text


def test_bad_shapes_are_named():
  q, k, v, la, beta, s0 = _rule_inputs(0, t=5)
  with pytest.raises(ValueError, match="log_alpha"):
    ref.chunk_gated_delta_rule(q, k, v, la[:, :4], beta)
  with pytest.raises(ValueError, match="initial_state"):
    ref.recurrent_gated_delta_rule(q, k, v, la, beta, s0[..., :3])


# ----------------------------------------------------------------------------- mixer
def _cfg(impl="chunked"):
  c = tiny.get_config()            # d=64, 4 heads x 16, float32
  c.model.deltanet.chunk_size = 32
  c.model.deltanet.impl = impl
  return c


def _params(cfg, seed):
  """Random parameters of the spec shapes, scaled so every path (biases, D, norm scale,
  gates, decay) is non-trivial; numpy so that no eager jax compiles are spent here."""
  rng = np.random.default_rng(seed)
  def one(path, spec):
    name = "/".join(str(getattr(e, "key", e)) for e in path)
    if name == "A_log":
      return np.log(rng.uniform(0.05, 16.0, spec.shape)).astype(np.float32)
    base = 1.0 if name in ("D", "o_norm/scale") else 0.0
    return (base + 0.2 * rng.standard_normal(spec.shape)).astype(np.float32)
  return jax.tree_util.tree_map_with_path(one, dn.deltanet_specs(cfg), is_leaf=nn.is_spec)


def _consts(t, dh, rope=True):
  return {"rope_dn": rotary.rotary_tables(jnp.arange(t)[None], dh) if rope else None}


def _np_mixer(p, x, cfg, rope=True):
  """Slow float64 token-loop reference of SPEC §2.2, written from the SPEC text."""
  p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), p)
  x = np.asarray(x, np.float64)
  m = cfg.model
  h, dh, eps = m.deltanet.n_heads, m.deltanet.head_dim, m.norm_eps
  bsz, t, _ = x.shape
  silu = lambda z: z / (1.0 + np.exp(-z))
  sigmoid = lambda z: 1.0 / (1.0 + np.exp(-z))

  def conv(y, c):
    w, b = c["w"], c["b"]
    kern = w.shape[0]
    out = np.zeros_like(y)
    for s in range(t):
      acc = b.copy()
      for j in range(kern):
        src = s - (kern - 1) + j
        if src >= 0:
          acc = acc + w[j] * y[:, src]
      out[:, s] = acc
    return out

  def heads(y):
    return y.reshape(bsz, t, h, dh)

  q = heads(silu(conv(x @ p["q"], p["conv_q"])))
  k = heads(silu(conv(x @ p["k"], p["conv_k"])))
  v = heads(silu(conv(x @ p["v"], p["conv_v"])))
  g = heads(x @ p["g"])
  q = q / np.linalg.norm(q, axis=-1, keepdims=True)
  k = k / np.linalg.norm(k, axis=-1, keepdims=True)
  if rope:
    def rot(z):
      z = z.copy()
      for s in range(t):
        for i in range(dh // 2):
          ang = s * 10000.0 ** (-2.0 * i / dh)
          a, b = z[:, s, :, 2 * i].copy(), z[:, s, :, 2 * i + 1].copy()
          z[:, s, :, 2 * i] = a * np.cos(ang) - b * np.sin(ang)
          z[:, s, :, 2 * i + 1] = a * np.sin(ang) + b * np.cos(ang)
      return z
    q, k = rot(q), rot(k)
  beta = sigmoid(x @ p["b"]["w"] + p["b"]["b"])
  sp = np.log1p(np.exp(x @ p["gk"]["w"] + p["gk"]["b"] + p["dt_bias"]))
  alpha = np.maximum(np.exp(-np.exp(p["A_log"]) * sp), 1e-6)
  o = np.zeros((bsz, t, h, dh))
  for bi in range(bsz):
    for hi in range(h):
      s_mat = np.zeros((dh, dh))
      for s in range(t):
        a, kk = alpha[bi, s, hi], k[bi, s, hi]
        s_mat = a * s_mat + beta[bi, s, hi] * np.outer(v[bi, s, hi] - a * s_mat @ kk, kk)
        o[bi, s, hi] = s_mat @ q[bi, s, hi]
  o = o + p["D"][:, None] * np.sum(q * k, -1, keepdims=True) * v
  o = o / np.sqrt(np.mean(o ** 2, -1, keepdims=True) + eps) * p["o_norm"]["scale"]
  y = g * silu(o)
  return y.reshape(bsz, t, h * dh) @ p["o"]


def test_mixer_matches_handwritten_reference():
  seed = _seed()
  cfg = _cfg("chunked")
  p = _params(cfg, seed)
  t = 100                                       # 3 chunks of 32 + a padded tail
  x = np.random.default_rng(seed + 3).standard_normal((2, t, 64)).astype(np.float32)
  f32 = jax.jit(lambda p, x: dn.deltanet_apply(p, x, _consts(t, 16), cfg))
  y = f32(p, x)
  ref = _np_mixer(p, x, cfg)
  assert y.shape == x.shape and y.dtype == jnp.float32
  assert _rel(y, ref) <= 1e-4, f"seed={seed} rel err {_rel(y, ref)}"
  # the recurrent impl gives the same mixer output
  cfg_r = _cfg("recurrent")
  y_r = jax.jit(lambda p, x: dn.deltanet_apply(p, x, _consts(t, 16), cfg_r))(p, x)
  assert _rel(y_r, y) <= 1e-5, f"seed={seed} rel err {_rel(y_r, y)}"
  # bf16 compute (float32 state): its error is within a small multiple of the change that
  # merely rounding the input and the weights to bf16 causes (these random layers amplify
  # input noise ~10x; over 12 seeds the ratio was 1.1-3.0).
  cfg_16 = _cfg("chunked")
  cfg_16.model.dtype = "bfloat16"
  y_16 = jax.jit(lambda p, x: dn.deltanet_apply(p, x, _consts(t, 16), cfg_16))(p, x)
  assert y_16.dtype == jnp.bfloat16
  rnd = lambda a: np.asarray(jnp.asarray(a, jnp.bfloat16).astype(jnp.float32))
  floor = _rel(f32(jax.tree_util.tree_map(rnd, p), rnd(x)), y)
  assert _rel(y_16, y) <= min(5 * floor + 5e-3, 0.15), f"seed={seed} bf16 {_rel(y_16, y)} vs {floor}"


def test_mixer_is_causal():
  seed = _seed()
  cfg = _cfg("chunked")
  p = _params(cfg, seed)
  t, cut = 100, 40
  rng = np.random.default_rng(seed + 5)
  x = rng.standard_normal((2, t, 64)).astype(np.float32)
  x2 = x.copy()
  x2[:, cut + 1:] += rng.standard_normal((2, t - cut - 1, 64)).astype(np.float32)
  f = jax.jit(lambda x: dn.deltanet_apply(p, x, _consts(t, 16), cfg))
  y, y2 = np.asarray(f(x)), np.asarray(f(x2))
  np.testing.assert_allclose(y2[:, :cut + 1], y[:, :cut + 1], rtol=1e-5, atol=1e-6,
                             err_msg=f"seed={seed}: tokens after {cut} changed earlier outputs")
  assert np.abs(y2[:, cut + 1:] - y[:, cut + 1:]).max() > 1e-3, f"seed={seed}"


def test_q_k_are_l2_normalised_then_rotated():
  seed = _seed()
  rng = np.random.default_rng(seed)
  q = (3.0 * rng.standard_normal((1, 6, 2, 16))).astype(np.float32)
  k = rng.standard_normal((1, 6, 2, 16)).astype(np.float32)
  rope = rotary.rotary_tables(jnp.arange(6)[None], 16)
  qr, kr = dn.qk_normalize_rotate(q, k, rope)
  np.testing.assert_allclose(jnp.linalg.norm(qr, axis=-1), 1.0, rtol=1e-5, err_msg=f"seed={seed}")
  np.testing.assert_allclose(jnp.linalg.norm(kr, axis=-1), 1.0, rtol=1e-5, err_msg=f"seed={seed}")
  qn = q / np.linalg.norm(q, axis=-1, keepdims=True)
  np.testing.assert_allclose(qr, rotary.apply_rotary(jnp.asarray(qn), *rope), rtol=1e-5, atol=1e-6)
  # rotary really was applied (position 0 is the identity, later positions are not)
  np.testing.assert_allclose(qr[:, 0], qn[:, 0], rtol=1e-5, atol=1e-6)
  assert np.abs(np.asarray(qr[:, 1:]) - qn[:, 1:]).max() > 1e-2
  q0, _ = dn.qk_normalize_rotate(q, k, None)
  np.testing.assert_allclose(q0, qn, rtol=1e-5, atol=1e-6)


def test_bfloat16_compute_and_full_size_shapes():
  cfg = stage_2b.get_config()                  # d = 4096, 32 heads x 128, bf16 compute
  specs = dn.deltanet_specs(cfg)
  p = nn.abstract(specs)
  x = jax.ShapeDtypeStruct((1, 200, 4096), jnp.float32)
  cs = jax.ShapeDtypeStruct((1, 200, 64), jnp.float32)
  y = jax.eval_shape(lambda p, x, c, s: dn.deltanet_apply(p, x, {"rope_dn": (c, s)}, cfg),
                     p, x, cs, cs)
  assert y.shape == (1, 200, 4096) and y.dtype == jnp.bfloat16
  # 5 projections + 3 convs (w, b) + b, gk (w, b) + A_log, dt_bias, D + o_norm
  assert nn.count(p) == 5 * 4096 ** 2 + 3 * (4 * 4096 + 4096) + 2 * (4096 * 32 + 32) + 3 * 32 + 128
  axes = nn.logical_axes(specs)
  assert axes["q"] == ("embed", "heads") and axes["o"] == ("heads", "embed")


def test_unknown_impl_names_the_field():
  cfg = _cfg("fast")
  p = nn.abstract(dn.deltanet_specs(cfg))
  with pytest.raises(ConfigError, match="model.deltanet.impl"):
    jax.eval_shape(lambda p: dn.deltanet_apply(p, jnp.zeros((1, 4, 64)), {}, cfg), p)


def test_init_statistics():
  seed = _seed()
  cfg = _cfg()
  specs = dn.deltanet_specs(cfg)
  # plus many heads' worth of the per-head parameters, for meaningful statistics
  many_specs = nn.stack({"A_log": specs["A_log"], "dt_bias": specs["dt_bias"]}, 512)
  p, many = jax.jit(lambda key: (nn.init(specs, key), nn.init(many_specs, key)))(
      jax.random.PRNGKey(seed))
  a = np.exp(np.asarray(many["A_log"]))
  assert np.all(a > 0) and np.all(a < 16), f"seed={seed}"
  assert abs(a.mean() - 8.0) < 0.6 and a.max() > 14 and a.min() < 2, f"seed={seed} {a.mean()}"
  dt = np.asarray(many["dt_bias"])
  assert np.all(np.abs(dt) <= 0.01) and dt.std() > 0.004, f"seed={seed}"
  for name in ("q", "k", "v", "g", "o"):
    assert abs(float(np.std(p[name])) - 0.02) < 0.002, f"seed={seed} {name}"
  for name in ("b", "gk"):
    assert abs(float(np.std(p[name]["w"])) - 0.002) < 0.0003, f"seed={seed} {name}"
    assert np.all(np.asarray(p[name]["b"]) == 0)
  np.testing.assert_array_equal(p["D"], 1.0)
  np.testing.assert_array_equal(p["o_norm"]["scale"], 1.0)
  assert p["conv_q"]["w"].shape == (4, 64) and float(np.abs(p["conv_q"]["w"]).max()) <= 0.5


def test_kernel_impl_off_gpu_runs_the_chunked_rule_and_bad_chunk_is_named(caplog, monkeypatch):
  """model.deltanet.impl="kernel" without a GPU: the chunked reference, said once (logger
  "lightning_jax.ops"); a chunk size the kernels cannot take is a ConfigError first."""
  seed = _seed()
  cfg = _cfg("kernel")
  args = _rule_inputs(seed, b=1, t=40, h=2)[:5]
  monkeypatch.setattr(delta_rule_op, "_FALLBACK_LOGGED", set())
  with caplog.at_level(logging.WARNING, logger="lightning_jax.ops"):
    o, s = jax.jit(lambda *a: dn.delta_rule(cfg, *a))(*args)
  if jax.default_backend() != "gpu":
    assert "running the chunked reference instead" in caplog.text
  o_c, s_c = jax.jit(ref.chunk_gated_delta_rule, static_argnums=5)(*args, 32)
  assert _rel(o, o_c) <= 1e-5, f"seed={seed}"
  cfg.model.deltanet.chunk_size = 48
  with pytest.raises(ConfigError, match="chunk_size=48 must be a power of two"):
    dn.delta_rule(cfg, *args)


def test_kernel_options_come_from_the_config():
  """model.deltanet.chunk_size and model.deltanet.kernel.* become the op's typed options; a bad
  value or an unknown name is a ConfigError naming the field before anything is traced."""
  cfg = _cfg("kernel")
  cfg.model.deltanet.kernel.num_stages = 1
  opts = dn.rule_options(cfg)
  assert opts == delta_rule_op.DeltaRuleOptions(chunk=32, prep="pallas", block_v_bwd=32,
                                                num_warps_bwd=4, num_stages=1), opts
  cfg.model.deltanet.kernel.bwd = "sideways"
  with pytest.raises(ConfigError, match=r"model.deltanet.kernel=.*bwd='sideways' must be"):
    dn.rule_options(cfg)
  # read only where the kernels run: the chunked / recurrent references ignore them
  assert dn.rule_options(cfg, kernel=False) == delta_rule_op.DeltaRuleOptions(chunk=32)
  cfg.model.deltanet.kernel.bwd = "split_pallas"
  cfg.model.deltanet.kernel.warp_speed = 9
  with pytest.raises(ConfigError, match=r"unknown delta rule kernel option\(s\) \['warp_speed'\]"):
    dn.rule_options(cfg)
