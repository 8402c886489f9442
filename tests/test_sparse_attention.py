"""Gated Sparse Attention (SPEC §2.3): chunked sparse path vs slow obvious references."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from lightning_jax import nn
from lightning_jax.config import ConfigError, from_stored, validate
from lightning_jax.layers import sparse_attention as gsa
from lightning_jax.layers.rotary import rotary_tables

B, T = 2, 40
IDX_PARAMS = ("idx_q", "idx_k", "idx_w", "idx_b")
ATTN_PARAMS = ("q", "k", "v", "gv", "go", "o")


def _cfg(**gsa_fields):
  c = tiny.get_config()
  g = c.model.gsa
  # query_chunk 16 does not divide T = 40: the padded last chunk is exercised too.
  g.k_min, g.k_base, g.k_max, g.n_sinks, g.query_chunk = 6, 10, 16, 4, 16
  for k, v in gsa_fields.items():
    setattr(g, k, v)
  return c


def _setup(cfg, seed):
  """Params with a wide indexer (so scores and budgets spread), x, rotary consts."""
  def make(key):
    k1, k2, k3 = jax.random.split(key, 3)
    p = nn.init(gsa.gsa_specs(cfg), k1)
    p = {n: (w * 25.0 if n in IDX_PARAMS else w * 5.0) for n, w in p.items()}
    p["idx_b"] = jax.random.normal(k3, p["idx_b"].shape)
    return p, jax.random.normal(k2, (B, T, cfg.model.d_model))
  p, x = jax.jit(make)(jax.random.PRNGKey(seed))
  consts = {"rope_gsa": rotary_tables(jnp.arange(T)[None], cfg.model.gsa.head_dim)}
  return p, x, consts


_BASE = {}


def _base():
  """One fresh-seeded setup shared by the tests of this module (one compile per function)."""
  if not _BASE:
    seed = _seed()
    cfg = _cfg()
    p, x, consts = _setup(cfg, seed)
    _BASE.update(seed=seed, cfg=cfg, p=p, x=x, consts=consts, stats=_calibrated_stats(p, x, cfg))
  b = _BASE
  return b["seed"], b["cfg"], b["p"], b["x"], b["consts"], b["stats"]


def _reference(p, x, consts, cfg, mask):
  key = ("ref", id(cfg))
  if key not in _JITTED:
    _JITTED[key] = (cfg, jax.jit(lambda p, x, c, m: gsa.gsa_reference(p, x, c, cfg, m)))
  return _JITTED[key][1](p, x, consts, mask)


def _mask(sel):
  return jax.jit(gsa.selection_mask, static_argnums=(1,))(sel, T)


def _calibrated_stats(p, x, cfg):
  """var_ema = mean var_t, so budgets spread around k_base (as after EMA warm-up)."""
  _, _, var_t = _select(p, gsa.gsa_stats_init(cfg), x, cfg)
  return {"var_ema": jnp.mean(var_t)}


def _apply(p, stats, x, consts, cfg, selection=None):
  """gsa_apply under jit (the config closed over; one trace per config and selection kind)."""
  key = (id(cfg), selection is None)
  if key not in _JITTED:
    _JITTED[key] = (cfg, jax.jit(lambda p, st, x, c, s: gsa.gsa_apply(p, st, x, c, cfg, s)))
  return _JITTED[key][1](p, stats, x, consts, selection)


_JITTED = {}


def _select(p, stats, x, cfg):
  key = ("select", id(cfg))
  if key not in _JITTED:
    _JITTED[key] = (cfg, jax.jit(lambda p, st, x: gsa.gsa_select(p, st, x, cfg)))
  return _JITTED[key][1](p, stats, x)


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def _seed():
  return int(np.random.randint(1 << 30))


# ----------------------------------------------------------------------------- numpy references
def _np_scores(p, x):
  """Indexer scores [B, T, T] in float64 straight from the formula, -inf after the query."""
  p = {k: np.asarray(v, np.float64) for k, v in p.items()}
  x = np.asarray(x, np.float64)
  hi, di = p["idx_b"].shape[0], p["idx_k"].shape[1]
  sig = lambda z: 1.0 / (1.0 + np.exp(-z))
  qi = (x @ p["idx_q"]).reshape(B, T, hi, di)
  ki = x @ p["idx_k"]
  wi = sig(x @ p["idx_w"])
  raw = np.einsum("bqhd,btd->bqht", qi, ki) / math.sqrt(di) + p["idx_b"][:, None]
  s = np.einsum("bqh,bqht->bqt", wi, sig(raw))
  return np.where(np.tril(np.ones((T, T), bool))[None], s, -np.inf)


def _np_rope(a, cos, sin):
  a1, a2 = a[..., 0::2], a[..., 1::2]
  c, s = cos[:, :, None, :], sin[:, :, None, :]
  return np.stack([a1 * c - a2 * s, a1 * s + a2 * c], -1).reshape(a.shape)


def _np_causal_gsa(p, x, consts, cfg):
  """Full causal gated attention in float64 (no indexer), written from SPEC §2.3."""
  g = cfg.model.gsa
  p = {k: np.asarray(v, np.float64) for k, v in p.items()}
  x = np.asarray(x, np.float64)
  cos, sin = (np.asarray(a, np.float64) for a in consts["rope_gsa"])
  sig = lambda z: 1.0 / (1.0 + np.exp(-z))
  sh = (B, T, g.n_heads, g.head_dim)
  q = _np_rope((x @ p["q"]).reshape(sh), cos, sin)
  k = _np_rope((x @ p["k"]).reshape(sh), cos, sin)
  v = ((x @ p["v"]) * sig(x @ p["gv"])).reshape(sh)
  lg = np.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(g.head_dim)
  lg = np.where(np.tril(np.ones((T, T), bool)), lg, -np.inf)
  pr = np.exp(lg - lg.max(-1, keepdims=True))
  pr /= pr.sum(-1, keepdims=True)
  att = np.einsum("bhqk,bkhd->bqhd", pr, v).reshape(B, T, -1)
  return (att * sig(x @ p["go"])) @ p["o"]


# ----------------------------------------------------------------------------- tests
def test_specs_shapes_and_init():
  c = tiny.get_config()
  d, g = c.model.d_model, c.model.gsa
  p = nn.init(gsa.gsa_specs(c), jax.random.PRNGKey(_seed()))
  want = {"q": (d, d), "k": (d, d), "v": (d, d), "gv": (d, d), "go": (d, d), "o": (d, d),
          "idx_q": (d, g.idx_heads * g.idx_dim), "idx_k": (d, g.idx_dim),
          "idx_w": (d, g.idx_heads), "idx_b": (g.idx_heads,)}
  assert {k: v.shape for k, v in p.items()} == want
  assert np.all(np.asarray(p["idx_b"]) == 0)
  assert abs(float(jnp.std(p["q"])) - 0.02) < 0.003
  assert float(gsa.gsa_stats_init(c)["var_ema"]) == 1.0
  assert set(nn.logical_axes(gsa.gsa_specs(c))) == set(want)


@pytest.mark.parametrize("var_row", ["full_row", "causal"])
def test_selection_matches_numpy_reference(var_row):
  seed = _seed()
  cfg = _cfg(var_row=var_row)
  g = cfg.model.gsa
  p, x, _ = _setup(cfg, seed)
  stats = _calibrated_stats(p, x, cfg)
  sel, k_t, var_t = _select(p, stats, x, cfg)
  sel, k_t, var_t = np.asarray(sel), np.asarray(k_t), np.asarray(var_t)

  s = _np_scores(p, x)
  s0 = np.where(np.isfinite(s), s, 0.0)
  if var_row == "full_row":
    ref_var = s0.var(-1)
  else:
    ref_var = np.array([[s0[b, t, :t + 1].var() for t in range(T)] for b in range(B)])
  np.testing.assert_allclose(var_t, ref_var, rtol=1e-4, atol=1e-7, err_msg=f"seed={seed}")
  ratio = g.k_base * ref_var / float(stats["var_ema"])
  ref_k = np.minimum(np.clip(np.floor(ratio), g.k_min, g.k_max), np.arange(T)[None] + 1)
  near_int = np.abs(ratio - np.round(ratio)) < 1e-3          # float32 floor may flip there
  assert np.all((k_t == ref_k) | near_int), f"seed={seed}"
  assert len(np.unique(k_t)) > 3, f"budgets did not spread, seed={seed}: {np.unique(k_t)}"

  checked = 0
  for b in range(B):
    for t in range(T):
      row = sel[b, t]
      kept = row[row >= 0]
      assert np.all(row[:len(kept)] >= 0) and np.all(row[len(kept):] == -1), f"seed={seed}"
      assert len(kept) == k_t[b, t], f"seed={seed} b={b} t={t}"
      assert g.k_min <= k_t[b, t] <= g.k_max or k_t[b, t] == t + 1, f"seed={seed}"
      assert k_t[b, t] <= t + 1 and np.all(kept <= t), f"causal, seed={seed} b={b} t={t}"
      assert len(set(kept.tolist())) == len(kept), f"duplicate keys, seed={seed}"
      assert set(range(min(g.n_sinks, t + 1))) <= set(kept.tolist()), f"sinks, seed={seed} t={t}"
      # top-k_t of the non-sink causal keys, where the k-th/k+1-th gap is resolvable
      n_free = k_t[b, t] - min(g.n_sinks, t + 1)
      cand = np.arange(min(g.n_sinks, t + 1), t + 1)
      order = cand[np.argsort(-s[b, t, cand], kind="stable")]
      sc = s[b, t, order]
      if n_free < len(order) and n_free > 0 and sc[n_free - 1] - sc[n_free] < 1e-5:
        continue
      assert set(kept.tolist()) == set(range(min(g.n_sinks, t + 1))) | set(order[:n_free].tolist()), \
          f"seed={seed} b={b} t={t}"
      checked += 1
  assert checked > B * T // 2, f"seed={seed}"


def test_sparse_matches_dense_masked_reference():
  seed, cfg, p, x, consts, stats = _base()
  y, sel, aux, st = _apply(p, stats, x, consts, cfg)
  assert sel.shape == (B, T, cfg.model.gsa.k_max) and sel.dtype == jnp.int32
  assert float(aux) == 0.0
  ref = _reference(p, x, consts, cfg, _mask(sel))
  assert _rel(y, ref) <= 1e-5, f"rel err {_rel(y, ref):.2e}, seed={seed}"
  assert float(st["var_count"]) == B * T
  k = np.asarray((sel >= 0).sum(-1))
  assert float(st["k_sum"]) == k.sum(), f"seed={seed}"
  assert k.min() < k.max(), f"expected a spread of budgets, seed={seed}"
  # the matmul-friendly mode gives the same result on the same selection
  cm = _cfg(attention="dense_masked")
  ym, _, _, _ = _apply(p, stats, x, consts, cm, sel)
  assert _rel(ym, ref) <= 1e-5, f"dense_masked rel err {_rel(ym, ref):.2e}, seed={seed}"
  # and so does the fused flash-attention mode (XLA's implementation on CPU)
  cf = _cfg(attention="flash")
  yf, _, _, _ = _apply(p, stats, x, consts, cf, sel)
  assert _rel(yf, ref) <= 1e-5, f"flash rel err {_rel(yf, ref):.2e}, seed={seed}"


def test_full_budget_is_full_causal_attention():
  seed = _seed()
  cfg = _cfg(k_min=T + 8, k_base=T + 8, k_max=T + 8)
  p, x, consts = _setup(cfg, seed)
  y, sel, _, _ = _apply(p, gsa.gsa_stats_init(cfg), x, consts, cfg)
  assert np.all(np.asarray((sel >= 0).sum(-1)) == np.arange(1, T + 1)[None]), f"seed={seed}"
  ref = _np_causal_gsa(p, x, consts, cfg)
  assert _rel(y, ref) <= 1e-5, f"rel err {_rel(y, ref):.2e}, seed={seed}"


def test_causality():
  seed, cfg, p, x, consts, stats = _base()
  t0 = int(np.random.RandomState(seed).randint(3, T - 3))
  x2 = x.at[:, t0 + 1:].add(jax.random.normal(jax.random.PRNGKey(seed + 1), x[:, t0 + 1:].shape))
  y1, s1, _, _ = _apply(p, stats, x, consts, cfg)
  y2, s2, _, _ = _apply(p, stats, x2, consts, cfg)
  np.testing.assert_array_equal(s1[:, :t0 + 1], s2[:, :t0 + 1], err_msg=f"seed={seed} t0={t0}")
  np.testing.assert_allclose(y1[:, :t0 + 1], y2[:, :t0 + 1], rtol=0, atol=1e-6,
                             err_msg=f"seed={seed} t0={t0}")
  assert float(jnp.max(jnp.abs(y1[:, t0 + 1:] - y2[:, t0 + 1:]))) > 1e-3, f"seed={seed}"


def test_given_selection_is_reused_verbatim():
  seed, cfg, p, x, consts, stats = _base()
  y1, sel, _, _ = _apply(p, stats, x, consts, cfg)
  # a different indexer and EMA would select differently; the given selection must win
  p2 = {n: (w + 1.0 if n in IDX_PARAMS else w) for n, w in p.items()}
  stats2 = {"var_ema": stats["var_ema"] * 7.0}
  y2, sel2, _, st2 = _apply(p2, stats2, x, consts, cfg, sel)
  np.testing.assert_array_equal(sel2, sel, err_msg=f"seed={seed}")
  np.testing.assert_array_equal(y2, y1, err_msg=f"seed={seed}")
  assert float(st2["var_count"]) == 0.0
  y3, resel, _, _ = _apply(p2, stats2, x, consts, cfg)
  assert not np.array_equal(resel, sel), f"p2 should select differently, seed={seed}"
  # another valid selection: the most recent keys of each query
  t = np.arange(T)[:, None]
  win = t - np.arange(cfg.model.gsa.k_max)[None]
  alt = jnp.asarray(np.broadcast_to(np.where(win >= 0, win, -1), sel.shape).astype(np.int32))
  y4, _, _, _ = _apply(p, stats, x, consts, cfg, alt)
  assert float(jnp.max(jnp.abs(y4 - y1))) > 1e-3, f"seed={seed}"
  ref4 = _reference(p, x, consts, cfg, _mask(alt))
  assert _rel(y4, ref4) <= 1e-5, f"seed={seed}"


def test_gradients_reach_attention_not_indexer():
  seed, cfg, p, x, consts, stats = _base()
  r = jax.random.normal(jax.random.PRNGKey(seed + 2), (B, T, cfg.model.d_model))

  def loss(p, x):
    y, sel, aux, _ = gsa.gsa_apply(p, stats, x, consts, cfg)
    return jnp.sum(y * r) + aux, sel

  (_, sel), (gp, gx) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(p, x)
  for n in ATTN_PARAMS:
    assert float(jnp.linalg.norm(gp[n])) > 0, f"no gradient on {n}, seed={seed}"
  for n in IDX_PARAMS:
    assert float(jnp.max(jnp.abs(gp[n]))) == 0.0, f"indexer {n} got gradient, seed={seed}"
  assert bool(jnp.all(jnp.isfinite(gx)))
  # the chunked, rematerialised backward equals the dense reference's gradient
  mask = _mask(sel)
  ref_loss = lambda p, x: jnp.sum(gsa.gsa_reference(p, x, consts, cfg, mask) * r)
  rp, rx = jax.jit(jax.grad(ref_loss, argnums=(0, 1)))(p, x)
  for n in ATTN_PARAMS:
    assert _rel(gp[n], rp[n]) <= 1e-5, f"grad {n} rel err {_rel(gp[n], rp[n]):.2e}, seed={seed}"
  # the sparse path's dx excludes the indexer branch, as does the reference's
  assert _rel(gx, rx) <= 1e-5, f"grad x rel err {_rel(gx, rx):.2e}, seed={seed}"
  # the flash mode's gradients on the same selection
  cf = _cfg(attention="flash")
  f_loss = lambda p, x: jnp.sum(gsa.gsa_apply(p, stats, x, consts, cf, sel)[0] * r)
  fp, fx = jax.jit(jax.grad(f_loss, argnums=(0, 1)))(p, x)
  for n in ATTN_PARAMS:
    assert _rel(fp[n], rp[n]) <= 1e-5, f"flash grad {n} rel {_rel(fp[n], rp[n]):.2e}, seed={seed}"
  assert _rel(fx, rx) <= 1e-5, f"flash grad x rel err {_rel(fx, rx):.2e}, seed={seed}"


def test_update_stats_ema():
  cfg = _cfg()
  v = float(np.random.uniform(0.1, 3.0))
  st = gsa.gsa_update_stats(gsa.gsa_stats_init(cfg),
                            {"var_sum": jnp.float32(4 * v), "var_count": jnp.float32(4),
                             "k_sum": jnp.float32(0)}, cfg)
  np.testing.assert_allclose(float(st["var_ema"]), 0.99 * 1.0 + 0.01 * v, rtol=1e-6)
  same = gsa.gsa_update_stats(st, {"var_sum": jnp.float32(0), "var_count": jnp.float32(0),
                                   "k_sum": jnp.float32(0)}, cfg)
  assert float(same["var_ema"]) == float(st["var_ema"])


def test_bad_inputs_are_named():
  _, cfg, p, x, consts, stats = _base()
  with pytest.raises(ValueError, match="selection"):
    gsa.gsa_apply(p, stats, x, consts, cfg, jnp.zeros((B, T, 3), jnp.int32))
  with pytest.raises(ConfigError, match="model.gsa.var_row"):
    gsa.gsa_apply(p, stats, x, consts, _cfg(var_row="rows"))
  with pytest.raises(ConfigError, match="model.gsa.attention"):
    gsa.gsa_apply(p, stats, x, consts, _cfg(attention="sparse_flash"))


def test_forward_at_8192_tokens_tiny_width():
  """One compile: T = 8192, B = 1, configs/tiny.py sizes (query_chunk 128, k_max 32)."""
  seed = _seed()
  cfg = tiny.get_config()
  g = cfg.model.gsa
  Tl = 8192
  p = nn.init(gsa.gsa_specs(cfg), jax.random.PRNGKey(seed))
  x = jax.random.normal(jax.random.PRNGKey(seed + 1), (1, Tl, cfg.model.d_model))
  consts = {"rope_gsa": rotary_tables(jnp.arange(Tl)[None], g.head_dim)}
  y, sel, aux, st = _apply(p, gsa.gsa_stats_init(cfg), x, consts, cfg)
  assert y.shape == (1, Tl, cfg.model.d_model) and bool(jnp.all(jnp.isfinite(y)))
  assert sel.shape == (1, Tl, g.k_max)
  sel = np.asarray(sel)
  k = (sel >= 0).sum(-1)[0]
  t = np.arange(Tl)
  assert np.all(k >= np.minimum(g.k_min, t + 1)) and np.all(k <= np.minimum(g.k_max, t + 1))
  assert np.all(sel[0] <= t[:, None]), f"seed={seed}"
  assert np.all(np.sort(sel[0, g.n_sinks:, :g.n_sinks], -1) == np.arange(g.n_sinks)[None]), \
      f"sinks come first, seed={seed}"
  assert float(st["var_count"]) == Tl and np.isfinite(float(st["var_sum"]))


def _subjaxprs(eqn):
  for v in eqn.params.values():
    for u in (v if isinstance(v, (tuple, list)) else (v,)):
      if hasattr(u, "eqns"):
        yield u
      elif hasattr(getattr(u, "jaxpr", None), "eqns"):
        yield u.jaxpr


def _largest_intermediate(jaxpr):
  best = (0, ())
  for e in jaxpr.eqns:
    for v in e.outvars:
      shape = tuple(getattr(v.aval, "shape", ()))
      best = max(best, (math.prod(shape), shape))
    for s in _subjaxprs(e):
      best = max(best, _largest_intermediate(s))
  return best


def test_memory_is_chunked_at_8192_forward_and_backward():
  """Trace only (no compile): no array of the forward+backward exceeds one query chunk's
  indexer logits [B, Qc, idx_heads, T]; nothing is [T, T] or a whole-sequence gather."""
  cfg = tiny.get_config()
  g, d, Tl = cfg.model.gsa, cfg.model.d_model, 8192
  p = jax.eval_shape(lambda: nn.init(gsa.gsa_specs(cfg), jax.random.PRNGKey(0)))
  x = jax.ShapeDtypeStruct((1, Tl, d), jnp.float32)
  rope = jax.eval_shape(lambda: rotary_tables(jnp.arange(Tl)[None], g.head_dim))
  st = jax.eval_shape(lambda: gsa.gsa_stats_init(cfg))

  def loss(p, st, x, rope):
    return jnp.sum(gsa.gsa_apply(p, st, x, {"rope_gsa": rope}, cfg)[0])

  jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 2)))(p, st, x, rope)
  size, shape = _largest_intermediate(jaxpr.jaxpr)
  chunk_logits = g.query_chunk * g.idx_heads * Tl
  assert size <= chunk_logits, f"largest intermediate {shape}"
  assert size < Tl * Tl and size < Tl * g.k_max * d, f"largest intermediate {shape}"


def test_bfloat16_compute_close_to_float32():
  seed, cfg, p, x, consts, stats = _base()
  y32, sel, _, _ = _apply(p, stats, x, consts, cfg)
  c16 = _cfg()
  c16.model.dtype = "bfloat16"
  y16, _, _, _ = _apply(p, stats, x, consts, c16, sel)
  assert y16.dtype == jnp.bfloat16
  assert _rel(y16.astype(jnp.float32), y32) < 3e-2, f"seed={seed}"


def test_the_retired_gsa_impl_field_is_refused_and_dropped_from_stored_configs():
  """model.gsa.impl (the GSA kernel is model.gsa.attention='kernel') is no field any more: set,
  it is one sentence; in a stored config it is dropped (config.from_stored)."""
  cfg = tiny.get_config()
  cfg.model.gsa.impl = "kernel"
  with pytest.raises(ConfigError, match=r"config field model.gsa.impl is not in the schema"):
    validate(cfg)
  assert "impl" not in from_stored(cfg.to_dict()).model.gsa
