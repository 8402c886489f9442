"""benchmarks.step2b --tiny: issue 17's record (step at each batch in its own process, the first
profiled, the delta rule alone) on CPU; an out-of-memory or failing batch becomes a row that says
so instead of stopping the others."""
import json

from benchmarks import step2b


def test_step2b_tiny_writes_the_record(tmp_path):
  out = tmp_path / "step2b.json"
  rec = step2b.main(["--tiny", "--json", str(out)])
  assert json.loads(out.read_text()) == json.loads(json.dumps(rec, default=float))
  for k in ("device", "date", "commit", "rows", "delta_rule"):
    assert k in rec, k
  (row,) = rec["rows"]
  assert row["batch"] == 1 and row["seq"] == 64 and "error" not in row
  for k in ("step_ms", "tokens_per_s", "peak_gib", "mfu", "command"):
    assert row[k] > 0 if k != "command" else row[k].startswith("python -m benchmarks.step "), k
  tokens = row["batch"] * row["n_devices"] * 64       # one sequence per device (8 CPU devices)
  assert row["n_devices"] == 8 and abs(row["tokens_per_s"] * row["step_ms"] / 1e3 - tokens) < 1e-6 * tokens
  assert len(rec["profile"]) > 5 and rec["profile"][0]["ms"] > 0
  dr = rec["delta_rule"]
  assert dr["shape"] == "B1xT64x2x16" and dr["impl"] == "chunked"
  assert 0 < dr["fwd_ms"] and 0 < dr["fwdbwd_ms"] and dr["command"].startswith("python -m")


def test_a_failing_batch_is_a_row_and_oom_sizes_are_read(tmp_path):
  row = step2b.step_row("configs/tiny.py", 1, 64, 1, ["model.no_such_field=1"], False,
                        str(tmp_path))
  assert row["batch"] == 1 and row["asks_gib"] is None and "no_such_field" in row["error"]
  msg = ("jaxlib.xla_extension.XlaRuntimeError: RESOURCE_EXHAUSTED: Out of memory while trying "
         "to allocate 101.50GiB.")
  assert step2b.asks_gib(msg) == 101.5
  assert abs(step2b.asks_gib("RESOURCE_EXHAUSTED: ... allocate 512.00MiB") - 0.5) < 1e-12
  assert step2b.asks_gib("some other error") is None
