"""BrahmicTokenizer construction on a small synthetic base vocabulary, plus its pieces.

The synthetic base is a byte-level BPE trained here (tokenizer.bpe.learn_merges from the 256
bytes, no constraints) on text of Latin, Cyrillic, Greek, Han, Hangul, Arabic words, a few
mixed-script words, long punctuation runs and real Hindi/Tamil/Odia lines from corpus/, so it
has tokens of removed scripts, mixed tokens and >32-byte tokens for the crop to remove.
"""
import collections
import itertools
import pathlib
import random

import numpy as np
import pytest
import regex
from ml_collections import ConfigDict

import tokenizer
from tokenizer import artifacts, base, bpe, build, check, crop, retrofit, scripts

REPO = pathlib.Path(__file__).resolve().parent.parent
PAT = base.O200K_PATTERN


def _lines(lang, split="train", start=0, n=40):
  return retrofit.read_texts(REPO / "corpus" / lang / f"{split}.txt")[start:start + n]


def _synthetic_texts(rng):
  def words(alphabet, n, lo=2, hi=6):
    return " ".join("".join(rng.choice(alphabet) for _ in range(rng.randint(lo, hi))) for _ in range(n))
  latin = "etaoinshrdlu"
  out = [words(latin, 60) for _ in range(20)]
  out += [words("абвгдеж", 40) for _ in range(8)]
  out += [words("αβγδεζ", 30) for _ in range(6)]
  out += [words("的一是不了人", 30, 1, 3) for _ in range(6)]
  out += [words("가나다라", 20, 1, 3) for _ in range(4)]
  out += [words("ابتثج", 20) for _ in range(4)]
  out += ["abcնմք abcնմք abcնմք eta" * 3, "x" + "=" * 40 + "\n" + "=" * 40 + " " + "=" * 40]
  out += ["=" * 40 + " " + "-" * 36 + " " for _ in range(4)]
  out += _lines("hi", n=30) + _lines("ta", n=30) + _lines("or", n=20)
  return out


def _train_base(texts, n_merges=900):
  pieces = collections.Counter()
  for t in texts:
    pieces.update(regex.findall(PAT, t))
  wc = collections.Counter()
  for p, n in pieces.items():
    b = p.encode()
    if len(b) > 1:
      wc[tuple(b[i:i + 1] for i in range(len(b)))] += n
  vocab = {bytes([i]) for i in range(256)}
  merges = bpe.learn_merges(wc, vocab, n_merges, allowed=lambda raw: True, max_bytes=64)
  toks = [bytes([i]) for i in range(256)] + [a + b for a, b, _ in merges]
  return {t: i for i, t in enumerate(toks)}


@pytest.fixture(scope="module")
def synth():
  ranks = _train_base(_synthetic_texts(random.Random(1234)))
  audit = _lines("hi", start=30, n=60) + _lines("ta", start=30, n=60) + _lines("or", start=20, n=60)
  audit += ["plain english line that the audit ignores"]
  return ranks, audit


@pytest.fixture(scope="module")
def built(synth, tmp_path_factory):
  ranks, audit = synth
  target = len(ranks) - 320
  toks, specials, report = build.build(ranks, audit, target=target, num_specials=8,
                                       retrofit_slots=30, log=lambda *a: None)
  enc = artifacts.make_encoding("synth", toks, PAT, specials)
  counts = np.zeros(enc.n_vocab, np.int64)
  for ids in enc.encode_ordinary_batch(audit):
    counts += np.bincount(ids, minlength=enc.n_vocab)
  out = tmp_path_factory.mktemp("tok")
  artifacts.save(out, "synth", toks, PAT, specials, counts, report)
  return ranks, audit, target, toks, specials, report, enc, out


# ------------------------------------------------------------------------------ scripts
def test_token_scripts_whole_and_partial_utf8():
  assert scripts.token_scripts("नमस्ते".encode()) == {"Devanagari"}
  assert scripts.token_scripts(b"\xe0\xa4") == {"Devanagari"}       # can only start U+0900..093F
  assert scripts.token_scripts(b"\xe0") == frozenset()               # Devanagari..Thai: ambiguous
  assert scripts.token_scripts(b"\xe3\x83") == frozenset()           # Katakana or Common U+30FC
  assert scripts.token_scripts(b" \xf0\x9f\x98") == frozenset()      # emoji, not Hiragana
  assert scripts.token_scripts(b" \xd0") == {"Cyrillic"}             # U+0400..043F
  assert scripts.token_scripts("\u0964 ".encode()) == frozenset()    # danda is Common
  assert scripts.token_scripts("क".encode()[1:] + b"abc") == {"Latin"}  # tail of a char: no script
  assert scripts.is_mixed("abcж".encode()) and not scripts.is_mixed("க்கு".encode())


# ------------------------------------------------------------------------------ BPE pieces
def test_merge_trace_matches_tiktoken_on_random_words(synth):
  ranks, _ = synth
  seed = random.randrange(1 << 30)
  rng = random.Random(seed)
  enc = artifacts.make_encoding("b", sorted(ranks, key=ranks.get), PAT)
  toks = list(ranks)
  for _ in range(300):
    word = b"".join(rng.choice(toks) for _ in range(rng.randint(1, 4)))[:24]
    parts, _ = bpe.merge_trace(word, ranks)
    assert [ranks[p] for p in parts] == enc._encode_single_piece(word), f"seed={seed} word={word!r}"


def _naive_learn(word_counts, vocab, n, allowed, max_bytes):
  words = {w: c for w, c in word_counts.items()}
  vocab, out, banned = set(vocab), [], set()
  while len(out) < n:
    pc = collections.Counter()
    for w, c in words.items():
      for p in zip(w, w[1:]):
        pc[p] += c
    cands = [(c, p) for p, c in pc.items() if p not in banned and c >= 2]
    while cands:
      best = max(c for c, _ in cands)
      p = min(q for cc, q in cands if cc == best)
      new = p[0] + p[1]
      if new in vocab or len(new) > max_bytes or not allowed(new):
        banned.add(p)
        cands = [(cc, q) for cc, q in cands if q != p]
        continue
      break
    if not cands:
      break
    nw = collections.Counter()
    saved = 0
    for w, c in words.items():
      r, i = [], 0
      while i < len(w):
        if i + 1 < len(w) and (w[i], w[i + 1]) == p:
          r.append(new)
          i += 2
        else:
          r.append(w[i])
          i += 1
      saved += (len(w) - len(r)) * c
      nw[tuple(r)] += c
    words = nw
    vocab.add(new)
    out.append((p[0], p[1], saved))
  return out


def test_learn_merges_matches_naive_reference():
  seed = random.randrange(1 << 30)
  rng = random.Random(seed)
  alpha = [bytes([c]) for c in b"abcdx"]
  wc = collections.Counter()
  for _ in range(60):
    wc[tuple(rng.choice(alpha) for _ in range(rng.randint(2, 7)))] += rng.randint(1, 5)
  allowed = lambda raw: b"x" not in raw
  vocab = set(alpha)
  fast = bpe.learn_merges(wc, vocab, 25, allowed, max_bytes=5)
  slow = _naive_learn(wc, vocab, 25, allowed, max_bytes=5)
  assert fast == slow, f"seed={seed}"
  gains = [g for _, _, g in fast]
  assert all(len(a + b) <= 5 and b"x" not in a + b for a, b, _ in fast), f"seed={seed}"
  assert gains, f"seed={seed}"


def test_lp_allocation_is_optimal_for_concave_curves():
  seed = random.randrange(1 << 30)
  rng = np.random.default_rng(seed)
  for _ in range(5):
    gains = {s: sorted(rng.random(rng.integers(1, 6)).tolist(), reverse=True) for s in "abc"}
    slots = int(rng.integers(1, 10))
    lp = retrofit.allocate_lp(gains, slots)
    greedy = retrofit.allocate_greedy(gains, slots)
    value = lambda al: sum(sum(gains[s][:al[s]]) for s in gains)
    best = max(value(dict(zip("abc", n))) for n in itertools.product(*(range(len(gains[s]) + 1) for s in "abc"))
               if sum(n) <= slots)
    assert sum(lp.values()) == min(slots, sum(map(len, gains.values()))), f"seed={seed}"
    assert abs(value(lp) - best) < 1e-9 and abs(value(greedy) - best) < 1e-9, f"seed={seed} {gains} {slots}"


# ------------------------------------------------------------------------------ construction
def test_synthetic_build_size_scripts_and_closure(built):
  ranks, audit, target, toks, specials, report, enc, _ = built
  assert enc.n_vocab == target and len(toks) == target - 8 == len(set(toks))
  assert sorted(specials.values()) == list(range(target - 8, target))
  assert report["crop_removed"].get("too_long", 0) > 0 and report["crop_removed"].get("mixed", 0) > 0
  assert any(k.startswith("script:Cyrillic") for k in report["crop_removed"])
  for t in toks:
    assert len(t) <= 32 and not scripts.is_mixed(t), t
    assert len(t) == 1 or crop.removed_script(t) is None, t
  assert bpe.closure_failures(enc, {t: i for i, t in enumerate(toks)}) == []
  for text in audit + _synthetic_texts(random.Random(7)):
    assert enc.decode(enc.encode_ordinary(text)) == text


def test_synthetic_retrofit_new_tokens_are_mergeable_and_dead_are_dead(built):
  ranks, audit, target, toks, specials, report, enc, _ = built
  n_new = sum(report["added"].values())
  n_freed = sum(report["freed"].values())
  assert n_new == report["retrofit_slots"] == n_freed + report["extra_slots"] and 0 < n_freed <= 30
  # freed tokens are Brahmic and never produced on the audit text by the crop's vocabulary
  kept = crop.crop(ranks, target - 8).kept
  freed = set(kept) - set(toks)
  assert len(freed) == n_freed
  crop_enc = artifacts.make_encoding("c", kept, PAT)
  produced = {crop_enc.decode_single_token_bytes(i)
              for ids in crop_enc.encode_ordinary_batch(audit) for i in ids}
  assert not freed & produced
  assert all(retrofit.brahmic_script_of(t) for t in freed)
  rank = {t: i for i, t in enumerate(toks)}
  new = toks[len(toks) - n_new:]
  assert all(t not in ranks for t in new)                       # really new byte strings
  for t in new:
    _, (left, right) = bpe.merge_trace(t, rank)
    assert rank[left] < rank[t] and rank[right] < rank[t], t     # merge of two earlier tokens
    assert len(scripts.token_scripts(t)) == 1 and next(iter(scripts.token_scripts(t))) in scripts.BRAHMIC_SCRIPTS
  # the audit text needs fewer tokens than under the crop alone (new merges are used)
  n_crop = sum(len(x) for x in crop_enc.encode_ordinary_batch(audit))
  n_final = sum(len(x) for x in enc.encode_ordinary_batch(audit))
  assert n_final < n_crop
  # per-script report adds up: base - removed - freed + added = final
  rows = report["per_script"]
  assert sum(v.get("final", 0) for v in rows.values()) == len(toks)
  removed = sum(report["crop_removed"].values())
  assert report["crop_kept"] == len(ranks) - removed


def test_synthetic_build_is_deterministic(synth, built):
  ranks, audit = synth
  toks2, _, _ = build.build(ranks, audit, target=built[2], num_specials=8, retrofit_slots=30,
                            log=lambda *a: None)
  assert toks2 == built[3]


def test_checks_pass_and_loader_applies_frequency_order(built):
  *_, enc, out = built
  res = check.run_checks(out, corpus=REPO / "corpus" / "ta", expect_vocab=enc.n_vocab)
  assert all(ok for _, ok, _ in res), [r for r in res if not r[1]]
  t = tokenizer.load(ConfigDict({"name": "brahmic", "path": str(out), "id_order": "frequency"}))
  text = _lines("hi", "eval", n=3)[2]
  ids = t.encode(text)
  assert t.decode(ids) == text
  assert np.array_equal(t.to_natural_ids(ids), enc.encode_ordinary(text))
  tb = t.token_bytes()
  assert b"".join(tb[i] for i in ids) == text.encode()
  assert t.eot_id == enc.eot_token                              # specials keep their top ids
  b, l = artifacts.load_byte_buffers(out, "frequency")
  assert all(bytes(b[i, :l[i]]) == tb[i] for i in ids)


# ------------------------------------------------------------------------------ bad input
def test_bad_base_hash(tmp_path):
  p = tmp_path / "fake.tiktoken"
  p.write_bytes(b"YQ== 0\n")
  with pytest.raises(base.TokenizerFileError, match="SHA-256 .* expected"):
    base.load_ranks(p)
  assert build.main(["--base", str(p), "--audit_corpus", str(REPO / "corpus" / "hi"),
                     "--out", str(tmp_path / "o")]) == 2


def test_audit_corpus_without_brahmic_text(synth, tmp_path):
  ranks, _ = synth
  with pytest.raises(retrofit.RetrofitError, match="no Brahmic text"):
    build.build(ranks, ["only english here", "и немного кириллицы"], target=len(ranks) - 300,
                num_specials=8, retrofit_slots=5, log=lambda *a: None)


def test_target_not_larger_than_specials(synth):
  ranks, audit = synth
  with pytest.raises(build.BuildError, match="larger than the 32 special tokens"):
    build.build(ranks, audit, target=32, num_specials=32, log=lambda *a: None)


def test_loader_config_errors(tmp_path):
  from lightning_jax.config import ConfigError
  with pytest.raises(ConfigError, match="tokenizer.name"):
    tokenizer.load(ConfigDict({"name": "gpt2", "path": "", "id_order": "natural"}))
  with pytest.raises(ConfigError, match="holds no built tokenizer"):
    tokenizer.load(ConfigDict({"name": "brahmic", "path": str(tmp_path), "id_order": "natural"}))
  with pytest.raises(ConfigError, match="frequency"):
    tokenizer.load(ConfigDict({"name": "o200k_base", "path": "", "id_order": "frequency"}))


# ------------------------------------------------------------------------------ the committed build
def test_committed_brahmic131k_build_and_fertility():
  """tokenizer/brahmic131k (built from the real o200k_base): size, specials, sampled tokens, fertility."""
  from tokenizer import fertility
  t = tokenizer.load(ConfigDict({"name": "brahmic", "path": "", "id_order": "natural"}))
  enc = t.encoding
  assert enc.n_vocab == 131072 and enc.eot_token == 131040
  assert sorted(enc._special_tokens.values()) == list(range(131040, 131072))
  seed = random.randrange(1 << 30)
  rng = random.Random(seed)
  toks = list(enc._mergeable_ranks.items())
  for raw, i in rng.sample(toks, 3000) + toks[-2372:]:          # a random sample + all new tokens
    assert enc._encode_single_piece(raw) == [i], f"seed={seed} {raw!r}"
    assert len(raw) <= 32 and not scripts.is_mixed(raw), f"seed={seed} {raw!r}"
    assert len(raw) == 1 or crop.removed_script(raw) is None, f"seed={seed} {raw!r}"
  for shared in ("\ufffd", "\ufeff", "\u30fc", " \U0001F642"):     # Common-script tokens stay
    assert shared.encode() in enc._mergeable_ranks, shared
  rep = fertility.report(enc, base.load_o200k_base(), REPO / "corpus")
  for lang in fertility.BRAHMIC_LANGS:
    assert rep[lang]["fertility"] < rep[lang]["o200k_fertility"], (lang, rep[lang])
  for lang in ("en", "code"):
    assert abs(rep[lang]["ratio"] - 1) <= 0.01, (lang, rep[lang])


def test_crop_target_below_what_can_go(synth):
  ranks, _ = synth
  with pytest.raises(crop.CropError, match="cannot be reached"):
    crop.crop(ranks, 300)                 # the Brahmic tokens and single bytes alone exceed 300
  with pytest.raises(crop.CropError, match="256 single-byte tokens"):
    crop.crop(ranks, 100)
