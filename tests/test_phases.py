"""Training phases of the stage configs (SPEC §5), phase hand-over (growth.next_phase) and the
checkpoint EMA (launch.ema).

The config and schedule checks compile nothing. next_phase and ema run on checkpoints built
directly with Checkpointer from random arrays shaped like the tiny config (no training).
"""
import json
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
  from launch.train import check_train_config
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
