"""GSA attention kernels (lightning_jax/kernels/sparse_attention.py) vs the float32 gather
reference, on fresh random inputs and random causal selections (seed in every message). The
kernels run in the Pallas interpreter here; `lower_for_gpu` checks their Triton lowering."""
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from lightning_jax import config as config_lib
from lightning_jax import nn
from lightning_jax.kernels import sparse_attention as ks
from lightning_jax.kernels.common import lower_for_gpu, on_gpu
from lightning_jax.layers import sparse_attention as gsa
from lightning_jax.layers.rotary import rotary_tables


def _seed():
  return int(np.random.randint(1 << 30))


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _selection(rng, b, t, k, n_sinks=4):
  """Random causal selections: k_t in [1, min(k, t + 1)], the sinks first, then distinct random
  earlier keys in random order, -1 padding (the layer's format)."""
  sel = np.full((b, t, k), -1, np.int32)
  for bi in range(b):
    for ti in range(t):
      kt = int(rng.integers(1, min(k, ti + 1) + 1))
      sinks = list(range(min(n_sinks, ti + 1, kt)))
      rest = rng.permutation(np.arange(len(sinks), ti + 1))[:kt - len(sinks)]
      sel[bi, ti, :kt] = np.concatenate([sinks, rest]).astype(np.int32)
  return sel


def _qkvr(seed, b, t, h, d, dtype=jnp.float32):
  k = jax.random.split(jax.random.PRNGKey(seed), 4)
  return tuple(jax.random.normal(k[i], (b, t, h, d), dtype) for i in range(4))


def _ref_loss(q, k, v, sel, r):
  return jnp.sum(gsa.sparse_attention(q, k, v, sel, 16, "gather") * r)


@pytest.mark.parametrize("tiles", [dict(block_q=16, block_k=16, block_kb=16, block_qc=16),
                                   dict(block_q=64, block_k=32, block_kb=64, block_qc=32,
                                        key_order="position")])
def test_kernel_matches_gather_reference(tiles):
  """Forward o and dq, dk, dv of the interpreted kernels equal the XLA gather path (float32).
  T = 72 is not a multiple of the tiles (padding); k_t varies from 1 to k_max; the union lists
  span several block_k chunks, the key lists several block_qc chunks; dK/dV key blocks in
  key_order (default) and in position order."""
  seed = _seed()
  rng = np.random.default_rng(seed)
  b, t, h, d, kmax = 2, 72, 2, 32, 24
  q, k, v, r = _qkvr(seed, b, t, h, d)
  sel = jnp.asarray(_selection(rng, b, t, kmax))
  kern = lambda q, k, v: jnp.sum(ks.gsa_attention(q, k, v, sel, interpret=True, **tiles) * r)
  o = jax.jit(lambda q, k, v: ks.gsa_attention(q, k, v, sel, interpret=True, **tiles))(q, k, v)
  o_r = gsa.sparse_attention(q, k, v, sel, 16, "gather")
  assert _rel(o, o_r) <= 1e-5, f"seed={seed} tiles={tiles} output rel err {_rel(o, o_r):.2e}"
  got = jax.jit(jax.grad(kern, (0, 1, 2)))(q, k, v)
  want = jax.jit(jax.grad(_ref_loss, (0, 1, 2)))(q, k, v, sel, r)
  for name, a, w in zip(("dq", "dk", "dv"), got, want):
    assert np.linalg.norm(np.asarray(w)) > 0, f"seed={seed} reference {name} is zero"
    assert _rel(a, w) <= 1e-5, f"seed={seed} tiles={tiles} {name} rel err {_rel(a, w):.2e}"


@pytest.mark.parametrize("sort", ["one_key", "two_keys"])
def test_lists_match_sets(sort, monkeypatch):
  """The CSR lists are the per-block unions with the right bit masks (Python sets as the
  reference), with one mask word (query blocks of 16) and two (key blocks of 64), key blocks in
  position order and in key_order (a permutation grouping keys by how often they are selected);
  a key listed twice in a row counts once. Both list builds: one packed sort key, and (long
  sequences) two."""
  if sort == "two_keys":
    monkeypatch.setattr(ks, "_COMPOSITE_LIMIT", 0)
  seed = _seed()
  rng = np.random.default_rng(seed)
  b, t, kmax = 2, 128, 12
  sel = _selection(rng, b, t, kmax)
  sel[0, 70, kmax - 1] = sel[0, 70, 0]          # a duplicate entry
  order = np.asarray(ks.key_order(jnp.asarray(sel)))
  counts = np.stack([np.bincount(sel[bi][sel[bi] >= 0], minlength=t) for bi in range(b)])
  for bi in range(b):
    assert sorted(order[bi]) == list(range(t)), f"seed={seed} key_order is no permutation"
    bucket = np.floor(np.log2(counts[bi][order[bi]] + 1.0))
    assert np.all(np.diff(bucket) <= 0), f"seed={seed} key_order not by selection count"
  rank = np.argsort(order, axis=1)
  for lists, by_query, bq, rk in ((ks.query_lists(jnp.asarray(sel), 16), True, 16, None),
                                  (ks.key_lists(jnp.asarray(sel), 64), False, 64, None),
                                  (ks.key_lists(jnp.asarray(sel), 32, jnp.asarray(order)), False,
                                   32, rank)):
    off, cols, bits = (np.asarray(a) for a in lists)
    n_words = bits.shape[1] // cols.shape[1]
    assert n_words == -(-bq // 32)
    for bi in range(b):
      want = {}
      for ti in range(t):
        for j in sel[bi, ti]:
          if j < 0:
            continue
          r = int(j) if rk is None else int(rk[bi, j])
          g, c, bit = (ti // bq, int(j), ti % bq) if by_query else (r // bq, ti, r % bq)
          want.setdefault(g, {}).setdefault(c, set()).add(bit)
      for g in range(t // bq):
        lo, hi = off[bi, g], off[bi, g + 1]
        masks = np.asarray(ks.unpack_bits(bits[bi], n_words, cols.shape[1], bq))
        got = {int(c): set(np.nonzero(m)[0].tolist())
               for c, m in zip(cols[bi, lo:hi], masks[lo:hi])}
        assert got == want.get(g, {}), f"seed={seed} by_query={by_query} b={bi} block={g}"
        assert list(cols[bi, lo:hi]) == sorted(got), f"seed={seed} cols not ascending"


def test_forward_and_backward_lower_for_gpu():
  """The three kernels (forward, dQ, dK/dV) pass the Pallas -> Triton lowering in bf16 at a
  shape that is not a power of two (T = 80, k_max = 20), with one and with two mask words."""
  b, t, h, d, kmax = 2, 80, 2, 64, 20
  q = jnp.zeros((b, t, h, d), jnp.bfloat16)
  sel = jnp.zeros((b, t, kmax), jnp.int32)
  for tiles in (dict(), dict(block_q=64, block_kb=64, block_k=32, block_qc=32, num_warps=8,
                             key_order="position")):
    def f(q, k, v, sel):
      o, vjp = jax.vjp(lambda q, k, v: ks.gsa_attention(q, k, v, sel, gpu_lowering=True,
                                                        **tiles), q, k, v)
      return o, vjp(o)
    txt = lower_for_gpu(f, q, q, q, sel)
    for name in ("gsa_fwd", "gsa_dq", "gsa_dkv"):
      assert name in txt, f"kernel {name} missing from the lowered module, tiles={tiles}"


def test_bad_tiles_are_named():
  q = jnp.zeros((1, 32, 1, 16))
  sel = jnp.zeros((1, 32, 4), jnp.int32)
  with pytest.raises(ValueError, match="block_q=8"):
    ks.gsa_attention(q, q, q, sel, block_q=8)
  with pytest.raises(ValueError, match="block_k=48"):
    ks.gsa_attention(q, q, q, sel, block_k=48)
  with pytest.raises(ValueError, match="selection"):
    ks.gsa_attention(q, q, q, sel[:, :16])


def _layer_setup(seed):
  cfg = tiny.get_config()
  cfg.model.gsa.attention = "kernel"
  config_lib.validate(cfg)                      # "kernel" is an accepted mode
  t = 40
  k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
  p = nn.init(gsa.gsa_specs(cfg), k1)
  p = {n: w * 5.0 for n, w in p.items()}
  x = jax.random.normal(k2, (2, t, cfg.model.d_model))
  consts = {"rope_gsa": rotary_tables(jnp.arange(t)[None], cfg.model.gsa.head_dim)}
  sel = jnp.asarray(_selection(np.random.default_rng(seed), 2, t, cfg.model.gsa.k_max))
  return cfg, p, x, consts, sel


def test_layer_mode_kernel(monkeypatch, caplog):
  """model.gsa.attention="kernel" through gsa_apply: the kernels (interpreted, forced) give the
  gather mode's output and parameter gradients; without a GPU and unforced it logs once and runs
  the gather path."""
  seed = _seed()
  cfg, p, x, consts, sel = _layer_setup(seed)
  cfg_g = tiny.get_config()
  cfg_g.model.gsa.attention = "gather"
  stats = gsa.gsa_stats_init(cfg)

  def loss(cfg):
    return jax.jit(jax.value_and_grad(
        lambda p: jnp.sum(gsa.gsa_apply(p, stats, x, consts, cfg, sel)[0] ** 2)))
  want_l, want_g = loss(cfg_g)(p)
  monkeypatch.setattr(ks, "_FORCE_INTERPRET", True)
  got_l, got_g = loss(cfg)(p)
  assert abs(float(got_l - want_l)) <= 1e-5 * abs(float(want_l)), f"seed={seed}"
  for name in ("q", "k", "v", "gv", "go", "o"):
    assert _rel(got_g[name], want_g[name]) <= 1e-4, (
        f"seed={seed} d{name} rel err {_rel(got_g[name], want_g[name]):.2e}")
  monkeypatch.setattr(ks, "_FORCE_INTERPRET", False)
  monkeypatch.setattr(ks, "_FALLBACK_LOGGED", set())
  with caplog.at_level(logging.WARNING, logger="lightning_jax.kernels"):
    y = gsa.gsa_apply(p, stats, x, consts, cfg, sel)[0]
    gsa.gsa_apply(p, stats, x, consts, cfg, sel)
  y_g = gsa.gsa_apply(p, stats, x, consts, cfg_g, sel)[0]
  hits = [r for r in caplog.records if "attention='kernel'" in r.getMessage()]
  if on_gpu():                                  # the native kernels, float32 (ieee dots)
    assert _rel(y, y_g) <= 1e-5, f"seed={seed} native kernel differs from gather"
    assert not hits, "no fallback expected on a GPU"
  else:
    assert _rel(y, y_g) <= 1e-6, f"seed={seed} fallback differs from gather"
    assert len(hits) == 1, f"expected one fallback warning, got {len(hits)}"


def test_kernel_per_device_under_a_mesh(monkeypatch):
  """Under a 4-device mesh with the batch split, select_and_run runs the kernels per device
  (shard_map) and equals the unsharded gather reference, values and gradients."""
  from jax.sharding import NamedSharding, PartitionSpec as P
  from lightning_jax import sharding as shd
  seed = _seed()
  b, t, h, d, kmax = 4, 32, 2, 16, 8
  q, k, v, r = _qkvr(seed, b, t, h, d)
  sel = jnp.asarray(_selection(np.random.default_rng(seed), b, t, kmax))
  monkeypatch.setattr(ks, "_FORCE_INTERPRET", True)
  loss = lambda q, k, v: jnp.sum(ks.select_and_run(q, k, v, sel, 16) * r)
  want = jax.grad(_ref_loss, (0, 1, 2))(q, k, v, sel, r)
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]).reshape(1, 4, 1),
                           ("data", "expert", "tensor"))
  bs = NamedSharding(mesh, P(("data", "expert")))
  with shd.use_mesh(mesh):
    got = jax.jit(jax.grad(loss, (0, 1, 2)))(*(jax.device_put(a, bs) for a in (q, k, v)))
  for name, a, w in zip(("dq", "dk", "dv"), got, want):
    assert _rel(a, w) <= 1e-5, f"seed={seed} sharded {name} rel err {_rel(a, w):.2e}"


def test_indexer_scores_kernel_matches_xla():
  """The indexer-score kernel equals layers.sparse_attention.indexer_scores (float32, fresh
  random inputs, Q and T not multiples of the tiles, queries offset into the sequence as in a
  query chunk): the same -inf pattern and finite scores within 1e-5; it lowers for Triton."""
  seed = _seed()
  b, nq, t, hi, di = 2, 40, 80, 4, 16
  k = jax.random.split(jax.random.PRNGKey(seed), 4)
  qi = jax.random.normal(k[0], (b, nq, hi, di)) * 3.0
  ki = jax.random.normal(k[1], (b, t, di))
  wi = jax.random.normal(k[2], (b, nq, hi))
  bias = jax.random.normal(k[3], (hi,))
  pos = jnp.arange(nq) + 30
  got = ks.indexer_scores(qi, ki, wi, bias, pos, block_q=16, block_k=32, interpret=True)
  want = gsa.indexer_scores(qi, ki, wi, bias, pos)
  fin = np.isfinite(np.asarray(want))
  assert np.array_equal(fin, np.isfinite(np.asarray(got))), f"seed={seed} causal pattern differs"
  err = float(np.max(np.abs(np.asarray(got)[fin] - np.asarray(want)[fin])))
  assert err <= 1e-5, f"seed={seed} indexer score max abs err {err:.2e}"
  bf = lambda a: a.astype(jnp.bfloat16)
  txt = lower_for_gpu(lambda *a: ks.indexer_scores(*a, gpu_lowering=True), bf(qi), bf(ki),
                      bf(wi), bias, pos)
  assert "gsa_indexer_scores" in txt
