"""5B MoE (SPEC §1, §2.4): 8 layers, shared SwiGLU 2048 + 20 routed SwiGLU 1024, null-slot
router (top-2 over 20 real + 20 null slots), reversible midpoint stack, 4K context.
Training sections follow the training issue."""
from configs.common import get_base_config


def get_config():
  c = get_base_config()
  c.stage = "5b"
  # 8 layers, 4K context, and the MoE/router numbers above are the base config's defaults.
  c.moe.enabled = True
  c.reversible.enabled = True
  # invert mode carries the stream state in int32 fixed point: 16 fractional bits give a range of
  # about +-10900 at a step of 1.5e-5 (finer than bf16); 24 bits (tiny) overflow past |x| ~ 42.
  c.reversible.fixed_point_bits = 16
  c.tqp.enabled = False
  c.optim.weight_decay = 0.0      # SPEC §5: 0.1 for the 2B seed, 0 afterwards (9B, 120B inherit)
  c.optim.peak_lr = 5e-4          # SPEC §5 5B peak; the token-budget phases are issue 3's
  for name, w in zip(("D1", "D2", "D3", "D4"), (0.18, 0.23, 0.2, 0.14)):   # data pools (SPEC §6)
    c.data.pools[name].weight = w
  return c
