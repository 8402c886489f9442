"""MoE layer: sharded grouped dispatch vs the dense masked reference, routers, controller, hot
config, bad input, and the 120B parameter count."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import stage_5b, stage_9b, stage_120b, tiny
from lightning_jax import nn, sharding
from lightning_jax.config import ConfigError
from lightning_jax.layers import moe

D = 16


def _cfg(router, n_exp, k, ep=1, **moe_kw):
  c = tiny.get_config()
  c.model.d_model = D
  e = c.moe
  e.enabled, e.router, e.n_experts, e.top_k = True, router, n_exp, k
  e.expert_width, e.shared_width = 8, 8
  e.group_pad = 1
  for kk, v in moe_kw.items():
    e[kk] = v
  c.mesh.expert = ep
  c.mesh.data = -1
  return c


def _setup(c, n_exp, seed):
  rng = np.random.default_rng(seed)
  p = nn.init(moe.moe_specs(c, n_exp), jax.random.PRNGKey(seed))
  st = moe.moe_stats_init(c, n_exp)
  frozen = {}
  if c.tqp.enabled:      # 120B: quantized base experts (frozen) + trained adapters
    from lightning_jax import tqp
    n_pad = moe.padded_experts(c, n_exp)
    del p["experts"]
    p["adapters"] = nn.init(tqp.adapter_specs(c, n_pad), jax.random.PRNGKey(seed + 1))
    frozen = {"experts": nn.init(tqp.qbase_specs(c, n_pad), jax.random.PRNGKey(seed + 2))}
  # uneven loads: one expert strongly preferred, another pushed away
  hot, cold = rng.choice(n_exp, 2, replace=False)
  if c.moe.router == "null_slot":
    p["router"]["logit_bias"] = p["router"]["logit_bias"].at[hot].set(4.0).at[cold].set(-4.0)
  else:
    st["bias"] = st["bias"].at[hot].set(1.0).at[cold].set(-1.0)
  x = jnp.asarray(rng.standard_normal((2, 32, D)), jnp.float32)
  return p, frozen, st, x, hot


def _loss(fn, c, st, frozen=None):
  def f(p, x):
    y, sel, aux, s = fn(p, frozen or {}, st, x, {}, c)
    w = jnp.sin(jnp.arange(y.size, dtype=jnp.float32)).reshape(y.shape)
    return jnp.sum(y * w) + aux, (y, aux, s)
  return jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))


@pytest.mark.parametrize("router,n_exp,k,use_tqp,ep", [("null_slot", 20, 2, False, 4),
                                                       ("sigmoid", 460, 12, True, 8)])
def test_sharded_dispatch_matches_dense_reference(router, n_exp, k, use_tqp, ep):
  """8-device mesh (data 2 x expert 4, and expert 8): grouped all_to_all dispatch with overflow
  rounds (skewed loads) == every expert on every token masked by the gates; 460 experts use the
  120B layout (464 slots, 58 per device) with TQP experts."""
  seed = int(np.random.randint(1 << 30))
  c = _cfg(router, n_exp, k, ep=ep, capacity_factor=0.5)
  c.tqp.enabled = use_tqp
  p, frozen, st, x, hot = _setup(c, n_exp, seed)
  wname = "adapters" if use_tqp else "experts"
  assert jax.tree_util.tree_leaves(p[wname])[0].shape[0] == moe.padded_experts(c, n_exp)
  mesh = sharding.make_mesh(c.mesh)
  assert mesh.shape["expert"] == ep and mesh.size == 8
  with sharding.use_mesh(mesh):
    (_, (y, aux, s)), g = _loss(moe.moe_apply, c, st, frozen)(p, x)
  (_, (y_ref, aux_ref, s_ref)), g_ref = _loss(moe.moe_reference, c, st, frozen)(p, x)
  msg = f"seed={seed} router={router}"
  # the skewed expert overflows the first round (8 tokens per device, C0 < 8): rounds exercised
  c0, _, rounds = moe.capacities(c, 2 * 32 // 8, moe.padded_experts(c, n_exp), ep)
  assert rounds > 0 and float(s["load"][hot]) / 8 > c0, msg
  np.testing.assert_array_equal(s["load"], s_ref["load"], err_msg=msg)
  assert float(s["dropped"]) == 0.0, msg
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5, err_msg=msg)
  np.testing.assert_allclose(aux, aux_ref, rtol=1e-5, atol=1e-6, err_msg=msg)
  flat, flat_ref = nn.flatten(g[0]), nn.flatten(g_ref[0])
  for name in flat:
    np.testing.assert_allclose(flat[name], flat_ref[name], rtol=1e-5, atol=1e-5,
                               err_msg=f"{msg} grad {name}")
  np.testing.assert_allclose(g[1], g_ref[1], rtol=1e-5, atol=1e-5, err_msg=f"{msg} grad x")
  # padding experts (460 -> 464) are never selected and get no gradient
  if moe.expert_layout(c, n_exp)["padding"]:
    for leaf in jax.tree_util.tree_leaves(g[0][wname]):
      assert float(jnp.abs(leaf[n_exp:]).max()) == 0.0, msg


def test_capacity_mode_drops_overflow_and_counts_it():
  seed = int(np.random.randint(1 << 30))
  c = _cfg("null_slot", 6, 2, dispatch="capacity", capacity_factor=0.6, n_null=2)
  p, _, st, x, _ = _setup(c, 6, seed)
  y, sel, aux, s = jax.jit(lambda p, x: moe.moe_apply(p, {}, st, x, {}, c))(p, x)
  n = x.shape[0] * x.shape[1]
  c0, _, _ = moe.capacities(c, n, 6)
  idx = np.asarray(sel["idx"]).reshape(n, 2)
  _, _, gates, _, _ = jax.jit(lambda r, x, i: moe.route(r, st, x, c, None, i))(
      p["router"], x.reshape(n, D), jnp.asarray(idx))
  gates = np.asarray(gates)
  # keep the first c0 picks of each expert in (token, pick) order; the rest are dropped
  seen = np.zeros(6, int)
  dense = np.zeros((n, 6))
  dropped = 0
  for t in range(n):
    for j in range(2):
      e = idx[t, j]
      if e >= 6:
        continue
      if seen[e] < c0:
        dense[t, e] += gates[t, j]
      else:
        dropped += 1
      seen[e] += 1
  msg = f"seed={seed}"
  assert dropped > 0 and float(s["dropped"]) == dropped, msg
  np.testing.assert_allclose(s["dropped_fraction"], dropped / (idx < 6).sum(), rtol=1e-6)
  summary = moe.log_summary(s)
  assert float(summary["dropped_fraction"]) > 0 and float(summary["load_max_over_mean"]) > 1
  xf = np.asarray(x, np.float64).reshape(n, D)
  sw = lambda w, v: (v @ w["gate"] / (1 + np.exp(-(v @ w["gate"])))) * (v @ w["up"]) @ w["down"]
  pe = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), p)
  ref = sw(pe["shared"], xf)
  for e in range(6):
    ref += dense[:, e:e + 1] * sw({m: pe["experts"][m][e] for m in ("gate", "up", "down")}, xf)
  np.testing.assert_allclose(np.asarray(y).reshape(n, D), ref, rtol=1e-4, atol=1e-5, err_msg=msg)


def test_null_slot_gates_and_null_rate():
  seed = int(np.random.randint(1 << 30))
  c = _cfg("null_slot", 20, 2)
  p = nn.init(moe.moe_specs(c, 20), jax.random.PRNGKey(seed))
  p["router"]["null_logit"] = jnp.float32(0.05)       # about half the picks are null slots
  x = jax.random.normal(jax.random.PRNGKey(seed + 1), (256, D))
  idx, eid, gates, aux, st = jax.jit(lambda r, x: moe.route(r, {}, x, c))(p["router"], x)
  idx, gates = np.asarray(idx), np.asarray(gates)
  null = idx >= 20
  msg = f"seed={seed}"
  assert null.any() and (~null).any(), msg
  assert np.all(gates[null] == 0.0), msg
  has_real = (~null).any(1)
  np.testing.assert_allclose(gates[has_real].sum(1), 1.0, rtol=1e-6, err_msg=msg)
  assert np.all(gates[~has_real] == 0.0), msg
  np.testing.assert_allclose(float(st["null_rate"]), null.mean(), rtol=1e-6, err_msg=msg)
  np.testing.assert_array_equal(np.asarray(eid)[null], -1)
  # f_e counts real picks only
  assert float(st["assignments"]) == (~null).sum(), msg


def test_sigmoid_router_selects_with_bias_gates_unbiased():
  seed = int(np.random.randint(1 << 30))
  c = _cfg("sigmoid", 12, 3)
  p = nn.init(moe.moe_specs(c, 12), jax.random.PRNGKey(seed))
  x = jax.random.normal(jax.random.PRNGKey(seed + 1), (64, D))
  stats = moe.moe_stats_init(c, 12)
  stats["bias"] = stats["bias"].at[7].set(10.0)       # forces expert 7 into every pick set
  route = jax.jit(lambda r, s, x, zw: moe.route(r, s, x, c, {"moe_ctl": {"z_weight": zw}}))
  idx, _, gates, aux, st = route(p["router"], stats, x, 0.5)
  # z weight from consts["moe_ctl"] (hot config) replaces the config's, no balance term
  np.testing.assert_allclose(aux, 0.5 * st["z"], rtol=1e-6)
  s = jax.nn.sigmoid(x @ p["router"]["w"])
  msg = f"seed={seed}"
  assert np.all((np.asarray(idx) == 7).any(1)), msg
  g = np.take_along_axis(np.asarray(s), np.asarray(idx), 1)
  np.testing.assert_allclose(gates, g / g.sum(1, keepdims=True), rtol=1e-5, err_msg=msg)


def test_given_selection_is_reused_not_recomputed():
  seed = int(np.random.randint(1 << 30))
  c = _cfg("null_slot", 20, 2)
  p = nn.init(moe.moe_specs(c, 20), jax.random.PRNGKey(seed))
  x = jax.random.normal(jax.random.PRNGKey(seed + 1), (1, 16, D))
  given = {"idx": jnp.asarray(np.random.default_rng(seed).integers(0, 40, (1, 16, 2)), jnp.int32)}
  _, sel, _, _ = jax.jit(lambda p, x, g: moe.moe_apply(p, {}, {}, x, {}, c, selection=g))(
      p, x, given)
  np.testing.assert_array_equal(sel["idx"], given["idx"], err_msg=f"seed={seed}")


def test_bias_controller_lowers_overloaded_raises_idle():
  c = stage_120b.get_config()
  st = moe.moe_stats_init(c, 460)
  load = np.full(460, 100.0)
  load[3] = 5000.0      # overloaded
  load[9] = 0.0         # idle
  step = {"load": jnp.asarray(load)}
  upd = jax.jit(lambda s, t: moe.moe_update_stats(s, t, c))
  for _ in range(50):
    st = upd(st, step)
  b = np.asarray(st["bias"])
  assert b[3] < 0 < b[9], b[[3, 9]]
  # the overloaded expert is above cap_hi: larger steps than gamma; the idle one is still inside
  # the band for these 50 steps (its EMA decays from 1/460): exactly gamma per step
  assert -b[3] > 50 * c.moe.bias_gamma
  np.testing.assert_allclose(b[9], 50 * c.moe.bias_gamma, rtol=1e-4)
  for _ in range(250):
    st = upd(st, step)
  assert float(st["use_ema"][9]) < c.moe.bias_cap_lo
  assert float(st["bias"][9]) - b[9] > 250 * c.moe.bias_gamma     # below cap_lo: larger steps
  assert float(st["use_ema"][3]) > c.moe.bias_cap_hi


def test_hot_config_edit_takes_effect_within_k_steps(tmp_path):
  c = stage_120b.get_config()
  path = tmp_path / "hot.json"
  c.moe.hot_config = str(path)
  c.moe.hot_config_every = 5
  logged = []
  hot = moe.HotConfig(c, logger=logged.append)
  st = moe.moe_stats_init(c, 460)
  step = {"load": jnp.ones((460,))}          # balanced: every bias moves by exactly gamma
  upd = jax.jit(lambda s, t, ctl: moe.moe_update_stats(s, t, c, ctl))
  edit_at, applied_at = 12, None
  for i in range(30):
    if i == edit_at:
      path.write_text(json.dumps({"gamma": 1e-3, "cap_hi": 0.01}))
    hot.poll(i)
    before = float(st["bias"][0])
    st = upd(st, step, hot.ctl())
    if abs(abs(float(st["bias"][0]) - before) - 1e-3) < 1e-7 and applied_at is None:
      applied_at = i
  assert applied_at is not None and edit_at <= applied_at < edit_at + c.moe.hot_config_every
  assert any("gamma" in line and "0.001" in line for line in logged), logged
  assert hot.apply(c).moe.bias_cap_hi == 0.01
  path.write_text(json.dumps({"gama": 1.0}))
  hot.poll(30)
  assert any("gama" in line for line in logged) and hot.values["gamma"] == 1e-3


def test_bad_top_k_and_expert_count_name_both_numbers():
  c = _cfg("sigmoid", 12, 13)
  with pytest.raises(ConfigError, match=r"top_k=13.*12"):
    moe.moe_specs(c, 12)
  c = _cfg("null_slot", 20, 41)
  with pytest.raises(ConfigError, match=r"top_k=41.*40 slots"):
    moe.moe_specs(c, 20)
  c = _cfg("sigmoid", 4, 2, ep=8)
  with pytest.raises(ConfigError, match=r"4 .*mesh.expert=8"):
    moe.moe_specs(c, 4)


def test_120b_layout_and_counts():
  c = stage_120b.get_config()
  lay = moe.expert_layout(c, 460)
  assert lay == {"real": 460, "padded": 464, "per_device": 58, "padding": 4}
  specs = moe.moe_specs(c, 460)
  assert specs["experts"]["gate"].shape == (464, 4096, 1024)
  assert specs["experts"]["gate"].axes[0] == "expert"
  from lightning_jax import counting     # the launch.count numbers (MTP and padding excluded)
  n = counting.count_params(c)
  # the paper's figures count the quantized experts at their logical size, not the TQP adapters
  assert (round(n["total_stored_no_adapters"] / 1e9, 2),
          round(n["total_active_no_adapters"] / 1e9, 2)) == (118.67, 5.93), n
  assert n["stored"]["routed_experts"] == 20 * 460 * 3 * 4096 * 1024
  # 5B / 9B: the reference configs' ~3.5B / ~7.9B without the MTP block (SPEC §1)
  for m, want in ((stage_5b, 3.50), (stage_9b, 7.90)):
    cc = m.get_config()
    assert moe.moe_specs(cc, 20)["experts"]["gate"].shape[0] == 20
    assert round(counting.count_params(cc)["total_stored"] / 1e9, 2) == want, cc.stage


def test_aux_layer_scale():
  assert moe.aux_layer_scale(8) == 1.0 and moe.aux_layer_scale(20) == pytest.approx(0.4)


def test_round_maps_are_mutually_inverse_and_match_group_positions():
  """_round_maps: slot and src invert each other, rows hold their expert's picks in (token,
  pick) order, and the rows of the round cover exactly group positions [start, start + cap)."""
  seed = int(np.random.randint(1 << 30))
  rng = np.random.default_rng(seed)
  n, k, e, cap, start = 13, 3, 4, 3, 2
  eid = np.stack([rng.choice(e + 1, k, replace=False) for _ in range(n)]) - 1   # -1 = null pick
  key = jnp.asarray(np.where(eid >= 0, eid, e).reshape(-1), jnp.int32)
  order = jnp.argsort(key, stable=True).astype(jnp.int32)
  counts = jnp.zeros((e + 1,), jnp.int32).at[key].add(1)[:e]
  offsets = jnp.cumsum(counts) - counts
  rank = jnp.zeros((n * k,), jnp.int32).at[order].set(jnp.arange(n * k, dtype=jnp.int32))
  pos = rank - jnp.concatenate([offsets, jnp.zeros((1,), jnp.int32)])[key]
  src, slot = moe._round_maps(key, pos, order, counts, offsets, start, cap, n, k)
  src, slot = np.asarray(src), np.asarray(slot)
  msg = f"seed={seed}"
  seen = np.zeros(e, int)
  for t in range(n):
    for j in range(k):
      ex = eid[t, j]
      want = e * cap
      if ex >= 0:
        if start <= seen[ex] < start + cap:
          want = ex * cap + seen[ex] - start
        seen[ex] += 1
      assert slot[t, j] == want, (msg, t, j)
      if want < e * cap:
        assert src[want] == t * k + j, msg
  assert (src < n * k).sum() == (slot < e * cap).sum(), msg


def test_dropless_overflow_rounds_equal_one_round_big_enough_for_all():
  """Local dropless dispatch with skewed routing (several overflow rounds run in the
  while-loop custom VJP) == capacity mode with C0 = N (everything in one round, nothing
  dropped): output and gradients to the experts, the input and the gates."""
  seed = int(np.random.randint(1 << 30))
  rng = np.random.default_rng(seed)
  n, e, k = 96, 6, 3
  c = _cfg("sigmoid", e, k, capacity_factor=0.5, overflow_round=0.25)
  big = _cfg("sigmoid", e, k, dispatch="capacity", capacity_factor=float(e))
  logits = rng.standard_normal((n, e)) - 1.5 * np.log1p(np.arange(e))   # skewed preference
  eid = jnp.asarray(np.argsort(-logits, 1)[:, :k], jnp.int32)
  gates = jnp.asarray(rng.uniform(0.1, 1.0, (n, k)), jnp.float32)
  x = jnp.asarray(rng.standard_normal((n, D)), jnp.float32)
  w = nn.init(moe.moe_specs(c, e), jax.random.PRNGKey(seed))["experts"]
  wo = jnp.asarray(rng.standard_normal((n, D)), jnp.float32)
  c0, c1, rounds = moe.capacities(c, n, e)
  load = np.bincount(np.asarray(eid).ravel(), minlength=e)
  msg = f"seed={seed}"
  assert moe.capacities(big, n, e)[0] >= n and -(-(load.max() - c0) // c1) >= 2, msg

  def run(cfg):
    f = lambda w, x, g: jnp.sum(moe.dispatch(w, None, x, eid, g, cfg)[0] * wo)
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))(w, x, gates)
  v, g = run(c)
  v_ref, g_ref = run(big)
  np.testing.assert_allclose(v, v_ref, rtol=1e-5, err_msg=msg)
  for a, b in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(g_ref)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=msg)
