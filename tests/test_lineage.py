"""The tiny lineage end to end on CPU from the command line (docs/cookbook.md): train tiny dense ->
dense_to_moe -> train -> depth_map -> train -> expand_experts -> to_tqp -> train, as
`python -m growth.lineage` (the same functions the separate commands call), a few steps per stage
at small widths. Each stage must start from the grown checkpoint (launch.train resumes
NEW_RUN/checkpoints/0 at step 0), record finite losses, and carry its provenance.

Every stage runs with model.pattern=DG (a DeltaNet and a GSA layer per group; the stages keep
their depths, 4, 4, 8 and 8 layers): depth_map's mapping 0,1,2,3,0,1,2,3 still gives each layer
one of its own kind, and a group of two layers is half the unrolled layers to compile and half the
stacked leaves to save, restore and check of the tiny configs' DDDG.

The subprocess runs on ONE host device with single-threaded Eigen (--xla_cpu_multi_thread_eigen=
false): on this machine (jaxlib 0.10.2, 2 cores) the tiny MoE train step otherwise hung now and
then inside the XLA CPU executable (the executor waiting on a task no pool worker runs; all threads
in futex waits), with the 8 forced devices of conftest.py and with one device alike.
"""
import json
import math
import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
STEPS = 2
SMALL = ["train.seq_len=32", "train.global_batch=4", "train.eval_every=0", "train.log_every=1",
         "checkpoint.every_steps=0", "checkpoint.every_seconds=0", "optim.warmup_steps=1",
         "model.d_model=32", "model.ffn_width=64", "model.deltanet.n_heads=2",
         "model.deltanet.head_dim=16", "model.deltanet.chunk_size=16", "model.gsa.n_heads=1",
         "model.gsa.head_dim=32", "model.gsa.idx_heads=2", "model.gsa.idx_dim=8",
         "model.gsa.k_min=4", "model.gsa.k_base=8", "model.gsa.k_max=16", "model.gsa.query_chunk=32",
         "model.ce_chunk=128", "moe.expert_width=16", "tqp.rank=2", "model.pattern=DG"]


def _env(ndev=1):
  return dict(os.environ, PYTHONPATH=str(REPO),
              XLA_FLAGS=f"--xla_force_host_platform_device_count={ndev} "
                        "--xla_cpu_multi_thread_eigen=false --xla_backend_optimization_level=0",
              JAX_PLATFORMS="cpu")


def test_tiny_lineage(tmp_path):
  from launch.inspect import inspect
  cmd = [sys.executable, "-m", "growth.lineage", f"--workdir={tmp_path}", f"--steps={STEPS}"]
  for kv in SMALL:
    cmd += ["--set", kv]
  r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=_env(), timeout=900)
  out = r.stdout + r.stderr
  assert r.returncode == 0, out[-4000:]
  rec = json.loads((tmp_path / "lineage.json").read_text())
  trained = [s for s in rec["stages"] if "train_losses" in s]
  grown = [s for s in rec["stages"] if "growth" in s]
  assert [s["stage"] for s in trained] == ["tiny", "tiny_moe", "tiny_deep", "tiny_120b"]
  assert [s["growth"] for s in grown] == ["dense_to_moe", "depth_map", "expand_experts", "to_tqp"]
  for s in trained:
    assert s["final_step"] == STEPS and len(s["train_losses"]) == STEPS, s
    assert all(math.isfinite(l) for l in s["train_losses"]), s
  for s in grown:
    assert math.isfinite(s["source_loss"]) and math.isfinite(s["grown_loss"]), s
  for s in grown[:1] + grown[2:3]:          # MoE growth reports the router load at init
    assert s["router_load_at_init"], s
  # every trained MoE stage started from its grown checkpoint at step 0
  for d in ("moe", "deep", "big"):
    assert f"resuming from {tmp_path / d / 'checkpoints' / '0'} (step 0)" in out, (d, out[-3000:])
  # provenance in the checkpoint metadata, shown by launch.inspect (grown step 0 of each run)
  for d, transform, src in (("moe", "dense_to_moe", "dense"), ("deep", "depth_map", "moe"),
                            ("big_bf16", "expand_experts", "deep"), ("big", "to_tqp", "big_bf16")):
    shown = []
    inspect(str(tmp_path / d / "checkpoints" / "0"), out=shown.append)
    meta = json.loads(next(l for l in shown if l.startswith("meta: "))[len("meta: "):])
    p = meta["provenance"]
    assert p["transform"] == transform and p["source_path"].startswith(str(tmp_path / src)), p
    assert p["source_step"] == (0 if src == "big_bf16" else STEPS), p
  # after training (checkpoints/0 may be gone) launch.inspect RUN shows the whole growth history
  shown = []
  got = inspect(str(tmp_path / "big"), out=shown.append)
  assert got["step"] == STEPS
  assert [e["transform"] for e in got["growth_history"]] == [
      "dense_to_moe", "depth_map", "expand_experts", "to_tqp"]
  i = shown.index(next(l for l in shown if l.startswith("growth history")))
  assert all(t in shown[i + k] for k, t in enumerate(
      ["dense_to_moe", "depth_map", "expand_experts", "to_tqp"], 1)), shown[i:i + 5]
  # the written checkpoint holds exactly what the pure function returns for the restored source
  from lightning_jax.growth import common
  from lightning_jax.growth.depth_map import depth_map
  from lightning_jax.run.checkpoints import read_source
  src = read_source(str(tmp_path / "moe" / "checkpoints" / str(STEPS)), log=lambda *_: None)
  dst = read_source(str(tmp_path / "deep" / "checkpoints" / "0"), log=lambda *_: None)
  want = common.flatten(depth_map(src["variables"], src["cfg"], dst["cfg"],
                                  mapping="0,1,2,3,0,1,2,3"))
  got = common.flatten(dst["variables"])
  assert set(want) == set(got)
  for k in want:
    assert (want[k] == got[k]).all(), k
  print(json.dumps(rec, indent=1))


def test_cli_refuses_wrong_source_stage(tmp_path):
  """The command line reports a refused growth as one sentence and exit status 1."""
  env = _env()
  r = subprocess.run([sys.executable, "-m", "growth.expand_experts", f"--src={tmp_path / 'none'}",
                      f"--dst={tmp_path / 'out'}", f"--config={REPO / 'configs' / 'tiny_120b.py'}"],
                     capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
  assert r.returncode == 1, r.stderr[-2000:]
  err = [l for l in r.stderr.splitlines() if l.startswith("error:")]
  assert err and "does not exist" in err[0] and str(tmp_path / "none") in err[0], r.stderr[-2000:]
