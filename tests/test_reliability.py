"""Reliability (issues 21 and 23) on tiny pytrees, no model: checkpoint checksums, the frozen base's
second copy, the fallback that never leaves a run without a checkpoint, save failures, the
run-directory lock, stored configs as data, data validation at load, prepare_data's UTF-8 policy,
size validation and the hot-config ranges."""
import errno
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from etils import epath
from jax.sharding import NamedSharding, PartitionSpec as P
from ml_collections import ConfigDict

from lightning_jax import checkpoint as ck
from lightning_jax import rundir, sharding
from lightning_jax.config import ConfigError, load_config, validate
from lightning_jax.data import shards

REPO = pathlib.Path(__file__).resolve().parents[1]


def _cfg(async_save=False, keep=0):
  return ConfigDict(dict(keep=keep, every_steps=1, every_seconds=0, async_save=async_save))


@pytest.fixture
def mesh():
  return sharding.make_mesh(ConfigDict({"data": -1, "expert": 1, "tensor": 1}))


def _state(mesh, w, frozen=True):
  put = lambda x, spec: jax.device_put(jnp.asarray(x), NamedSharding(mesh, spec))  # noqa: E731
  st = {"params": {"w": put(w, P(("data", "expert"), None)), "b": put(np.ones(6, np.float32), P())},
        "stats": {"s": put(np.zeros(3, np.float32), P())},
        "opt_state": {"mu": put(np.zeros_like(w), P())},
        "step": put(np.int32(1), P())}
  if frozen:
    st["frozen"] = {"codes": put(np.arange(64, dtype=np.uint8).reshape(8, 8), P())}
  return st


def _abstract(state):
  return jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype,
                                                               sharding=a.sharding), state)


def _flip_bit(a: np.ndarray, index: int, bit: int) -> np.ndarray:
  u = np.array(a, copy=True).view(np.uint32).reshape(-1)
  u[index] ^= np.uint32(1 << bit)
  return u.view(a.dtype).reshape(a.shape)


def _corrupt(item_dir: pathlib.Path):
  files = [f for f in item_dir.rglob("*") if f.is_file() and f.stat().st_size > 64
           and "METADATA" not in f.name and f.parent.name != item_dir.name]
  assert files, item_dir
  for f in files:
    raw = bytearray(f.read_bytes())
    raw[len(raw) // 2:] = b"\xff" * (len(raw) - len(raw) // 2)
    f.write_bytes(bytes(raw))


# ----------------------------------------------------------------------------- checksums
def test_flipped_bit_is_named_on_restore_and_by_inspect_verify(tmp_path, mesh):
  """A value that still decodes but differs by one bit from what was saved."""
  from launch import inspect as inspect_lib
  rng = np.random.default_rng()
  w = rng.normal(size=(8, 6)).astype(np.float32)
  d = tmp_path / "run" / "checkpoints"
  c = ck.Checkpointer(d, _cfg())
  c.save(1, _state(mesh, w), {}, {}, {"loss": 2.0}, frozen_version=0)
  c.save(2, _state(mesh, _flip_bit(w, int(rng.integers(48)), int(rng.integers(31)))), {}, {},
         {"loss": 1.0}, frozen_version=0)
  c.close()
  # step 2's array files replaced by step 1's: every file decodes, one array is one bit off
  shutil.rmtree(d / "2" / "state")
  shutil.copytree(d / "1" / "state", d / "2" / "state")
  c = ck.Checkpointer(d, _cfg())
  ab = _abstract(_state(mesh, w))
  with pytest.raises(ck.CheckpointError, match=r"checkpoint .*/checkpoints/2 is damaged: the array "
                                               r"params/w .*does not match the checksum"):
    c.restore_latest(ab)
  with pytest.raises(ck.CheckpointError, match=r"steps \[2\].*params/w"):
    inspect_lib.verify(str(tmp_path / "run"), out=lambda *_: None)
  logs = []
  out = c.restore_latest(ab, fallback_to_previous=True, log=logs.append)
  assert out["step"] == 1 and any("skipping checkpoint" in m and "/2" in m for m in logs)
  np.testing.assert_array_equal(np.asarray(out["state"]["params"]["w"]), w)
  c.close()
  lines = []
  assert inspect_lib.verify(str(tmp_path / "run"), out=lines.append) == {1: "ok"}
  assert "both" not in lines[0] and "first copy and second copy match" in lines[0], lines


def test_one_damaged_frozen_copy_is_read_from_the_other_and_rewritten(tmp_path, mesh):
  w = np.random.default_rng(1).normal(size=(8, 6)).astype(np.float32)
  d = tmp_path / "checkpoints"
  c = ck.Checkpointer(d, _cfg())
  c.save(1, _state(mesh, w), {}, {}, {"loss": 2.0}, frozen_version=0)
  c.close()
  assert (d / "frozen" / "0").is_dir() and (d / "frozen_copy" / "0").is_dir()
  _corrupt(d / "frozen" / "0" / "frozen")
  logs = []
  c = ck.Checkpointer(d, _cfg())
  out = c.restore_latest(_abstract(_state(mesh, w)), log=logs.append)
  np.testing.assert_array_equal(np.asarray(out["state"]["frozen"]["codes"]),
                                np.arange(64, dtype=np.uint8).reshape(8, 8))
  assert any("frozen/0" in m and "second copy" in m and "frozen_copy/0" in m and "rewrote" in m
             for m in logs), logs
  c.close()
  logs = []     # the first copy was rewritten: read directly now
  c = ck.Checkpointer(d, _cfg())
  assert c.restore_latest(_abstract(_state(mesh, w)), log=logs.append)["step"] == 1
  assert not logs, logs
  c.close()


def test_fallback_never_leaves_no_checkpoint_and_vanished_checkpoints_refuse(tmp_path, mesh):
  w = np.random.default_rng(2).normal(size=(8, 6)).astype(np.float32)
  d = tmp_path / "checkpoints"
  c = ck.Checkpointer(d, _cfg())
  for s in (1, 2):
    c.save(s, _state(mesh, w), {}, {}, {"loss": 1.0}, frozen_version=0)
  c.close()
  for root in ("frozen", "frozen_copy"):          # every step uses the one damaged base
    _corrupt(d / root / "0" / "frozen")
  c = ck.Checkpointer(d, _cfg())
  with pytest.raises(ck.CheckpointError, match=r"no checkpoint in .* is readable .*nothing was "
                                               r"moved aside"):
    c.restore_latest(_abstract(_state(mesh, w)), fallback_to_previous=True, log=lambda *_: None)
  assert c.steps() == [1, 2] and (d / "frozen" / "0").is_dir()
  c.close()
  # the checkpoints vanish (moved away by hand): a plain start refuses instead of step 0
  shutil.move(str(d), str(tmp_path / "elsewhere"))
  c = ck.Checkpointer(d, _cfg())
  with pytest.raises(ck.CheckpointError, match=r"had checkpoints \(up to step 2.*"
                                               r"checkpoints.history.json.*start this run over"):
    c.restore_latest(None)
  (tmp_path / "checkpoints.history.json").unlink()        # the user's explicit choice
  assert c.restore_latest(None) is None
  c.close()


@pytest.mark.parametrize("async_save", [False, True])
def test_save_failures_are_one_sentence_and_keep_the_previous(tmp_path, mesh, monkeypatch,
                                                              async_save):
  """Each failure in a run directory of its own: a run stops at its failed save, and orbax's
  background writers of a failed async save may still be running inside that directory (a
  second save there in the same process raced them: "Directory not empty")."""
  w = np.random.default_rng(3).normal(size=(8, 6)).astype(np.float32)
  cls = type(epath.Path("/"))
  orig = cls.write_text
  for no, words in ((errno.ENOSPC, "the disk is full"), (errno.EACCES, "permission denied")):
    d = tmp_path / f"run_{no}" / "checkpoints"
    c = ck.Checkpointer(d, _cfg(async_save))
    c.save(1, _state(mesh, w), {}, {}, {"loss": 1.0}, frozen_version=0)
    c.wait()
    def fail(self, *a, _no=no, **k):
      raise OSError(_no, os.strerror(_no), str(self))
    monkeypatch.setattr(cls, "write_text", fail)
    with pytest.raises(ck.CheckpointSaveError, match=rf"could not write checkpoint .*/2: {words} "
                                                     rf".*the previous checkpoint .*/1 is intact"):
      c.save(2, _state(mesh, w * 2), {}, {}, {"loss": 1.0}, frozen_version=0)
      c.wait()
    monkeypatch.setattr(cls, "write_text", orig)
    r = ck.Checkpointer(d, _cfg())
    out = r.restore_latest(_abstract(_state(mesh, w)))
    assert r.steps() == [1] and out["step"] == 1
    np.testing.assert_array_equal(np.asarray(out["state"]["params"]["w"]), w)
  # the checkpoint directory deleted while training (a directory no failed save wrote into)
  d = tmp_path / "run_deleted" / "checkpoints"
  r = ck.Checkpointer(d, _cfg())
  r.save(1, _state(mesh, w), {}, {}, {"loss": 1.0}, frozen_version=0)
  shutil.rmtree(d)
  with pytest.raises(ck.CheckpointSaveError, match=r"checkpoints/3: the checkpoint directory .* "
                                                   r"no longer exists"):
    r.save(3, _state(mesh, w), {}, {}, {"loss": 1.0}, frozen_version=0)


def test_last_good_skips_nonfinite_losses_and_huge_parameters(tmp_path, mesh):
  w = np.random.default_rng(4).normal(size=(8, 6)).astype(np.float32)
  c = ck.Checkpointer(tmp_path / "checkpoints", _cfg())
  c.save(1, _state(mesh, w, frozen=False), {}, {}, {"loss": 3.0})
  c.save(2, _state(mesh, w * np.float32(1e29), frozen=False), {}, {}, {"loss": 2.0})
  c.save(3, _state(mesh, w, frozen=False), {}, {}, {"loss": float("nan")})
  msg = c.last_good()
  assert msg.startswith(str(c.step_dir(1)) + " (left intact") and "skipped newer 3" in msg, msg
  m = re.search(r"2 \(largest \|parameter\| ([0-9.e+]+)\)", msg)
  assert m and float(m.group(1)) == pytest.approx(float(np.abs(w).max()) * 1e29, rel=1e-6), msg
  c.close()


# ----------------------------------------------------------------------------- run lock
def test_run_directory_lock_names_the_holder_and_takes_over_stale_locks(tmp_path):
  import socket
  rundir.lock(tmp_path)
  try:
    # another process on the same directory gets one sentence naming this pid and host
    code = ("import sys; sys.path.insert(0, %r)\nfrom lightning_jax import rundir\n"
            "try:\n  rundir.lock(%r)\nexcept rundir.RunDirLocked as e:\n  print(e)\n"
            % (str(REPO), str(tmp_path)))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"}).stdout
    assert f"is in use by pid {os.getpid()} on host {socket.gethostname()}" in out, out
  finally:
    rundir.release(tmp_path)
  assert not (tmp_path / "run.lock").exists()
  # a lock left by a process that is gone (kill -9): taken over with a message
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  (tmp_path / "run.lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(),
                                                 "time": 0}))
  logs = []
  rundir.lock(tmp_path, logs.append)
  assert any(f"stale lock" in m and f"pid {dead.pid}" in m for m in logs), logs
  assert json.loads((tmp_path / "run.lock").read_text())["pid"] == os.getpid()
  rundir.release(tmp_path)


# ----------------------------------------------------------------------------- stored configs
def _planted_run(tmp_path, mesh):
  """A run directory whose stored config names an executable payload as optim.start_from."""
  marker = tmp_path / "EXECUTED"
  payload = tmp_path / "payload.py"
  payload.write_text(f"import pathlib\npathlib.Path({str(marker)!r}).write_text('x')\n"
                     f"from configs.tiny import get_config\n")
  cfg = load_config(str(REPO / "configs" / "tiny.py"))
  cfg.optim.start_from = str(payload)
  cj = ck.config_to_json(cfg)
  cj["optim"].pop("start_from_lr", None)        # as a record from before the field existed
  w = np.random.default_rng(5).normal(size=(8, 6)).astype(np.float32)
  c = ck.Checkpointer(tmp_path / "run" / "checkpoints", _cfg())
  for s in (1, 2):
    c.save(s, _state(mesh, w, frozen=False) | {"frozen": {}}, {"iterator": s}, cj, {"loss": 1.0})
  c.close()
  return marker


def test_nothing_read_from_a_run_directory_is_executed(tmp_path, mesh, monkeypatch):
  from lightning_jax.run.checkpoints import read_source
  from launch import ema as ema_lib, inspect as inspect_lib
  from lightning_jax import optim
  marker = _planted_run(tmp_path, mesh)
  monkeypatch.chdir(tmp_path)           # relative run paths, as the cookbook writes them
  inspect_lib.inspect("run", out=lambda *_: None)
  src = read_source("run", log=lambda *_: None)
  optim.make_schedule(src["cfg"], 10)(0)
  out = ema_lib.ema("run", "ema", alpha=0.5, last=2, log=lambda *_: None)
  assert out["steps"] == [1, 2] and (tmp_path / "ema" / "checkpoints" / "0").is_dir()
  assert not marker.exists(), "a file named in a stored config was executed"
  # the user's own config is still resolved from start_from (and stored resolved)
  cfg = load_config(str(REPO / "configs" / "stage_5b.py"))
  assert cfg.optim.start_from and float(optim.start_lr(cfg)) == pytest.approx(1e-4)
  assert cfg.optim.start_from_lr == pytest.approx(1e-4)


def test_growth_cli_config_errors_are_one_sentence(capsys):
  from growth.cli import preflight
  for argv, words in ((["--config=configs/stage_9b.py:p9"], "has no phase 'p9'"),
                      (["--config=configs/missing.py"], "does not exist"),
                      (["--config=configs/tiny.py", "--config.model.bogus=1"],
                       "model has no field 'bogus'")):
    with pytest.raises(SystemExit) as e:
      preflight(["prog", "--src=a", "--dst=b"] + argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and words in err and "Traceback" not in err, err


# ----------------------------------------------------------------------------- data
def _data(tmp_path, arrays, vocab=64):
  from lightning_jax.data.pools import write_shard_dir
  return write_shard_dir(tmp_path / "data", arrays, vocab_size=vocab, eot_id=vocab - 1)


def test_data_ids_paths_and_vocab_ids_checked_at_load(tmp_path):
  rng = np.random.default_rng()
  good = rng.integers(0, 63, size=500).astype(np.uint32)
  m = _data(tmp_path, {("train", "en"): [good], ("val", "en"): [good[:100]]})
  d = tmp_path / "data"
  assert m["shards"][0]["max_id"] == int(good.max())
  shards.load_manifest(d)
  # an old manifest (no id record) whose shard holds an id >= vocab, or a negative id as uint32
  for bad_id in (64, -1):
    bad = good.copy()
    bad[int(rng.integers(500))] = np.uint32(bad_id % (1 << 32))
    bad.tofile(d / "train-en-00000.u32")
    mm = json.loads((d / "manifest.json").read_text())
    for e in mm["shards"]:
      e.pop("min_id", None), e.pop("max_id", None)
    (d / "manifest.json").write_text(json.dumps(mm))
    with pytest.raises(shards.DataError, match=r"shard .*train-en-00000.u32 holds token ids "
                                               r"\d+\.\.\d+ but the vocabulary .* is \[0, 64\)"):
      shards.load_manifest(d, log=lambda *_: None)
  good.tofile(d / "train-en-00000.u32")
  logs = []
  shards.load_manifest(d, log=logs.append)       # the one-time scan is recorded
  assert any("scanned" in m for m in logs)
  assert json.loads((d / "manifest.json").read_text())["shards"][0]["max_id"] == int(good.max())
  # a shard outside the data directory
  mm = json.loads((d / "manifest.json").read_text())
  mm["shards"][0]["file"] = "../../elsewhere/x.u32"
  (d / "manifest.json").write_text(json.dumps(mm))
  with pytest.raises(shards.DataError, match=r"names the shard '../../elsewhere/x.u32', which lies "
                                             r"outside the data directory"):
    shards.load_manifest(d)


def test_prepare_replaces_and_counts_invalid_utf8_and_reports_tiny_heldout(tmp_path):
  from tokenizer.base import load_o200k_base
  enc = load_o200k_base()
  src = tmp_path / "src" / "en"
  src.mkdir(parents=True)
  bad = "hello world, some text. ".encode() * 40
  bad = bad[:100] + b"\xff\xfe" + bad[100:200] + b"\xc3" + bad[200:]
  (src / "a.txt").write_bytes(bad)
  (src / "b.jsonl").write_bytes(b'{"text": "short \xe9 doc"}\n{"text": "another doc"}\n')
  logs = []
  m = shards.prepare([str(tmp_path / "src")], str(tmp_path / "out"), encoding=enc,
                     val_fraction=0.4, log=logs.append)
  assert m["invalid_utf8"][str(src / "a.txt")] == [3, 100]   # \xff, \xfe and a lone \xc3
  assert m["invalid_utf8"][str(src / "b.jsonl")][0] == 1
  assert any("a.txt holds 3 invalid UTF-8" in x and "byte offset 100" in x for x in logs), logs
  assert any("tiny held-out split" in x and "'en'" in x for x in logs), logs
  # vocab_ids.npy truncated after preparation
  vid = tmp_path / "out" / "vocab_ids.npy"
  np.save(vid, np.load(vid)[:-3])
  with pytest.raises(shards.DataError, match=r"vocab_ids.npy does not match the sha256"):
    shards.load_manifest(tmp_path / "out")


def test_zero_and_negative_sizes_are_rejected_by_validate():
  for field, value in (("model.ffn_width", 0), ("model.deltanet.chunk_size", 0),
                       ("model.gsa.query_chunk", -4), ("train.log_every", 0)):
    cfg = load_config(str(REPO / "configs" / "tiny.py"))
    sec, _, name = field.rpartition(".")
    node = cfg
    for part in sec.split("."):
      node = node[part]
    node[name] = value
    with pytest.raises(ConfigError, match=rf"^{field}={value} must be a positive integer"):
      validate(cfg)


def test_hot_config_ranges_keep_previous_values(tmp_path):
  from lightning_jax.layers import moe
  cfg = load_config(str(REPO / "configs" / "tiny_moe.py"))
  path = tmp_path / "hot.json"
  cfg.moe.hot_config, cfg.moe.hot_config_every = str(path), 1
  logs = []
  hot = moe.HotConfig(cfg, logger=logs.append)
  path.write_text(json.dumps({"gamma": 2e-4}))
  hot.poll(0)
  good = dict(hot.values)
  assert good["gamma"] == 2e-4
  for text in ('{"gamma": NaN}', '{"gamma": Infinity}', '{"z_weight": -1e300}',
               '{"cap_lo": -Infinity, "gamma": 3e-4}', '{"cap_lo": 0.5, "cap_hi": 0.1}'):
    path.write_text(text)
    n = len(logs)
    assert hot.poll(1) == {}
    assert hot.values == good, text
    assert len(logs) == n + 1 and ("outside" in logs[-1] or "exceeds" in logs[-1]), logs[n:]
