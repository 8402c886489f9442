"""launch.train wiring: MoE hot config as a traced step argument, frozen (TQP) shardings,
no weight decay on the never-trained GSA indexer, TQP flush between steps.

Small sigmoid-router MoE (4 experts, top-2, vocabulary 256, 4 layers); one compile of the train step
(8-device data-parallel CPU mesh), shardings checked abstractly on data 4 x expert 2.
"""
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lightning_jax import model, optim, sharding
from lightning_jax.config import load_config
from lightning_jax.layers import kronecker
from lightning_jax.layers import moe as moe_lib
from lightning_jax.layers.sparse_attention import INDEXER_PARAMS
from lightning_jax.run import state as state_lib, step as step_lib

REPO = pathlib.Path(__file__).resolve().parents[1]


def moe_cfg(tqp=False, expert=2):
  c = load_config(str(REPO / "configs" / "tiny.py"))
  m = c.model
  m.vocab_size = 256
  m.d_model = 32
  m.n_layers = 4
  m.deltanet.n_heads, m.deltanet.head_dim, m.deltanet.chunk_size = 2, 16, 16
  m.gsa.n_heads, m.gsa.head_dim = 1, 32
  m.gsa.idx_heads, m.gsa.idx_dim = 2, 8
  m.gsa.k_min, m.gsa.k_base, m.gsa.k_max = 4, 8, 16
  m.gsa.query_chunk = 16
  m.ce_chunk = 64
  e = c.moe
  e.enabled, e.router, e.n_experts, e.mtp_n_experts, e.top_k = True, "sigmoid", 4, 4, 2
  e.expert_width, e.shared_width, e.group_pad = 16, 32, 1
  c.mesh.expert, c.mesh.data = expert, -1
  c.tqp.enabled = tqp
  c.train.seq_len, c.train.global_batch, c.train.micro_batch = 16, 8, 0
  c.optim.warmup_steps = 0
  return c


def _codec(cfg):
  return kronecker.codec_from_tokenizer([bytes([i]) for i in range(256)], cfg)


def test_hot_config_reaches_the_step_without_recompiling(tmp_path):
  """Edit the hot file (gamma x r, z_weight): same compiled step, bias step scales by r, aux
  moves linearly with z_weight (the forward reads consts["moe_ctl"])."""
  seed = int(np.random.default_rng().integers(1 << 30))
  rng = np.random.default_rng(seed)
  cfg = moe_cfg(expert=1)           # the compile-heavy parts stay off: one local dispatch round,
  cfg.moe.dispatch = "capacity"     # no MTP block, one layer of each kind (the ctl path is the
  cfg.model.mtp.enabled = False     # same for every layer)
  cfg.model.pattern, cfg.model.n_layers = "DG", 2
  hot_file = tmp_path / "hot.json"
  cfg.moe.hot_config, cfg.moe.hot_config_every = str(hot_file), 1
  mesh = sharding.make_mesh(cfg.mesh)
  var = model.init_variables(cfg, jax.random.PRNGKey(seed % 1000), _codec(cfg))
  tx, _ = optim.make_optimizer(cfg, var["params"], 10)
  state = {**var, "opt_state": tx.init(var["params"]), "step": jnp.int32(0)}
  ids = jnp.asarray(rng.integers(0, 256, (8, 18)), jnp.int32)
  step = jax.jit(step_lib.make_train_step(cfg, tx, 1, model, mesh))
  logs = []
  hot = moe_lib.HotConfig(cfg, logger=logs.append)
  g0 = float(cfg.moe.bias_gamma)
  runs = []
  for k, (gamma, zw) in enumerate([(g0, 0.0), (3.0 * g0, 0.01), (3.0 * g0, 0.02)]):
    hot_file.write_text(json.dumps({"gamma": gamma, "z_weight": zw}))
    hot.poll(k)
    ctl = hot.ctl()
    assert float(ctl["gamma"]) == pytest.approx(gamma, rel=1e-6), ctl
    assert float(ctl["z_weight"]) == pytest.approx(zw, rel=1e-6), ctl
    with sharding.use_mesh(mesh):
      new, m = step(state, {"ids": ids}, ctl)
    assert bool(m["finite"]), seed
    runs.append((jax.device_get(new["stats"]), float(m["aux"])))
  assert step._cache_size() == 1, "a hot-config edit recompiled the train step"
  assert any("gamma" in l for l in logs), logs

  def bias_deltas(stats):
    return [np.asarray(n["moe"]["bias"]) - np.asarray(o["moe"]["bias"])
            for n, o in zip(stats["groups"].values(), var["stats"]["groups"].values())]
  d1, d3 = bias_deltas(runs[0][0]), bias_deltas(runs[1][0])
  for a, b in zip(d1, d3):
    assert np.all(np.abs(a) >= g0 * 0.999), (a, seed)        # every expert moved by >= gamma
    np.testing.assert_allclose(b, 3.0 * a, rtol=1e-5, err_msg=f"seed {seed}")
  a0, a1, a2 = (r[1] for r in runs)
  assert a1 > a0, (a0, a1, seed)
  assert a2 - a0 == pytest.approx(2.0 * (a1 - a0), rel=1e-3), (a0, a1, a2, seed)


def test_frozen_shardings_split_tqp_bases_over_expert():
  cfg = moe_cfg(tqp=True)
  mesh = sharding.make_mesh(cfg.mesh)
  ab = model.abstract_variables(cfg)
  fs = state_lib.frozen_shardings(mesh, model, cfg, ab["frozen"])
  assert jax.tree_util.tree_structure(fs) == jax.tree_util.tree_structure(ab["frozen"])
  n_split = 0
  for path, s in jax.tree_util.tree_flatten_with_path(fs)[0]:
    keys = [str(getattr(p, "key", p)) for p in path]
    leaf = ab["frozen"]
    for k in keys:
      leaf = leaf[k]
    if "experts" in keys and leaf.ndim >= 3:     # codes / norms [G, Ep, ...] (not the signs)
      assert "expert" in jax.tree_util.tree_leaves(tuple(s.spec)), (keys, s.spec)
      n_split += 1
  assert n_split >= 4 * 3 * 2, n_split        # 4 MoE layers (+MTP) x 3 matrices x codes, norms


def test_indexer_weights_not_decayed():
  seed = int(np.random.default_rng().integers(1 << 30))
  rng = np.random.default_rng(seed)
  cfg = moe_cfg()
  cfg.optim.weight_decay = 0.1
  # the real parameter tree: every indexer leaf masked, the attention matrices decayed
  mask = optim.decay_mask(model.abstract_variables(cfg)["params"])
  found = 0
  for path, v in jax.tree_util.tree_flatten_with_path(mask)[0]:
    k = str(getattr(path[-1], "key", path[-1]))
    if k in INDEXER_PARAMS:
      assert not v, path
      found += 1
    if k in ("q", "o") and "mixer" in str(path):
      assert v, path
  assert found >= 4, found
  f = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)
  p = {"groups": {"l1": {"mixer": {"q": f(2, 8, 8), "idx_q": f(2, 8, 4), "idx_k": f(2, 8, 2),
                                   "idx_w": f(2, 8, 2), "idx_b": f(2, 2)}}}}
  tx, _ = optim.make_optimizer(cfg, p, 10)
  st = tx.init(p)
  cur = p
  for _ in range(3):
    g = jax.tree_util.tree_map(jnp.zeros_like, cur)        # the indexer's gradient is 0
    g["groups"]["l1"]["mixer"]["q"] = f(2, 8, 8)
    upd, st = tx.update(g, st, cur)
    cur = optax.apply_updates(cur, upd)
  for k in INDEXER_PARAMS:
    np.testing.assert_array_equal(np.asarray(cur["groups"]["l1"]["mixer"][k]),
                                  np.asarray(p["groups"]["l1"]["mixer"][k]), err_msg=f"{k} {seed}")
  assert not np.allclose(cur["groups"]["l1"]["mixer"]["q"], p["groups"]["l1"]["mixer"]["q"])
