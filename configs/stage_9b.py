"""9B MoE (SPEC §1): the 5B MoE layer and router at 20 layers (DDDG x5), reversible stack;
trained at 4K then 8K context (max_seq_len 8192). Training sections follow the training issue."""
from configs import stage_5b


def get_config():
  c = stage_5b.get_config()
  c.stage = "9b"
  c.model.n_layers = 20
  c.model.max_seq_len = 8192
  c.optim.peak_lr = 5e-5          # SPEC §5 9B peak (warmup from 2e-6)
  c.optim.start_lr = 2e-6
  for name, w in zip(("D1", "D2", "D3", "D4"), (0.07, 0.15, 0.27, 0.26)):   # data pools (SPEC §6)
    c.data.pools[name].weight = w
  return c
