"""orbax checkpoints: sharded round trip, keep-N, killed save, torn and corrupt newest checkpoint."""
import pathlib
import shutil

import jax
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


def test_corrupt_bytes_in_newest_checkpoint_is_an_error(tmp_path, mesh):
  states = _save_steps(tmp_path / "c", [2, 4], mesh, np.random.default_rng(2))
  data = [f for f in (tmp_path / "c" / "4" / "state").rglob("*")
          if f.is_file() and f.stat().st_size > 64 and "METADATA" not in f.name
          and f.parent.name != "state"]
  assert data, "no array data files found to corrupt"
  for f in data:
    raw = bytearray(f.read_bytes())
    raw[len(raw) // 2:] = b"\xff" * (len(raw) - len(raw) // 2)
    f.write_bytes(bytes(raw))
  c = ck.Checkpointer(tmp_path / "c", _cfg())
  with pytest.raises(ck.CheckpointError, match=r"checkpoint .*/c/4 "):
    c.restore_latest(_abstract(states[4]))
  c.close()


def test_missing_directory_read_only(tmp_path):
  with pytest.raises(ck.CheckpointError, match=r"checkpoint directory .*nothing does not exist"):
    ck.Checkpointer(tmp_path / "nothing", _cfg(), read_only=True)
