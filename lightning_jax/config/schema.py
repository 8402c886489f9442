"""The config schema: every field declared once (issue 19).

Each `Field` names its dotted path, its default, one line of help, the values it may take
(`choices`, or a `check` by name), the section switch that has to be on for the check to apply
(`when`), and whether it may change when a run resumes (`resume`: "fixed" or "free"). From this
one table come:
  * `base_config()`: the base ConfigDict every stage file starts from (configs/common.py);
  * `check_fields(cfg)`: each field's type and allowed values, and unknown fields, at load;
  * `complete(cfg)`: a config stored by an older version, with the fields it lacks filled in
    (the default, or `legacy(cfg)` where the old behaviour differs) and retired fields dropped,
    so code reads `cfg.a.b` and never repeats a default;
  * `resume_view(cfg)`: the fields that must not change when a run resumes;
  * `markdown_table()`: docs/config.md.

Rules that tie several fields together (n_heads x head_dim = d_model, ...) are in
lightning_jax/config/__init__.py `validate`, which runs after `check_fields`.
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Any, Callable

from ml_collections import ConfigDict

FIXED, FREE = "fixed", "free"


@dataclasses.dataclass(frozen=True)
class Field:
  path: str
  default: Any
  help: str
  choices: tuple | None = None
  check: str | None = None        # a key of CHECKS
  when: str | None = None         # the check applies only when this field is true / > 0
  resume: str = FIXED             # may the value change when a run resumes?
  legacy: Callable | None = None  # value for a stored config that predates the field

  @property
  def kind(self) -> type:
    return type(self.default)


# name -> (predicate, message); the message gets the field's dotted name and value
CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "size": (lambda v: v > 0, "{name}={v!r} must be a positive integer (a size or count)."),
    "count": (lambda v: v >= 0, "{name}={v!r} must be an integer >= 0."),
    "positive": (lambda v: v > 0, "{name}={v} must be positive."),
    "nonneg": (lambda v: v >= 0, "{name}={v} must be >= 0."),
    "unit": (lambda v: 0 <= v <= 1, "{name}={v} must be in [0, 1]."),
    "unit_open": (lambda v: 0 <= v < 1, "{name}={v} must be in [0, 1)."),
    "fraction": (lambda v: 0 < v <= 1, "{name}={v} must be in (0, 1]."),
    "mesh_axis": (lambda v: v == -1 or v >= 1, "{name}={v} must be >= 1 (or -1 for mesh.data: "
                                               "all remaining devices)."),
}

# the fields of one data.pools entry (a stage may declare any pool names)
POOL_FIELDS = {"weight": 0.0, "always_on": False, "domains": "", "shards": "", "val_shards": ""}
# fields a stored config may hold that no longer exist (dropped by `complete`)
RETIRED = ("model.gsa.impl",)
# fields whose values changed form: a stored old value -> its meaning now
CONVERTED = {"model.remat": {True: "full", False: "none"}}


def _pool(weight: float, always_on: bool = False) -> dict:
  return {**POOL_FIELDS, "weight": float(weight), "always_on": always_on}


# the 2B stage's pools (SPEC §6): D1 web foundation, D2 web diverse, D3 code, D4 STEM, always-on
BASE_POOLS = {"D1": _pool(0.34), "D2": _pool(0.24), "D3": _pool(0.11), "D4": _pool(0.06),
              "always_on": _pool(0.25, always_on=True)}

F = Field
FIELDS: tuple[Field, ...] = (
    F("stage", "base", "name of the stage (runs/<stage> by default)", resume=FREE),
    F("phase", "", "training phase of a stage file (configs/stage_9b.py:p2); '' when it has none",
      resume=FREE),

    # ------------------------------------------------------------------ model (SPEC §2)
    F("model.d_model", 4096, "model width", check="size"),
    F("model.n_layers", 8, "layers (a multiple of the pattern length)", check="size"),
    F("model.pattern", "DDDG", "layer kinds repeated over depth: D = DeltaNet, G = GSA; layer i "
      "is G when (i+1) % 4 == 0 (SPEC §2.1)"),
    F("model.vocab_size", 131072, "vocabulary size (the output head's width)", check="size"),
    F("model.max_seq_len", 4096, "longest input sequence", check="size"),
    F("model.dtype", "bfloat16", "compute dtype", choices=("float32", "bfloat16", "float16")),
    F("model.param_dtype", "float32", "master weights' dtype", choices=("float32",)),
    F("model.norm_eps", 1e-6, "RMSNorm epsilon", check="positive"),
    F("model.use_rotary", True, "rotary position embedding everywhere (off for the last 20% of "
      "the 9B)"),
    F("model.rope_base", 10000.0, "rotary base", check="positive"),
    F("model.ffn_width", 2048, "dense SwiGLU width (2B seed; MoE stages use moe.*)", check="size",
      when="!moe.enabled"),
    F("model.ce_chunk", 1024, "tokens per cross-entropy chunk (float32 logits exist for one "
      "chunk at a time)", check="size", resume=FREE),
    F("model.ce_logits", "float32", "the dtype the head's logits GEMM writes: float32 | compute "
      "(the compute dtype, rounded once from the float32 accumulation; the softmax still runs "
      "in float32 on them, as in the reference's fused cross-entropy; the logits take half the "
      "bytes: stage_2b's head moves 32.6 GB per B1 step instead of 41.2, -0.5 ms at B1 and -2.4 "
      "ms at B4 on an H100, docs/PERFORMANCE.md, session 18)", choices=("float32", "compute"),
      resume=FREE),
    F("model.ce_impl", "fused", "the training loss's head: fused (each chunk's logit gradient "
      "and both gradient matmuls in the forward; the backward scales them) | recompute (the "
      "backward computes every chunk's logits again)", choices=("fused", "recompute"),
      resume=FREE),
    F("model.remat", "none", "what each layer keeps for its backward (in a reversible stack: "
      "within its rebuild): none (all autodiff saves) | selective (matmul outputs and kernel "
      "residuals; elementwise work recomputed) | full (the layer's input); a stored True/False "
      "reads as full/none",
      choices=("none", "selective", "full"), resume=FREE),
    F("model.unroll_layers", False, "the plain layer stack's scan over layer groups unrolled: "
      "each group's residuals are buffers of their own instead of slices of stacked ones, which "
      "the backward would copy out (compile time grows with the number of groups; plain stack "
      "only: refused with reversible.enabled)", resume=FREE),
    F("model.compat", "spec", "'spec' (SPEC.md and the reference's CPU code) or 'reference_cuda' "
      "(what the reference's CUDA kernels compute, for its released weights; docs/reference.md)",
      choices=("spec", "reference_cuda")),

    F("model.deltanet.n_heads", 32, "DeltaNet heads", check="size"),
    F("model.deltanet.head_dim", 128, "DeltaNet head width (even: interleaved rotary)",
      check="size"),
    F("model.deltanet.conv_kernel", 4, "short causal convolution width", check="size"),
    F("model.deltanet.chunk_size", 64, "delta rule chunk length (a power of two)", check="size",
      resume=FREE),
    F("model.deltanet.impl", "auto", "delta rule implementation: auto (kernel on GPU, else "
      "chunked) | chunked | recurrent | kernel", choices=("auto", "chunked", "recurrent", "kernel"),
      resume=FREE),
    F("model.deltanet.kernel.prep", "pallas", "kernel chunk prep: xla | pallas",
      choices=("xla", "pallas"), resume=FREE),
    F("model.deltanet.kernel.prep_fwd", "split", "kernel chunk prep's forward: split (three "
      "kernels: A, the inverse, W / Uv; 1.47 ms at B4 x T4096 on an H100) | fused (one kernel: "
      "2.51 ms) | split2 (two kernels: A, then the inverse with W / Uv; 0.49 ms for the second "
      "against 0.43 for the split's two, H100)",
      choices=("fused", "split", "split2"), resume=FREE),
    F("model.deltanet.kernel.inverse_diag", "series", "kernel chunk prep's 16 x 16 diagonal "
      "inverses: series (six float32 dots; the inverse kernel 0.18 ms at B4 x T4096 on an H100) "
      "| substitution (row by row: 0.29 ms)", choices=("substitution", "series"), resume=FREE),
    F("model.deltanet.kernel.wy_dtype", "dot", "kernel chunk prep's W / Uv dot operands: dot "
      "(the dot dtype, bf16 in the model, as FLA; 0.25 ms at B4 x T4096 on an H100) | float32 "
      "(TF32 on GPU: 0.46 ms)", choices=("float32", "dot"), resume=FREE),
    F("model.deltanet.kernel.residuals", "chunks", "kernel forward's residuals for the "
      "backward: chunks (the prep's P, Qg, Kd among them; the delta rule's fwd+bwd 3.86 ms at "
      "B4 x T4096 on an H100) | qk (the recurrence's kernels remake P, Qg, Kd from q, k: 4.17 "
      "ms, but stage_2b's B4 step holds 2.3 GiB less at the same step time)",
      choices=("chunks", "qk"), resume=FREE),
    F("model.deltanet.kernel.prep_bwd_p", False, "kernel chunk prep's backward reads the "
      "saved P for the decay gradient (residuals=chunks) instead of rebuilding Q K^T",
      resume=FREE),
    F("model.deltanet.kernel.num_warps_prep", 8, "kernel chunk prep's forward warps (A; W / Uv)",
      check="size", resume=FREE),
    F("model.deltanet.kernel.num_warps_inv", 2, "kernel chunk prep's inverse warps (0: "
      "num_warps_prep)", resume=FREE),
    F("model.deltanet.kernel.num_warps_prep_bwd", 4, "kernel chunk prep's backward warps",
      check="size", resume=FREE),
    F("model.deltanet.kernel.block_v", 64, "kernel forward recurrence's value-block width",
      check="size", resume=FREE),
    F("model.deltanet.kernel.num_warps", 4, "kernel forward recurrence's warps", check="size",
      resume=FREE),
    F("model.deltanet.kernel.block_k_grads", 64, "kernel per-chunk backward kernels' column "
      "block (64: prep backward 1.18 ms at B4 x T4096 on an H100; 32: 1.57)", check="size",
      resume=FREE),
    F("model.deltanet.kernel.num_warps_grads", 4, "kernel per-chunk gradient kernel's warps "
      "(4: 0.81 ms at B4 x T4096 with block_k_grads 64 on an H100; 8: 0.98)", check="size",
      resume=FREE),
    F("model.deltanet.kernel.fwd_o", "fused", "kernel recurrence forward's outputs: fused (in "
      "the sequential kernel) | split (FLA's layout: a second kernel, parallel over chunks, "
      "from the saved states; 1.09 ms against the fused 0.91 ms at B4 x T4096 on an H100)", choices=("fused", "split"),
      resume=FREE),
    F("model.deltanet.kernel.bwd", "split_pallas", "kernel recurrence backward",
      resume=FREE),
    F("model.deltanet.kernel.block_v_bwd", 32, "kernel backward value-block width", check="size",
      resume=FREE),
    F("model.deltanet.kernel.num_warps_bwd", 4, "kernel backward warps", check="size",
      resume=FREE),
    F("model.deltanet.kernel.num_stages", 2, "kernel pipeline stages", check="size", resume=FREE),
    F("model.deltanet.kernel.state_dtype", "auto", "kernel per-chunk states saved for the "
      "backward (and its dS): auto (the values' dtype, bf16 in the model: FLA's choice) | "
      "float32 | bfloat16", choices=("auto", "float32", "bfloat16"), resume=FREE),

    F("model.gsa.n_heads", 16, "GSA heads", check="size"),
    F("model.gsa.head_dim", 256, "GSA head width (even: interleaved rotary)", check="size"),
    F("model.gsa.idx_heads", 4, "indexer heads", check="size"),
    F("model.gsa.idx_dim", 128, "indexer head width", check="size"),
    F("model.gsa.k_base", 128, "base number of kept keys per query", check="size"),
    F("model.gsa.k_min", 32, "fewest kept keys per query", check="size"),
    F("model.gsa.k_max", 256, "most kept keys per query", check="size"),
    F("model.gsa.n_sinks", 4, "attention sinks always kept", check="count"),
    F("model.gsa.ema_decay", 0.99, "decay of the indexer score variance EMA", check="unit"),
    F("model.gsa.query_chunk", 512, "queries processed at once (memory bound at T=8192)",
      check="size", resume=FREE),
    F("model.gsa.var_row", "full_row", "score variance over the full row (reference: future keys "
      "count as 0) or the causal part", choices=("full_row", "causal")),
    F("model.gsa.attention", "auto", "attention over the selection: auto (flash on GPU, else "
      "gather) | gather | dense_masked | flash (cuDNN, selection mask) | kernel (Pallas)",
      choices=("auto", "gather", "dense_masked", "flash", "kernel"), resume=FREE),

    F("model.hc.n_streams", 4, "hyper-connection streams", check="size"),
    F("model.hc.sinkhorn_iters", 20, "Sinkhorn rounds for the doubly stochastic mix",
      check="size"),
    F("model.hc.sinkhorn_eps", 1e-6, "Sinkhorn epsilon", check="positive"),
    F("model.hc.sinkhorn_impl", "rolled", "Sinkhorn implementation: rolled (a lax.fori_loop) "
      "| kernel (one Pallas launch forward, one backward; -2.0% step time on the 120B rank, but "
      "on stage_2b no faster at B1 and +22 ms, +2.5 GiB at B4, with a 4x longer compile: "
      "docs/PERFORMANCE.md, session 17) | auto (the kernel on GPU, else rolled)",
      choices=("rolled", "kernel", "auto"), resume=FREE),
    F("model.hc.sinkhorn_unroll", 1, "rounds to a trip of the rolled Sinkhorn loop: XLA copies "
      "the carried matrices once a trip (stage_2b's B1 step compiled for an H100: 902 copies at 1, "
      "325 at 5 with the same plan; at 20 the plan grows 1.7 GiB). stage_2b sets 5; 1 here "
      "keeps the CPU compiles short (+10% at 5). The result is the same to rounding "
      "(docs/PERFORMANCE.md, session 18).", check="size", resume=FREE),
    F("model.hc.pre", "autodiff", "how pre() reads the streams in: autodiff (JAX's backward) | "
      "fused (the same forward with a written-out backward that reads the state three times; "
      "compiled for an H100 it moves 6.8 GB less per group of 120B rank layers and plans 0.34 GB "
      "more; timed on stage_2b in session 18 it was slower: B4 +50.7 ms, B1 +11.0 ms on an "
      "H100, docs/PERFORMANCE.md) | kernel (the autodiff forward; pre and post as a pair of "
      "custom VJPs whose backward writes the state's gradient in one Pallas kernel on GPU, "
      "ops/stream_grad; off GPU the same formulas in XLA. Measured slower: stage_2b B4 592.7 "
      "against 576.8 ms and +3.0 GiB on an H100, its state kernel at 0.76 TB/s: "
      "docs/PERFORMANCE.md, session 20)",
      choices=("autodiff", "fused", "kernel"), resume=FREE),
    F("model.hc.mix", "elementwise", "how post() mixes the streams, H_res @ x: elementwise (S "
      "broadcast products summed in float32: one pass over the state) | einsum (a batched "
      "S x S matmul per token, which XLA on GPU runs as a Triton GEMM at half the bandwidth)",
      choices=("elementwise", "einsum"), resume=FREE),

    F("model.embed.max_bytes", 32, "codec byte positions (vector width 256 x max_bytes)",
      check="size"),
    F("model.embed.form", "on_the_fly", "Kronecker codes computed on the fly from each token's "
      "bytes (about 4.5 MB) or kept as a [V, 8192] table (2.15 GB at V = 131072)",
      choices=("table", "on_the_fly")),
    F("model.embed.z_eps", 1e-6, "z-normalisation epsilon", check="positive"),
    F("model.embed.reference_text_decode", False, "reference behaviour: decode each token to text "
      "(U+FFFD collapse) before coding"),
    F("model.embed.round_codes_bf16", False, "reference behaviour: round the z-normalised codes "
      "to bfloat16 before the projection (matters in float32 compute only)"),

    F("model.mtp.enabled", True, "multi-token prediction block"),
    F("model.mtp.weight", 0.3, "weight of the MTP cross-entropy", check="nonneg"),
    F("model.mtp.reversible", False, "the MTP block's two sublayers form a midpoint stack "
      "(reversible.h, reversible.a), as the reference's 120B"),
    F("model.mtp.include_aux", False, "add the MTP block's router balance loss (the reference "
      "leaves it out)"),

    # ------------------------------------------------------------------ MoE (SPEC §2.4)
    F("moe.enabled", False, "routed experts instead of the dense FFN"),
    F("moe.router", "null_slot", "null_slot (5B/9B) | sigmoid (120B)",
      choices=("null_slot", "sigmoid"), when="moe.enabled"),
    F("moe.n_experts", 20, "routed experts", check="size", when="moe.enabled"),
    F("moe.expert_pad", 0, "routed expert slots are padded to a multiple of this (the expert-"
      "parallel width the layout is built for; 0: mesh.expert when the run is created)",
      check="count", legacy=lambda c: int(c["mesh"]["expert"])),
    F("moe.n_null", 20, "null slots of the null_slot router", check="count"),
    F("moe.top_k", 2, "experts (or null slots) per token", check="size", when="moe.enabled"),
    F("moe.expert_width", 1024, "routed expert SwiGLU width", check="size", when="moe.enabled"),
    F("moe.shared_width", 2048, "shared expert SwiGLU width", check="size", when="moe.enabled"),
    F("moe.mtp_n_experts", 20, "experts of the MTP block", check="size", when="moe.enabled"),
    F("moe.balance_weight", 0.02, "load-balance loss weight", check="nonneg", resume=FREE),
    F("moe.z_weight", 0.001, "router z-loss weight", check="nonneg", resume=FREE),
    F("moe.null_weight", 0.01, "null-rate loss weight", check="nonneg", resume=FREE),
    F("moe.null_target", 0.5, "target null rate", check="unit", resume=FREE),
    F("moe.dispatch", "dropless", "dropless | capacity", choices=("dropless", "capacity"),
      when="moe.enabled"),
    F("moe.capacity_factor", 1.25, "capacity dispatch: slots per expert over the mean",
      check="positive", resume=FREE),
    F("moe.group_pad", 128, "rows per expert group rounded up to this (dense grouped matmul)",
      check="size", when="moe.enabled", resume=FREE),
    F("moe.overflow_round", 0.25, "dropless: overflow rounds hold this fraction of the first",
      check="fraction", resume=FREE),
    F("moe.bias_gamma", 5e-5, "loss-free balancing: bias step", check="nonneg", resume=FREE),
    F("moe.bias_cap_lo", 0.0005, "loss-free balancing: lower step cap", check="nonneg",
      resume=FREE),
    F("moe.bias_cap_hi", 0.004, "loss-free balancing: upper step cap", check="nonneg",
      resume=FREE),
    F("moe.bias_ema", 0.01, "loss-free balancing: expert-use EMA rate", check="unit",
      resume=FREE),
    F("moe.bias_guard_k", 4.0, "loss-free balancing: step multiplier outside the caps",
      check="positive", resume=FREE),
    F("moe.hot_config", "", "JSON file re-read every hot_config_every steps (router knobs)",
      resume=FREE),
    F("moe.hot_config_every", 10, "steps between hot-config reads", check="size",
      when="moe.enabled", resume=FREE),

    # ------------------------------------------------------------------ reversible (SPEC §2.6)
    F("reversible.enabled", False, "midpoint reversible stack"),
    F("reversible.mode", "store_boundaries", "store_boundaries (keep each group's input) | "
      "invert (exact fixed-point inversion, O(1) activations) | store_layers (the same float "
      "integrator by plain autodiff: each layer keeps what model.remat lets it, no rebuild in "
      "the backward; the most memory, the fastest)",
      choices=("store_boundaries", "invert", "store_layers"), when="reversible.enabled",
      resume=FREE),
    F("reversible.h", 0.25, "integrator step h", check="positive", when="reversible.enabled"),
    F("reversible.a", 0.5, "midpoint mixing a (non-zero; dyadic for invert)",
      when="reversible.enabled"),
    F("reversible.fixed_point_bits", 24, "fractional bits of the exact integer state (invert)",
      resume=FREE),

    # ------------------------------------------------------------------ TQP (SPEC §4)
    F("tqp.enabled", False, "frozen quantized base experts + trained low-rank adapters"),
    F("tqp.bits", 4, "bits per base weight", choices=(4, 8), when="tqp.enabled"),
    F("tqp.rank", 16, "adapter rank", check="size", when="tqp.enabled"),
    F("tqp.seed", 0, "seed of the random rotations"),
    F("tqp.allow_pad", True, "zero-pad a non-power-of-two row to the Hadamard length (False: "
      "refuse)"),
    F("tqp.flush_every", 0, "fold the adapters into the bases every N steps (diverged at 120B; "
      "0 = off)", check="count", resume=FREE),
    F("tqp.kernel", "auto", "base expert matmul: auto (xla_rotate on GPU, else xla) | xla | "
      "xla_rotate | pallas | pallas_rotate",
      choices=("auto", "xla", "xla_rotate", "pallas", "pallas_rotate"), resume=FREE),
    F("tqp.lr_mult_router", 1.0, "LR multiplier of the routers", check="nonneg", resume=FREE),
    F("tqp.lr_mult_adapters", 3.0, "LR multiplier of the adapters", check="nonneg",
      resume=FREE),
    F("tqp.lr_mult_rest", 0.01, "LR multiplier of everything else", check="nonneg",
      resume=FREE),

    # ------------------------------------------------------------------ tokenizer (SPEC §7)
    F("tokenizer.name", "o200k_base", "o200k_base | brahmic (a built tokenizer directory in "
      "tokenizer.path)", resume=FREE),
    F("tokenizer.path", "", "directory of a built tokenizer", resume=FREE),
    F("tokenizer.id_order", "natural", "natural | frequency (permutation file beside the "
      "tokenizer)", choices=("natural", "frequency"), resume=FREE),

    # ------------------------------------------------------------------ data (SPEC §6)
    F("data.path", "", "directory of uint32 shards and their manifest"),
    F("data.seed", 0, "shuffle seed"),
    F("data.val_fraction", 0.05, "held-out share when preparing shards", check="unit"),
    F("data.num_workers", 0, "loader worker processes", check="count"),
    F("data.build_from", "", "raw .txt/.jsonl directory: shards are prepared into data.path "
      "(or <workdir>/data) when missing"),
    F("data.id_order", "frequency", "id order when building from build_from",
      choices=("natural", "frequency")),
    F("data.vocab_from_data", False, "model.vocab_size := the prepared data's compact vocabulary"),
    F("data.use_pools", False, "train on the pool mixture data.pools (docs/data.md)"),
    F("data.ranks", 0, "reader ranks of the pool mixture (0: one per process; the loader state "
      "checks its own count)", check="count", resume=FREE),
    F("data.always_on_fraction", 0.25, "share of every batch from the always-on pools",
      check="unit_open", resume=FREE),
    F("data.pools", BASE_POOLS, "name -> {weight, always_on, domains | shards, val_shards}: "
      "absolute token shares summing to 1 (weights may change between stages)"),

    # ------------------------------------------------------------------ optimiser (SPEC §5)
    F("optim.peak_lr", 1e-3, "peak learning rate", check="positive", resume=FREE),
    F("optim.start_lr", 0.0, "warmup starts here (or the previous stage's end LR)",
      check="nonneg", resume=FREE),
    F("optim.start_from", "", "previous stage's config file; start_lr := its end LR",
      resume=FREE),
    F("optim.start_from_lr", -1.0, "start_from's end LR, resolved when the run began (-1: not "
      "yet)", resume=FREE),
    F("optim.schedule_start", 0, "step at which the schedule starts (extend_schedule=restart)",
      check="count", resume=FREE),
    F("optim.warmup_steps", 1000, "warmup steps", check="count", resume=FREE),
    F("optim.schedule", "cosine", "cosine | wsd | constant",
      choices=("cosine", "wsd", "constant"), resume=FREE),
    F("optim.decay_ratio", 10.0, "end LR = peak / decay_ratio (>= 1 unless the schedule is "
      "constant)", resume=FREE),
    F("optim.stable_fraction", 0.85, "WSD: share of post-warmup steps held at peak",
      check="unit", resume=FREE),
    F("optim.b1", 0.9, "AdamW beta1", check="unit_open", resume=FREE),
    F("optim.b2", 0.95, "AdamW beta2", check="unit_open", resume=FREE),
    F("optim.eps", 1e-10, "AdamW epsilon", check="positive", resume=FREE),
    F("optim.weight_decay", 0.1, "AdamW decoupled weight decay", check="nonneg", resume=FREE),
    F("optim.clip_norm", 1.0, "global gradient-norm clip", check="positive", resume=FREE),

    # ------------------------------------------------------------------ mesh
    F("mesh.data", -1, "data-parallel axis (-1: all remaining devices)", check="mesh_axis",
      resume=FREE),
    F("mesh.expert", 1, "expert-parallel axis", check="size", resume=FREE),
    F("mesh.tensor", 1, "tensor-parallel axis", check="size", resume=FREE),

    # ------------------------------------------------------------------ checkpoints
    F("checkpoint.every_steps", 500, "save every N steps (0: off)", check="count", resume=FREE),
    F("checkpoint.every_seconds", 1800, "save every N seconds (0: off)", check="count",
      resume=FREE),
    F("checkpoint.keep", 3, "checkpoints kept (0: all)", check="count", resume=FREE),
    F("checkpoint.async_save", True, "save in the background", resume=FREE),
    F("checkpoint.frozen_copies", 2, "copies of each frozen version (frozen/, frozen_copy/)",
      choices=(1, 2), resume=FREE),

    # ------------------------------------------------------------------ training
    F("train.seed", 0, "initialisation seed"),
    F("train.seq_len", 4096, "tokens per training sequence", check="size"),
    F("train.global_batch", 64, "sequences per optimizer step", check="size"),
    F("train.micro_batch", 8, "sequences per device per forward (0: no accumulation)",
      check="count", resume=FREE),
    F("train.total_tokens", 0, "token budget; steps = total_tokens / tokens per step",
      check="count", resume=FREE),
    F("train.steps", 0, "explicit step count when > 0", check="count", resume=FREE),
    F("train.log_every", 10, "steps between logged metrics", check="size", resume=FREE),
    F("train.eval_every", 200, "steps between held-out evaluations (0: off)", check="count",
      resume=FREE),
    F("train.eval_batches", 4, "held-out batches per domain", check="size",
      when="train.eval_every", resume=FREE),
    F("train.eval_batch", 8, "held-out sequences per batch (per domain)", check="size",
      when="train.eval_every", resume=FREE),
    F("train.fit_memory", "check", "memory plan before compiling: check (refuse, naming the "
      "largest micro-batch that fits) | auto (train with it; reversible store_boundaries that "
      "fits at no micro-batch is planned again in invert mode) | off",
      choices=("check", "auto", "off"), resume=FREE),
    F("train.device_memory_gb", 0.0, "plan for this many GB per device (0: the device's own "
      "allocator limit)", check="nonneg", resume=FREE),
    F("train.memory_headroom_gb", 1.0, "kept free for the allocator's fragmentation",
      check="nonneg", resume=FREE),
    F("train.extend_schedule", "ask", "resuming with a new budget: ask (refuse, naming the "
      "choices) | stretch (one schedule over the new budget) | restart (re-warm from the LR "
      "reached)", choices=("ask", "stretch", "restart"), resume=FREE),
    F("train.watchdog_factor", 20.0, "a step past this multiple of the median step time stops "
      "the run (0: off)", check="nonneg", resume=FREE),
    F("train.watchdog_min_s", 60.0, "the watchdog never fires for a step below this",
      check="nonneg", resume=FREE),
    F("train.watchdog_compile_s", 1800.0, "limit for compiling, a first step, eval or save "
      "(0: off)", check="nonneg", resume=FREE),
    F("train.compile_cache", "auto", "JAX compilation cache: auto (~/.cache/lightning_jax/"
      "jax_compile) | run (<workdir>/jax_cache) | off | a directory", resume=FREE),
    F("train.wandb_project", "", "also log scalars to this Weights & Biases project (needs "
      "wandb; '' = off)", resume=FREE),
)
del F

BY_PATH: dict[str, Field] = {f.path: f for f in FIELDS}
if len(BY_PATH) != len(FIELDS):
  raise RuntimeError("the config schema declares a field twice")


class ConfigError(ValueError):
  """A config value is wrong; the message names the field and what was expected."""


# ----------------------------------------------------------------------------- nested access
def _get(tree, path: str, missing=KeyError):
  node = tree
  for part in path.split("."):
    if not hasattr(node, "keys") or part not in node:
      if missing is KeyError:
        raise KeyError(path)
      return missing
    node = node[part]
  return node


def _set(tree: ConfigDict, path: str, value) -> None:
  *parents, leaf = path.split(".")
  node = tree
  for part in parents:
    if part not in node:
      node[part] = ConfigDict()
    node = node[part]
  node[leaf] = value


def _delete(tree, path: str) -> None:
  *parents, leaf = path.split(".")
  node = tree
  for part in parents:
    if not hasattr(node, "keys") or part not in node:
      return
    node = node[part]
  if hasattr(node, "keys") and leaf in node:
    del node[leaf]


def _value(default):
  """A fresh copy of a default (dict defaults become ConfigDicts)."""
  if isinstance(default, dict):
    return ConfigDict(copy.deepcopy(default))
  return default


# ----------------------------------------------------------------------------- API
def base_config() -> ConfigDict:
  """The base config: every field at its default."""
  c = ConfigDict()
  for f in FIELDS:
    _set(c, f.path, _value(f.default))
  return c


_MISSING = object()


def complete(cfg) -> list[str]:
  """Fill the fields a stored config lacks (in place) and drop retired ones; returns the paths
  filled. A field's `legacy` rule gives the value the older version behaved as (e.g.
  moe.expert_pad: the run's mesh.expert); otherwise the default."""
  filled = []
  for path in RETIRED:
    _delete(cfg, path)
  for path, old_values in CONVERTED.items():
    v = _get(cfg, path, _MISSING)
    if isinstance(v, bool) and v in old_values:
      _delete(cfg, path)
      _set(cfg, path, old_values[v])
      filled.append(path)
  for f in FIELDS:
    if _get(cfg, f.path, _MISSING) is _MISSING:
      _set(cfg, f.path, f.legacy(cfg) if f.legacy is not None else _value(f.default))
      filled.append(f.path)
  pools = _get(cfg, "data.pools", None)
  if pools is not None and hasattr(pools, "keys"):
    for name in list(pools.keys()):
      p = pools[name]
      if hasattr(p, "keys"):
        for k, v in POOL_FIELDS.items():
          if k not in p:
            p[k] = v
  return filled


def _switch_on(cfg, when: str | None) -> bool:
  if when is None:
    return True
  neg = when.startswith("!")
  v = _get(cfg, when.lstrip("!"), None)
  on = bool(v) and not (isinstance(v, (int, float)) and not isinstance(v, bool) and v <= 0)
  return not on if neg else on


def _type_ok(f: Field, v) -> bool:
  k = f.kind
  if k is bool:
    return isinstance(v, bool)
  if k is int:
    return isinstance(v, int) and not isinstance(v, bool)
  if k is float:
    return isinstance(v, (int, float)) and not isinstance(v, bool)
  if k is str:
    return isinstance(v, str)
  return True


_KIND_NAME = {bool: "True or False", int: "an integer", float: "a number", str: "a string"}


def _leaves(tree, prefix=""):
  for k in tree.keys():
    v = tree[k]
    p = f"{prefix}{k}"
    if p == "data.pools":
      yield p, v
    elif hasattr(v, "keys"):
      yield from _leaves(v, p + ".")
    else:
      yield p, v


def _check_pools(pools) -> None:
  if not hasattr(pools, "keys"):
    raise ConfigError(f"data.pools is {type(pools).__name__}; expected a dict name -> "
                 f"{{{', '.join(POOL_FIELDS)}}}.")
  for name in pools.keys():
    p = pools[name]
    if not hasattr(p, "keys"):
      raise ConfigError(f"data.pools.{name} is {type(p).__name__}; expected a dict of "
                   f"{sorted(POOL_FIELDS)}.")
    for k in p.keys():
      if k not in POOL_FIELDS:
        raise ConfigError(f"data.pools.{name}.{k} is not a pool field; expected one of "
                     f"{sorted(POOL_FIELDS)}.")


def check_fields(cfg) -> None:
  """Every field of cfg is declared, of its declared type, and within its allowed values."""
  for path, v in _leaves(cfg):
    if path not in BY_PATH:
      near = [f.path for f in FIELDS if f.path.rsplit(".", 1)[0] == path.rsplit(".", 1)[0]]
      hint = f" (fields of that section: {', '.join(p.rsplit('.', 1)[1] for p in near)})" \
          if near else ""
      raise ConfigError(f"config field {path} is not in the schema (lightning_jax/config/schema.py)"
                   f"{hint}.")
  for f in FIELDS:
    v = _get(cfg, f.path, _MISSING)
    if v is _MISSING:
      raise ConfigError(f"config field {f.path} is missing; expected it (default {f.default!r}); a "
                   "stored config gets it from config.complete.")
    if f.path == "data.pools":
      _check_pools(v)
      continue
    if not _type_ok(f, v):
      raise ConfigError(f"{f.path}={v!r} has the wrong type; expected {_KIND_NAME[f.kind]}.")
    if not _switch_on(cfg, f.when):
      continue
    if f.choices is not None and v not in f.choices:
      opts = ", ".join(repr(c) for c in f.choices)
      raise ConfigError(f"{f.path}={v!r} must be one of {opts}.")
    if f.check is not None:
      ok, msg = CHECKS[f.check]
      if not ok(v):
        raise ConfigError(msg.format(name=f.path, v=v))


def resume_view(cfg) -> dict:
  """{path: value} of every field that must not change when a run resumes (pool entries'
  sources included, their weights not). `cfg` may be a stored dict of an older version: the
  fields it lacks count as their legacy value or default."""
  c = ConfigDict(copy.deepcopy(_plain(cfg)))
  complete(c)
  out = {}
  for f in FIELDS:
    if f.resume != FIXED:
      continue
    v = _get(c, f.path)
    if f.path == "data.pools":
      for name in sorted(v.keys()):
        for k in POOL_FIELDS:
          if k != "weight":
            out[f"data.pools.{name}.{k}"] = v[name][k]
      continue
    out[f.path] = v
  return out


def _plain(cfg):
  if hasattr(cfg, "to_dict"):
    return cfg.to_dict()
  if hasattr(cfg, "keys"):
    return {k: _plain(cfg[k]) for k in cfg.keys()}
  return cfg


def markdown_table() -> str:
  """docs/config.md's table: every field, its default, allowed values, resume rule, help."""
  rows = ["| field | default | allowed | on resume | what |", "|---|---|---|---|---|"]
  for f in FIELDS:
    if f.path == "data.pools":
      default = ", ".join(BASE_POOLS)
      allowed = "pool fields " + ", ".join(POOL_FIELDS)
    else:
      default = repr(f.default)
      if f.choices is not None:
        allowed = " \\| ".join(repr(c) for c in f.choices)
      elif f.check is not None:
        allowed = CHECKS[f.check][1].split(" must be ", 1)[1].rstrip(".").replace("|", "\\|")
      else:
        allowed = _KIND_NAME[f.kind]
      if f.when:
        allowed += f" (checked when {f.when})"
    rows.append(f"| `{f.path}` | `{default}` | {allowed} | {f.resume} | "
                f"{f.help.replace('|', chr(92) + '|')} |")
  return "\n".join(rows) + "\n"
