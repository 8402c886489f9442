"""Growth transforms (SPEC §3): exact copies, channel subsets, Drop-Upcycling statistics, clone-major
expansion, router noise, seeds, and the guards (target tree, shapes, source stage, last layer).

Source trees are random numpy trees shaped like the tiny lineage configs (small vocabulary): the
transforms never look at values except to copy or take statistics, so no model init is needed.
"""
import numpy as np
import pytest

from configs import stage_5b, stage_9b, tiny, tiny_120b, tiny_deep, tiny_moe
from lightning_jax import nn
from lightning_jax.growth import common
from lightning_jax.growth.common import GrowthError
from lightning_jax.growth.dense_to_moe import dense_to_moe
from lightning_jax.growth.depth_map import MAPPINGS, check_mapping, depth_map
from lightning_jax.growth.expand_experts import expand_experts

VOCAB = 64
SEED = int(np.random.SeedSequence().entropy % (2 ** 31))


def _cfg(mod):
  c = mod.get_config()
  c.model.vocab_size = VOCAB
  return c


@pytest.fixture(scope="module")
def cfgs():
  return {"dense": _cfg(tiny), "moe": _cfg(tiny_moe), "deep": _cfg(tiny_deep), "big": _cfg(tiny_120b)}


def random_tree(cfg, seed, special=None):
  """Variables shaped like cfg's abstract tree; float leaves N(mu, sd) with per-leaf mu, sd
  (so statistics are distinguishable); `special(path, shape, rng)` may supply a leaf."""
  ab, flat = common.abstract_flat(cfg, common.COLLECTIONS)
  rng = np.random.default_rng(seed)
  out = {}
  for k, s in flat.items():
    v = special(k, s.shape, rng) if special else None
    if v is None:
      if np.issubdtype(np.dtype(s.dtype), np.floating):
        v = rng.normal(rng.uniform(-0.02, 0.02), rng.uniform(0.01, 0.05), s.shape)
      else:
        v = rng.integers(0, 100, s.shape)
    out[k] = np.asarray(v).astype(s.dtype)
  import jax
  return jax.tree_util.tree_map_with_path(lambda p, _: out[nn.path_str(p)], ab)


def flat(tree):
  return common.flatten(tree)


def assert_tree_is_target(tree, cfg):
  import jax
  ab, want = common.abstract_flat(cfg, common.COLLECTIONS)
  assert jax.tree_util.tree_structure(tree) == jax.tree_util.tree_structure(ab)
  got = flat(tree)
  for k, s in want.items():
    assert got[k].shape == tuple(s.shape) and got[k].dtype == np.dtype(s.dtype), k


@pytest.fixture(scope="module")
def dense_src(cfgs):
  return random_tree(cfgs["dense"], SEED)


# ----------------------------------------------------------------------------- dense -> MoE
@pytest.mark.parametrize("strategy", ["partition", "drop"])
def test_dense_to_moe(cfgs, dense_src, strategy):
  src, dst = cfgs["dense"], cfgs["moe"]
  out, rep = dense_to_moe(dense_src, src, dst, strategy=strategy, seed=SEED, return_report=True)
  assert_tree_is_target(out, dst)
  fs, fo = flat(dense_src), flat(out)
  f, F, E = dst.moe.expert_width, src.model.ffn_width, dst.moe.n_experts
  nodes = [(f"groups/l{j}", E, True) for j in range(4)] + [("mtp/layer", dst.moe.mtp_n_experts, False)]
  for base, n_exp, stacked in nodes:
    p = f"params/{base}/moe"
    dg, du, dd = (fs[f"params/{base}/ffn/{k}"] for k in ("gate", "up", "down"))
    for k in ("gate", "up", "down"):         # shared expert == the dense FFN, exactly
      np.testing.assert_array_equal(fo[f"{p}/shared/{k}"], fs[f"params/{base}/ffn/{k}"])
    ch = rep.choices[f"{base}/moe"]["channels"]
    assert ch.shape == ((dg.shape[0] if stacked else 1), n_exp, f)
    eg, eu, ed = (fo[f"{p}/experts/{k}"] for k in ("gate", "up", "down"))
    if not stacked:
      dg, du, dd, eg, eu, ed = (a[None] for a in (dg, du, dd, eg, eu, ed))
    for g in range(ch.shape[0]):
      for e in range(n_exp):
        s = ch[g, e]
        assert len(set(s.tolist())) == f and s.min() >= 0 and s.max() < F, (SEED, base, g, e)
        keep = np.ones(f, bool)
        if strategy == "drop":
          keep[rep.choices[f"{base}/moe"]["redrawn"][g, e]] = False
          assert keep.sum() == f - f // 2
        # each routed expert == the dense slices at its channel set (gate/up columns, down rows)
        np.testing.assert_array_equal(eg[g, e][:, keep], dg[g][:, s[keep]], err_msg=f"seed {SEED}")
        np.testing.assert_array_equal(eu[g, e][:, keep], du[g][:, s[keep]], err_msg=f"seed {SEED}")
        np.testing.assert_array_equal(ed[g, e][keep, :], dd[g][s[keep], :], err_msg=f"seed {SEED}")
        if strategy == "drop":   # re-drawn channels are not copies of any dense channel
          assert not np.isin(eg[g, e][0, ~keep], dg[g][0]).any()
    w = fo[f"{p}/router/w"]
    # N(0, 0.02) within 5 sigma of the sample size (the MTP router has only d x 4 entries: a
    # fixed 0.004 was 2.3 sigma for its mean and failed about one seed in 40)
    tol = 5 * 0.02 / np.sqrt(w.size)
    assert abs(w.std() - 0.02) < tol / np.sqrt(2) and abs(w.mean()) < tol, (SEED, w.shape,
                                                                              w.std(), w.mean())
    assert not fo[f"{p}/router/logit_bias"].any() and not fo[f"{p}/router/null_logit"].any()
  # everything but the FFNs copies
  for k, v in fo.items():
    if "/moe/" not in k:
      np.testing.assert_array_equal(v, fs[k], err_msg=k)
  assert set(rep.fresh()) == {k for k in fo if "/router/" in k}


def test_drop_statistics(cfgs):
  """drop: re-drawn channels follow N(mean, std) of the whole source matrix."""
  src, dst = cfgs["dense"], cfgs["moe"]
  mus = {"gate": 0.05, "up": -0.03, "down": 0.01}
  sds = {"gate": 0.02, "up": 0.06, "down": 0.03}

  def special(path, shape, rng):
    k = path.split("/")[-1]
    if "/ffn/" in path:
      return rng.normal(mus[k], sds[k], shape)
  s_tree = random_tree(src, SEED + 1, special)
  out, rep = dense_to_moe(s_tree, src, dst, strategy="drop", seed=SEED, return_report=True)
  fo, fs = flat(out), flat(s_tree)
  for k in ("gate", "up", "down"):
    vals = []
    for j in range(4):
      base = f"groups/l{j}"
      e = fo[f"params/{base}/moe/experts/{k}"][:, :dst.moe.n_experts]
      red = rep.choices[f"{base}/moe"]["redrawn"]
      for g in range(e.shape[0]):
        for x in range(e.shape[1]):
          vals.append(e[g, x][:, red[g, x]].ravel() if k != "down" else e[g, x][red[g, x]].ravel())
    v = np.concatenate(vals)
    sm = np.mean([fs[f"params/groups/l{j}/ffn/{k}"].mean() for j in range(4)])
    ss = np.mean([fs[f"params/groups/l{j}/ffn/{k}"].std() for j in range(4)])
    assert abs(v.mean() - sm) < 5 * ss / np.sqrt(v.size), (SEED, k, v.mean(), sm)
    assert abs(v.std() / ss - 1) < 0.05, (SEED, k, v.std(), ss)


def test_seeds(cfgs, dense_src):
  src, dst = cfgs["dense"], cfgs["moe"]
  a = flat(dense_to_moe(dense_src, src, dst, strategy="drop", seed=SEED))
  b = flat(dense_to_moe(dense_src, src, dst, strategy="drop", seed=SEED))
  c = flat(dense_to_moe(dense_src, src, dst, strategy="drop", seed=SEED + 1))
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
  assert any(not np.array_equal(a[k], c[k]) for k in a if "/experts/" in k)
  assert any(not np.array_equal(a[k], c[k]) for k in a if "/router/w" in k)


def test_params_only_input(cfgs, dense_src):
  """A bare params tree gives a bare params tree (same values as the full-variables call)."""
  src, dst = cfgs["dense"], cfgs["moe"]
  p = dense_to_moe(dense_src["params"], src, dst, seed=3)
  full = dense_to_moe(dense_src, src, dst, seed=3)
  assert set(p) == set(full["params"])
  for k, v in flat(p).items():
    np.testing.assert_array_equal(v, flat(full["params"])[k])


# ----------------------------------------------------------------------------- depth map
@pytest.fixture(scope="module")
def moe_src(cfgs):
  return random_tree(cfgs["moe"], SEED + 2)


def test_depth_map(cfgs, moe_src):
  src, dst = cfgs["moe"], cfgs["deep"]
  mp = [int(x) for x in tiny_deep.MAPPING.split(",")]
  out, rep = depth_map(moe_src, src, dst, mapping=tiny_deep.MAPPING, return_report=True)
  assert_tree_is_target(out, dst)
  fs, fo = flat(moe_src), flat(out)
  n_layer_leaves = 0
  for k, v in fo.items():
    parts = k.split("/")
    if parts[1] != "groups":     # non-layer parameters (embed, head, final norm, MTP) unchanged
      np.testing.assert_array_equal(v, fs[k], err_msg=k)
      continue
    j = int(parts[2][1:])
    for g in range(v.shape[0]):
      s = mp[g * 4 + j]
      sk = "/".join(parts[:2] + [f"l{s % 4}"] + parts[3:])
      np.testing.assert_array_equal(v[g], fs[sk][s // 4], err_msg=f"{k}[{g}]")
      n_layer_leaves += 1
  assert n_layer_leaves > 0 and rep.fresh() == []
  # the output head's input layer (the last layer) is the source's last layer
  last = dst.model.n_layers - 1
  for k, v in fo.items():
    if k.startswith("params/groups/l3/"):
      np.testing.assert_array_equal(v[last // 4], fs[k][(src.model.n_layers - 1) // 4])


def test_depth_map_refusals(cfgs, moe_src):
  src, dst = cfgs["moe"], cfgs["deep"]
  with pytest.raises(GrowthError, match=r"copies a D layer into target layer 3, which is a G"):
    depth_map(moe_src, src, dst, mapping=[0, 1, 2, 0, 0, 1, 2, 3])
  with pytest.raises(GrowthError, match=r"has 4 entries .* model.n_layers=8"):
    depth_map(moe_src, src, dst, mapping=[0, 1, 2, 3])
  with pytest.raises(GrowthError, match=r"mapping\[1\]=9 is not a source layer"):
    depth_map(moe_src, src, dst, mapping=[0, 9, 2, 3, 0, 1, 2, 3])
  with pytest.raises(GrowthError, match=r"depth_map keeps the layer type"):
    depth_map(random_tree(cfgs["dense"], 0), cfgs["dense"], dst, mapping=tiny_deep.MAPPING)


def test_5b_to_9b_mapping_full_size():
  """The named mapping fits the real stage configs; a head-layer change is refused."""
  s5, s9 = stage_5b.get_config(), stage_9b.get_config()
  check_mapping(MAPPINGS["5b_to_9b"], s5, s9)
  bad = list(MAPPINGS["5b_to_9b"])
  bad[-1] = 3                   # a G layer, but not the one the head was trained with
  with pytest.raises(GrowthError, match=r"ends with source layer 3, but the output head was trained "
                                        r"reading source layer 7: the last trained layer must stay"):
    check_mapping(bad, s5, s9)


# ----------------------------------------------------------------------------- expansion
def test_expand_experts(cfgs):
  src, dst = cfgs["deep"], cfgs["big"]
  Es, Ed, f = src.moe.n_experts, dst.moe.n_experts, src.moe.expert_width
  C = Ed // Es

  def special(path, shape, rng):   # per-expert distinct statistics
    if "/moe/experts/" in path:
      ne = shape[-3]
      mu = rng.uniform(-0.05, 0.05, (ne, 1, 1))
      sd = rng.uniform(0.01, 0.08, (ne, 1, 1))
      return mu + sd * rng.standard_normal(shape)
  s_tree = random_tree(src, SEED + 3, special)
  out, rep = expand_experts(s_tree, src, dst, ratio=0.5, router_sigma=0.05, seed=SEED,
                            return_report=True)
  assert_tree_is_target(out, dst)
  fs, fo = flat(s_tree), flat(out)
  n_re = f // 2
  zs_mean, ratios = [], []
  for j in range(4):
    p = f"params/groups/l{j}/moe"
    red = rep.choices[f"groups/l{j}/moe"]["redrawn"]
    assert red.shape == (2, Ed, n_re)
    for k in ("gate", "up", "down"):
      se, te = fs[f"{p}/experts/{k}"], fo[f"{p}/experts/{k}"]
      for g in range(te.shape[0]):
        for t in range(Ed):
          c, s = divmod(t, Es)          # clone-major: target index = clone * Es + source
          S = red[g, t]
          keep = np.setdiff1d(np.arange(f), S)
          a, b = (te[g, t], se[g, s]) if k != "down" else (te[g, t].T, se[g, s].T)
          np.testing.assert_array_equal(a[:, keep], b[:, keep], err_msg=f"seed {SEED} {k} {t}")
          new, old = a[:, S], b[:, S]
          assert not np.isin(new[0], b[0]).any()
          zs_mean.append((new.mean() - old.mean()) / (old.std() / np.sqrt(new.size)))
          ratios.append(new.std() / old.std())
    # router: tiled clone-major + noise with std router_sigma * std(source router)
    w_s, w_t = fs[f"{p}/router/w"], fo[f"{p}/router/w"]
    assert w_t.shape[-1] == Ed
    noise = w_t - np.tile(w_s, (1, 1, C))
    want = 0.05 * w_s.std(ddof=1)
    assert abs(noise.std() / want - 1) < 0.1 and abs(noise.mean()) < 4 * want / np.sqrt(noise.size)
    assert not fo[f"stats/groups/l{j}/moe/bias"].any()
    assert f"{p}/router/logit_bias" in rep.dropped and f"{p}/router/null_logit" in rep.dropped
  zs_mean, ratios = np.array(zs_mean), np.array(ratios)
  # re-drawn entries: mean within a few standard errors, std within sampling error (n = 2048/1024)
  assert np.abs(zs_mean).max() < 5.5 and abs(zs_mean.mean()) < 0.2, (SEED, np.abs(zs_mean).max())
  assert np.abs(ratios - 1).max() < 0.12 and abs(ratios.mean() - 1) < 0.01, (SEED, ratios.mean())
  # MTP block keeps its experts, shared expert and router weights; everything else unchanged
  for k, v in fo.items():
    if "/moe/experts/" in k and k.startswith("params/mtp"):
      np.testing.assert_array_equal(v[:dst.moe.mtp_n_experts], fs[k][:src.moe.mtp_n_experts])
    elif ("/moe/experts/" not in k and "/router/" not in k and "stats/" not in k):
      np.testing.assert_array_equal(v, fs[k], err_msg=k)
  np.testing.assert_array_equal(fo["params/mtp/layer/moe/router/w"], fs["params/mtp/layer/moe/router/w"])
  # seeds
  again = flat(expand_experts(s_tree, src, dst, seed=SEED))
  other = flat(expand_experts(s_tree, src, dst, seed=SEED + 1))
  for k in fo:
    np.testing.assert_array_equal(fo[k], again[k])
  assert not np.array_equal(fo["params/groups/l0/moe/experts/gate"], other["params/groups/l0/moe/experts/gate"])


def test_expand_padding(cfgs):
  """With expert parallelism the stored experts are padded with zero slots the router never sees."""
  src = cfgs["deep"]
  dst = cfgs["big"].copy_and_resolve_references()
  dst.moe.n_experts = 8                   # 2 clones
  dst.mesh.expert = 3                     # 8 -> 9 slots, the MTP block's 4 -> 6 slots
  s_tree = random_tree(src, 1)
  out, rep = expand_experts(s_tree, src, dst, seed=SEED, return_report=True)
  fo, fs = flat(out), flat(s_tree)
  for k in ("gate", "up", "down"):
    e = fo[f"params/groups/l1/moe/experts/{k}"]
    assert e.shape[1] == 9 and not e[:, 8:].any() and e[:, :8].all()
    m = fo[f"params/mtp/layer/moe/experts/{k}"]
    assert m.shape[0] == 6 and not m[4:].any()
    np.testing.assert_array_equal(m[:4], fs[f"params/mtp/layer/moe/experts/{k}"])
  assert rep.choices["groups/l1/moe"]["redrawn"].shape[1] == 8


# ----------------------------------------------------------------------------- guards
def test_source_stage_refused(cfgs, dense_src, moe_src):
  with pytest.raises(GrowthError, match=r"^dense_to_moe needs a dense source .* use depth_map or "
                                        r"expand_experts to grow an MoE checkpoint\.$"):
    dense_to_moe(moe_src, cfgs["moe"], cfgs["moe"], seed=0)
  with pytest.raises(GrowthError, match=r"^expand_experts needs an MoE source .*run dense_to_moe "
                                        r"first\.$"):
    expand_experts(dense_src, cfgs["dense"], cfgs["big"])
  with pytest.raises(GrowthError, match=r"expand_experts keeps the depth.*run depth_map first"):
    expand_experts(moe_src, cfgs["moe"], cfgs["big"])
  # a tree that does not match the config it claims to be
  with pytest.raises(GrowthError, match=r"source tree does not match its config.*lacks "
                                        r"params/groups/l0/ffn/down"):
    bad = flat(dense_src)
    del bad["params/groups/l0/ffn/down"]
    dense_to_moe(common_unflatten(bad), cfgs["dense"], cfgs["moe"], seed=0)


def common_unflatten(flat_tree):
  out = {}
  for k, v in flat_tree.items():
    node = out
    parts = k.split("/")
    for p in parts[:-1]:
      node = node.setdefault(p, {})
    node[parts[-1]] = v
  return out


def test_unwritten_target_leaf_refused(cfgs, dense_src, monkeypatch):
  """A target leaf nobody writes (a name the transform does not know) is refused by name."""
  import jax
  from lightning_jax import model
  orig = model.abstract_variables

  def with_extra(cfg):
    ab = orig(cfg)
    if cfg.moe.enabled:
      ab["params"]["head"]["bias"] = jax.ShapeDtypeStruct((VOCAB,), np.float32)
    return ab
  monkeypatch.setattr(model, "abstract_variables", with_extra)
  with pytest.raises(GrowthError, match=r"not written from the source nor listed as fresh.*"
                                        r"params/head/bias"):
    dense_to_moe(dense_src, cfgs["dense"], cfgs["moe"], seed=0)


def test_finish_guards(cfgs):
  """Shape/dtype mismatches, unknown leaves and silently unused source leaves are refused."""
  dst = cfgs["moe"]
  tree = random_tree(dst, 5)
  out = flat(tree)
  rep = common.GrowthReport("t", {}, provenance={k: "copy" for k in out})
  common.finish(dict(out), rep, dst, common.COLLECTIONS, {}, set(), True)   # the good case
  bad = dict(out)
  bad["params/head/w"] = bad["params/head/w"][:, :-1]
  with pytest.raises(GrowthError, match=r"shapes/dtypes.*params/head/w \(64, 63\)/float32 "
                                        r"\(target config: \(64, 64\)/float32\)"):
    common.finish(bad, rep, dst, common.COLLECTIONS, {}, set(), True)
  bad = dict(out)
  bad["params/head/w"] = bad["params/head/w"].astype(np.float16)
  with pytest.raises(GrowthError, match=r"params/head/w .*float16"):
    common.finish(bad, rep, dst, common.COLLECTIONS, {}, set(), True)
  bad = dict(out)
  bad["params/head/wrong_name"] = bad["params/head/w"]
  with pytest.raises(GrowthError, match=r"do not exist in the target model.*params/head/wrong_name"):
    common.finish(bad, rep, dst, common.COLLECTIONS, {}, set(), True)
  with pytest.raises(GrowthError, match=r"neither used nor listed as dropped.*params/old/leaf"):
    common.finish(dict(out), rep, dst, common.COLLECTIONS, {"params/old/leaf": 0}, set(), True)
  rep2 = common.GrowthReport("t", {}, provenance={k: "copy" for k in list(out)[1:]})
  with pytest.raises(GrowthError, match=r"without provenance"):
    common.finish(dict(out), rep2, dst, common.COLLECTIONS, {}, set(), True)


def test_config_mismatch_refused(cfgs, dense_src):
  dst = cfgs["moe"].copy_and_resolve_references()
  dst.moe.shared_width = 64
  with pytest.raises(GrowthError, match=r"moe.shared_width=64 must equal the source's "
                                        r"model.ffn_width=128"):
    dense_to_moe(dense_src, cfgs["dense"], dst, seed=0)
  dst = cfgs["moe"].copy_and_resolve_references()
  dst.model.n_layers = 8
  with pytest.raises(GrowthError, match=r"keeps model.n_layers: the source has 4"):
    dense_to_moe(dense_src, cfgs["dense"], dst, seed=0)
  with pytest.raises(GrowthError, match="strategy='split'"):
    dense_to_moe(dense_src, cfgs["dense"], cfgs["moe"], strategy="split", seed=0)


def test_transforms_register_themselves_and_the_cli_reads_the_registry():
  """Each transform module registers itself; growth/cli.py's usage and flags come from there;
  a bad registration or an unknown name is one sentence."""
  from growth import cli
  from lightning_jax.growth import driver, registry
  assert set(registry.names()) == {m.__name__.rsplit(".", 1)[1] for m in driver.TRANSFORM_MODULES}
  for name in registry.names():
    t = registry.get(name)
    assert t.needs and t.makes and all(f.help for f in t.flags), name
    text = cli.usage(name)
    assert f"python -m growth.{name} " in text and t.needs in text, text
    assert all(f"--{f.name}={f.default}" in text for f in t.flags), text
  assert [f.name for f in registry.get("expand_to_tqp").flags] == ["ratio", "router_sigma", "seed"]
  with pytest.raises(ValueError, match=r"unknown growth transform 'nope'; expected one of"):
    registry.get("nope")
  with pytest.raises(ValueError, match=r"flag --x has kind 'bool'; expected one of"):
    registry.register(registry.Transform("bad", lambda *a, **k: None, "a", "b",
                                         flags=(registry.Flag("x", "bool", False, "h"),)))
  assert "bad" not in registry.names()
