"""The Flax NNX modules (lightning_jax/modules): same trees, same axes, same computation."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import ml_collections
import pytest
from flax import nnx

from configs import tiny, tiny_120b, tiny_moe
from lightning_jax import blocks, model, nn, sharding
from lightning_jax.layers import streams
from lightning_jax.modules import (Frozen, Layer, LightningLM, MoE, SoftmaxRouter, Stat,
                                   logical_axes, named, shardings)
from lightning_jax.modules.core import to_pure_dict

VOCAB = 64


def _words(n):
  return [bytes([32 + i]) for i in range(n - 2)] + ["नम".encode(), b" the"]


def _cfg(mod):
  c = mod.get_config()
  c.model.vocab_size = VOCAB
  return c


def _same(a, b):
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def tiny_lm():
  cfg = _cfg(tiny)
  key = jax.random.PRNGKey(np.random.randint(1 << 30))
  v = model.init_variables(cfg, key, _words(VOCAB))
  return cfg, v, LightningLM.from_variables(cfg, v)


def test_modules_hold_the_three_trees_with_their_axes(tiny_lm):
  cfg, v, lm = tiny_lm
  _same(lm.variables(), v)                            # same values, same structure (empties too)
  _, params, frozen, stats = lm.split()
  for tree, want in ((params, v["params"]), (frozen, v["frozen"]), (stats, v["stats"])):
    assert nn.flatten(to_pure_dict(tree)).keys() == nn.flatten(want).keys()
  assert logical_axes(lm) == model.param_axes(cfg)    # sharding metadata = the one axes table
  assert logical_axes(lm, Frozen) == model.frozen_axes(cfg)
  kinds = named(lm)
  assert kinds["groups/l3/mixer"] == "GSA" and kinds["groups/l0/mixer"] == "DeltaNet"
  assert kinds["groups/l0/mix_hc"] == "Streams" and kinds["groups/l0/ffn"] == "SwiGLU"
  assert kinds["embed"] == "KroneckerEmbedding" and kinds["groups"] == "Stack"


def test_the_120b_shape_tree_on_abstract_values():
  """The TQP + sigmoid-router tree, built on ShapeDtypeStructs (nothing allocated)."""
  cfg = _cfg(tiny_120b)
  ab = model.abstract_variables(cfg)
  lm = LightningLM.from_variables(cfg, ab)
  _same(jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), lm.variables()),
        jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), ab))
  assert logical_axes(lm) == model.param_axes(cfg)
  kinds = named(lm)
  assert kinds["groups/l1/moe"] == "MoE" and kinds["groups/l1/moe/router"] == "SigmoidRouter"
  assert kinds["groups/l1/moe/experts"] == "TQPExperts"
  assert kinds["groups/l1/moe/adapters"] == "TQPAdapters" and kinds["mtp/layer/mixer"] == "GSA"
  assert isinstance(lm.groups.l1.moe.bias, Stat)
  assert isinstance(lm.groups.l1.moe.experts.gate.codes, Frozen)
  assert isinstance(lm.groups.l1.moe.adapters.gate.a, nnx.Param)
  # the metadata resolves to the step's shardings on an expert-parallel mesh (8 CPU devices)
  mesh = sharding.make_mesh(ml_collections.ConfigDict({"data": 2, "expert": 4, "tensor": 1}))
  got = shardings(lm, mesh)
  want = sharding.tree_shardings(mesh, model.param_axes(cfg), ab["params"])
  assert jax.tree_util.tree_all(jax.tree_util.tree_map(lambda a, b: a == b, got, want))
  assert got["groups"]["l1"]["moe"]["adapters"]["gate"]["a"].spec[1] == "expert"


def test_the_module_tree_computes_the_model(tiny_lm):
  """Composing the modules by hand (embedding, streams, each Layer of each group unstacked,
  read-out), and the Stack module, give model.forward's read-out (float32, fresh weights)."""
  cfg, v, lm = tiny_lm
  ids = jnp.asarray(np.random.default_rng().integers(0, VOCAB, (2, 16)), jnp.int32)
  graphdef, state = nnx.split(lm)

  @jax.jit
  def by_modules(state, ids):
    m = nnx.merge(graphdef, state)
    consts = model.make_consts(cfg, ids.shape[1])
    x0 = streams.expand(m.embed(ids), cfg.model.hc.n_streams)
    x = x0
    for g in range(m.groups.n_groups()):
      for j, kind in enumerate(cfg.model.pattern):
        stacked = getattr(m.groups, f"l{j}")
        one = {k: jax.tree_util.tree_map(lambda a: a[g], t) for k, t in stacked.trees().items()}
        x, _, _, _ = Layer(one, {k: {} for k in one}, m.cfg, kind=kind)(x, consts)
    xs = m.groups(x0, consts)[0]
    readout = lambda z: m.final_norm(jnp.mean(z.astype(jnp.float32), axis=-2).astype(z.dtype))
    return readout(x), readout(xs)

  @jax.jit
  def by_model(v, ids):
    return model.forward(v["params"], v["frozen"], v["stats"], ids, cfg, with_mtp=False)["h"]

  want = np.asarray(by_model(v, ids))
  by_layers, by_stack = by_modules(state, ids)
  np.testing.assert_allclose(np.asarray(by_layers), want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(by_stack), want, rtol=1e-6, atol=1e-6)


def test_blocks_are_modules_flax_can_tabulate():
  cfg = _cfg(tiny_moe)
  cfg.model.n_layers, cfg.model.pattern = 2, "DG"   # the MTP block's MoE is the one under test
  lm = LightningLM.from_variables(cfg, model.init_variables(cfg, jax.random.PRNGKey(0),
                                                            _words(VOCAB)))
  moe = lm.mtp.layer.moe                            # an unstacked MoE (the MTP block's)
  assert isinstance(moe, MoE) and isinstance(moe.router, SoftmaxRouter)
  u = jax.random.normal(jax.random.PRNGKey(1), (1, 8, cfg.model.d_model), jnp.float32)
  consts = model.make_consts(cfg, 8)
  table = nnx.tabulate(moe, u, consts, console_kwargs={"width": 240})
  assert "MoE" in table and "router" in table and "shared" in table
  y, sel, aux, st = moe(u, consts)
  want = blocks.ffn_block(cfg).apply(moe.tree("params"), None, None, u, consts, cfg)
  np.testing.assert_allclose(np.asarray(y), np.asarray(want[0]), rtol=1e-6, atol=1e-6)
  assert sel["idx"].shape == (1, 8, cfg.moe.top_k) and np.isfinite(float(aux))
