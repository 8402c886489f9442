"""benchmarks.step2b --tiny: issue 17's record (step at each batch in its own process, the first
profiled, the delta rule alone) on CPU; an out-of-memory or failing batch becomes a row that says
so instead of stopping the others; benchmarks.step's config overrides."""
import json
import os

import pytest

from benchmarks import step, step2b
from configs import tiny
from lightning_jax.config import ConfigError


def test_step2b_tiny_writes_the_record(tmp_path):
  out = tmp_path / "step2b.json"
  rec = step2b.main(["--tiny", "--json", str(out),
                     "--delta_variant", "tf32_wy:model.deltanet.kernel.wy_dtype=float32",
                     "--delta_variant", "bad:model.deltanet.no_such_option=1"])
  assert json.loads(out.read_text()) == json.loads(json.dumps(rec, default=float))
  for k in ("device", "date", "commit", "rows", "delta_rule"):
    assert k in rec, k
  assert rec["complete"] is True
  assert rec["xla_flags"] == os.environ.get("XLA_FLAGS", "")    # conftest's test flags
  assert "--xla_force_host_platform_device_count=8" in rec["xla_flags"]
  (row,) = rec["rows"]
  assert row["batch"] == 1 and row["seq"] == 64 and "error" not in row
  for k in ("step_ms", "tokens_per_s", "peak_gib", "mfu", "command"):
    assert row[k] > 0 if k != "command" else row[k].startswith("python -m benchmarks.step "), k
  # the compiled plan travels with the row; on CPU there is no device peak to set beside it
  assert row["compiled_plan_gib"] > 0 and "peak_minus_plan_gib" not in row
  tokens = row["batch"] * row["n_devices"] * 64       # one sequence per device (8 CPU devices)
  assert row["n_devices"] == 8 and abs(row["tokens_per_s"] * row["step_ms"] / 1e3 - tokens) < 1e-6 * tokens
  assert len(rec["profile"]) > 5 and rec["profile"][0]["ms"] > 0
  dr = rec["delta_rule"]
  assert dr["shape"] == "B1xT64x2x16" and dr["impl"] == "chunked"
  assert 0 < dr["fwd_ms"] and 0 < dr["fwdbwd_ms"] and dr["command"].startswith("python -m")
  for name in ("fwd", "fwdbwd"):     # queued back to back (as do_bench times FLA), kernels alone
    assert dr[f"{name}_queued_ms"] > 0 and dr[f"{name}_kernel_ms"] > 0, name
  for name in ("profile_fwd", "profile_fwdbwd"):     # the delta rule's own per-kernel table
    assert 0 < len(dr[name]) <= 12 and all(r["ms"] > 0 for r in dr[name]), name
  # --delta_variant: the same timing under more overrides, each in the record; a bad one is an
  # error row, not the end of the run
  good, bad = rec["delta_variants"]
  assert good["label"] == "tf32_wy" and good["sets"] == ["model.deltanet.kernel.wy_dtype=float32"]
  assert good["fwd_queued_ms"] > 0 and good["fwdbwd_kernel_ms"] > 0 and "error" not in good
  assert bad["label"] == "bad" and "no_such_option" in bad["error"]


def test_a_run_ended_early_keeps_the_batches_it_measured(tmp_path, monkeypatch, capsys):
  """--json is written after every batch, marked incomplete until the end: a run stopped during
  the delta rule (here: it raises) leaves the measured batch and its line behind."""
  out = tmp_path / "step2b.json"
  seen = []

  def measured(cfg, batch, seq, steps, sets, profile, tmp):   # stands in for a step's process
    seen.append(json.loads(out.read_text())["rows"] if out.exists() else None)
    return {"batch": batch, "seq": seq, "step_ms": 10.0 * batch, "tokens_per_s": 100.0,
            "peak_gib": 1.0, "mfu": 0.1, "profile": [{"name": "k", "ms": 1.0}] if profile else [],
            "profile_info": {"op_ms_per_call": 1.0}}

  def stopped(*args, **kw):
    raise KeyboardInterrupt("the call's time limit")

  monkeypatch.setattr(step2b, "step_row", measured)
  monkeypatch.setattr(step2b, "delta_rule", stopped)
  with pytest.raises(KeyboardInterrupt):
    step2b.main(["--batches", "1,2", "--json", str(out)])
  assert seen[0] is None and [r["batch"] for r in seen[1]] == [1]    # written after batch 1
  rec = json.loads(out.read_text())
  assert rec["complete"] is False and "delta_rule" not in rec
  assert [r["step_ms"] for r in rec["rows"]] == [10.0, 20.0]
  assert rec["profile"] == [{"name": "k", "ms": 1.0}] and "profile" not in rec["rows"][0]
  printed = capsys.readouterr().out
  assert all(step2b.row_line(r) in printed for r in rec["rows"])
  assert not (tmp_path / "step2b.json.tmp").exists()


def test_a_failing_batch_is_a_row_and_oom_sizes_are_read(tmp_path):
  row = step2b.step_row("configs/tiny.py", 1, 64, 1, ["model.no_such_field=1"], False,
                        str(tmp_path))
  assert row["batch"] == 1 and row["asks_gib"] is None and "no_such_field" in row["error"]
  msg = ("jaxlib.xla_extension.XlaRuntimeError: RESOURCE_EXHAUSTED: Out of memory while trying "
         "to allocate 101.50GiB.")
  assert step2b.asks_gib(msg) == 101.5
  assert abs(step2b.asks_gib("RESOURCE_EXHAUSTED: ... allocate 512.00MiB") - 0.5) < 1e-12
  assert step2b.asks_gib("some other error") is None


def test_step_bench_config_and_overrides():
  cfg = tiny.get_config()
  step.apply_overrides(cfg, ["model.deltanet.impl=kernel", "model.rope_base=500",
                                   "model.mtp.enabled=False"])
  assert cfg.model.deltanet.impl == "kernel" and cfg.model.rope_base == 500.0
  assert cfg.model.mtp.enabled is False
  with pytest.raises(ConfigError, match="no field 'model.nope'"):
    step.apply_overrides(cfg, ["model.nope=1"])
  with pytest.raises(ConfigError, match="must look like section.field=value"):
    step.apply_overrides(cfg, ["model.d_model"])
  cfg = step.bench_config(cfg, layers=8, seq=256, batch=3, n_dev=2)
  assert (cfg.model.n_layers, cfg.train.seq_len, cfg.train.global_batch,
          cfg.train.micro_batch) == (8, 256, 6, 0)
  with pytest.raises(ConfigError, match="--layers=6 must be a multiple of the pattern length 4"):
    step.bench_config(cfg, layers=6)
