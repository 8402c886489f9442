"""TQP dequantising expert-matmul kernel (kernels/expert_matmul.py): interpreted Pallas vs the XLA
dequantise-then-einsum path in float32 (4 and 8 bits, padded tiles), the kernel inside the TQP
SwiGLU with gradients, the CUDA lowering at the 120B shape, and bad input."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.tiny import get_config as tiny_config
from lightning_jax import nn, tqp
from lightning_jax.config import ConfigError
from lightning_jax.kernels import common, expert_matmul


def _seed():
  return int(np.random.SeedSequence().entropy % (2 ** 31))


def _random_base(rng, e, o, n, bits):
  idx = rng.integers(0, 2 ** bits, (e, o, n))
  return {"codes": tqp.pack(jnp.asarray(idx), bits),
          "norms": jnp.asarray(rng.uniform(0.5, 2.0, (e, o)), jnp.float32),
          "signs": jnp.asarray(rng.choice([-1, 1], n), jnp.int8)}


@pytest.mark.parametrize("bits,layout,opts", [
    (4, "split", {}), (4, "strided", {}), (4, "split", {"lookup": "select", "w_first": True}),
    (8, "split", {"w_first": True})])      # 8 bits in the default order: the SwiGLU test below
def test_kernel_matches_xla_dequantise_path(bits, layout, opts):
  """3 experts, 30 rows (padded to the 16-row tile), n=64, 48 outputs (padded to 2 x 32): the
  interpreted kernel == tqp's XLA path (unpack, codebook, norms, einsum) and the plain reference,
  for both x layouts, both codebook lookups and both operand orders."""
  seed = _seed()
  rng = np.random.default_rng(seed)
  e, c, n, o = 3, 30, 64, 48
  q = _random_base(rng, e, o, n, bits)
  xr = jnp.asarray(rng.standard_normal((e, c, n)), jnp.float32)
  lv = jnp.asarray(tqp.codebook(n, bits))
  got = expert_matmul.tqp_matmul(xr, q["codes"], q["norms"], lv, bits, block_m=16, block_n=32,
                                 block_k=32, x_layout=layout, interpret=True, **opts)
  want = tqp._qbase(xr, q, bits, jnp.float32, "xla")
  ref = expert_matmul.reference(xr, q["codes"], q["norms"], lv, bits)
  msg = f"seed={seed} bits={bits} layout={layout} {opts}"
  assert got.shape == (e, c, o) and got.dtype == jnp.float32, msg
  scale = float(jnp.max(jnp.abs(want)))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * scale, err_msg=msg)
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * scale, err_msg=msg)


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


def test_pallas_rotation_matches_tqp_rotate_and_feeds_the_presplit_matmul():
  """expert_matmul.rotate (one Pallas pass, interpreted) == tqp.rotate for n = 1024 (32 x 32),
  split into the 4-bit [even | odd] layout, with a padded row block (the natural layout runs in
  the SwiGLU test below); fed to tqp_matmul(x_layout='presplit') it == the XLA path."""
  seed = _seed()
  rng = np.random.default_rng(seed)
  msg = f"seed={seed}"
  for n, split in ((1024, True),):
    x = jnp.asarray(rng.standard_normal((2, 5, n)), jnp.float32)
    signs = jnp.asarray(rng.choice([-1, 1], n), jnp.int8)
    got = expert_matmul.rotate(x, signs, split=split, block_rows=8, interpret=True)
    want = tqp.rotate(x, signs)
    want_layout = expert_matmul.split_even_odd(want) if split else want
    np.testing.assert_allclose(got, want_layout, rtol=1e-5, atol=1e-5, err_msg=f"{msg} n={n}")
  q = _random_base(rng, 2, 16, 1024, 4)
  lv = jnp.asarray(tqp.codebook(1024, 4))
  y = expert_matmul.tqp_matmul(got, q["codes"], q["norms"], lv, 4, x_layout="presplit",
                               block_m=16, block_n=16, interpret=True)
  y_ref = tqp._qbase(want, q, 4, jnp.float32, "xla")
  np.testing.assert_allclose(y, y_ref, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(y_ref))),
                             err_msg=msg)


@pytest.mark.parametrize("bits,opts", [(4, {}), (8, {}), (4, {"lookup": "select", "w_first": True}),
                                       (4, {"x_layout": "strided"})])
def test_kernel_lowers_for_cuda_at_120b_shape(bits, opts):
  """Pallas -> Triton lowering (on this host) of the native kernel with the default tiles (and the
  other lookup / operand order / layout) at one device's 120B gate/up shape: 58 experts x 13824
  rows, 4096 -> 1024."""
  S = jax.ShapeDtypeStruct
  n, o = 4096, 1024
  args = (S((58, 13824, n), jnp.bfloat16), S((58, o, n * bits // 8), jnp.uint8),
          S((58, o), jnp.float32), S((2 ** bits,), jnp.float32))
  text = common.lower_for_gpu(
      lambda x, cd, nr, lv: expert_matmul.tqp_matmul(x, cd, nr, lv, bits, gpu_lowering=True, **opts),
      *args)
  assert "__gpu$xla.gpu.triton" in text and f"tqp{bits}_expert_matmul" in text
  if not opts:        # the one-pass rotation that feeds it (4 bits: writing the split layout)
    text = common.lower_for_gpu(
        lambda x, s: expert_matmul.rotate(x, s, split=bits == 4, gpu_lowering=True),
        args[0], S((n,), jnp.int8))
    assert "tqp_rotate" in text
    # and the variant with the rank-16 adapter product in the epilogue
    text = common.lower_for_gpu(
        lambda x, cd, nr, lv, xb, a: expert_matmul.tqp_matmul_adapter(
            x, cd, nr, lv, bits, xb, a, gpu_lowering=True),
        *args, S((58, 13824, 16), jnp.bfloat16), S((58, o, 16), jnp.bfloat16))
    assert f"tqp{bits}_expert_matmul" in text


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
