"""Tiny LightningLM that trains on 2 CPU cores: same architecture as stage_2b, small sizes."""
import pathlib

from configs.common import get_base_config

REPO = pathlib.Path(__file__).resolve().parents[1]


def get_config():
  c = get_base_config()
  c.stage = "tiny"
  m = c.model
  m.d_model = 64
  m.n_layers = 4
  m.dtype = "float32"
  m.max_seq_len = 8192
  m.ffn_width = 128
  m.ce_chunk = 512
  m.deltanet.n_heads = 4
  m.deltanet.head_dim = 16
  m.deltanet.chunk_size = 64
  m.gsa.n_heads = 2
  m.gsa.head_dim = 32
  m.gsa.idx_heads = 4
  m.gsa.idx_dim = 16
  m.gsa.k_min = 8
  m.gsa.k_base = 16
  m.gsa.k_max = 32
  m.gsa.query_chunk = 128
  c.moe.expert_width = 32
  c.moe.shared_width = 64
  m.embed.form = "on_the_fly"     # (the default) a [V, 8192] table would dwarf the tiny model

  # ---- data: the bundled corpus (corpus/, SOURCES.md), prepared into <workdir>/data on first run
  d = c.data
  d.path = ""
  d.build_from = str(REPO / "corpus")
  d.id_order = "frequency"        # compact vocabulary of the tokens the corpus uses
  d.vocab_from_data = True
  d.val_fraction = 0.1
  # curriculum over the bundled corpus: D1 English prose, D2 seven Brahmic languages (UI/help
  # text), D3 Python code; always-on: Hindi + Bengali. The corpus has no STEM slice, so D4 is
  # declared with weight 0 and its 2B share (0.06) goes to D3 (0.11 + 0.06).
  d.use_pools = True
  d.always_on_fraction = 0.25
  d.pools.D1.update(weight=0.34, domains="en")
  d.pools.D2.update(weight=0.24, domains="pa,gu,or,ta,te,kn,ml")
  d.pools.D3.update(weight=0.17, domains="code")
  d.pools.D4.update(weight=0.0)
  d.pools.always_on.update(weight=0.25, domains="hi,bn")

  # ---- optimiser
  o = c.optim
  o.peak_lr = 3e-3
  o.start_lr = 0.0
  o.warmup_steps = 10
  o.schedule = "cosine"
  o.decay_ratio = 10.0
  o.weight_decay = 0.1

  # ---- training: the README's main job must finish within 3 minutes on 2 CPU cores
  t = c.train
  t.seq_len = 128
  t.global_batch = 8
  t.micro_batch = 0               # no accumulation (whole batch split over the batch shards)
  t.steps = 50
  t.total_tokens = 50 * 8 * 128
  t.log_every = 10
  t.eval_every = 25
  t.eval_batches = 1
  t.eval_batch = 8

  # ---- checkpoints
  k = c.checkpoint
  k.every_steps = 25
  k.every_seconds = 600
  k.keep = 2
  return c
