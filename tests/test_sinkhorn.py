"""Sinkhorn's Pallas kernels beyond the registry (lightning_jax/ops/testing.py, which compares them
with the reference): against the rolled loop itself (the same math, the row max under
stop_gradient) for few rounds and a large eps, the unrolled rounds that Triton compiles, the
api's choices and errors, per-device runs under a mesh, and one launch each way under remat."""
import logging
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lightning_jax import remat
from lightning_jax import sharding as shd
from lightning_jax.ops import testing
from lightning_jax.ops.sinkhorn import api, kernel


def _seed():
  return int(np.random.randint(1 << 30))


def _inputs(seed, shape, scale=0.5):
  rng = np.random.default_rng(seed)
  return ((scale * rng.standard_normal(shape)).astype(np.float32),
          rng.standard_normal(shape).astype(np.float32))


def _value_and_grad(fn, x, ct):
  return jax.jit(jax.value_and_grad(lambda x: jnp.sum(fn(x) * ct)))(x), jax.jit(fn)(x)


@pytest.mark.parametrize("iters,eps", [(1, 1e-3), (3, 1e-6)])   # (3, 1e-3): the registry
def test_kernel_equals_rolled_loop_few_rounds(iters, eps):
  """Values and gradients equal the rolled loop's for 1 and 3 rounds, eps 1e-6 and 1e-3 (where
  the eps terms of the hand-written backward matter), on a ragged token count; n = 4 and 2."""
  seed = _seed()
  for shape in ((3, 45, 4, 4), (70, 2, 2)):
    x, ct = _inputs(seed, shape, scale=2.0)
    (_, g), y = _value_and_grad(lambda x: kernel.sinkhorn(x, iters, eps), x, ct)
    (_, g_r), y_r = _value_and_grad(lambda x: api.rolled(x, iters, eps), x, ct)
    msg = f"seed={seed} shape={shape} iters={iters} eps={eps}"
    assert testing.rel_err(y, y_r) <= 1e-6, msg
    assert testing.rel_err(g, g_r) <= 1e-5, msg


def _unrolled(x, iters, eps, block=32):
  """kernel.sinkhorn with the rounds unrolled as on GPU, run in the interpreter."""
  shape = x.shape
  n, tokens = shape[-1], int(np.prod(shape[:-2]))
  width = -(-tokens // block) * block
  xt = jnp.pad(x.reshape(tokens, n * n).T, ((0, 0), (0, width - tokens)))
  plan = kernel._Plan(n, iters, eps, block, 1, interpret=True, gpu_lowering=False, rolled=False)
  return kernel._sinkhorn_t(xt, plan)[:, :tokens].T.reshape(shape)


def test_unrolled_rounds_equal_rolled_loop():
  """The kernel bodies as Triton gets them (rounds unrolled, denominators kept as separate
  vectors) give the rolled loop's values and gradients (interpreted; 3 rounds: XLA's CPU compile
  of the unrolled backward grows quadratically with the rounds)."""
  seed = _seed()
  x, ct = _inputs(seed, (40, 4, 4), scale=2.0)
  (_, g), y = _value_and_grad(lambda x: _unrolled(x, 3, 1e-3), x, ct)
  (_, g_r), y_r = _value_and_grad(lambda x: api.rolled(x, 3, 1e-3), x, ct)
  assert testing.rel_err(y, y_r) <= 1e-6, f"seed={seed}"
  assert testing.rel_err(g, g_r) <= 1e-5, f"seed={seed}"


def test_rolled_loop_rounds_per_trip_do_not_change_the_result():
  """api.rolled with 5 rounds to a trip (stage_2b's setting) and 7 (not a divisor of 20, so a
  remainder trip) gives the values and gradients of 1 round a trip and of reference.py's Python
  loop; and the loop has 20 / 5 = 4 trips (the point of the option: one carry copy a trip)."""
  from lightning_jax.ops.sinkhorn import reference
  seed = _seed()
  x, ct = _inputs(seed, (3, 37, 4, 4), scale=2.0)
  (_, g1), y1 = _value_and_grad(lambda x: api.rolled(x, 20, 1e-6, 1), x, ct)
  (_, g_ref), y_ref = _value_and_grad(lambda x: reference.sinkhorn(x, 20, 1e-6), x, ct)
  assert testing.rel_err(y1, y_ref) <= 1e-6, f"seed={seed}"
  for unroll in (5, 7):
    (_, g), y = _value_and_grad(lambda x: api.rolled(x, 20, 1e-6, unroll), x, ct)
    assert testing.rel_err(y, y1) <= 1e-6, f"seed={seed} unroll={unroll}"
    assert testing.rel_err(g, g1) <= 1e-6, f"seed={seed} unroll={unroll}"
  # the reference differentiates through the row max (the op does not): see the registry note
  assert testing.rel_err(g1, g_ref) <= 1e-4, f"seed={seed}"
  hlo = jax.jit(lambda x: api.rolled(x, 20, 1e-6, 5)).lower(x).compile().as_text()
  assert re.findall(r'known_trip_count":\{"n":"(\d+)"', hlo) == ["4"], hlo[:3000]
  with pytest.raises(ValueError, match=r"unroll=0 must be a whole number of rounds >= 1"):
    api.rolled(x, 20, 1e-6, 0)


def test_bad_arguments_are_named():
  x = jnp.zeros((2, 4, 4))
  with pytest.raises(ValueError, match=r"impl='fast' must be one of \['auto', 'rolled', "):
    api.sinkhorn(x, impl="fast")
  with pytest.raises(ValueError, match=r"shape \(2, 9, 9\) must be \[\.\.\., n, n\] with "
                                       r"1 <= n <= 8"):
    kernel.sinkhorn(jnp.zeros((2, 9, 9)))
  with pytest.raises(ValueError, match=r"shape \(2, 4, 3\) must be"):
    kernel.sinkhorn(jnp.zeros((2, 4, 3)))
  with pytest.raises(ValueError, match="block=96 must be a power of two"):
    kernel.sinkhorn(x, block=96)
  with pytest.raises(ValueError, match="iters=-1 must be an integer >= 0"):
    kernel.sinkhorn(x, -1)


def test_auto_and_kernel_off_gpu_run_the_rolled_loop(caplog, monkeypatch):
  """Off GPU "auto" is the rolled loop, and "kernel" gives way to it, said once per backend."""
  if jax.default_backend() == "gpu":
    pytest.skip("the fallback exists off GPU only")
  seed = _seed()
  x, _ = _inputs(seed, (2, 5, 4, 4))
  monkeypatch.setattr(api, "_FALLBACK_LOGGED", set())
  want = api.rolled(x, 20, 1e-6)
  with caplog.at_level(logging.WARNING, logger="lightning_jax.ops"):
    for impl in ("auto", "kernel", "kernel"):
      assert bool(jnp.all(api.sinkhorn(x, 20, 1e-6, impl) == want)), f"{impl} seed={seed}"
  hits = [r for r in caplog.records if "Sinkhorn Pallas kernel" in r.getMessage()]
  assert len(hits) == 1 and "rolled loop" in hits[0].getMessage(), caplog.text


def test_kernel_per_device_under_a_mesh():
  """Under a 4-device mesh with the batch split, api.sinkhorn(impl="kernel") runs per device
  (shard_map) and equals the rolled loop, values and gradients."""
  seed = _seed()
  x, ct = _inputs(seed, (4, 9, 4, 4))
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]).reshape(1, 4, 1),
                           ("data", "expert", "tensor"))
  xs = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("expert")))
  fn = lambda x: api.sinkhorn(x, 20, 1e-6, "kernel", interpret=True)
  with shd.use_mesh(mesh):
    jaxpr = jax.make_jaxpr(fn)(xs)
    (_, g), y = _value_and_grad(fn, xs, ct)
  assert "shard_map" in str(jaxpr), jaxpr
  (_, g_r), y_r = _value_and_grad(lambda x: api.rolled(x, 20, 1e-6), x, ct)
  assert testing.rel_err(y, y_r) <= 1e-6, f"seed={seed}"
  assert testing.rel_err(g, g_r) <= 1e-5, f"seed={seed}"


def _live_pallas_calls(jaxpr, used=None):
  """pallas_calls whose results are used (JAX keeps dead ones in a jaxpr, XLA removes them):
  a remat's recomputation of the forward re-traces the custom_vjp's forward kernel although the
  backward needs only the input, as the delta rule's kernels do."""
  used = [True] * len(jaxpr.outvars) if used is None else used
  live = {v for v, u in zip(jaxpr.outvars, used) if u and type(v).__name__ != "Literal"}
  count = 0
  for e in reversed(jaxpr.eqns):
    outs = [v in live for v in e.outvars]
    if not any(outs) and not e.effects:
      continue
    count += e.primitive.name == "pallas_call"
    if e.primitive.name == "remat2":
      count += _live_pallas_calls(e.params["jaxpr"], outs)
    live.update(v for v in e.invars if type(v).__name__ != "Literal")
  return count


@pytest.mark.parametrize("mode,launches", [("none", 2), ("selective", 2), ("full", 3)])
def test_one_launch_forward_one_backward(mode, launches):
  """A step runs one forward and one backward launch, also under the selective remat policy (the
  forward kernel does not run again for the backward); "full" keeps nothing, so the forward runs
  again there (its output is needed inside the rematerialised function)."""
  x = jnp.zeros((2, 8, 4, 4))
  body = remat.wrap(lambda x: jnp.sum(jnp.sin(remat.keep(kernel.sinkhorn(x, 20, 1e-6)))), mode,
                    prevent_cse=True)
  jaxpr = jax.make_jaxpr(jax.value_and_grad(body))(x).jaxpr
  assert _live_pallas_calls(jaxpr) == launches, jaxpr
