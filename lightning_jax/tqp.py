"""TQP (SPEC §4): TurboQuant base experts (frozen, 4 or 8 bits) + trained rank-r adapters.

Format, per routed-expert matrix W in [d_out, d_in] layout (our stored layout is [in, out], so
gate/up [E, d, f] give rows of length d and down [E, f, d] rows of length f):
  * keep each row's L2 norm n_i (float32);
  * rotate the unit row u_i = w_i / n_i with R = H D / sqrt(n): H the Sylvester Hadamard matrix,
    D a random +-1 diagonal drawn once per (layer, matrix) and shared by that layer's experts;
  * quantize every rotated coordinate with ONE scalar codebook fitted to the marginal of a
    coordinate of a uniform random unit vector in R^n, density C_n (1 - x^2)^((n-3)/2) on [-1, 1]
    (a Beta((n-1)/2, (n-1)/2) shifted to [-1, 1]): Lloyd-Max at 4 bits, quantile midpoints at 8.
    No per-group scales. Boundaries are the midpoints between levels (nearest level).
  * storage: 4 bits -> two indices per uint8 (low nibble = even column), 8 bits -> uint8.

Dimensions that are not a power of two: rows and inputs are zero-padded to the next power of two
n_p before the rotation (the pad columns of x are zero, so they contribute nothing); codes,
adapters' B and the codebook use n_p. This costs n_p / d_in extra storage, and is logged by
`conversion_report`. Set `cfg.tqp.allow_pad = False` to turn that into a ConfigError instead.
At every LightningLM stage d_model = 4096 and the expert width = 1024, so nothing is padded.

Forward (the pre-rotated-input trick): W x = n ⊙ (Q (R x)), so the expert matmul rotates the
activations once per matrix (O(n log n)-style, here two small Hadamard matmuls of width 64) and
multiplies with codebook values; W is never rotated back. Adapters live in the same rotated
space: y = stop_gradient(n ⊙ (Q x_r)) + A (B x_r), A [d_out, r], B [r, n_p], init
A ~ N(0, 1e-4), B ~ N(0, 1/sqrt(r)). The base output is stop-gradient: the input receives
gradient only through the adapters (SPEC §4), and the backward keeps no dequantized weights.
Computed as A ((B R) x) (`_qlinear`), the adapter needs no rotated activation, so the rotation
runs in the forward only and the backward rotates nothing of activation size.

Trees (per layer; the model stacks them over groups with a leading dim):
  params[...]["moe"]["adapters"] = {gate|up|down: {"a": [E, d_out, r], "b": [E, r, n_p]}}
  frozen[...]["moe"]["experts"]  = {gate|up|down: {"codes": uint8 [E, d_out, n_p*bits/8],
                                                   "norms": f32 [E, d_out], "signs": int8 [n_p]}}
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from scipy import special

from lightning_jax import nn, optim, remat
from lightning_jax.config import ConfigError
from lightning_jax.ops.expert_matmul import api as expert_matmul

SUPPORTED_BITS = (4, 8)
MATRICES = ("gate", "up", "down")
ADAPTER_A_STD = 1e-4
EXPERT_INIT_STD = 0.02   # routed experts' init std (ffn.INIT_STD); used for a random TQP base


# ============================================================================ codebook
def _check_bits(bits: int):
  if bits not in SUPPORTED_BITS:
    raise ConfigError(f"tqp.bits={bits} is unsupported; expected one of {SUPPORTED_BITS} "
                      "(4: Lloyd-Max, two indices per byte; 8: quantile midpoints, uint8).")


def _log_cn(n: int) -> float:
  """log of the normaliser C_n of the coordinate density C_n (1 - x^2)^((n-3)/2)."""
  return special.gammaln(n / 2) - 0.5 * math.log(math.pi) - special.gammaln((n - 1) / 2)


def coord_cdf(x, n: int):
  """CDF of one coordinate of a uniform unit vector in R^n (shifted Beta((n-1)/2, (n-1)/2))."""
  a = (n - 1) / 2
  return special.betainc(a, a, np.clip((np.asarray(x, np.float64) + 1) / 2, 0.0, 1.0))


def _cell_moments(bounds: np.ndarray, n: int):
  """Probability, first and second partial moments of the density over each cell."""
  p = np.diff(coord_cdf(bounds, n))
  # d/dx [-(1 - x^2)^((n-1)/2) / (n - 1)] = x (1 - x^2)^((n-3)/2)
  with np.errstate(divide="ignore"):
    g = np.exp((n - 1) / 2 * np.log1p(-np.minimum(bounds ** 2, 1.0)))
  m1 = math.exp(_log_cn(n)) / (n - 1) * (g[:-1] - g[1:])
  # x^2 (1-x^2)^b = (1-x^2)^b - (1-x^2)^(b+1), the latter being the density of dimension n + 2
  m2 = p - math.exp(_log_cn(n) - _log_cn(n + 2)) * np.diff(coord_cdf(bounds, n + 2))
  return p, m1, m2


def _bounds(levels: np.ndarray) -> np.ndarray:
  return np.concatenate([[-1.0], (levels[1:] + levels[:-1]) / 2, [1.0]])


def distortion(levels, n: int) -> float:
  """Exact per-coordinate MSE E[(X - Q(X))^2] of nearest-level quantization with `levels`."""
  levels = np.asarray(levels, np.float64)
  p, m1, m2 = _cell_moments(_bounds(levels), n)
  return float(np.sum(m2 - 2 * levels * m1 + levels ** 2 * p))


@functools.lru_cache(maxsize=None)
def _codebook_np(n: int, bits: int) -> np.ndarray:
  _check_bits(bits)
  if n < 2:
    raise ValueError(f"codebook dimension n={n} must be at least 2.")
  k = 2 ** bits
  a = (n - 1) / 2
  q = (np.arange(k) + 0.5) / k
  levels = 2 * special.betaincinv(a, a, q) - 1          # quantile midpoints
  if bits <= 4:                                         # Lloyd-Max, exact cell moments
    scale = 1 / math.sqrt(n)
    for _ in range(20000):
      p, m1, _ = _cell_moments(_bounds(levels), n)
      new = np.where(p > 0, m1 / np.maximum(p, 1e-300), levels)
      delta = np.max(np.abs(new - levels))
      levels = new
      if delta < 1e-13 * scale:
        break
  return levels.astype(np.float64)


def codebook(n: int, bits: int) -> np.ndarray:
  """Reconstruction levels (float32, ascending) for dimension n (cached per (n, bits))."""
  return _codebook_np(int(n), int(bits)).astype(np.float32)


def expected_relative_mse(n: int, bits: int) -> float:
  """||W - W_hat||^2 / ||W||^2 expected for random rows: n x per-coordinate distortion."""
  return n * distortion(_codebook_np(int(n), int(bits)), n)


def bin_probs(n: int, bits: int) -> np.ndarray:
  """Probability of each codebook index for a random unit vector (for a random TQP base)."""
  p, _, _ = _cell_moments(_bounds(_codebook_np(int(n), int(bits))), n)
  return p / p.sum()


# ============================================================================ Hadamard
def pow2_dim(d: int, cfg=None, what: str = "matrix dimension") -> int:
  """The rotation length for a row of length d: d itself if a power of two, else padded."""
  if d >= 1 and d & (d - 1) == 0:
    return d
  if cfg is not None and not cfg.tqp.allow_pad:
    raise ConfigError(f"TQP {what} {d} is not a power of two, which the Hadamard rotation needs, "
                      "and tqp.allow_pad=False; expected a power of two (or allow zero-padding "
                      f"to {1 << (d - 1).bit_length()}).")
  return 1 << (d - 1).bit_length()


@functools.lru_cache(maxsize=None)
def _hadamard_np(n: int) -> np.ndarray:
  h = np.ones((1, 1), np.float32)
  while h.shape[0] < n:
    h = np.block([[h, h], [h, -h]])
  return h


def _factors(n: int, max_block: int = 128) -> list[int]:
  k = n.bit_length() - 1
  m = max(1, -(-k // (max_block.bit_length() - 1)))
  sizes = [k // m + (1 if i < k % m else 0) for i in range(m)]
  return [1 << s for s in sizes if s > 0] or [1]


def fwht(x: jax.Array) -> jax.Array:
  """Unnormalised Walsh-Hadamard transform (Sylvester order) over the last axis.

  n = 2^k is factored as n1 x n2 (x ...) with blocks <= 128 and H_n = H_n1 (x) H_n2 (x) ...
  applied as one small dense matmul per factor: O(n (n1 + n2)) per row, on tensor cores.
  """
  n = x.shape[-1]
  if n & (n - 1):
    raise ValueError(f"fwht needs a power-of-two last dimension, got {n}.")
  if n == 1:
    return x
  fs = _factors(n)
  lead = x.shape[:-1]
  y = x.reshape(lead + tuple(fs))
  nb = len(lead)
  for i, f in enumerate(fs):
    h = jnp.asarray(_hadamard_np(f), dtype=x.dtype)
    y = jnp.moveaxis(jnp.tensordot(y, h, axes=[[nb + i], [0]]), -1, nb + i)
  return y.reshape(x.shape)


def rotate(x: jax.Array, signs: jax.Array) -> jax.Array:
  """R x with R = H D / sqrt(n) over the last axis (x already padded to n)."""
  n = x.shape[-1]
  return fwht(x * signs.astype(x.dtype)) * jnp.asarray(1 / math.sqrt(n), x.dtype)


def unrotate(y: jax.Array, signs: jax.Array) -> jax.Array:
  """R^T y = D H y / sqrt(n)."""
  n = y.shape[-1]
  return fwht(y) * signs.astype(y.dtype) * jnp.asarray(1 / math.sqrt(n), y.dtype)


def _pad_last(x, n):
  d = x.shape[-1]
  if d == n:
    return x
  return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, n - d)])


# ============================================================================ packing
def packed_len(n: int, bits: int) -> int:
  _check_bits(bits)
  return n // 2 if bits == 4 else n


def pack(idx: jax.Array, bits: int) -> jax.Array:
  """Indices [..., n] (values < 2^bits) -> uint8 storage [..., n * bits / 8]."""
  _check_bits(bits)
  idx = idx.astype(jnp.uint8)
  if bits == 8:
    return idx
  return idx[..., 0::2] | (idx[..., 1::2] << 4)


def unpack(codes: jax.Array, bits: int) -> jax.Array:
  """uint8 storage -> indices [..., n] (uint8)."""
  _check_bits(bits)
  if bits == 8:
    return codes
  # each byte repeated twice (a broadcast into a new minor axis, then a reshape: a bitcast), then
  # shifted by 0 (even index, low nibble) or 4 (odd index, high nibble). Elementwise, so XLA
  # fuses it into the dequantisation that consumes it; jnp.stack([lo, hi], -1) wrote the
  # unpacked uint8 array out first (a concatenate fusion: 6% of the 120B rank's step on an H200)
  n2 = codes.shape[-1]
  rep = jnp.broadcast_to(codes[..., None], codes.shape + (2,)).reshape(
      codes.shape[:-1] + (2 * n2,))
  shift = (jnp.arange(2 * n2, dtype=jnp.uint8) & jnp.uint8(1)) << jnp.uint8(2)
  return (rep >> shift) & jnp.uint8(15)


def bits_of(codes_last: int, n: int) -> int | None:
  for b in SUPPORTED_BITS:
    if packed_len(n, b) == codes_last:
      return b
  return None


# ============================================================================ quantize
def quantize_rows(w: jax.Array, signs: jax.Array, bits: int):
  """Rows w [..., d_out, d_in] -> (codes uint8 [..., d_out, packed], norms f32 [..., d_out])."""
  n = signs.shape[-1]
  w = _pad_last(w.astype(jnp.float32), n)
  norms = jnp.sqrt(jnp.sum(w * w, axis=-1))
  u = w / jnp.maximum(norms, 1e-30)[..., None]
  return quantize_rotated(rotate(u, signs), bits), norms


def quantize_rotated(y: jax.Array, bits: int) -> jax.Array:
  """Rotated unit rows [..., n] -> packed nearest-level codes."""
  n = y.shape[-1]
  lv = codebook(n, bits)
  inner = jnp.asarray(((lv[1:] + lv[:-1]) / 2).astype(np.float32))
  idx = jnp.searchsorted(inner, y.astype(jnp.float32), side="left",
                         method="compare_all" if bits <= 4 else "scan")
  return pack(idx, bits)


def dequantize_rotated(q: dict, bits: int, dtype=jnp.float32) -> jax.Array:
  """Quantized matrix {codes, norms, signs} -> n ⊙ Q in the rotated space [..., d_out, n_p]."""
  n = q["signs"].shape[-1]
  lv = jnp.asarray(codebook(n, bits), dtype)
  w = jnp.take(lv, unpack(q["codes"], bits).astype(jnp.int32), axis=0)
  return w * q["norms"].astype(dtype)[..., None]


def dequantize(q: dict, bits: int, d_in: int, adapter: dict | None = None) -> jax.Array:
  """Slow reference: the effective weight in the STORED [..., d_in, d_out] layout, float32.

  W_rot = n ⊙ Q (+ A B); W = W_rot R (rows rotated back), padding columns dropped.
  """
  w_rot = dequantize_rotated(q, bits, jnp.float32)
  if adapter is not None:
    w_rot = w_rot + jnp.einsum("...or,...rn->...on", adapter["a"].astype(jnp.float32),
                               adapter["b"].astype(jnp.float32))
  w = unrotate(w_rot, q["signs"])[..., :d_in]
  return jnp.swapaxes(w, -1, -2)


# ============================================================================ spec trees
def _dims(cfg, mat: str) -> tuple[int, int]:
  """(d_out, d_in) of a routed-expert matrix in the [d_out, d_in] quantization layout."""
  d, f = int(cfg.model.d_model), int(cfg.moe.expert_width)
  return (f, d) if mat in ("gate", "up") else (d, f)


_OUT_AXIS = {"gate": "expert_mlp", "up": "expert_mlp", "down": "embed"}


def adapter_specs(cfg, n_experts: int) -> dict:
  """params[...]["moe"]["adapters"] of one layer: per matrix a [E, d_out, r], b [E, r, n_p]."""
  r = int(cfg.tqp.rank)
  if r < 1:
    raise ConfigError(f"tqp.rank={r} must be a positive integer (the paper uses 16).")
  out = {}
  for mat in MATRICES:
    d_out, d_in = _dims(cfg, mat)
    n = pow2_dim(d_in, cfg, f"moe.{mat} input dimension")
    out[mat] = {
        "a": nn.Spec((n_experts, d_out, r), ("expert", _OUT_AXIS[mat], "rank"),
                     nn.normal(ADAPTER_A_STD)),
        "b": nn.Spec((n_experts, r, n), ("expert", "rank", None), nn.normal(1 / math.sqrt(r))),
    }
  return out


def _codes_init(n: int, bits: int, rows_per_block: int = 1024):
  """Random codes with the codebook's cell probabilities, drawn by inverse CDF from uint32 bits
  in blocks of rows (lax.map), so the init's temporaries stay at a few bytes per weight of one
  block. (jax.random.categorical over the 2^bits cells held 2^bits float32 Gumbel draws per
  weight: 64 bytes per weight, 78 GB for one 120B rank's stacked base, which set the device peak
  of the one-rank benchmark before its step ever ran.)"""
  cdf = np.cumsum(bin_probs(n, bits))[:-1]
  thresholds = np.minimum(np.round(cdf * 2.0**32), 2.0**32 - 1).astype(np.uint32)

  def draw(key, rows):
    u = jax.random.bits(key, (rows, n), jnp.uint32)
    idx = jnp.searchsorted(jnp.asarray(thresholds), u, side="right", method="scan")
    return pack(idx, bits)

  def f(key, shape, dtype):
    del dtype
    rows = math.prod(shape[:-1])
    block = min(rows, rows_per_block)
    n_full, rest = divmod(rows, block)
    k_full, k_rest = jax.random.split(key)
    out = jax.lax.map(lambda k: draw(k, block), jax.random.split(k_full, n_full))
    out = out.reshape(n_full * block, shape[-1])
    if rest:
      out = jnp.concatenate([out, draw(k_rest, rest)], axis=0)
    return out.reshape(shape)
  return f


def _signs_init(key, shape, dtype):
  return jax.random.rademacher(key, shape, jnp.int32).astype(dtype)


def qbase_specs(cfg, n_experts: int) -> dict:
  """frozen[...]["moe"]["experts"] of one layer. The init draws a valid random quantized base
  (codes from the codebook's cell probabilities, norms of N(0, 0.02) rows), for models that
  start with TQP from scratch (tests); real runs convert trained experts (convert_moe_to_tqp)."""
  bits = int(cfg.tqp.bits)
  _check_bits(bits)
  out = {}
  for mat in MATRICES:
    d_out, d_in = _dims(cfg, mat)
    n = pow2_dim(d_in, cfg, f"moe.{mat} input dimension")
    out[mat] = {
        "codes": nn.Spec((n_experts, d_out, packed_len(n, bits)),
                         ("expert", _OUT_AXIS[mat], "packed"), _codes_init(n, bits), jnp.uint8),
        "norms": nn.Spec((n_experts, d_out), ("expert", _OUT_AXIS[mat]),
                         nn.constant(EXPERT_INIT_STD * math.sqrt(d_in))),
        "signs": nn.Spec((n,), ("packed",), _signs_init, jnp.int8),
    }
  return out


def qbase_abstract(cfg, n_experts: int) -> dict:
  return nn.abstract(qbase_specs(cfg, n_experts))


def validate_qbase(qbase: dict, cfg, where: str = "frozen moe experts") -> None:
  """Raise a clear error when a quantized base does not match the config (bits, dims)."""
  bits = int(cfg.tqp.bits)
  _check_bits(bits)
  for mat in MATRICES:
    if mat not in qbase or not isinstance(qbase[mat], dict) or "codes" not in qbase[mat]:
      raise ValueError(f"{where}/{mat} is missing its quantized base (codes, norms, signs); "
                       "expected a tree made by tqp.convert_moe_to_tqp or tqp.qbase_specs.")
    d_out, d_in = _dims(cfg, mat)
    n = pow2_dim(d_in, cfg)
    codes, signs = qbase[mat]["codes"], qbase[mat]["signs"]
    if signs.shape[-1] != n:
      raise ValueError(f"{where}/{mat}/signs has rotation length {signs.shape[-1]} but the config "
                       f"(d_model={cfg.model.d_model}, moe.expert_width={cfg.moe.expert_width}) "
                       f"expects {n}.")
    want = packed_len(n, bits)
    if codes.shape[-1] != want or codes.shape[-2] != d_out or codes.dtype != jnp.uint8:
      got = bits_of(codes.shape[-1], n)
      hint = f" (it holds a {got}-bit base)" if got is not None else ""
      raise ValueError(f"{where}/{mat}/codes has shape {tuple(codes.shape)} {codes.dtype}{hint} "
                       f"but tqp.bits={bits} expects uint8 [..., {d_out}, {want}]; convert the "
                       "checkpoint again or set tqp.bits to match it.")


# ============================================================================ expert matmul
KERNELS = ("auto", "xla", "xla_rotate", "pallas", "pallas_rotate")


def base_kernel(cfg) -> str:
  """cfg.tqp.kernel resolved: "pallas" (the dequantising Pallas/Triton kernel,
  ops/expert_matmul), "pallas_rotate" (that kernel plus the one-pass Pallas input
  rotation where the width allows, expert_matmul.rotate), "xla" (dequantise to the compute
  dtype, then einsum) or "xla_rotate" (xla's matmul after the one-pass Pallas rotation).
  "auto" = xla_rotate on GPU, xla elsewhere (the interpreter would be slow). Measured on an H100
  at the 120B per-device shape (docs/PERFORMANCE.md): XLA's fused dequantise + einsum runs at
  90-98% of the bf16 matmul, the Pallas dequantising kernel at 9-22%; the Pallas rotation is
  2.3-2.8x faster than tqp.rotate."""
  k = cfg.tqp.kernel
  if k not in KERNELS:
    raise ConfigError(f"tqp.kernel={k!r} is not a known base-matmul kernel; expected one of "
                      f"{KERNELS} (auto = xla_rotate on GPU, xla elsewhere).")
  if k == "auto":
    return "xla_rotate" if expert_matmul.on_gpu() else "xla"
  return k


def _qbase(xr, q, bits, dtype, kernel="xla"):
  """Base output n ⊙ (Q xr) [E, C, d_out], no gradient. kernel "xla" builds the dequantised
  weight [E, d_out, n] in `dtype` and einsums; "pallas" dequantises tile by tile inside the
  matmul kernel (never writes the weight)."""
  if kernel == "pallas":
    lv = jnp.asarray(codebook(q["signs"].shape[-1], bits))
    return expert_matmul.tqp_matmul(jax.lax.stop_gradient(xr), q["codes"], q["norms"], lv, bits)
  w = dequantize_rotated({"codes": q["codes"], "norms": q["norms"], "signs": q["signs"]},
                         bits, dtype)                                   # [E, d_out, n]
  return jax.lax.stop_gradient(jnp.einsum("ecn,eon->eco", xr, w))


def _rotated_input(xs, q, bits, kernel):
  """(xr, x_layout) for the Pallas matmul from the padded, unrotated input xs [E, C, n]. With
  kernel "pallas_rotate" and a width the Pallas rotation supports, the rotation is one Pallas
  pass that also writes the 4-bit matmul's [even | odd] layout (no XLA permutation); otherwise
  tqp.rotate in XLA."""
  n = xs.shape[-1]
  if kernel in ("pallas_rotate", "xla_rotate"):
    fac = expert_matmul.rotation_factors(n)
    if kernel == "xla_rotate" and fac is not None:       # plain layout for XLA's einsum
      return expert_matmul.rotate(xs, q["signs"], split=False), "split"
    if fac is not None and (bits == 8 or (fac[1] >= 32 and n % 128 == 0)):
      return (expert_matmul.rotate(xs, q["signs"], split=bits == 4),
              "presplit" if bits == 4 else "split")
  return rotate(xs, q["signs"]), "split"


def _adapter_in(ad, q, d_in):
  """B R = unrotate(B's rows) [E, r, d_in], float32: the adapter's input projection in the
  original (unrotated) space, so that B (R x) = (B R) x."""
  return unrotate(ad["b"].astype(jnp.float32), q["signs"])[..., :d_in]


def _qlinear(x, q, ad, bits, dtype, kernel="xla", xb=None):
  """x [E, C, d_in] (NOT rotated) -> [E, C, d_out] = stop_gradient(n ⊙ Q (R x)) + A (B (R x)).

  Only the base needs the rotated input, and the base is stop-gradient, so the rotation runs on
  a stop-gradient copy of x, forward only. The adapter is applied as A ((B R) x) with
  B R = `_adapter_in` [E, r, d_in] (a rank-r-sized transform): the backward never rotates an
  [E, C, n] activation and keeps no rotated copy of it. `xb` = (B R) x when the caller computed
  it already. With the Pallas kernels the product xb A^T is added in the base kernel's epilogue
  (expert_matmul.tqp_matmul_adapter); with "xla" it is a thin einsum alongside."""
  n = q["signs"].shape[-1]
  xs = _pad_last(jax.lax.stop_gradient(x), n)
  if xb is None:
    xb = jnp.einsum("ecd,erd->ecr", x, _adapter_in(ad, q, x.shape[-1]).astype(dtype))
  if kernel in ("pallas", "pallas_rotate"):
    xr, layout = _rotated_input(xs.astype(dtype), q, bits, kernel)
    lv = jnp.asarray(codebook(n, bits))
    return remat.keep(expert_matmul.tqp_matmul_adapter(xr, q["codes"], q["norms"], lv, bits,
                                                       xb, ad["a"].astype(dtype),
                                                       x_layout=layout))
  xr = (_rotated_input(xs.astype(dtype), q, bits, kernel)[0] if kernel == "xla_rotate"
        else rotate(xs, q["signs"]))
  base = jax.lax.stop_gradient(_qbase(xr, q, bits, dtype, "xla"))
  # kept by name under model.remat=selective: the base matmul is the costliest to run again
  return remat.keep(base.astype(dtype) + jnp.einsum("ecr,eor->eco", xb, ad["a"].astype(dtype)))


def tqp_grouped_swiglu(adapters: dict, qbase: dict, xg: jax.Array, cfg) -> jax.Array:
  """xg [E, C, d] (tokens grouped per expert) -> [E, C, d] = down(silu(gate x) * up x),
  with every routed matrix = stop_gradient(dequantized base) + adapter, in compute dtype.

  The base matmuls use `base_kernel(cfg)`. gate and up are separate base calls: each matrix
  has its own rotation signs (drawn per (layer, matrix)), so their rotated inputs differ. Their
  adapter input projections share one pass over x ([E, 2r, d] stacked)."""
  validate_qbase(qbase, cfg)
  bits = int(cfg.tqp.bits)
  dtype = nn.dtype_of(cfg.model.dtype)
  kernel = base_kernel(cfg)
  x = xg.astype(dtype)
  d = x.shape[-1]
  r = adapters["gate"]["b"].shape[-2]
  b_gu = jnp.concatenate([_adapter_in(adapters[m], qbase[m], d) for m in ("gate", "up")], -2)
  xb = jnp.einsum("ecd,erd->ecr", x, b_gu.astype(dtype))                 # [E, C, 2r]

  def lin(mat, inp, xb_=None):
    return _qlinear(inp, qbase[mat], adapters[mat], bits, dtype, kernel, xb_)

  h = jax.nn.silu(lin("gate", x, xb[..., :r])) * lin("up", x, xb[..., r:])
  y = lin("down", h)
  assert y.shape[-1] == d
  return y


def reference_grouped_swiglu(adapters: dict, qbase: dict, xg: jax.Array, cfg) -> jax.Array:
  """Slow float32 reference: rebuild each effective weight in the original space, plain SwiGLU."""
  bits = int(cfg.tqp.bits)
  w = {m: dequantize(qbase[m], bits, _dims(cfg, m)[1], adapters[m]) for m in MATRICES}
  x = xg.astype(jnp.float32)
  h = jax.nn.silu(jnp.einsum("ecd,edf->ecf", x, w["gate"])) * \
      jnp.einsum("ecd,edf->ecf", x, w["up"])
  return jnp.einsum("ecf,efd->ecd", h, w["down"])


# ============================================================================ tree walking
def _moe_nodes(tree, path=()):
  """Yield (path, node) for every dict stored under a key 'moe'."""
  if isinstance(tree, dict):
    for k, v in tree.items():
      if k == "moe" and isinstance(v, dict):
        yield path + (k,), v
      else:
        yield from _moe_nodes(v, path + (k,))


def _get(tree, path):
  for k in path:
    tree = tree[k]
  return tree


def _set(tree: dict, path, value) -> dict:
  """Functional set: copies the dicts along `path`."""
  if not path:
    return value
  out = dict(tree)
  out[path[0]] = _set(tree.get(path[0], {}), path[1:], value)
  return out


def _layer_key(seed: int, path: str) -> jax.Array:
  return nn.path_key(jax.random.PRNGKey(seed), path)


# ============================================================================ spec-level form
def tqp_specs(param_specs: dict, cfg) -> tuple[dict, dict]:
  """Model spec tree with dense `moe.experts` -> (param specs with `moe.adapters`, frozen specs
  holding the quantized bases at `<path>/moe/experts`), stacking dims preserved. The spec-level
  twin of `convert_moe_to_tqp`, for init and `jax.eval_shape` (counting, memory planning)."""
  frozen: dict = {}
  for path, node in list(_moe_nodes(param_specs)):
    if "experts" not in node:
      continue
    g = node["experts"]["gate"]
    lead, lead_axes, n_exp = g.shape[:-3], g.axes[:-3], g.shape[-3]
    ad, qb = adapter_specs(cfg, n_exp), qbase_specs(cfg, n_exp)
    for n, ax in reversed(list(zip(lead, lead_axes))):
      ad, qb = nn.stack(ad, n, ax), nn.stack(qb, n, ax)
    new_node = {k: v for k, v in node.items() if k != "experts"}
    new_node["adapters"] = ad
    param_specs = _set(param_specs, path, new_node)
    frozen = _set(frozen, path + ("experts",), qb)
  return param_specs, frozen


# ============================================================================ conversion
def convert_moe_to_tqp(params: dict, cfg, chunk: int = 16) -> tuple[dict, dict]:
  """Trained full-model params (every moe.experts, possibly stacked over groups) -> TQP form.

  Returns (params, frozen): params with each `moe.experts` replaced by freshly initialised
  `moe.adapters`; frozen holding ONLY the quantized bases at `<same path>/moe/experts` (merge it
  into the model's other frozen buffers with `merge_frozen`). Signs are drawn per (layer,
  matrix) from cfg.tqp.seed and the layer's path; experts are quantized `chunk` at a time.
  """
  bits = int(cfg.tqp.bits)
  _check_bits(bits)
  nodes = list(_moe_nodes(params))
  if not any("experts" in node for _, node in nodes):
    raise ValueError("convert_moe_to_tqp found no moe/experts in the parameter tree; expected a "
                     "trained MoE model (e.g. params['groups']['l0']['moe']['experts']).")
  r = int(cfg.tqp.rank)
  frozen: dict = {}
  for path, node in nodes:
    if "experts" not in node:
      continue
    ex = node["experts"]
    pstr = "/".join(path)
    qnode, anode = {}, {}
    for mat in MATRICES:
      if mat not in ex:
        raise ValueError(f"{pstr}/experts has no '{mat}' matrix; expected gate, up, down.")
      w = ex[mat]                                          # [*lead, E, in, out]
      lead, (E, d_in, d_out) = w.shape[:-3], w.shape[-3:]
      if (d_out, d_in) != _dims(cfg, mat):
        raise ValueError(f"{pstr}/experts/{mat} has shape {tuple(w.shape)} but the config "
                         f"expects [..., E, {_dims(cfg, mat)[1]}, {_dims(cfg, mat)[0]}].")
      n = pow2_dim(d_in, cfg, f"moe.{mat} input dimension")
      n_layers = math.prod(lead)
      wl = w.reshape((n_layers, E, d_in, d_out))
      codes, norms, signs, a, b = [], [], [], [], []
      for li in range(n_layers):
        key = _layer_key(int(cfg.tqp.seed), f"{pstr}/{li}/{mat}")
        ks, ka, kb = jax.random.split(key, 3)
        s = jax.random.rademacher(ks, (n,), jnp.int32).astype(jnp.int8)
        c, nr = _quantize_experts(wl[li], s, bits, chunk)
        codes.append(c); norms.append(nr); signs.append(s)
        a.append(ADAPTER_A_STD * jax.random.normal(ka, (E, d_out, r), jnp.float32))
        b.append(jax.random.normal(kb, (E, r, n), jnp.float32) / math.sqrt(r))
      st = lambda xs: jnp.stack(xs).reshape(lead + xs[0].shape)
      qnode[mat] = {"codes": st(codes), "norms": st(norms), "signs": st(signs)}
      anode[mat] = {"a": st(a), "b": st(b)}
    new_node = {k: v for k, v in node.items() if k != "experts"}
    new_node["adapters"] = anode
    params = _set(params, path, new_node)
    frozen = _set(frozen, path + ("experts",), qnode)
  return params, frozen


@functools.partial(jax.jit, static_argnames=("bits", "chunk"))
def _quantize_experts(w, signs, bits, chunk):
  """w [E, in, out] -> codes [E, out, packed], norms [E, out]; `chunk` experts at a time."""
  return jax.lax.map(lambda we: quantize_rows(jnp.swapaxes(we, -1, -2), signs, bits), w,
                     batch_size=min(chunk, w.shape[0]))


def merge_frozen(frozen: dict, qfrozen: dict) -> dict:
  """Deep-merge the quantized bases into an existing frozen tree (new leaves win)."""
  out = dict(frozen)
  for k, v in qfrozen.items():
    if isinstance(v, dict) and isinstance(out.get(k), dict):
      out[k] = merge_frozen(out[k], v)
    else:
      out[k] = v
  return out


def convert_layer(w, cfg, path: str, li: int, chunk: int = 16):
  """The host-side, one-layer form of the conversion (growth.to_tqp / expand_to_tqp write a
  120B target layer by layer with it). One layer's routed-expert matrix w [E, in, out] (`path`: "<moe node>/<mat>", e.g.
  "groups/l0/moe/gate"; li: the layer's flat index in the node's stack) -> ({codes, norms,
  signs}, {a, b}) as numpy: exactly the slice convert_moe_to_tqp writes for it
  (same key per (node, layer, matrix) from tqp.seed, same quantizer on the same batches of `chunk`
  experts; tests/test_run_120b_reduced.py compares them bit for bit). Transient memory: one
  chunk's buffers, not the whole matrix's."""
  node, mat = path.rsplit("/", 1)
  bits, r = int(cfg.tqp.bits), int(cfg.tqp.rank)
  E, d_in, d_out = w.shape
  if (d_out, d_in) != _dims(cfg, mat):
    raise ConfigError(f"{path} has shape {tuple(w.shape)} but the config expects "
                      f"[E, {_dims(cfg, mat)[1]}, {_dims(cfg, mat)[0]}].")
  n = pow2_dim(d_in, cfg, f"moe.{mat} input dimension")
  key = _layer_key(int(cfg.tqp.seed), f"{node}/{li}/{mat}")
  ks, ka, kb = jax.random.split(key, 3)
  s = jax.random.rademacher(ks, (n,), jnp.int32).astype(jnp.int8)
  # `chunk` experts per call, as tqp's lax.map batches them (the same computation per batch):
  # quantizing the whole [E, in, out] in one call holds about 5x its size in buffers
  codes = norms = None
  for i in range(0, E, chunk):
    c, nr = _quantize_experts(w[i:i + chunk], s, bits, chunk)
    if codes is None:
      codes = np.empty((E,) + c.shape[1:], np.dtype(c.dtype))
      norms = np.empty((E,) + nr.shape[1:], np.dtype(nr.dtype))
    codes[i:i + chunk], norms[i:i + chunk] = np.asarray(c), np.asarray(nr)
    del c, nr
  a = ADAPTER_A_STD * jax.random.normal(ka, (E, d_out, r), jnp.float32)
  b = jax.random.normal(kb, (E, r, n), jnp.float32) / math.sqrt(r)
  h = np.asarray                                              # to the host
  return {"codes": codes, "norms": norms, "signs": h(s)}, {"a": h(a), "b": h(b)}



# ============================================================================ flush
# (LR groups: optim.group_labels, the one label rule)
def flush(params: dict, frozen: dict, cfg, step: int, tx=None, opt_state=None, chunk: int = 16):
  """Fold A·B into every quantized base, requantize, re-draw the adapters, and (when `tx` and
  `opt_state` are given) zero the adapters' optimizer moments. Returns (params, frozen,
  opt_state, stats). The rotation (signs) is kept; norms and codes are recomputed."""
  bits = int(cfg.tqp.bits)
  stats = {"ab_norm": 0.0, "changed_frac": 0.0, "n": 0}
  for path, node in list(_moe_nodes(params)):
    if "adapters" not in node:
      continue
    pstr = "/".join(path)
    qnode = _get(frozen, path + ("experts",))
    validate_qbase(qnode, cfg, pstr + "/experts")
    new_q, new_a = {}, {}
    for mat in MATRICES:
      q, ad = qnode[mat], node["adapters"][mat]
      codes, norms, ab, changed = _flush_one(q["codes"], q["norms"], q["signs"], ad["a"],
                                             ad["b"], bits)
      key = _layer_key(int(cfg.tqp.seed) + 1 + int(step), f"{pstr}/{mat}/flush")
      ka, kb = jax.random.split(key)
      r = ad["a"].shape[-1]
      new_a[mat] = {"a": ADAPTER_A_STD * jax.random.normal(ka, ad["a"].shape, ad["a"].dtype),
                    "b": jax.random.normal(kb, ad["b"].shape, ad["b"].dtype) / math.sqrt(r)}
      new_q[mat] = {"codes": codes, "norms": norms, "signs": q["signs"]}
      stats["ab_norm"] += float(ab); stats["changed_frac"] += float(changed); stats["n"] += 1
    params = _set(params, path + ("adapters",), new_a)
    frozen = _set(frozen, path + ("experts",), new_q)
  if stats["n"]:
    stats["ab_norm"] /= stats["n"]; stats["changed_frac"] /= stats["n"]
  if tx is not None and opt_state is not None:
    opt_state = reset_adapter_state(tx, opt_state, params)
  return params, frozen, opt_state, stats


@functools.partial(jax.jit, static_argnames=("bits",))
def _flush_one(codes, norms, signs, a, b, bits):
  w = dequantize_rotated({"codes": codes, "norms": norms, "signs": signs}, bits, jnp.float32)
  ab = jnp.einsum("...or,...rn->...on", a.astype(jnp.float32), b.astype(jnp.float32))
  w = w + ab
  new_norms = jnp.sqrt(jnp.sum(w * w, axis=-1))
  y = w / jnp.maximum(new_norms, 1e-30)[..., None]
  new_codes = quantize_rotated(y, bits)
  changed = jnp.mean((unpack(new_codes, bits) != unpack(codes, bits)).astype(jnp.float32))
  ab_norm = jnp.mean(jnp.sqrt(jnp.sum(ab * ab, axis=(-1, -2))))
  return new_codes, new_norms, ab_norm, changed


def reset_adapter_state(tx, opt_state, params):
  """Zero every params-shaped optimizer-state leaf that belongs to an adapter."""
  labels = optim.group_labels(params)

  def f(v, label):
    if label == "adapters" and hasattr(v, "shape"):
      return jnp.zeros_like(v)
    return v
  masked = optax.transforms.MaskedNode
  return optax.tree_utils.tree_map_params(tx, f, opt_state, labels,
                                          transform_non_params=lambda v: v,
                                          is_leaf=lambda v: isinstance(v, masked))


def maybe_flush(params, frozen, cfg, step: int, tx=None, opt_state=None):
  """Flush every cfg.tqp.flush_every steps (0 = off, the default). Returns the same 4-tuple."""
  every = int(cfg.tqp.flush_every)
  if not cfg.tqp.enabled or every <= 0 or step == 0 or step % every:
    return params, frozen, opt_state, None
  return flush(params, frozen, cfg, step, tx, opt_state)


# ============================================================================ reporting
def conversion_report(cfg, n_experts: int, n_moe_layers: int) -> dict:
  """Sizes of the TQP form (bytes, adapter count) for planning and logging."""
  bits = int(cfg.tqp.bits)
  q = nn.abstract(qbase_specs(cfg, n_experts))
  a = adapter_specs(cfg, n_experts)
  qbytes = sum(math.prod(l.shape) * jnp.dtype(l.dtype).itemsize for l in jax.tree.leaves(q))
  padded = {m: pow2_dim(_dims(cfg, m)[1], cfg) != _dims(cfg, m)[1] for m in MATRICES}
  return {"bits": bits, "qbase_bytes": qbytes * n_moe_layers,
          "adapter_params": nn.count(a) * n_moe_layers, "padded": padded}
