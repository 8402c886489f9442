"""2B dense seed (SPEC §1, §5): 8 layers DDDGDDDG, dense SwiGLU 2048, plain (non-reversible) stack."""
from configs.common import get_base_config


def get_config():
  c = get_base_config()
  c.stage = "2b"
  c.model.n_layers = 8
  c.model.max_seq_len = 4096
  c.train.seq_len = 4096
  c.moe.enabled = False
  c.reversible.enabled = False
  return c
