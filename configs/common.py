"""The one base config every stage derives from (SPEC.md numbers; stages override fields).

Sections: model, moe, reversible, tqp, data, tokenizer, optim, mesh, checkpoint, train.
Stage files call `get_base_config()` and change only what differs for their stage.
"""
from ml_collections import ConfigDict


def _pool(weight: float, always_on: bool = False) -> ConfigDict:
  """One data.pools entry: D1 web foundation, D2 web diverse, D3 code, D4 STEM, always-on."""
  return ConfigDict(dict(weight=float(weight), always_on=always_on, domains="", shards="",
                         val_shards=""))


def get_base_config() -> ConfigDict:
  c = ConfigDict()
  c.stage = "base"

  # ------------------------------------------------------------------ model (SPEC §2)
  m = c.model = ConfigDict()
  m.d_model = 4096
  m.n_layers = 8
  m.pattern = "DDDG"              # layer i is G when (i+1) % 4 == 0 (SPEC §2.1)
  m.vocab_size = 131072
  m.max_seq_len = 4096
  m.dtype = "bfloat16"            # compute dtype
  m.param_dtype = "float32"       # master weights
  m.norm_eps = 1e-6
  m.use_rotary = True             # switch that disables rotary everywhere (last 20% of 9B)
  m.rope_base = 10000.0
  m.ffn_width = 2048              # dense SwiGLU width (2B seed); MoE stages use moe.*
  m.ce_chunk = 1024               # tokens per cross-entropy chunk (never all float32 logits)
  m.remat = False                 # plain stack: rematerialise each layer in the backward
  # compatibility with the PyTorch reference (docs/reference.md): "spec" (SPEC.md and the
  # reference's CPU code) | "reference_cuda" (what the reference's CUDA kernels compute, which the
  # released weights were trained with: DeltaNet output RMSNorm(o) * w * sigmoid(g), and the
  # Kronecker codes rounded to bfloat16 before the projection as model.embed.round_codes_bf16)
  m.compat = "spec"

  m.deltanet = ConfigDict()
  m.deltanet.n_heads = 32
  m.deltanet.head_dim = 128
  m.deltanet.conv_kernel = 4
  m.deltanet.chunk_size = 64
  m.deltanet.impl = "auto"        # auto (kernel on GPU, else chunked) | chunked | recurrent | kernel
  # options of the Pallas kernel path (kernels/delta_rule.chunk_gated_delta_rule's keywords)
  m.deltanet.kernel = ConfigDict()
  # (defaults: the fastest measured on an H100 at B4 x T4096, 32 x 128: 7.39 ms fwd+bwd, against
  # 13.25 ms for prep=xla, bwd=fused, block_v_bwd=128, num_warps_bwd=8; docs/PERFORMANCE.md)
  m.deltanet.kernel.prep = "pallas"       # chunk prep: xla | pallas (chunk, head dims >= 16)
  m.deltanet.kernel.bwd = "split_pallas"  # recurrence backward: fused | split | split_pallas | merged
  m.deltanet.kernel.block_v_bwd = 32
  m.deltanet.kernel.num_warps_bwd = 4
  m.deltanet.kernel.num_stages = 2

  m.gsa = ConfigDict()
  m.gsa.n_heads = 16
  m.gsa.head_dim = 256
  m.gsa.idx_heads = 4
  m.gsa.idx_dim = 128
  m.gsa.k_base = 128
  m.gsa.k_min = 32
  m.gsa.k_max = 256
  m.gsa.n_sinks = 4
  m.gsa.ema_decay = 0.99
  m.gsa.query_chunk = 512         # queries processed at once (memory bound at T=8192)
  m.gsa.impl = "xla"              # xla | kernel
  m.gsa.var_row = "full_row"      # full_row (reference: future keys count as 0) | causal
  m.gsa.attention = "auto"        # auto (flash on GPU, else gather) | gather (kept keys only) |
                                  # dense_masked (O(T^2) matmuls) | flash (cuDNN, selection mask)

  m.hc = ConfigDict()
  m.hc.n_streams = 4
  m.hc.sinkhorn_iters = 20
  m.hc.sinkhorn_eps = 1e-6

  m.embed = ConfigDict()
  m.embed.max_bytes = 32          # codec positions; vector dim = 256 * max_bytes = 8192
  m.embed.form = "table"          # table | on_the_fly
  m.embed.z_eps = 1e-6
  m.embed.reference_text_decode = False  # reference behaviour: decode to text (U+FFFD collapse)
  m.embed.round_codes_bf16 = False  # reference behaviour (both its CUDA and CPU code): the
                                    # z-normalised codes are rounded to bfloat16 before the
                                    # projection (matters in float32 compute only)

  m.mtp = ConfigDict()
  m.mtp.enabled = True
  m.mtp.weight = 0.3
  m.mtp.reversible = False        # True: the MTP block's two sublayers form a midpoint stack
                                  # (reversible.h, reversible.a), as the reference's 120B

  # ------------------------------------------------------------------ MoE (SPEC §2.4)
  e = c.moe = ConfigDict()
  e.enabled = False
  e.router = "null_slot"          # null_slot (5B/9B) | sigmoid (120B)
  e.n_experts = 20
  e.n_null = 20
  e.top_k = 2
  e.expert_width = 1024
  e.shared_width = 2048
  e.mtp_n_experts = 20            # the MTP block keeps 20 experts in every MoE stage
  e.balance_weight = 0.02
  e.z_weight = 0.001
  e.null_weight = 0.01
  e.null_target = 0.5
  e.dispatch = "dropless"         # dropless | capacity
  e.capacity_factor = 1.25
  e.group_pad = 128               # rows per expert group rounded up to this (dense grouped matmul)
  e.overflow_round = 0.25         # dropless: overflow rounds hold this fraction of the first round
  # loss-free balancing controller (sigmoid router), hot-reloadable
  e.bias_gamma = 5e-5
  e.bias_cap_lo = 0.0005
  e.bias_cap_hi = 0.004
  e.bias_ema = 0.01
  e.bias_guard_k = 4.0            # step multiplier outside [cap_lo, cap_hi]
  e.hot_config = ""               # path to a JSON file re-read every hot_config_every steps
  e.hot_config_every = 10

  # ------------------------------------------------------------------ reversible (SPEC §2.6)
  r = c.reversible = ConfigDict()
  r.enabled = False
  r.mode = "store_boundaries"     # store_boundaries | invert
  r.h = 0.25
  r.a = 0.5
  r.fixed_point_bits = 24         # fractional bits of the exact integer state (invert mode)

  # ------------------------------------------------------------------ TQP (SPEC §4)
  q = c.tqp = ConfigDict()
  q.enabled = False
  q.bits = 4
  q.rank = 16
  q.seed = 0
  q.flush_every = 0               # adapter merge; diverged at 120B, off by default
  q.kernel = "auto"               # base expert matmul: auto (xla_rotate on GPU, else xla) | xla
                                  # | xla_rotate (XLA dequantise+einsum after the Pallas input
                                  # rotation) | pallas | pallas_rotate (+ Pallas input rotation)
  q.lr_mult_router = 1.0
  q.lr_mult_adapters = 3.0
  q.lr_mult_rest = 0.01

  # ------------------------------------------------------------------ tokenizer (SPEC §7)
  t = c.tokenizer = ConfigDict()
  t.name = "o200k_base"           # o200k_base | brahmic (path to a built tokenizer dir)
  t.path = ""
  t.id_order = "natural"          # natural | frequency (permutation file beside the tokenizer)

  # ------------------------------------------------------------------ data (SPEC §6)
  d = c.data = ConfigDict()
  d.path = ""                     # directory of uint32 shards (+ manifest)
  d.seed = 0
  d.val_fraction = 0.05
  d.num_workers = 0
  d.build_from = ""               # raw .txt/.jsonl dir: prepare shards into data.path if missing
  d.id_order = "frequency"        # id order when building from build_from (frequency | natural)
  d.vocab_from_data = False       # True: model.vocab_size := the data's (compact) vocabulary
  # pool mixture (data curriculum, lightning_jax/data/pools.py, docs/data.md): weights are
  # absolute token shares summing to 1; always-on pools take always_on_fraction of every batch.
  # A pool's source: domains="en,hi" (of data.path) or shards=<glob | list file | prepare_data dir>.
  d.use_pools = False             # True: train on data.pools instead of data.path's single stream
  # reader ranks of the pool mixture (each pool's shards striped over them; every rank reads
  # its slice of each global batch): 0 = one per process; a multiple of the process count keeps
  # the same stream when the number of hosts changes (lightning_jax/distributed.py)
  d.ranks = 0
  d.always_on_fraction = 0.25
  d.pools = ConfigDict()
  for name, w in (("D1", 0.34), ("D2", 0.24), ("D3", 0.11), ("D4", 0.06)):   # 2B (SPEC §6)
    d.pools[name] = _pool(w)
  d.pools.always_on = _pool(0.25, always_on=True)

  # ------------------------------------------------------------------ optimiser (SPEC §5)
  o = c.optim = ConfigDict()
  o.peak_lr = 1e-3
  o.start_lr = 0.0                # or the previous stage's end LR:
  o.start_from = ""               # previous stage's config file; start_lr := its end LR
  o.start_from_lr = -1.0          # start_from's end LR, resolved from the user's config (-1: not yet)
  o.schedule_start = 0            # step at which the schedule starts (train.extend_schedule=restart)
  o.warmup_steps = 1000
  o.schedule = "cosine"           # cosine | wsd | constant
  o.decay_ratio = 10.0            # end LR = peak / decay_ratio
  o.stable_fraction = 0.85        # WSD: fraction of post-warmup steps held at peak
  o.b1 = 0.9
  o.b2 = 0.95
  o.eps = 1e-10
  o.weight_decay = 0.1
  o.clip_norm = 1.0

  # ------------------------------------------------------------------ mesh
  x = c.mesh = ConfigDict()
  x.data = -1                     # -1: all remaining devices
  x.expert = 1
  x.tensor = 1

  # ------------------------------------------------------------------ checkpoints
  k = c.checkpoint = ConfigDict()
  k.every_steps = 500
  k.every_seconds = 1800
  k.keep = 3
  k.async_save = True
  k.frozen_copies = 2              # the frozen base is stored twice (frozen/, frozen_copy/)

  # ------------------------------------------------------------------ training
  tr = c.train = ConfigDict()
  tr.seed = 0
  tr.seq_len = 4096
  tr.global_batch = 64            # sequences per optimizer step
  tr.micro_batch = 8              # sequences per device per forward (accumulate to global)
  tr.total_tokens = 0             # token budget; steps = total_tokens / tokens_per_step
  tr.steps = 0                    # explicit override when > 0
  tr.log_every = 10
  tr.eval_every = 200
  tr.eval_batches = 4
  tr.eval_batch = 8               # held-out sequences per eval batch (per domain)
  # memory plan (lightning_jax/memory_plan.py): the compiled step's per-device bytes against the
  # device's allocator limit, before anything is built
  tr.fit_memory = "check"         # check (refuse, naming the largest micro-batch that fits) |
                                  # auto (train with the largest that fits) | off
  tr.device_memory_gb = 0.0       # 0: the device's allocator limit (GPU); > 0: plan for this
  tr.memory_headroom_gb = 1.0     # kept free for the allocator's fragmentation
  # resuming with a different train.steps / total_tokens: "ask" (refuse, naming the choices),
  # "stretch" (one schedule over the new budget) or "restart" (re-warm from the LR reached)
  tr.extend_schedule = "ask"
  # watchdog (lightning_jax/watchdog.py): a step past max(watchdog_min_s, watchdog_factor x the
  # median step time), or compiling / a first step, eval or save past watchdog_compile_s, stops
  # the run naming the phase (0 = off)
  tr.watchdog_factor = 20.0
  tr.watchdog_min_s = 60.0
  tr.watchdog_compile_s = 1800.0
  # JAX persistent compilation cache: "auto" (~/.cache/lightning_jax/jax_compile), "run"
  # (<workdir>/jax_cache), "off", or a directory
  tr.compile_cache = "auto"
  # Weights & Biases: a project name logs the run's scalars there too (needs `pip install wandb`;
  # lightning_jax/metrics.py); "" = off. TensorBoard (<workdir>/tb) is always written.
  tr.wandb_project = ""
  return c
