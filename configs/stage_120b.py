"""120B MoE (SPEC §1, §2.4, §4): 20 layers, shared SwiGLU 2048 + 460 routed SwiGLU 1024, sigmoid
router with loss-free bias balancing (top-12), TQP 4-bit base experts + rank-16 adapters,
8K context, expert parallel over 8 devices (460 experts padded to 464 = 8 x 58; the last 4
slots are padding that routing never selects). The MTP block keeps 20 experts.
Training sections follow the training issue."""
from configs import stage_9b


def get_config():
  c = stage_9b.get_config()
  c.stage = "120b"
  c.model.n_layers = 20
  c.model.max_seq_len = 8192
  c.train.seq_len = 8192
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
  o = c.optim                     # SPEC §5, 120B stage 1: WSD, peak 3.5e-5, decay x10, 85% stable
  o.schedule = "wsd"
  o.peak_lr = 3.5e-5
  o.start_lr = 1e-5
  o.warmup_steps = 300
  o.decay_ratio = 10.0
  o.stable_fraction = 0.85
  return c
