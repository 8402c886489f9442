"""benchmarks.rank120 --tiny: one rank's share of the tiny 120B-class stage runs on CPU and writes
the record the issue names (the GPU numbers are in docs/PERFORMANCE.md)."""
import json

import pytest

from benchmarks import rank120
from lightning_jax import counting
from lightning_jax.config import ConfigError, load_config


def test_rank120_tiny_writes_the_record(tmp_path):
  # one layer of each kind (the record is under test, not the depth): 2 layers, not DDDG's 4
  out = tmp_path / "rank120.json"
  rec = rank120.main(["--tiny", "--set", "model.pattern=DG", "--layers", "2", "--seq", "32",
                      "--json", str(out)])
  on_disk = json.loads(out.read_text())
  for k in ("device", "date", "commit", "command", "tokens_per_s", "peak_gb", "compiled_plan_gb",
            "flops_per_token", "mfu", "largest_micro_batch_80gb", "largest_micro_batch_141gb"):
    assert k in on_disk, k
  assert rec["experts_per_rank"] == 6 and rec["layers"] == 2 and rec["finite"]
  assert rec["tokens_per_s"] > 0 and rec["step_ms"] > 0
  cfg = rank120.rank_config(load_config("configs/tiny_120b.py"), 2)
  cfg.model.pattern, cfg.model.n_layers = "DG", 2
  assert rec["flops_per_token"] == counting.flops_per_token(cfg, 32)["total"]
  # CPU keeps no allocator statistics: the compiled plan stands in for the peak
  assert rec["peak_gb"] == rec["compiled_plan_gb"] > 0
  assert [p["batch"] for p in rec["plans_gb"]] == [1]
  # ZeRO-1 in the 2-rank node step: the replicated parameters' moments are halved, the routed
  # experts' (already the rank's own) are not; the emulation holds the node's share, up to what the
  # rank-cut model itself changes (its router has the rank's 6 expert columns, not all 12, and the
  # MTP block keeps its 4 experts whole: 12 KB of 37 MB here, 0.5 MB of 5.36 GB at 120B)
  whole, share = rec["optimizer_state_whole_gb"], rec["optimizer_state_zero1_gb"]
  assert rec["zero1_emulated"] and whole / 2 < share < whole
  assert rec["optimizer_state_gb"] == pytest.approx(share, rel=1e-3)
  assert rec["peak_with_zero1_gb"] == pytest.approx(rec["peak_gb"], rel=1e-3)
  # the profile: a table of the step's ops from a jax.profiler trace
  assert len(rec["profile"]) > 5 and rec["profile_info"]["op_ms_per_call"] > 0
  assert abs(sum(r["share"] for r in rec["profile"]) - 1.0) < 1.0 and rec["profile"][0]["ms"] > 0
  fams = rec["profile_info"]["families"]      # every op, not just the top 25, summed by family
  assert sum(f["ms"] for f in fams) == pytest.approx(rec["profile_info"]["op_ms_per_call"])
  assert sum(f["kernels"] for f in fams) == rec["profile_info"]["n_ops"]


def test_kernel_families_by_name():
  from benchmarks import profile_table as pt
  got = {n: pt.family_of(n) for n in (
      "nvjet_sm90_tss_128x128_64x6_2x1_v_bz_NNT", "gemm_fusion_dot_777", "MemcpyD2D",
      "cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma", "sort_9_1",
      "input_concatenate_fusion_3", "loop_select_fusion_5", "wrapped_convert_27", "gdr_prep_fwd",
      "sm90_xmma_gemm_f32f32_tf32f32_f32_nt_n_tilesize128x256x32")}
  assert got == {
      "nvjet_sm90_tss_128x128_64x6_2x1_v_bz_NNT": "cuBLAS GEMMs",
      "gemm_fusion_dot_777": "XLA Triton GEMM fusions", "MemcpyD2D": "memcpy / memset",
      "cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma": "cuDNN attention",
      "sort_9_1": "sort", "input_concatenate_fusion_3": "concatenate fusions",
      "loop_select_fusion_5": "other XLA fusions", "wrapped_convert_27": "other XLA fusions",
      "gdr_prep_fwd": pt.OTHER_FAMILY,
      "sm90_xmma_gemm_f32f32_tf32f32_f32_nt_n_tilesize128x256x32": "cuBLAS GEMMs"}
  rows = [{"name": "nvjet_a", "ms": 3.0, "calls": 2}, {"name": "nvjet_b", "ms": 1.0, "calls": 1},
          {"name": "gdr_x", "ms": 12.0, "calls": 1}]
  fam = pt.family_table(rows)
  assert [(f["family"], f["ms"], f["calls"], f["kernels"], f["share"]) for f in fam] == [
      (pt.OTHER_FAMILY, 12.0, 1, 1, 0.75), ("cuBLAS GEMMs", 4.0, 3, 2, 0.25)]


def test_copies_on_their_own_streams_are_told_apart(tmp_path):
  """A trace whose copies run on a copy-only CUDA stream: their rows and family are marked, and
  info says how much of their time overlapped kernels on the compute stream (op time alone
  counts them as if they ran in series)."""
  import gzip
  import json
  from benchmarks import profile_table as pt
  meta = [{"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
          {"ph": "M", "name": "thread_name", "pid": 1, "tid": 14,
           "args": {"name": "Stream #14(MemcpyD2D,Compute,Memset)"}},
          {"ph": "M", "name": "thread_name", "pid": 1, "tid": 71,
           "args": {"name": "Stream #71(MemcpyD2D)"}}]
  x = lambda tid, name, ts, dur: {"ph": "X", "pid": 1, "tid": tid, "name": name, "ts": ts,
                                  "dur": dur}
  ev = meta + [x(14, "nvjet_a", 0, 10), x(14, "MemcpyD2D", 12, 2), x(14, "nvjet_a", 20, 10),
               x(71, "MemcpyD2D", 5, 20), x(71, "MemcpyD2D", 40, 10)]
  path = tmp_path / "t.json.gz"
  with gzip.open(path, "wt") as f:
    json.dump({"traceEvents": ev}, f)
  rows, info = pt.op_table(str(path), 1, 10)
  by = {r["name"]: r for r in rows}
  assert by["MemcpyD2D" + pt.COPY_STREAM]["calls"] == 2 and by["MemcpyD2D"]["calls"] == 1
  cs = info["copy_streams"]
  assert cs["lines"] == 1 and cs["ms"] == pytest.approx(0.030)
  # [5, 25] meets the compute stream's [0, 10], [12, 14] and [20, 30]: 5 + 2 + 5 us
  assert cs["ms_beside_kernels"] == pytest.approx(0.012)
  assert cs["compute_lines_busy_ms"] == pytest.approx(0.022)
  fams = {f["family"]: f["ms"] for f in info["families"]}
  assert fams["async copies on copy streams"] == pytest.approx(0.030)
  assert fams["memcpy / memset"] == pytest.approx(0.002)
  assert "copies on 1 copy streams: 0.03 ms, 0.01 ms of it" in pt.format_table(rows, info)


def test_largest_fitting_micro_batch():
  plans = [{"batch": 1, "total": 60e9}, {"batch": 2, "total": 80e9}]
  assert rank120.largest_fitting(plans, 1.0, 141e9)["batch"] == 5     # 80 + 20 x 3 = 140 GB
  assert rank120.largest_fitting(plans, 1.0, 70e9) == {"batch": 1, "how": "planned"}
  assert rank120.largest_fitting(plans[:1], 1.0, 50e9)["batch"] == 0
  one = rank120.largest_fitting(plans[:1], 1.0, 141e9)    # one plan that fits: a lower bound
  assert one["batch"] == 1 and one["how"].startswith("at least")
  assert rank120.largest_fitting(plans, 1.1, 89e9)["batch"] == 2       # calibrated: 66, 88 GB


def test_plans_at_other_batches_hold_the_runs_optimizer_state():
  """plan_step (what --plan_batches compiles) holds the ZeRO-1 share the run batch's step holds,
  not the whole optimizer state (abstract shapes only)."""
  import math

  import jax

  cfg = rank120.rank_config(load_config("configs/tiny_120b.py"), 2)
  cfg.model.n_layers = 4

  def opt_bytes(zero1_ranks):
    parts, batch_abs, _ = rank120.plan_step(cfg, 2, 32, zero1_ranks=zero1_ranks)
    assert batch_abs["ids"].shape == (2, 34)
    return sum(math.prod(x.shape) * x.dtype.itemsize
               for x in jax.tree.leaves(parts["state_abs"]["opt_state"]))
  whole, share = opt_bytes(1), opt_bytes(2)
  assert whole / 2 < share < whole


def test_rank120_bad_input():
  with pytest.raises(ConfigError, match="fewer than moe.top_k"):
    rank120.rank_config(load_config("configs/tiny_120b.py"), 4)
  with pytest.raises(ConfigError, match="has no routed experts"):
    rank120.rank_config(load_config("configs/tiny.py"), 2)


def test_zero1_emulation_updates_the_ranks_slice_as_the_whole_optimizer_does():
  """One rank's ZeRO-1 optimizer (benchmarks.step.zero1_emulation) against the whole optimizer
  on fresh random inputs: the rank's slice of every split leaf gets the same update, the rest
  none; unsplit leaves (a routed expert's, an indivisible one) get the whole update; the clip
  uses the whole gradient's norm (active here) and the moments are held for the slice only."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  from benchmarks.step import zero1_emulation

  ks = jax.random.split(jax.random.PRNGKey(3), 6)
  params = {"a": jax.random.normal(ks[0], (8, 5)), "b": jax.random.normal(ks[1], (3,)),
            "e": jax.random.normal(ks[2], (4, 6))}
  grads = {"a": 3 * jax.random.normal(ks[3], (8, 5)), "b": jax.random.normal(ks[4], (3,)),
           "e": jax.random.normal(ks[5], (4, 6))}
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2, weight_decay=0.1))
  whole, _ = tx.update(grads, tx.init(params), params)
  em = zero1_emulation(tx, {"a": 0, "b": -1, "e": -1}, 4, 1.0)
  state = em.init(params)
  assert state[1][0].mu["a"].shape == (2, 5) and state[1][0].mu["e"].shape == (4, 6)
  got, _ = em.update(grads, state, params)
  np.testing.assert_allclose(got["a"][:2], whole["a"][:2], rtol=1e-6, atol=1e-7)
  assert float(jnp.abs(got["a"][2:]).max()) == 0.0
  for k in ("b", "e"):
    np.testing.assert_allclose(got[k], whole[k], rtol=1e-6, atol=1e-7)
  assert float(optax.global_norm(grads)) > 1.5         # the clip did act
