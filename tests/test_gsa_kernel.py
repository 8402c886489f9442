"""GSA attention kernels (lightning_jax/ops/sparse_attention/kernel.py): their compressed lists
against Python sets, bad tiles, and model.gsa.attention="kernel" through the layer (seed in every
message). The kernels against the gather reference and their Triton lowering:
tests/test_ops.py."""
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from lightning_jax import config as config_lib
from lightning_jax import nn
from lightning_jax.layers import sparse_attention as gsa
from lightning_jax.layers.rotary import rotary_tables
from lightning_jax.ops.pallas import on_gpu
from lightning_jax.ops.sparse_attention import api as attention_op
from lightning_jax.ops.sparse_attention import kernel as ks
from lightning_jax.ops.testing import selection as _selection


def _seed():
  return int(np.random.randint(1 << 30))


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


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


def test_bad_tiles_are_named():
  q = jnp.zeros((1, 32, 1, 16))
  sel = jnp.zeros((1, 32, 4), jnp.int32)
  with pytest.raises(ValueError, match="block_q=8"):
    ks.gsa_attention(q, q, q, sel, ks.GSAKernelOptions(block_q=8))
  with pytest.raises(ValueError, match="block_k=48"):
    ks.gsa_attention(q, q, q, sel, ks.GSAKernelOptions(block_k=48))
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
  """model.gsa.attention="kernel" through gsa_apply: the layer asks the op for the kernels, which
  (interpreted, forced by options) give the gather mode's output and parameter gradients; without
  a GPU and unforced it logs once and runs the gather path."""
  seed = _seed()
  cfg, p, x, consts, sel = _layer_setup(seed)
  cfg_g = tiny.get_config()
  cfg_g.model.gsa.attention = "gather"
  stats = gsa.gsa_stats_init(cfg)

  def loss(cfg):
    return jax.jit(jax.value_and_grad(
        lambda p: jnp.sum(gsa.gsa_apply(p, stats, x, consts, cfg, sel)[0] ** 2)))
  want_l, want_g = loss(cfg_g)(p)
  real, modes = attention_op.attend, []

  def forced(q, k, v, sel, qc, mode, options=None):
    modes.append(mode)
    return real(q, k, v, sel, qc, mode, attention_op.GSAKernelOptions(interpret=True))
  monkeypatch.setattr(attention_op, "attend", forced)
  got_l, got_g = loss(cfg)(p)
  assert modes == ["kernel"], modes
  assert abs(float(got_l - want_l)) <= 1e-5 * abs(float(want_l)), f"seed={seed}"
  for name in ("q", "k", "v", "gv", "go", "o"):
    assert _rel(got_g[name], want_g[name]) <= 1e-4, (
        f"seed={seed} d{name} rel err {_rel(got_g[name], want_g[name]):.2e}")
  monkeypatch.setattr(attention_op, "attend", real)
  monkeypatch.setattr(attention_op, "_FALLBACK_LOGGED", set())
  with caplog.at_level(logging.WARNING, logger="lightning_jax.ops"):
    y = gsa.gsa_apply(p, stats, x, consts, cfg, sel)[0]
    gsa.gsa_apply(p, stats, x, consts, cfg, sel)
  y_g = gsa.gsa_apply(p, stats, x, consts, cfg_g, sel)[0]
  hits = [r for r in caplog.records if "GSA attention kernels" in r.getMessage()]
  if on_gpu():                                  # the native kernels, float32 (ieee dots)
    assert _rel(y, y_g) <= 1e-5, f"seed={seed} native kernel differs from gather"
    assert not hits, "no fallback expected on a GPU"
  else:
    assert _rel(y, y_g) <= 1e-6, f"seed={seed} fallback differs from gather"
    assert len(hits) == 1, f"expected one fallback warning, got {len(hits)}"


