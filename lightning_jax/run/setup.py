"""A run's data: shards (prepared when data.path is empty), vocabulary, loaders, held-out batches.

launch.train, the growth commands, launch.score and the benchmarks all start a run's data here,
so a grown run's shards and held-out batches are exactly those launch.train would use.
"""
from __future__ import annotations

import contextlib
import pathlib

import numpy as np

from lightning_jax import run_checks, vocab
from lightning_jax.config import ConfigError
from lightning_jax.data import pipeline, pools, shards


def resolve_data(cfg, workdir: pathlib.Path, log=print) -> tuple[str, dict]:
  """(shard directory, manifest) of the run; shards are prepared into <workdir>/data from
  data.build_from when data.path is empty (or names a directory without a manifest)."""
  d = cfg.data
  path = d.path
  if not path:
    if not d.build_from:
      raise ConfigError("data.path is empty and data.build_from is empty; expected a shard "
                        "directory (python -m launch.prepare_data) or raw text to build from.")
    path = str(pathlib.Path(workdir) / "data")
  p = pathlib.Path(path)
  if not (p / shards.MANIFEST).exists() and d.build_from:
    src = pathlib.Path(d.build_from)
    if not src.exists():
      raise shards.DataError(f"data.build_from={d.build_from} does not exist; expected a "
                             f"directory of .txt/.jsonl files.")
    log(f"preparing shards from {src} into {p} (id order {d.id_order}) ...")
    encoding = None
    if cfg.tokenizer.name != "o200k_base":        # e.g. "brahmic": the built BrahmicTokenizer-131K
      encoding = vocab.load(cfg.tokenizer).encoding
    shards.prepare([str(src)], str(p), encoding=encoding, id_order=d.id_order,
                   val_fraction=d.val_fraction, seed=d.seed, log=log)
  manifest = shards.load_manifest(p)
  run_checks.pool_layout_fallback(cfg, p, manifest, log)    # own data without the pools' domains
  return str(p), manifest


def apply_data_vocab(cfg, manifest, data_dir):
  """model.vocab_size from the data (data.vocab_from_data), or a check that the data fits it."""
  v = int(manifest["vocab_size"])
  if cfg.data.vocab_from_data:
    with cfg.unlocked() if hasattr(cfg, "unlocked") else contextlib.nullcontext():
      cfg.model.vocab_size = v
  elif v > cfg.model.vocab_size:
    raise ConfigError(f"the data in {data_dir} uses {v} token ids but model.vocab_size="
                      f"{cfg.model.vocab_size}; expected vocab_size >= the data's vocabulary "
                      f"(or data.vocab_from_data=True).")


def make_data(cfg, data_dir, manifest, rows=None):
  """(train loader, held-out batches per domain). The train loader is the pool mixture
  (lightning_jax/data/pools.py; one pool over the whole data without data.use_pools); the
  held-out batches are the pools' (data.use_pools) or the single-source window pipeline's.
  rows: the [lo, hi) of every global batch this process reads (distributed.local_rows)."""
  loader = pools.make_train_loader(cfg, data_dir, manifest, rows=rows)
  evals = {}
  if cfg.train.eval_every > 0:
    if cfg.data.use_pools:
      evals = pools.eval_batches_from_config(cfg, data_dir, manifest)
    else:
      evals = pipeline.eval_batches(data_dir, cfg.train.seq_len, cfg.train.eval_batch,
                                    cfg.train.eval_batches, manifest=manifest)
  return loader, evals


def heldout_weights(cfg, manifest, domains) -> dict:
  """Weight of each held-out domain in the training mixture (sums to 1 over `domains`).

  Pools: pool weight x the domain's share of its pool's training tokens. Single stream: the
  domain's share of all training tokens. The headline held-out loss ("val/mix") is the
  held-out CE_next averaged with these weights, i.e. measured on the distribution the model
  is trained on; "val/mean" is the plain mean over domains.
  """
  tok = {}
  for e in manifest["shards"]:
    if e["split"] == "train":
      tok[e["domain"]] = tok.get(e["domain"], 0) + e["n_tokens"]
  w = {}
  if cfg.data.use_pools:
    for p in pools.pool_specs(cfg.data.pools):
      doms = p.domains
      doms = [d.strip() for d in (doms.split(",") if isinstance(doms, str) else doms) if d.strip()]
      total = sum(tok.get(d, 0) for d in doms)
      for d in doms:
        if total and d in domains:
          w[d] = w.get(d, 0.0) + float(p.weight) * tok.get(d, 0) / total
  else:
    w = {d: float(tok.get(d, 0)) for d in domains}
  z = sum(w.get(d, 0.0) for d in domains)
  if z <= 0:
    return {d: 1.0 / len(domains) for d in domains}
  return {d: w.get(d, 0.0) / z for d in domains}


def heldout_batch(cfg, data_dir, manifest):
  """The first held-out batch of the first evaluated domain: (domain, int32 [eval_batch,
  seq_len + 2]) (the growth report measures source and grown model on it)."""
  c = cfg.copy_and_resolve_references()
  with c.unlocked():
    c.train.eval_every = max(1, int(c.train.eval_every))
    c.train.eval_batches = 1
  _, evals = make_data(c, data_dir, manifest)
  for dom in sorted(evals):
    if len(evals[dom]):
      return dom, np.asarray(evals[dom][0], np.int32)
  raise ValueError(f"no held-out batch of train.eval_batch={c.train.eval_batch} windows in "
                   f"{data_dir}; expected a data split with held-out text.")
