"""5B MoE (SPEC §1, §2.4): 8 layers, shared SwiGLU 2048 + 20 routed SwiGLU 1024, null-slot
router (top-2 over 20 real + 20 null slots), reversible midpoint stack, 4K context.
Training sections follow the training issue."""
from configs.common import get_base_config


def get_config():
  c = get_base_config()
  c.stage = "5b"
  c.model.n_layers = 8
  c.model.max_seq_len = 4096
  c.train.seq_len = 4096
  e = c.moe
  e.enabled = True
  e.router = "null_slot"
  e.n_experts = 20
  e.n_null = 20
  e.top_k = 2
  e.expert_width = 1024
  e.shared_width = 2048
  e.balance_weight = 0.02
  e.z_weight = 0.001
  e.null_weight = 0.01
  e.null_target = 0.5
  c.reversible.enabled = True
  # invert mode carries the stream state in int32 fixed point: 16 fractional bits give a range of
  # about +-10900 at a step of 1.5e-5 (finer than bf16); 24 bits (tiny) overflow past |x| ~ 42.
  c.reversible.fixed_point_bits = 16
  c.tqp.enabled = False
  for name, w in zip(("D1", "D2", "D3", "D4"), (0.18, 0.23, 0.2, 0.14)):   # data pools (SPEC §6)
    c.data.pools[name].weight = w
  return c
