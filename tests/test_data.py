"""Shards, manifest, frequency id order, held-out split, grain loader state, bad-input messages."""
import json
import pathlib

import numpy as np
import pytest

from lightning_jax.data import pipeline, shards
from tokenizer.base import load_o200k_base

REPO = pathlib.Path(__file__).resolve().parents[1]


def _corpus(tmp_path, seed):
  rng = np.random.default_rng(seed)
  words = "the model reads text and writes code while data flows through shards".split()
  root = tmp_path / "in"
  (root / "prose").mkdir(parents=True)
  (root / "code").mkdir()
  texts = {}
  for i in range(6):
    t = " ".join(rng.choice(words, size=int(rng.integers(20, 60)))) + "."
    (root / "prose" / f"doc{i}.txt").write_text(t)
    texts[f"prose{i}"] = t
  with open(root / "code" / "snippets.jsonl", "w") as f:
    for i in range(5):
      t = f"def f{i}(x):\n  return x * {int(rng.integers(0, 100))}\n"
      f.write(json.dumps({"text": t}) + "\n")
      texts[f"code{i}"] = t
  return root, texts


def test_prepare_shards_frequency_order_and_roundtrip(tmp_path):
  seed = int(np.random.default_rng().integers(1 << 30))
  root, texts = _corpus(tmp_path, seed)
  enc = load_o200k_base()
  out = tmp_path / "shards"
  m = shards.prepare([str(root)], str(out), encoding=enc, val_fraction=0.2, seed=seed,
                     log=lambda *_: None)
  assert m["domains"] == ["code", "prose"], m["domains"]
  assert m["documents"] == {"train/code": 4, "val/code": 1, "train/prose": 5, "val/prose": 1}, seed
  assert m["vocab_size"] % 128 == 0 and m["eot_id"] == m["vocab_size"] - 1
  # every document comes back exactly, end-of-text separated, through the data id order
  tb = shards.token_bytes(out, enc)
  assert shards.token_bytes(out) == tb, "stored token bytes differ from the tokenizer's"
  got = []
  counts = np.zeros(m["vocab_size"], np.int64)
  for e in m["shards"]:
    a = np.asarray(shards.open_shard(out, e))
    assert a.dtype == np.uint32 and a[-1] == m["eot_id"]
    counts += np.bincount(a, minlength=m["vocab_size"])
    docs = np.split(a, np.nonzero(a == m["eot_id"])[0] + 1)[:-1]
    got += [b"".join(tb[i] for i in d[:-1]).decode() for d in docs]
  assert sorted(got) == sorted(texts.values()), f"seed {seed}"
  # most frequent = 0: counts of ordinary ids never increase with the id
  n_seen = int((np.load(out / shards.VOCAB_IDS) != shards.PAD_ID).sum()) - 1
  c = counts[:n_seen]
  assert np.all(c[:-1] >= c[1:]) and c[-1] > 0, f"seed {seed}"
  # data ids map back to the tokenizer's own ids
  ids = np.load(out / shards.VOCAB_IDS)
  assert tb[0] == enc.decode_single_token_bytes(int(ids[0]))


def test_explicit_heldout_files_and_natural_order(tmp_path):
  (tmp_path / "in" / "hi").mkdir(parents=True)
  (tmp_path / "in" / "hi" / "train.txt").write_text("नमस्ते दुनिया " * 20)
  (tmp_path / "in" / "hi" / "eval.txt").write_text("भारत एक देश है " * 20)
  m = shards.prepare([str(tmp_path / "in")], str(tmp_path / "o"), id_order="natural",
                     val_fraction=0.5, log=lambda *_: None)
  assert m["documents"] == {"train/hi": 1, "val/hi": 1}
  enc = load_o200k_base()
  val = np.asarray(shards.open_shard(tmp_path / "o", shards.shards_of(m, "val")[0]))
  assert enc.decode(val[:-1].tolist()) == "भारत एक देश है " * 20
  assert m["vocab_size"] == enc.n_vocab and val[-1] == enc.eot_token


def test_bad_inputs_one_sentence(tmp_path):
  with pytest.raises(shards.DataError, match=r"data directory .*nope does not exist"):
    shards.load_manifest(tmp_path / "nope")
  root, _ = _corpus(tmp_path, 0)
  out = tmp_path / "s"
  m = shards.prepare([str(root)], str(out), log=lambda *_: None)
  e = shards.shards_of(m, "train")[0]
  with open(out / e["file"], "ab") as f:
    f.write(b"\x01\x02")
  with pytest.raises(shards.DataError, match=r"not a whole number of uint32 tokens"):
    shards.open_shard(out, e)
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"text": "ok"}\n{"txt": 3}\n')
  with pytest.raises(shards.DataError, match=r"bad.jsonl:2 has no string field"):
    shards.read_documents([str(bad)])
  with pytest.raises(shards.DataError, match=r"neither .txt nor .jsonl"):
    shards.read_documents([str(tmp_path / "s" / shards.MANIFEST)])


def _stream_data(tmp_path, n_tokens, seed):
  """A hand-written data dir with one train shard of known content."""
  out = tmp_path / f"d{seed}"
  out.mkdir()
  arr = np.random.default_rng(seed).integers(0, 1000, n_tokens).astype(np.uint32)
  arr.tofile(out / "train-x-00000.u32")
  arr[:300].tofile(out / "val-x-00000.u32")
  m = {"format_version": shards.FORMAT_VERSION, "tokenizer": "o200k_base", "id_order": "natural",
       "vocab_size": 1000, "eot_id": 999, "domains": ["x"],
       "shards": [{"file": "train-x-00000.u32", "split": "train", "domain": "x",
                   "n_tokens": n_tokens},
                  {"file": "val-x-00000.u32", "split": "val", "domain": "x", "n_tokens": 300}]}
  (out / shards.MANIFEST).write_text(json.dumps(m))
  return out, arr


def test_loader_windows_shuffle_and_state_resume(tmp_path):
  seed = int(np.random.default_rng().integers(1 << 30))
  data, arr = _stream_data(tmp_path, 1000, seed)
  L = 16
  a = pipeline.train_loader(data, L, 4, seed=seed)
  n = len(a.source)
  assert n == (1000 - (L + 2)) // L + 1
  # each window is a contiguous slice starting at a multiple of seq_len
  seen = []
  for _ in range(n // 4):
    for row in next(a)["ids"]:
      starts = [s for s in range(0, 1000 - L - 1, L) if np.array_equal(arr[s:s + L + 2], row)]
      assert len(starts) >= 1, f"seed {seed}"
      seen.append(starts[0])
  assert len(set(seen)) == len(seen), f"one epoch repeats a window (seed {seed})"
  assert seen != sorted(seen), f"not shuffled (seed {seed})"
  # state: a fresh loader restored from the state continues the same stream
  st = json.loads(json.dumps(a.get_state()))
  want = [next(a)["ids"] for _ in range(5)]
  b = pipeline.train_loader(data, L, 4, seed=seed)
  b.set_state(st)
  for w in want:
    np.testing.assert_array_equal(next(b)["ids"], w, err_msg=f"seed {seed}")
  c = pipeline.train_loader(data, L, 8, seed=seed)
  with pytest.raises(shards.DataError, match=r"loader state has batch=4"):
    c.set_state(st)
  ev = pipeline.eval_batches(data, L, 2, 3)
  assert [x.shape for x in ev["x"]] == [(2, L + 2)] * 3
  np.testing.assert_array_equal(ev["x"][0][0], arr[:L + 2])


def test_short_split_names_window(tmp_path):
  data, _ = _stream_data(tmp_path, 10, 0)
  with pytest.raises(shards.DataError, match=r"fewer than one window of 18 tokens"):
    pipeline.train_loader(data, 16, 4, seed=0)


def test_bundled_corpus_present():
  for sub in ("en", "code"):
    files = list((REPO / "corpus" / sub).glob("*.jsonl"))
    assert files, f"corpus/{sub} is missing"
    size = sum(f.stat().st_size for f in files)
    assert 100_000 < size < 3_000_000, (sub, size)
  assert "corpus/en" in (REPO / "corpus" / "SOURCES.md").read_text()
