"""orbax checkpoints: sharded round trip, keep-N, killed save, torn and corrupt newest checkpoint;
the frozen base stored once per version (fingerprint, keep-N of versions, bits mismatch)."""
import pathlib
import shutil

import jax
import orbax.checkpoint as ocp
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P
from ml_collections import ConfigDict

from lightning_jax import checkpoint as ck
from lightning_jax import sharding


def _cfg(keep=3, every_steps=2, every_seconds=0, async_save=True):
  c = ConfigDict()
  c.keep, c.every_steps, c.every_seconds, c.async_save = keep, every_steps, every_seconds, async_save
  return c


def _state(mesh, rng):
  w = jax.device_put(jnp.asarray(rng.normal(size=(8, 6)), jnp.float32),
                     NamedSharding(mesh, P(("data", "expert"), None)))
  b = jax.device_put(jnp.asarray(rng.normal(size=(6,)), jnp.float32), NamedSharding(mesh, P()))
  return {"params": {"w": w, "b": b}, "step": jax.device_put(jnp.int32(3), NamedSharding(mesh, P()))}


def _abstract(state):
  return jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype,
                                                               sharding=a.sharding), state)


def _save_steps(d, steps, mesh, rng, **kw):
  c = ck.Checkpointer(d, _cfg(**kw))
  states = {}
  for s in steps:
    st = _state(mesh, rng)
    c.save(s, st, {"iterator": {"next_index": s}}, {"stage": "t"}, {"loss": 1.0 / s})
    states[s] = st
  c.close()
  return states


@pytest.fixture
def mesh():
  return sharding.make_mesh(ConfigDict({"data": -1, "expert": 1, "tensor": 1}))


def test_roundtrip_bitwise_sharded_and_keep_n(tmp_path, mesh):
  seed = int(np.random.default_rng().integers(1 << 30))
  states = _save_steps(tmp_path / "c", [2, 4, 6, 8], mesh, np.random.default_rng(seed), keep=2)
  c = ck.Checkpointer(tmp_path / "c", _cfg(keep=2))
  assert c.steps() == [6, 8]
  out = c.restore_latest(_abstract(states[8]))
  assert out["step"] == 8 and out["loader"] == {"iterator": {"next_index": 8}}
  assert out["config"] == {"stage": "t"} and out["meta"]["loss"] == pytest.approx(1 / 8)
  for a, b in zip(jax.tree_util.tree_leaves(out["state"]), jax.tree_util.tree_leaves(states[8])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=f"seed {seed}")
    assert a.sharding == b.sharding
  c.close()


def test_save_policy_steps_and_seconds(tmp_path):
  c = ck.Checkpointer(tmp_path / "p", _cfg(every_steps=5, every_seconds=0))
  assert [s for s in range(1, 12) if c.due(s)] == [5, 10]
  c2 = ck.Checkpointer(tmp_path / "q", _cfg(every_steps=0, every_seconds=1e-9))
  assert c2.due(1) and c2.due(7)
  c.close(); c2.close()


def test_killed_save_leaves_previous_usable(tmp_path, mesh):
  """What a kill during a save leaves behind: an uncommitted temporary step directory."""
  rng = np.random.default_rng(0)
  states = _save_steps(tmp_path / "c", [2, 4], mesh, rng)
  d = tmp_path / "c"
  # orbax writes into "<step>.orbax-checkpoint-tmp-<n>" and renames it when complete
  shutil.copytree(d / "4", d / "6.orbax-checkpoint-tmp-1234")
  (d / "6.orbax-checkpoint-tmp-1234" / "state" / "_METADATA").unlink(missing_ok=True)
  c = ck.Checkpointer(d, _cfg())
  assert c.steps() == [2, 4]
  out = c.restore_latest(_abstract(states[4]))
  assert out["step"] == 4
  np.testing.assert_array_equal(np.asarray(out["state"]["params"]["w"]),
                                np.asarray(states[4]["params"]["w"]))
  c.close()


def _tear(step_dir: pathlib.Path):
  """Delete the array data files of a committed step (a torn copy, a disk that lost files)."""
  victims = [f for f in (step_dir / "state").rglob("*") if f.is_file()
             and f.name not in ("_CHECKPOINT_METADATA",)]
  assert victims, f"nothing to tear in {step_dir}"
  for f in victims:
    f.unlink()


def test_torn_newest_checkpoint_is_an_error_naming_it(tmp_path, mesh):
  states = _save_steps(tmp_path / "c", [2, 4], mesh, np.random.default_rng(1))
  _tear(tmp_path / "c" / "4")
  c = ck.Checkpointer(tmp_path / "c", _cfg())
  with pytest.raises(ck.CheckpointError, match=r"checkpoint .*/c/4 is unreadable or incomplete"):
    c.restore_latest(_abstract(states[4]))
  logs = []
  out = c.restore_latest(_abstract(states[4]), fallback_to_previous=True, log=logs.append)
  assert out["step"] == 2 and "skipping checkpoint" in logs[0] and "/c/4" in logs[0]
  assert c.steps() == [2] and (tmp_path / "c.unreadable").is_dir()
  np.testing.assert_array_equal(np.asarray(out["state"]["params"]["b"]),
                                np.asarray(states[2]["params"]["b"]))
  c.close()


def _corrupt_array_files(item_dir):
  """Overwrite the second half of every array data file of an orbax item with 0xff bytes."""
  data = [f for f in item_dir.rglob("*")
          if f.is_file() and f.stat().st_size > 64 and "METADATA" not in f.name
          and f.parent.name != item_dir.name]
  assert data, f"no array data files found to corrupt in {item_dir}"
  for f in data:
    raw = bytearray(f.read_bytes())
    raw[len(raw) // 2:] = b"\xff" * (len(raw) - len(raw) // 2)
    f.write_bytes(bytes(raw))


def test_corrupt_bytes_in_newest_checkpoint_is_an_error(tmp_path, mesh):
  states = _save_steps(tmp_path / "c", [2, 4], mesh, np.random.default_rng(2))
  _corrupt_array_files(tmp_path / "c" / "4" / "state")
  c = ck.Checkpointer(tmp_path / "c", _cfg())
  with pytest.raises(ck.CheckpointError, match=r"checkpoint .*/c/4 "):
    c.restore_latest(_abstract(states[4]))
  c.close()


def test_missing_directory_read_only(tmp_path):
  with pytest.raises(ck.CheckpointError, match=r"checkpoint directory .*nothing does not exist"):
    ck.Checkpointer(tmp_path / "nothing", _cfg(), read_only=True)


# ----------------------------------------------------------------------------- the frozen base
def _tqp_cfg(bits):
  from configs.tiny import get_config
  c = get_config()
  c.moe.enabled, c.moe.n_experts, c.moe.expert_width = True, 4, 16
  c.tqp.enabled, c.tqp.bits = True, bits
  return c


def _tqp_state(mesh, rng, bits=4, step=0):
  """A train-shaped state whose frozen tree is a TQP base (codes split over the 8 devices) and
  a codec-like buffer, much bigger than params: the frozen bytes are easy to find on disk."""
  from lightning_jax import tqp
  cfg = _tqp_cfg(bits)
  qa = tqp.qbase_abstract(cfg, 64)

  def arr(a, spec):
    if np.dtype(a.dtype) == np.uint8:
      v = rng.integers(0, 256, a.shape, dtype=np.uint8)
    elif np.dtype(a.dtype) == np.int8:
      v = rng.choice(np.array([-1, 1], np.int8), a.shape)
    else:
      v = rng.normal(size=a.shape).astype(a.dtype)
    return jax.device_put(jnp.asarray(v), NamedSharding(mesh, spec))
  q = {m: {"codes": arr(qa[m]["codes"], P(("data", "expert"))),
           "norms": arr(qa[m]["norms"], P(("data", "expert"))),
           "signs": arr(qa[m]["signs"], P())} for m in qa}
  rep = NamedSharding(mesh, P())
  frozen = {"embed": {"bytes": jax.device_put(jnp.asarray(rng.integers(0, 256, (64, 16)),
                                                          jnp.int32), rep)},
            "groups": {"l0": {"moe": {"experts": q}}}}
  st = _state(mesh, rng)
  return {"params": st["params"], "frozen": frozen,
          "stats": {"ema": jax.device_put(jnp.float32(rng.normal()), rep)},
          "opt_state": {"mu": jax.tree_util.tree_map(jnp.zeros_like, st["params"])},
          "step": jax.device_put(jnp.int32(step), rep)}, cfg


def _du(path: pathlib.Path) -> int:
  return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _frozen_bytes(state) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(state["frozen"]))


def _assert_same(a, b, msg):
  la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b), msg
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=msg)
    assert x.dtype == y.dtype and x.sharding == y.sharding, msg


def _flush(state, rng, mesh):
  """What a tqp flush does to the frozen tree: new codes, same shapes."""
  out = dict(state)
  fz = jax.tree_util.tree_map(lambda x: x, state["frozen"])
  q = fz["groups"]["l0"]["moe"]["experts"]["down"]
  q["codes"] = jax.device_put(jnp.asarray(rng.integers(0, 256, q["codes"].shape, dtype=np.uint8)),
                              q["codes"].sharding)
  out["frozen"] = fz
  return out


def test_frozen_base_is_stored_once_and_dropped_after_a_flush(tmp_path, mesh):
  seed = int(np.random.default_rng().integers(1 << 30))
  rng = np.random.default_rng(seed)
  d = tmp_path / "c"
  state, cfg = _tqp_state(mesh, rng)
  cj = ck.config_to_json(cfg)
  c = ck.Checkpointer(d, _cfg(keep=2))
  for s in (1, 2, 3):         # three saves, frozen version 0 (the init / grown base)
    c.save(s, {**state, "step": jnp.int32(s)}, {"i": s}, cj, {"loss": 1.0}, frozen_version=0)
  c.wait()
  assert c.steps() == [2, 3] and c.frozen_versions() == [0], f"seed {seed}"
  nbytes = _frozen_bytes(state)
  assert _du(d / "frozen" / "0") >= 0.9 * nbytes          # random codes do not compress
  for s in (2, 3):
    assert "frozen" not in c.manager.item_metadata(s)["state"]
    assert _du(d / str(s)) < 0.25 * nbytes, f"step {s} holds {_du(d / str(s))} bytes"
    assert c.frozen_ref(s)["version"] == 0
  written = c.frozen_info(0)["written_at_step"]
  c.close()
  # a new process saving the same tree as version 0 does not rewrite it
  c = ck.Checkpointer(d, _cfg(keep=2))
  c.save(4, {**state, "step": jnp.int32(4)}, {"i": 4}, cj, {"loss": 1.0}, frozen_version=0)
  c.wait()
  assert c.frozen_info(0)["written_at_step"] == written == 1
  # a flush at step 5 makes version 5; version 0 goes once no kept step references it
  flushed = _flush(state, rng, mesh)
  c.save(5, {**flushed, "step": jnp.int32(5)}, {"i": 5}, cj, {"loss": 1.0}, frozen_version=5)
  c.wait()
  assert c.steps() == [4, 5] and c.frozen_versions() == [0, 5], f"seed {seed}"
  c.save(6, {**flushed, "step": jnp.int32(6)}, {"i": 6}, cj, {"loss": 1.0}, frozen_version=5)
  c.close()
  c = ck.Checkpointer(d, _cfg(keep=2))
  assert c.steps() == [5, 6] and c.frozen_versions() == [5], f"seed {seed}"
  assert sorted(p.name for p in (d / "frozen").iterdir()) == ["5"]
  out = c.restore_latest(_abstract({**flushed, "step": jnp.int32(6)}))
  assert out["step"] == 6 and out["frozen_version"] == 5 and out["loader"] == {"i": 6}
  _assert_same(out["state"]["frozen"], flushed["frozen"], f"seed {seed}")
  _assert_same(out["state"]["params"], state["params"], f"seed {seed}")
  # restored as saved (no abstract tree): the same values
  got = c.restore(5, None)["state"]["frozen"]
  for x, y in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(flushed["frozen"])):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=f"seed {seed}")
  c.close()


def test_frozen_version_found_by_fingerprint(tmp_path, mesh):
  """Without frozen_version (growth, tools): reuse a stored version whose fingerprint matches."""
  rng = np.random.default_rng(3)
  state, cfg = _tqp_state(mesh, rng)
  cj = ck.config_to_json(cfg)
  c = ck.Checkpointer(tmp_path / "c", _cfg(keep=0, async_save=False))
  c.save(2, state, {}, cj, {})
  c.save(4, state, {}, cj, {})
  assert c.frozen_versions() == [2] and c.frozen_ref(4)["version"] == 2
  c.save(6, _flush(state, rng, mesh), {}, cj, {})
  assert c.frozen_versions() == [2, 6] and c.frozen_ref(6)["version"] == 6
  fp = c.frozen_ref(6)["fingerprint"]
  assert fp["tqp_bits"] == 4 and fp["n_bytes"] == _frozen_bytes(state)
  c.close()


def test_corrupt_missing_or_replaced_frozen_base_is_an_error_naming_it(tmp_path, mesh):
  rng = np.random.default_rng(5)
  d = tmp_path / "c"
  state, cfg = _tqp_state(mesh, rng)
  cj = ck.config_to_json(cfg)
  c = ck.Checkpointer(d, _cfg(keep=0, async_save=False))
  c.save(1, state, {}, cj, {}, frozen_version=0)
  c.save(2, _flush(state, rng, mesh), {}, cj, {}, frozen_version=2)
  c.close()
  ab = _abstract(state)
  spare = tmp_path / "spare"
  shutil.copytree(d / "frozen" / "2" / "frozen", spare)
  # corrupt bytes in the newest version's data files, in both of its copies
  _corrupt_array_files(d / "frozen" / "2" / "frozen")
  _corrupt_array_files(d / "frozen_copy" / "2" / "frozen")
  c = ck.Checkpointer(d, _cfg())
  with pytest.raises(ck.CheckpointError, match=r"frozen base .*/c/frozen/2 .*(unreadable|does not "
                                               r"match).*, and its second copy .*/c/frozen_copy/2 (is "
                                               r"unreadable|does not).*checkpoint .*/c/2"):
    c.restore_latest(ab)
  # --fallback_to_previous: step 2 and its version go aside, step 1 (version 0) is restored
  logs = []
  out = c.restore_latest(ab, fallback_to_previous=True, log=logs.append)
  assert out["step"] == 1 and out["frozen_version"] == 0
  _assert_same(out["state"]["frozen"], state["frozen"], "fallback")
  assert any("moved the unreadable frozen base" in m and "/c/frozen/2" in m for m in logs), logs
  assert c.steps() == [1] and c.frozen_versions() == [0]
  c.close()
  # another version's arrays in place of version 0 (both copies): the fingerprint check notices
  for root in ("frozen", "frozen_copy"):
    shutil.rmtree(d / root / "0" / "frozen")
    shutil.copytree(spare, d / root / "0" / "frozen")
  c = ck.Checkpointer(d, _cfg())
  with pytest.raises(ck.CheckpointError, match=r"frozen base .*/c/frozen/0 does not match the "
                     r"fingerprint recorded by checkpoint .*/c/1 "
                     r"\(groups/l0/moe/experts/down/codes has checksum"):
    c.restore(1, ab)
  # the version directory gone (both copies)
  shutil.rmtree(d / "frozen" / "0")
  shutil.rmtree(d / "frozen_copy" / "0")
  c = ck.Checkpointer(d, _cfg())
  with pytest.raises(ck.CheckpointError, match=r"checkpoint .*/c/1 uses the frozen base "
                                               r".*/c/frozen/0, which is missing"):
    c.restore_latest(ab)
  c.close()


def test_tqp_bits_mismatch_is_one_sentence(tmp_path, mesh):
  state8, cfg8 = _tqp_state(mesh, np.random.default_rng(7), bits=8)
  c = ck.Checkpointer(tmp_path / "c", _cfg(keep=0, async_save=False))
  c.save(1, state8, {}, ck.config_to_json(cfg8), {}, frozen_version=0)
  state4, _ = _tqp_state(mesh, np.random.default_rng(7), bits=4)
  with pytest.raises(ck.CheckpointError, match=r"^checkpoint .*/c/1 holds a 8-bit TQP quantized "
                     r"base \(.*/c/frozen/0\) but the config has tqp.bits=4; set tqp.bits=8"):
    c.restore_latest(_abstract(state4))
  other = dict(state8)
  other["frozen"] = {"embed": state8["frozen"]["embed"]}
  with pytest.raises(ck.CheckpointError, match=r"frozen base .*/c/frozen/0 does not match the "
                                               r"model being restored: it has groups/l0"):
    c.restore_latest(_abstract(other))
  c.close()


def test_older_layout_with_frozen_inside_state_is_read(tmp_path, mesh):
  state, _ = _tqp_state(mesh, np.random.default_rng(9))
  old = ocp.CheckpointManager(
      tmp_path / "c", item_names=("state", "loader", "config", "meta"),
      item_handlers={"state": ocp.StandardCheckpointHandler(),
                     **{k: ocp.JsonCheckpointHandler() for k in ("loader", "config", "meta")}})
  old.save(3, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                      loader=ocp.args.JsonSave({}), config=ocp.args.JsonSave({}),
                                      meta=ocp.args.JsonSave({})))
  old.close()
  c = ck.Checkpointer(tmp_path / "c", _cfg())
  out = c.restore_latest(_abstract(state))
  assert out["frozen_version"] is None
  _assert_same(out["state"], state, "older layout")
  assert "frozen" in c.state_metadata(3)
  c.close()


def test_checksum_on_devices_equals_host_reference():
  """The device checksum (sharded, any reduction order) equals the numpy reference, and moving
  one value changes it."""
  seed = int(np.random.default_rng().integers(1 << 30))
  rng = np.random.default_rng(seed)
  m = sharding.make_mesh(ConfigDict({"data": -1, "expert": 1, "tensor": 1}))
  sh = NamedSharding(m, P(("data", "expert"), None))
  leaves = [rng.integers(0, 256, (16, 24), dtype=np.uint8),
            rng.normal(size=(8, 5)).astype(np.float32),
            rng.integers(-(1 << 31), 1 << 31, (24, 3), dtype=np.int64).astype(np.int32),
            rng.choice(np.array([-1, 1], np.int8), (32,)), rng.normal(size=(8, 3)) > 0,
            np.asarray(jnp.asarray(rng.normal(size=(16, 2)), jnp.bfloat16)), np.float32(2.5)]
  dev = [jax.device_put(jnp.asarray(x), sh if np.ndim(x) == 2 and np.shape(x)[0] % 8 == 0
                        else NamedSharding(m, P())) for x in leaves]
  want = ck.leaf_sums(leaves, on_device=False)
  assert ck.leaf_sums(dev, on_device=True) == want, f"seed {seed}"
  # the host sum runs in blocks (bounded memory): any block size gives the same words
  leaves.append(rng.normal(size=(5, 3)))                     # float64: two words per value
  for b in (1, 7, 64):
    assert [ck._leaf_sums_host(x, block=b) for x in leaves] == ck.leaf_sums(leaves, on_device=False)
  swapped = leaves[0].copy()
  swapped[[0, 1]] = swapped[[1, 0]]
  if not np.array_equal(swapped, leaves[0]):
    assert ck.leaf_sums([swapped], on_device=False)[0][0] != want[0][0], f"seed {seed}"
