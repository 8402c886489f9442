"""grain pipeline over token shards: fixed windows, deterministic shuffle, checkpointable state.

A training example is a window of seq_len + 2 tokens (inputs ids[:-2], next-token targets
ids[1:-1], MTP targets ids[2:]). Windows start every seq_len tokens inside each shard, so every
token is a next-token target once per epoch; documents are packed (end-of-text between them).

The source is pluggable: anything with `__len__` and `__getitem__(i) -> int32 [seq_len + 2]`
works (`WindowSource` is the one over a manifest's shards; the data-curriculum issue adds pool
mixtures). The loader state saved with each checkpoint is one small JSON record:
  {"kind", "seed", "seq_len", "batch", "n_windows", "iterator": grain's iterator state}
Restoring it continues the exact same stream of batches.

One process feeds all its local devices. With several processes (lightning_jax/distributed.py)
each reads only its own rows [lo, hi) of every global batch (`rows=`): the shuffled window order
is the same on every process (an index computation), so the global batches, and the loss, are
those of one process reading them all; launch.train assembles them with
jax.make_array_from_process_local_data.
"""
from __future__ import annotations

import os

import grain
import numpy as np

from lightning_jax.data.shards import DataError, load_manifest, open_shard, shards_of


class WindowSource:
  """Random-access windows of `window` tokens starting every `stride` tokens in each shard."""

  def __init__(self, data_dir: str | os.PathLike, split: str, window: int, stride: int,
               domain: str | None = None, manifest: dict | None = None):
    self.data_dir = str(data_dir)
    self.manifest = manifest if manifest is not None else load_manifest(data_dir)
    self.window, self.stride = int(window), int(stride)
    entries = shards_of(self.manifest, split, domain)
    self.arrays, starts = [], []
    for k, e in enumerate(entries):
      arr = open_shard(data_dir, e)
      n = 0 if len(arr) < self.window else (len(arr) - self.window) // self.stride + 1
      self.arrays.append(arr)
      starts.append(n)
    self.offsets = np.concatenate([[0], np.cumsum(starts)]).astype(np.int64)
    what = f"split {split!r}" + (f" domain {domain!r}" if domain else "")
    if self.offsets[-1] == 0:
      total = sum(len(a) for a in self.arrays)
      raise DataError(f"{what} of {data_dir} has {total} tokens, fewer than one window of "
                      f"{self.window} tokens (train.seq_len + 2).")

  def __len__(self) -> int:
    return int(self.offsets[-1])

  def __getitem__(self, i: int) -> np.ndarray:
    i = int(i)
    k = int(np.searchsorted(self.offsets, i, side="right") - 1)
    start = (i - int(self.offsets[k])) * self.stride
    return np.asarray(self.arrays[k][start:start + self.window], dtype=np.int32)

  def __repr__(self):
    return f"WindowSource({self.data_dir}, {len(self)} windows of {self.window})"


class Loader:
  """Iterator of {"ids": int32 [batch, seq_len + 2]} with get_state / set_state."""

  kind = "windows/v1"

  def __init__(self, source, batch: int, seed: int, seq_len: int, rows=None):
    self.source, self.batch, self.seed, self.seq_len = source, int(batch), int(seed), int(seq_len)
    order = grain.MapDataset.source(source).shuffle(seed=self.seed).repeat(None)
    lo, hi = (0, self.batch) if rows is None else (int(rows[0]), int(rows[1]))
    if not 0 <= lo < hi <= self.batch:
      raise DataError(f"rows [{lo}, {hi}) must lie within the global batch of {self.batch}.")
    self.rows = (lo, hi)
    if (lo, hi) == (0, self.batch):
      ds = order.batch(self.batch, drop_remainder=True)
    else:                 # this process's rows of every global batch: only they are read
      n, B = hi - lo, self.batch
      ds = (grain.MapDataset.range(0, len(order) // B * n)
            .map(lambda j: order[(j // n) * B + lo + j % n]).batch(n, drop_remainder=True))
    self._ds = ds.to_iter_dataset()
    self._it = iter(self._ds)

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    return {"ids": next(self._it)}

  def get_state(self) -> dict:
    return {"kind": self.kind, "seed": self.seed, "seq_len": self.seq_len, "batch": self.batch,
            "n_windows": len(self.source), "iterator": dict(self._it.get_state())}

  def set_state(self, state: dict, log=None):
    del log    # same interface as pools.MixtureLoader.set_state
    mine = self.get_state()
    for k in ("kind", "seed", "seq_len", "batch", "n_windows"):
      if state.get(k) != mine[k]:
        raise DataError(f"saved loader state has {k}={state.get(k)!r} but this run's loader has "
                        f"{k}={mine[k]!r}; resuming would not continue the same data stream.")
    self._it.set_state(state["iterator"])


def train_loader(data_dir, seq_len: int, batch: int, seed: int, manifest=None,
                 rows=None) -> Loader:
  """rows: [lo, hi) of every global batch of `batch` windows read by this process (all: None)."""
  src = WindowSource(data_dir, "train", seq_len + 2, seq_len, manifest=manifest)
  return Loader(src, batch, seed, seq_len, rows=rows)


def eval_batches(data_dir, seq_len: int, batch: int, n_batches: int, manifest=None) -> dict:
  """Fixed held-out batches per domain: the first windows of each domain's val split, in order.

  Returns {domain: [int32 [batch, seq_len + 2], ...]}; a domain with fewer windows than one batch
  uses the windows it has (a smaller batch); a domain without val shards is skipped.
  """
  manifest = manifest if manifest is not None else load_manifest(data_dir)
  out = {}
  for dom in manifest["domains"]:
    if not shards_of(manifest, "val", dom):
      continue
    src = WindowSource(data_dir, "val", seq_len + 2, seq_len, domain=dom, manifest=manifest)
    n = min(len(src), batch * n_batches)
    rows = np.stack([src[i] for i in range(n)])
    b = min(batch, n)
    out[dom] = [rows[i:i + b] for i in range(0, n - n % b, b)]
  if not out:
    raise DataError(f"data in {data_dir} has no held-out (val) shards; prepare it with "
                    f"--val_fraction > 0.")
  return out
