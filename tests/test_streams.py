"""Hyper-connection streams (SPEC §2.5): Sinkhorn's properties (the op, ops/sinkhorn), coefficients,
mixing against a slow reference."""
import jax
import jax.numpy as jnp
import numpy as np

from configs import tiny
from lightning_jax import nn
from lightning_jax.layers import streams
from lightning_jax.ops.sinkhorn.api import sinkhorn


def _seed():
  return np.random.randint(1 << 30)


def test_sinkhorn_doubly_stochastic():
  seed = _seed()
  # logit spread 0.5: twice what a_res=0.1 x phi_res (N(0, 0.02) over 4*4096 inputs) gives at init
  logits = 0.5 * jax.random.normal(jax.random.PRNGKey(seed), (256, 4, 4))
  m = np.asarray(sinkhorn(logits, 20, 1e-6))
  assert np.all(m >= 0)
  np.testing.assert_allclose(m.sum(-1), 1.0, atol=1e-5, err_msg=f"rows, seed {seed}")
  np.testing.assert_allclose(m.sum(-2), 1.0, atol=1e-5, err_msg=f"cols, seed {seed}")
  # invariant to adding a constant per row (the reference subtracts the row max)
  m2 = sinkhorn(logits + jnp.arange(4.0)[:, None] * 3.0, 20, 1e-6)
  np.testing.assert_allclose(m2, m, atol=1e-5, err_msg=f"seed {seed}")
  # wide logits: 20 rounds leave rows off (columns are normalised last); more rounds converge
  wide = 2.0 * jax.random.normal(jax.random.PRNGKey(seed + 1), (256, 4, 4))
  w20 = np.asarray(sinkhorn(wide, 20, 1e-6))
  np.testing.assert_allclose(w20.sum(-2), 1.0, atol=1e-5, err_msg=f"seed {seed}")
  w500 = np.asarray(sinkhorn(wide, 500, 1e-6))
  np.testing.assert_allclose(w500.sum(-1), 1.0, atol=1e-4, err_msg=f"seed {seed}")


def _cfg():
  c = tiny.get_config()
  c.model.d_model = 16
  return c


def _ref_apply(p, x, f, eps=1e-6):
  """Slow float64 numpy reference of one hyper-connection sublayer."""
  p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), p)
  x = np.asarray(x, np.float64)
  b, t, s, d = x.shape
  out = np.zeros_like(x)
  for bi in range(b):
    for ti in range(t):
      xf = x[bi, ti].reshape(-1)
      xn = xf / np.sqrt(np.mean(xf ** 2) + eps) * p["norm"]["scale"]
      sig = lambda z: 1 / (1 + np.exp(-z))
      h_pre = sig(p["a_pre"] * (xn @ p["phi_pre"]) + p["b_pre"])
      h_post = 2 * sig(p["a_post"] * (xn @ p["phi_post"]) + p["b_post"])
      r = p["a_res"] * (xn @ p["phi_res"]).reshape(s, s) + p["b_res"]
      m = np.exp(r)
      for _ in range(20):
        m = m / (m.sum(1, keepdims=True) + 1e-6)
        m = m / (m.sum(0, keepdims=True) + 1e-6)
      u = (h_pre[:, None] * x[bi, ti]).sum(0)
      u = u / np.sqrt(np.mean(u ** 2) + eps) * p["in_norm"]["scale"]
      y = f(u)
      out[bi, ti] = m @ x[bi, ti] + h_post[:, None] * y[None, :]
  return out


def test_apply_matches_reference():
  seed = _seed()
  cfg = _cfg()
  keys = jax.random.split(jax.random.PRNGKey(seed), 4)
  p = nn.init(streams.hc_specs(cfg), keys[0])
  # move away from the init so a/b/scales all matter
  p = jax.tree_util.tree_map(lambda a: a + 0.3 * jax.random.normal(keys[1], a.shape), p)
  x = jax.random.normal(keys[2], (2, 3, 4, 16))
  wmat = jax.random.normal(keys[3], (16, 16)) / 4
  out, extras = streams.apply(p, x, lambda u: (jnp.tanh(u @ wmat), 7), cfg)
  assert extras == (7,)
  ref = _ref_apply(p, x, lambda u: np.tanh(u @ np.asarray(wmat, np.float64)))
  np.testing.assert_allclose(out, ref, rtol=2e-5, atol=2e-5, err_msg=f"seed {seed}")
  _, _, h_res = streams.coefficients(p, x, cfg)
  # columns are normalised last, so they are exact; rows are not guaranteed after 20 Sinkhorn
  # iterations at the logit spread of these perturbed parameters (the Sinkhorn test covers rows
  # at the model's scale)
  np.testing.assert_allclose(h_res.sum(-2), 1.0, atol=1e-5, err_msg=f"seed {seed}")


def test_init_values_and_expand_readout():
  cfg = _cfg()
  p = nn.init(streams.hc_specs(cfg), jax.random.PRNGKey(0))
  assert p["phi_res"].shape == (64, 16) and p["phi_pre"].shape == (64, 4)
  assert float(p["a_pre"]) == np.float32(0.1) and float(p["a_res"]) == np.float32(0.1)
  assert not np.any(np.asarray(p["b_res"]))
  e = jax.random.normal(jax.random.PRNGKey(_seed()), (2, 5, 16))
  x = streams.expand(e, 4)
  assert x.shape == (2, 5, 4, 16)
  np.testing.assert_array_equal(x[:, :, 0], e)
  assert not np.any(np.asarray(x[:, :, 1:]))
  r = streams.readout(x, jnp.ones(16))
  m = np.asarray(e) / 4
  np.testing.assert_allclose(r, m / np.sqrt(np.mean(m ** 2, -1, keepdims=True) + 1e-6),
                             rtol=1e-5, atol=1e-6)


def test_post_mixes_alike_elementwise_and_einsum():
  """model.hc.mix: the elementwise stream mix (the default) against the einsum and a float64
  reference, value and gradients, for a float32 state (the reversible stack's) and a bf16 one."""
  seed = _seed()
  ks = jax.random.split(jax.random.PRNGKey(seed), 5)
  h_post = jax.random.uniform(ks[0], (2, 5, 4), minval=0.0, maxval=2.0)
  h_res = jax.nn.softmax(jax.random.normal(ks[1], (2, 5, 4, 4)), axis=-1)
  y = jax.random.normal(ks[2], (2, 5, 24))
  ct = jax.random.normal(ks[4], (2, 5, 4, 24))
  for dt, tol in ((jnp.float32, 1e-6), (jnp.bfloat16, 1e-2)):
    x = jax.random.normal(ks[3], (2, 5, 4, 24)).astype(dt)
    ref = (np.einsum("btsu,btud->btsd", np.asarray(h_res.astype(dt), np.float64),
                     np.asarray(x, np.float64))
           + np.asarray(h_post, np.float64)[..., None] * np.asarray(y, np.float64)[:, :, None])
    got = {}
    for mix in ("elementwise", "einsum"):
      f = lambda hp, hr, x, y: jnp.sum(streams.post((hp, hr), x, y, mix).astype(jnp.float32)
                                       * ct)
      out = streams.post((h_post, h_res), x, y, mix)
      assert out.dtype == dt
      # absolute tolerance on the scale of the values: a sum of products rounds to a few ulps of
      # its largest term, so a small result after cancellation carries that absolute error
      np.testing.assert_allclose(np.asarray(out, np.float64), ref, rtol=tol,
                                 atol=tol * np.max(np.abs(ref)),
                                 err_msg=f"{mix} {dt.__name__}, seed {seed}")
      got[mix] = jax.grad(f, (0, 1, 2, 3))(h_post, h_res, x, y)
    for a, b in zip(got["elementwise"], got["einsum"]):
      b = np.asarray(b, np.float32)
      np.testing.assert_allclose(np.asarray(a, np.float32), b, rtol=tol,
                                 atol=tol * np.max(np.abs(b)), err_msg=f"{dt.__name__}, seed {seed}")


def test_pre_fused_backward_matches_autodiff():
  """model.hc.pre: the written-out backward (fused) against JAX's autodiff (the default) of the
  same forward, values and gradients w.r.t. the state and every stream parameter, on random
  parameters away from init; float32 state to 1e-5, bf16 state against the float32 autodiff to
  bf16's rounding."""
  seed = _seed()
  keys = jax.random.split(jax.random.PRNGKey(seed), 6)
  cfg = _cfg()
  p = nn.init(streams.hc_specs(cfg), keys[0])
  p = jax.tree_util.tree_map(lambda a: a + 0.3 * jax.random.normal(keys[1], a.shape), p)
  x32 = 2.0 * jax.random.normal(keys[2], (2, 5, 4, 16))
  ct_u = jax.random.normal(keys[3], (2, 5, 16))
  ct_post = jax.random.normal(keys[4], (2, 5, 4))
  ct_res = jax.random.normal(keys[5], (2, 5, 4, 4))

  def run(impl, x):
    c = _cfg()
    c.model.hc.pre = impl

    def f(p, x):
      u, (h_post, h_res) = streams.pre(p, x, c)
      return (jnp.sum(u.astype(jnp.float32) * ct_u) + jnp.sum(h_post * ct_post)
              + jnp.sum(h_res * ct_res)), u
    (val, u), g = jax.jit(jax.value_and_grad(f, (0, 1), has_aux=True))(p, x)
    return float(val), u, g

  def rel(a, b):
    a = jnp.concatenate([jnp.ravel(l.astype(jnp.float32)) for l in jax.tree_util.tree_leaves(a)])
    b = jnp.concatenate([jnp.ravel(l.astype(jnp.float32)) for l in jax.tree_util.tree_leaves(b)])
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))

  v_a, u_a, g_a = run("autodiff", x32)
  v_f, u_f, g_f = run("fused", x32)
  msg = f"seed {seed}"
  np.testing.assert_allclose(u_f, u_a, rtol=1e-5, atol=1e-5, err_msg=msg)
  assert abs(v_f - v_a) <= 1e-5 * max(1.0, abs(v_a)), msg
  for k in g_a[0]:
    # a scalar's gradient sums over every token and can nearly cancel (4.7e-5 seen)
    tol = 5e-4 if jnp.ndim(g_a[0][k]) == 0 else 1e-5
    assert rel(g_f[0][k], g_a[0][k]) <= tol, f"{msg}: d{k} {rel(g_f[0][k], g_a[0][k]):.2e}"
  assert rel(g_f[1], g_a[1]) <= 1e-5, f"{msg}: dx {rel(g_f[1], g_a[1]):.2e}"
  # bf16 state: the same inputs rounded, against float32 autodiff on the rounded values
  xb = x32.astype(jnp.bfloat16)
  _, u_b, g_b = run("fused", xb)
  _, u_r, g_r = run("autodiff", xb.astype(jnp.float32))
  assert u_b.dtype == jnp.bfloat16 and g_b[1].dtype == jnp.bfloat16
  assert rel(g_b[1], g_r[1]) <= 2e-2 and rel(g_b[0], g_r[0]) <= 2e-2, msg
  np.testing.assert_allclose(np.asarray(u_b, np.float32), u_r, rtol=3e-2, atol=3e-2, err_msg=msg)


def test_pre_kernel_pair_matches_autodiff():
  """model.hc.pre=kernel: pre and post as a pair of custom VJPs whose backward writes the
  state's gradient with the Pallas kernel (interpreted here), against JAX's autodiff of the same
  forward around a sublayer with weights: values and gradients w.r.t. the state, every stream
  parameter and the sublayer's weights. float32 to 1e-5; a bf16 state under model.remat=
  selective against the same autodiff to bf16's rounding; and under an 8-device mesh (the kernel
  per device) equal to the run without one."""
  from lightning_jax import remat, sharding
  seed = _seed()
  keys = jax.random.split(jax.random.PRNGKey(seed), 5)
  d = 128                                    # the kernel's column block
  base = tiny.get_config()
  base.model.d_model = d
  p = nn.init(streams.hc_specs(base), keys[0])
  p = jax.tree_util.tree_map(lambda a: a + 0.3 * jax.random.normal(keys[1], a.shape), p)
  x32 = 2.0 * jax.random.normal(keys[2], (2, 64, 4, d))
  w = 0.1 * jax.random.normal(keys[3], (d, d))
  ct = jax.random.normal(keys[4], (2, 64, 4, d))

  def run(impl, x, mode="none"):
    c = tiny.get_config()
    c.model.d_model = d
    c.model.hc.pre = impl

    def f(p, x, w):
      layer = remat.wrap(lambda p, x, w: streams.apply(
          p, x, lambda u: (jnp.tanh(u @ w.astype(u.dtype)),), c, interpret=True)[0], mode)
      out = layer(p, x, w)
      return jnp.sum(out.astype(jnp.float32) * ct), out
    (val, out), g = jax.jit(jax.value_and_grad(f, (0, 1, 2), has_aux=True))(p, x, w)
    return float(val), out, g

  def rel(a, b):
    a = jnp.concatenate([jnp.ravel(l.astype(jnp.float32)) for l in jax.tree_util.tree_leaves(a)])
    b = jnp.concatenate([jnp.ravel(l.astype(jnp.float32)) for l in jax.tree_util.tree_leaves(b)])
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))

  msg = f"seed {seed}"
  v_a, o_a, g_a = run("autodiff", x32)
  v_k, o_k, g_k = run("kernel", x32)
  assert rel(o_k, o_a) <= 1e-6 and abs(v_k - v_a) <= 1e-5 * max(1.0, abs(v_a)), msg
  for k in g_a[0]:
    assert rel(g_k[0][k], g_a[0][k]) <= 1e-5, f"{msg}: d{k} {rel(g_k[0][k], g_a[0][k]):.2e}"
  assert rel(g_k[1], g_a[1]) <= 1e-5, f"{msg}: dx {rel(g_k[1], g_a[1]):.2e}"
  assert rel(g_k[2], g_a[2]) <= 1e-5, f"{msg}: dw {rel(g_k[2], g_a[2]):.2e}"
  xb = x32.astype(jnp.bfloat16)
  _, o_b, g_b = run("kernel", xb, "selective")
  _, o_r, g_r = run("autodiff", xb, "selective")
  assert o_b.dtype == jnp.bfloat16 and g_b[1].dtype == jnp.bfloat16 and rel(o_b, o_r) == 0, msg
  for a, b in zip(g_b, g_r):
    assert rel(a, b) <= 1e-2, f"{msg}: bf16 {rel(a, b):.2e}"
  with sharding.use_mesh(sharding.make_mesh(_mesh_cfg(2, 1, 4), jax.devices()[:8])):
    _, _, g_m = run("kernel", xb, "selective")
  for a, b in zip(g_m, g_b):
    assert rel(a, b) <= 1e-6, f"{msg}: mesh {rel(a, b):.2e}"


def _mesh_cfg(data, expert, tensor):
  """The batch (2) splits over data = 2."""
  c = tiny.get_config()
  c.mesh.data, c.mesh.expert, c.mesh.tensor = data, expert, tensor
  return c.mesh


def test_projections_fold_the_norm_into_the_weights():
  """_raw reads the bf16 state itself: RMSNorm(x) W computed as r (x (g W)). In float32 the folded
  form equals the norm-then-projection form that model.compat=reference_cuda keeps; in bf16 the
  projection's GEMM takes the state, not a normalised copy of it (the copy is what XLA wrote out
  as float32 and bf16 arrays of the whole state before)."""
  seed = _seed()
  cfg = _cfg()
  keys = jax.random.split(jax.random.PRNGKey(seed), 3)
  p = nn.init(streams.hc_specs(cfg), keys[0])
  p = jax.tree_util.tree_map(lambda a: a + 0.3 * jax.random.normal(keys[1], a.shape), p)
  x = 3.0 * jax.random.normal(keys[2], (2, 5, 4, 16))
  ref_cfg = _cfg()
  ref_cfg.model.compat = "reference_cuda"
  folded, plain = streams._raw(p, x, cfg), streams._raw(p, x, ref_cfg)
  np.testing.assert_allclose(folded, plain, rtol=1e-5, atol=1e-5, err_msg=f"seed {seed}")
  xb = x.astype(jnp.bfloat16)
  for c, reads_state in ((cfg, True), (ref_cfg, False)):
    jaxpr = jax.make_jaxpr(lambda x_: streams._raw(p, x_, c))(xb)
    (dot,) = [e for e in jaxpr.eqns if e.primitive.name == "dot_general"]
    lhs = dot.invars[0]
    # the folded GEMM's left operand is the input reshaped, nothing computed from it in between
    (reshape,) = [e for e in jaxpr.eqns if e.primitive.name == "reshape"
                  and e.invars[0] is jaxpr.jaxpr.invars[0]]
    assert (lhs is reshape.outvars[0]) == reads_state, c.model.compat
