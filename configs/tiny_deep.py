"""Tiny lineage, stage 3 (the 9B's shape at tiny widths): configs/tiny_moe.py at 8 layers, grown
by growth.depth_map with mapping 0,1,2,3,0,1,2,3 (the last trained layer stays last)."""
from configs import tiny_moe

MAPPING = "0,1,2,3,0,1,2,3"


def get_config():
  c = tiny_moe.get_config()
  c.stage = "tiny_deep"
  c.model.n_layers = 8
  c.optim.peak_lr = 5e-4
  return c
