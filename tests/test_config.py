"""The config schema (lightning_jax/config/schema.py): one declaration per field (issue 19)."""
from __future__ import annotations

import glob
import pathlib

import pytest

from lightning_jax import config
from lightning_jax.config import ConfigError, from_stored, load_config, schema, validate

REPO = pathlib.Path(__file__).resolve().parents[1]


def _flat(c, pre=""):
  out = {}
  for k in c.keys():
    v = c[k]
    if hasattr(v, "keys") and pre + k != "data.pools":
      out.update(_flat(v, pre + k + "."))
    else:
      out[pre + k] = v
  return out


def test_every_stage_file_validates_and_holds_only_schema_fields():
  files = [f for f in sorted(glob.glob(str(REPO / "configs" / "*.py")))
           if not f.endswith(("common.py", "__init__.py"))]
  assert len(files) >= 8
  for f in files:
    c = validate(load_config(f))
    assert set(_flat(c)) == set(schema.BY_PATH), f


def test_docs_table_is_the_schema():
  text = (REPO / "docs" / "config.md").read_text()
  assert schema.markdown_table() in text, (
      "docs/config.md's table differs from lightning_jax/config/schema.py; regenerate it from "
      "schema.markdown_table()")


def test_one_sentence_for_unknown_wrong_type_and_out_of_range():
  c = config.base_config()
  c.model.gsa.nope = 3
  with pytest.raises(ConfigError, match=r"^config field model.gsa.nope is not in the schema .*"
                                        r"fields of that section: n_heads"):
    validate(c)
  c = config.base_config()
  c.model.embed.form = "sparse"
  with pytest.raises(ConfigError, match=r"^model.embed.form='sparse' must be one of 'table', "
                                        r"'on_the_fly'\.$"):
    validate(c)
  c = config.base_config()
  with pytest.raises(Exception):   # ml_collections refuses a str in an int field on assignment
    c.train.seq_len = "long"
  c = config.base_config()
  c.optim.b2 = 1.0
  with pytest.raises(ConfigError, match=r"^optim.b2=1.0 must be in \[0, 1\)\.$"):
    validate(c)
  c = config.base_config()
  c.moe.n_experts = 0                       # moe off: its sizes are not checked
  validate(c)
  c.moe.enabled = True
  with pytest.raises(ConfigError, match=r"^moe.n_experts=0 must be a positive integer"):
    validate(c)
  c = config.base_config()
  c.data.pools.D1.wieght = 0.3
  with pytest.raises(ConfigError, match=r"data.pools.D1.wieght is not a pool field"):
    validate(c)


def test_documented_knobs_exist_and_the_stale_one_is_gone():
  c = config.base_config()
  assert c.model.mtp.include_aux is False and c.tqp.allow_pad is True
  assert "impl" not in c.model.gsa


def test_a_stored_config_of_an_older_version_is_completed():
  old = config.base_config().to_dict()
  del old["model"]["mtp"]["include_aux"], old["tqp"]["allow_pad"], old["moe"]["expert_pad"]
  del old["data"]["pools"]["D1"]["val_shards"], old["phase"]
  old["model"]["gsa"]["impl"] = "xla"       # retired
  old["mesh"]["expert"] = 8
  c = from_stored(old)
  validate(c)
  assert c.model.mtp.include_aux is False and c.tqp.allow_pad is True
  assert c.moe.expert_pad == 8              # the layout the old run was built with
  assert c.data.pools.D1.val_shards == "" and c.phase == ""
  assert "impl" not in c.model.gsa


def test_resume_view_holds_fixed_fields_only():
  a = config.base_config()
  b = config.base_config()
  b.model.deltanet.impl = "recurrent"       # an implementation: free
  b.optim.peak_lr = 5e-4
  b.data.pools.D1.weight = 0.30             # pool weights may change between stages
  b.mesh.data = 2
  assert config.resume_view(a) == config.resume_view(b)
  b.model.d_model = 512                     # the architecture: fixed
  b.data.pools.D1.domains = "en"
  va, vb = config.resume_view(a), config.resume_view(b)
  assert {k for k in va if va[k] != vb[k]} == {"model.d_model", "data.pools.D1.domains"}


def test_streams_kernel_backward_needs_the_state_reading_projections():
  c = config.base_config()
  c.model.hc.pre, c.model.compat = "kernel", "reference_cuda"
  with pytest.raises(ConfigError, match=r"^model.hc.pre='kernel' needs the projections that "
                     r"read the state, .*'fused' with it\.$"):
    validate(c)
  c.model.compat = "spec"
  validate(c)


def test_unrolled_layers_need_the_plain_stack():
  c = config.base_config()
  c.model.unroll_layers, c.reversible.enabled = True, True
  with pytest.raises(ConfigError, match=r"^model.unroll_layers=True unrolls the plain layer "
                     r"stack, .*with a reversible stack\.$"):
    validate(c)
  c.reversible.enabled = False
  validate(c)


def test_expert_layout_is_a_model_field_kept_across_meshes():
  c = load_config(str(REPO / "configs" / "tiny_120b.py"))
  c.mesh.expert = 4
  stored = from_stored(c.to_dict())         # the run was created on 4-way expert parallelism
  assert config.expert_slots(stored, c.moe.n_experts) % 4 == 0
  now = load_config(str(REPO / "configs" / "tiny_120b.py"))
  now.mesh.expert = 2
  note = config.adopt_stored_layout(now, stored)
  assert now.moe.expert_pad == 4 and "expert-parallel width of 4" in note
  assert config.expert_slots(now, now.moe.n_experts) == config.expert_slots(stored,
                                                                            c.moe.n_experts)
  assert config.resume_view(now) == config.resume_view(stored)
  validate(now)
  now.mesh.expert = 8                       # 8 does not divide a layout built for 4
  with pytest.raises(ConfigError, match=r"which mesh.expert=8 does not divide"):
    validate(now)
