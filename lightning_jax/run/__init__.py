"""One library for a run (issue 19): what launch.train, growth, the benchmarks and the tools share.

  setup.py       the data (shards prepared when data.path is empty), the vocabulary size from the
                 data, the train loader and the held-out batches, the held-out mixture weights
  state.py       the train state's abstract tree and shardings (ZeRO-1 optimizer state, frozen
                 buffers by their logical axes), the train section's mesh check
  step.py        the compiled train step (micro-batch accumulation, non-finite guard) and eval step
  identity.py    the resume identity check: what must not change when a run resumes (run against
                 the checkpoint's saved config BEFORE any array is restored)
  checkpoints.py reading a run's variables (params-only, the optimizer state never opened) and
                 writing a step-0 run (growth, init, EMA); locating a checkpoint from a path
  history.py     a run's growth history (<run>/growth_history.json), recorded by every step-0 write

Full checkpoints (save, restore, fallback, frozen versions) are lightning_jax/checkpoint.py.
Entry points (launch/, growth/, benchmarks/, tokenizer/) import these modules, never each other.
"""
