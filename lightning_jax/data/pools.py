"""Data curriculum: pools of token shards mixed into every global batch with exact stage weights.

SPEC §6: each stage trains on pools D1 (web foundation), D2 (web diverse, most Indic text),
D3 (code), D4 (STEM) with stage weights, plus "always-on" pools (benchmark train splits, Indic
text) that bypass selection and take a fixed fraction of every global batch (default 25 %).

Config (`cfg.data`, see configs/common.py and docs/data.md):
  use_pools           True: train on the mixture below instead of data.path's single stream
  always_on_fraction  share of every global batch taken by the always-on pools
  pools.<name>        weight      absolute share of training tokens in this stage
                      always_on   True for pools injected into every batch
                      domains     "en,hi": the train shards of these domains of data.path
                      shards      a glob of .u32 files, a text file listing shard paths (one per
                                  line, relative to the list file), or a prepare_data directory
                      val_shards  held-out shards of a `shards` pool (same syntax); `domains`
                                  pools take the held-out split of their domains
The weights of all pools sum to 1 and the always-on pools' weights sum to always_on_fraction.

How a global batch of B sequences (windows of seq_len + 2 tokens) is made, deterministically:
  1. Allocation: smooth weighted round-robin (deficit counters, integer arithmetic) first between
     the always-on group and the rest, then between the pools of each group, one row at a time.
     Every pool's cumulative row count stays within a few rows of weight x rows, for any window
     of batches, and the always-on group gets round(fraction x B) rows (+-1) in EVERY batch.
     Rows are then put in a seeded random order so every rank sees every pool.
  2. Ranks: the global batch is cut into num_ranks contiguous slices of B / num_ranks rows; rank r
     (jax.process_index()) reads only its slice.
  3. Streams: the train shards of each pool are sorted by path and striped over ranks (shard i ->
     rank i % num_ranks), so no shard is read by two ranks. Each rank walks its stripe epoch
     after epoch, in an order shuffled per (seed, pool, rank, epoch): the ranks switch shards at
     different times. The stripe is one packed token stream (an end-of-text token is added at a
     shard boundary that is not already one); consecutive windows of a pool start seq_len tokens
     apart, so documents are packed across shard boundaries and every token is a target once.
  4. State: one small JSON record with, for every rank, every pool's token position, and the
     allocator's counters. Every process tracks every rank's positions (the allocation is known
     to all), so the record is identical on all processes and process 0 can save it. Restoring
     it continues the exact stream; restoring it under new weights (a new stage) keeps every
     pool's position (no data replayed) and restarts the allocator for the new weights.

Held-out (validation) shards are never opened by the training streams; a shard named both as
training and held-out data, or in two pools, is an error.
"""
from __future__ import annotations

import collections
import dataclasses
import glob as globlib
import hashlib
import json
import os
import pathlib
from typing import Any, Mapping, Sequence
import zlib

import jax
from ml_collections import ConfigDict
import numpy as np

from lightning_jax.config import schema
from lightning_jax.config import ConfigError
from lightning_jax.data import pipeline
from lightning_jax.data.shards import (FORMAT_VERSION, MANIFEST, TOKEN_DTYPE, DataError,
                                       load_manifest, shards_of)

STATE_KIND = "pools/v1"
UNITS = 1_000_000                 # weights are apportioned in millionths
# the fields of a pool entry and their types, from the config schema's declaration
POOL_FIELDS = {k: ((float, int) if isinstance(v, float) else (type(v),))
               for k, v in schema.POOL_FIELDS.items()}
WEIGHT_TOL = 1e-6


def _config_error(msg):
  return ConfigError(msg)


# ----------------------------------------------------------------------------- declarations
@dataclasses.dataclass(frozen=True)
class PoolSpec:
  name: str
  weight: float
  always_on: bool = False
  domains: tuple[str, ...] = ()
  shards: str = ""
  val_shards: str = ""


def pool_config(weight: float, always_on: bool = False, domains: str = "", shards: str = "",
                val_shards: str = ""):
  """One `cfg.data.pools.<name>` entry (a ConfigDict)."""
  return ConfigDict(dict(weight=float(weight), always_on=bool(always_on), domains=domains,
                         shards=shards, val_shards=val_shards))


def pool_specs(pools: Mapping[str, Any]) -> list[PoolSpec]:
  """Pool declarations from `cfg.data.pools` (a mapping name -> fields), sorted by name."""
  if pools is None or not len(pools):
    raise _config_error("data.pools is empty; expected at least one pool "
                        "{weight, always_on, domains | shards} (docs/data.md).")
  out = []
  for name in sorted(pools):
    p = pools[name]
    p = dict(p.items()) if hasattr(p, "items") else p
    if not isinstance(p, dict):
      raise _config_error(f"data.pools.{name} is {type(p).__name__}; expected a dict of "
                          f"{sorted(POOL_FIELDS)}.")
    for k, v in p.items():
      if k not in POOL_FIELDS:
        raise _config_error(f"data.pools.{name}.{k} is not a pool field; expected one of "
                            f"{sorted(POOL_FIELDS)}.")
      if not isinstance(v, POOL_FIELDS[k]) or (k == "weight" and isinstance(v, bool)):
        raise _config_error(f"data.pools.{name}.{k}={v!r} has the wrong type; expected "
                            f"{POOL_FIELDS[k][0].__name__}.")
    w = float(p.get("weight", 0.0))
    if not (w >= 0 and np.isfinite(w)):
      raise _config_error(f"data.pools.{name}.weight={w} must be a finite number >= 0.")
    domains = tuple(x.strip() for x in p.get("domains", "").split(",") if x.strip())
    if domains and p.get("shards", ""):
      raise _config_error(f"data.pools.{name} sets both domains and shards; expected one source.")
    out.append(PoolSpec(str(name), w, bool(p.get("always_on", False)), domains,
                        p.get("shards", ""), p.get("val_shards", "")))
  return out


def check_weights(specs: Sequence[PoolSpec], always_on_fraction: float):
  """Weights of all pools sum to 1; the always-on pools' weights sum to always_on_fraction."""
  f = float(always_on_fraction)
  if not 0 <= f < 1:
    raise _config_error(f"data.always_on_fraction={f} must be in [0, 1).")
  ao = sum(s.weight for s in specs if s.always_on)
  rest = sum(s.weight for s in specs if not s.always_on)
  terms = " + ".join(f"{s.name} {s.weight:g}" for s in specs if s.weight > 0)
  if abs(ao - f) > WEIGHT_TOL:
    raise _config_error(f"the always-on pools' weights sum to {ao:g} but data.always_on_fraction="
                        f"{f:g}; expected them to be equal.")
  if abs(ao + rest - 1) > WEIGHT_TOL:
    raise _config_error(f"data.pools weights sum to {ao + rest:g} ({terms}), {rest:g} besides the "
                        f"always-on {ao:g}; expected 1 (stage pools {1 - f:g} + always-on {f:g}).")
  if rest <= 0 and f < 1:
    raise _config_error("data.pools has no stage (non-always-on) pool with weight > 0.")


def _units(weights: Sequence[float]) -> list[int]:
  """Integer millionths summing exactly to UNITS (largest remainder), zero stays zero."""
  w = np.asarray(weights, np.float64)
  x = w / w.sum() * UNITS
  base = np.floor(x).astype(np.int64)
  rem = UNITS - int(base.sum())
  order = sorted(range(len(w)), key=lambda i: (-(x[i] - base[i]), i))
  for i in order[:rem]:
    base[i] += 1
  return [int(v) for v in base]


# ----------------------------------------------------------------------------- shards
@dataclasses.dataclass(frozen=True)
class Shard:
  path: str                       # absolute path of a .u32 file
  n_tokens: int


def _vocab_signature(manifest: dict, mdir: pathlib.Path) -> tuple:
  vid = ""
  if manifest.get("vocab_ids"):
    p = mdir / manifest["vocab_ids"]
    vid = hashlib.sha256(p.read_bytes()).hexdigest()[:16] if p.exists() else "missing"
  return (manifest.get("tokenizer"), manifest.get("id_order"), manifest.get("vocab_size"),
          manifest.get("eot_id"), vid)


class _ShardResolver:
  """Turns pool sources into checked Shard lists; remembers every shard directory's manifest."""

  def __init__(self, data_dir, manifest):
    self.data_dir = pathlib.Path(data_dir) if data_dir else None
    self.manifest = manifest
    self.ref_sig = (_vocab_signature(manifest, self.data_dir) if manifest is not None and
                    self.data_dir is not None else None)
    self.ref_dir = self.data_dir
    self._dir_cache: dict[pathlib.Path, dict | None] = {}

  def _dir_manifest(self, d: pathlib.Path):
    if d not in self._dir_cache:
      m = None
      if (d / MANIFEST).exists():
        m = load_manifest(d)
        sig = _vocab_signature(m, d)
        if self.ref_sig is None:
          self.ref_sig, self.ref_dir = sig, d
        elif sig != self.ref_sig:
          raise DataError(f"shards in {d} use the vocabulary {sig[:4]} but {self.ref_dir} uses "
                          f"{self.ref_sig[:4]} (or a different vocab_ids.npy); all pools must "
                          f"share one token id order (prepare them together, or with "
                          f"--id_order natural).")
      self._dir_cache[d] = m
    return self._dir_cache[d]

  def shard(self, path: pathlib.Path, what: str) -> Shard:
    path = path.resolve()
    if not path.is_file():
      raise DataError(f"{what} names {path}, which does not exist.")
    size = path.stat().st_size
    if size % TOKEN_DTYPE.itemsize:
      raise DataError(f"shard {path} has {size} bytes, not a whole number of uint32 tokens.")
    m = self._dir_manifest(path.parent)
    entry = None
    if m is not None:
      entry = next((e for e in m["shards"] if e["file"] == path.name), None)
      if entry is not None and entry["n_tokens"] != size // TOKEN_DTYPE.itemsize:
        raise DataError(f"shard {path} holds {size // 4} tokens but its manifest says "
                        f"{entry['n_tokens']}; the shard or manifest is stale or truncated.")
    vocab = (m or self.manifest or {}).get("vocab_size")
    if entry is None and vocab is not None and size:   # no recorded id range: scan it once
      arr = _tokens(str(path))
      lo, hi = int(arr.min()), int(arr.max())
      if hi >= int(vocab):
        raise DataError(f"shard {path} holds token ids {lo}..{hi} but the vocabulary is "
                        f"[0, {vocab}) (a negative id written as uint32 shows as a huge one); "
                        f"expected ids below vocab_size.")
    return Shard(str(path), size // TOKEN_DTYPE.itemsize)

  def from_manifest_dir(self, d: pathlib.Path, split: str, what: str) -> dict[str, list[Shard]]:
    m = self._dir_manifest(d.resolve())
    if m is None:
      raise DataError(f"{what}: directory {d} has no {MANIFEST}; expected a prepare_data output.")
    out: dict[str, list[Shard]] = {}
    for e in shards_of(m, split):
      out.setdefault(e["domain"], []).append(self.shard(d / e["file"], f"{what} ({d / MANIFEST})"))
    return out

  def source(self, src: str, split: str, what: str) -> dict[str, list[Shard]]:
    """A glob, a list file or a prepare_data directory -> {key: shards}."""
    p = pathlib.Path(src).expanduser()
    if p.is_dir():
      return self.from_manifest_dir(p, split, what)
    if p.is_file() and p.suffix != ".u32":
      base = p.parent
      out = []
      for n, line in enumerate(p.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
          continue
        q = pathlib.Path(line).expanduser()
        out.append(self.shard(q if q.is_absolute() else base / q, f"{what}: shard list {p} line {n}"))
      if not out:
        raise DataError(f"{what}: shard list {p} names no shards.")
      return {"": out}
    paths = sorted(globlib.glob(str(p)))
    if not paths:
      raise DataError(f"{what}: {src!r} is not a shard list, directory or .u32 file, and as a "
                      f"glob it matches no files.")
    return {"": [self.shard(pathlib.Path(x), f"{what} glob {src!r}") for x in paths]}

  def domains(self, domains, split: str, what: str) -> dict[str, list[Shard]]:
    if self.manifest is None or self.data_dir is None:
      raise DataError(f"{what} selects domains {list(domains)} but no data directory "
                      f"(data.path) was given to take them from.")
    out = {}
    for dom in domains:
      entries = shards_of(self.manifest, split, dom)
      if not entries and split == "train":
        raise DataError(f"{what}: domain {dom!r} has no train shards in {self.data_dir} "
                        f"(domains there: {', '.join(self.manifest['domains'])}).")
      if entries:
        out[dom] = [self.shard(self.data_dir / e["file"], f"{what} ({self.data_dir / MANIFEST})")
                    for e in entries]
    return out


@dataclasses.dataclass
class Pool:
  spec: PoolSpec
  train: list[Shard]                      # sorted by path
  val: dict[str, list[Shard]]             # held-out shards per domain (or per pool name)

  @property
  def name(self):
    return self.spec.name

  @property
  def n_tokens(self):
    return sum(s.n_tokens for s in self.train)

  def fingerprint(self) -> str:
    h = hashlib.sha256(json.dumps([[os.path.basename(s.path), s.n_tokens] for s in self.train])
                       .encode()).hexdigest()
    return h[:16]


def resolve_pools(specs: Sequence[PoolSpec], data_dir=None, manifest=None) -> list[Pool]:
  """Find and check every pool's train and held-out shards."""
  if manifest is None and data_dir:
    manifest = load_manifest(data_dir)
  res = _ShardResolver(data_dir, manifest)
  pools = []
  for s in specs:
    what = f"pool {s.name}"
    if s.domains:
      train = res.domains(s.domains, "train", what)
      val = res.domains(s.domains, "val", what)
    elif s.shards:
      train = res.source(s.shards, "train", what)
      if s.val_shards:
        val = res.source(s.val_shards, "val", f"{what} val_shards")
      elif pathlib.Path(s.shards).expanduser().is_dir():     # a prepare_data dir: its val split
        val = res.source(s.shards, "val", what)
      else:
        val = {}
      if "" in val:
        val = {s.name: val.pop("")}
    else:
      train, val = {}, {}
    tr = sorted({x.path: x for xs in train.values() for x in xs}.values(), key=lambda x: x.path)
    if s.weight > 0 and sum(x.n_tokens for x in tr) == 0:
      raise DataError(f"pool {s.name} has weight {s.weight:g} but no shards "
                      f"({'its shards hold no tokens' if tr else 'set domains or shards'}).")
    pools.append(Pool(s, tr, val))
  # nothing shared between pools, nothing both trained on and held out
  owner: dict[str, str] = {}
  for p in pools:
    for x in p.train:
      if x.path in owner:
        raise DataError(f"shard {x.path} is in pools {owner[x.path]} and {p.name}; each shard may "
                        f"belong to one pool.")
      owner[x.path] = p.name
  for p in pools:
    for xs in p.val.values():
      for x in xs:
        if x.path in owner:
          raise DataError(f"shard {x.path} is held out by pool {p.name} and trained on by pool "
                          f"{owner[x.path]}; validation shards must never be sampled for training.")
  return pools


# ----------------------------------------------------------------------------- streams
def stripe(shards: Sequence[Shard], rank: int, num_ranks: int, pool: str = "?") -> list[Shard]:
  """Rank `rank`'s shards: i -> rank i % num_ranks over the path-sorted list."""
  if len(shards) < num_ranks:
    raise DataError(f"pool {pool} has {len(shards)} train shard(s) but {num_ranks} data-parallel "
                    f"ranks; expected at least one shard per rank (prepare it with a smaller "
                    f"--shard_tokens).")
  return list(sorted(shards, key=lambda s: s.path))[rank::num_ranks]


_OPEN: "collections.OrderedDict[str, np.ndarray]" = collections.OrderedDict()
MAX_OPEN = 256                    # memory maps kept open (each holds a file descriptor)


def _tokens(path: str) -> np.ndarray:
  arr = _OPEN.get(path)
  if arr is None:
    size = os.path.getsize(path)
    arr = (np.zeros(0, TOKEN_DTYPE) if size == 0 else np.memmap(path, dtype=TOKEN_DTYPE, mode="r"))
    _OPEN[path] = arr
    while len(_OPEN) > MAX_OPEN:
      _OPEN.popitem(last=False)
  else:
    _OPEN.move_to_end(path)
  return arr


class PoolStream:
  """One rank's endless packed token stream over its stripe of one pool, epoch after epoch.

  Epoch e visits the stripe in the order permutation(seed, pool, rank, e); an end-of-text token
  is inserted after a shard that does not end with one. `read(pos, n)` returns tokens
  pos .. pos + n - 1 of the stream (int32); it has no state of its own.
  """

  def __init__(self, name: str, shards: Sequence[Shard], seed: int, rank: int,
               eot_id: int | None):
    self.name, self.shards, self.seed, self.rank = name, list(shards), int(seed), int(rank)
    self.eot = eot_id
    lens = []
    for s in self.shards:
      extra = 0
      if eot_id is not None and s.n_tokens and int(_tokens(s.path)[-1]) != eot_id:
        extra = 1
      lens.append(s.n_tokens + extra)
    self.seg_len = np.asarray(lens, np.int64)
    self.epoch_len = int(self.seg_len.sum())
    if self.epoch_len == 0:
      raise DataError(f"pool {name}: the shards of rank {rank} hold no tokens.")
    self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

  def order(self, epoch: int) -> np.ndarray:
    return self._epoch(epoch)[0]

  def _epoch(self, e: int):
    if e not in self._cache:
      if len(self._cache) > 4:
        self._cache.clear()
      rng = np.random.default_rng([self.seed, zlib.crc32(self.name.encode()), self.rank, e])
      order = rng.permutation(len(self.shards))
      ends = np.cumsum(self.seg_len[order])
      self._cache[e] = (order, ends)
    return self._cache[e]

  def locate(self, pos: int) -> tuple[int, int, int]:
    """(epoch, shard index in self.shards, offset in that shard's segment) of stream token pos."""
    e, off = divmod(int(pos), self.epoch_len)
    order, ends = self._epoch(e)
    k = int(np.searchsorted(ends, off, side="right"))
    start = int(ends[k - 1]) if k else 0
    return e, int(order[k]), off - start

  def read(self, pos: int, n: int) -> np.ndarray:
    out = np.empty(n, np.int32)
    got = 0
    while got < n:
      e, i, off = self.locate(pos + got)
      s = self.shards[i]
      if off < s.n_tokens:
        take = min(n - got, s.n_tokens - off)
        out[got:got + take] = _tokens(s.path)[off:off + take]
      else:                                   # the inserted end-of-text after this shard
        take = 1
        out[got] = self.eot
      got += take
    return out


# ----------------------------------------------------------------------------- allocation
class SmoothRoundRobin:
  """Smooth weighted round-robin over integer weights: each pick adds every weight to its
  counter, takes the largest counter (ties: lowest index) and subtracts the total from it.
  The counters sum to 0 and stay bounded, so after m picks item i has been picked
  m * w_i / sum(w) times up to a bounded error (below the number of items)."""

  def __init__(self, weights: Sequence[int], current: Sequence[int] | None = None):
    self.w = [int(x) for x in weights]
    self.total = sum(self.w)
    self.cur = [0] * len(self.w) if current is None else [int(x) for x in current]

  def pick(self) -> int:
    best = 0
    for i, w in enumerate(self.w):
      self.cur[i] += w
      if self.cur[i] > self.cur[best]:
        best = i
    self.cur[best] -= self.total
    return best


# ----------------------------------------------------------------------------- loader
class MixtureLoader:
  """Iterator of {"ids": int32 [batch // num_ranks, seq_len + 2], "pool": int32 [same rows]}
  for rank `rank` of `num_ranks`; get_state() / set_state() exchange one small JSON record.

  `read`: the contiguous ranks this process reads (default: just `rank`); the output holds their
  rows in rank order, [len(read) x batch // num_ranks] rows. A process of a multi-process run
  reads several ranks when data.ranks is a multiple of the process count, and one process
  reading every rank yields exactly the global batches of that many processes.

  `pools`: resolved pools (weight 0 pools are kept for their held-out shards but never read).
  `names` in the output: `self.pool_names[i]` is the pool of rows with "pool" == i.
  """

  kind = STATE_KIND

  def __init__(self, pools: Sequence[Pool], batch: int, seq_len: int, seed: int,
               always_on_fraction: float, rank: int = 0, num_ranks: int = 1,
               eot_id: int | None = None, read: Sequence[int] | None = None):
    read = [int(rank)] if read is None else [int(r) for r in read]
    if not read or read != list(range(read[0], read[0] + len(read))) or not (
        0 <= read[0] and read[-1] < num_ranks):
      raise DataError(f"read={read} must be a non-empty contiguous run of ranks in "
                      f"[0, num_ranks={num_ranks}).")
    rank = read[0]
    if num_ranks < 1 or not 0 <= rank < num_ranks:
      raise DataError(f"rank={rank} must be in [0, num_ranks={num_ranks}).")
    if batch <= 0 or batch % num_ranks:
      raise DataError(f"global batch {batch} must be a positive multiple of the {num_ranks} "
                      f"data-parallel ranks (processes).")
    if seq_len <= 0:
      raise DataError(f"seq_len={seq_len} must be positive.")
    check_weights([p.spec for p in pools], always_on_fraction)
    self.pools = [p for p in pools if p.spec.weight > 0]
    self.pool_names = [p.name for p in self.pools]
    self.batch, self.seq_len, self.seed = int(batch), int(seq_len), int(seed)
    self.rank, self.num_ranks = int(rank), int(num_ranks)
    self.read = read
    self.local = self.batch // self.num_ranks
    self.always_on_fraction = float(always_on_fraction)
    # streams: this rank reads its own; positions are tracked for all ranks
    self.stripes = {p.name: [stripe(p.train, r, num_ranks, p.name) for r in range(num_ranks)]
                    for p in self.pools}
    self.rank_streams = {(p.name, r): PoolStream(p.name, self.stripes[p.name][r], seed, r, eot_id)
                         for p in self.pools for r in self.read}
    self.streams = {p.name: self.rank_streams[(p.name, self.rank)] for p in self.pools}
    self._set_weights()
    self.pos = {n: [0] * num_ranks for n in self.pool_names}
    self.batches = 0
    self.dormant: dict[str, dict] = {}   # saved positions of pools with weight 0 in this stage

  # -- allocation
  def _set_weights(self):
    units = _units([p.spec.weight for p in self.pools])
    self.units = dict(zip(self.pool_names, units))
    ao = [i for i, p in enumerate(self.pools) if p.spec.always_on]
    st = [i for i, p in enumerate(self.pools) if not p.spec.always_on]
    self.groups = [st, ao]
    g = [sum(units[i] for i in st), sum(units[i] for i in ao)]
    self.top = SmoothRoundRobin(g)
    self.sub = [SmoothRoundRobin([units[i] for i in grp]) for grp in self.groups]

  def allocate(self) -> np.ndarray:
    """Pool index of every row of the next global batch (advances the allocator)."""
    rows = np.empty(self.batch, np.int32)
    for j in range(self.batch):
      gi = self.top.pick()
      rows[j] = self.groups[gi][self.sub[gi].pick()]
    rng = np.random.default_rng([self.seed, 0x5EED, self.batches])
    return rows[rng.permutation(self.batch)]

  # -- iteration
  def __iter__(self):
    return self

  def __next__(self) -> dict:
    rows = self.allocate()
    T = self.seq_len + 2
    n = self.local * len(self.read)
    ids = np.empty((n, T), np.int32)
    lo = self.rank * self.local
    for r in range(self.num_ranks):
      for j in range(r * self.local, (r + 1) * self.local):
        name = self.pool_names[rows[j]]
        if (name, r) in self.rank_streams:
          ids[j - lo] = self.rank_streams[(name, r)].read(self.pos[name][r], T)
        self.pos[name][r] += self.seq_len
    self.batches += 1
    return {"ids": ids, "pool": rows[lo:lo + n].copy()}

  # -- state
  def get_state(self) -> dict:
    pools = {n: dict(rec) for n, rec in self.dormant.items()}
    pools.update({p.name: {"fingerprint": p.fingerprint(), "pos": list(self.pos[p.name])}
                  for p in self.pools})
    return {"kind": self.kind, "seed": self.seed, "batch": self.batch,
            "num_ranks": self.num_ranks, "batches": self.batches,
            "weights": dict(self.units),
            "alloc": {"top": list(self.top.cur), "sub": [list(s.cur) for s in self.sub]},
            "pools": pools}

  def set_state(self, state: dict, log=None) -> None:
    """Continue from a saved record. Same weights: the exact stream. New weights (a new stage):
    every pool keeps its position (no replay) and the allocator restarts for the new weights;
    a pool new to the mixture starts at its beginning; a pool whose weight became 0 keeps its
    saved position in the record for a later stage."""
    if not isinstance(state, dict) or state.get("kind") != self.kind:
      raise DataError(f"saved loader state has kind {state.get('kind') if isinstance(state, dict) else state!r}, "
                      f"expected {self.kind!r} (a pool mixture); the run switched data pipelines.")
    for k in ("seed", "batch", "num_ranks"):
      if state.get(k) != getattr(self, k):
        raise DataError(f"saved loader state has {k}={state.get(k)!r} but this loader has "
                        f"{k}={getattr(self, k)!r}; resuming would not continue the same streams.")
    saved = state.get("pools", {})
    pos = {n: [0] * self.num_ranks for n in self.pool_names}
    for p in self.pools:
      if p.name not in saved:
        continue
      rec = saved[p.name]
      if rec.get("fingerprint") != p.fingerprint():
        raise DataError(f"pool {p.name}'s shards changed since the checkpoint (fingerprint "
                        f"{rec.get('fingerprint')} -> {p.fingerprint()}); its saved position "
                        f"would point into a different stream.")
      if len(rec.get("pos", [])) != self.num_ranks:
        raise DataError(f"saved state of pool {p.name} has {len(rec.get('pos', []))} rank "
                        f"positions, expected {self.num_ranks}.")
      pos[p.name] = [int(x) for x in rec["pos"]]
    self.pos = pos
    # pools that sit this stage out keep their saved positions for a later stage
    self.dormant = {n: rec for n, rec in saved.items() if n not in self.pos}
    self.batches = int(state["batches"])
    self._set_weights()
    if state.get("weights") == self.units:
      self.top.cur = [int(x) for x in state["alloc"]["top"]]
      for s, cur in zip(self.sub, state["alloc"]["sub"]):
        s.cur = [int(x) for x in cur]
    elif log is not None:
      log(f"data mixture weights changed since the checkpoint ({state.get('weights')} -> "
          f"{self.units}); pools continue from their saved positions.")

  def epochs(self) -> dict:
    """Completed fraction of an epoch per pool (this rank's stripe), for logging."""
    return {n: self.pos[n][self.rank] / self.streams[n].epoch_len for n in self.pool_names}


# ----------------------------------------------------------------------------- from a config
def _rank_defaults(rank, num_ranks):
  if rank is None or num_ranks is None:
    rank = jax.process_index() if rank is None else rank
    num_ranks = jax.process_count() if num_ranks is None else num_ranks
  return int(rank), int(num_ranks)


def pools_from_config(cfg, data_dir=None, manifest=None) -> list[Pool]:
  specs = pool_specs(cfg.data.pools)
  check_weights(specs, cfg.data.always_on_fraction)
  return resolve_pools(specs, data_dir or None, manifest)


def _eot(pools, manifest):
  if manifest is not None:
    return int(manifest["eot_id"])
  for p in pools:
    for s in p.train:
      m = pathlib.Path(s.path).parent / MANIFEST
      if m.exists():
        return int(json.loads(m.read_text())["eot_id"])
  return None


def data_ranks(cfg, rows=None) -> tuple[int, list[int]]:
  """(num_ranks, the ranks this process reads) for the global-batch `rows` [lo, hi) it holds.

  num_ranks: data.ranks, or the process count when data.ranks is 0 (or absent). rows: default
  the process's equal contiguous share of the global batch (jax.process_index())."""
  n_proc, me = jax.process_count(), jax.process_index()
  ranks = cfg.data.ranks
  if not isinstance(ranks, int) or isinstance(ranks, bool) or ranks < 0:
    raise DataError(f"data.ranks={ranks!r} must be an integer >= 0 (0: one rank per process).")
  num_ranks = ranks or n_proc
  batch = int(cfg.train.global_batch)
  if num_ranks % n_proc or batch % num_ranks:
    raise DataError(f"data.ranks={num_ranks} must be a multiple of the {n_proc} processes and "
                    f"divide train.global_batch={batch}.")
  if rows is None:
    rows = (me * batch // n_proc, (me + 1) * batch // n_proc)
  local = batch // num_ranks
  lo, hi = int(rows[0]), int(rows[1])
  if lo % local or hi % local or hi <= lo:
    raise DataError(f"this process holds rows [{lo}, {hi}) of each global batch, which are not "
                    f"whole data ranks of {local} rows (data.ranks={num_ranks}); expected "
                    f"data.ranks to be a multiple of the process count.")
  return num_ranks, list(range(lo // local, hi // local))


def mixture_loader(cfg, data_dir=None, manifest=None, *, rank=None, num_ranks=None,
                   pools=None, rows=None) -> MixtureLoader:
  """The pool mixture of `cfg.data` for this process. rank/num_ranks: one explicit rank; else
  the ranks of the global-batch `rows` this process holds (data_ranks)."""
  read = None
  if rank is None and num_ranks is None:
    num_ranks, read = data_ranks(cfg, rows)
    rank = read[0]
  rank, num_ranks = _rank_defaults(rank, num_ranks)
  if manifest is None and data_dir:
    manifest = load_manifest(data_dir)
  pools = pools if pools is not None else pools_from_config(cfg, data_dir, manifest)
  return MixtureLoader(pools, cfg.train.global_batch, cfg.train.seq_len, cfg.data.seed,
                       cfg.data.always_on_fraction, rank, num_ranks, _eot(pools, manifest),
                       read=read)


def make_train_loader(cfg, data_dir, manifest=None, *, rank=None, num_ranks=None, rows=None):
  """The one switch for launch/train.py: the pool mixture when cfg.data.use_pools, else the
  single-source window pipeline. Both yield {"ids": int32 [rows, seq_len + 2], ...} and have
  get_state() / set_state(record). Both yield this process's rows only: `rows` [lo, hi) of
  every global batch (default: its equal share, by jax.process_index())."""
  if cfg.data.use_pools:
    return mixture_loader(cfg, data_dir, manifest, rank=rank, num_ranks=num_ranks, rows=rows)
  return pipeline.train_loader(data_dir, cfg.train.seq_len, cfg.train.global_batch,
                               cfg.data.seed, manifest=manifest, rows=rows)


def eval_batches(pools: Sequence[Pool], seq_len: int, batch: int, n_batches: int) -> dict:
  """Fixed held-out batches per domain (per pool for `shards` pools): the first windows of its
  held-out shards in path order, like pipeline.eval_batches. {key: [int32 [b, seq_len + 2]]}."""
  out = {}
  T = seq_len + 2
  for p in pools:
    for key, shards in sorted(p.val.items()):
      if key in out:
        raise DataError(f"held-out set {key!r} is declared by two pools.")
      wins = []
      for s in sorted(shards, key=lambda s: s.path):
        arr = _tokens(s.path)
        for st in range(0, len(arr) - T + 1, seq_len):
          wins.append(np.asarray(arr[st:st + T], np.int32))
          if len(wins) >= batch * n_batches:
            break
        if len(wins) >= batch * n_batches:
          break
      if not wins:
        out[key] = []
        continue
      rows = np.stack(wins)
      b = min(batch, len(rows))
      out[key] = [rows[i:i + b] for i in range(0, len(rows) - len(rows) % b, b)]
  return out


def eval_batches_from_config(cfg, data_dir, manifest=None, pools=None) -> dict:
  if manifest is None and data_dir:
    manifest = load_manifest(data_dir)
  pools = pools if pools is not None else pools_from_config(cfg, data_dir, manifest)
  return eval_batches(pools, cfg.train.seq_len, cfg.train.eval_batch, cfg.train.eval_batches)


def describe(pools: Sequence[Pool], num_ranks: int = 1) -> str:
  """A table of the pools: weight, shards, train tokens, held-out sets."""
  lines = [f"{'pool':<12} {'weight':>7} {'on':>3} {'shards':>6} {'train tokens':>14}  held out"]
  for p in pools:
    lines.append(f"{p.name:<12} {p.spec.weight:>7.3f} {'yes' if p.spec.always_on else '':>3} "
                 f"{len(p.train):>6} {p.n_tokens:>14,}  "
                 f"{', '.join(f'{k} ({sum(s.n_tokens for s in v):,})' for k, v in p.val.items())}")
  return "\n".join(lines)


# ----------------------------------------------------------------------------- writing shards
def write_shard_dir(output, arrays: Mapping[tuple[str, str], Sequence[np.ndarray]], *,
                    vocab_size: int, eot_id: int, tokenizer: str = "custom",
                    id_order: str = "natural") -> dict:
  """Write already-tokenized documents as a shard directory (manifest.json + .u32 files).

  arrays: {(split, domain): [shard token arrays, ...]} with split "train" or "val"; each array
  is written as one shard as given (put end-of-text tokens between documents yourself).
  """
  out = pathlib.Path(output)
  out.mkdir(parents=True, exist_ok=True)
  shards = []
  for (split, dom), arrs in sorted(arrays.items()):
    if split not in ("train", "val"):
      raise DataError(f"split {split!r} of domain {dom!r} must be 'train' or 'val'.")
    for i, a in enumerate(arrs):
      a = np.asarray(a)
      if a.size and (a.min() < 0 or a.max() >= vocab_size):
        raise DataError(f"shard {i} of {split}/{dom} has ids outside [0, {vocab_size}).")
      name = f"{split}-{dom}-{i:05d}.u32"
      a.astype(TOKEN_DTYPE).tofile(out / name)
      shards.append({"file": name, "split": split, "domain": dom, "n_tokens": int(a.size),
                     "min_id": int(a.min()) if a.size else None,
                     "max_id": int(a.max()) if a.size else None})
  m = {"format_version": FORMAT_VERSION, "tokenizer": tokenizer, "id_order": id_order,
       "vocab_size": int(vocab_size), "eot_id": int(eot_id),
       "domains": sorted({s["domain"] for s in shards}), "shards": shards}
  (out / MANIFEST).write_text(json.dumps(m, indent=1))
  return m
