"""5B MoE (SPEC §1, §2.4): 8 layers, shared SwiGLU 2048 + 20 routed SwiGLU 1024, null-slot
router (top-2 over 20 real + 20 null slots), reversible midpoint stack, 4K context.

Training phases (SPEC §5), selected with the ml_collections config argument:
  --config=configs/stage_5b.py:p1   (the default: --config=configs/stage_5b.py is p1)
  p1  0.6B tokens flat 5e-4 after 500 warmup steps from the 2B seed's end LR (1e-4)   4,577 steps
  p2  5.7B tokens cosine 5e-4 -> 5e-5, no warmup (starts at p1's end LR, 5e-4)         43,487 steps
Both at 32 x 4096 = 131,072 tokens per step (the paper gives no 5B batch; this is the reference's
deepspeed batch for this stage, 8 GPUs x 4 sequences, as for the 2B seed).
p1 starts from the grown checkpoint (python -m growth.dense_to_moe); p2 from p1's last
checkpoint (python -m growth.next_phase, which carries the Adam moments as the reference does).
"""
from configs.common import get_base_config
from lightning_jax.config import apply_phase

STAGE_FILE = "configs/stage_5b.py"
DEFAULT_PHASE = "p1"
_SEQ = {"train.seq_len": 4096, "train.global_batch": 32, "train.micro_batch": 4,
        "train.steps": 0, "model.use_rotary": True}
PHASES = {
    "p1": {**_SEQ, "train.total_tokens": 600_000_000,
           "optim.schedule": "constant", "optim.peak_lr": 5e-4, "optim.decay_ratio": 1.0,
           "optim.warmup_steps": 500, "optim.start_lr": 0.0,
           "optim.start_from": "configs/stage_2b.py"},          # warmup from 1e-3 / 10 = 1e-4
    "p2": {**_SEQ, "train.total_tokens": 5_700_000_000,
           "optim.schedule": "cosine", "optim.peak_lr": 5e-4, "optim.decay_ratio": 10.0,
           "optim.warmup_steps": 0, "optim.start_lr": 0.0,
           "optim.start_from": "configs/stage_5b.py:p1"},       # 5e-4 (no warmup: unused)
}


def get_config(phase=None):
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
  for name, w in zip(("D1", "D2", "D3", "D4"), (0.18, 0.23, 0.2, 0.14)):   # data pools (SPEC §6)
    c.data.pools[name].weight = w
  return apply_phase(c, STAGE_FILE, phase, PHASES, DEFAULT_PHASE)
