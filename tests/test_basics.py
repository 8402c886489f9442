"""Shared building blocks: config validation, RMSNorm, rotary, SwiGLU, spec trees, sharding."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import stage_2b, tiny
from lightning_jax import nn, sharding
from lightning_jax.config import ConfigError, layer_kinds, validate
from lightning_jax.layers import ffn, norms, rotary


def test_layer_pattern_dddg():
  assert "".join(layer_kinds(stage_2b.get_config())) == "DDDGDDDG"


def test_bad_head_count_names_the_field():
  c = tiny.get_config()
  c.model.deltanet.n_heads = 5
  with pytest.raises(ConfigError, match="model.deltanet.n_heads"):
    validate(c)


def test_reversible_a_zero_rejected():
  c = tiny.get_config()
  c.reversible.enabled = True
  c.reversible.a = 0.0
  with pytest.raises(ConfigError, match="reversible.a"):
    validate(c)


def test_rms_norm_matches_definition():
  x = jax.random.normal(jax.random.PRNGKey(np.random.randint(1 << 30)), (3, 5, 16))
  s = jax.random.normal(jax.random.PRNGKey(1), (16,))
  ref = np.asarray(x) / np.sqrt(np.mean(np.asarray(x) ** 2, -1, keepdims=True) + 1e-6) * np.asarray(s)
  np.testing.assert_allclose(norms.rms_norm(x, s), ref, rtol=1e-5, atol=1e-6)


def test_rotary_interleaved_pairs_and_norm_preserving():
  x = jax.random.normal(jax.random.PRNGKey(np.random.randint(1 << 30)), (1, 7, 2, 8))
  cos, sin = rotary.rotary_tables(jnp.arange(7)[None], 8)
  y = rotary.apply_rotary(x, cos, sin)
  # pair i rotates (x[2i], x[2i+1]) by angle pos * base^(-2i/d)
  pos, i = 5, 1
  ang = pos * 10000.0 ** (-2 * i / 8)
  a, b = x[0, pos, 0, 2 * i], x[0, pos, 0, 2 * i + 1]
  np.testing.assert_allclose(y[0, pos, 0, 2 * i], a * np.cos(ang) - b * np.sin(ang), rtol=1e-5)
  np.testing.assert_allclose(y[0, pos, 0, 2 * i + 1], a * np.sin(ang) + b * np.cos(ang), rtol=1e-5)
  np.testing.assert_allclose(jnp.linalg.norm(y, axis=-1), jnp.linalg.norm(x, axis=-1), rtol=1e-5)


def test_swiglu_definition():
  p = nn.init(ffn.swiglu_specs(8, 16), jax.random.PRNGKey(0))
  x = jax.random.normal(jax.random.PRNGKey(2), (4, 8))
  ref = (jax.nn.silu(x @ p["gate"]) * (x @ p["up"])) @ p["down"]
  np.testing.assert_allclose(ffn.swiglu(p, x), ref, rtol=1e-5, atol=1e-6)


def test_spec_init_is_path_deterministic_and_stackable():
  specs = {"a": ffn.swiglu_specs(4, 8), "b": norms.rms_norm_specs(4)}
  p1 = nn.init(specs, jax.random.PRNGKey(0))
  p2 = nn.init({"b": specs["b"], "a": specs["a"]}, jax.random.PRNGKey(0))
  np.testing.assert_array_equal(p1["a"]["gate"], p2["a"]["gate"])
  st = nn.init(nn.stack(specs, 3), jax.random.PRNGKey(0))
  assert st["a"]["gate"].shape == (3, 4, 8)
  assert not np.allclose(st["a"]["gate"][0], st["a"]["gate"][1])
  assert nn.count(nn.abstract(specs)) == 3 * 32 + 4


def test_mesh_and_rules():
  mesh = sharding.make_mesh(tiny.get_config().mesh)
  assert mesh.shape["data"] == len(jax.devices())
  s = sharding.named(mesh, ("batch", "seq", None), (8, 16, 4))
  assert s.spec[0] == ("data", "expert")
  # a dim the axis does not divide stays replicated
  s2 = sharding.named(mesh, ("batch", None), (3, 4))
  assert s2.spec[0] is None
