"""Every implementation of every op against the op's reference (lightning_jax/ops/testing.py),
on fresh random inputs (the seed is in every message); the Pallas kernels run in the Pallas
interpreter off GPU, and their CUDA lowering (Pallas -> Triton IR) is checked on this host.
Then what the ops' api adds: per-device runs under a mesh, the CPU fallback, bad options."""
import logging
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from lightning_jax import sharding as shd
from lightning_jax.ops import testing
from lightning_jax.ops.delta_rule import api as delta_rule_op
from lightning_jax.ops.delta_rule import kernel as delta_kernel
from lightning_jax.ops.head_ce import api as ce_api
from lightning_jax.ops.sparse_attention import api as attention_op


def _seed():
  return int(np.random.randint(1 << 30))


@pytest.mark.parametrize("op,impl,case", testing.checks(),
                         ids=[f"{o}-{i}-{c}" for o, i, c in testing.checks()])
def test_implementation_matches_reference(op, impl, case):
  testing.check(op, impl, case, _seed())


@pytest.mark.parametrize("name", sorted(testing.LOWERINGS))
def test_kernels_lower_for_gpu(name):
  testing.check_lowering(name)


def test_every_op_folder_is_registered_and_has_reference_and_api():
  ops = pathlib.Path(testing.__file__).parent
  folders = {p.name for p in ops.iterdir() if (p / "__init__.py").exists()}
  assert folders == {name.split(".")[0] for name in testing.REGISTRY}, folders
  for f in folders:
    assert (ops / f / "reference.py").exists() and (ops / f / "api.py").exists(), f
  assert len(testing.checks()) >= 2 * len(folders)


def test_harness_fails_a_wrong_implementation(monkeypatch):
  """The harness sees a wrong output and a wrong gradient (not a vacuous comparison)."""
  op = testing.REGISTRY["rms_norm"]
  wrong = testing.Impl(lambda x, s, eps: op.impls["custom_vjp"].fn(x, s * 1.001, eps), ("f32",))
  monkeypatch.setitem(op.impls, "wrong", wrong)
  with pytest.raises(AssertionError, match="output 0 rel err"):
    testing.check("rms_norm", "wrong", "f32", 0)
  flat = testing.Impl(lambda x, s, eps: op.impls["custom_vjp"].fn(
      x, jax.lax.stop_gradient(s), eps), ("f32",))
  monkeypatch.setitem(op.impls, "flat", flat)
  with pytest.raises(AssertionError, match=r"d\(input 1\) rel err"):
    testing.check("rms_norm", "flat", "f32", 0)


def _mesh4():
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]).reshape(1, 4, 1),
                           ("data", "expert", "tensor"))
  return mesh, NamedSharding(mesh, P(("data", "expert")))


def test_delta_rule_api_runs_the_kernels_per_device_under_a_mesh():
  """api.delta_rule(impl="kernel") shards the kernels over the batch (shard_map) under an
  8-device mesh and equals the recurrence (head dims 8 / 4: the XLA prep)."""
  seed = _seed()
  args = testing.delta_inputs(np.random.default_rng(seed), 8, 40, 2, 8, 4)[:5]
  opts = delta_rule_op.DeltaRuleOptions(chunk=32, prep="xla", interpret=True)
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(8, 1, 1),
                           ("data", "expert", "tensor"))
  with shd.use_mesh(mesh):
    o, s = jax.jit(lambda *a: delta_rule_op.delta_rule(*a, impl="kernel", options=opts))(*args)
  o_r, s_r = jax.jit(delta_rule_op.recurrent)(*args)
  assert testing.rel_err(o, o_r) <= 1e-5, f"seed={seed} sharded output"
  assert testing.rel_err(s, s_r) <= 1e-5, f"seed={seed} sharded state"


def test_delta_rule_kernels_undifferentiated_take_the_lean_path():
  """Without a gradient the Pallas rule runs its lean path (the prep writes A, then W / Uv; the
  recurrence kernel makes P, Qg, Kd from q, k and the decays and keeps no per-chunk states), and
  it equals the token-by-token recurrence in float32 with an initial state and a padded tail;
  so do the settings that keep the old primal (the fused prep; fwd_o split) and split2."""
  seed = _seed()
  q, k, v, la, be, s0 = testing.delta_inputs(np.random.default_rng(seed), 2, 100, 2, 16, 32)
  o_r, s_r = jax.jit(delta_rule_op.recurrent)(q, k, v, la, be, s0)
  for st, kernels in ((dict(), {"gdr_prep_a_only", "gdr_prep_inv", "gdr_prep_wy",
                                "gdr_chunk_fwd_qk"}),
                      (dict(prep_fwd="split2"), {"gdr_prep_a_only", "gdr_prep_inv_wy",
                                                 "gdr_chunk_fwd_qk"}),
                      (dict(prep_fwd="fused"), {"gdr_prep_fwd", "gdr_chunk_fwd"}),
                      (dict(fwd_o="split"), {"gdr_prep_a", "gdr_prep_inv", "gdr_prep_wy",
                                             "gdr_chunk_fwd_states", "gdr_chunk_fwd_out"})):
    opts = delta_rule_op.DeltaRuleOptions(chunk=32, block_v=8, interpret=True, **st)
    rule = lambda *a, opts=opts: delta_kernel.chunk_gated_delta_rule(*a, options=opts)
    assert set(re.findall(r"gdr_[a-z_]+", str(jax.make_jaxpr(rule)(q, k, v, la, be, s0)))) \
        == kernels, st
    o, s = jax.jit(rule)(q, k, v, la, be, s0)
    assert testing.rel_err(o, o_r) <= 1e-5, f"seed={seed} {st} output"
    assert testing.rel_err(s, s_r) <= 1e-5, f"seed={seed} {st} final state"


def test_attention_api_runs_the_kernels_per_device_under_a_mesh():
  """api.attend(mode="kernel") under a 4-device mesh with the batch split runs the kernels per
  device and equals the unsharded gather reference, gradients included."""
  seed = _seed()
  rng = np.random.default_rng(seed)
  q, k, v, r = (rng.standard_normal((4, 32, 2, 16)).astype(np.float32) for _ in range(4))
  sel = jnp.asarray(testing.selection(rng, 4, 32, 8))
  opts = attention_op.GSAKernelOptions(interpret=True)
  loss = lambda mode: lambda q, k, v: jnp.sum(attention_op.attend(q, k, v, sel, 16, mode,
                                                                  opts) * r)
  want = jax.jit(jax.grad(loss("gather"), (0, 1, 2)))(q, k, v)
  mesh, bs = _mesh4()
  with shd.use_mesh(mesh):
    got = jax.jit(jax.grad(loss("kernel"), (0, 1, 2)))(*(jax.device_put(a, bs)
                                                         for a in (q, k, v)))
  for name, a, w in zip(("dq", "dk", "dv"), got, want):
    assert testing.rel_err(a, w) <= 1e-5, f"seed={seed} sharded {name}"


def test_flash_attention_per_device_under_a_mesh():
  """Under a mesh with the batch split, flash attention runs per device (shard_map) and equals
  the unsharded call, values and gradients."""
  seed = _seed()
  k = jax.random.split(jax.random.PRNGKey(seed), 5)
  b, t, h, d = 4, 24, 2, 8
  q, kk, v = (jax.random.normal(k[i], (b, t, h, d)) for i in range(3))
  sel = jax.random.randint(k[3], (b, t, 6), 0, t)
  sel = jnp.where(sel <= jnp.arange(t)[None, :, None], sel, -1).at[:, :, 0].set(0)
  r = jax.random.normal(k[4], (b, t, h, d))
  loss = lambda q, kk, v: jnp.sum(attention_op.flash_attention(q, kk, v, sel) * r)
  want = jax.jit(jax.value_and_grad(loss, (0, 1, 2)))(q, kk, v)
  mesh, bs = _mesh4()
  with shd.use_mesh(mesh):
    got = jax.jit(jax.value_and_grad(loss, (0, 1, 2)))(*(jax.device_put(a, bs)
                                                         for a in (q, kk, v)))
  # (the loss is a sum of terms of both signs: its relative error is the float32 summation order's)
  assert abs(float(got[0] - want[0])) <= 1e-5 * float(jnp.sum(jnp.abs(r))), f"seed={seed}"
  for a, w in zip(got[1], want[1]):
    assert testing.rel_err(a, w) <= 1e-5, f"seed={seed}"


def test_kernel_impls_fall_back_off_gpu_once_and_say_so(caplog, monkeypatch):
  """Without a GPU and without options.interpret=True, impl "kernel" runs the chunked reference
  (the delta rule) / the gather reference (attention), said once per backend."""
  if jax.default_backend() == "gpu":
    pytest.skip("the fallback exists off GPU only")
  seed = _seed()
  args = testing.delta_inputs(np.random.default_rng(seed), 1, 40, 1, 16, 8)[:5]
  monkeypatch.setattr(delta_rule_op, "_FALLBACK_LOGGED", set())
  monkeypatch.setattr(attention_op, "_FALLBACK_LOGGED", set())
  opts = delta_rule_op.DeltaRuleOptions(chunk=16)
  with caplog.at_level(logging.WARNING, logger="lightning_jax.ops"):
    o, _ = delta_rule_op.delta_rule(*args, impl="kernel", options=opts)
    delta_rule_op.delta_rule(*args, impl="kernel", options=opts)
  o_c, _ = delta_rule_op.chunked(*args, chunk_size=16)
  assert testing.rel_err(o, o_c) <= 1e-6, f"seed={seed}"
  hits = [r for r in caplog.records if "delta rule's Pallas kernels" in r.getMessage()]
  assert len(hits) == 1 and "chunked reference" in hits[0].getMessage(), caplog.text
  q = jnp.asarray(np.random.default_rng(seed).standard_normal((1, 16, 1, 16)), jnp.float32)
  sel = jnp.zeros((1, 16, 2), jnp.int32)
  with caplog.at_level(logging.WARNING, logger="lightning_jax.ops"):
    y = attention_op.attend(q, q, q, sel, 8, "kernel")
  assert testing.rel_err(y, attention_op.attend(q, q, q, sel, 8, "gather")) <= 1e-6
  assert sum("GSA attention kernels" in r.getMessage() for r in caplog.records) == 1


def test_bad_kernel_options_are_named():
  with pytest.raises(ValueError, match="block_v=3 must be a power of two"):
    delta_rule_op.DeltaRuleOptions(block_v=3)
  with pytest.raises(ValueError, match="prep='cuda' must be 'pallas' or 'xla'"):
    delta_rule_op.DeltaRuleOptions(prep="cuda")
  with pytest.raises(ValueError, match="state_dtype='float16' must be"):
    delta_rule_op.DeltaRuleOptions(state_dtype="float16")
  with pytest.raises(ValueError, match="fwd_o='parallel' must be 'fused' or 'split'"):
    delta_rule_op.DeltaRuleOptions(fwd_o="parallel")
  args = testing.delta_inputs(np.random.default_rng(0), 1, 8, 1, 8, 8)[:5]
  with pytest.raises(ValueError, match="chunk=48 must be a power of two"):
    delta_kernel.chunk_gated_delta_rule(*args, options=delta_rule_op.DeltaRuleOptions(chunk=48))
  with pytest.raises(ValueError, match="prep='pallas' needs chunk, Dk and Dv >= 16"):
    delta_kernel.chunk_gated_delta_rule(*args, options=delta_rule_op.DeltaRuleOptions(chunk=8))
  with pytest.raises(ValueError, match="bwd='fused' must be 'split_pallas'"):
    delta_rule_op.options_from(64, bwd="fused")
  with pytest.raises(TypeError, match=r"unknown delta rule kernel option\(s\) \['warp_speed'\]"):
    delta_rule_op.options_from(64, warp_speed=9)
  assert delta_rule_op.options_from(64, bwd="split_pallas", prep_bwd="pallas", num_stages=1) == \
      delta_rule_op.DeltaRuleOptions(chunk=64, num_stages=1)


def _saved_state_dtypes(dtype, **options):
  """{kernel name: dtype of its per-chunk state output} of the delta rule kernels' forward and
  reverse dS kernel, read from the gradient's jaxpr (interpret mode, a tiny shape)."""
  q, k, v, la, b = testing.delta_inputs(np.random.default_rng(0), 1, 64, 1, 16, 16)[:5]
  opts = delta_rule_op.DeltaRuleOptions(chunk=32, interpret=True, block_v=8, block_v_bwd=8,
                                        block_k_grads=8, **options)
  loss = lambda q, k, v: delta_kernel.chunk_gated_delta_rule(
      q, k, v, la, b, options=opts)[0].astype(jnp.float32).sum()
  args = [jnp.asarray(x, dtype) for x in (q, k, v)]
  found = {}

  def walk(jaxpr):
    for e in jaxpr.eqns:
      if e.primitive.name == "pallas_call":
        name = str(e.params.get("name_and_src_info", e.params.get("name"))).split()[0]
        if name in ("gdr_chunk_fwd", "gdr_chunk_bwd_states"):
          # the forward's outputs: o, the states [BH, N, Dv, Dk], S_T; the dS kernel's: dS, dS_0
          found[name] = e.outvars[1 if name == "gdr_chunk_fwd" else 0].aval.dtype
      for p in e.params.values():
        for sub in (p if isinstance(p, (list, tuple)) else [p]):
          inner = getattr(sub, "jaxpr", sub)
          if hasattr(inner, "eqns"):
            walk(inner)

  walk(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(*args).jaxpr)
  assert set(found) == {"gdr_chunk_fwd", "gdr_chunk_bwd_states"}, found
  return found


def test_saved_states_take_the_values_dtype_by_default_as_fla_does():
  """state_dtype="auto" (the default): bf16 values save bf16 per-chunk states and dS, as FLA's
  chunk_gated_delta_rule does (h and dh in the inputs' dtype); float32 values keep float32; an
  explicit float32 overrides bf16 values."""
  bf16, f32 = jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)
  assert set(_saved_state_dtypes(jnp.bfloat16).values()) == {bf16}
  assert set(_saved_state_dtypes(jnp.float32).values()) == {f32}
  assert set(_saved_state_dtypes(jnp.bfloat16, state_dtype="float32").values()) == {f32}
  assert delta_rule_op.DeltaRuleOptions().state_dtype == "auto"


def test_head_passes_of_different_shapes_are_named():
  w = jnp.zeros((4, 10))
  h1, h2 = jnp.zeros((1, 6, 4)), jnp.zeros((1, 5, 4))
  t1, t2 = jnp.zeros((1, 6), jnp.int32), jnp.zeros((1, 5), jnp.int32)
  with pytest.raises(ValueError, match=r"passes of one shape \[B, T, d\].*\(1, 6, 4\), \(1, 5, 4\)"):
    ce_api.chunked_cross_entropies([h1, h2], w, [t1, t2], 16)
  with pytest.raises(ValueError, match="target shapes"):
    ce_api.chunked_cross_entropies([h1, h1], w, [t1, t2], 16)


def _converts_of(jaxpr, shape, in_scan=False):
  """[in a scan body?] for every convert_element_type of a `shape` operand, nested jaxprs too."""
  found = []
  for e in jaxpr.eqns:
    if e.primitive.name == "convert_element_type" and tuple(e.invars[0].aval.shape) == shape:
      found.append(in_scan)
    for v in e.params.values():
      for sub in v if isinstance(v, (tuple, list)) else (v,):
        sub = getattr(sub, "jaxpr", sub)
        if hasattr(sub, "eqns"):
          found += _converts_of(sub, shape, in_scan or e.primitive.name == "scan")
  return found


def test_head_weight_converted_once_per_pass_not_per_chunk():
  """The float32 head weight goes to the compute dtype once in the forward and once in the
  backward, outside the chunk scans, not once per chunk (each reads 2 GB at the 120B's head)."""
  h = jnp.zeros((2, 64, 64), jnp.float32)
  w = jnp.zeros((64, 512), jnp.float32)
  t = jnp.zeros((2, 64), jnp.int32)
  f = jax.grad(lambda h, w: sum(ce_api.chunked_cross_entropies([h, h], w, [t, t], 16,
                                                               jnp.bfloat16)), (0, 1))
  jaxpr = jax.make_jaxpr(f)(h, w).jaxpr
  assert sum(e.primitive.name == "scan" for e in jaxpr.eqns) == 2      # forward and backward
  converts = _converts_of(jaxpr, (64, 512))
  assert converts == [False, False], f"w converts, True = inside a scan: {converts}"


def _dots_with(jaxpr, dim):
  """Number of dot_generals (nested jaxprs too) with an operand dimension of size `dim`."""
  n = 0
  for e in jaxpr.eqns:
    if e.primitive.name == "dot_general" and any(dim in v.aval.shape for v in e.invars):
      n += 1
    for v in e.params.values():
      for sub in v if isinstance(v, (tuple, list)) else (v,):
        sub = getattr(sub, "jaxpr", sub)
        if hasattr(sub, "eqns"):
          n += _dots_with(sub, dim)
  return n


def _scan_dots(jaxpr, dim):
  """dot_generals with an operand dimension `dim` inside the scans of jaxpr's top level."""
  return sum(_dots_with(e.params["jaxpr"].jaxpr, dim) for e in jaxpr.eqns
             if e.primitive.name == "scan")


def test_fused_head_runs_three_vocab_matmuls_per_chunk_and_one_when_evaluating():
  """model.ce_impl=fused: logits, dh and dw once per chunk, the first chunk before ONE scan over
  the rest (its dw starts the float32 sum: no zero-filled [d, V] accumulator; the recompute
  path runs the logits again in its backward: four), the weight converted once and outside the
  scan; without differentiation only the logits matmul runs."""
  h = jnp.zeros((2, 64, 64), jnp.float32)
  w = jnp.zeros((64, 512), jnp.float32)
  t = jnp.zeros((2, 64), jnp.int32)
  fused = lambda h, w: ce_api.fused_cross_entropy_loss([h, h], w, [t, t], 16, jnp.bfloat16,
                                                       (1.0, 0.3))[0]
  recompute = lambda h, w: sum(ce_api.chunked_cross_entropies([h, h], w, [t, t], 16,
                                                              jnp.bfloat16))
  g_fused = jax.make_jaxpr(jax.grad(fused, (0, 1)))(h, w).jaxpr
  assert _scan_dots(g_fused, 512) == 3 and _dots_with(g_fused, 512) == 6
  assert sum(e.primitive.name == "scan" for e in g_fused.eqns) == 1
  # no [d, V] float32 zeros start the sum
  assert not any(e.primitive.name == "broadcast_in_dim" and e.outvars[0].aval.shape == (64, 512)
                 for e in g_fused.eqns)
  # the weight is converted to bf16 once, outside the scan; no [d, V] convert runs per chunk
  # (the others of that shape are dw's: rounded once after the scan, back to float32 at the end)
  assert not any(_converts_of(g_fused, (64, 512)))
  w_in = g_fused.invars[1]
  assert sum(e.primitive.name == "convert_element_type" and e.invars[0] is w_in
             for e in g_fused.eqns) == 1
  assert _dots_with(jax.make_jaxpr(jax.grad(recompute, (0, 1)))(h, w).jaxpr, 512) == 4
  assert _dots_with(jax.make_jaxpr(fused)(h, w).jaxpr, 512) == 1
  with pytest.raises(ValueError, match="one weight per pass; got 1 weights for 2 passes"):
    ce_api.fused_cross_entropy_loss([h, h], w, [t, t], 16, weights=(1.0,))



def _dot_out_dtypes(jaxpr, dim):
  """Output dtypes of the dot_generals (nested jaxprs too) whose result ends in `dim`."""
  found = set()
  for e in jaxpr.eqns:
    if e.primitive.name == "dot_general" and e.outvars[0].aval.shape[-1:] == (dim,):
      found.add(e.outvars[0].aval.dtype)
    for v in e.params.values():
      for sub in v if isinstance(v, (tuple, list)) else (v,):
        sub = getattr(sub, "jaxpr", sub)
        if hasattr(sub, "eqns"):
          found |= _dot_out_dtypes(sub, dim)
  return found


def test_head_logits_in_the_compute_dtype():
  """model.ce_logits=compute: the logits GEMM writes bf16 (half the head's largest tensors),
  and the loss is then exactly the float32 cross-entropy of the bf16-rounded logits, as the
  reference's fused CE computes it; both heads (fused, recompute) agree, and their gradients
  stay within bf16 rounding of the float32-logits ones. A bad value is named."""
  seed = _seed()
  rng = np.random.default_rng(seed)
  h = jnp.asarray(rng.standard_normal((2, 37, 16)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((16, 300)), jnp.float32)
  tg = jnp.asarray(rng.integers(0, 300, (2, 37)), jnp.int32)
  bf = jnp.bfloat16
  lg = jnp.einsum("btd,dv->btv", h.astype(bf), w.astype(bf),
                  preferred_element_type=jnp.float32).astype(bf).astype(jnp.float32)
  want = jnp.mean(jax.nn.logsumexp(lg, -1) - jnp.take_along_axis(lg, tg[..., None], -1)[..., 0])
  fused = lambda h, w, lo: ce_api.fused_cross_entropy_loss([h], w, [tg], 16, bf, logits=lo)[0]
  recompute = lambda h, w, lo: ce_api.chunked_cross_entropy(h, w, tg, 16, bf, lo)
  for name, f in (("fused", fused), ("recompute", recompute)):
    got = f(h, w, "compute")
    assert abs(float(got) - float(want)) <= 1e-5 * abs(float(want)), (name, seed, got, want)
    outs = _dot_out_dtypes(jax.make_jaxpr(lambda h, w: f(h, w, "compute"))(h, w).jaxpr, 300)
    assert outs == {jnp.dtype(bf)}, (name, outs)      # evaluated: the logits GEMMs alone
    g = jax.grad(f, (0, 1))(h, w, "compute")
    g32 = jax.grad(f, (0, 1))(h, w, "float32")
    for a, b in zip(g, g32):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-2,
                                 atol=2e-2 * float(jnp.max(jnp.abs(b))), err_msg=f"{name} {seed}")
  with pytest.raises(ValueError, match=r"logits='bf16' must be one of \['float32', 'compute'\]"):
    fused(h, w, "bf16")


def test_fused_head_keeps_its_weight_gradient_in_the_compute_dtype():
  """model.ce_impl=fused holds dw from the head's forward to the optimizer: in bf16 compute it
  is kept as one bf16 [d, V] residual (the float32 sum rounded once), never a float32 one, and
  the float32 gradient it becomes is that of the recompute path to bf16 rounding. In float32
  nothing changes."""
  seed = _seed()
  rng = np.random.default_rng(seed)
  h = jnp.asarray(rng.standard_normal((2, 37, 8)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((8, 50)), jnp.float32)
  tg = jnp.asarray(rng.integers(0, 50, (2, 37)), jnp.int32)
  for dt, kept in ((jnp.bfloat16, jnp.bfloat16), (jnp.float32, jnp.float32)):
    loss = lambda w_, dt=dt: ce_api.fused_cross_entropy_loss([h], w_, [tg], 16, dt)[0]
    _, pull = jax.vjp(loss, w)
    full = [x.dtype for x in jax.tree_util.tree_leaves(pull) if x.shape == w.shape]
    assert full == [kept], f"seed {seed}, {dt.__name__}: residuals of w's shape {full}"
    g = jax.grad(loss)(w)
    g_ref = jax.grad(lambda w_: ce_api.chunked_cross_entropy(h, w_, tg, 16, dt))(w)
    assert g.dtype == jnp.float32, g.dtype
    tol = 2.0 ** -8 if dt == jnp.bfloat16 else 1e-6
    np.testing.assert_allclose(np.asarray(g), np.asarray(g_ref), rtol=tol,
                               atol=tol * float(jnp.max(jnp.abs(g_ref))), err_msg=f"seed {seed}")
