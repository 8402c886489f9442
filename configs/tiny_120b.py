"""Tiny lineage, stage 4 (the 120B's shape at tiny widths): configs/tiny_deep.py with 3 clones x 4
= 12 routed experts (growth.expand_experts), the sigmoid router with loss-free bias balancing
(top-4), and TQP: 4-bit TurboQuant base experts + rank-4 adapters (growth.to_tqp). The MTP
block keeps 4 experts."""
from configs import tiny_deep


def get_config():
  c = tiny_deep.get_config()
  c.stage = "tiny_120b"
  e = c.moe
  e.router = "sigmoid"
  e.n_experts = 3 * tiny_deep.tiny_moe.get_config().moe.n_experts
  e.n_null = 0
  e.top_k = 4
  e.z_weight = 0.0
  c.tqp.enabled = True
  c.tqp.bits = 4
  c.tqp.rank = 4
  c.optim.peak_lr = 3.5e-4
  return c
