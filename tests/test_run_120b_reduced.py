"""The pieces benchmarks/run_120b_reduced.sh adds to the lineage (issue 10):

* growth.expand_to_tqp writes exactly what growth.expand_experts followed by growth.to_tqp write
  (same leaves, bit for bit), and expand_experts' parallel layer loop gives each (layer, group)
  exactly the experts expand_one draws from that layer's own random stream (the sequential
  reference);
* growth.init writes a step-0 run whose variables are launch.train's fresh init for the config
  (model.init_variables with PRNGKey(train.seed) and the data's codec), with provenance "init";
* launch.train's end-of-run peak device memory reads memory_stats() per device, and reports
  nothing on a backend without statistics.
The whole script runs with TINY=1 (benchmarks/run_120b_reduced.sh; about 3 minutes on 2 cores).
"""
import pathlib

import jax
import numpy as np

from configs import tiny_120b, tiny_deep
from lightning_jax.growth import common
from lightning_jax.growth.expand_experts import expand_experts, expand_one
from lightning_jax.growth.expand_to_tqp import chain_reports, expand_to_tqp
from lightning_jax.growth.to_tqp import to_tqp
from test_growth import random_tree   # the growth tests' random variables (tests/ is on sys.path)

REPO = pathlib.Path(__file__).resolve().parents[1]
VOCAB = 64
SEED = int(np.random.SeedSequence().entropy % (2 ** 31))


def _cfg(mod, **model):
  c = mod.get_config()
  c.model.vocab_size = VOCAB
  for k, v in model.items():
    c.model[k] = v
  return c


def test_expand_to_tqp_is_expand_then_quantize():
  src_cfg, dst_cfg = _cfg(tiny_deep), _cfg(tiny_120b)      # 8 layers: 2 groups per position
  src = random_tree(src_cfg, SEED)
  args = dict(ratio=0.5, router_sigma=0.05, seed=SEED % 1000)
  dst_cfg.tqp.seed = SEED % 997
  # 20..36 experts: the quantizer's batches of 16 experts, a remainder batch for most draws
  dst_cfg.moe.n_experts = src_cfg.moe.n_experts * (5 + SEED % 5)
  workers = 1 + SEED % 3                                   # the layer pipeline's width: any
  lines = []
  got, rep = expand_to_tqp(src, src_cfg, dst_cfg, return_report=True, workers=workers,
                           log=lines.append, **args)
  assert len(lines) == 8, (SEED, lines)                    # 4 positions x 2 groups, one at a time
  mid_cfg = common.dense_expert_cfg(dst_cfg)
  mid, r1 = expand_experts(src, src_cfg, mid_cfg, return_report=True, **args)
  want, r2 = to_tqp(mid, mid_cfg, dst_cfg, return_report=True)
  g, w = common.flatten(got), common.flatten(want)
  assert set(g) == set(w), (SEED, sorted(set(g) ^ set(w))[:4])
  for k in w:
    assert g[k].dtype == w[k].dtype and np.array_equal(np.asarray(g[k]), np.asarray(w[k])), (SEED, k)
  # the same report as the two steps chained
  ref = chain_reports(r1, r2)
  assert rep.provenance == ref.provenance and rep.dropped == ref.dropped and rep.args == ref.args, SEED
  assert set(rep.choices) == set(ref.choices), SEED
  for node, ch in ref.choices.items():
    assert set(rep.choices[node]) == set(ch), (SEED, node)
    for k, v in ch.items():
      assert np.array_equal(np.asarray(rep.choices[node][k]), np.asarray(v)), (SEED, node, k)
  assert any(k.startswith("frozen/") and "/moe/experts/" in k for k in g), SEED
  # provenance chains both steps: the quantized bases name the clone expansion they came from
  base = next(k for k in rep.provenance if k.startswith("frozen/groups/l0/moe/experts/gate"))
  assert "TurboQuant" in rep.provenance[base] and "clones" in rep.provenance[base], rep.provenance[base]
  # the parallel layer loop == expand_one on each (layer, group)'s own stream, in any order
  fs, fm = common.flatten(src), common.flatten(mid)
  es, ed = src_cfg.moe.n_experts, dst_cfg.moe.n_experts
  for j in (0, 3):
    prefix = f"groups/l{j}/moe"
    lead = fs[f"params/{prefix}/experts/gate"].shape[:-3]
    assert lead == (2,), lead
    for gi in range(2):
      ref, _ = expand_one(*(fs[f"params/{prefix}/experts/{m}"][gi, :es] for m in ("gate", "up", "down")),
                          ed // es, fm[f"params/{prefix}/experts/gate"].shape[-3], 0.5,
                          common.rng_for(args["seed"], "expand_experts", prefix, gi))
      for m in ("gate", "up", "down"):
        assert np.array_equal(fm[f"params/{prefix}/experts/{m}"][gi], ref[m]), (SEED, j, gi, m)


def test_growth_init_is_launch_train_init(tmp_path):
  from lightning_jax.growth.init import init_run
  from lightning_jax.run import checkpoints as run_ckpt
  from lightning_jax.run import setup
  from lightning_jax import model
  from lightning_jax.data import shards
  from lightning_jax.layers import kronecker
  cfg = tiny_deep.get_config()
  cfg.model.n_layers, cfg.model.pattern = 2, "DG"   # one layer of each kind: a smaller initialiser
  cfg.train.seed = SEED % 1000
  cfg.data.build_from = str(REPO / "corpus" / "en")
  cfg.data.use_pools = False
  out = init_run(str(tmp_path / "run"), cfg, on_cpu=True, log=lambda *_: None)
  got = run_ckpt.read_source(str(tmp_path / "run"), log=lambda *_: None)
  assert got["step"] == 0 and got["meta"]["provenance"]["transform"] == "init", got["meta"]
  # the optimizer state is read only on request (the growth transforms never need it)
  assert "opt_state" not in got
  with_opt = run_ckpt.read_source(str(tmp_path / "run"), log=lambda *_: None, opt_state=True)
  opt = jax.tree_util.tree_leaves(with_opt["opt_state"])
  n_par = len(jax.tree_util.tree_leaves(got["variables"]["params"]))
  assert len(opt) >= 2 * n_par and all(isinstance(x, np.ndarray) for x in opt), (len(opt), n_par)
  assert sum(x.size for x in opt) >= 2 * sum(x.size for x in jax.tree_util.tree_leaves(
      got["variables"]["params"])), SEED
  data_dir, manifest = setup.resolve_data(cfg, tmp_path / "run", log=lambda *_: None)
  c = cfg.copy_and_resolve_references()
  setup.apply_data_vocab(c, manifest, data_dir)
  codec = kronecker.codec_from_tokenizer(shards.token_bytes(data_dir), c)
  want = common.flatten(model.init_variables(c, jax.random.PRNGKey(c.train.seed), codec))
  have = common.flatten(got["variables"])
  assert set(want) == set(have)
  assert out["n_params"] == sum(int(np.prod(v.shape)) for k, v in want.items() if k.startswith("params/"))
  for k in want:
    assert np.array_equal(np.asarray(want[k]), have[k]), (SEED, k)


class _Dev:
  def __init__(self, stats):
    self.stats = stats

  def memory_stats(self):
    if isinstance(self.stats, Exception):
      raise self.stats
    return self.stats


def test_device_peak_memory():
  from launch.train import device_peak_memory
  rng = np.random.default_rng(SEED)
  peaks = [int(x) for x in rng.integers(1, 10 ** 11, 4)]
  devs = [_Dev({"peak_bytes_in_use": p, "bytes_in_use": 1, "bytes_limit": 2 * 10 ** 11}) for p in peaks]
  got = device_peak_memory(devs)
  assert got["peak_bytes_in_use"] == peaks and got["peak_bytes_in_use_max"] == max(peaks), (SEED, got)
  assert got["bytes_limit"] == [2 * 10 ** 11] * 4
  assert device_peak_memory(devs[:2] + [_Dev(None)]) is None
  assert device_peak_memory([_Dev(RuntimeError("unsupported"))]) is None
