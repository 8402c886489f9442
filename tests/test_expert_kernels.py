"""TQP's expert matmul (ops/expert_matmul): tqp's XLA path equals the op's references, the
kernels inside the TQP SwiGLU with gradients, and bad input. (The kernels against the references
and their CUDA lowering at the 120B shape: tests/test_ops.py.)"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.tiny import get_config as tiny_config
from lightning_jax import nn, tqp
from lightning_jax.config import ConfigError
from lightning_jax.ops.expert_matmul import api as expert_matmul
from lightning_jax.ops.expert_matmul import reference as em_reference


def _seed():
  return int(np.random.SeedSequence().entropy % (2 ** 31))


def _random_base(rng, e, o, n, bits):
  idx = rng.integers(0, 2 ** bits, (e, o, n))
  return {"codes": tqp.pack(jnp.asarray(idx), bits),
          "norms": jnp.asarray(rng.uniform(0.5, 2.0, (e, o)), jnp.float32),
          "signs": jnp.asarray(rng.choice([-1, 1], n), jnp.int8)}


@pytest.mark.parametrize("bits", [4, 8])
def test_tqp_xla_base_and_rotation_equal_the_op_references(bits):
  """tqp's XLA path (unpack, codebook, norms, einsum; tqp.rotate) == ops/expert_matmul's float32
  references, which tests/test_ops.py holds the Pallas kernels against: 3 experts, 30 rows,
  n = 64, 48 outputs; the rotation at n = 1024."""
  seed = _seed()
  rng = np.random.default_rng(seed)
  e, c, n, o = 3, 30, 64, 48
  q = _random_base(rng, e, o, n, bits)
  xr = jnp.asarray(rng.standard_normal((e, c, n)), jnp.float32)
  lv = jnp.asarray(tqp.codebook(n, bits))
  want = tqp._qbase(xr, q, bits, jnp.float32, "xla")
  ref = em_reference.dequantized_matmul(xr, q["codes"], q["norms"], lv, bits)
  scale = float(jnp.max(jnp.abs(ref)))
  np.testing.assert_allclose(want, ref, rtol=1e-5, atol=1e-5 * scale, err_msg=f"seed={seed}")
  x = jnp.asarray(rng.standard_normal((2, 5, 1024)), jnp.float32)
  signs = jnp.asarray(rng.choice([-1, 1], 1024), jnp.int8)
  np.testing.assert_allclose(tqp.rotate(x, signs), em_reference.rotate(x, signs), rtol=1e-5,
                             atol=1e-5, err_msg=f"seed={seed}")


@pytest.mark.parametrize("kernel", ["pallas_rotate", "xla_rotate"])
def test_pallas_swiglu_matches_xla_forward_and_gradients(kernel):
  """tqp_grouped_swiglu with tqp.kernel='pallas_rotate' (interpreted; 8 bits, d_model 256: the
  Pallas rotation feeds gate/up, down (width 32) falls back to the XLA rotation; the
  dequantising matmul with the adapter product in its epilogue runs for all three) or
  'xla_rotate' (the same rotation, then XLA's dequantise + einsum) == 'xla': output, and
  gradients to the adapters (through the fused kernel's custom VJP) and the input (the base is
  stop-gradient in both; no tangent reaches a kernel)."""
  bits = 8
  seed = _seed()
  cfg = tiny_config()
  cfg.moe.enabled, cfg.moe.router, cfg.tqp.enabled, cfg.tqp.bits = True, "sigmoid", True, bits
  cfg.model.d_model, cfg.moe.expert_width = 256, 32
  e, c, d = 2, 16, cfg.model.d_model
  ka, kq, kx = jax.random.split(jax.random.PRNGKey(seed), 3)
  ad = nn.init(tqp.adapter_specs(cfg, e), ka)
  ad = {m: {"a": v["a"] * 300.0, "b": v["b"]} for m, v in ad.items()}
  qb = nn.init(tqp.qbase_specs(cfg, e), kq)
  x = jax.random.normal(kx, (e, c, d), jnp.float32)
  w = jnp.sin(jnp.arange(e * c * d, dtype=jnp.float32)).reshape(e, c, d)

  def run(kernel):
    cc = cfg.copy_and_resolve_references()
    cc.tqp.kernel = kernel
    f = lambda a, xx: jnp.sum(tqp.tqp_grouped_swiglu(a, qb, xx, cc) * w)
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(ad, x)

  v, (g_ad, g_x) = run(kernel)
  v_ref, (g_ad_ref, g_x_ref) = run("xla")
  msg = f"seed={seed}"
  np.testing.assert_allclose(v, v_ref, rtol=1e-4, err_msg=msg)
  np.testing.assert_allclose(g_x, g_x_ref, rtol=1e-4, atol=1e-5, err_msg=msg)
  flat, flat_ref = nn.flatten(g_ad), nn.flatten(g_ad_ref)
  for name in flat:
    np.testing.assert_allclose(flat[name], flat_ref[name], rtol=1e-4, atol=1e-5,
                               err_msg=f"{msg} grad {name}")
  assert float(jnp.abs(g_x).max()) > 0, msg


def test_bad_kernel_name_and_shapes_fail_clearly():
  cfg = tiny_config()
  cfg.tqp.kernel = "triton"
  with pytest.raises(ConfigError, match=r"tqp.kernel='triton'.*'auto', 'xla', 'xla_rotate', 'pallas', 'pallas_rot"):
    tqp.base_kernel(cfg)
  cfg.tqp.kernel = "xla"
  assert tqp.base_kernel(cfg) == "xla"
  x = jnp.zeros((2, 16, 64), jnp.float32)
  with pytest.raises(ValueError, match=r"codes .* do not match xr"):
    expert_matmul.tqp_matmul(x, jnp.zeros((2, 32, 64), jnp.uint8), jnp.zeros((2, 32)),
                             jnp.zeros((16,)), 4)
  with pytest.raises(ValueError, match=r"block_m=24 must be a power of two"):
    expert_matmul.tqp_matmul(x, jnp.zeros((2, 32, 32), jnp.uint8), jnp.zeros((2, 32)),
                             jnp.zeros((16,)), 4, block_m=24)
