"""Compile for a GPU that is not here: XLA:GPU's own compile, run on a host without one.

XLA can compile for a CUDA card from a description of it (a GpuTargetConfigProto: compute
capability, SM count, shared memory, memory size and bandwidth) instead of a live device. JAX
reaches that through the CUDA plugin's topology: `make_pjrt_topology("cuda", topology="1x1xN",
target_config=...)` gives N compile-only devices, and a step jitted over a mesh of them lowers and
compiles exactly as it would on the node, collectives included. Nothing runs; what comes back is
the compiled program: its memory analysis (the plan `memory_plan.fit` checks, which on the GPU
runs has matched the measured device peak), its optimized HLO (fusions, layouts, collectives) and
its cost analysis. So a CPU-only host can answer "does this fit an H100 node" with the GPU
compiler's figure instead of XLA:CPU's upper bound (launch.plan --compile_for, the one-rank
benchmark's --compile_for).

Needs the CUDA plugin installed (`pip install "jax[cuda12]"`, or on a host without a driver
`jax-cuda12-plugin[with-cuda]` and `jax-cuda12-pjrt` of jax's version); a CUDA driver is not
needed. The plugin's start-up check of the driver is skipped for this (JAX_SKIP_CUDA_CONSTRAINTS_
CHECK=1, set here before jax starts its backends; `prepare()`).

What differs from a compile on the card:
  * no autotuning: GEMM tilings and fusion choices are the compiler's defaults (structure and
    memory are what they would be; a kernel's speed is not measured);
  * sorts use XLA's fallback instead of CUB's (no scratch-size data without a device);
  * XLA's own rematerialization pass works to a memory limit taken from the module's device memory
    size. On a card the PJRT client sets that to the allocator's limit (memory x
    XLA_PYTHON_CLIENT_MEM_FRACTION); here the description's `device_memory_size` stands for it, so
    `compile_only_devices` writes the allocator limit there (see `spec_text`).
"""
from __future__ import annotations

import os

from jax._src import xla_bridge as xb   # make_pjrt_topology: no public spelling yet

from lightning_jax import memory_plan
from lightning_jax.config import ConfigError

# Per card: the values XLA reads from a live device (cudaGetDeviceProperties); the memory is
# memory_plan.KNOWN_DEVICES' (what the card's allocator sees).
CARDS = {
    "h100": {"description": "NVIDIA H100 80GB HBM3", "bandwidth": 3_352_320_000_000,
             "l2": 52_428_800, "cores": 132},
    "h200": {"description": "NVIDIA H200", "bandwidth": 4_800_000_000_000, "l2": 52_428_800,
             "cores": 132},
}


def card_of(name: str) -> str:
  key = (name or "").lower()
  if key not in CARDS:
    raise ConfigError(f"no GPU description for {name!r}; expected one of {sorted(CARDS)}.")
  return key


def spec_text(card: str, fraction: float | None = None) -> str:
  """The GpuTargetConfigProto (text format) of `card` (Hopper, sm_90), whose memory stands for
  the allocator's limit that XLA plans against on the card (its rematerialization limit): the
  card's memory x fraction (default XLA_PYTHON_CLIENT_MEM_FRACTION, else 0.75)."""
  c = CARDS[card_of(card)]
  frac = memory_plan.mem_fraction() if fraction is None else float(fraction)
  if not 0.0 < frac <= 1.0:
    raise ConfigError(f"memory fraction {frac} is not in (0, 1]; expected e.g. 0.75 or 0.95.")
  memory_bytes = memory_plan.KNOWN_DEVICES[card_of(card)] * frac
  return "\n".join([
      "gpu_device_info {",
      "  threads_per_block_limit: 1024", "  threads_per_warp: 32",
      "  shared_memory_per_block: 49152", "  shared_memory_per_core: 233472",
      "  threads_per_core_limit: 2048", f"  core_count: {c['cores']}", "  fpus_per_core: 128",
      "  block_dim_limit_x: 2147483647", "  block_dim_limit_y: 65535",
      "  block_dim_limit_z: 65535", f"  memory_bandwidth: {c['bandwidth']}",
      f"  l2_cache_size: {c['l2']}", "  clock_rate_ghz: 1.98",
      # XLA plans against 80% of a description's memory when the module names none
      f"  device_memory_size: {int(memory_bytes / 0.8)}",
      "  shared_memory_per_block_optin: 232448", "  cuda_compute_capability { major: 9 }",
      "  registers_per_core_limit: 65536", "  registers_per_block_limit: 65536",
      "}", 'platform_name: "CUDA"', f'device_description_str: "{c["description"]}"', ""])


def prepare() -> None:
  """Call before jax starts its backends: the CUDA plugin then registers without a driver."""
  os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")


def compile_only_devices(card: str, n: int = 1, fraction: float | None = None) -> list:
  """n compile-only devices of `card` (one host): build a Mesh of them and jit/lower/compile."""
  card = card_of(card)
  if n < 1:
    raise ConfigError(f"asked for {n} compile-only {card} devices; expected at least 1.")
  prepare()
  try:
    topo = xb.make_pjrt_topology("cuda", "", topology=f"1x1x{n}",
                                 target_config=spec_text(card, fraction))
  except Exception as err:  # noqa: BLE001 (plugin missing, or a jax without the topology API)
    raise ConfigError(
        f"compiling for an {card.upper()} on this host needs JAX's CUDA plugin ({type(err).__name__}"
        f": {str(err).splitlines()[0][:160]}); expected `pip install jax-cuda12-plugin[with-cuda] "
        f"jax-cuda12-pjrt` (or the cuda13 pair) at jax's version; no driver is needed.") from None
  return list(topo._make_compile_only_devices())
