"""launch.train on the real LightningLM (8-device CPU mesh): exact resume, NaN stop, bad input.

One small config is compiled once (launch.train caches the jitted step per config within a
process) and reused by every test here.
"""
import json
import pathlib

import jax
import numpy as np
import pytest

from launch import train as T
from lightning_jax import checkpoint as ck, run_checks
from lightning_jax.config import ConfigError, load_config
from lightning_jax.data import shards
from lightning_jax.run import setup

REPO = pathlib.Path(__file__).resolve().parents[1]


def small_cfg(data_dir):
  """configs/tiny.py at test widths with one layer of each kind (the loop is under test here, not
  the model's depth: 2 layers compile in about 60% of the 4-layer step's time)."""
  c = load_config(str(REPO / "configs" / "tiny.py"))
  m = c.model
  m.n_layers, m.pattern = 2, "DG"
  m.d_model = 32
  m.ffn_width = 64
  m.deltanet.n_heads, m.deltanet.head_dim = 2, 16
  m.deltanet.chunk_size = 16
  m.gsa.n_heads, m.gsa.head_dim = 1, 32
  m.gsa.idx_heads, m.gsa.idx_dim = 2, 8
  m.gsa.k_min, m.gsa.k_base, m.gsa.k_max = 4, 8, 16
  m.gsa.query_chunk = 32
  m.ce_chunk = 128
  c.data.path = str(data_dir)
  c.data.build_from = ""
  c.data.use_pools = False        # the single-source grain window pipeline
  c.train.seq_len = 32
  c.train.global_batch = 8
  c.train.micro_batch = 0
  c.train.steps = 4
  c.train.eval_every = 0
  c.optim.warmup_steps = 1
  c.checkpoint.every_steps = 1000
  c.checkpoint.every_seconds = 0
  return c


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  """A small slice of the bundled English and code corpus, two domains."""
  root = tmp_path_factory.mktemp("corpus")
  for sub in ("en", "code"):
    (root / sub).mkdir()
    lines = (REPO / "corpus" / sub / f"{sub}.jsonl").read_text().splitlines()[:6]
    docs = [json.loads(l)["text"][:3000] for l in lines]
    (root / sub / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
  out = root / "shards"
  shards.prepare([str(root)], str(out), val_fraction=0.2, log=lambda *_: None)
  return out


def test_resume_is_bitwise_exact(data_dir, tmp_path):
  """2N steps straight == N steps, stop, resume N steps: the same loss at every step."""
  cfg = small_cfg(data_dir)
  a = T.train(cfg, tmp_path / "a", progress=False, log=lambda *_: None)
  assert [s for s, _ in a["losses"]] == [1, 2, 3, 4]
  b1 = T.train(cfg, tmp_path / "b", stop_after=2, progress=False, log=lambda *_: None)
  assert b1["final_step"] == 2
  assert ck.Checkpointer(tmp_path / "b" / "checkpoints", cfg.checkpoint).steps() == [2]
  msgs = []
  b2 = T.train(cfg, tmp_path / "b", progress=False, log=msgs.append)
  assert any("resuming from" in m and "step 2" in m for m in msgs), msgs
  assert b2["final_step"] == 4
  assert a["losses"] == b1["losses"] + b2["losses"], (a["losses"], b1["losses"], b2["losses"])
  assert a["losses"][-1][1] < a["losses"][0][1], a["losses"]
  # the frozen buffers are stored once (checkpoints/frozen/0), not inside the step directories,
  # and the resumed run ends bit-identical to the straight one
  ca = ck.Checkpointer(tmp_path / "a" / "checkpoints", cfg.checkpoint, read_only=True)
  cb = ck.Checkpointer(tmp_path / "b" / "checkpoints", cfg.checkpoint, read_only=True)
  assert cb.steps() == [2, 4] and cb.frozen_versions() == [0]
  assert sorted(p.name for p in (tmp_path / "b" / "checkpoints" / "frozen").iterdir()) == ["0"]
  for s in (2, 4):
    assert cb.frozen_ref(s)["version"] == 0
    assert "frozen" not in cb.manager.item_metadata(s)["state"]
  sa, sb = ca.restore(4, None)["state"], cb.restore(4, None)["state"]
  for k in ("params", "frozen", "stats", "opt_state"):
    for x, y in zip(jax.tree_util.tree_leaves(sa[k]), jax.tree_util.tree_leaves(sb[k])):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=k)
  assert jax.tree_util.tree_leaves(sb["frozen"])
  ca.close(); cb.close()
  # the metrics log has one record per step with the fields the issue asks for
  recs = [json.loads(l) for l in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
  steps = [r for r in recs if "loss" in r]
  assert [r["step"] for r in steps] == [1, 2, 3, 4]
  for k in ("loss", "ce_mtp", "aux", "grad_norm", "lr", "tokens_per_s", "mfu"):
    assert k in steps[0], k
  # TensorBoard gets them under train/ and perf/; each launch records its config and commit
  from test_metrics import tb_events
  from lightning_jax.metrics import git_commit
  tags = tb_events(tmp_path / "b")[0]
  assert {"train/loss", "train/aux", "perf/mfu"} <= set(tags) and "loss" not in tags
  assert sorted(tags["train/loss"]) == [1, 2, 3, 4]
  info = [json.loads(l) for l in (tmp_path / "b" / "run_info.jsonl").read_text().splitlines()]
  assert [i["step"] for i in info] == [0, 2] and info[1]["commit"] == git_commit()
  assert info[1]["config"]["train"]["seq_len"] == cfg.train.seq_len
  # restarting a finished run does nothing and keeps the step
  again = T.train(cfg, tmp_path / "a", progress=False, log=lambda *_: None)
  assert again["final_step"] == 4 and again["losses"] == []


def test_nan_stops_with_step_and_keeps_last_checkpoint(data_dir, tmp_path):
  cfg = small_cfg(data_dir)
  cfg.checkpoint.every_steps = 2
  with pytest.raises(T.TrainingStopped, match=r"non-finite loss at step 4 .*checkpoints/2 "
                                              r"\(left intact\)"):
    T.train(cfg, tmp_path / "n", progress=False, log=lambda *_: None, debug_poison_step=3)
  c = ck.Checkpointer(tmp_path / "n" / "checkpoints", cfg.checkpoint)
  assert c.steps() == [2]
  st = c.restore(2, None)["state"]
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(st["params"]))
  c.close()
  recs = [json.loads(l) for l in (tmp_path / "n" / "metrics.jsonl").read_text().splitlines()]
  assert any("stopped" in r and r["step"] == 4 for r in recs)


def test_torn_checkpoint_stops_resume_naming_it(data_dir, tmp_path):
  cfg = small_cfg(data_dir)
  cfg.checkpoint.every_steps = 1
  T.train(cfg, tmp_path / "t", stop_after=2, progress=False, log=lambda *_: None)
  for f in (tmp_path / "t" / "checkpoints" / "2" / "state").rglob("*"):
    if f.is_file() and f.parent.name == "d":
      f.unlink()
  with pytest.raises(ck.CheckpointError, match=r"checkpoints/2 is unreadable"):
    T.train(cfg, tmp_path / "t", progress=False, log=lambda *_: None)
  msgs = []
  s = T.train(cfg, tmp_path / "t", stop_after=1, fallback_to_previous=True, progress=False,
              log=msgs.append)
  assert any("skipping checkpoint" in m for m in msgs) and s["final_step"] == 2
  assert any("resuming from" in m and "step 1" in m for m in msgs), msgs


def test_bad_inputs_one_sentence(data_dir, tmp_path):
  cfg = small_cfg(data_dir)
  cfg.data.path = str(tmp_path / "missing")
  with pytest.raises(shards.DataError, match=r"data directory .*missing does not exist"):
    T.train(cfg, tmp_path / "x", progress=False, log=lambda *_: None)
  cfg = small_cfg(data_dir)
  cfg.train.global_batch = 12
  with pytest.raises(ConfigError, match=r"train.global_batch=12 must be a positive multiple"):
    T.train(cfg, tmp_path / "y", progress=False, log=lambda *_: None)
  tiny = str(REPO / "configs" / "tiny.py")
  with pytest.raises(ConfigError, match=r"--config.optim.bogus: optim has no field 'bogus'"):
    run_checks.check_overrides(["prog", f"--config={tiny}", "--config.optim.bogus=1"])
  with pytest.raises(ConfigError, match=r"--config.nope.x: the config has no field 'nope'"):
    run_checks.check_overrides(["prog", f"--config={tiny}", "--config.nope.x=1"])
  with pytest.raises(ConfigError, match=r"optim.peak_lr is a float field .* 'abc' is not"):
    run_checks.check_overrides(["prog", f"--config={tiny}", "--config.optim.peak_lr=abc"])
  run_checks.check_overrides(["prog", f"--config={tiny}", "--config.optim.peak_lr=1e-3"])


def test_heldout_weights_follow_the_training_mixture():
  cfg = load_config(str(REPO / "configs" / "tiny.py"))
  man = {"shards": [{"split": "train", "domain": d, "n_tokens": n}
                    for d, n in (("en", 100), ("code", 300), ("hi", 50), ("bn", 150),
                                 ("pa", 10), ("gu", 30))] +
                   [{"split": "val", "domain": "en", "n_tokens": 999}]}
  doms = ["en", "code", "hi", "bn", "pa", "gu"]
  cfg.data.use_pools = False
  w = setup.heldout_weights(cfg, man, doms)
  assert w == pytest.approx({"en": 100 / 640, "code": 300 / 640, "hi": 50 / 640,
                             "bn": 150 / 640, "pa": 10 / 640, "gu": 30 / 640})
  cfg.data.use_pools = True     # tiny's pools: D1 en .34, D2 (pa, gu, ...) .24, D3 code .17,
  w = setup.heldout_weights(cfg, man, doms)   # always-on hi, bn .25
  raw = {"en": 0.34, "code": 0.17, "hi": 0.25 * 50 / 200, "bn": 0.25 * 150 / 200,
         "pa": 0.24 * 10 / 40, "gu": 0.24 * 30 / 40}
  z = sum(raw.values())
  assert w == pytest.approx({k: v / z for k, v in raw.items()})


def tqp_cfg(data_dir, bits):
  """small_cfg as a TQP MoE (sigmoid router, 4 experts), flushing every 2 steps. Both TQP tests
  below use it: at tqp.bits=4 it is one program, compiled once (launch.train's in-process cache,
  or the session's compilation cache when the two tests run on different workers), where the
  refusal test once compiled a 4-layer step of its own (44 s of this host's CPU) only to be
  refused."""
  c = small_cfg(data_dir)
  e = c.moe
  e.enabled, e.router, e.n_experts, e.n_null, e.top_k = True, "sigmoid", 4, 0, 2
  e.expert_width, e.shared_width, e.mtp_n_experts = 16, 64, 4
  c.tqp.enabled, c.tqp.bits, c.tqp.rank, c.tqp.flush_every = True, bits, 2, 2
  return c


def test_resume_refuses_a_tqp_base_of_other_bits(data_dir, tmp_path):
  """A grown TQP run (run.checkpoints.write_grown: frozen version 0) resumed with another
  tqp.bits stops with one sentence naming both: launch.train's identity check reads the saved
  config before any array and names the config difference; the checkpoint's own guard (the
  frozen base's recorded bits against the abstract tree asked for) still refuses a direct
  restore of the step."""
  from lightning_jax import model
  from lightning_jax.run import checkpoints as run_ckpt

  cfg8 = tqp_cfg(data_dir, 8)
  manifest = shards.load_manifest(data_dir)
  setup.apply_data_vocab(cfg8, manifest, str(data_dir))
  rng = np.random.default_rng(0)
  variables = jax.tree_util.tree_map(lambda a: rng.integers(0, 2, a.shape).astype(a.dtype),
                                     model.abstract_variables(cfg8))
  run_ckpt.write_grown(tmp_path / "g", cfg8, variables, str(data_dir), manifest, {"loss": None},
                  log=lambda *_: None)
  c = ck.Checkpointer(tmp_path / "g" / "checkpoints", cfg8.checkpoint, read_only=True)
  assert c.steps() == [0] and c.frozen_versions() == [0] and c.frozen_ref(0)["version"] == 0
  assert c.frozen_ref(0)["fingerprint"]["tqp_bits"] == 8
  c.close()
  with pytest.raises(ConfigError, match=r"checkpoint .*/g/checkpoints/0 was written with a "
                                        r"different config \(tqp.bits \(8 -> 4\)\)"):
    T.train(tqp_cfg(data_dir, 4), tmp_path / "g", progress=False, log=lambda *_: None)
  cfg4 = tqp_cfg(data_dir, 4)
  setup.apply_data_vocab(cfg4, manifest, str(data_dir))
  c = ck.Checkpointer(tmp_path / "g" / "checkpoints", cfg4.checkpoint, read_only=True)
  with pytest.raises(ck.CheckpointError, match=r"checkpoint .*/g/checkpoints/0 holds a 8-bit TQP "
                                               r"quantized base .* but the config has tqp.bits=4"):
    c.restore(0, {"frozen": model.abstract_variables(cfg4)["frozen"]})
  c.close()


def test_tqp_run_with_flush_checkpoints_frozen_versions_and_resumes(data_dir, tmp_path):
  """A tiny TQP model trains from scratch with a flush every 2 steps: loss stays finite, each
  flush makes a new frozen version (stored once, not per save), old versions go once no kept
  step uses them, and a restart resumes the newest step with its version."""
  c = tqp_cfg(data_dir, 4)
  c.checkpoint.every_steps, c.checkpoint.keep = 1, 2
  s = T.train(c, tmp_path / "r", stop_after=3, progress=False, log=lambda *_: None)
  assert s["final_step"] == 3 and all(np.isfinite(l) for _, l in s["losses"])
  k = ck.Checkpointer(tmp_path / "r" / "checkpoints", c.checkpoint, read_only=True)
  assert k.steps() == [2, 3], k.steps()
  # the flush after step 2 made version 2; version 0 (init) is gone: no kept step uses it
  assert k.frozen_versions() == [2] and k.frozen_ref(3)["version"] == 2, k.frozen_versions()
  k.close()
  s = T.train(c, tmp_path / "r", progress=False, log=lambda *_: None)
  assert s["final_step"] == 4 and [st for st, _ in s["losses"]] == [4]
  k = ck.Checkpointer(tmp_path / "r" / "checkpoints", c.checkpoint, read_only=True)
  assert k.steps() == [3, 4] and k.frozen_versions() == [2, 4], (k.steps(), k.frozen_versions())
  k.close()


def test_resume_never_runs_a_stored_file_and_vanished_checkpoints_refuse(data_dir, tmp_path):
  """Issue 23: a config stored in a run directory naming an executable file as optim.start_from
  is data on resume; a run whose checkpoints vanished refuses to start again from step 0."""
  cfg = small_cfg(data_dir)
  wd = tmp_path / "r"
  T.train(cfg, wd, stop_after=2, progress=False, log=lambda *_: None)
  marker = tmp_path / "EXECUTED"
  payload = tmp_path / "payload.py"
  payload.write_text(f"import pathlib\npathlib.Path({str(marker)!r}).write_text('x')\n")
  stored = wd / "checkpoints" / "2" / "config" / "metadata"
  rec = json.loads(stored.read_text())
  rec["optim"]["start_from"] = str(payload)
  rec["optim"].pop("start_from_lr", None)
  stored.write_text(json.dumps(rec))
  msgs = []
  s = T.train(cfg, wd, stop_after=1, progress=False, log=msgs.append)
  assert s["final_step"] == 3 and any("resuming from" in m and "step 2" in m for m in msgs)
  assert not marker.exists(), "resume executed a file named in the stored config"
  (wd / "checkpoints").rename(tmp_path / "moved")
  with pytest.raises(ck.CheckpointError, match=r"had checkpoints \(up to step 3.*delete .*"
                                               r"checkpoints.history.json"):
    T.train(cfg, wd, progress=False, log=lambda *_: None)


def test_a_step_that_cannot_fit_is_refused_before_anything_is_built(data_dir, tmp_path):
  """launch.train compiles the step against the device's capacity first (lightning_jax/
  memory_plan): one that cannot fit stops with one sentence naming the need and the capacity,
  before the state is initialised or a checkpoint is written."""
  cfg = small_cfg(data_dir)
  cfg.train.device_memory_gb = 0.001          # 1 MB: the small step needs more
  cfg.train.memory_headroom_gb = 0.0
  with pytest.raises(ConfigError, match=r"does not fit the device even at micro-batch 1: it "
                                        r"needs [\d.]+ GB per device against 0.00 GB usable"):
    T.train(cfg, tmp_path / "run", progress=False, log=lambda *a: None)
  assert not list((tmp_path / "run").glob("checkpoints/*"))
