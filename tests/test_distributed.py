"""Multi-process training (lightning_jax/distributed.py): two processes on localhost, 4 CPU devices
each, gloo collectives, against the one-process 8-device run of the same config.

The one-process baselines run in this process (conftest: 8 devices); every multi-process piece runs
in subprocesses under a timeout, so a failure can never hang the suite.
"""
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from launch import train as T
from lightning_jax import checkpoint as ck
from lightning_jax import distributed as D
from lightning_jax.config import load_config
from lightning_jax.data import pools as pools_lib, shards

REPO = pathlib.Path(__file__).resolve().parents[1]
STEPS = 4
TIMEOUT_S = 240

# the tiny config and the tiny MoE config at test widths: the dense one on the single-stream grain
# pipeline, the MoE one on the pool mixture with 2 reader ranks (data.ranks) and expert
# parallelism inside each process (mesh data 2 x expert 4 on both layouts)
CFG = """
from configs import {base}
def get_config():
  c = {base}.get_config()
  m = c.model
  m.d_model, m.ffn_width, m.ce_chunk = 32, 64, 128
  m.n_layers, m.pattern = 2, "DG"      # one DeltaNet and one GSA layer: half the compile time
  m.mtp.enabled = False                # (the MTP block is one more layer to compile per process)
  m.deltanet.n_heads, m.deltanet.head_dim, m.deltanet.chunk_size = 2, 16, 16
  m.gsa.n_heads, m.gsa.head_dim, m.gsa.idx_heads, m.gsa.idx_dim = 1, 32, 2, 8
  m.gsa.k_min, m.gsa.k_base, m.gsa.k_max, m.gsa.query_chunk = 4, 8, 16, 32
  c.data.path, c.data.build_from = {data!r}, ""
  c.train.seq_len, c.train.global_batch, c.train.micro_batch = 32, 8, 0
  c.train.steps, c.train.eval_every, c.optim.warmup_steps = {steps}, 0, 1
  c.train.compile_cache = "run"     # the resume loads the killed run's executables
  c.checkpoint.every_steps, c.checkpoint.every_seconds = 2, 0
  if c.moe.enabled:
    c.moe.shared_width = m.ffn_width
    c.mesh.expert = 4
    c.data.use_pools, c.data.ranks, c.data.always_on_fraction = True, 2, 0.0
    for name in ("D2", "D4", "always_on"):
      c.data.pools[name].update(weight=0.0, domains="")
    c.data.pools.D1.update(weight=0.5, domains="en")
    c.data.pools.D3.update(weight=0.5, domains="code")
  else:
    c.data.use_pools = False
  return c
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """Shards of a slice of the bundled en + code corpus, two shards per domain (one per reader
  rank), and a config file per model."""
  root = tmp_path_factory.mktemp("mp")
  src = root / "corpus"
  for sub in ("en", "code"):
    (src / sub).mkdir(parents=True)
    lines = (REPO / "corpus" / sub / f"{sub}.jsonl").read_text().splitlines()[:8]
    docs = [json.loads(l)["text"][:3000] for l in lines]
    (src / sub / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
  data = root / "shards"
  m = shards.prepare([str(src)], str(data), val_fraction=0.2, shard_tokens=1500,
                     log=lambda *_: None)
  for dom in ("en", "code"):
    assert len(shards.shards_of(m, "train", dom)) >= 2, dom
  cfgs = {}
  for base in ("tiny", "tiny_moe"):
    p = root / f"mp_{base}.py"
    p.write_text(CFG.format(base=base, data=str(data), steps=STEPS))
    cfgs[base] = p
  return {"root": root, "data": data, "cfgs": cfgs}


def _env():
  env = dict(os.environ)
  env.pop("JAX_PLATFORMS", None)
  env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO), JAX_DEFAULT_MATMUL_PRECISION="highest",
             XLA_FLAGS="--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0"
                       " --xla_cpu_multi_thread_eigen=false")
  return env


def launch(cfg_path, workdir, *extra, n=2, port=None, ids=None):
  """Start `n` processes of launch.train on localhost; returns the Popen objects."""
  port = port or D.free_port()
  procs = []
  for i in (range(n) if ids is None else ids):
    cmd = [sys.executable, "-m", "launch.train", f"--config={cfg_path}", f"--workdir={workdir}",
           "--no_progress", f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={n}",
           f"--process_id={i}", *extra]
    procs.append(subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True))
  return procs


def finish(procs, timeout=TIMEOUT_S):
  """(return codes, outputs); kills every process still running at the timeout."""
  deadline = time.monotonic() + timeout
  outs = []
  for p in procs:
    try:
      out, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise AssertionError(f"a process did not finish within {timeout} s") from None
    outs.append(out + err)
  return [p.returncode for p in procs], outs


def losses(workdir):
  recs = [json.loads(l) for l in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]
  return [(r["step"], r["loss"]) for r in recs if "loss" in r and "stopped" not in r]


def baseline(cfg_path, tmp):
  s = T.train(load_config(str(cfg_path)), tmp, progress=False, log=lambda *_: None,
              checkpointing=False)
  assert [k for k, _ in s["losses"]] == list(range(1, STEPS + 1))
  return s["losses"]


def test_two_processes_match_one_process_and_resume_after_kill(setup, tmp_path):
  """MoE tiny (pool mixture over 2 reader ranks, mesh data 2 x expert 4): two processes reach
  step 2 (checkpoint), hang in step 3 and are both killed (SIGKILL); the same command resumes;
  losses 1..4 equal the one-process 8-device run's. Dense tiny (single-stream grain pipeline,
  each process reading its rows): 4 steps straight, without checkpoints (the CI budget)."""
  moe, dense = setup["cfgs"]["tiny_moe"], setup["cfgs"]["tiny"]
  wd = tmp_path / "moe"
  procs = launch(moe, wd, "--debug_hang_step=2")
  ckdir = wd / "checkpoints" / "2"
  deadline = time.monotonic() + TIMEOUT_S
  while not (ckdir / "loader").exists() and time.monotonic() < deadline:
    assert all(p.poll() is None for p in procs), finish(procs, 5)
    time.sleep(0.2)
  time.sleep(1.0)                         # inside the hanging step 3 by now
  for p in procs:
    p.send_signal(signal.SIGKILL)
  codes, outs = finish(procs, 30)
  assert codes == [-signal.SIGKILL] * 2, outs
  first = losses(wd)
  assert [s for s, _ in first] == [1, 2], first     # one record per step: process 0 logs alone
  c = ck.Checkpointer(wd / "checkpoints", load_config(str(moe)).checkpoint, read_only=True)
  # the checkpoint holds each process's own loader state (the mixture tracks every rank, so the
  # two records are the same), and the frozen-version store: version 0, written once
  rec = c.read_json(2, "loader")
  assert rec["kind"] == D.PER_PROCESS and len(rec["states"]) == 2, rec
  assert rec["states"][0] == rec["states"][1] and rec["states"][0]["num_ranks"] == 2, rec
  assert rec["states"][0]["batches"] == 2, rec
  assert c.frozen_versions() == [0] and c.frozen_ref(2)["version"] == 0
  c.close()

  codes, outs = finish(launch(moe, wd))            # the resume, after both were killed
  assert codes == [0, 0], outs
  assert "resuming from" in outs[0] and "step 2" in outs[0], outs[0][-2000:]
  assert "resuming from" not in outs[1] and "done:" not in outs[1], outs[1][-2000:]  # process 0 logs
  dense_procs = launch(dense, tmp_path / "dense", "--no_checkpoint")   # beside the baseline
  two_moe = losses(wd)
  one_moe = baseline(moe, tmp_path / "one_moe")
  _compare(one_moe, two_moe)
  assert len(set(l for _, l in two_moe)) == STEPS

  codes, outs = finish(dense_procs)
  assert codes == [0, 0], outs
  two = losses(tmp_path / "dense")
  one = baseline(dense, tmp_path / "one_dense")
  _compare(one, two)


def _compare(one, two):
  """Same steps; losses equal up to float32 summation order. The cross-device reductions (the
  loss over the batch shards, the gradients) of the two-process run are done by gloo across the
  processes instead of inside one XLA program, so their additions may be ordered differently.
  Measured (2026-12-04): steps 1-2 bitwise equal (dense: 1-3), later steps 1 ulp apart (6.5e-8
  relative). rtol 1e-5 is ~150 times that and far below what a different batch, a replayed or
  lost step, or a wrong resume does (the loss moves 5e-3 to 5e-2 per step here, > 6e-4
  relative)."""
  assert [s for s, _ in one] == [s for s, _ in two], (one, two)
  a, b = np.array([l for _, l in one]), np.array([l for _, l in two])
  np.testing.assert_allclose(b, a, rtol=1e-5, atol=0)


def test_bad_inputs_one_sentence(setup, tmp_path):
  """An unreachable coordinator, processes that disagree on the config, and a process count
  that does not divide the global batch: one sentence each, every process ends (no hang)."""
  dense = setup["cfgs"]["tiny"]
  t0 = time.monotonic()
  codes, outs = finish(launch(dense, tmp_path / "u", "--distributed_timeout_s=2", ids=[1]), 120)
  assert codes == [1], outs
  assert "error: process 1 of 2 (flags) could not reach the coordinator at 127.0.0.1:" in outs[0]
  assert "within 2 s" in outs[0] and "Traceback" not in outs[0], outs[0]
  assert time.monotonic() - t0 < 120

  port = D.free_port()
  p0 = launch(dense, tmp_path / "h", "--config.optim.peak_lr=0.002", port=port, ids=[0])
  p1 = launch(dense, tmp_path / "h", "--config.optim.peak_lr=0.003", port=port, ids=[1])
  codes, outs = finish(p0 + p1, 180)
  assert codes[0] != 0 and codes[1] != 0, outs
  for o in outs:
    assert "process 1's config (hash" in o and "differs from process 0's" in o, o[-3000:]
    assert "optim.peak_lr" in o and "Traceback" not in o, o[-3000:]

  # one process fails (its data directory is missing) while process 0 waits for it: process 0
  # ends too, naming process 1 and its sentence
  port = D.free_port()
  p0 = launch(dense, tmp_path / "f", port=port, ids=[0])
  p1 = launch(dense, tmp_path / "f", f"--config.data.path={tmp_path / 'gone'}", port=port, ids=[1])
  codes, outs = finish(p0 + p1, 180)
  assert codes == [D.EXIT_PEER, 1], (codes, outs)
  assert "error: stopping process 0 because process 1 (" in outs[0], outs[0][-3000:]
  assert "failed: data directory" in outs[0] and "gone does not exist" in outs[0], outs[0][-3000:]

  codes, outs = finish(launch(dense, tmp_path / "b", "--config.train.global_batch=10",
                              "--config.train.eval_every=0", n=3), 180)
  assert all(c == 1 for c in codes), outs
  for o in outs:
    assert "error: train.global_batch=10 is not divisible by the 3 processes" in o, o[-3000:]


def test_finite_check_is_one_program_and_names_the_leaf():
  """checkpoint._check_finite_tree (every restore): sharded leaves in one compiled reduction;
  a non-finite value is named by its leaf."""
  import jax
  from jax.sharding import NamedSharding, PartitionSpec as P
  mesh = jax.make_mesh((8,), ("data",))
  rng = np.random.default_rng(0)
  tree = {"a": rng.standard_normal((8, 4)).astype(np.float32),
          "b": {"c": rng.standard_normal((16,)).astype(np.float32)},
          "n": np.arange(8, dtype=np.int32)}
  put = lambda t: jax.tree_util.tree_map(
      lambda x: jax.device_put(x, NamedSharding(mesh, P("data"))), t)
  ck._check_finite_tree(put(tree), "d")
  tree["b"]["c"][int(rng.integers(16))] = np.inf
  with pytest.raises(ck.CheckpointError, match=r"checkpoint d holds non-finite values at "
                                               r"\['b'\]\['c'\]"):
    ck._check_finite_tree(put(tree), "d")


def test_launch_from_environment():
  """Flags, JAX_*, SLURM and torchrun variables; missing pieces are one sentence."""
  assert D.from_environment(env={}) is None
  L = D.from_environment("h:1", 2, 1, env={})
  assert (L.coordinator, L.num_processes, L.process_id, L.source) == ("h:1", 2, 1, "flags")
  with pytest.raises(D.DistributedError, match="--process_id is missing"):
    D.from_environment("h:1", 2, -1, env={})
  L = D.from_environment(env={"JAX_COORDINATOR_ADDRESS": "a:5", "JAX_NUM_PROCESSES": "4",
                              "JAX_PROCESS_ID": "3"})
  assert (L.coordinator, L.num_processes, L.process_id) == ("a:5", 4, 3)
  L = D.from_environment(env={"SLURM_JOB_ID": "4097", "SLURM_NTASKS": "3", "SLURM_PROCID": "2",
                              "SLURM_JOB_NODELIST": "gpu[07-09,12],cpu1"})
  assert (L.coordinator, L.num_processes, L.process_id) == (
      f"gpu07:{D.SLURM_PORT_BASE + 1}", 3, 2)
  assert D.from_environment(env={"SLURM_JOB_ID": "1", "SLURM_NTASKS": "1", "SLURM_PROCID": "0",
                                 "SLURM_JOB_NODELIST": "n1"}) is None
  L = D.from_environment(env={"MASTER_ADDR": "m", "MASTER_PORT": "7", "WORLD_SIZE": "2",
                              "RANK": "1"})
  assert (L.coordinator, L.num_processes, L.process_id) == ("m:7", 2, 1)
  with pytest.raises(D.DistributedError, match=r"process id 5 must be in \[0, 2\)"):
    D.from_environment("h:1", 2, 5, env={})
  with pytest.raises(D.DistributedError, match="must be host:port"):
    D.from_environment("h", 2, 0, env={})


def test_mixture_reading_two_ranks_equals_two_readers(setup):
  """One process reading both reader ranks yields, row for row, what two processes read."""
  c = load_config(str(setup["cfgs"]["tiny_moe"]))
  m = shards.load_manifest(setup["data"])
  both = pools_lib.mixture_loader(c, str(setup["data"]), m, rows=(0, 8))
  assert both.read == [0, 1]
  parts = [pools_lib.mixture_loader(c, str(setup["data"]), m, rank=r, num_ranks=2)
           for r in (0, 1)]
  for _ in range(6):
    a = next(both)["ids"]
    b = np.concatenate([next(p)["ids"] for p in parts])
    np.testing.assert_array_equal(a, b)
  assert both.get_state() == parts[0].get_state() == parts[1].get_state()
  with pytest.raises(shards.DataError, match=r"rows \[0, 3\) .* not whole data ranks of 4 rows"):
    pools_lib.data_ranks(c, (0, 3))
