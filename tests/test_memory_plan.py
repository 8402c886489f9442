"""lightning_jax.memory_plan: the micro-batch search over compiled plans, capacities, and the
refusal launch.train gives before it builds anything."""
import types

import pytest

from configs import tiny
from lightning_jax import memory_plan
from lightning_jax.config import ConfigError

GB = 1e9


class _Compiled:
  def __init__(self, total):
    self.total = total

  def memory_analysis(self):
    return types.SimpleNamespace(argument_size_in_bytes=10 * GB, output_size_in_bytes=10 * GB,
                                 alias_size_in_bytes=10 * GB,
                                 temp_size_in_bytes=self.total - 10 * GB)


def _cfg(global_batch=64, micro=8, mode="check"):
  c = tiny.get_config()
  c.train.global_batch, c.train.micro_batch, c.train.fit_memory = global_batch, micro, mode
  c.train.memory_headroom_gb = 1.0
  return c


def _compiler(per_seq_gb, fixed_gb=20.0, n_batch=8, global_batch=64, stored_gb=0.0):
  """Plans of fixed + per_seq x micro-batch GB, plus stored_gb x micro-batch when the config's
  reversible stack stores its boundaries."""
  calls = []

  def compile_at(cfg, accum):
    micro = global_batch // (n_batch * accum)
    calls.append(micro)
    stores = cfg.reversible.enabled and cfg.reversible.mode == "store_boundaries"
    return _Compiled((fixed_gb + (per_seq_gb + stored_gb * stores) * micro) * GB)
  return compile_at, calls


def test_configured_micro_batch_that_fits_is_compiled_once():
  compile_at, calls = _compiler(per_seq_gb=5.0)                # 8 x 5 + 20 = 60 GB
  accum, compiled, plan, _ = memory_plan.fit(_cfg(), 8, compile_at, 80 * GB, "test card", print)
  assert (accum, calls) == (1, [8]) and plan["total"] == 60 * GB


@pytest.mark.parametrize("per_seq,best", [(9.0, 6), (20.0, 2), (58.0, 1)])
def test_check_refuses_naming_the_largest_fitting_micro_batch(per_seq, best):
  # 79 GB usable (80 - 1 GB headroom); micro-batches dividing 8: 8, 4, 2, 1
  compile_at, calls = _compiler(per_seq)
  cands = memory_plan.candidates(64, 8, 8)
  want = max(m for m in cands if 20 + per_seq * m <= 79)
  with pytest.raises(ConfigError) as err:
    memory_plan.fit(_cfg(), 8, compile_at, 80 * GB, "test card", print)
  msg = str(err.value)
  assert f"the largest micro-batch that fits is {want}" in msg and "train.micro_batch=8" in msg
  assert msg.count(". ") == 0 or msg.endswith(".")
  assert len(calls) <= 1 + len(cands).bit_length()        # a binary search, not a sweep


def test_auto_trains_with_the_largest_fitting_micro_batch_and_accumulates():
  compile_at, calls = _compiler(per_seq_gb=20.0, global_batch=96)   # per device 12: 12,6,4,3,2,1
  cfg = _cfg(global_batch=96, micro=12, mode="auto")
  accum, compiled, plan, used = memory_plan.fit(cfg, 8, compile_at, 80 * GB, "test card", print)
  micro = 96 // (8 * accum)
  assert micro == 2 and plan["total"] == (20 + 40) * GB and compiled.total == plan["total"]
  assert calls[0] == 12 and used is cfg


def _reversible(mode="auto", a=0.5):
  c = _cfg(global_batch=64, micro=8, mode=mode)
  c.reversible.enabled, c.reversible.mode, c.reversible.a = True, "store_boundaries", a
  return c


def test_auto_falls_back_to_invert_when_store_boundaries_never_fits():
  # store_boundaries: 20 + (30 + 40) x m GB, over 79 GB usable at m = 1; invert: 20 + 30 m
  compile_at, calls = _compiler(per_seq_gb=30.0, stored_gb=40.0)
  cfg, said = _reversible(), []
  accum, compiled, plan, used = memory_plan.fit(cfg, 8, compile_at, 80 * GB, "test card",
                                                said.append)
  assert used.reversible.mode == "invert" and cfg.reversible.mode == "store_boundaries"
  assert 64 // (8 * accum) == 1 and plan["total"] == 50 * GB and compiled.total == 50 * GB
  assert any("trying reversible.mode=invert" in m for m in said)


def test_store_boundaries_kept_when_it_fits_and_check_names_invert():
  # store_boundaries fits at m = 2 (20 + 2 x 25 = 70): kept, with accumulation, no fallback
  compile_at, _ = _compiler(per_seq_gb=15.0, stored_gb=10.0)
  accum, _, plan, used = memory_plan.fit(_reversible(), 8, compile_at, 80 * GB, "test card",
                                         print)
  assert used.reversible.mode == "store_boundaries" and 64 // (8 * accum) == 2
  # under check nothing is changed: the refusal names the lever
  compile_at, _ = _compiler(per_seq_gb=30.0, stored_gb=40.0)
  with pytest.raises(ConfigError, match="even at micro-batch 1.*reversible.mode=invert"):
    memory_plan.fit(_reversible(mode="check"), 8, compile_at, 80 * GB, "test card", print)
  # a non-dyadic a cannot be inverted: no fallback, the same refusal
  with pytest.raises(ConfigError, match="even at micro-batch 1"):
    memory_plan.fit(_reversible(a=0.3), 8, compile_at, 80 * GB, "test card", print)


def test_nothing_fits_and_unknown_capacity():
  compile_at, _ = _compiler(per_seq_gb=100.0)
  with pytest.raises(ConfigError, match="does not fit the device even at micro-batch 1"):
    memory_plan.fit(_cfg(mode="auto"), 8, compile_at, 80 * GB, "test card", print)
  # no capacity known (CPU without train.device_memory_gb): compiled as configured, no check
  compile_at, calls = _compiler(per_seq_gb=100.0)
  assert memory_plan.fit(_cfg(), 8, compile_at, None, "cpu", print)[0] == 1 and calls == [8]


def test_capacities_and_bad_inputs(monkeypatch):
  cap, note = memory_plan.device_capacity([], device="h100", fraction=0.95)
  # the H100's allocator limit at 0.95 measured 80.77 GB (not 0.95 x 80)
  assert cap == pytest.approx(80.77e9, rel=1e-3) and "h100" in note
  assert memory_plan.device_capacity([], device_memory_gb=40.0)[0] == 40e9
  with pytest.raises(ConfigError, match="not one the memory plan knows"):
    memory_plan.device_capacity([], device="a100")
  with pytest.raises(ConfigError, match=r"not in \(0, 1\]"):
    memory_plan.device_capacity([], device="h200", fraction=1.5)
  monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "most")
  with pytest.raises(ConfigError, match="is not a fraction"):
    memory_plan.mem_fraction()
  assert memory_plan.candidates(64, 8, 0) == [8, 4, 2, 1]
  assert memory_plan.candidates(96, 8, 5) == [4, 3, 2, 1]


def test_auto_pulls_the_remat_levers_in_order_for_a_plain_stack():
  # per sequence: 70 GB keeping everything, 40 GB selective, 25 GB full; 79 GB usable
  per_seq = {"none": 70.0, "selective": 40.0, "full": 25.0}
  calls = []

  def compile_at(cfg, accum):
    micro = 64 // (8 * accum)
    calls.append((cfg.model.remat, micro))
    return _Compiled((20 + per_seq[cfg.model.remat] * micro) * GB)

  cfg, said = _cfg(mode="auto"), []
  accum, _, plan, used = memory_plan.fit(cfg, 8, compile_at, 80 * GB, "test card", said.append)
  assert used.model.remat == "selective" and cfg.model.remat == "none"
  assert 64 // (8 * accum) == 1 and plan["total"] == 60 * GB
  assert any("trying model.remat=selective" in m for m in said)
  per_seq["selective"] = 65.0                          # selective is not enough: full
  accum, _, plan, used = memory_plan.fit(_cfg(mode="auto"), 8, compile_at, 80 * GB, "card",
                                         print)
  assert used.model.remat == "full" and 64 // (8 * accum) == 2 and plan["total"] == 70 * GB
  # check mode changes nothing and names every lever left
  with pytest.raises(ConfigError, match="shorter train.seq_len, model.remat=selective or "
                                        "model.remat=full"):
    memory_plan.fit(_cfg(), 8, compile_at, 80 * GB, "test card", print)


def test_auto_falls_back_from_store_layers_to_store_boundaries_then_invert():
  # per sequence (GB): store_layers 55, store_boundaries 35, invert 25 (remat already
  # selective, so the first lever is the mode); 79 GB usable
  per_seq = {"store_layers": 55.0, "store_boundaries": 35.0, "invert": 25.0}

  def compile_at(cfg, accum):
    micro = 64 // (8 * accum)
    return _Compiled((20 + per_seq[cfg.reversible.mode] * micro) * GB)

  cfg, said = _reversible(), []
  cfg.reversible.mode, cfg.model.remat = "store_layers", "selective"
  accum, _, plan, used = memory_plan.fit(cfg, 8, compile_at, 80 * GB, "test card", said.append)
  assert used.reversible.mode == "store_layers" and 64 // (8 * accum) == 1
  assert plan["total"] == 75 * GB and not any("trying" in m for m in said)
  per_seq["store_layers"] = 70.0                      # 90 GB at micro-batch 1: falls back
  accum, _, plan, used = memory_plan.fit(cfg, 8, compile_at, 80 * GB, "test card", said.append)
  assert used.reversible.mode == "store_boundaries" and cfg.reversible.mode == "store_layers"
  assert 64 // (8 * accum) == 1 and plan["total"] == 55 * GB
  assert any("trying reversible.mode=store_boundaries" in m for m in said)
  per_seq["store_boundaries"] = 65.0                  # then invert
  accum, _, plan, used = memory_plan.fit(cfg, 8, compile_at, 80 * GB, "test card", print)
  assert used.reversible.mode == "invert" and 64 // (8 * accum) == 2 and plan["total"] == 70 * GB
