"""Token-budget schedules, LR groups, weight-decay mask and the AdamW update against numpy."""
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lightning_jax import optim
from lightning_jax.config import ConfigError, load_config, validate

REPO = pathlib.Path(__file__).resolve().parents[1]


def _cfg(**optim_kw):
  c = load_config(str(REPO / "configs" / "tiny.py"))
  for k, v in optim_kw.items():
    setattr(c.optim, k, v)
  return c


def _ref_lr(step, steps, lr0, peak, warm, kind, ratio, stable_frac):
  end = peak / ratio
  if step < warm:
    return lr0 + (peak - lr0) * step / warm
  rest = steps - warm
  if kind == "constant":
    return peak
  if kind == "cosine":
    frac = min(max((step - warm) / rest, 0), 1)
    return end + (peak - end) * 0.5 * (1 + math.cos(math.pi * frac))
  stable = round(stable_frac * rest)
  frac = min(max((step - warm - stable) / max(rest - stable, 1), 0), 1)
  return peak + (end - peak) * frac


@pytest.mark.parametrize("kind", ["cosine", "wsd", "constant"])
def test_schedule_matches_reference(kind):
  seed = int(np.random.default_rng().integers(1 << 30))
  rng = np.random.default_rng(seed)
  steps, warm = int(rng.integers(50, 500)), int(rng.integers(1, 40))
  c = _cfg(schedule=kind, warmup_steps=warm, peak_lr=float(rng.uniform(1e-4, 1e-2)),
           start_lr=float(rng.uniform(0, 1e-5)), decay_ratio=float(rng.uniform(2, 20)),
           stable_fraction=float(rng.uniform(0.3, 0.9)))
  c.train.steps = 0
  c.train.total_tokens = steps * c.train.global_batch * c.train.seq_len + 7
  assert optim.total_steps(c) == steps
  s = optim.make_schedule(c)
  o = c.optim
  pts = [0, warm - 1, warm, steps - 1, steps] + rng.integers(0, steps, 20).tolist()
  for t in pts:
    want = _ref_lr(t, steps, o.start_lr, o.peak_lr, warm, kind, o.decay_ratio, o.stable_fraction)
    assert abs(float(s(t)) - want) <= 1e-6 * o.peak_lr, (kind, t, float(s(t)), want, seed)
  if kind != "constant":
    assert abs(float(s(steps)) - o.peak_lr / o.decay_ratio) < 1e-6 * o.peak_lr, seed
  if kind == "wsd":
    mid = warm + round(o.stable_fraction * (steps - warm)) - 1
    assert float(s(mid)) == pytest.approx(o.peak_lr, rel=1e-6), seed


def test_start_from_previous_stage_and_budget_errors():
  c = _cfg(start_from=str(REPO / "configs" / "stage_2b.py"), warmup_steps=10)
  prev = load_config(str(REPO / "configs" / "stage_2b.py"))
  assert optim.start_lr(c) == pytest.approx(prev.optim.peak_lr / prev.optim.decay_ratio)
  assert float(optim.make_schedule(c, 100)(0)) == pytest.approx(optim.start_lr(c))
  c.train.steps, c.train.total_tokens = 0, 0
  with pytest.raises(ConfigError, match=r"train.total_tokens and train.steps are both 0"):
    optim.total_steps(c)
  c = _cfg(schedule="linear")
  with pytest.raises(ConfigError, match=r"optim.schedule='linear' must be"):
    validate(c)


def _params(rng):
  f = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)
  return {"embed": {"proj": f(16, 8), "norm": {"scale": f(8)}},
          "groups": {"l0": {"moe": {"router": {"w": f(2, 8, 4), "bias": f(2, 4)},
                                    "adapters": {"a": f(2, 3, 8, 2)}},
                            "ffn_hc": {"a_pre": f(2)}}},
          "head": {"w": f(8, 16)}}


def test_labels_and_decay_mask():
  p = _params(np.random.default_rng(0))
  lab = optim.group_labels(p)
  assert lab["groups"]["l0"]["moe"]["router"]["w"] == "router"
  assert lab["groups"]["l0"]["moe"]["adapters"]["a"] == "adapters"
  assert lab["head"]["w"] == "rest" and lab["embed"]["norm"]["scale"] == "rest"
  mask = optim.decay_mask(p)
  assert mask["embed"]["proj"] and mask["head"]["w"] and mask["groups"]["l0"]["moe"]["router"]["w"]
  assert not mask["embed"]["norm"]["scale"]
  assert not mask["groups"]["l0"]["moe"]["router"]["bias"], "stacked bias [groups, E] decayed"
  assert not mask["groups"]["l0"]["ffn_hc"]["a_pre"]


def test_adamw_update_matches_numpy():
  """Clip, AdamW with bias correction, decoupled decay on matrices, LR multipliers per group."""
  seed = int(np.random.default_rng().integers(1 << 30))
  rng = np.random.default_rng(seed)
  c = _cfg(schedule="constant", warmup_steps=0, peak_lr=1e-2, weight_decay=0.1, clip_norm=1.0)
  c.tqp.enabled = True   # turns on the TQP multipliers (router x1, adapters x3, rest x0.01)
  p = _params(rng)
  tx, _ = optim.make_optimizer(c, p, steps=10)
  state = tx.init(p)
  o = c.optim
  mult = {"router": 1.0, "adapters": 3.0, "rest": 0.01}
  lab = jax.tree_util.tree_leaves(optim.group_labels(p))
  mask = jax.tree_util.tree_leaves(optim.decay_mask(p))
  ref_p = [np.asarray(x, np.float64) for x in jax.tree_util.tree_leaves(p)]
  mu = [np.zeros_like(x) for x in ref_p]
  nu = [np.zeros_like(x) for x in ref_p]
  for t in range(1, 4):
    g = jax.tree_util.tree_map(lambda x: jnp.asarray(rng.normal(size=x.shape) * 3, jnp.float32), p)
    upd, state = tx.update(g, state, p)
    p = jax.tree_util.tree_map(lambda a, b: a + b, p, upd)
    gl = [np.asarray(x, np.float64) for x in jax.tree_util.tree_leaves(g)]
    norm = math.sqrt(sum(float((x ** 2).sum()) for x in gl))
    scale = min(1.0, o.clip_norm / norm)
    for i, gi in enumerate(gl):
      gi = gi * scale
      mu[i] = o.b1 * mu[i] + (1 - o.b1) * gi
      nu[i] = o.b2 * nu[i] + (1 - o.b2) * gi * gi
      u = (mu[i] / (1 - o.b1 ** t)) / (np.sqrt(nu[i] / (1 - o.b2 ** t)) + o.eps)
      if mask[i]:
        u = u + o.weight_decay * ref_p[i]
      ref_p[i] = ref_p[i] - o.peak_lr * mult[lab[i]] * u
  for i, (a, b) in enumerate(zip(jax.tree_util.tree_leaves(p), ref_p)):
    np.testing.assert_allclose(np.asarray(a), b, rtol=1e-5, atol=1e-6,
                               err_msg=f"leaf {i} ({lab[i]}), seed {seed}")
