"""The ops' one test harness: every implementation of every op against the op's reference.

`REGISTRY` maps an op (its folder, then a dot and the part for ops with several entry points,
e.g. "delta_rule.prep") to an `Op`: the reference (float32, obvious), its cases (a generator
of fresh random inputs, float32 unless the case casts them for the implementation, the
arguments whose gradients are compared, tolerances) and its implementations (each names the
cases it runs on). `check(op, impl, case, seed)` runs one: outputs, and the gradients of a
random linear function of every output, against the reference's, as relative errors
(Frobenius norms; entries that are not finite must be so in both). `LOWERINGS` lists the Pallas
kernels' CUDA lowerings (Pallas -> Triton IR runs on any host, ops.pallas.lower_for_gpu).
tests/test_ops.py runs both; Pallas kernels run in the Pallas interpreter off GPU.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from lightning_jax.ops.delta_rule import kernel as delta_kernel
from lightning_jax.ops.delta_rule import reference as delta_reference
from lightning_jax.ops.delta_rule.kernel import DeltaRuleOptions
from lightning_jax.ops.dispatch import api as dispatch_api
from lightning_jax.ops.dispatch import reference as dispatch_reference
from lightning_jax.ops.expert_matmul import kernel as em_kernel
from lightning_jax.ops.expert_matmul import reference as em_reference
from lightning_jax.ops.head_ce import api as ce_api
from lightning_jax.ops.head_ce import reference as ce_reference
from lightning_jax.ops.pallas import lower_for_gpu, on_gpu
from lightning_jax.ops.rms_norm import api as norm_api
from lightning_jax.ops.rms_norm import reference as norm_reference
from lightning_jax.ops.sinkhorn import api as sinkhorn_api
from lightning_jax.ops.sinkhorn import reference as sinkhorn_reference
from lightning_jax.ops.sparse_attention import api as sa_api
from lightning_jax.ops.sparse_attention import kernel as sa_kernel
from lightning_jax.ops.sparse_attention import reference as sa_reference
from lightning_jax.ops.sparse_attention.kernel import GSAKernelOptions
from lightning_jax.ops.stream_grad import api as sg_api
from lightning_jax.ops.stream_grad import reference as sg_reference

F32 = np.float32


@dataclasses.dataclass(frozen=True)
class Case:
  """make(rng) -> the inputs (a tuple); static: keyword arguments for both sides; diff: the
  positions of the inputs whose gradients are compared (none: forward only); low(inputs): the
  inputs as the implementation gets them (e.g. bf16), the reference keeps float32; extra(run):
  further assertions on the `Run`."""
  make: Callable
  diff: tuple = ()
  tol: float = 1e-5
  grad_tol: float = 1e-4
  static: dict = dataclasses.field(default_factory=dict)
  low: Callable | None = None
  extra: Callable | None = None


@dataclasses.dataclass(frozen=True)
class Impl:
  fn: Callable
  cases: tuple


@dataclasses.dataclass(frozen=True)
class Op:
  reference: Callable
  cases: dict
  impls: dict


@dataclasses.dataclass
class Run:
  """What one check computed (for Case.extra)."""
  inputs: tuple
  low: tuple
  out: object
  ref_out: object
  grads: tuple
  ref_grads: tuple
  msg: str


def rel_err(a, b) -> float:
  """|a - b| / |b| (Frobenius) over the entries finite in b; inf where a is not finite there
  or the non-finite patterns differ."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  fin = np.isfinite(b)
  if a.shape != b.shape or not np.array_equal(fin, np.isfinite(a)) or \
      not np.array_equal(a[~fin], b[~fin]):
    return float("inf")
  return float(np.linalg.norm(a[fin] - b[fin]) / max(np.linalg.norm(b[fin]), 1e-30))


# ----------------------------------------------------------------------------- inputs
def delta_inputs(rng, b, t, h, dk, dv, clamp=False):
  """q, k (unit rows), v, log_alpha (head 0 mild decay: the state carries across chunks; head 1
  model-like strong decay; clamp: the first tokens of head 1 at the 1e-6 floor), beta, S0."""
  unit = lambda a: a / np.linalg.norm(a, axis=-1, keepdims=True)
  q = unit(rng.standard_normal((b, t, h, dk)))
  k = unit(rng.standard_normal((b, t, h, dk)))
  v = rng.standard_normal((b, t, h, dv))
  sp = np.log1p(np.exp(rng.standard_normal((b, t, h)) - 2.0))
  log_alpha = np.maximum(-np.array([0.1, 8.0])[:h] * sp, np.log(1e-6))
  if clamp and h > 1:
    log_alpha[:, :7, 1] = np.log(1e-6)
  beta = 1.0 / (1.0 + np.exp(-rng.standard_normal((b, t, h))))
  s0 = rng.standard_normal((b, h, dv, dk))
  return tuple(a.astype(F32) for a in (q, k, v, log_alpha, beta, s0))


def selection(rng, b, t, k, n_sinks=4):
  """Random causal selections: k_t in [1, min(k, t + 1)], the sinks first, then distinct random
  earlier keys in random order, -1 padding (the GSA layer's format)."""
  sel = np.full((b, t, k), -1, np.int32)
  for bi in range(b):
    for ti in range(t):
      kt = int(rng.integers(1, min(k, ti + 1) + 1))
      sinks = list(range(min(n_sinks, ti + 1, kt)))
      rest = rng.permutation(np.arange(len(sinks), ti + 1))[:kt - len(sinks)]
      sel[bi, ti, :kt] = np.concatenate([sinks, rest]).astype(np.int32)
  return sel


def random_round(rng, n, k, rows, keep):
  """A random partial bijection between assignments (n, j) and packed rows (src [rows], slot
  [n, k]): about a fraction `keep` land in distinct random rows, the others are dropped, and at
  least one assignment is dropped and one row stays empty (the cases the custom VJPs must
  handle). Returns (src, slot, number kept)."""
  m = int(np.clip(rng.binomial(n * k, keep), 1, min(n * k, rows) - 1))
  kept = rng.permutation(n * k)[:m]
  perm = rng.permutation(rows)
  slot = np.full((n, k), rows, np.int32)
  src = np.full((rows,), n * k, np.int32)
  for used, a in enumerate(sorted(kept)):
    t, j = divmod(int(a), k)
    slot[t, j] = perm[used]
    src[perm[used]] = a
  return src, slot, m


def _quantized(rng, e, o, n, bits):
  """Random codes (uint8, 4 bits: two per byte, low nibble first), row norms, sorted levels."""
  idx = rng.integers(0, 2 ** bits, (e, o, n)).astype(np.uint8)
  codes = idx if bits == 8 else (idx[..., 0::2] | (idx[..., 1::2] << 4)).astype(np.uint8)
  levels = np.sort(rng.standard_normal(2 ** bits)).astype(F32)
  return codes, rng.uniform(0.5, 2.0, (e, o)).astype(F32), levels


def _bf16(positions):
  return lambda xs: tuple(jnp.asarray(x, jnp.bfloat16) if i in positions else x
                          for i, x in enumerate(xs))


# ----------------------------------------------------------------------------- delta rule
def _rule(options):
  return lambda q, k, v, la, b, s0: delta_kernel.chunk_gated_delta_rule(q, k, v, la, b, s0,
                                                                          options)


def _bf16_rule_dtypes(run):
  o, s = run.out
  assert o.dtype == jnp.bfloat16 and s.dtype == jnp.float32, f"{run.msg} {o.dtype} {s.dtype}"
  for g, x in zip(run.grads, run.low):
    assert g.dtype == jnp.asarray(x).dtype, f"{run.msg} gradient dtype {g.dtype}"


_ALL6 = (0, 1, 2, 3, 4, 5)
_DELTA = Op(
    reference=delta_reference.recurrent_gated_delta_rule,
    cases={
        # T = 130: two full chunks of 64 and a padded one; tokens at the decay clamp
        "b2_t130": Case(lambda r: delta_inputs(r, 2, 130, 2, 16, 8, clamp=True), _ALL6),
        # T = 100 = 3 x 32 + 4: a padded tail; with Dv = 8 and block_v 4: two Dv blocks
        "b1_t100_dv8": Case(lambda r: delta_inputs(r, 1, 100, 2, 16, 8), _ALL6),
        "b1_t100_dv16": Case(lambda r: delta_inputs(r, 1, 100, 2, 16, 16), _ALL6),
        "b2_t100_dv32": Case(lambda r: delta_inputs(r, 2, 100, 2, 16, 32), _ALL6),
        # bf16 q, k, v (bf16 matmul operands inside the kernels)
        "bf16_t64": Case(lambda r: delta_inputs(r, 1, 64, 1, 16, 16), (), 3e-2,
                         low=_bf16((0, 1, 2))),
        "bf16_t64_grads": Case(lambda r: delta_inputs(r, 1, 64, 1, 16, 16), (0, 1, 2, 3, 4),
                               3e-2, 3e-2, low=_bf16((0, 1, 2)), extra=_bf16_rule_dtypes),
    },
    impls={
        "chunked": Impl(lambda *a: delta_reference.chunk_gated_delta_rule(*a[:5], 64, a[5]),
                        ("b2_t130",)),
        # the XLA prep; two Dv blocks in the recurrence kernels
        "kernel_xla_prep": Impl(_rule(DeltaRuleOptions(chunk=32, prep="xla", block_v=4,
                                                       block_v_bwd=4)),
                                ("b1_t100_dv8", "bf16_t64")),
        # the Pallas prep: chunk 32 (two 16-row sub-blocks) or 64 (four); Dv blocks of 8 in the
        # recurrence kernels, two column blocks (8 of Dk = 16) in the per-chunk backward kernels
        "kernel_c32": Impl(_rule(DeltaRuleOptions(chunk=32, block_v=8, block_v_bwd=8,
                                                  block_k_grads=8)), ("b1_t100_dv16",)),
        "kernel_c64": Impl(_rule(DeltaRuleOptions(chunk=64, block_v=8, block_v_bwd=8,
                                                  block_k_grads=8)), ("b2_t100_dv32",)),
        # the prep's forward as one kernel (the default is three: A, the inverse, W / Uv)
        "kernel_c32_fused_prep": Impl(_rule(DeltaRuleOptions(chunk=32, prep_fwd="fused",
                                                             block_v=8, block_v_bwd=8,
                                                             block_k_grads=8)),
                                      ("b1_t100_dv16",)),
        # the differentiated forward keeps W, Uv, T and the states; the recurrence's kernels
        # (forward, dS, per-chunk gradients) make P, Qg, Kd from q, k and the decays
        "kernel_c64_qk_residuals": Impl(_rule(DeltaRuleOptions(
            chunk=64, residuals="qk", block_v=8, block_v_bwd=8, block_k_grads=8)),
            ("b2_t100_dv32", "bf16_t64_grads")),
        # the prep's backward reads the saved P (dP o P) instead of rebuilding Q K^T
        "kernel_c64_prep_bwd_p": Impl(_rule(DeltaRuleOptions(
            chunk=64, prep_bwd_p=True, block_v=8, block_v_bwd=8, block_k_grads=8)),
            ("b2_t100_dv32",)),
        # the forward's outputs by a kernel parallel over chunks, from the saved states
        "kernel_c64_split_out": Impl(_rule(DeltaRuleOptions(chunk=64, fwd_o="split", block_v=8,
                                                            block_v_bwd=8, block_k_grads=8)),
                                     ("b2_t100_dv32",)),
        # bf16 saved states (the forward and dS kernels write them)
        "kernel_bf16_states": Impl(_rule(DeltaRuleOptions(chunk=32, block_v=4, block_v_bwd=4,
                                                          block_k_grads=8,
                                                          state_dtype="bfloat16")),
                                   ("bf16_t64_grads",)),
    })


def _xla_prep(q, k, v, la, b, chunk=64):
  """The chunk quantities by the XLA prep (float32, autodiff), in the Pallas prep's layout."""
  w, uv, p, qg, kd, ge = delta_kernel._prep(q, k, v, la, b, chunk)
  return w, uv, p, qg, kd, jnp.broadcast_to(ge[..., None], ge.shape + (chunk,))


def _pallas_prep(q, k, v, la, b, chunk=64, prep_fwd="split", inverse_diag="series"):
  opts = DeltaRuleOptions(chunk=chunk, num_warps_prep=4, num_stages=1, block_k_grads=8,
                          prep_fwd=prep_fwd, inverse_diag=inverse_diag)
  f32 = jnp.dtype(jnp.float32)
  plan = delta_kernel._Plan(opts, chunk, q.shape[2], f32, f32, f32, not on_gpu())
  return delta_kernel._prep_pallas(q, k, v, la, b, plan)


_DELTA_PREP = Op(
    reference=_xla_prep,
    # chunk 64: four sub-blocks, the whole block-inverse recursion; Dv = 32 != Dk
    cases={"t128_dv32": Case(lambda r: delta_inputs(r, 1, 128, 1, 16, 32)[:5], (0, 1, 2, 3, 4),
                             1e-5, 1e-5)},
    impls={"pallas": Impl(_pallas_prep, ("t128_dv32",)),
           "pallas_fused": Impl(lambda *a: _pallas_prep(*a, prep_fwd="fused"), ("t128_dv32",)),
           # the prep's forward as two kernels (A; the inverse with W / Uv) and the inverse's
           # diagonal blocks by forward substitution (the defaults: three kernels, the series);
           # the rule composes the prep's custom_vjp as it is tested here
           "pallas_split2_substitution": Impl(
               lambda *a: _pallas_prep(*a, prep_fwd="split2", inverse_diag="substitution"),
               ("t128_dv32",))})


def _strict(shape):
  return lambda r: (np.tril(r.uniform(-1, 1, shape), -1).astype(F32),)


_INVERSE = Op(
    reference=lambda a: delta_reference.unit_lower_inverse(jnp.tril(a, -1)),
    cases={"c1": Case(_strict((3, 1, 1))), "c16": Case(_strict((3, 16, 16))),
           "c64": Case(_strict((3, 64, 64))),
           "c32_grad": Case(_strict((2, 32, 32)), (0,), 1e-5, 1e-5)},
    impls={"series_custom_vjp": Impl(delta_kernel.unit_lower_inverse,
                                     ("c1", "c16", "c64", "c32_grad"))})


# ----------------------------------------------------------------------------- GSA
def _qkv_sel(b, t, h, d, kmax):
  def make(rng):
    q, k, v = (rng.standard_normal((b, t, h, d)).astype(F32) for _ in range(3))
    return q, k, v, selection(rng, b, t, kmax)
  return make


def _gsa_kernel(**tiles):
  opts = GSAKernelOptions(**tiles)
  return lambda q, k, v, sel: sa_kernel.gsa_attention(q, k, v, sel, opts)


_ATTENTION = Op(
    reference=lambda q, k, v, sel: sa_reference.attend(q, k, v, sel, 16, "gather"),
    # T = 72 is not a multiple of the tiles; k_t from 1 to k_max; the union lists span several
    # block_k chunks, the key lists several block_qc chunks
    cases={"b2_t72_k24": Case(_qkv_sel(2, 72, 2, 32, 24), (0, 1, 2), 1e-5, 1e-5)},
    impls={
        "kernel_tiles16": Impl(_gsa_kernel(block_q=16, block_k=16, block_kb=16, block_qc=16),
                               ("b2_t72_k24",)),
        "kernel_tiles64_position": Impl(_gsa_kernel(block_q=64, block_k=32, block_kb=64,
                                                    block_qc=32, key_order="position"),
                                        ("b2_t72_k24",)),
        "dense_masked": Impl(lambda q, k, v, sel: sa_reference.attend(q, k, v, sel, 16,
                                                                      "dense_masked"),
                             ("b2_t72_k24",)),
        "flash": Impl(sa_api.flash_attention, ("b2_t72_k24",)),
    })


def _indexer_inputs(rng):
  b, nq, t, hi, di = 2, 40, 80, 4, 16
  return (3.0 * rng.standard_normal((b, nq, hi, di)).astype(F32),
          rng.standard_normal((b, t, di)).astype(F32), rng.standard_normal((b, nq, hi)).astype(F32),
          rng.standard_normal(hi).astype(F32), np.arange(nq, dtype=np.int32) + 30)


_INDEXER = Op(
    reference=sa_reference.indexer_scores,
    # Q and T not multiples of the tiles; queries offset into the sequence as in a query chunk
    cases={"b2_q40_t80": Case(_indexer_inputs)},
    impls={"kernel": Impl(lambda *a: sa_kernel.indexer_scores(*a, block_q=16, block_k=32),
                          ("b2_q40_t80",))})


# ----------------------------------------------------------------------------- TQP base matmul
def _em_inputs(e, c, n, o, bits):
  def make(rng):
    return (rng.standard_normal((e, c, n)).astype(F32),) + _quantized(rng, e, o, n, bits)
  return make


def _em_kernel(**kw):
  return lambda xr, codes, norms, levels, bits: em_kernel.tqp_matmul(xr, codes, norms, levels,
                                                                     bits, **kw)


_TILES = dict(block_m=16, block_n=32, block_k=32)
_EXPERT_MATMUL = Op(
    reference=em_reference.dequantized_matmul,
    # 3 experts, 30 rows (padded to the 16-row tile), n = 64, 48 outputs (padded to 2 x 32)
    cases={"bits4": Case(_em_inputs(3, 30, 64, 48, 4), static=dict(bits=4)),
           "bits8": Case(_em_inputs(3, 30, 64, 48, 8), static=dict(bits=8)),
           "bits4_n1024": Case(_em_inputs(2, 5, 1024, 16, 4), static=dict(bits=4))},
    impls={
        "pallas_split": Impl(_em_kernel(**_TILES, x_layout="split"), ("bits4",)),
        "pallas_strided": Impl(_em_kernel(**_TILES, x_layout="strided"), ("bits4",)),
        "pallas_select_w_first": Impl(_em_kernel(**_TILES, lookup="select", w_first=True),
                                      ("bits4",)),
        "pallas_w_first": Impl(_em_kernel(**_TILES, w_first=True), ("bits8",)),
        # the input already in the [even | odd] layout (what rotate(split=True) writes)
        "pallas_presplit": Impl(lambda xr, *a, bits: em_kernel.tqp_matmul(
            em_kernel.split_even_odd(xr), *a, bits, x_layout="presplit", block_m=16,
            block_n=16), ("bits4_n1024",)),
    })


def _unsplit(y):
  """The inverse of split_even_odd: [even | odd] columns back to the natural order."""
  lead, n = y.shape[:-1], y.shape[-1]
  return jnp.swapaxes(y.reshape(lead + (2, n // 2)), -1, -2).reshape(y.shape)


_ROTATE = Op(
    reference=em_reference.rotate,
    # n = 1024 (32 x 32), 10 rows: a padded row block of 8
    cases={"n1024": Case(lambda r: (r.standard_normal((2, 5, 1024)).astype(F32),
                                    r.choice([-1, 1], 1024).astype(np.int8)))},
    impls={"pallas_split": Impl(lambda x, s: _unsplit(em_kernel.rotate(x, s, split=True,
                                                                       block_rows=8)),
                                ("n1024",)),
           "pallas": Impl(lambda x, s: em_kernel.rotate(x, s, block_rows=8), ("n1024",))})


# ----------------------------------------------------------------------------- MoE dispatch
def _round(rng):
  n, k, d, rows = 11, 3, 5, 29
  src, slot, _ = random_round(rng, n, k, rows, keep=0.7)
  return (rng.standard_normal((n, d)).astype(F32), rng.standard_normal((rows, d)).astype(F32),
          rng.uniform(0.1, 1.0, (n, k)).astype(F32), src, slot)


def _no_grad_to_dropped(run):
  """Dropped assignments get no gate gradient, empty rows no ys gradient (exactly)."""
  _, _, _, src, slot = run.inputs
  if len(run.grads) == 2:
    gy, gg = (np.asarray(g) for g in run.grads)
    assert np.all(gg[slot == gy.shape[0]] == 0.0), run.msg
    assert np.all(gy[src == slot.size] == 0.0), run.msg


_DISPATCH_ROWS = Op(
    reference=lambda x, ys, gates, src, slot: dispatch_reference.dispatch_rows(x, src, slot),
    cases={"n11_k3_r29": Case(_round, (0,))},
    impls={"gather_vjp": Impl(lambda x, ys, gates, src, slot: dispatch_api.dispatch_rows(
        x, src, slot), ("n11_k3_r29",))})
_COMBINE_ROWS = Op(
    reference=lambda x, ys, gates, src, slot: dispatch_reference.combine_rows(ys, gates, src,
                                                                              slot),
    cases={"n11_k3_r29": Case(_round, (1, 2), extra=_no_grad_to_dropped)},
    impls={"gather_vjp": Impl(lambda x, ys, gates, src, slot: dispatch_api.combine_rows(
        ys, gates, src, slot), ("n11_k3_r29",))})


# ----------------------------------------------------------------------------- norms, head, mHC
def _norm_inputs(rng):
  return ((3.0 * rng.standard_normal((2, 7, 48))).astype(F32),
          (1.0 + 0.3 * rng.standard_normal(48)).astype(F32))


def _norm_bf16_forward_exact(run):
  """On a bf16 input the forward equals the plain formula bit for bit (the reversible stack's
  exact recompute relies on it); the gradients keep the inputs' dtypes."""
  same = norm_reference.rms_norm(run.low[0], run.low[1], 1e-6)
  assert bool(jnp.all(run.out == same)), run.msg
  assert run.grads[0].dtype == jnp.bfloat16 and run.grads[1].dtype == jnp.float32, run.msg


_RMS_NORM = Op(
    reference=norm_reference.rms_norm,
    cases={"f32": Case(_norm_inputs, (0, 1), 1e-5, 1e-5, static=dict(eps=1e-6)),
           "bf16": Case(_norm_inputs, (0, 1), 1e-2, 2e-2, static=dict(eps=1e-6),
                        low=_bf16((0,)), extra=_norm_bf16_forward_exact)},
    impls={"custom_vjp": Impl(norm_api.rms_norm, ("f32", "bf16"))})


def _ce_inputs(rng):
  b, t, d, v = 2, 37, 8, 50
  return (rng.standard_normal((b, t, d)).astype(F32), rng.standard_normal((d, v)).astype(F32),
          rng.integers(0, v, (b, t)).astype(np.int32))


def _dw_stays_float32(run):
  assert run.grads[1].dtype == jnp.float32, run.msg


_HEAD_CE = Op(
    reference=ce_reference.cross_entropy,
    cases={"b2_t37": Case(_ce_inputs, (0, 1)),
           "b2_t37_bf16": Case(_ce_inputs, (0, 1), 2e-2, 2e-2, extra=_dw_stays_float32)},
    impls={
        # seq chunks of 8 (ragged: 37 = 4 x 8 + 5) and all 37 at once
        "chunk16": Impl(lambda h, w, tg: ce_api.chunked_cross_entropy(h, w, tg, 16),
                        ("b2_t37",)),
        "chunk1000": Impl(lambda h, w, tg: ce_api.chunked_cross_entropy(h, w, tg, 1000),
                          ("b2_t37",)),
        # the two rows as two passes through the head in one scan (model.loss_fn's MTP path):
        # the mean of the passes' means is the mean over both rows
        "two_passes_chunk16": Impl(
            lambda h, w, tg: sum(ce_api.chunked_cross_entropies([h[:1], h[1:]], w,
                                                                [tg[:1], tg[1:]], 16)) / 2,
            ("b2_t37",)),
        # bf16 compute: the logit cotangent rounded to bf16 before both backward matmuls
        "chunk16_bf16": Impl(lambda h, w, tg: ce_api.chunked_cross_entropy(h, w, tg, 16,
                                                                           jnp.bfloat16),
                             ("b2_t37_bf16",)),
        # the training loss's head (model.ce_impl=fused): the gradient computed in the forward
        # and scaled by the loss's cotangent; two passes weighted 1/2 each are the mean of both
        "fused_chunk16": Impl(lambda h, w, tg: ce_api.fused_cross_entropy_loss(
            [h], w, [tg], 16)[0], ("b2_t37",)),
        "fused_two_passes_chunk16": Impl(lambda h, w, tg: ce_api.fused_cross_entropy_loss(
            [h[:1], h[1:]], w, [tg[:1], tg[1:]], 16, weights=(0.5, 0.5))[0], ("b2_t37",)),
        "fused_chunk16_bf16": Impl(lambda h, w, tg: ce_api.fused_cross_entropy_loss(
            [h], w, [tg], 16, jnp.bfloat16)[0], ("b2_t37_bf16",)),
        # model.ce_logits=compute: the logits GEMM writes bf16 (the reference's fused CE)
        "fused_chunk16_bf16_logits": Impl(lambda h, w, tg: ce_api.fused_cross_entropy_loss(
            [h], w, [tg], 16, jnp.bfloat16, logits="compute")[0], ("b2_t37_bf16",)),
        "chunk16_bf16_logits": Impl(lambda h, w, tg: ce_api.chunked_cross_entropy(
            h, w, tg, 16, jnp.bfloat16, "compute"), ("b2_t37_bf16",)),
    })


def _sinkhorn_logits(*shape):
  return lambda r: ((0.5 * r.standard_normal(shape)).astype(F32),)


def _sinkhorn_case(*shape, iters=20, eps=1e-6):
  return Case(_sinkhorn_logits(*shape), (0,), static={"iters": iters, "eps": eps})


_SINKHORN = Op(
    reference=sinkhorn_reference.sinkhorn,
    cases={"256x4x4": _sinkhorn_case(256, 4, 4),
           # ragged: 300 tokens = 2 x 128 + a padded block; batch dims, 74 tokens in one block
           "300x4x4": _sinkhorn_case(300, 4, 4),
           "2x37x4x4": _sinkhorn_case(2, 37, 4, 4),
           # few rounds, a large eps (the backward's eps terms matter), n = 3 and n = 8. (The
           # reference differentiates through the row max, the op does not: a difference of
           # order eps / row sum, 6e-4 at 1 round and eps 1e-3; tests/test_sinkhorn.py compares
           # the kernel with the rolled loop there.)
           "2x37x4x4_iters3_eps1e-3": _sinkhorn_case(2, 37, 4, 4, iters=3, eps=1e-3),
           "50x3x3_iters1": _sinkhorn_case(50, 3, 3, iters=1),
           "20x8x8_iters4": _sinkhorn_case(20, 8, 8, iters=4)},
    impls={
        "rolled": Impl(lambda x, iters, eps: sinkhorn_api.sinkhorn(x, iters, eps, "rolled"),
                       ("256x4x4",)),
        "kernel": Impl(sinkhorn_api.kernel.sinkhorn,
                       ("256x4x4", "300x4x4", "2x37x4x4_iters3_eps1e-3",
                        "50x3x3_iters1", "20x8x8_iters4")),
        # 64 tokens a program: 5 programs, the last padded
        "kernel_block64": Impl(lambda x, iters, eps: sinkhorn_api.kernel.sinkhorn(
            x, iters, eps, block=64, num_warps=2), ("300x4x4",)),
        # through the api (off GPU forced into the interpreter)
        "api_kernel": Impl(lambda x, iters, eps: sinkhorn_api.sinkhorn(
            x, iters, eps, "kernel", interpret=None if on_gpu() else True), ("2x37x4x4",)),
    })


def _stream_grad_inputs(n, s, d, m, gw_scale=0.02):
  """x, dxp [N, S, d], dv [N, d], r > 0, c, hp in (0, 1), hr doubly stochastic-ish, dz, gw."""
  def make(rng):
    g = lambda *shape: rng.standard_normal(shape).astype(F32)
    hr = rng.uniform(0.0, 1.0, (n, s, s)).astype(F32)
    return (g(n, s, d), g(n, s, d), g(n, d), rng.uniform(0.5, 2.0, n).astype(F32), g(n),
            rng.uniform(0.0, 1.0, (n, s)).astype(F32), hr / hr.sum(-1, keepdims=True), g(n, m),
            (gw_scale * g(s * d, m)).astype(F32))
  return make


def _stream_grad_bf16(inputs):
  """The state, its gradients and gw as a bf16 state's step has them."""
  return tuple(jnp.asarray(a, jnp.bfloat16) if i in (0, 1, 2, 8) else a
               for i, a in enumerate(inputs))


def _stream_grad_kernel(**kw):
  return lambda *a: sg_api.kernel.state_grad(*a, **kw)


_STREAM_GRAD = Op(
    reference=sg_reference.state_grad,
    cases={"128x4x256_m24": Case(_stream_grad_inputs(128, 4, 256, 24)),
           # a bf16 state: the output is rounded to bf16 once (2^-9)
           "128x4x256_m24_bf16": Case(_stream_grad_inputs(128, 4, 256, 24), tol=4e-3,
                                      low=_stream_grad_bf16),
           # two streams, m = 8 (padded to 16), float32 gw (product=mma: the three-part dot)
           "64x2x128_m8": Case(_stream_grad_inputs(64, 2, 128, 8, gw_scale=1.0))},
    impls={
        "kernel": Impl(_stream_grad_kernel(), ("128x4x256_m24", "128x4x256_m24_bf16",
                                               "64x2x128_m8")),
        "kernel_blocks32": Impl(_stream_grad_kernel(block_n=32, block_d=64, num_warps=2),
                                ("64x2x128_m8",)),
        "kernel_mma": Impl(_stream_grad_kernel(product="mma"), ("128x4x256_m24",
                                                                "128x4x256_m24_bf16",
                                                                "64x2x128_m8")),
        # the api on [B, T, ...] inputs (off GPU forced into the interpreter)
        "api_kernel": Impl(lambda *a: sg_api.state_grad(
            *(x.reshape((2, -1) + x.shape[1:]) if i < 8 else x for i, x in enumerate(a)),
            impl="kernel", interpret=None if on_gpu() else True).reshape(a[0].shape),
            ("128x4x256_m24",)),
    })


def _mix_inputs(n, s, d):
  def make(rng):
    g = lambda *shape: rng.standard_normal(shape).astype(F32)
    return g(n, s, d), g(n, s, d), g(n, d), rng.uniform(0.0, 2.0, (n, s)).astype(F32)
  return make


_MIX_GRADS = Op(
    reference=sg_reference.mix_grads,
    cases={"64x4x256": Case(_mix_inputs(64, 4, 256)),
           # bf16 state and y: dy is rounded to bf16 once, the sums stay float32
           "64x4x256_bf16": Case(_mix_inputs(64, 4, 256), tol=4e-3, low=lambda a: tuple(
               jnp.asarray(x, jnp.bfloat16) if i < 3 else x for i, x in enumerate(a))),
           "32x3x128": Case(_mix_inputs(32, 3, 128))},
    impls={
        "kernel": Impl(lambda *a: sg_api.kernel.mix_grads(*a),
                       ("64x4x256", "64x4x256_bf16", "32x3x128")),
        "kernel_blocks32": Impl(lambda *a: sg_api.kernel.mix_grads(
            *a, block_n=32, block_d=64, num_warps=2), ("64x4x256",)),
        "api_kernel": Impl(lambda *a: jax.tree_util.tree_map(
            lambda o: o.reshape((-1,) + o.shape[2:]), sg_api.mix_grads(
                *(x.reshape((2, -1) + x.shape[1:]) for x in a), impl="kernel",
                interpret=None if on_gpu() else True)), ("64x4x256",)),
    })


REGISTRY = {
    "delta_rule": _DELTA, "delta_rule.prep": _DELTA_PREP,
    "delta_rule.unit_lower_inverse": _INVERSE,
    "sparse_attention": _ATTENTION, "sparse_attention.indexer_scores": _INDEXER,
    "expert_matmul": _EXPERT_MATMUL, "expert_matmul.rotate": _ROTATE,
    "dispatch.dispatch_rows": _DISPATCH_ROWS, "dispatch.combine_rows": _COMBINE_ROWS,
    "rms_norm": _RMS_NORM, "head_ce": _HEAD_CE, "sinkhorn": _SINKHORN,
    "stream_grad": _STREAM_GRAD, "stream_grad.mix_grads": _MIX_GRADS,
}


def checks() -> list:
  """Every (op, implementation, case) the registry holds."""
  return [(op, impl, case) for op, o in REGISTRY.items() for impl, i in o.impls.items()
          for case in i.cases]


def _loss(fn, cts, static):
  def f(*diffed_and_rest):
    out = fn(*diffed_and_rest, **static)
    leaves = jax.tree_util.tree_leaves(out)
    return sum(jnp.sum(x.astype(jnp.float32) * c) for x, c in zip(leaves, cts)), out
  return f


def check(op: str, impl: str, case: str, seed: int) -> Run:
  """One implementation on one case against the reference (AssertionError naming the seed)."""
  o = REGISTRY[op]
  c = o.cases[case]
  fn = o.impls[impl].fn
  rng = np.random.default_rng(seed)
  inputs = c.make(rng)
  low = c.low(inputs) if c.low else inputs
  msg = f"{op} [{impl}] on {case}, seed={seed}:"
  ref_shapes = jax.eval_shape(lambda *a: o.reference(*a, **c.static), *inputs)
  cts = [rng.standard_normal(s.shape).astype(F32) for s in jax.tree_util.tree_leaves(ref_shapes)]

  def run(f, xs):
    loss = _loss(f, cts, c.static)
    if not c.diff:
      return jax.jit(lambda *a: f(*a, **c.static))(*xs), ()
    (_, out), g = jax.jit(jax.value_and_grad(loss, argnums=c.diff, has_aux=True))(*xs)
    return out, g
  out, grads = run(fn, low)
  ref_out, ref_grads = run(o.reference, inputs)
  got, want = jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(ref_out)
  assert len(got) == len(want), f"{msg} {len(got)} outputs, the reference has {len(want)}"
  for i, (a, b) in enumerate(zip(got, want)):
    assert a.shape == b.shape, f"{msg} output {i} shape {a.shape} != {b.shape}"
    assert np.isfinite(np.asarray(b, np.float32)).any(), f"{msg} reference output {i} not finite"
    err = rel_err(np.asarray(a, np.float32), np.asarray(b, np.float32))
    assert err <= c.tol, f"{msg} output {i} rel err {err:.2e} > {c.tol:.0e}"
  for pos, a, b in zip(c.diff, grads, ref_grads):
    assert np.linalg.norm(np.asarray(b, np.float64)) > 0, f"{msg} reference d(input {pos}) is 0"
    err = rel_err(np.asarray(a, np.float32), np.asarray(b, np.float32))
    assert err <= c.grad_tol, f"{msg} d(input {pos}) rel err {err:.2e} > {c.grad_tol:.0e}"
  result = Run(inputs, low, out, ref_out, tuple(grads), tuple(ref_grads), msg)
  if c.extra:
    c.extra(result)
  return result


# ----------------------------------------------------------------------------- GPU lowering
@dataclasses.dataclass(frozen=True)
class Lowering:
  """build() -> (fn, args) lowered for CUDA; kernels: names the lowered module must hold."""
  build: Callable
  kernels: tuple


def _fwd_bwd(rule, n):
  def f(*a):
    o, vjp = jax.vjp(rule, *a[:n])
    return o, vjp(o)
  return f


def _delta_lowering(primal=False, **options):
  """Every kernel of the default path (prep, recurrence, their backwards), bf16 inputs,
  chunk 64, bf16 saved states; primal=True: the undifferentiated rule alone (its lean path)."""
  def build():
    q, k, v, la, b, _ = delta_inputs(np.random.default_rng(0), 1, 128, 2, 32, 32)
    q, k, v = (jnp.asarray(a, jnp.bfloat16) for a in (q, k, v))
    opts = DeltaRuleOptions(chunk=64, block_v=16, block_v_bwd=32, block_k_grads=16,
                            state_dtype="bfloat16", gpu_lowering=True, **options)
    rule = lambda *x: delta_kernel.chunk_gated_delta_rule(*x, options=opts)[0]
    return (rule if primal else _fwd_bwd(rule, 5)), (q, k, v, la, b)
  return build


def _gsa_lowering(**tiles):
  """Forward, dQ and dK/dV in bf16 at a shape that is not a power of two (T = 80, k_max 20)."""
  def build():
    q = jnp.zeros((2, 80, 2, 64), jnp.bfloat16)
    sel = jnp.zeros((2, 80, 20), jnp.int32)
    opts = GSAKernelOptions(gpu_lowering=True, **tiles)
    rule = lambda q, k, v, s: sa_kernel.gsa_attention(q, k, v, s, opts)
    return _fwd_bwd(lambda q, k, v, s=sel: rule(q, k, v, s), 3), (q, q, q)
  return build


def _indexer_lowering():
  bf = lambda a: jnp.asarray(a, jnp.bfloat16)
  qi, ki, wi, bias, pos = _indexer_inputs(np.random.default_rng(0))
  return (lambda *a: sa_kernel.indexer_scores(*a, gpu_lowering=True)), \
      (bf(qi), bf(ki), bf(wi), bias, pos)


_S = jax.ShapeDtypeStruct


def _em_args(bits, n=4096, o=1024):
  """One device's 120B gate/up shape: 58 experts x 13824 rows, 4096 -> 1024."""
  return (_S((58, 13824, n), jnp.bfloat16), _S((58, o, n * bits // 8), jnp.uint8),
          _S((58, o), jnp.float32), _S((2 ** bits,), jnp.float32))


def _em_lowering(bits, **kw):
  def build():
    return (lambda x, cd, nr, lv: em_kernel.tqp_matmul(x, cd, nr, lv, bits, gpu_lowering=True,
                                                       **kw)), _em_args(bits)
  return build


def _adapter_lowering(bits):
  def build():
    return (lambda x, cd, nr, lv, xb, a: em_kernel.tqp_matmul_adapter(
        x, cd, nr, lv, bits, xb, a, gpu_lowering=True)), _em_args(bits) + (
            _S((58, 13824, 16), jnp.bfloat16), _S((58, 1024, 16), jnp.bfloat16))
  return build


def _rotate_lowering(split):
  def build():
    return (lambda x, s: em_kernel.rotate(x, s, split=split, gpu_lowering=True)), \
        (_S((58, 13824, 4096), jnp.bfloat16), _S((4096,), jnp.int8))
  return build


def _sinkhorn_lowering():
  """Forward and backward at the model's shape, [B, T, 4, 4] (8,192 tokens), 20 rounds."""
  rule = lambda x: sinkhorn_api.kernel.sinkhorn(x, 20, 1e-6, gpu_lowering=True)
  return _fwd_bwd(rule, 1), (_S((2, 4096, 4, 4), jnp.float32),)


def _stream_grad_lowering(product="fma"):
  """stage_2b's shape at B1 x T4096: 4 streams of 4096, bf16 state and gw, m = 24."""
  n, s, d, m = 4096, 4, 4096, 24
  bf, f = jnp.bfloat16, jnp.float32
  return (lambda *a: sg_api.kernel.state_grad(*a, product=product, gpu_lowering=True)), (
      _S((n, s, d), bf), _S((n, s, d), bf), _S((n, d), bf), _S((n,), f), _S((n,), f),
      _S((n, s), f), _S((n, s, s), f), _S((n, m), f), _S((s * d, m), bf))


_TRITON = "__gpu$xla.gpu.triton"
LOWERINGS = {
    "delta_rule": Lowering(_delta_lowering(), ("gdr_prep_a", "gdr_prep_inv", "gdr_prep_wy",
                                               "gdr_chunk_fwd", "gdr_chunk_bwd_states",
                                               "gdr_chunk_bwd_grads", "gdr_prep_bwd")),
    "delta_rule.fused_prep": Lowering(_delta_lowering(prep_fwd="fused"),
                                      ("gdr_prep_fwd", "gdr_chunk_fwd", "gdr_prep_bwd")),
    "delta_rule.split2": Lowering(_delta_lowering(prep_fwd="split2"),
                                  ("gdr_prep_a", "gdr_prep_inv_wy", "gdr_chunk_fwd")),
    "delta_rule.qk_residuals": Lowering(_delta_lowering(residuals="qk"),
                                        ("gdr_prep_a_only", "gdr_chunk_fwd_qk",
                                         "gdr_chunk_bwd_states_qk", "gdr_chunk_bwd_grads_qk",
                                         "gdr_prep_bwd")),
    # undifferentiated: the prep writes A, W, Uv; the recurrence makes P, Qg, Kd, keeps no states
    "delta_rule.primal": Lowering(_delta_lowering(primal=True),
                                  ("gdr_prep_a_only", "gdr_prep_inv", "gdr_prep_wy",
                                   "gdr_chunk_fwd_qk")),
    "delta_rule.split_out": Lowering(_delta_lowering(fwd_o="split"),
                                     ("gdr_chunk_fwd_states", "gdr_chunk_fwd_out",
                                      "gdr_chunk_bwd_states")),
    "sparse_attention": Lowering(_gsa_lowering(), ("gsa_fwd", "gsa_dq", "gsa_dkv")),
    # two mask words, position-ordered key blocks
    "sparse_attention.tiles64": Lowering(
        _gsa_lowering(block_q=64, block_kb=64, block_k=32, block_qc=32, num_warps=8,
                      key_order="position"), ("gsa_fwd", "gsa_dq", "gsa_dkv")),
    "sparse_attention.indexer_scores": Lowering(_indexer_lowering, ("gsa_indexer_scores",)),
    "expert_matmul.bits4": Lowering(_em_lowering(4), (_TRITON, "tqp4_expert_matmul")),
    "expert_matmul.bits8": Lowering(_em_lowering(8), (_TRITON, "tqp8_expert_matmul")),
    "expert_matmul.bits4_select_w_first": Lowering(
        _em_lowering(4, lookup="select", w_first=True), (_TRITON, "tqp4_expert_matmul")),
    "expert_matmul.bits4_strided": Lowering(_em_lowering(4, x_layout="strided"),
                                            (_TRITON, "tqp4_expert_matmul")),
    "expert_matmul.bits4_adapter": Lowering(_adapter_lowering(4), ("tqp4_expert_matmul",)),
    "expert_matmul.bits8_adapter": Lowering(_adapter_lowering(8), ("tqp8_expert_matmul",)),
    "expert_matmul.rotate_split": Lowering(_rotate_lowering(True), ("tqp_rotate",)),
    "expert_matmul.rotate": Lowering(_rotate_lowering(False), ("tqp_rotate",)),
    "sinkhorn": Lowering(_sinkhorn_lowering, (_TRITON, "sinkhorn_fwd", "sinkhorn_bwd")),
    "stream_grad": Lowering(_stream_grad_lowering, (_TRITON, "stream_state_grad")),
    "stream_grad.mma": Lowering(lambda: _stream_grad_lowering("mma"),
                                (_TRITON, "stream_state_grad")),
    "stream_grad.mix_grads": Lowering(lambda: (
        lambda *a: sg_api.kernel.mix_grads(*a, gpu_lowering=True),
        (_S((4096, 4, 4096), jnp.bfloat16), _S((4096, 4, 4096), jnp.bfloat16),
         _S((4096, 4096), jnp.bfloat16), _S((4096, 4), jnp.float32))),
        (_TRITON, "stream_mix_grads")),
}


def check_lowering(name: str) -> str:
  """Lower one entry of LOWERINGS for CUDA; AssertionError when a kernel is missing."""
  fn, args = LOWERINGS[name].build()
  text = lower_for_gpu(fn, *args)
  for kernel in LOWERINGS[name].kernels:
    assert kernel in text, f"{name}: {kernel} missing from the lowered module"
  return text
