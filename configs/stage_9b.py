"""9B MoE (SPEC §1): the 5B MoE layer and router at 20 layers (DDDG x5), reversible stack;
trained at 4K then 8K context (max_seq_len 8192).

Training phases (SPEC §5; 39.5B tokens), selected with the ml_collections config argument:
  --config=configs/stage_9b.py:p1   (the default: --config=configs/stage_9b.py is p1)
  p1  1.0B at 4K, batch 120: 2000 warmup steps 2e-6 -> 5e-5, then flat 5e-5           2,034 steps
  p2  7.0B at 4K, batch 120: flat 5e-5 (p1's end LR), no warmup                       14,241 steps
  p3 23.6B at 8K, batch 56: 300-step re-warm 4e-5 -> 5e-5, then flat 5e-5            51,443 steps
  p4  7.9B at 8K, batch 56, rotary OFF: cosine 5e-5 (p3's end LR) -> 1.7e-5          17,220 steps
Final weights: EMA over the last 6 checkpoints of p4 (python -m launch.ema, alpha 0.2).
The re-warm start of p3 (4e-5) is the reference schedule's (SPEC §5 gives only "300-step
re-warm"). Micro-batches are the reference's per-GPU batches on 8 GPUs (15 x 4K, 7 x 8K, no
accumulation); for less memory use another divisor of the per-device batch:
--config.train.micro_batch=1|3|5 (p1, p2) or 1 (p3, p4).
"""
from configs import stage_5b
from lightning_jax.config import apply_phase

STAGE_FILE = "configs/stage_9b.py"
DEFAULT_PHASE = "p1"
_4K = {"train.seq_len": 4096, "train.global_batch": 120, "train.micro_batch": 15,
       "train.steps": 0, "model.use_rotary": True}
_8K = {"train.seq_len": 8192, "train.global_batch": 56, "train.micro_batch": 7,
       "train.steps": 0, "model.use_rotary": True}
_FLAT = {"optim.schedule": "constant", "optim.peak_lr": 5e-5, "optim.decay_ratio": 1.0}
PHASES = {
    "p1": {**_4K, **_FLAT, "train.total_tokens": 1_000_000_000,
           "optim.warmup_steps": 2000, "optim.start_lr": 2e-6, "optim.start_from": ""},
    "p2": {**_4K, **_FLAT, "train.total_tokens": 7_000_000_000,
           "optim.warmup_steps": 0, "optim.start_lr": 0.0,
           "optim.start_from": "configs/stage_9b.py:p1"},       # 5e-5 (no warmup: unused)
    "p3": {**_8K, **_FLAT, "train.total_tokens": 23_600_000_000,
           "optim.warmup_steps": 300, "optim.start_lr": 4e-5, "optim.start_from": ""},
    "p4": {**_8K, "train.total_tokens": 7_900_000_000, "model.use_rotary": False,
           "optim.schedule": "cosine", "optim.peak_lr": 5e-5,
           "optim.decay_ratio": 5e-5 / 1.7e-5,                   # end LR 1.7e-5 (SPEC §5)
           "optim.warmup_steps": 0, "optim.start_lr": 0.0,
           "optim.start_from": "configs/stage_9b.py:p3"},       # 5e-5 (no warmup: unused)
}


def get_config(phase=None):
  c = stage_5b.get_config()
  c.stage = "9b"
  c.model.n_layers = 20
  c.model.max_seq_len = 8192
  for name, w in zip(("D1", "D2", "D3", "D4"), (0.07, 0.15, 0.27, 0.26)):   # data pools (SPEC §6)
    c.data.pools[name].weight = w
  return apply_phase(c, STAGE_FILE, phase, PHASES, DEFAULT_PHASE)
