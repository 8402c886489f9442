"""Does the training step fit the device? The compiled step's own memory plan, before it runs.

The plan of a step is XLA's compiled memory analysis of that step, per device:
    arguments + outputs - aliased (the donated state) + temporaries
compiled by the backend that will run it (on a GPU host, the GPU compile; launch.plan run on a
CPU host gives XLA:CPU's figure, an upper bound: XLA:CPU computes bf16 dots in float32).

The capacity is what the device's allocator may hand out: on GPU `memory_stats()["bytes_limit"]`
(the card's memory x XLA_PYTHON_CLIENT_MEM_FRACTION, 0.75 by default), or `train.device_memory_gb`
when set (also how a plan for another card is made: launch.plan --device h100|h200), less
`train.memory_headroom` (allocator fragmentation and the runtime's own buffers).

`train.fit_memory` says what happens when the configured micro-batch does not fit:
  check  refuse in one sentence that names the largest micro-batch that fits (the default)
  auto   train with the largest micro-batch <= train.micro_batch that fits (gradient
         accumulation makes up the global batch) and say so; when not even micro-batch 1 fits,
         search again with the next lever of `lighter` and say so: model.remat=selective, then
         (a reversible stack in store_layers mode) reversible.mode=store_boundaries, then
         (store_boundaries) reversible.mode=invert (each layer's input
         rebuilt from its output instead of stored: about 12 GB less on a 120B rank, and 37%
         slower, docs/PERFORMANCE.md), then (a plain stack) model.remat=full
  off    no plan: compile and run as configured
Micro-batches are the divisors of global_batch / batch shards; the search compiles the step at
the candidates a binary search visits (the plan grows with the micro-batch), keeping the
compiled step that is used, so a configuration that fits costs no extra compile.
`fit` returns the config it chose (a copy when it pulled a lever): the caller trains, saves and
logs that one.
"""
from __future__ import annotations

import os
from typing import Callable

from lightning_jax import remat, reversible
from lightning_jax.config import ConfigError

GB = 1e9
# memory by device kind as its allocator sees it, for plans made for a card that is not here
# (launch.plan --device, gpu_target): bytes_limit / XLA_PYTHON_CLIENT_MEM_FRACTION as measured on
# the cards (H100 80GB HBM3: 80.77 GB at 0.95; H200: 142.61 GB at 0.95). The marketing sizes
# (80 GB, 141 GB) understate an H100 by 6%: the same step then plans against 80.7 GB, not 76.
KNOWN_DEVICES = {"h100": 85.02e9, "h200": 150.11e9}
DEFAULT_FRACTION = 0.75            # XLA_PYTHON_CLIENT_MEM_FRACTION's default on GPU
FIT_MODES = ("check", "auto", "off")


def plan_bytes(compiled) -> dict:
  """Per-device bytes of a compiled step from XLA's memory analysis."""
  ma = compiled.memory_analysis()
  if ma is None:
    return {}
  arg, out = float(ma.argument_size_in_bytes), float(ma.output_size_in_bytes)
  alias, temp = float(ma.alias_size_in_bytes), float(ma.temp_size_in_bytes)
  return {"arguments": arg, "outputs": out, "aliased": alias, "temporaries": temp,
          "total": arg + out - alias + temp}


def mem_fraction(env=None) -> float:
  env = os.environ if env is None else env
  raw = env.get("XLA_PYTHON_CLIENT_MEM_FRACTION", "")
  if not raw:
    return DEFAULT_FRACTION
  try:
    f = float(raw)
  except ValueError:
    f = -1.0
  if not 0.0 < f <= 1.0:
    raise ConfigError(f"XLA_PYTHON_CLIENT_MEM_FRACTION={raw!r} is not a fraction in (0, 1]; "
                      "expected e.g. 0.75 (the default) or 0.95.")
  return f


def device_capacity(devices, device_memory_gb: float = 0.0, device: str = "",
                    fraction: float | None = None) -> tuple[float | None, str]:
  """(bytes the step may use per device or None when unknown, how it was found)."""
  if device:
    name = device.lower()
    if name not in KNOWN_DEVICES:
      raise ConfigError(f"device {device!r} is not one the memory plan knows; expected one of "
                        f"{sorted(KNOWN_DEVICES)} (or train.device_memory_gb=<GB>).")
    frac = mem_fraction() if fraction is None else fraction
    if not 0.0 < frac <= 1.0:
      raise ConfigError(f"memory fraction {frac} is not in (0, 1]; expected e.g. 0.75 or 0.95.")
    return KNOWN_DEVICES[name] * frac, f"{name} {KNOWN_DEVICES[name] / GB:.2f} GB x {frac}"
  if device_memory_gb and device_memory_gb > 0:
    return float(device_memory_gb) * GB, f"train.device_memory_gb={device_memory_gb}"
  d = list(devices)[0]
  try:
    st = d.memory_stats() or {}
  except Exception:  # noqa: BLE001 (CPU and other backends without allocator stats)
    st = {}
  if "bytes_limit" in st:
    return float(st["bytes_limit"]), (f"{d.device_kind} allocator limit "
                                      f"(XLA_PYTHON_CLIENT_MEM_FRACTION={mem_fraction()})")
  return None, f"{d.device_kind}: no allocator limit known (no memory check)"


def candidates(global_batch: int, n_batch: int, micro_batch: int) -> list[int]:
  """Micro-batches (sequences per device per forward) that split the global batch evenly,
  largest first, none above the configured one (0 = the whole per-device batch)."""
  per_dev = global_batch // n_batch
  top = per_dev if micro_batch <= 0 else min(micro_batch, per_dev)
  return [m for m in range(top, 0, -1) if per_dev % m == 0]


class NoFit(ConfigError):
  """Not even micro-batch 1 fits the device; .plans lists the plans tried."""

  def __init__(self, msg: str, plans: str):
    super().__init__(msg)
    self.plans = plans


def lighter(cfg):
  """(config, what changed) for the next choice with less activation memory that the config
  leaves, or None. In order of time cost: model.remat none -> selective (a layer's elementwise
  work recomputed in its backward), a reversible stack's store_layers -> store_boundaries (each
  layer's forward run again in the backward, keeping one state per layer), store_boundaries ->
  invert (each layer's input rebuilt from its output: 37% slower on a 120B rank,
  docs/PERFORMANCE.md), a plain stack's model.remat selective -> full (every layer's forward run
  twice). All are free on resume; the config returned is a copy."""
  r = cfg.reversible
  rm = remat.mode_of(cfg.model.remat)
  alt = cfg.copy_and_resolve_references()
  if rm == "none":
    alt.model.remat = "selective"
    return alt, "model.remat=selective (matmul outputs and kernel residuals kept, the elementwise " \
                "work recomputed in the backward)"
  if r.enabled and r.mode == "store_layers":
    alt.reversible.mode = "store_boundaries"
    return alt, "reversible.mode=store_boundaries (each layer's forward run again in the " \
                "backward instead of its activations kept)"
  if r.enabled and r.mode == "store_boundaries" and reversible.dyadic(float(r.a)) is not None:
    alt.reversible.mode = "invert"
    return alt, "reversible.mode=invert (each layer's input rebuilt from its output instead of " \
                "stored)"
  if not r.enabled and rm == "selective":
    alt.model.remat = "full"
    return alt, "model.remat=full (each layer's forward run again in the backward)"
  return None


def fit(cfg, n_batch: int, compile_at: Callable[[object, int], object], capacity: float | None,
        capacity_note: str, log=print) -> tuple[int, object, dict, object]:
  """(accumulation steps, compiled step, plan, config) for the largest fitting micro-batch
  allowed; the config is cfg, or under train.fit_memory=auto a copy with the levers of `lighter`
  applied one by one while not even micro-batch 1 fits.

  compile_at(cfg, accum) -> the compiled step of cfg with that many micro-batches per global
  batch."""
  cur = cfg
  while True:
    try:
      return _fit(cur, n_batch, compile_at, capacity, capacity_note, log) + (cur,)
    except NoFit as err:
      nxt = lighter(cur) if cfg.train.fit_memory == "auto" else None
      if nxt is None:
        raise
      cur, what = nxt
      log(f"memory plan: the step does not fit at micro-batch 1 (plans tried: {err.plans}); "
          f"trying {what}")


def _fit(cfg, n_batch, compile_at, capacity, capacity_note, log):
  t = cfg.train
  mode = t.fit_memory
  if mode not in FIT_MODES:
    raise ConfigError(f"train.fit_memory={mode!r} is not one of {FIT_MODES}.")
  cands = candidates(t.global_batch, n_batch, t.micro_batch)
  per_dev = t.global_batch // n_batch
  accum_of = lambda mb: per_dev // mb
  usable = None if capacity is None else capacity - float(t.memory_headroom_gb) * GB
  first = cands[0]
  compiled = compile_at(cfg, accum_of(first))
  plan = plan_bytes(compiled)
  if mode == "off" or usable is None or not plan or plan["total"] <= usable:
    if plan and usable is not None:
      log(f"memory plan: micro-batch {first}/device needs {plan['total'] / GB:.2f} GB per device "
          f"of {usable / GB:.2f} GB usable ({capacity_note}, headroom {t.memory_headroom_gb} GB)")
    return accum_of(first), compiled, plan
  plans = {first: plan["total"]}
  best, best_compiled, best_plan = None, None, None
  lo, hi = 1, len(cands) - 1          # binary search for the first (largest) candidate that fits
  while lo <= hi:
    mid = (lo + hi) // 2
    c = compile_at(cfg, accum_of(cands[mid]))
    p = plan_bytes(c)
    plans[cands[mid]] = p["total"]
    if p["total"] <= usable:
      best, best_compiled, best_plan = cands[mid], c, p
      hi = mid - 1
    else:
      lo = mid + 1
  tried = ", ".join(f"{k}: {v / GB:.2f} GB" for k, v in sorted(plans.items(), reverse=True))
  if best is None:
    levers, nxt = [], lighter(cfg)
    while nxt is not None:
      levers.append(nxt[1].split(" (")[0])
      nxt = lighter(nxt[0])
    choices = ["a smaller model share per device (mesh.expert)", "a shorter train.seq_len"] + levers
    raise NoFit(
        f"the training step does not fit the device even at micro-batch 1: it needs "
        f"{plans[cands[-1]] / GB:.2f} GB per device against {usable / GB:.2f} GB usable "
        f"({capacity_note}); expected {', '.join(choices[:-1])} or {choices[-1]}. Plans tried: "
        f"{tried}.", tried)
  if mode == "check":
    raise ConfigError(
        f"train.micro_batch={t.micro_batch} needs {plans[first] / GB:.2f} GB per device but "
        f"{usable / GB:.2f} GB is usable ({capacity_note}); the largest micro-batch that fits is "
        f"{best} (--config.train.micro_batch={best}, or train.fit_memory=auto to choose it).")
  log(f"memory plan: micro-batch {first}/device needs {plans[first] / GB:.2f} GB > "
      f"{usable / GB:.2f} GB usable ({capacity_note}); training with micro-batch {best}/device "
      f"({best_plan['total'] / GB:.2f} GB, {accum_of(best)} accumulation steps). Plans: {tried}")
  return accum_of(best), best_compiled, best_plan
