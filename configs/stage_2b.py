"""2B dense seed (SPEC §1, §5): 8 layers DDDGDDDG, dense SwiGLU 2048, plain (non-reversible) stack."""
from configs.common import get_base_config
from lightning_jax.config import apply_phase

# One training phase (SPEC §5); get_config accepts the phase argument like the other stages
# (--config=configs/stage_2b.py:p1 is the same as --config=configs/stage_2b.py).
PHASES = {"p1": {}}


def get_config(phase=None):
  c = get_base_config()
  c.stage = "2b"
  c.model.n_layers = 8
  c.model.max_seq_len = 4096
  c.train.seq_len = 4096
  c.moe.enabled = False
  c.reversible.enabled = False
  # each layer keeps its matmul outputs and kernel residuals for the backward and recomputes the
  # elementwise work: traced, 6.2 GB per B1 x T4096 sequence instead of 26.9 GB, with the same
  # matmuls and kernels (docs/PERFORMANCE.md, "What the backward keeps")
  c.model.remat = "selective"
  # the fused head's chunks (1024 tokens by default): every chunk's dw product also reads and
  # writes the float32 [4096, 131072] sum (4.3 GB), so fewer chunks move less. At B1 x T4096 the
  # head is not at the step's peak: 4096 plans the same 29.85 GiB as 1024 (8192: +0.88 GiB)
  # (docs/PERFORMANCE.md, "Session 17")
  c.model.ce_chunk = 4096
  # five Sinkhorn rounds to a trip of the rolled loop: XLA copies the carried matrices once a
  # trip, 902 copies per B1 step at 1 round, 325 at 5, with the same plan (docs/PERFORMANCE.md,
  # "Session 18")
  c.model.hc.sinkhorn_unroll = 5
  # the head's logits GEMM writes bf16, as the reference's fused cross-entropy keeps them; the
  # softmax runs in float32 on them (fwd head_ce 41.2 -> 32.6 GB per B1 step, same plan;
  # docs/PERFORMANCE.md, "Session 18")
  c.model.ce_logits = "compute"
  # model.unroll_layers stays off here: unrolled, the B4 step measured 518.1 ms against 563.2 ms
  # (MFU 42.0% against 38.7%, one H100) but peaked at 66.91 GiB against 54.11, above the 60 GB
  # an 80 GB card gives at the default XLA_PYTHON_CLIENT_MEM_FRACTION=0.75. Where memory allows
  # (an H200, or 0.95 on an H100), pass --config.model.unroll_layers=True
  # (docs/PERFORMANCE.md, "Session 21")

  # ---- optimiser (SPEC §5): 2B seed, cosine 1e-3 -> 1e-4, warmup 1000 steps from 0, wd 0.1
  o = c.optim
  o.peak_lr = 1e-3
  o.start_lr = 0.0
  o.warmup_steps = 1000
  o.schedule = "cosine"
  o.decay_ratio = 10.0
  o.weight_decay = 0.1

  # ---- training: 30.2B tokens. The paper gives no 2B batch; we use the reference scheduler's
  # 131,072 tokens per step (32 x 4096): 230,407 steps. 4 sequences per GPU per forward on 8 GPUs.
  t = c.train
  t.seq_len = 4096
  t.global_batch = 32
  t.micro_batch = 4
  t.total_tokens = 30_200_000_000
  t.steps = 0
  t.log_every = 10
  t.eval_every = 1000
  t.eval_batches = 4
  t.eval_batch = 8

  # ---- data: shards from `python -m launch.prepare_data ... --output data/2b`
  c.data.path = "data/2b"

  # ---- checkpoints
  k = c.checkpoint
  k.every_steps = 1000
  k.every_seconds = 1800
  k.keep = 3
  k.async_save = True
  return apply_phase(c, "configs/stage_2b.py", phase, PHASES, "p1")
