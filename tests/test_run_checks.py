"""Reliability of launch.train (issue 21 items 1, 8, 9, 10): the watchdog, the schedule on a
changed budget, own data without the tiny configs' pool domains, the start-up report.

The train-level test compiles one train step (a one-layer model) and reuses it for every run.
"""
import json
import pathlib
import time

import numpy as np
import pytest

from launch import train as T
from lightning_jax import optim, run_checks, watchdog
from lightning_jax.config import ConfigError, load_config
from lightning_jax.data import shards
from test_train import small_cfg

REPO = pathlib.Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- watchdog
def _wait(pred, limit=30.0):
  t0 = time.monotonic()
  while not pred() and time.monotonic() - t0 < limit:
    time.sleep(0.02)
  return pred()


def test_watchdog_stops_an_overrunning_phase_naming_it():
  fired, noted = [], []
  wd = watchdog.Watchdog(factor=3, min_s=0.3, compile_s=0.4, on_timeout=fired.append,
                         note=noted.append, poll_s=0.02)
  with wd.phase("compile", "compiling the training step"):
    time.sleep(0.01)
  for i in range(3):
    with wd.phase("step", f"step {i + 1}"):
      time.sleep(0.01)
  assert wd.budget("step")[0] == pytest.approx(0.3)     # the floor: 3 x ~0.01 s is below it
  assert wd.budget("save")[0] == pytest.approx(0.4)     # no history yet: the compile budget
  wd.begin("step", "step 4")                            # a step that never ends
  assert _wait(lambda: fired), "the watchdog did not fire"
  msg = fired[0]
  assert "step 4 has run" in msg and "train.watchdog_factor=3" in msg and "resumes" in msg, msg
  assert noted == fired and len(fired) == 1
  wd.close()
  # compiling past its budget names the compile phase
  fired2 = []
  wd2 = watchdog.Watchdog(factor=3, min_s=0.3, compile_s=0.2, on_timeout=fired2.append,
                          poll_s=0.02)
  wd2.begin("compile", "compiling the held-out evaluation")
  assert _wait(lambda: fired2) and "compiling the held-out evaluation" in fired2[0]
  assert "train.watchdog_compile_s=0.2" in fired2[0]
  wd2.close()


def test_watchdog_config_is_validated():
  cfg = load_config(str(REPO / "configs" / "tiny.py"))
  watchdog.check_config(cfg)
  for field, value, words in (("watchdog_factor", 1.5, r"0 \(off\) or at least 2"),
                              ("watchdog_min_s", 0.0, "must be positive"),
                              ("watchdog_compile_s", -1.0, ">= 0"),
                              ("watchdog_factor", float("nan"), "finite")):
    c = load_config(str(REPO / "configs" / "tiny.py"))
    c.train[field] = value
    with pytest.raises(ConfigError, match=f"train.{field}=.*{words}"):
      watchdog.check_config(c)


# ----------------------------------------------------------------------------- schedule
def _saved(cfg, steps):
  c = json.loads(cfg.to_json_best_effort())
  c["train"]["steps"] = steps
  return c


def test_changed_budget_asks_and_restart_continues_from_the_reached_lr():
  cfg = load_config(str(REPO / "configs" / "tiny.py"))      # cosine, warmup 10, peak 3e-3
  cfg.train.steps = 40
  saved = _saved(cfg, 20)
  old = optim.make_schedule(_with(cfg, steps=20))
  lr20 = float(old(20))
  assert lr20 == pytest.approx(3e-4, rel=1e-4)              # the finished run's end LR
  # same budget: nothing to choose
  assert run_checks.schedule_on_resume(_with(cfg, steps=20), saved, {}, 20) is False
  with pytest.raises(ConfigError, match=r"trained for 20 steps but the config now asks for 40.*"
                                        r"extend_schedule=stretch.*extend_schedule=restart"):
    run_checks.schedule_on_resume(cfg, saved, {}, 20)
  msgs = []
  c = _with(cfg, extend_schedule="stretch")
  assert run_checks.schedule_on_resume(c, saved, {}, 20, log=msgs.append) is False
  assert "from 0.0003 to 0.00" in msgs[0], msgs
  c = _with(cfg, extend_schedule="restart")
  assert run_checks.schedule_on_resume(c, saved, {"lr": lr20}, 20, log=msgs.append) is True
  new = optim.make_schedule(c)
  lrs = np.array([float(new(s)) for s in range(20, 41)])
  assert c.optim.schedule_start == 20 and lrs[0] == pytest.approx(lr20, rel=1e-5)  # no jump
  assert lrs[10] == pytest.approx(3e-3, rel=1e-5)           # warmed up again over 10 steps
  assert lrs[-1] == pytest.approx(3e-4, rel=1e-4)           # and decayed by the new end
  # a later resume of the restarted run (same budget) keeps its anchor and start LR
  later = _with(cfg, steps=40)
  saved2 = json.loads(c.to_json_best_effort())
  assert run_checks.schedule_on_resume(later, saved2, {}, 30) is True
  assert float(optim.make_schedule(later)(30)) == pytest.approx(float(new(30)), rel=1e-6)


def _with(cfg, steps=None, extend_schedule=None):
  c = load_config(str(REPO / "configs" / "tiny.py"))
  c.update_from_flattened_dict({"train.steps": steps or cfg.train.steps,
                                "train.extend_schedule": extend_schedule or
                                cfg.train.extend_schedule})
  return c


# ----------------------------------------------------------------------------- own data
def test_pool_layout_fallback_and_the_flag_it_names():
  cfg = load_config(str(REPO / "configs" / "tiny.py"))
  man = {"domains": ["notes", "logs"], "shards": [
      {"domain": "notes", "split": "train"}, {"domain": "logs", "split": "train"}]}
  msgs = []
  assert run_checks.pool_layout_fallback(cfg, "/data/mine", man, msgs.append) is True
  assert cfg.data.use_pools is False and len(msgs) == 1
  assert "single stream" in msgs[0] and "notes, logs" in msgs[0], msgs
  cfg = load_config(str(REPO / "configs" / "tiny.py"))
  man["domains"].append("en")
  man["shards"].append({"domain": "en", "split": "train"})
  with pytest.raises(ConfigError, match=r"data.pools.D2.domains names .*'pa'.*"
                                        r"--config.data.pools.D2.domains=.*"
                                        r"--config.data.use_pools=False"):
    run_checks.pool_layout_fallback(cfg, "/data/mine", man, msgs.append)


# ----------------------------------------------------------------------------- launch.train
@pytest.fixture(scope="module")
def own_data(tmp_path_factory):
  """A user's own data: two domains, none of them the tiny configs' pool domains."""
  root = tmp_path_factory.mktemp("mine")
  for sub, src in (("notes", "en"), ("logs", "code")):
    (root / sub).mkdir()
    lines = (REPO / "corpus" / src / f"{src}.jsonl").read_text().splitlines()[:6]
    docs = [json.loads(l)["text"][:3000] for l in lines]
    (root / sub / "d.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
  out = root / "shards"
  shards.prepare([str(root)], str(out), val_fraction=0.2, log=lambda *_: None)
  return out


def test_train_watchdog_own_data_startup_and_budget_change(own_data, tmp_path):
  cfg = small_cfg(own_data)
  cfg.model.pattern, cfg.model.n_layers = "D", 1     # the loop is under test, not the model:
  cfg.model.mtp.enabled = False                      # one DeltaNet layer compiles fastest
  tiny = load_config(str(REPO / "configs" / "tiny.py"))
  cfg.data.use_pools = True                 # the tiny configs' pools: en, pa, ..., code, hi, bn
  cfg.data.pools = tiny.data.pools
  # 1. a step that never ends: the watchdog names it (its action here records the message
  #    instead of ending the process, and the injected hang then raises watchdog.Stopped)
  cfg.train.watchdog_factor, cfg.train.watchdog_min_s, cfg.train.watchdog_compile_s = 2, 0.5, 0
  fired, msgs1 = [], []
  with pytest.raises(watchdog.Stopped) as stop:
    T.train(cfg, tmp_path / "h", progress=False, log=msgs1.append, on_hang=fired.append,
            debug_hang_step=2, stage_cfg=("configs/tiny.py", tiny))
  assert len(fired) == 1 and "step 3 has run" in fired[0] and str(stop.value) == fired[0], fired
  recs = [json.loads(l) for l in (tmp_path / "h" / "metrics.jsonl").read_text().splitlines()]
  assert any(r.get("stopped") == fired[0] and r["step"] == 3 for r in recs)
  # start-up: the config's difference from its stage file, the compile reported apart
  assert any(m.startswith("config: configs/tiny.py with ") and "model.n_layers=1 (stage file: 4)"
             in m for m in msgs1), msgs1
  assert "compiling the training step ..." in msgs1
  assert any(m.startswith("compiled the training step in ") for m in msgs1), msgs1
  assert any(r.get("compile_s", 0) > 0 and r["step"] == 0 for r in recs)
  # 2. the same config runs to the end: own domains as one stream (the step compiled for run 1
  #    is reused from the in-process cache, so its compile time here is 0)
  msgs = []
  s = T.train(cfg, tmp_path / "r", progress=False, log=msgs.append)
  assert s["final_step"] == 4 and all(np.isfinite(l) for _, l in s["losses"])
  assert any("none of the pool domains" in m and "use_pools=False" in m for m in msgs), msgs
  assert "the training step" in s["compile_s"]
  # 3. the finished run given a larger budget asks for a choice (before compiling anything)
  cfg.train.steps = 8
  with pytest.raises(ConfigError, match=r"checkpoint at step 4 was trained for 4 steps but the "
                                        r"config now asks for 8.*extend_schedule=stretch"):
    T.train(cfg, tmp_path / "r", progress=False, log=lambda *_: None)
