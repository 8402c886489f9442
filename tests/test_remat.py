"""model.remat (lightning_jax.remat): the modes change what a layer keeps, never the gradients."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

# the residual list that jax.ad_checkpoint.print_saved_residuals prints (no public twin)
from jax._src.ad_checkpoint import saved_residuals
from jax.extend import core as jax_core

from configs import tiny
from lightning_jax import model, remat
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


def test_modes_give_the_same_float32_gradients():
  seed = np.random.randint(1 << 30)
  cfg = _cfg()                     # float32, with the MTP block (wrapped outside the scan)
  v = model.init_variables(cfg, jax.random.PRNGKey(seed), _words(VOCAB))
  ids = jnp.asarray(np.random.default_rng(seed).integers(0, VOCAB, (2, 66)), jnp.int32)

  def grads(mode):
    c = _cfg()
    c.model.remat = mode
    return jax.grad(lambda p: model.loss_fn(p, v["frozen"], v["stats"], {"ids": ids}, c)[0])

  # one compile for the three modes
  g_none, g_sel, g_full = jax.jit(lambda p: tuple(grads(m)(p) for m in remat.MODES))(v["params"])
  for other, name in ((g_sel, "selective"), (g_full, "full")):
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_none),
                            jax.tree_util.tree_leaves(other)):
      a, b = np.asarray(a), np.asarray(b)   # float32 rounding: sums in another order
      np.testing.assert_allclose(b, a, rtol=2e-5, atol=2e-5 * float(np.abs(a).max()) + 1e-9,
                                 err_msg=f"seed {seed}: {name} at {jax.tree_util.keystr(path)}")


def _live_count(jaxpr, prim: str) -> int:
  """Equations of primitive `prim` whose results are used (XLA drops the others, as it drops an
  unused Pallas custom call; jax's own DCE keeps every pallas_call), sub-jaxprs included."""
  live = {id(v) for v in jaxpr.outvars}
  n = 0
  for eq in reversed(jaxpr.eqns):
    if not eq.effects and not any(id(v) in live for v in eq.outvars):
      continue
    live.update(id(v) for v in eq.invars)
    n += eq.primitive.name == prim
    for sub in jax_core.jaxprs_in_params(eq.params):
      n += _live_count(sub, prim)
  return n


def test_selective_keeps_a_third_and_runs_no_kernel_twice(monkeypatch):
  """One DeltaNet layer through the Pallas kernels (traced only): "selective" saves under a third
  of what plain autodiff saves, and the backward runs the same pallas_calls as without remat (the
  kernels' residuals are named KEEP), where "full" runs the forward kernels again."""
  monkeypatch.setattr(delta_api, "falls_back", lambda *a: False)   # the kernels, interpreted
  cfg = _cfg()
  cfg.model.deltanet.impl = "kernel"
  cfg.model.dtype = "bfloat16"
  t = 256
  av = model.abstract_variables(cfg)
  gv = model._group_vars(av["params"], av["frozen"], av["stats"], cfg)[0]
  gv = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), gv)
  x = jax.ShapeDtypeStruct((2, t, cfg.model.hc.n_streams, cfg.model.d_model), jnp.bfloat16)
  consts = model.make_consts(cfg, t)

  def loss(mode):
    layer = remat.wrap(functools.partial(model.layer_apply, cfg=cfg, kind="D"), mode,
                       in_scan=False)
    return lambda gv, x: jnp.sum(layer(gv, x, consts, None)[0].astype(jnp.float32))

  saved, kernels = {}, {}
  for mode in remat.MODES:
    res = saved_residuals(loss(mode), gv, x)
    saved[mode] = sum(a.size * a.dtype.itemsize for a, src in res if "argument" not in src)
    jaxpr = jax.make_jaxpr(jax.value_and_grad(loss(mode), argnums=1))(gv, x).jaxpr
    kernels[mode] = _live_count(jaxpr, "pallas_call")
  assert saved["selective"] < saved["none"] / 3, saved
  assert saved["full"] < saved["selective"], saved
  assert kernels["selective"] == kernels["none"], kernels
  assert kernels["full"] > kernels["none"], kernels


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
