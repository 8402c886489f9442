"""What the ops' Pallas kernels share: backend choice, Triton compiler parameters, a GPU lowering check.

Every Pallas kernel under lightning_jax/ops lowers through Pallas' Triton backend on GPU (the compiler parameters
below select it) and runs with `interpret=True` elsewhere, so CPU tests exercise the kernel bodies.
`lower_for_gpu` lowers a function for CUDA on any host: the Pallas -> Triton-IR step runs in Python,
so unsupported indexing or primitives inside a kernel body fail on CPU in CI, not only on a GPU.
(What it cannot catch: Triton's own compile, e.g. shared memory over the SM's limit.)
"""
from __future__ import annotations

import contextlib
import logging

import jax
import jax.numpy as jnp

try:   # jax's cuDNN attention checks (no public twin), patched by `target_gpu`
  from jax._src.cudnn import fused_attention_stablehlo as _cudnn
except ImportError:         # a jax that moved them: nothing is patched (see _hopper_for_cudnn)
  _cudnn = None

F32 = jnp.float32
_TARGET_GPU = [False]     # inside `target_gpu()`: choose the GPU code paths on any host


def on_gpu() -> bool:
  """Whether the GPU code paths are chosen: on a GPU backend, or inside `target_gpu()`."""
  return _TARGET_GPU[0] or jax.default_backend() == "gpu"


@contextlib.contextmanager
def target_gpu():
  """Choose, while tracing, what a GPU would run: every "auto" choice that asks `on_gpu()` (the
  delta rule's and Sinkhorn's Pallas kernels, cuDNN flash attention for GSA, the TQP rotation
  kernel) and the kernels' native Triton form instead of the interpreter. For compiling for a GPU
  this host does not have (lightning_jax/gpu_target.py): without it the compile-only step held
  the CPU host's choices (the chunked XLA delta rule, gather attention), whose memory differs
  from the card's. Nothing traced inside can run on this host, and a function traced inside
  must not be called again outside: jax's trace cache does not see this switch."""
  before = _TARGET_GPU[0]
  _TARGET_GPU[0] = True
  try:
    with _hopper_for_cudnn():
      yield
  finally:
    _TARGET_GPU[0] = before


@contextlib.contextmanager
def _hopper_for_cudnn(capability=(9, 0)):
  """jax.nn.dot_product_attention(implementation="cudnn") asks the live GPU for its compute
  capability (head dims up to 256 need Hopper); with no GPU here it would answer "none". Inside,
  it answers for the target card (sm_90: the H100 and H200). jax keeps these checks in a private
  module (no public twin); if it moves, nothing is patched and the first cuDNN call says why."""
  cudnn = _cudnn
  if cudnn is None or jax.default_backend() == "gpu" or \
      not hasattr(cudnn, "check_compute_capability"):
    yield
    return
  parse = lambda c: tuple(int(x) for x in str(c).split("."))
  saved = {n: getattr(cudnn, n) for n in ("check_compute_capability",
                                          "is_cuda_compute_capability_equal") if hasattr(cudnn, n)}
  cudnn.check_compute_capability = lambda c: capability >= parse(c)
  if "is_cuda_compute_capability_equal" in saved:
    cudnn.is_cuda_compute_capability_equal = lambda c: capability == parse(c)
  try:
    yield
  finally:
    for n, f in saved.items():
      setattr(cudnn, n, f)


def interpret_default(interpret: bool | None) -> bool:
  """None -> run natively on GPU, in the Pallas interpreter elsewhere."""
  return (not on_gpu()) if interpret is None else bool(interpret)


def compiler_params(num_warps: int, num_stages: int, force: bool = False):
  """Triton compiler parameters on GPU (they pick Pallas' Triton backend); None when interpreted.

  force=True returns them on any host (for `lower_for_gpu`)."""
  if not (force or on_gpu()):
    return None
  from jax.experimental.pallas import triton as plt
  return plt.CompilerParams(num_warps=int(num_warps), num_stages=int(num_stages))


def lower_for_gpu(fn, *args, **kwargs) -> str:
  """Lower jit(fn)(*args, **kwargs) for CUDA on this host and return the StableHLO text.

  Kernels called inside must be built with interpret=False and compiler_params(..., force=True)
  (their `gpu_lowering=True` switch, where they have one). Raises what the Triton lowering raises."""
  lowered = jax.jit(fn).trace(*args, **kwargs).lower(lowering_platforms=("cuda",))
  return lowered.as_text()


def dot(a, b, dims, dtype):
  """dot_general with operands cast to `dtype` and float32 accumulation."""
  return jax.lax.dot_general(a.astype(dtype), b.astype(dtype), dims, preferred_element_type=F32)


def falls_back(logged: set, force_interpret: bool, what: str, instead: str) -> bool:
  """True when the kernels `what` must give way to its reference (no GPU and
  not forced into the interpreter by a test); says so once per backend (logging.WARNING, logger
  "lightning_jax.ops"), remembering it in `logged`."""
  if on_gpu() or force_interpret:
    return False
  be = jax.default_backend()
  if be not in logged:
    logged.add(be)
    logging.getLogger("lightning_jax.ops").warning(
        "%s: no GPU (backend %s), running %s instead (the kernels run off GPU only in tests, "
        "through the Pallas interpreter).", what, be, instead)
  return True
