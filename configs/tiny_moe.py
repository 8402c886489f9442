"""Tiny lineage, stage 2 (the 5B's shape at tiny widths): configs/tiny.py grown by
growth.dense_to_moe into a null-slot MoE with a reversible stack. The shared expert is the dense
FFN, so moe.shared_width = model.ffn_width; 4 routed experts of width 32 (of the 128 dense channels),
top-2 over 4 real + 4 null slots; the MTP block keeps 4 experts."""
from configs import tiny


def get_config():
  c = tiny.get_config()
  c.stage = "tiny_moe"
  e = c.moe
  e.enabled = True
  e.router = "null_slot"
  e.n_experts = 4
  e.n_null = 4
  e.top_k = 2
  e.expert_width = 32
  e.shared_width = c.model.ffn_width
  e.mtp_n_experts = 4
  e.group_pad = 8
  c.reversible.enabled = True
  c.optim.weight_decay = 0.0        # SPEC §5: weight decay 0 after the dense seed
  c.optim.peak_lr = 1e-3
  c.optim.warmup_steps = 5
  return c
