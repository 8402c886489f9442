"""Data curriculum (lightning_jax/data/pools.py): exact mixture shares, always-on injection, exact
resume (also under new stage weights, without replay), per-rank shard striping, held-out pools,
and one clear error per bad declaration.

Synthetic shards encode where every token came from: token = pool * 1e6 + shard * 1e4 + offset
(held-out shards use shard 99), end-of-text = 2**31 - 1. Every yielded row is compared with a
plain numpy reference stream built independently from the documented rule (shards sorted and
striped i -> rank i % R; epoch e in the order permutation([seed, crc32(pool), rank, e]);
end-of-text after a shard that does not end with one; windows of S + 2 tokens every S tokens).
"""
import json
import os
import pathlib
import zlib

import numpy as np
import pytest

from lightning_jax import config
from lightning_jax.config import ConfigError
from lightning_jax.data import pools as P
from lightning_jax.data.shards import DataError

REPO = pathlib.Path(__file__).resolve().parents[1]
EOT = 2**31 - 1
NAMES = ["AO", "D1", "D2", "D3", "D4"]                   # sorted, as pool_specs orders them
W_2B = {"D1": .34, "D2": .24, "D3": .11, "D4": .06, "AO": .25}
W_9B = {"D1": .07, "D2": .15, "D3": .27, "D4": .26, "AO": .25}


def _decode(v):
  v = np.asarray(v, np.int64)
  return v // 10**6, (v // 10**4) % 100          # pool code, shard id


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  """Five pools of 8 train shards (random lengths, some ending with end-of-text) + 1 val shard."""
  seed = int(np.random.SeedSequence().entropy % 2**31)
  rng = np.random.default_rng(seed)
  d = tmp_path_factory.mktemp("pools")
  arrays = {}
  for code, name in enumerate(NAMES):
    shards = []
    for s in range(8):
      a = code * 10**6 + s * 10**4 + np.arange(int(rng.integers(150, 900)))
      if rng.random() < 0.3:
        a[-1] = EOT
      shards.append(a)
    arrays[("train", name)] = shards
    arrays[("val", name)] = [code * 10**6 + 99 * 10**4 + np.arange(300)]
  m = P.write_shard_dir(d, arrays, vocab_size=2**31, eot_id=EOT, tokenizer="synthetic")
  return {"dir": d, "manifest": m, "arrays": arrays, "seed": seed}


def _specs(weights, always_on=("AO",)):
  return [P.PoolSpec(n, float(weights.get(n, 0.0)), n in always_on, (n,)) for n in NAMES]


def _loader(data, weights, batch, seq_len, seed, rank=0, num_ranks=1, frac=0.25):
  pools = P.resolve_pools(_specs(weights), data["dir"], data["manifest"])
  return P.MixtureLoader(pools, batch, seq_len, seed, frac, rank, num_ranks, EOT)


def _ref_stream(data, name, seed, rank, num_ranks, n_tokens):
  """Independent reference: rank's packed stream of pool `name` (at least n_tokens long)."""
  arrs = data["arrays"][("train", name)]                  # file names sort in this order
  mine = arrs[rank::num_ranks]
  out, total, e = [], 0, 0
  while total < n_tokens:
    order = np.random.default_rng([seed, zlib.crc32(name.encode()), rank, e]).permutation(len(mine))
    for i in order:
      a = mine[i] if mine[i][-1] == EOT else np.append(mine[i], EOT)
      out.append(a)
      total += len(a)
    e += 1
  return np.concatenate(out).astype(np.int64)


class RefChecker:
  """Checks every row against the reference windows of its pool, consecutively (no replay/skip)."""

  def __init__(self, data, seed, rank, num_ranks, seq_len, msg):
    self.data, self.seed, self.rank, self.R, self.S, self.msg = data, seed, rank, num_ranks, \
        seq_len, msg
    self.k = {n: 0 for n in NAMES}
    self.ref = {}

  def row(self, name, ids):
    k, S = self.k[name], self.S
    need = (k + 1) * S + 2
    if name not in self.ref or len(self.ref[name]) < need:
      self.ref[name] = _ref_stream(self.data, name, self.seed, self.rank, self.R, 2 * need + 4096)
    want = self.ref[name][k * S:k * S + S + 2]
    assert np.array_equal(np.asarray(ids, np.int64), want), \
        f"pool {name} rank {self.rank} window {k} differs from the reference stream ({self.msg})"
    self.k[name] += 1

  def batch(self, loader, b):
    for ids, p in zip(b["ids"], b["pool"]):
      self.row(loader.pool_names[p], ids)


# ----------------------------------------------------------------------------- mixture
def test_shares_over_1000_batches_and_rows_match_reference(data):
  rng = np.random.default_rng(data["seed"])
  batch = int(rng.choice([12, 16, 24, 40]))
  seq_len = int(rng.integers(8, 40))
  seed = int(rng.integers(1 << 30))
  msg = f"data seed {data['seed']}, batch {batch}, seq_len {seq_len}, loader seed {seed}"
  L = _loader(data, W_2B, batch, seq_len, seed)
  chk = RefChecker(data, seed, 0, 1, seq_len, msg)
  tokens = {n: 0 for n in NAMES}
  counts = np.zeros(len(L.pool_names), np.int64)
  want = np.array([W_2B[n] for n in L.pool_names])
  worst = 0.0
  for t in range(1000):
    b = next(L)
    assert b["ids"].shape == (batch, seq_len + 2) and b["ids"].dtype == np.int32
    chk.batch(L, b)
    # the pool a row came from, read from its token values (end-of-text excluded)
    for row in b["ids"]:
      code, _ = _decode(row[row != EOT].min())
      tokens[NAMES[code]] += row.size
    got = np.bincount(b["pool"], minlength=len(L.pool_names))
    n_ao = got[L.pool_names.index("AO")]
    assert n_ao in (np.floor(.25 * batch), np.ceil(.25 * batch)), \
        f"always-on rows {n_ao} in batch {t}, expected round(0.25 x {batch}) ({msg})"
    counts += got
    worst = max(worst, np.abs(counts - want * batch * (t + 1)).max())
  total = sum(tokens.values())
  for n in NAMES:
    share = tokens[n] / total
    tol = 0.01 if n == "AO" else 0.02
    assert abs(share - W_2B[n]) <= tol, f"pool {n} token share {share:.4f} vs {W_2B[n]} ({msg})"
  # exact over windows: the cumulative rows of every pool never drift more than a few rows
  assert worst < len(NAMES), f"cumulative allocation drifted by {worst} rows ({msg})"


def test_random_weights_allocation_is_exact():
  seed = int(np.random.SeedSequence().entropy % 2**31)
  rng = np.random.default_rng(seed)
  for _ in range(5):
    k = int(rng.integers(2, 9))
    w = rng.dirichlet(np.ones(k))
    units = P._units(w)
    rr = P.SmoothRoundRobin(units)
    c = np.zeros(k)
    for m in range(1, 3001):
      c[rr.pick()] += 1
      dev = np.abs(c - m * np.asarray(units) / P.UNITS).max()
      assert dev < k, f"round-robin drift {dev} after {m} picks, weights {w} (seed {seed})"
    assert sum(rr.cur) == 0


# ----------------------------------------------------------------------------- resume
@pytest.mark.parametrize("num_ranks,rank", [(1, 0), (2, 1)])
def test_resume_reproduces_stream(data, num_ranks, rank):
  seed, N = 7 + data["seed"] % 1000, 40
  straight = _loader(data, W_2B, 16, 24, seed, rank, num_ranks)
  a = [next(straight) for _ in range(N)]
  first = _loader(data, W_2B, 16, 24, seed, rank, num_ranks)
  b = [next(first) for _ in range(N // 2)]
  state = json.loads(json.dumps(first.get_state()))
  assert len(json.dumps(state)) < 2000, "loader state should be one small record"
  second = _loader(data, W_2B, 16, 24, seed, rank, num_ranks)
  second.set_state(state)
  b += [next(second) for _ in range(N - N // 2)]
  for t, (x, y) in enumerate(zip(a, b)):
    assert np.array_equal(x["ids"], y["ids"]) and np.array_equal(x["pool"], y["pool"]), \
        f"batch {t} differs after resume (seed {seed}, rank {rank}/{num_ranks})"
  assert second.get_state() == straight.get_state()


def test_new_stage_weights_on_resume_no_replay(data, monkeypatch):
  monkeypatch.setattr(P, "MAX_OPEN", 3)            # memory maps are evicted and reopened
  seed = 11 + data["seed"] % 1000
  msg = f"data seed {data['seed']}"
  chk = RefChecker(data, seed, 0, 1, 20, msg)
  stage1 = _loader(data, W_2B, 16, 20, seed)
  for _ in range(30):
    chk.batch(stage1, next(stage1))
  state = json.loads(json.dumps(stage1.get_state()))
  stage2 = _loader(data, W_9B, 16, 20, seed)
  notes = []
  stage2.set_state(state, log=notes.append)
  assert notes and "weights changed" in notes[0]
  rows = np.zeros(len(NAMES))
  for _ in range(200):
    b = next(stage2)
    chk.batch(stage2, b)              # continues every pool's stream exactly: no replay, no skip
    for p in b["pool"]:
      rows[NAMES.index(stage2.pool_names[p])] += 1
  for i, n in enumerate(NAMES):
    assert abs(rows[i] / rows.sum() - W_9B[n]) <= 0.01, f"pool {n} after the stage switch ({msg})"
  # a stage without D4 keeps D4's position in the record; the stage after continues it
  stage3 = _loader(data, {**W_9B, "D4": 0.0, "D3": .53}, 16, 20, seed)
  stage3.set_state(json.loads(json.dumps(stage2.get_state())))
  for _ in range(20):
    chk.batch(stage3, next(stage3))
  assert "D4" not in stage3.pool_names and "D4" in stage3.get_state()["pools"]
  stage4 = _loader(data, W_2B, 16, 20, seed)
  stage4.set_state(json.loads(json.dumps(stage3.get_state())))
  for _ in range(20):
    chk.batch(stage4, next(stage4))
  assert chk.k["D4"] > 0


def test_state_mismatch_is_rejected(data):
  L = _loader(data, W_2B, 16, 16, 0, 0, 2)
  next(L)
  st = L.get_state()
  with pytest.raises(DataError, match="num_ranks=2"):
    _loader(data, W_2B, 16, 16, 0, 0, 4).set_state(st)
  with pytest.raises(DataError, match="kind"):
    _loader(data, W_2B, 16, 16, 0, 0, 2).set_state({"kind": "windows/v1"})
  bad = json.loads(json.dumps(st))
  bad["pools"]["D1"]["fingerprint"] = "0" * 16
  with pytest.raises(DataError, match="pool D1's shards changed"):
    _loader(data, W_2B, 16, 16, 0, 0, 2).set_state(bad)


# ----------------------------------------------------------------------------- ranks
@pytest.mark.parametrize("num_ranks", [2, 4])
def test_ranks_read_disjoint_shards_covering_all(data, num_ranks):
  seed, S, B = 3 + data["seed"] % 1000, 32, 16
  msg = f"data seed {data['seed']}, {num_ranks} ranks"
  loaders = [_loader(data, W_2B, B, S, seed, r, num_ranks) for r in range(num_ranks)]
  single = _loader(data, W_2B, B, S, seed)
  checks = [RefChecker(data, seed, r, num_ranks, S, msg) for r in range(num_ranks)]
  read = [{n: set() for n in NAMES} for _ in range(num_ranks)]
  order = [{n: [] for n in NAMES} for _ in range(num_ranks)]
  for _ in range(300):
    outs = [next(L) for L in loaders]
    # the ranks' slices put together are the global batch's allocation
    assert np.array_equal(np.concatenate([o["pool"] for o in outs]), next(single)["pool"]), msg
    for r, o in enumerate(outs):
      assert o["ids"].shape == (B // num_ranks, S + 2)
      checks[r].batch(loaders[r], o)
      for row in o["ids"]:
        code, shard = _decode(row[row != EOT])
        for c, s in zip(code, shard):
          read[r][NAMES[c]].add(int(s))
          if not order[r][NAMES[c]] or order[r][NAMES[c]][-1] != s:
            order[r][NAMES[c]].append(int(s))
  for n in NAMES:
    n_shards = len(data["arrays"][("train", n)])
    for r in range(num_ranks):
      pos = loaders[r].pos[n][r]
      assert pos >= loaders[r].streams[n].epoch_len, f"rank {r} pool {n}: not one epoch ({msg})"
      # every epoch of this rank visits each shard of its stripe exactly once
      stripe = len(range(r, n_shards, num_ranks))
      first = order[r][n][:stripe]
      assert sorted(first) == list(range(r, n_shards, num_ranks)), (n, r, first, msg)
      for q in range(num_ranks):
        if q != r:
          assert not read[r][n] & read[q][n], f"pool {n}: ranks {r},{q} share shards ({msg})"
    assert set().union(*(read[r][n] for r in range(num_ranks))) == set(range(n_shards)), \
        f"pool {n}: some shard never read ({msg})"
    assert 99 not in set().union(*(read[r][n] for r in range(num_ranks))), "held-out shard read"
  # ranks shuffle their own orders: different ranks, different epochs, different orders
  st = loaders[0].streams["D1"]
  orders = {tuple(st.order(e)) for e in range(64)}   # a stripe of 2 shards: 2 orders only
  assert len(orders) > 1, f"rank 0 visits its shards in the same order every epoch ({msg})"


def test_too_few_shards_for_ranks(data):
  with pytest.raises(DataError, match=r"8 train shard\(s\) but 16 data-parallel ranks"):
    _loader(data, W_2B, 16, 16, 0, 0, 16)


# ----------------------------------------------------------------------------- held out
def test_validation_held_out_per_domain(data):
  pools = P.resolve_pools(_specs(W_2B), data["dir"], data["manifest"])
  ev = P.eval_batches(pools, 30, 4, 2)
  assert sorted(ev) == NAMES
  for n in NAMES:
    rows = np.concatenate(ev[n])
    code, shard = _decode(rows)
    assert (shard == 99).all() and (code == NAMES.index(n)).all()
    assert np.array_equal(rows[1], data["arrays"][("val", n)][0][30:62])
  # glob pools: val_shards held out; naming a training shard as held out is an error
  d = data["dir"]
  spec = P.PoolSpec("web", 1.0, shards=str(d / "train-D1-*.u32"),
                    val_shards=str(d / "val-D1-*.u32"))
  (pool,) = P.resolve_pools([spec])
  assert len(pool.train) == 8 and list(pool.val) == ["web"]
  bad = P.PoolSpec("web", 1.0, shards=str(d / "train-D1-*.u32"),
                   val_shards=str(d / "train-D1-00003.u32"))
  with pytest.raises(DataError, match="must never be sampled for training"):
    P.resolve_pools([bad])


# ----------------------------------------------------------------------------- sources and errors
def test_sources_glob_list_dir_agree(data, tmp_path):
  d = data["dir"]
  ref = P.resolve_pools([P.PoolSpec("x", 1.0, domains=("D2",))], d)[0].train
  by_glob = P.resolve_pools([P.PoolSpec("x", 1.0, shards=str(d / "train-D2-*"))])[0].train
  lst = tmp_path / "sub" / "d2.txt"                  # relative paths: relative to the list file
  lst.parent.mkdir()
  lst.write_text("# D2 shards\n\n" + "\n".join(
      os.path.relpath(d / f"train-D2-{i:05d}.u32", lst.parent) for i in range(8)) + "\n")
  by_list = P.resolve_pools([P.PoolSpec("x", 1.0, shards=str(lst))])[0].train
  assert by_glob == ref and by_list == ref
  by_dir = P.resolve_pools([P.PoolSpec("x", 1.0, shards=str(d))])[0]
  assert len(by_dir.train) == 5 * 8 and sorted(by_dir.val) == NAMES


def test_errors_one_clear_sentence(data, tmp_path):
  d = data["dir"]
  lst = tmp_path / "list.txt"
  lst.write_text(f"{d / 'train-D1-00000.u32'}\n{d / 'train-D1-00042.u32'}\n")
  with pytest.raises(DataError, match=r"shard list .*list.txt line 2 names .*train-D1-00042.u32, "
                     r"which does not exist"):
    P.resolve_pools([P.PoolSpec("D1", 1.0, shards=str(lst))])
  with pytest.raises(DataError, match="pool D4 has weight 0.06 but no shards"):
    P.resolve_pools(_specs(W_2B)[:-1] + [P.PoolSpec("D4", 0.06)], d)
  with pytest.raises(DataError, match="matches no files"):
    P.resolve_pools([P.PoolSpec("D4", 0.06, shards=str(d / "nothing-*.u32"))])
  with pytest.raises(DataError, match="domain 'xx' has no train shards"):
    P.resolve_pools([P.PoolSpec("D4", 0.06, domains=("xx",))], d)
  with pytest.raises(ConfigError, match=r"weights sum to 0.97 .*expected 1"):
    P.check_weights(_specs({**W_2B, "D1": .31}), 0.25)
  with pytest.raises(ConfigError, match="always-on pools' weights sum to 0.25 but "
                     "data.always_on_fraction=0.3"):
    P.check_weights(_specs(W_2B), 0.3)
  with pytest.raises(DataError, match="is in pools a and b"):
    P.resolve_pools([P.PoolSpec("a", .5, domains=("D1",)), P.PoolSpec("b", .5, domains=("D1",))],
                    d)
  with pytest.raises(ConfigError, match=r"data.pools.D1.wieght is not a pool field"):
    P.pool_specs({"D1": {"wieght": 1.0}})
  with pytest.raises(ConfigError, match="sets both domains and shards"):
    P.pool_specs({"D1": {"weight": 1.0, "domains": "en", "shards": "x/*.u32"}})
  # two prepare_data directories with different vocabularies cannot be mixed
  other = tmp_path / "other"
  P.write_shard_dir(other, {("train", "z"): [np.arange(100)]}, vocab_size=1000, eot_id=999)
  with pytest.raises(DataError, match="all pools must share one token id order"):
    P.resolve_pools([P.PoolSpec("a", .5, domains=("D1",)),
                     P.PoolSpec("b", .5, shards=str(other / "*.u32"))], d)


# ----------------------------------------------------------------------------- configs
def test_stage_configs_and_tiny_pools(data):
  from configs import stage_2b, stage_5b, stage_9b, tiny
  want = {"2b": (.34, .24, .11, .06), "5b": (.18, .23, .20, .14), "9b": (.07, .15, .27, .26)}
  for mod in (stage_2b, stage_5b, stage_9b):
    c = mod.get_config()
    specs = P.pool_specs(c.data.pools)
    P.check_weights(specs, c.data.always_on_fraction)
    got = tuple(c.data.pools[n].weight for n in ("D1", "D2", "D3", "D4"))
    assert np.allclose(got, want[c.stage]) and c.data.pools.always_on.always_on
    assert c.data.always_on_fraction == 0.25
  c = tiny.get_config()
  assert c.data.use_pools
  specs = P.pool_specs(c.data.pools)
  P.check_weights(specs, c.data.always_on_fraction)
  domains = {dd for s in specs for dd in s.domains}
  assert domains <= {p.name for p in (REPO / "corpus").iterdir() if p.is_dir()}
  assert len([s for s in specs if s.weight > 0]) >= 4
  # the one switch: use_pools off -> the single-source window pipeline
  from lightning_jax.data import pipeline
  c.train.seq_len, c.train.global_batch = 16, 4
  c.data.use_pools = False
  assert isinstance(P.make_train_loader(c, data["dir"], rank=0, num_ranks=1), pipeline.Loader)


def test_resume_check_ignores_stage_weights_only():
  from configs import stage_2b
  a = stage_2b.get_config().to_dict()
  b = json.loads(json.dumps(a))
  for n, w in W_9B.items():
    b["data"]["pools"]["always_on" if n == "AO" else n]["weight"] = w
  b["data"]["always_on_fraction"] = 0.3
  assert a != b and config.resume_view(a) == config.resume_view(b)
  b["data"]["pools"]["D1"]["domains"] = "web"
  assert config.resume_view(a) != config.resume_view(b)
