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


def test_spec_init_draws_together_what_each_initializer_draws_alone(monkeypatch):
  """nn.init derives every key and draws every small random leaf in a few vmapped calls (the
  compile); each leaf must still equal its own initializer called with path_key, for plain,
  stacked and twice-stacked leaves, both distributions, a post-map, constants, an opaque
  initializer, and leaves above nn.SMALL (drawn alone). Fresh key each run."""
  monkeypatch.setattr(nn, "SMALL", 3000)        # so that a few leaves here are "big"
  opaque = lambda k, shape, dtype: jax.random.bernoulli(k, 0.5, shape).astype(dtype)
  base = {"w": nn.Spec((7, 300), (None, None), nn.normal(0.02)),
          "big": nn.Spec((50, 70), (None, None), nn.normal(2.0)),
          "u": nn.Spec((5,), (None,), nn.uniform(-0.5, 0.25), jnp.bfloat16),
          "lg": nn.Spec((1030,), (None,), nn.Draws("uniform", lo=1e-6, hi=16.0, post=jnp.log)),
          "z": nn.Spec((3, 2), (None, None), nn.zeros),
          "c": nn.Spec((4,), (None,), nn.constant(0.7)),
          "o": nn.Spec((6,), (None,), opaque)}
  specs = {"top": base, "st": nn.stack(base, 3), "st2": nn.stack(nn.stack(base, 2, "e"), 3)}
  key = jax.random.PRNGKey(int(np.random.default_rng().integers(2**31)))
  leaves = jax.tree_util.tree_flatten_with_path(specs, is_leaf=nn.is_spec)[0]
  alone = lambda k: [s.init(nn.path_key(k, nn.path_str(p)), tuple(s.shape), s.dtype)
                     for p, s in leaves]              # each initializer by itself (one compile)
  got, want = jax.jit(lambda k: (nn.init(specs, k), alone(k)))(key)
  for (path, spec), w in zip(leaves, want):
    g = got
    for p in nn.path_keys(path):
      g = g[p]
    assert g.shape == tuple(spec.shape) and g.dtype == spec.dtype, nn.path_str(path)
    np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(w, np.float32),
                                  err_msg=nn.path_str(path))
  w = np.asarray(got["st2"]["w"], np.float64)                # [3, 2, 7, 300], all independent
  assert abs(w.std() - 0.02) < 0.002 and abs(w.mean()) < 0.002
  assert len({float(w[i, j, 0, 0]) for i in range(3) for j in range(2)}) == 6
  u = np.asarray(got["st"]["lg"])
  assert np.isfinite(u).all() and u.max() < np.log(16.0) and abs(np.exp(u).mean() - 8.0) < 0.5
  np.testing.assert_array_equal(got["st2"]["c"], np.full((3, 2, 4), 0.7, np.float32))


def test_mesh_and_rules():
  mesh = sharding.make_mesh(tiny.get_config().mesh)
  assert mesh.shape["data"] == len(jax.devices())
  s = sharding.named(mesh, ("batch", "seq", None), (8, 16, 4))
  assert s.spec[0] == ("data", "expert")
  # a dim the axis does not divide stays replicated
  s2 = sharding.named(mesh, ("batch", None), (3, 4))
  assert s2.spec[0] is None
