"""lightning_jax/gpu_target.py: the description XLA:GPU compiles against, and its bad input.

CI has no CUDA plugin, so a compile-only device there is a one-sentence error naming the plugin;
where the plugin is installed the same call gives devices of the card (checked when present)."""
import re

import pytest

from lightning_jax import gpu_target, memory_plan
from lightning_jax.config import ConfigError


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
