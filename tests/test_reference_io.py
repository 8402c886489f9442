"""The reference <-> our tree mapping without running the model (lightning_jax/reference.py):
import then export returns the same tensors bit for bit, bad input is refused with one sentence
naming the tensors or file, and the full-size mapping of every stage holds (jax.eval_shape)."""
from __future__ import annotations

import pathlib

import numpy as np
import pytest

from lightning_jax import reference as R
from lightning_jax.config import load_config

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "reference"
NAMES = ("dense_2b_tiny", "moe_120b_tiny")


@pytest.fixture(scope="module", params=NAMES)
def src(request):
  s = R.load_source(FIXTURES / f"{request.param}.npz")
  return s, R.config_from_reference(s["config_json"])


def test_import_then_export_is_bit_exact(src):
  s, cfg = src
  tree, report = R.import_state_dict(s["state_dict"], cfg)
  sd = s["state_dict"]
  out = R.export_state_dict(tree, cfg)
  assert set(out) == set(sd), sorted(set(out) ^ set(sd))[:5]
  memory = {n for n in sd if n in R.DROPPED}
  assert memory == set(R.DROPPED)                 # the memory-stream tensors, at reference init
  for n in sd:
    if n in memory:
      continue
    a, b = np.asarray(out[n]), np.asarray(sd[n])
    assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes(), n
  # what was dropped, and why
  assert all(n in report.dropped for n in memory)
  aliases = [n for n in sd if n.startswith(("stack.", "mtp_block.attn_block.sublayer",
                                            "mtp_block.reversible_stack.bootstrap"))]
  assert aliases and all("alias" in report.dropped[n] for n in aliases)
  assert report.mapped == len(R.entries(cfg))
  # exactly the model's tree (empty subtrees included: launch.train restores by structure)
  import jax
  from lightning_jax import model
  abstract = model.abstract_variables(cfg)
  for c in ("params", "stats"):
    assert jax.tree_util.tree_structure(tree[c]) == jax.tree_util.tree_structure(abstract[c])
    for a, b in zip(jax.tree_util.tree_leaves(tree[c]), jax.tree_util.tree_leaves(abstract[c])):
      assert a.shape == b.shape and a.dtype == b.dtype


def _refused(sd, cfg, *words):
  with pytest.raises(R.ReferenceError) as e:
    R.import_state_dict(sd, cfg)
  msg = str(e.value)
  assert msg.count(".") >= 1 and "\n" not in msg
  for w in words:
    assert w in msg, (w, msg)


def test_bad_state_dicts_are_refused(src):
  s, cfg = src
  sd = dict(s["state_dict"])
  missing = dict(sd)
  missing.pop("layers.2.attn_block.sublayer.q_proj.weight")
  _refused(missing, cfg, "lacks layers.2.attn_block.sublayer.q_proj.weight")
  extra = dict(sd, **{"layers.9.mlp_block.norm.weight": sd["norm.weight"]})
  _refused(extra, cfg, "layers.9.mlp_block.norm.weight")
  shape = dict(sd, **{"lm_head.weight": sd["lm_head.weight"][:500]})
  _refused(shape, cfg, "lm_head.weight (500, 64)")
  dtype = dict(sd, **{"norm.weight": sd["norm.weight"].astype(np.int32)})
  _refused(dtype, cfg, "norm.weight", "int32")
  alias = {k: (v + 1 if k.startswith("stack.blocks.1.attn_block.norm") else v) for k, v in sd.items()}
  if any(k.startswith("stack.") for k in sd):
    _refused(alias, cfg, "stack.blocks.1.attn_block.norm.weight", "differ")
  freq = dict(sd, **{"layers.0.attn_block.sublayer.rotary_emb.inv_freq":
                     sd["layers.0.attn_block.sublayer.rotary_emb.inv_freq"] / 32})
  _refused(freq, cfg, "rotary_emb.inv_freq")


def test_another_stage_or_size_is_refused():
  dense = R.load_source(FIXTURES / "dense_2b_tiny.npz")
  moe = R.load_source(FIXTURES / "moe_120b_tiny.npz")
  _refused(dense["state_dict"], R.config_from_reference(moe["config_json"]), "lacks")
  cfg = R.config_from_reference(dense["config_json"])
  cfg.model.n_layers = 8
  _refused(dense["state_dict"], cfg, "lacks layers.4")
  cfg = R.config_from_reference(dense["config_json"])
  cfg.model.ffn_width = 128
  _refused(dense["state_dict"], cfg, "wrong shape")


def test_bad_files_are_refused(tmp_path):
  raw = (FIXTURES / "dense_2b_tiny.npz").read_bytes()
  cut = tmp_path / "cut.npz"
  cut.write_bytes(raw[: len(raw) // 2])
  for path, word in ((cut, "truncated"), (tmp_path / "none.npz", "does not exist"),
                     (tmp_path / "w.pt", "torch"), (tmp_path / "w.bin", "torch")):
    if word != "does not exist":
      path.write_bytes(raw[:100]) if path != cut else None
    with pytest.raises(R.ReferenceError, match=word):
      R.load_source(path)
  st = tmp_path / "cut.safetensors"
  s = R.load_source(FIXTURES / "dense_2b_tiny.npz")
  R.save_safetensors({k: v for k, v in list(s["state_dict"].items())[:3]}, st)
  st.write_bytes(st.read_bytes()[:-10])
  with pytest.raises(R.ReferenceError, match="truncated"):
    R.load_source(st)


def test_safetensors_round_trip_carries_the_config(tmp_path, src):
  s, cfg = src
  tree, _ = R.import_state_dict(s["state_dict"], cfg)
  p = tmp_path / "m.safetensors"
  R.save_safetensors(R.export_state_dict(tree, cfg), p, R.reference_config(cfg))
  back = R.load_source(p)
  cfg2 = R.config_from_reference(back["config_json"])
  assert cfg2.model.to_dict() == cfg.model.to_dict() and cfg2.moe.to_dict() == cfg.moe.to_dict()
  assert cfg2.reversible.enabled == cfg.reversible.enabled
  tree2, _ = R.import_state_dict(back["state_dict"], cfg2)
  import jax
  for a, b in zip(jax.tree_util.tree_leaves(tree), jax.tree_util.tree_leaves(tree2)):
    assert np.asarray(a).tobytes() == np.asarray(b).tobytes()


@pytest.mark.parametrize("stage", ["stage_2b", "stage_5b", "stage_9b", "stage_120b"])
def test_full_size_mapping(stage):
  """Every stage at full size: the reference's tensors cover our tree exactly (no allocation;
  the 120B's routed experts are quantized into the TQP layout, checked with jax.eval_shape)."""
  cfg = load_config(f"configs/{stage}.py")
  plan = R.check_plan(cfg)
  assert plan["entries"] > 300
  if stage == "stage_120b":
    assert cfg.tqp.enabled
    # 20 x 460 x 3 x 4096 x 1024 routed-expert parameters in the reference's dense layout
    assert plan["reference_parameters"] > 115.76e9
