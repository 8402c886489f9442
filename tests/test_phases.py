"""Training phases of the stage configs (SPEC §5), phase hand-over (growth.next_phase) and the
checkpoint EMA (launch.ema).

The config and schedule checks compile nothing. next_phase and ema run on checkpoints built
directly with Checkpointer from random arrays shaped like the tiny config at two layers (no
training).
"""
import math
import pathlib

import numpy as np
import pytest

from lightning_jax import optim
from lightning_jax.config import ConfigError, load_config

REPO = pathlib.Path(__file__).resolve().parents[1]
SEED = int(np.random.SeedSequence().entropy % (2 ** 31))


def _cfg(spec):
  return load_config(str(REPO / "configs" / spec))


def _lr(cfg, step):
  return float(optim.make_schedule(cfg)(step))


def _close(a, b, rel=1e-5):
  return math.isclose(a, b, rel_tol=rel, abs_tol=1e-12)


# ----------------------------------------------------------------------------- the phases
@pytest.mark.parametrize("spec,phase,tokens,batch,seq", [
    ("stage_2b.py", "p1", 30_200_000_000, 32, 4096),
    ("stage_5b.py:p1", "p1", 600_000_000, 32, 4096),
    ("stage_5b.py:p2", "p2", 5_700_000_000, 32, 4096),
    ("stage_9b.py:p1", "p1", 1_000_000_000, 120, 4096),
    ("stage_9b.py:p2", "p2", 7_000_000_000, 120, 4096),
    ("stage_9b.py:p3", "p3", 23_600_000_000, 56, 8192),
    ("stage_9b.py:p4", "p4", 7_900_000_000, 56, 8192),
    ("stage_120b.py:p1", "p1", 2_000_000_000, 64, 8192),
    ("stage_120b.py:p2", "p2", 5_100_000_000, 128, 4096),
])
def test_phase_budget_batch_and_accumulation(spec, phase, tokens, batch, seq):
  from lightning_jax.run.state import check_train_config
  from lightning_jax.config import validate
  c = _cfg(spec)
  assert c.phase == phase
  assert (c.train.total_tokens, c.train.global_batch, c.train.seq_len, c.train.steps) == \
      (tokens, batch, seq, 0)
  assert optim.total_steps(c) == tokens // (batch * seq)
  validate(c)
  accum = check_train_config(c, 8)               # 8 devices: every phase's batch is reachable
  assert accum * c.train.micro_batch * 8 == batch


def test_default_phase_is_the_first_and_unknown_phase_is_one_sentence():
  for stage, n in (("stage_5b", 2), ("stage_9b", 4), ("stage_120b", 2)):
    a, b = _cfg(f"{stage}.py"), _cfg(f"{stage}.py:p1")
    assert a.to_dict() == b.to_dict()
    with pytest.raises(ConfigError) as e:
      _cfg(f"{stage}.py:p{n + 1}")
    msg = str(e.value)
    assert f"no phase 'p{n + 1}'" in msg and ", ".join(f"p{i}" for i in range(1, n + 1)) in msg
  import importlib
  assert importlib.import_module("configs.stage_9b").get_config().phase == "p1"   # no argument
  with pytest.raises(ConfigError, match="takes no argument"):
    _cfg("tiny.py:p1")


def test_relative_paths_resolve_from_the_repository(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)                  # start_from "configs/stage_9b.py:p3" is relative
  c = load_config("configs/stage_9b.py:p4")
  assert c.phase == "p4" and _close(optim.start_lr(c), 5e-5)
  with pytest.raises(ConfigError, match="does not exist"):
    load_config("configs/no_such_stage.py:p1")


def test_config_flags_passes_the_phase():
  from absl import flags
  from ml_collections import config_flags
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "config", flag_values=fv, lock_config=True)
  fv(["prog", f"--config={REPO / 'configs' / 'stage_9b.py'}:p4"])
  assert fv.config.phase == "p4" and fv.config.model.use_rotary is False


def test_5b_schedule():
  p1, p2 = _cfg("stage_5b.py:p1"), _cfg("stage_5b.py:p2")
  assert _close(optim.start_lr(p1), 1e-4)                      # the 2B seed's end LR
  assert _close(_lr(p1, 0), 1e-4) and _close(_lr(p1, 250), 3e-4)
  n1 = optim.total_steps(p1)
  assert _close(_lr(p1, 500), 5e-4) and _close(_lr(p1, n1), 5e-4)   # flat after warmup
  n2 = optim.total_steps(p2)
  assert _close(_lr(p2, 0), 5e-4) and _close(_lr(p2, n2 // 2), 2.75e-4, 1e-3)
  assert _close(_lr(p2, n2), 5e-5)
  assert _close(optim.start_lr(p2), optim.end_lr(p1.optim))


def test_9b_schedule():
  p = {k: _cfg(f"stage_9b.py:{k}") for k in ("p1", "p2", "p3", "p4")}
  assert _close(_lr(p["p1"], 0), 2e-6) and _close(_lr(p["p1"], 2000), 5e-5)
  assert _close(_lr(p["p1"], 1000), (2e-6 + 5e-5) / 2)
  assert _close(_lr(p["p1"], optim.total_steps(p["p1"])), 5e-5)
  for k in ("p2", "p3"):
    n = optim.total_steps(p[k])
    assert all(_close(_lr(p[k], s), 5e-5) for s in (p[k].optim.warmup_steps, n // 2, n))
  assert _close(_lr(p["p3"], 0), 4e-5) and _close(_lr(p["p3"], 150), 4.5e-5)
  assert _close(_lr(p["p2"], 0), 5e-5)
  n4 = optim.total_steps(p["p4"])
  assert _close(_lr(p["p4"], 0), 5e-5) and _close(_lr(p["p4"], n4), 1.7e-5)
  assert _close(_lr(p["p4"], n4 // 2), (5e-5 + 1.7e-5) / 2, 1e-3)
  assert [p[k].model.use_rotary for k in ("p1", "p2", "p3", "p4")] == [True, True, True, False]
  # the model sections differ only in use_rotary: every phase shares one parameter tree
  m = [dict(p[k].model.to_dict(), use_rotary=None) for k in p]
  assert all(x == m[0] for x in m)


def test_120b_schedule():
  p1, p2 = _cfg("stage_120b.py:p1"), _cfg("stage_120b.py:p2")
  assert p1.optim.schedule == "wsd" and p2.optim.schedule == "cosine"
  n1 = optim.total_steps(p1)
  assert _close(_lr(p1, 0), 1e-5) and _close(_lr(p1, 300), 3.5e-5)
  stable_end = 300 + round(0.85 * (n1 - 300))
  assert _close(_lr(p1, stable_end), 3.5e-5) and _close(_lr(p1, n1), 3.5e-6)
  assert _lr(p1, stable_end + 10) < 3.5e-5
  assert optim.lr_multipliers(p1) == {"router": 1.0, "adapters": 3.0, "rest": 0.01}
  n2 = optim.total_steps(p2)
  assert _close(_lr(p2, 0), 3.5e-6) and _close(_lr(p2, 485), 2e-5)
  assert _close(_lr(p2, n2), 1e-6)
  assert optim.lr_multipliers(p2) == {"router": 1.0, "adapters": 1.0, "rest": 1.0}


# ----------------------------------------------------------------------------- checkpoints
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """(config, data_dir, manifest) of the tiny config on the bundled corpus (prepared once), with
  one layer of each kind: the hand-over and the EMA treat every leaf alike, and half the layers
  are half the leaves to save and restore."""
  from lightning_jax.run import setup
  work = tmp_path_factory.mktemp("phase_data")
  c = _cfg("tiny.py")
  c.model.n_layers, c.model.pattern = 2, "DG"
  data_dir, manifest = setup.resolve_data(c, work, log=lambda *a: None)
  c.data.path = data_dir
  setup.apply_data_vocab(c, manifest, data_dir)
  return c, data_dir, manifest


def _random_state(cfg, rng, step):
  """A launch.train state for cfg from random arrays (no model init, no compile): params, frozen
  and stats shaped like the model; Adam moments random; every int counter = step."""
  import jax
  import jax.numpy as jnp
  from lightning_jax import model
  ab = model.abstract_variables(cfg)

  def rand(a, positive=False):
    if np.issubdtype(np.dtype(a.dtype), np.floating):
      x = rng.normal(0, 0.05, a.shape)
      return np.asarray(np.abs(x) if positive else x, a.dtype)
    return np.full(a.shape, step, a.dtype)
  var = {k: jax.tree_util.tree_map(rand, ab[k]) for k in ("params", "frozen", "stats")}
  tx, _ = optim.make_optimizer(cfg, var["params"], optim.total_steps(cfg))
  opt = jax.eval_shape(tx.init, var["params"])
  opt = jax.tree_util.tree_map(lambda a: jnp.asarray(rand(a, positive=True)), opt)
  return {**{k: jax.tree_util.tree_map(jnp.asarray, v) for k, v in var.items()},
          "opt_state": opt, "step": jnp.int32(step)}


def _save_run(run, cfg, data_dir, manifest, states: dict):
  from lightning_jax.run import setup
  from lightning_jax import checkpoint as ck
  loader, _ = setup.make_data(cfg, data_dir, manifest)
  w = ck.Checkpointer(pathlib.Path(run) / "checkpoints", ck.config_ns(keep=0))
  for step, st in states.items():
    w.save(step, st, loader.get_state(), ck.config_to_json(cfg), {"loss": 1.0, "tokens": 0})
    w.wait()
  w.close()
  return loader.get_state()


def _np(tree):
  import jax
  return {k: np.asarray(v) for k, v in
          ((jax.tree_util.keystr(p), v) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0])}


def test_next_phase_carries_params_moments_and_loader(tiny, tmp_path):
  import optax
  from lightning_jax.growth.common import GrowthError
  from lightning_jax.growth.next_phase import next_phase, restore_opt_state
  from lightning_jax.run import checkpoints as run_ckpt
  cfg, data_dir, manifest = tiny
  rng = np.random.default_rng(SEED)
  src_state = _random_state(cfg, rng, step=7)
  saved_loader = _save_run(tmp_path / "p1", cfg, data_dir, manifest, {7: src_state})
  tgt = cfg.copy_and_resolve_references()
  tgt.model.use_rotary = False                       # like 9B p4
  tgt.optim.schedule, tgt.optim.warmup_steps = "constant", 0
  tgt.phase = "p2"
  out = next_phase(str(tmp_path / "p1"), str(tmp_path / "p2"), tgt, log=lambda *a: None)
  prov = out["meta"]["provenance"]
  assert (prov["source_step"], prov["phase"], prov["optimizer"], prov["loader"]) == \
      (7, "p2", "carried", "carried"), f"seed {SEED}"
  got = run_ckpt.read_source(str(tmp_path / "p2"), log=lambda *a: None)
  assert got["step"] == 0 and got["cfg"].model.use_rotary is False
  assert got["meta"]["provenance"]["source_path"].endswith("p1/checkpoints/7")
  a, b = _np(src_state["params"]), _np(got["variables"]["params"])
  assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a), f"seed {SEED}"
  # Adam moments and Adam's count carried; the schedule's count restarts at 0
  opt = restore_opt_state(tmp_path / "p2" / "checkpoints" / "0", tgt, got["variables"]["params"])
  adam = [s for s in _leaves_of(opt, optax.ScaleByAdamState)]
  sched = [s for s in _leaves_of(opt, optax.ScaleByScheduleState)]
  src_adam = _leaves_of(src_state["opt_state"], optax.ScaleByAdamState)
  assert adam and sched and len(adam) == len(src_adam)
  for x, y in zip(adam, src_adam):
    assert int(x.count) == 7
    for m in ("mu", "nu"):
      u, v = _np(getattr(x, m)), _np(getattr(y, m))
      assert all(np.array_equal(u[k], v[k]) for k in v), f"{m} seed {SEED}"
  assert all(int(s.count) == 0 for s in sched)
  from lightning_jax import checkpoint as ck
  r = ck.Checkpointer(tmp_path / "p2" / "checkpoints", ck.config_ns(keep=0), read_only=True)
  assert r.read_json(0, "loader") == saved_loader
  r.close()

  # another batch geometry: the loader restarts, the moments still carry
  t3 = tgt.copy_and_resolve_references()
  t3.train.global_batch = 16
  out3 = next_phase(str(tmp_path / "p1"), str(tmp_path / "p3"), t3, log=lambda *a: None)
  assert out3["meta"]["provenance"]["loader"] == "fresh"
  # a different model is growth's job; so is another stage
  bad = tgt.copy_and_resolve_references()
  bad.model.n_layers = 8
  with pytest.raises(GrowthError, match="model differs"):
    next_phase(str(tmp_path / "p1"), str(tmp_path / "bad"), bad, log=lambda *a: None)
  bad = tgt.copy_and_resolve_references()
  bad.stage = "9b"
  with pytest.raises(GrowthError, match="continues one stage"):
    next_phase(str(tmp_path / "p1"), str(tmp_path / "bad2"), bad, log=lambda *a: None)


def _leaves_of(tree, kind):
  import jax
  return [n for n in jax.tree_util.tree_leaves(tree, is_leaf=lambda n: isinstance(n, kind))
          if isinstance(n, kind)]


def test_ema_over_last_checkpoints(tiny, tmp_path):
  from launch.ema import ema, ema_weights
  from lightning_jax.run import checkpoints as run_ckpt
  from lightning_jax import checkpoint as ck
  cfg, data_dir, manifest = tiny
  rng = np.random.default_rng(SEED + 1)
  states = {s: _random_state(cfg, rng, step=s) for s in (10, 20, 30, 40)}
  _save_run(tmp_path / "run", cfg, data_dir, manifest, states)
  alpha = float(rng.uniform(0.1, 0.9))
  with pytest.raises(ck.CheckpointError, match=r"holds 4 checkpoint\(s\)"):
    ema(str(tmp_path / "run"), str(tmp_path / "e6"), alpha=alpha, last=6, log=lambda *a: None)
  out = ema(str(tmp_path / "run"), str(tmp_path / "e3"), alpha=alpha, last=3, log=lambda *a: None)
  assert out["steps"] == [20, 30, 40]
  # hand reference, float64: oldest first, e = alpha * x + (1 - alpha) * e
  flat = {s: _np(states[s]["params"]) for s in (20, 30, 40)}
  got = run_ckpt.read_source(str(tmp_path / "e3"), log=lambda *a: None)
  g = _np(got["variables"]["params"])
  for k in g:
    e = flat[20][k].astype(np.float64)
    for s in (30, 40):
      e = alpha * flat[s][k].astype(np.float64) + (1 - alpha) * e
    np.testing.assert_allclose(g[k], e, rtol=1e-5, atol=1e-7, err_msg=f"{k} seed {SEED}")
  # frozen and stats are the newest checkpoint's; the provenance names the steps and alpha
  nf, gf = _np(states[40]["stats"]), _np(got["variables"]["stats"])
  assert all(np.array_equal(nf[k], gf[k]) for k in nf)
  assert got["meta"]["provenance"]["ema"]["steps"] == [20, 30, 40]
  assert math.isclose(sum(ema_weights(6, 0.2)), 1.0) and \
      np.allclose(ema_weights(6, 0.2), [0.32768, 0.08192, 0.1024, 0.128, 0.16, 0.2])
