"""120B MoE (SPEC §1, §2.4, §4): 20 layers, shared SwiGLU 2048 + 460 routed SwiGLU 1024, sigmoid
router with loss-free bias balancing (top-12), TQP 4-bit base experts + rank-16 adapters,
8K context, expert parallel over 8 devices (460 experts padded to 464 = 8 x 58; the last 4
slots are padding that routing never selects). The MTP block keeps 20 experts.

Training phases (SPEC §5), selected with the ml_collections config argument:
  --config=configs/stage_120b.py:p1   (the default: --config=configs/stage_120b.py is p1)
  p1  stage 1, router calibration: 2.0B tokens, batch 64 x 8192, WSD: 300 warmup steps
      1e-5 -> 3.5e-5, 85% of the rest stable, then down to 3.5e-6; LR groups router x1,
      adapters x3, everything else x0.01 (SPEC §4)                                   3,814 steps
  p2  stage 2: 5.1B tokens, batch 128 x 4096, 485 warmup steps from p1's end LR (3.5e-6) to
      2e-5, cosine to 1e-6; every group x1 (the reference: "all params unfrozen")   9,727 steps
Micro-batches are the reference's per-GPU batches (8 x 8K, 16 x 4K; no accumulation).
"""
from configs import stage_9b
from lightning_jax.config import apply_phase

STAGE_FILE = "configs/stage_120b.py"
DEFAULT_PHASE = "p1"
PHASES = {
    "p1": {"train.seq_len": 8192, "train.global_batch": 64, "train.micro_batch": 8,
           "train.steps": 0, "train.total_tokens": 2_000_000_000, "model.use_rotary": True,
           "optim.schedule": "wsd", "optim.peak_lr": 3.5e-5, "optim.decay_ratio": 10.0,
           "optim.stable_fraction": 0.85, "optim.warmup_steps": 300, "optim.start_lr": 1e-5,
           "optim.start_from": "",
           "tqp.lr_mult_router": 1.0, "tqp.lr_mult_adapters": 3.0, "tqp.lr_mult_rest": 0.01},
    "p2": {"train.seq_len": 4096, "train.global_batch": 128, "train.micro_batch": 16,
           "train.steps": 0, "train.total_tokens": 5_100_000_000, "model.use_rotary": True,
           "optim.schedule": "cosine", "optim.peak_lr": 2e-5, "optim.decay_ratio": 20.0,
           "optim.stable_fraction": 0.85, "optim.warmup_steps": 485, "optim.start_lr": 0.0,
           "optim.start_from": "configs/stage_120b.py:p1",      # 3.5e-5 / 10 = 3.5e-6
           "tqp.lr_mult_router": 1.0, "tqp.lr_mult_adapters": 1.0, "tqp.lr_mult_rest": 1.0},
}


def get_config(phase=None):
  c = stage_9b.get_config()
  c.stage = "120b"
  c.model.n_layers = 20
  c.model.max_seq_len = 8192
  e = c.moe
  e.router = "sigmoid"
  e.n_experts = 460
  e.n_null = 0
  e.top_k = 12
  e.mtp_n_experts = 20
  e.z_weight = 0.0                # z-loss logged only (SPEC §2.4)
  e.bias_gamma = 5e-5
  e.bias_cap_lo = 0.0005
  e.bias_cap_hi = 0.004
  c.reversible.enabled = True
  c.tqp.enabled = True
  c.tqp.bits = 4
  c.tqp.rank = 16
  c.mesh.expert = 8
  # Sinkhorn in one Pallas launch on GPU (rolled loop on CPU): 1,370.7 -> 1,343.9 ms per rank step
  c.model.hc.sinkhorn_impl = "auto"
  # micro-batch 8 x 8K (the reference's) does not fit one GPU's share: train with the largest
  # micro-batch that does, accumulating to the global batch (docs/PERFORMANCE.md, issue 16)
  c.train.fit_memory = "auto"
  return apply_phase(c, STAGE_FILE, phase, PHASES, DEFAULT_PHASE)
