"""model.remat (lightning_jax.remat): the modes change what a layer keeps, never the gradients."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import residuals as benchmarks_residuals
from configs import tiny
from lightning_jax import model, remat
from lightning_jax.layers import moe
from lightning_jax.config import ConfigError, validate
from lightning_jax.config.schema import complete
from lightning_jax.ops.delta_rule import api as delta_api

VOCAB = 64


def _cfg():
  c = tiny.get_config()
  c.model.vocab_size = VOCAB
  c.model.n_layers = 2
  c.model.pattern = "DG"
  return c


def _words(n):
  return [bytes([32 + i]) for i in range(n - 1)] + [b"<|endoftext|>"]


def test_selective_gives_the_same_float32_gradients():
  seed = np.random.randint(1 << 30)
  cfg = _cfg()                     # float32, with the MTP block (wrapped outside the scan)
  v = model.init_variables(cfg, jax.random.PRNGKey(seed), _words(VOCAB))
  ids = jnp.asarray(np.random.default_rng(seed).integers(0, VOCAB, (2, 66)), jnp.int32)

  def grads(mode):
    c = _cfg()
    c.model.remat = mode
    return jax.grad(lambda p: model.loss_fn(p, v["frozen"], v["stats"], {"ids": ids}, c)[0])

  # one compile for both modes ("full" is jax.checkpoint saving nothing: its values are jax's
  # own remat; its behaviour is checked by the trace below)
  g_none, g_sel = jax.jit(lambda p: (grads("none")(p), grads("selective")(p)))(v["params"])
  _assert_close(g_none, g_sel, f"seed {seed}: selective")


def test_selective_inside_the_reversible_rebuild_gives_the_same_gradients():
  seed = np.random.randint(1 << 30)
  cfg = _cfg()
  cfg.model.mtp.enabled = False
  cfg.reversible.enabled = True
  v = model.init_variables(cfg, jax.random.PRNGKey(seed), _words(VOCAB))
  ids = jnp.asarray(np.random.default_rng(seed).integers(0, VOCAB, (2, 34)), jnp.int32)

  def grads(mode, pre="autodiff"):
    c = cfg.copy_and_resolve_references()
    c.model.remat = mode
    c.model.hc.pre = pre
    return jax.grad(lambda p: model.loss_fn(p, v["frozen"], v["stats"], {"ids": ids}, c)[0])

  # with model.hc.pre=kernel too: the streams as a pair of custom VJPs with a private cotangent
  # contract (layers/streams._paired) inside the per-layer rebuild
  g_none, g_sel, g_kern = jax.jit(lambda p: (grads("none")(p), grads("selective")(p),
                                             grads("selective", "kernel")(p)))(v["params"])
  _assert_close(g_none, g_sel, f"seed {seed}: reversible selective")
  _assert_close(g_none, g_kern, f"seed {seed}: reversible selective, hc.pre=kernel")


def _assert_close(want, got, what):
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(want),
                          jax.tree_util.tree_leaves(got)):
    a, b = np.asarray(a), np.asarray(b)   # float32 rounding: sums in another order
    np.testing.assert_allclose(b, a, rtol=2e-5, atol=2e-5 * float(np.abs(a).max()) + 1e-9,
                               err_msg=f"{what} at {jax.tree_util.keystr(path)}")


def _layer(cfg, kind, mode):
  return benchmarks_residuals.layer_report(cfg, kind, 2, 256, mode)


def test_selective_keeps_a_third_and_runs_no_kernel_twice(monkeypatch):
  """One DeltaNet layer through the Pallas kernels (traced only): "selective" saves under a third
  of what plain autodiff saves, with the same live matmul FLOPs and the same pallas_calls (the
  kernels' residuals are named KEEP), where "full" runs the forward again."""
  monkeypatch.setattr(delta_api, "falls_back", lambda *a: False)   # the kernels, interpreted
  cfg = _cfg()
  cfg.model.deltanet.impl = "kernel"
  cfg.model.dtype = "bfloat16"
  r = {mode: _layer(cfg, "D", mode) for mode in remat.MODES}
  assert r["selective"]["residual_gb"] < r["none"]["residual_gb"] / 3, r
  assert r["full"]["residual_gb"] < r["selective"]["residual_gb"], r
  assert r["selective"]["pallas_calls"] == r["none"]["pallas_calls"], r
  # (the streams' small batched einsums are recomputed: 1% at this width, 0.03% at stage_2b's)
  assert r["selective"]["dot_gflop"] == pytest.approx(r["none"]["dot_gflop"], rel=0.02), r
  assert r["full"]["pallas_calls"] > r["none"]["pallas_calls"], r
  assert r["full"]["dot_gflop"] > 1.2 * r["none"]["dot_gflop"], r


def test_selective_moe_tqp_layer_runs_no_expert_matmul_twice(monkeypatch):
  """The 120B's layer shape (tiny_120b: routed TQP experts, overflow rounds, MTP off): the
  expert matmuls batch over experts (not kept by the matmul policy), so they are named KEEP;
  "selective" must neither run the dequantising base matmul again nor the overflow rounds."""
  from configs import tiny_120b
  monkeypatch.setattr(delta_api, "falls_back", lambda *a: False)
  cfg = tiny_120b.get_config()
  cfg.model.deltanet.impl = "kernel"
  cfg.model.vocab_size = VOCAB
  cfg.model.dtype = "bfloat16"
  r = {mode: _layer(cfg, "D", mode) for mode in ("none", "selective")}
  assert r["selective"]["residual_gb"] < r["none"]["residual_gb"] / 2, r
  assert r["selective"]["dot_gflop"] < 1.05 * r["none"]["dot_gflop"], r
  # inside a reversible rebuild "selective" also keeps the first round's gathered expert rows
  # (named KEEP_REBUILD): exactly their bytes more, and the dispatch gather not run again
  rb = benchmarks_residuals.layer_report(cfg, "D", 2, 256, "selective", rebuild=True)
  e_tot = moe.padded_experts(cfg, cfg.moe.n_experts)
  rows = e_tot * moe.capacities(cfg, 2 * 256, e_tot)[0]
  grown = (rb["residual_gb"] - r["selective"]["residual_gb"]) * 1e9
  assert grown == pytest.approx(rows * cfg.model.d_model * 2, rel=1e-6), (rb, r)
  assert rb["gathers"] == r["selective"]["gathers"] - 1, (rb, r)
  assert rb["dot_gflop"] == r["selective"]["dot_gflop"], (rb, r)


def test_remat_config_values():
  cfg = _cfg()
  cfg.model.remat = "sometimes"
  with pytest.raises(ConfigError, match="model.remat='sometimes' must be one of"):
    validate(cfg)
  with pytest.raises(ValueError, match="must be one of"):
    remat.policy("sometimes")
  for old, new in ((True, "full"), (False, "none")):   # a stored config from before the modes
    stored = _cfg()
    del stored.model["remat"]
    stored.model.remat = old
    assert "model.remat" in complete(stored) and stored.model.remat == new
    validate(stored)


def test_residuals_benchmark_records_every_layer_kind_and_the_step(tmp_path):
  out = tmp_path / "r.json"
  rep = benchmarks_residuals.main(["--config", "configs/tiny.py", "--seq", "128", "--modes",
                                   "none,selective", "--json", str(out)])
  assert json.loads(out.read_text())["command"].endswith(str(out))
  assert set(rep["layers"]) == {"D", "G"} and set(rep["step"]) == {"none", "selective"}
  for kind in ("D", "G"):
    none, sel = rep["layers"][kind]["none"], rep["layers"][kind]["selective"]
    assert 0 < sel["residual_gb"] < none["residual_gb"] and none["dot_gflop"] > 0
  assert rep["step"]["selective"]["residual_gb"] < rep["step"]["none"]["residual_gb"]


def test_unrolled_layer_scan_gives_the_same_float32_loss_and_gradients():
  """model.unroll_layers: the layer groups' scan as straight-line code changes no number."""
  seed = np.random.randint(1 << 30)
  cfg = _cfg()
  cfg.model.pattern = "D"          # two groups of one layer: the unrolled stack has two bodies
  v = model.init_variables(cfg, jax.random.PRNGKey(seed), _words(VOCAB))
  ids = jnp.asarray(np.random.default_rng(seed).integers(0, VOCAB, (1, 34)), jnp.int32)

  def loss_and_grads(unroll):
    c = _cfg()
    c.model.pattern = "D"
    c.model.unroll_layers = unroll
    return jax.value_and_grad(
        lambda p: model.loss_fn(p, v["frozen"], v["stats"], {"ids": ids}, c)[0])

  (l_scan, g_scan), (l_unr, g_unr) = jax.jit(
      lambda p: (loss_and_grads(False)(p), loss_and_grads(True)(p)))(v["params"])
  np.testing.assert_allclose(float(l_unr), float(l_scan), rtol=1e-6, err_msg=f"seed {seed}")
  _assert_close(g_scan, g_unr, f"seed {seed}: unrolled")
