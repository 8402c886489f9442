"""LightningLM assembly: overfitting a batch, T=8192 forward, chunked CE, input checks, stats."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import tiny
from lightning_jax import model
from lightning_jax.config import ConfigError
from lightning_jax.ops.head_ce import api as ce_api

VOCAB = 64


def _cfg(vocab=VOCAB):
  c = tiny.get_config()
  c.model.vocab_size = vocab
  return c


def _words(n):
  # a small byte-level vocabulary: single bytes, a few multi-byte tokens, one special token
  out = [bytes([32 + i]) for i in range(n - 4)] + ["नम".encode(), b" the", b"<|endoftext|>", b""]
  return out[:n]


def _seed():
  return np.random.randint(1 << 30)


def test_tiny_overfits_one_batch():
  seed = _seed()
  cfg = _cfg()
  cfg.model.mtp.enabled = False   # keeps the compile small; the MTP path is trained in the MoE test
  cfg.model.n_layers, cfg.model.pattern = 2, "DG"    # one layer of each kind: half the compile
  v = model.init_variables(cfg, jax.random.PRNGKey(seed), _words(VOCAB))
  ids = jnp.asarray(np.random.default_rng(seed).integers(0, VOCAB, (2, 18)), jnp.int32)
  batch = {"ids": ids}
  opt = optax.adamw(3e-3, b1=0.9, b2=0.95, eps=1e-10, weight_decay=0.0)
  state = opt.init(v["params"])
  frozen, stats = v["frozen"], v["stats"]

  @jax.jit
  def step(params, state, stats):
    (total, met), g = jax.value_and_grad(model.loss_fn, has_aux=True)(params, frozen, stats,
                                                                       batch, cfg)
    upd, state = opt.update(g, state, params)
    stats = model.update_stats(cfg, stats, met["step_stats"])
    return optax.apply_updates(params, upd), state, stats, met["loss"]

  params = v["params"]
  losses = []
  for _ in range(100):
    params, state, stats, loss = step(params, state, stats)
    losses.append(float(loss))
  assert np.all(np.isfinite(losses)), f"seed {seed}: {losses}"
  assert abs(losses[0] - np.log(VOCAB)) < 1.0, f"seed {seed}: first loss {losses[0]}"
  assert losses[-1] < 0.5 * losses[0], f"seed {seed}: {losses[0]:.3f} -> {losses[-1]:.3f}"
  # the GSA variance EMA (a non-trained statistic) moved with the steps
  assert not np.allclose(np.asarray(stats["groups"]["l1"]["mixer"]["var_ema"]),    # l1: GSA
                         np.asarray(v["stats"]["groups"]["l1"]["mixer"]["var_ema"]))


def test_forward_t8192_tiny_width():
  cfg = _cfg()
  cfg.model.mtp.enabled = False   # the backbone at T=8192; the MTP block is one more GSA layer
  t = 8192
  v = model.init_variables(cfg, jax.random.PRNGKey(_seed()), _words(VOCAB))
  ids = jnp.asarray(np.random.default_rng(0).integers(0, VOCAB, (1, t + 2)), jnp.int32)
  total, met = jax.jit(lambda p, f, s, b: model.loss_fn(p, f, s, b, cfg))(
      v["params"], v["frozen"], v["stats"], {"ids": ids})
  assert np.isfinite(float(total)) and abs(float(met["loss"]) - np.log(VOCAB)) < 1.0


def test_ce_never_holds_full_logits():
  cfg = _cfg(vocab=4096)
  h = jax.ShapeDtypeStruct((2, 1024, 64), jnp.float32)
  w = jax.ShapeDtypeStruct((64, 4096), jnp.float32)
  tg = jax.ShapeDtypeStruct((2, 1024), jnp.int32)
  for name, loss in (
      ("recompute", lambda h, w, t: ce_api.chunked_cross_entropy(h, w, t, cfg.model.ce_chunk)),
      ("fused", lambda h, w, t: ce_api.fused_cross_entropy_loss([h], w, [t],
                                                                cfg.model.ce_chunk)[0])):
    text = jax.jit(jax.grad(loss, (0, 1))).lower(h, w, tg).as_text()
    assert "2x1024x4096" not in text.replace(",", "x"), \
        f"{name}: full [B, T, V] logits appear in the graph"


def test_bad_input_names_the_field():
  cfg = _cfg()
  args = (None, None, None)   # the batch is checked before any variable is touched
  too_long = jnp.zeros((1, cfg.model.max_seq_len + 3), jnp.int32)
  with pytest.raises(model.InputError, match="model.max_seq_len"):
    model.loss_fn(*args, {"ids": too_long}, cfg)
  bad = jnp.full((1, 10), VOCAB, jnp.int32)
  with pytest.raises(model.InputError, match="model.vocab_size"):
    model.loss_fn(*args, {"ids": bad}, cfg)
  with pytest.raises(model.InputError, match="token id -1"):
    model.check_batch({"ids": jnp.full((1, 10), -1, jnp.int32)}, cfg)
  c2 = _cfg()
  c2.model.gsa.n_heads = 3
  with pytest.raises(ConfigError, match="model.gsa.n_heads"):
    model.init_variables(c2, jax.random.PRNGKey(0), _words(VOCAB))
  with pytest.raises(ConfigError, match="model.vocab_size"):
    model.init_variables(cfg, jax.random.PRNGKey(0), _words(VOCAB) + [b"z"])


def test_parameter_tree_layout():
  cfg = _cfg()
  a = model.abstract_variables(cfg)
  p = a["params"]
  d, ng = cfg.model.d_model, cfg.model.n_layers // 4
  assert set(p) == {"embed", "groups", "final_norm", "head", "mtp"}
  assert p["embed"]["proj"].shape == (8192, d)
  assert p["head"]["w"].shape == (d, VOCAB)
  assert p["mtp"]["in_proj"].shape == (2 * d, d)
  assert set(p["groups"]) == {"l0", "l1", "l2", "l3"}
  for j in range(4):
    g = p["groups"][f"l{j}"]
    assert set(g) == {"mix_hc", "mixer", "ffn_hc", "ffn"}
    assert g["ffn"]["gate"].shape == (ng, d, cfg.model.ffn_width)
  assert "idx_q" in p["groups"]["l3"]["mixer"] and "A_log" in p["groups"]["l0"]["mixer"]
  assert set(a["stats"]["groups"]["l3"]) == {"mixer"} and not a["stats"]["groups"]["l0"]
  assert cfg.model.embed.form == "on_the_fly"
  assert a["frozen"]["embed"]["bytes"].shape == (VOCAB, 32)
  cfg.model.embed.form = "table"
  assert model.abstract_variables(cfg)["frozen"]["embed"]["table"].shape == (VOCAB, 8192)


def test_moe_reversible_model_trains_and_updates_stats():
  seed = _seed()
  cfg = _cfg()
  cfg.moe.enabled = True
  cfg.moe.router = "sigmoid"
  cfg.moe.n_experts, cfg.moe.mtp_n_experts, cfg.moe.top_k = 4, 4, 2
  cfg.moe.bias_gamma = 1e-2
  cfg.moe.dispatch, cfg.moe.group_pad = "capacity", 8   # one dispatch round: a smaller compile
  cfg.reversible.enabled = True
  cfg.model.n_layers, cfg.model.pattern = 2, "DG"    # one layer of each kind: half the compile
  v = model.init_variables(cfg, jax.random.PRNGKey(seed), _words(VOCAB))
  assert set(v["params"]["groups"]["l0"]) == {"mix_hc", "mixer", "ffn_hc", "moe"}
  assert v["params"]["mtp"]["layer"]["moe"]["router"]["w"].shape[-1] == 4
  batch = {"ids": jnp.asarray(np.random.default_rng(seed).integers(0, VOCAB, (2, 18)), jnp.int32)}

  @jax.jit
  def step(params, stats):
    (total, met), g = jax.value_and_grad(model.loss_fn, has_aux=True)(params, v["frozen"], stats,
                                                                       batch, cfg)
    return total, met, g, model.update_stats(cfg, stats, met["step_stats"])

  total, met, g, new_stats = step(v["params"], v["stats"])
  assert np.isfinite(float(total)), f"seed {seed}"
  gl = jax.tree_util.tree_leaves(g)
  assert all(np.all(np.isfinite(np.asarray(x))) for x in gl), f"seed {seed}"
  assert float(jnp.abs(g["groups"]["l1"]["moe"]["experts"]["up"]).sum()) > 0
  assert float(jnp.abs(g["groups"]["l1"]["mixer"]["q"]).sum()) > 0     # l1: GSA
  assert float(jnp.abs(g["mtp"]["layer"]["moe"]["shared"]["down"]).sum()) > 0
  bias0 = np.asarray(v["stats"]["groups"]["l0"]["moe"]["bias"])
  bias1 = np.asarray(new_stats["groups"]["l0"]["moe"]["bias"])
  assert bias1.shape == (1, 4) and not np.allclose(bias0, bias1), f"seed {seed}"
  assert "moe" in new_stats["mtp"]["layer"] and "mixer" in new_stats["mtp"]["layer"]


def test_fused_and_recompute_heads_agree_in_loss_and_gradients():
  """model.ce_impl fused (the gradient of both head passes computed in the forward) against
  recompute (the plain chunked CE's backward), float32, with the MTP pass weighted 0.3 and
  chunks that do not divide the sequence: the same total, metrics and gradients."""
  seed = _seed()
  cfg = _cfg()
  cfg.model.n_layers, cfg.model.pattern = 2, "DG"     # the head is what differs: a short stack
  cfg.model.dtype = "float32"
  cfg.model.mtp.weight = 0.3
  cfg.model.ce_chunk = 20
  v = model.init_variables(cfg, jax.random.PRNGKey(seed), _words(VOCAB))
  ids = jnp.asarray(np.random.default_rng(seed).integers(0, VOCAB, (2, 18)), jnp.int32)

  def value_and_grad(impl):
    c = cfg.copy_and_resolve_references()
    c.model.ce_impl = impl
    (total, met), g = jax.value_and_grad(
        lambda p: model.loss_fn(p, v["frozen"], v["stats"], {"ids": ids}, c),
        has_aux=True)(v["params"])
    return jnp.stack([total, met["loss"], met["ce_mtp"]]), g

  (a, ga), (b, gb) = jax.jit(lambda: (value_and_grad("fused"), value_and_grad("recompute")))()
  np.testing.assert_allclose(a, b, rtol=1e-6, err_msg=f"seed {seed}")
  assert abs(float(a[2] - a[1])) > 1e-4, f"seed {seed}: the two passes' CEs coincide: {a}"
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(ga), jax.tree_util.tree_leaves(gb)):
    scale = float(np.max(np.abs(np.asarray(y)))) or 1.0
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6 * scale,
                               err_msg=f"seed {seed}: {jax.tree_util.keystr(path)}")
