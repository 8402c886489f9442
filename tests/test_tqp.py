"""TQP: codebook, rotation, packing, dequantising expert matmul, adapters, conversion, labels, flush."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.linalg

from configs.common import get_base_config
from configs.tiny import get_config as tiny_config
from lightning_jax import nn, optim, tqp
from lightning_jax.config import ConfigError


_deq = jax.jit(tqp.dequantize, static_argnums=(1, 2))


def _seed():
  return int(np.random.SeedSequence().entropy % (2 ** 31))


def _cfg(bits=4, width=None, n_experts=4):
  c = tiny_config()
  c.moe.enabled = True
  c.moe.router = "sigmoid"
  c.moe.n_experts = n_experts
  c.tqp.enabled = True
  c.tqp.bits = bits
  if width is not None:
    c.moe.expert_width = width
  return c


# --------------------------------------------------------------------------- codebook + quantizer
def test_codebook_matches_known_gaussian_limit():
  # As n grows the coordinate law -> N(0, 1/n): 4-bit Lloyd-Max relative MSE -> 0.009497
  # (Max 1960). Our exact-moment Lloyd iteration must reproduce it at n = 4096.
  assert abs(tqp.expected_relative_mse(4096, 4) - 0.009497) < 2e-5
  lv = tqp.codebook(1024, 4)
  assert lv.shape == (16,) and np.all(np.diff(lv) > 0) and np.allclose(lv, -lv[::-1], atol=1e-7)
  # Lloyd-Max is a stationary point: moving any level increases the exact distortion.
  base = tqp.distortion(lv.astype(np.float64), 1024)
  for i in (0, 7, 15):
    for eps in (-0.02, 0.02):
      moved = lv.astype(np.float64).copy()
      moved[i] += eps / math.sqrt(1024)
      assert tqp.distortion(moved, 1024) > base
  assert tqp.codebook(1024, 8).shape == (256,)


@pytest.mark.parametrize("d_in", [4096, 1024])
@pytest.mark.parametrize("bits", [4, 8])
def test_relative_mse_within_5pct_of_theory(d_in, bits):
  seed = _seed()
  k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
  # 8-bit quantile midpoints put ~84% of the error in the two tail cells, so the sample mean is
  # noisy: 4M coordinates give ~1% standard error (4-bit: 0.5M coordinates, ~0.2%).
  d_out = (2 ** 22 if bits == 8 else 2 ** 19) // d_in
  w = 0.02 * jax.random.normal(k1, (d_out, d_in), jnp.float32)
  signs = jax.random.rademacher(k2, (d_in,), jnp.int32).astype(jnp.int8)
  codes, norms = tqp.quantize_rows(w, signs, bits)
  assert codes.dtype == jnp.uint8 and codes.shape == (d_out, d_in * bits // 8)
  q = {"codes": codes, "norms": norms, "signs": signs}
  w_hat = tqp.dequantize(q, bits, d_in).T           # stored layout -> [d_out, d_in]
  rel = float(jnp.sum((w - w_hat) ** 2) / jnp.sum(w ** 2))
  want = tqp.expected_relative_mse(d_in, bits)
  assert abs(rel / want - 1) < 0.05, f"seed={seed} d_in={d_in} bits={bits}: {rel} vs {want}"


def test_fwht_rotation_and_packing():
  seed = _seed()
  rng = np.random.default_rng(seed)
  for n in (2, 512, 4096):
    x = rng.standard_normal((3, n)).astype(np.float32)
    want = x @ scipy.linalg.hadamard(n).astype(np.float32).T
    got = np.asarray(tqp.fwht(jnp.asarray(x)))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-3, err_msg=f"seed={seed} n={n}")
  signs = jnp.asarray(rng.choice([-1, 1], 256).astype(np.int8))
  x = jnp.asarray(rng.standard_normal((5, 256)).astype(np.float32))
  y = tqp.rotate(x, signs)
  np.testing.assert_allclose(jnp.linalg.norm(y, axis=-1), jnp.linalg.norm(x, axis=-1), rtol=1e-5)
  np.testing.assert_allclose(tqp.unrotate(y, signs), x, atol=1e-5, err_msg=f"seed={seed}")
  for bits in (4, 8):
    idx = rng.integers(0, 2 ** bits, (7, 64)).astype(np.uint8)
    packed = tqp.pack(jnp.asarray(idx), bits)
    assert packed.shape == (7, 64 * bits // 8) and packed.dtype == jnp.uint8
    np.testing.assert_array_equal(tqp.unpack(packed, bits), idx, err_msg=f"seed={seed}")


@pytest.mark.parametrize("bits", [4, 8])
def test_packed_storage_bytes_from_compiled_memory_analysis(bits):
  # 120B per-device shape: 58 local experts x [1024, 4096]; nothing is allocated.
  cfg = _cfg(bits)
  cfg.model.d_model, cfg.moe.expert_width = 4096, 1024
  q = tqp.qbase_abstract(cfg, 58)["gate"]
  fn = jax.jit(lambda codes: jnp.sum(tqp.unpack(codes, bits)[..., :8].astype(jnp.int32)))
  ma = fn.lower(q["codes"]).compile().memory_analysis()
  n_weights = 58 * 1024 * 4096
  assert ma.argument_size_in_bytes == n_weights * bits / 8, ma


@pytest.mark.parametrize("bits", [4, 8])
def test_random_base_init_has_cell_probabilities_and_small_temporaries(bits):
  # The random base (qbase_specs' init) draws codes with the codebook's cell probabilities ...
  n = 1024
  init = tqp._codes_init(n, bits, rows_per_block=256)
  shape = (3, 700, tqp.packed_len(n, bits))          # 2100 rows: 8 full blocks + a rest of 52
  key = jax.random.PRNGKey(np.random.default_rng().integers(1 << 30))
  idx = np.asarray(tqp.unpack(init(key, shape, jnp.uint8), bits)).ravel()
  freq = np.bincount(idx, minlength=2 ** bits) / idx.size
  p = tqp.bin_probs(n, bits)
  sigma = np.sqrt(p * (1 - p) / idx.size)
  assert np.all(np.abs(freq - p) < 6 * sigma + 1e-6), np.max(np.abs(freq - p) / sigma)
  # ... and its temporaries stay at one block's size (jax.random.categorical held 2^bits float32
  # draws per weight: 64 bytes per weight at 4 bits, 1 KiB at 8, for the whole leaf at once)
  big = (8, 4096, tqp.packed_len(n, bits))            # 32M weights
  ma = jax.jit(lambda k: tqp._codes_init(n, bits)(k, big, jnp.uint8)).lower(key).compile() \
      .memory_analysis()
  assert ma.temp_size_in_bytes <= 64 * 1024 * n, ma   # <= 64 bytes per weight of ONE block of
  # 1024 rows (2 MiB of weights here), not of the 32M-weight leaf


# --------------------------------------------------------------------------- expert matmul
@pytest.mark.parametrize("width", [32, 24])   # 24: down's d_in is zero-padded to 32
def test_grouped_swiglu_matches_float32_reference(width):
  seed = _seed()
  cfg = _cfg(4, width)
  E, C, d = 4, 8, cfg.model.d_model
  ka, kq, kx = jax.random.split(jax.random.PRNGKey(seed), 3)
  ad = nn.init(tqp.adapter_specs(cfg, E), ka)
  ad = {m: {"a": v["a"] * 300.0, "b": v["b"]} for m, v in ad.items()}   # make A·B matter
  qb = nn.init(tqp.qbase_specs(cfg, E), kq)
  x = jax.random.normal(kx, (E, C, d), jnp.float32)
  got = jax.jit(lambda a, q, x: tqp.tqp_grouped_swiglu(a, q, x, cfg))(ad, qb, x)
  want = jax.jit(lambda a, q, x: tqp.reference_grouped_swiglu(a, q, x, cfg))(ad, qb, x)
  assert got.shape == (E, C, d)
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5 * float(jnp.max(jnp.abs(want))),
                             err_msg=f"seed={seed} width={width}")
  if width == 24:
    assert qb["down"]["signs"].shape == (32,) and ad["down"]["b"].shape == (E, 16, 32)


def test_first_step_gradients_reach_both_adapter_factors_and_not_the_base():
  seed = _seed()
  cfg = _cfg(4)
  E, C, d = 4, 6, cfg.model.d_model
  ka, kq, kx = jax.random.split(jax.random.PRNGKey(seed), 3)
  ad = nn.init(tqp.adapter_specs(cfg, E), ka)       # the real init: A ~ N(0, 1e-4)
  qb = nn.init(tqp.qbase_specs(cfg, E), kq)
  x = jax.random.normal(kx, (E, C, d), jnp.float32)

  def loss(ad, norms, x):
    q = {m: dict(qb[m], norms=norms[m]) for m in tqp.MATRICES}
    return jnp.sum(jnp.sin(tqp.tqp_grouped_swiglu(ad, q, x, cfg)))

  norms = {m: qb[m]["norms"] for m in tqp.MATRICES}
  gfn = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
  g_ad, g_norms, g_x = gfn(ad, norms, x)
  for m in tqp.MATRICES:
    for f in ("a", "b"):
      per_expert = jnp.sum(jnp.abs(g_ad[m][f]), axis=tuple(range(1, g_ad[m][f].ndim)))
      assert bool(jnp.all(per_expert > 0)), f"seed={seed}: zero grad for {m}.{f}: {per_expert}"
    assert float(jnp.max(jnp.abs(g_norms[m]))) == 0.0, f"seed={seed}: base {m} got a gradient"
  # The input's gradient flows only through the adapters: scaling A by 0 kills it.
  zero_a = {m: {"a": v["a"] * 0, "b": v["b"]} for m, v in ad.items()}
  g_x0 = gfn(zero_a, norms, x)[2]
  assert float(jnp.max(jnp.abs(g_x))) > 0 and float(jnp.max(jnp.abs(g_x0))) == 0.0


def test_adapter_count_at_120b_is_2_26b():
  c = get_base_config()
  c.model.n_layers, c.moe.enabled, c.moe.n_experts, c.tqp.enabled = 20, True, 460, True
  per_layer = nn.count(tqp.adapter_specs(c, 460))
  total = per_layer * 20
  assert per_layer == 460 * 3 * 16 * (4096 + 1024)
  assert round(total / 1e9, 2) == 2.26, total
  # spec-level conversion of a stacked model tree (5 groups x 4 positions = 20 layers)
  d, f = 4096, 1024
  ex = {"gate": nn.Spec((460, d, f), ("expert", "embed", "expert_mlp"), nn.zeros),
        "up": nn.Spec((460, d, f), ("expert", "embed", "expert_mlp"), nn.zeros),
        "down": nn.Spec((460, f, d), ("expert", "expert_mlp", "embed"), nn.zeros)}
  layer = {"moe": {"router": {"w": nn.Spec((d, 460), ("embed", None), nn.zeros)}, "experts": ex}}
  specs = {"groups": {f"l{j}": nn.stack(layer, 5) for j in range(4)}}
  p_specs, f_specs = tqp.tqp_specs(specs, c)
  ad = {k: v for k, v in nn.flatten(p_specs).items() if "/adapters/" in k}
  assert sum(math.prod(v.shape) for v in ad.values()) == total
  assert "experts" not in p_specs["groups"]["l2"]["moe"]
  codes = f_specs["groups"]["l3"]["moe"]["experts"]["down"]["codes"]
  assert codes.shape == (5, 460, d, f // 2) and codes.axes[:2] == ("layers", "expert")
  rep = tqp.conversion_report(c, 460, 20)
  # routed base at 4 bits: 115.76B weights x 0.5 byte (+ row norms, signs)
  assert abs(rep["qbase_bytes"] / 1e9 - 115.76e9 * 0.5 / 1e9) < 0.3, rep


# --------------------------------------------------------------------------- conversion, optimizer, flush
def _trained_tree(cfg, key, G=2, E=4):
  d, f = cfg.model.d_model, cfg.moe.expert_width
  ks = jax.random.split(key, 6)
  return {
      "embed": {"proj": jax.random.normal(ks[0], (16, d)) * 0.02},
      "groups": {"l0": {
          "mixer": {"w": jax.random.normal(ks[1], (G, d, d)) * 0.02},
          "moe": {"router": {"w": jax.random.normal(ks[2], (G, d, E)) * 0.02},
                  "shared": {"gate": jnp.ones((G, d, 8)), "up": jnp.ones((G, d, 8)),
                             "down": jnp.ones((G, 8, d))},
                  "experts": {"gate": jax.random.normal(ks[3], (G, E, d, f)) * 0.02,
                              "up": jax.random.normal(ks[4], (G, E, d, f)) * 0.02,
                              "down": jax.random.normal(ks[5], (G, E, f, d)) * 0.02}}}},
      "head": {"w": jnp.zeros((d, 16))},
  }


def test_convert_labels_optimizer_state_and_flush():
  seed = _seed()
  cfg = _cfg(4)
  cfg.tqp.flush_every = 5
  G, E, C = 2, 4, 8
  params0 = _trained_tree(cfg, jax.random.PRNGKey(seed), G, E)
  params, frozen = tqp.convert_moe_to_tqp(params0, cfg)
  moe = params["groups"]["l0"]["moe"]
  assert "experts" not in moe and set(moe["adapters"]) == set(tqp.MATRICES)
  qb = frozen["groups"]["l0"]["moe"]["experts"]
  assert qb["gate"]["codes"].shape == (G, E, cfg.moe.expert_width, cfg.model.d_model // 2)
  # signs differ per layer and per matrix
  s = qb["gate"]["signs"]
  assert not np.array_equal(s[0], s[1]) and not np.array_equal(s[0], qb["up"]["signs"][0])
  # the converted experts reproduce the trained ones up to 4-bit error
  for g in range(G):
    w0 = params0["groups"]["l0"]["moe"]["experts"]["up"][g]
    w1 = _deq(jax.tree.map(lambda a: a[g], qb["up"]), 4, cfg.model.d_model)
    rel = float(jnp.sum((w1 - w0) ** 2) / jnp.sum(w0 ** 2))
    assert rel < 1.3 * tqp.expected_relative_mse(cfg.model.d_model, 4), f"seed={seed}: {rel}"
  # labels and optimizer state only on trainables (frozen is not in params at all)
  labels = optim.group_labels(params)
  assert labels["groups"]["l0"]["moe"]["router"]["w"] == "router"
  assert labels["groups"]["l0"]["moe"]["adapters"]["down"]["b"] == "adapters"
  assert labels["groups"]["l0"]["moe"]["shared"]["up"] == "rest"
  assert labels["head"]["w"] == "rest"
  assert optim.lr_multipliers(cfg) == {"router": 1.0, "adapters": 3.0, "rest": 0.01}
  tx = optax.multi_transform({k: optax.adam(1e-2 * m) for k, m in
                              optim.lr_multipliers(cfg).items()}, optim.group_labels)
  state = tx.init(params)
  float_leaves = [l for l in jax.tree.leaves(state) if hasattr(l, "ndim") and l.ndim > 0]
  assert sum(l.size for l in float_leaves) == 2 * nn.count(params)
  assert not any(l.dtype == jnp.uint8 for l in jax.tree.leaves(state))

  # one step through the experts; only trainables move
  x = jax.random.normal(jax.random.PRNGKey(seed + 1), (E, C, cfg.model.d_model))

  def loss(p):
    ad = jax.tree.map(lambda a: a[0], p["groups"]["l0"]["moe"]["adapters"])
    q = jax.tree.map(lambda a: a[0], qb)
    return (jnp.mean(tqp.tqp_grouped_swiglu(ad, q, x, cfg) ** 2)
            + jnp.sum(p["groups"]["l0"]["moe"]["router"]["w"] ** 2))

  grads = jax.jit(jax.grad(loss))(params)
  upd, state = tx.update(grads, state, params)
  params1 = optax.apply_updates(params, upd)
  a0 = params["groups"]["l0"]["moe"]["adapters"]["gate"]["b"]
  a1 = params1["groups"]["l0"]["moe"]["adapters"]["gate"]["b"]
  assert float(jnp.max(jnp.abs(a1[0] - a0[0]))) > 0

  # flush: off until the step hits flush_every; then A·B is folded into the base
  assert tqp.maybe_flush(params1, frozen, cfg, 3, tx, state)[3] is None
  big = jax.tree.map(lambda a: a, params1)
  big["groups"]["l0"]["moe"]["adapters"] = {
      m: {"a": v["a"] * 200.0, "b": v["b"]}
      for m, v in params1["groups"]["l0"]["moe"]["adapters"].items()}
  eff_before = _deq(jax.tree.map(lambda a: a[0], qb["down"]), 4, cfg.moe.expert_width,
                              jax.tree.map(lambda a: a[0],
                                           big["groups"]["l0"]["moe"]["adapters"]["down"]))
  p2, f2, s2, st = tqp.maybe_flush(big, frozen, cfg, 5, tx, state)
  assert st is not None and st["changed_frac"] > 0
  q2 = f2["groups"]["l0"]["moe"]["experts"]["down"]
  base_after = _deq(jax.tree.map(lambda a: a[0], q2), 4, cfg.moe.expert_width)
  base_before = _deq(jax.tree.map(lambda a: a[0], qb["down"]), 4, cfg.moe.expert_width)
  err_after = float(jnp.sum((base_after - eff_before) ** 2))
  err_before = float(jnp.sum((base_before - eff_before) ** 2))
  assert err_after < 0.25 * err_before, f"seed={seed}: {err_after} vs {err_before}"
  np.testing.assert_array_equal(q2["signs"], qb["down"]["signs"])
  new_a = p2["groups"]["l0"]["moe"]["adapters"]["down"]["a"]
  assert float(jnp.std(new_a)) < 3e-4            # adapters re-drawn at their init scale
  adapter_mu = optax.tree_utils.tree_get_all_with_path(s2, "mu")
  flat_mu = [l for _, mu in adapter_mu for l in jax.tree.leaves(mu["groups"]["l0"]["moe"]
                                                               .get("adapters", {}))]
  assert flat_mu and all(float(jnp.max(jnp.abs(l))) == 0.0 for l in flat_mu)
  router_mu = [l for _, mu in adapter_mu for l in jax.tree.leaves(mu["groups"]["l0"]["moe"]
                                                                 .get("router", {}))]
  assert router_mu and any(float(jnp.max(jnp.abs(l))) > 0 for l in router_mu)


# --------------------------------------------------------------------------- bad input
def test_bad_inputs_are_rejected_with_clear_errors():
  with pytest.raises(ConfigError, match="tqp.bits=3"):
    tqp.codebook(1024, 3)
  cfg = _cfg(3)
  with pytest.raises(ConfigError, match="tqp.bits=3"):
    tqp.qbase_specs(cfg, 4)
  cfg = _cfg(4, 24)
  cfg.tqp.allow_pad = False
  with pytest.raises(ConfigError, match="not a power of two"):
    tqp.adapter_specs(cfg, 4)
  # a checkpoint holding an 8-bit base loaded with tqp.bits=4
  q8 = tqp.qbase_abstract(_cfg(8), 4)
  with pytest.raises(ValueError, match="8-bit base.*tqp.bits=4"):
    tqp.validate_qbase(q8, _cfg(4))
  cfg = _cfg(4)
  bad = _trained_tree(cfg, jax.random.PRNGKey(0))
  bad["groups"]["l0"]["moe"]["experts"]["up"] = jnp.zeros((2, 4, 8, 8))
  with pytest.raises(ValueError, match="experts/up has shape"):
    tqp.convert_moe_to_tqp(bad, cfg)
  with pytest.raises(ValueError, match="no moe/experts"):
    tqp.convert_moe_to_tqp({"head": {"w": jnp.zeros((2, 2))}}, cfg)
