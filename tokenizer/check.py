"""Constraint checks of a built tokenizer directory.

  python -m tokenizer.check DIR [--corpus=corpus] [--expect_vocab=131072]

Checks: vocabulary size; mergeable ids dense 0..M-1; special tokens at the top ids (end of text
first, then pad, chat and reserved tokens); no token longer than max_bytes (32); no token mixing
scripts (Common/Inherited aside); no token of the nine removed scripts (single bytes, the byte
fallback, aside); merge closure (every token encoded alone is itself); encode/decode round trip on
every bundled text (.txt lines and .jsonl "text" under --corpus, held-out files included); the id
permutation (bijection, inverse, specials fixed, counts non-increasing); the Kronecker byte
buffers equal the token bytes in both id orders. Exit status 1 if any check fails.
"""
from __future__ import annotations

import pathlib
import sys

import numpy as np
from absl import app, flags

from lightning_jax.layers.kronecker import build_byte_buffers
from tokenizer import artifacts, base, bpe, cli, crop, retrofit, scripts

REPO = pathlib.Path(__file__).resolve().parent.parent


def run_checks(path, corpus=None, expect_vocab: int | None = 131072):
  """[(check name, passed, detail)] for the tokenizer directory `path`."""
  out = []

  def add(name, ok, detail):
    out.append((name, bool(ok), detail))

  meta = artifacts.read_meta(path)
  enc = artifacts.load_encoding(path)
  v, m = enc.n_vocab, meta["n_mergeable"]
  ranks = enc._mergeable_ranks
  add("vocab size", v == meta["n_vocab"] and (expect_vocab is None or v == expect_vocab),
      f"{v} ids ({m} mergeable + {len(enc._special_tokens)} special), expected {expect_vocab}")
  add("dense mergeable ids", sorted(ranks.values()) == list(range(m)), f"ranks 0..{m - 1}")
  sp = sorted(enc._special_tokens.items(), key=lambda kv: kv[1])
  names = [s for s, _ in sp]
  top_ok = [i for _, i in sp] == list(range(m, v))
  kinds_ok = (names[:1] == ["<|endoftext|>"] and "<|pad|>" in names
              and (len(names) < 5 or {"<|im_start|>", "<|im_end|>"} <= set(names))
              and (len(names) <= 6 or any(s.startswith("<|reserved_") for s in names)))
  add("special tokens at top ids", top_ok and kinds_ok,
      f"{len(sp)} specials at ids {m}..{v - 1}: {', '.join(names[:6])}{', ...' if len(names) > 6 else ''}")
  max_bytes = meta.get("max_bytes", 32)
  long = [t for t in ranks if len(t) > max_bytes]
  add(f"token length <= {max_bytes} bytes", not long,
      f"longest {max(map(len, ranks))} bytes" + (f"; e.g. {long[0]!r}" if long else ""))
  mixed = [t for t in ranks if scripts.is_mixed(t)]
  add("no mixed-script token", not mixed, f"{len(mixed)} mixed" + (f", e.g. {mixed[0]!r}" if mixed else ""))
  nine = [t for t in ranks if len(t) > 1 and crop.removed_script(t)]
  add("no token of the nine removed scripts", not nine,
      f"{len(nine)} found (single-byte tokens aside)" + (f", e.g. {nine[0]!r}" if nine else ""))
  bad = bpe.closure_failures(enc, ranks)
  add("merge closure", not bad, f"{len(ranks) - len(bad)}/{len(ranks)} tokens encode alone to "
      "themselves" + (f"; e.g. {bad[0]!r}" if bad else ""))
  corpus = pathlib.Path(corpus) if corpus else REPO / "corpus"
  texts = retrofit.read_texts(corpus) + retrofit.read_texts(corpus, heldout=True)
  fails = [t for t, ids in zip(texts, enc.encode_ordinary_batch(texts, num_threads=2))
           if enc.decode(ids) != t]
  add("round trip on bundled text", texts and not fails,
      f"{len(texts) - len(fails)}/{len(texts)} documents under {corpus}")
  try:
    nfo, ofn = artifacts.load_id_order(path)
    counts = np.load(pathlib.Path(path) / meta["id_order_file"])["counts"]
    ok = (len(nfo) == v and np.array_equal(np.sort(nfo), np.arange(v))
          and np.array_equal(nfo[ofn], np.arange(v)) and np.array_equal(ofn[m:], np.arange(m, v))
          and bool(np.all(np.diff(counts[ofn[:m]]) <= 0)))
    add("frequency id order", ok, f"permutation of {len(nfo)} ids, inverse, specials fixed, "
        f"most frequent = id 0 (count {counts[ofn[0]]})")
    tb = base.token_bytes_list(enc)
    ok = True
    for order, ids in (("natural", np.arange(v)), ("frequency", ofn)):
      b, l = artifacts.load_byte_buffers(path, order)
      rb, rl = build_byte_buffers([tb[int(i)] for i in ids], max_bytes=b.shape[1])
      ok &= b.dtype == np.uint8 and l.dtype == np.int16 and b.shape == (v, max_bytes)
      ok &= np.array_equal(b, rb) and np.array_equal(l, rl)
    add("Kronecker byte buffers", ok, f"uint8 [{v},{max_bytes}] + int16 [{v}], natural and frequency order")
  except (OSError, KeyError) as e:
    add("frequency id order / byte buffers", False, f"missing: {e}")
  return out


def define_flags(fv=flags.FLAGS):
  flags.DEFINE_string("corpus", None, "Directory whose .txt lines and .jsonl \"text\" documents "
                      "must round-trip, held-out files included (default: the bundled corpus/).",
                      flag_values=fv)
  flags.DEFINE_integer("expect_vocab", 131072, "Vocabulary size (mergeable + special) the "
                       "directory must have.", flag_values=fv)


def main(argv: list[str]) -> int:
  """In-process entry (tests): `argv` as on the command line, without the program name."""
  return cli.in_process("tokenizer.check", define_flags, run, argv)


def run(a, args) -> int:
  """The checks with parsed flags `a` on the one positional argument, the tokenizer directory."""
  if len(args) != 1:
    print("usage: python -m tokenizer.check DIR [--corpus=DIR] [--expect_vocab=N]",
          file=sys.stderr)
    return 2
  a_dir = args[0]
  try:
    res = run_checks(a_dir, a.corpus, a.expect_vocab)
  except base.TokenizerFileError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  for name, ok, detail in res:
    print(f"{'PASS' if ok else 'FAIL'}  {name}: {detail}")
  n_fail = sum(not ok for _, ok, _ in res)
  print(f"{len(res) - n_fail} passed, {n_fail} failed")
  return 1 if n_fail else 0


if __name__ == "__main__":
  define_flags()
  app.run(lambda argv: sys.exit(run(flags.FLAGS, argv[1:])))
