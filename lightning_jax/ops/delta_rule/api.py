"""The delta rule's one entry point: `delta_rule(..., impl, options)`.

impl: "auto" (the Pallas kernels on GPU, the chunked reference elsewhere), "chunked",
"recurrent" (the token-by-token reference) or "kernel" (the Pallas kernels; off GPU they give way
to the chunked reference, said once per backend on logger "lightning_jax.ops", unless
options.interpret is True: then the kernels run in the Pallas interpreter, which is how the CPU
tests run them). Under a mesh (sharding.use_mesh) the kernels run per device (`sharded`).
"""
from __future__ import annotations

import dataclasses

import jax
from jax.sharding import PartitionSpec as P

from lightning_jax import sharding as shd
from lightning_jax.ops.delta_rule import kernel, reference
from lightning_jax.ops.delta_rule.kernel import DeltaRuleOptions
from lightning_jax.ops.pallas import falls_back, on_gpu

IMPLS = ("auto", "chunked", "recurrent", "kernel")
# option names a configuration may give (model.deltanet.kernel.*): DeltaRuleOptions' fields
# except the call-site ones, and two names that now have one value each (the other backward
# variants were removed: measured slower, docs/PERFORMANCE.md "Gated delta rule")
_CALL_SITE = ("chunk", "dot_dtype", "interpret", "gpu_lowering")
_ONE_VALUE = {"bwd": "split_pallas", "prep_bwd": "pallas"}
_FALLBACK_LOGGED = set()

recurrent = reference.recurrent_gated_delta_rule
chunked = reference.chunk_gated_delta_rule

__all__ = ["DeltaRuleOptions", "IMPLS", "chunked", "delta_rule", "options_from", "recurrent",
           "sharded"]


def options_from(chunk: int, **named) -> DeltaRuleOptions:
  """DeltaRuleOptions from a configuration's named options (model.deltanet.kernel.*): unknown
  names are a TypeError, bad values a ValueError, each naming the option."""
  fields = [f.name for f in dataclasses.fields(DeltaRuleOptions) if f.name not in _CALL_SITE]
  unknown = sorted(set(named) - set(fields) - set(_ONE_VALUE))
  if unknown:
    raise TypeError(f"unknown delta rule kernel option(s) {unknown}; expected some of "
                    f"{sorted(fields + list(_ONE_VALUE))}.")
  for name, only in _ONE_VALUE.items():
    val = named.pop(name, only)
    if val != only:
      raise ValueError(f"delta rule kernel: {name}={val!r} must be {only!r} (the other variants "
                       f"were removed after losing on GPU; docs/PERFORMANCE.md).")
  if named.get("state_dtype") is None:
    named.pop("state_dtype", None)
  return DeltaRuleOptions(chunk=int(chunk), **named)


def sharded(rule, q, k, v, log_alpha, beta):
  """Run `rule` per device under the active mesh (sharding.use_mesh): batch over the batch axes,
  heads over "heads"' axes (every (batch, head) pair is independent), so a pallas_call, which XLA
  cannot partition, never sees a global array. Axes that do not divide B or H stay unsplit."""
  mesh = shd.current_mesh()
  if mesh is None or mesh.size == 1:
    return rule(q, k, v, log_alpha, beta)
  spec4 = shd._fits(q.shape, shd.spec_for(("batch", None, "heads", None)), mesh)
  b_ax, h_ax = spec4[0], spec4[2]
  spec3 = P(b_ax, None, h_ax)
  spec_s = P(b_ax, h_ax, None, None)
  return jax.shard_map(rule, mesh=mesh, in_specs=(spec4, spec4, spec4, spec3, spec3),
                       out_specs=(spec4, spec_s), check_vma=False)(q, k, v, log_alpha, beta)


def delta_rule(q, k, v, log_alpha, beta, initial_state=None, *, impl: str = "auto",
               options: DeltaRuleOptions = DeltaRuleOptions()):
  """Gated delta rule: o [B, T, H, Dv] in v's dtype, S_T [B, H, Dv, Dk] float32."""
  if impl == "auto":
    impl = "kernel" if on_gpu() else "chunked"
  if impl == "recurrent":
    return recurrent(q, k, v, log_alpha, beta, initial_state)
  if impl == "kernel" and not falls_back(_FALLBACK_LOGGED, options.interpret is True,
                                         "the delta rule's Pallas kernels",
                                         "the chunked reference"):
    if initial_state is None:
      return sharded(lambda *a: kernel.chunk_gated_delta_rule(*a, options=options),
                     q, k, v, log_alpha, beta)
    return kernel.chunk_gated_delta_rule(q, k, v, log_alpha, beta, initial_state, options)
  if impl not in IMPLS:
    raise ValueError(f"delta rule: impl={impl!r} must be one of {list(IMPLS)}.")
  return chunked(q, k, v, log_alpha, beta, options.chunk, initial_state)
