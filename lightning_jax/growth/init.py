"""A randomly initialised run, written as a step-0 checkpoint without training:

  python -m growth.init --dst RUN --config=configs/stage_9b.py [--config.model.n_layers=4]

The first link of a lineage when no trained source exists (e.g. a 9B-shape model to grow into the
120B with growth.expand_experts / growth.to_tqp, benchmarks/run_120b_reduced.sh). The variables
are exactly the ones `launch.train` initialises for the same config when it starts a fresh run
(model.init_variables with PRNGKey(train.seed) and the codec of the run's data), and RUN/
checkpoints/0 is in lightning_jax.run.checkpoints.write_grown's format: fresh optimizer state, step 0, a fresh
data-loader state, the config, and meta provenance {"transform": "init", "seed": train.seed}.
`launch.train --config=<same flags> --workdir=RUN` resumes it at step 0. When data.path is empty
the shards are prepared in RUN/data exactly as launch.train would.

--cpu: initialise and write on the host CPU device instead of the default device (the default
device must otherwise hold the parameters and both Adam moments at once, in float32).
"""
from __future__ import annotations

import contextlib
import pathlib
import time

import jax
import numpy as np

from lightning_jax import checkpoint as ck
from lightning_jax import model, optim
from lightning_jax.config import validate
from lightning_jax.data import shards
from lightning_jax.layers import kronecker
from lightning_jax.run import setup
from lightning_jax.run.checkpoints import write_grown


def init_run(dst: str, cfg, *, on_cpu: bool = False, log=print) -> dict:
  """Write DST/checkpoints/0 holding a fresh model for `cfg`; returns {"dst", "meta", "n_params"}."""
  t0 = time.perf_counter()
  dst = pathlib.Path(dst)
  if (dst / "checkpoints").exists() and any(p.name.isdigit() for p in (dst / "checkpoints").iterdir()):
    raise ck.CheckpointError(f"--dst {dst} already holds checkpoints; expected a new run directory.")
  cfg = cfg.copy_and_resolve_references()
  optim.resolve_start_from(cfg)      # the user's config: stored resolved with the run
  dst.mkdir(parents=True, exist_ok=True)
  data_dir, manifest = setup.resolve_data(cfg, dst, log)
  setup.apply_data_vocab(cfg, manifest, data_dir)
  validate(cfg)
  codec = kronecker.codec_from_tokenizer(shards.token_bytes(data_dir), cfg)
  where = (jax.default_device(jax.devices("cpu")[0]) if on_cpu else contextlib.nullcontext())
  with where:
    variables = model.init_variables(cfg, jax.random.PRNGKey(cfg.train.seed), codec)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(variables["params"]))
    meta = {"provenance": {"source_path": None, "source_step": None, "source_stage": None,
                           "transform": "init", "args": {"seed": int(cfg.train.seed)},
                           "seed": int(cfg.train.seed)},
            "loss": None, "tokens": 0}
    write_grown(dst, cfg, variables, data_dir, manifest, meta, log, on_cpu=on_cpu)
  log(f"random init of stage {cfg.stage!r}: {n_params:,} parameters (seed train.seed="
      f"{cfg.train.seed}) in {time.perf_counter() - t0:.1f}s")
  return {"dst": str(dst), "meta": meta, "n_params": n_params}
