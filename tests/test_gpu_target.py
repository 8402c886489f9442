"""lightning_jax/gpu_target.py: the description XLA:GPU compiles against, and its bad input.

CI has no CUDA plugin, so a compile-only device there is a one-sentence error naming the plugin;
where the plugin is installed the same call gives devices of the card (checked when present)."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lightning_jax import gpu_target, memory_plan, tqp
from lightning_jax.config import ConfigError, load_config
from lightning_jax.layers import deltanet, sparse_attention
from lightning_jax.ops import pallas, testing
from lightning_jax.ops.delta_rule import api as delta_api
from lightning_jax.ops.sinkhorn import api as sinkhorn_api


def _field(text, name):
  return float(re.search(rf"{name}: ([\d.]+)", text).group(1))


@pytest.mark.parametrize("card", ["h100", "h200"])
def test_spec_plans_against_the_allocator_limit(card, monkeypatch):
  c = gpu_target.CARDS[card]
  for frac in (0.75, 0.95):
    txt = gpu_target.spec_text(card, frac)
    # XLA plans against 80% of the description's memory: that must be the allocator's limit
    mem = memory_plan.KNOWN_DEVICES[card]
    assert _field(txt, "device_memory_size") * 0.8 == pytest.approx(mem * frac, rel=1e-9)
    assert "cuda_compute_capability { major: 9 }" in txt
    assert f'device_description_str: "{c["description"]}"' in txt
    assert _field(txt, "memory_bandwidth") == c["bandwidth"]
  monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")
  assert _field(gpu_target.spec_text(card), "device_memory_size") * 0.8 == pytest.approx(
      memory_plan.KNOWN_DEVICES[card] * 0.9, rel=1e-9)


def test_bad_input_is_one_sentence():
  with pytest.raises(ConfigError, match=r"no GPU description for 'a100'; expected one of"):
    gpu_target.card_of("a100")
  with pytest.raises(ConfigError, match=r"not in \(0, 1\]"):
    gpu_target.spec_text("h100", 1.5)
  with pytest.raises(ConfigError, match="expected at least 1"):
    gpu_target.compile_only_devices("h100", 0)


def test_compile_only_devices_or_the_plugin_named():
  try:
    devs = gpu_target.compile_only_devices("h100", 2, 0.95)
  except ConfigError as err:
    assert "CUDA plugin" in str(err) and "jax-cuda12-plugin" in str(err)
    assert str(err).count(". ") == 0 and str(err).endswith(".")
    return
  assert len(devs) == 2 and all(d.device_kind == "NVIDIA H100 80GB HBM3" for d in devs)


def test_target_gpu_chooses_the_cards_code_paths_and_lowers_the_kernels():
  """Inside pallas.target_gpu() every "auto" choice is the GPU's (the compile-only plan used to
  hold this host's: the chunked XLA delta rule and gather attention, 1.7-2.8 GiB off the card's
  plan for stage_2b), the Pallas kernels lower natively for CUDA (Triton calls, not the
  interpreter), cuDNN's capability check answers for sm_90, and leaving restores this host's."""
  cfg = load_config("configs/tiny.py")
  cfg.model.deltanet.impl, cfg.model.gsa.attention, cfg.tqp.kernel = "auto", "auto", "auto"

  def choices():
    return (pallas.on_gpu(), deltanet.resolve_impl(cfg),
            sparse_attention.resolve_attention(cfg.model.gsa), tqp.base_kernel(cfg),
            pallas.interpret_default(None), pallas.compiler_params(4, 2) is not None)

  assert jax.default_backend() == "cpu"
  here = choices()
  assert here == (False, "chunked", "gather", "xla", True, False)
  args = [jnp.asarray(x) for x in testing.delta_inputs(np.random.default_rng(0), 1, 64, 2, 16,
                                                        16)[:5]]
  args[:3] = [a.astype(jnp.bfloat16) for a in args[:3]]
  rule = lambda *a: delta_api.delta_rule(*a, impl="auto")[0]
  with pallas.target_gpu():
    assert choices() == (True, "kernel", "flash", "xla_rotate", False, True)
    text = pallas.lower_for_gpu(rule, *args)
    assert text.count("__gpu$xla.gpu.triton") >= 3, text[:2000]   # the prep and the recurrence
    cudnn = pallas._cudnn        # jax's private module whose checks target_gpu answers
    assert cudnn.check_compute_capability("9.0") and not cudnn.check_compute_capability("10.0")
    mix = jnp.ones((2, 4, 4), jnp.float32)
    assert "__gpu$xla.gpu.triton" in pallas.lower_for_gpu(sinkhorn_api.sinkhorn, mix)
  assert choices() == here
  assert not cudnn.check_compute_capability("9.0")     # no GPU here: jax's own answer again
  # a fresh function: jax's trace cache does not see the switch (target_gpu's docstring)
  here_rule = lambda *a: delta_api.delta_rule(*a, impl="auto")[0]
  assert "triton" not in jax.jit(here_rule).lower(*args).as_text()
