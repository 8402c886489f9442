"""Pallas kernels (lightning_jax/kernels) vs their pure-JAX references, in the Pallas interpreter.

float32, fresh random inputs each run (seed in the messages), T not a multiple of the chunk,
a non-zero initial state, the state split over Dv blocks (partial sums in the backward).
"""
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import step as step_bench
from configs import tiny
from lightning_jax.config import ConfigError
from lightning_jax.kernels import delta_rule as kdr
from lightning_jax.layers import deltanet as dn
from lightning_jax.layers import sparse_attention as gsa


def _seed():
  return int(np.random.randint(1 << 30))


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _inputs(seed, b=1, t=100, h=2, dk=16, dv=8):
  rng = np.random.default_rng(seed)
  unit = lambda a: a / np.linalg.norm(a, axis=-1, keepdims=True)
  q = unit(rng.standard_normal((b, t, h, dk)))
  k = unit(rng.standard_normal((b, t, h, dk)))
  v = rng.standard_normal((b, t, h, dv))
  # head 0 mild decay (the state carries across chunks), head 1 model-like strong decay
  sp = np.log1p(np.exp(rng.standard_normal((b, t, h)) - 2.0))
  log_alpha = np.maximum(-np.array([0.1, 8.0])[:h] * sp, np.log(1e-6))
  beta = 1.0 / (1.0 + np.exp(-rng.standard_normal((b, t, h))))
  s0 = rng.standard_normal((b, h, dv, dk))
  return tuple(a.astype(np.float32) for a in (q, k, v, log_alpha, beta, s0))


KW = dict(chunk_size=32, block_v=4, block_v_bwd=4, interpret=True)   # 4 chunks, 2 Dv blocks


@pytest.mark.parametrize("bwd", ["fused", "split"])
def test_delta_rule_kernel_forward_and_gradients_match_reference(bwd):
  seed = _seed()
  args = _inputs(seed)                                 # T = 100 = 3 x 32 + 4 (padded tail)
  _check_against_recurrence(
      lambda *a: kdr.chunk_gated_delta_rule(*a[:5], initial_state=a[5], bwd=bwd, **KW),
      args, seed, f"bwd={bwd}")


def _check_against_recurrence(rule, args, seed, what):
  """rule(q, k, v, log_alpha, beta, s0) -> (o, S_T) == the token-by-token recurrence: output and
  final state to 1e-5, the six input gradients of a random linear loss of both to 1e-4."""
  rng = np.random.default_rng(seed + 1)
  ct_o = rng.standard_normal(args[2].shape).astype(np.float32)
  ct_s = rng.standard_normal(args[5].shape).astype(np.float32)

  def loss(fn):
    def f(q, k, v, la, b, s0):
      o, s = fn(q, k, v, la, b, s0)
      return jnp.sum(o * ct_o) + jnp.sum(s * ct_s), (o, s)
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3, 4, 5), has_aux=True))

  (_, (o_k, s_k)), g_k = loss(rule)(*args)
  (_, (o_r, s_r)), g_r = loss(lambda *a: dn.recurrent_gated_delta_rule(*a[:5], a[5]))(*args)
  assert o_k.shape == o_r.shape and s_k.shape == s_r.shape
  assert np.all(np.isfinite(np.asarray(o_k))), f"seed={seed} {what}"
  assert _rel(o_k, o_r) <= 1e-5, f"seed={seed} {what} output rel err {_rel(o_k, o_r)}"
  assert _rel(s_k, s_r) <= 1e-5, f"seed={seed} {what} final state rel err {_rel(s_k, s_r)}"
  for name, a, b in zip(("q", "k", "v", "log_alpha", "beta", "initial_state"), g_k, g_r):
    assert np.linalg.norm(np.asarray(b)) > 0, f"seed={seed} reference d{name} is zero"
    assert _rel(a, b) <= 1e-4, f"seed={seed} {what} d{name} rel err {_rel(a, b)}"


@pytest.mark.parametrize("fast", [None, "merged"])
def test_delta_rule_kernel_bfloat16_inputs_close_to_float32(fast):
  """bf16 q/k/v (bf16 matmul operands inside the kernels); fast: the Pallas prep with the
  merged backward and bf16 saved states (forward and dS kernels write them), gradients
  included."""
  seed = _seed()
  args = _inputs(seed, t=64, h=1, dv=16)
  bf = [a.astype(jnp.bfloat16) for a in args[:3]] + list(args[3:])
  kw = dict(KW, prep="pallas", bwd=fast, block_k_grads=8,
            state_dtype=jnp.bfloat16) if fast else KW
  ct = np.random.default_rng(seed + 1).standard_normal(args[2].shape).astype(np.float32)

  def run(rule, a):
    def f(*x):
      o, s = rule(*x)
      return jnp.sum(o.astype(jnp.float32) * ct) + jnp.sum(s), (o, s)
    if not fast:
      return rule(*a), None
    (_, out), g = jax.value_and_grad(f, argnums=(0, 1, 2, 3, 4), has_aux=True)(*a)
    return out, g
  (o_b, s_b), g_b = jax.jit(lambda *a: run(
      lambda *x: kdr.chunk_gated_delta_rule(*x[:5], initial_state=x[5], **kw), a))(*bf)
  (o_r, s_r), g_r = jax.jit(lambda *a: run(
      lambda *x: dn.recurrent_gated_delta_rule(*x[:5], x[5]), a))(*args)
  assert o_b.dtype == jnp.bfloat16 and s_b.dtype == jnp.float32
  assert _rel(o_b, o_r) <= 3e-2, f"seed={seed} bf16 output rel err {_rel(o_b, o_r)}"
  assert _rel(s_b, s_r) <= 3e-2, f"seed={seed} bf16 state rel err {_rel(s_b, s_r)}"
  for i, (name, a, b) in enumerate(zip(("q", "k", "v", "log_alpha", "beta"), g_b or (),
                                       g_r or ())):
    assert a.dtype == jnp.asarray(bf[i]).dtype, f"d{name} dtype {a.dtype}"
    assert _rel(a, b) <= 3e-2, f"seed={seed} bf16 d{name} rel err {_rel(a, b)}"


def test_delta_rule_kernel_config_selection_and_bad_input(caplog):
  seed = _seed()
  cfg = tiny.get_config()
  cfg.model.deltanet.impl = "kernel"
  args = _inputs(seed, t=40, h=1)
  kdr._FALLBACK_LOGGED.clear()
  with caplog.at_level(logging.WARNING, logger="lightning_jax.kernels"):
    o, s = jax.jit(lambda *a: dn._delta_rule(cfg, *a))(*args[:5])
  assert "running the pure-JAX chunked delta rule" in caplog.text      # visible CPU fallback
  o_c, s_c = jax.jit(dn.chunk_gated_delta_rule, static_argnums=5)(*args[:5],
                                                                 cfg.model.deltanet.chunk_size)
  assert _rel(o, o_c) <= 1e-6, f"seed={seed}"
  cfg.model.deltanet.chunk_size = 48
  with pytest.raises(ConfigError, match="chunk_size=48 must be a power of two"):
    dn._delta_rule(cfg, *args[:5])
  with pytest.raises(ValueError, match="block_v=3 must be a power of two"):
    kdr.chunk_gated_delta_rule(*args[:5], chunk_size=32, block_v=3, interpret=True)


def test_unit_lower_inverse_matches_numpy():
  seed = _seed()
  rng = np.random.default_rng(seed)
  for c in (1, 16, 64):
    a = np.tril(rng.uniform(-1, 1, (3, c, c)), -1).astype(np.float32)
    ref = np.linalg.inv(np.eye(c) + a.astype(np.float64))
    got = np.asarray(kdr.unit_lower_inverse(a))
    err = np.abs(got - ref).max() / np.abs(ref).max()
    assert err <= 1e-5, f"seed={seed} C={c} max rel err {err}"
  # the hand-written backward vs autodiff through the series (strictly lower entries only)
  c = 32
  a = np.tril(rng.uniform(-1, 1, (2, c, c)), -1).astype(np.float32)
  ct = rng.standard_normal((2, c, c)).astype(np.float32)
  g = jax.grad(lambda x: jnp.sum(kdr.unit_lower_inverse(x) * ct))(a)
  g_ref = jax.grad(lambda x: jnp.sum(kdr._unit_lower_inverse(x) * ct))(a)
  g_ref = np.where(np.tril(np.ones((c, c)), -1) > 0, g_ref, 0.0)
  assert _rel(g, g_ref) <= 1e-5, f"seed={seed} inverse gradient rel err {_rel(g, g_ref)}"


def test_gsa_kernel_impl_is_a_config_error():
  cfg = tiny.get_config()
  cfg.model.gsa.impl = "kernel"
  x = np.zeros((1, 8, cfg.model.d_model), np.float32)
  with pytest.raises(ConfigError, match="model.gsa.impl='kernel' is not available"):
    gsa.gsa_apply(None, None, x, None, cfg)


def test_step_bench_config_and_overrides():
  cfg = tiny.get_config()
  step_bench.apply_overrides(cfg, ["model.deltanet.impl=kernel", "model.rope_base=500",
                                   "model.mtp.enabled=False"])
  assert cfg.model.deltanet.impl == "kernel" and cfg.model.rope_base == 500.0
  assert cfg.model.mtp.enabled is False
  with pytest.raises(ConfigError, match="no field 'model.nope'"):
    step_bench.apply_overrides(cfg, ["model.nope=1"])
  with pytest.raises(ConfigError, match="must look like section.field=value"):
    step_bench.apply_overrides(cfg, ["model.d_model"])
  cfg = step_bench.bench_config(cfg, layers=8, seq=256, batch=3, n_dev=2)
  assert (cfg.model.n_layers, cfg.train.seq_len, cfg.train.global_batch,
          cfg.train.micro_batch) == (8, 256, 6, 0)
  with pytest.raises(ConfigError, match="--layers=6 must be a multiple of the pattern length 4"):
    step_bench.bench_config(cfg, layers=6)


def test_delta_rule_kernel_options_come_from_the_config(monkeypatch):
  """model.deltanet.kernel's keys reach chunk_gated_delta_rule; a bad value or an unknown name is
  a ConfigError naming the field before anything is traced."""
  cfg = tiny.get_config()
  cfg.model.deltanet.impl = "kernel"
  monkeypatch.setattr(kdr, "_FORCE_INTERPRET", True)
  seen = {}
  monkeypatch.setattr(kdr, "sharded", lambda rule, *a: seen.update(rule.keywords))
  cfg.model.deltanet.kernel.bwd = "split_pallas"
  cfg.model.deltanet.kernel.prep = "pallas"
  kdr.select_and_run(cfg, *([None] * 5))
  assert seen["bwd"] == "split_pallas" and seen["prep"] == "pallas", seen
  cfg.model.deltanet.kernel.bwd = "sideways"
  with pytest.raises(ConfigError, match=r"model.deltanet.kernel=.*bwd='sideways' must be"):
    kdr.select_and_run(cfg, *([None] * 5))
  cfg.model.deltanet.kernel.bwd = "fused"
  cfg.model.deltanet.kernel.warp_speed = 9
  with pytest.raises(ConfigError, match=r"unknown delta rule kernel option\(s\) \['warp_speed'\]"):
    kdr.select_and_run(cfg, *([None] * 5))


def test_delta_rule_kernel_under_a_data_mesh_matches_reference(monkeypatch):
  """select_and_run shards the kernel over the batch (shard_map) under an 8-device mesh."""
  from lightning_jax import sharding
  seed = _seed()
  cfg = tiny.get_config()
  cfg.model.deltanet.impl = "kernel"
  cfg.model.deltanet.chunk_size = 32
  cfg.model.deltanet.kernel.prep = "xla"        # head dims 8 / 4: below the Pallas prep's 16
  cfg.model.deltanet.kernel.bwd = "fused"
  args = _inputs(seed, b=8, t=40, h=2, dk=8, dv=4)
  monkeypatch.setattr(kdr, "_FORCE_INTERPRET", True)
  mesh = sharding.make_mesh(cfg.mesh)
  assert mesh.size == 8
  with sharding.use_mesh(mesh):
    o, s = jax.jit(lambda *a: dn._delta_rule(cfg, *a))(*args[:5])
  o_r, s_r = jax.jit(dn.recurrent_gated_delta_rule)(*args[:5])
  assert _rel(o, o_r) <= 1e-5, f"seed={seed} sharded output rel err {_rel(o, o_r)}"
  assert _rel(s, s_r) <= 1e-5, f"seed={seed} sharded state rel err {_rel(s, s_r)}"


@pytest.mark.parametrize("prep_bwd,bwd,chunk,b,dv", [("pallas", "split_pallas", 32, 1, 16),
                                                     ("pallas", "merged", 64, 2, 32)])
def test_pallas_prep_path_forward_and_gradients_match_reference(prep_bwd, bwd, chunk, b, dv):
  """prep='pallas' (the chunk quantities in a Pallas kernel) through the whole rule, float32,
  T = 100 (a padded tail) with chunk 32 (two 16-row sub-blocks per chunk) or 64 (four), vs the
  recurrence; the recurrence's backward split into the dS kernel + the parallel per-chunk
  gradient kernel + the prep's backward kernel, or merged (the per-chunk gradients inside the
  prep's backward kernel); Dv blocks in the recurrence kernels (block_v=8), two
  column blocks in the per-chunk backward kernels (block_k_grads=8 of Dk = 16); the merged
  case with B = 2 and Dv = 32 != Dk."""
  seed = _seed()
  args = _inputs(seed, b=b, dk=16, dv=dv)
  rule = lambda *a: kdr.chunk_gated_delta_rule(*a[:5], initial_state=a[5], chunk_size=chunk,
                                               block_v=8, block_v_bwd=8, block_k_grads=8,
                                               interpret=True, prep="pallas", prep_bwd=prep_bwd,
                                               bwd=bwd)
  _check_against_recurrence(rule, args, seed, f"prep_bwd={prep_bwd} bwd={bwd}")


def _prep_opts(c, prep_bwd="pallas", gpu=False, dt=jnp.float32):
  return (("chunk", c), ("dot_dtype", jnp.dtype(dt)), ("interpret", not gpu),
          ("num_warps_prep", 4), ("num_warps_prep_bwd", 8), ("num_stages", 1),
          ("gpu_lowering", gpu), ("prep_bwd", prep_bwd), ("block_k_grads", 8))


@pytest.mark.parametrize("prep_bwd", ["pallas", "xla"])
def test_pallas_prep_chunk64_and_its_backward_match_xla_prep(prep_bwd):
  """The prep kernels alone at chunk 64 (four sub-blocks: the whole block-inverse recursion)
  against the XLA prep (triangular inverse by matmuls, float32 HIGHEST, autodiff), float32:
  the six outputs, and the input gradients for random output cotangents through the backward
  kernel (prep_bwd='pallas') or the XLA prep's autodiff (prep_bwd='xla')."""
  seed = _seed()
  q, k, v, la, b, _ = _inputs(seed, t=128, h=1, dk=16, dv=32)
  opts = _prep_opts(64, prep_bwd)
  rng = np.random.default_rng(seed + 1)
  n = 128 // 64
  cts = tuple(rng.standard_normal((1, 1, n, 64, d)).astype(np.float32)
              for d in (16, 32, 64, 16, 16))
  cts += (rng.standard_normal((1, 1, n, 64)).astype(np.float32),)

  def run(prep):
    def f(args, cts):
      out, vjp = jax.vjp(prep, *args)
      return out, vjp(cts)
    return jax.jit(f)((q, k, v, la, b), cts)
  got, g_k = run(lambda *a: kdr._prep_pallas(*a, opts))
  ref, g_r = run(lambda *a: kdr._prep_xla_cast(*a, dict(opts)))
  for name, a, r in zip(("W", "Uv", "P", "Qg", "Kd", "ge"), got, ref):
    assert a.shape == r.shape, f"{name} {a.shape} != {r.shape}"
    assert _rel(a, r) <= 1e-5, f"seed={seed} {name} rel err {_rel(a, r)}"
  for name, a, r in zip(("q", "k", "v", "log_alpha", "beta"), g_k, g_r):
    assert np.linalg.norm(np.asarray(r)) > 0, f"seed={seed} reference d{name} is zero"
    assert _rel(a, r) <= 1e-5, (f"seed={seed} prep_bwd={prep_bwd} d{name} rel err "
                                f"{_rel(a, r)}")


def test_delta_rule_kernels_lower_for_gpu():
  """Every kernel of the prep='pallas' path (prep, recurrence, their backwards) lowers through
  Pallas' Triton backend for CUDA on this host (bf16 inputs, chunk 64, the benchmark's layout)."""
  from lightning_jax.kernels import common
  q, k, v, la, b, _ = _inputs(0, t=128, h=2, dk=32, dv=32)
  q, k, v = (jnp.asarray(a, jnp.bfloat16) for a in (q, k, v))
  for bwd, names in (("fused", ["gdr_chunk_bwd", "gdr_prep_bwd"]),
                     ("split_pallas", ["gdr_chunk_bwd_states", "gdr_chunk_bwd_grads",
                                       "gdr_prep_bwd"]),
                     ("merged", ["gdr_chunk_bwd_states", "gdr_bwd_merged"])):
    def f(*a):
      rule = lambda *x: kdr.chunk_gated_delta_rule(*x, chunk_size=64, block_v=16, block_v_bwd=32,
                                                   prep="pallas", prep_bwd="pallas", bwd=bwd,
                                                   block_k_grads=16, state_dtype=jnp.bfloat16,
                                                   gpu_lowering=True)[0]
      o, vjp = jax.vjp(rule, *a)
      return o, vjp(o)
    txt = common.lower_for_gpu(f, q, k, v, la, b)
    for name in ["gdr_prep_fwd", "gdr_chunk_fwd"] + names:
      assert name in txt, f"{name} missing from the lowered module (bwd={bwd})"
