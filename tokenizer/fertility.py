"""Fertility (tokens per word) per language on the bundled held-out samples, beside o200k_base.

  python -m tokenizer.fertility [--tokenizer=DIR] [--corpus=corpus] [--json=FILE]

Samples: corpus/<lang>/eval.txt for the nine Brahmic languages (held out from the audit corpus);
corpus/en and corpus/code (every .jsonl/.txt there; the audit reads no English or code, so any
of it is unseen). A word is a whitespace-separated string (str.split); tokens are
encode_ordinary of each document, summed. Without --tokenizer the committed build is used.
"""
from __future__ import annotations

import json
import pathlib
import sys

from absl import app, flags

from tokenizer import artifacts, base, cli, retrofit

BRAHMIC_LANGS = {"hi": "Hindi", "bn": "Bengali", "pa": "Punjabi", "gu": "Gujarati", "or": "Odia",
                 "ta": "Tamil", "te": "Telugu", "kn": "Kannada", "ml": "Malayalam"}
OTHER_LANGS = {"en": "English", "code": "code"}
REPO = pathlib.Path(__file__).resolve().parent.parent
DEFAULT_TOKENIZER = REPO / "tokenizer" / "brahmic131k"


def samples(corpus) -> dict[str, list[str]]:
  corpus = pathlib.Path(corpus)
  out = {}
  for lang in BRAHMIC_LANGS:
    p = corpus / lang / "eval.txt"
    if p.exists():
      out[lang] = retrofit.read_texts(p)
  for lang in OTHER_LANGS:
    p = corpus / lang
    if p.is_dir():
      texts = retrofit.read_texts(p) + retrofit.read_texts(p, heldout=True)
      if texts:
        out[lang] = texts
  return out


def fertility(enc, texts) -> tuple[float, int, int]:
  words = sum(len(t.split()) for t in texts)
  toks = sum(len(x) for x in enc.encode_ordinary_batch(texts, num_threads=2))
  return toks / max(words, 1), toks, words


def report(enc, ref, corpus) -> dict:
  out = {}
  for lang, texts in samples(corpus).items():
    f, t, w = fertility(enc, texts)
    fr, tr, _ = fertility(ref, texts)
    out[lang] = {"words": w, "tokens": t, "fertility": f, "o200k_tokens": tr, "o200k_fertility": fr,
                 "ratio": f / fr}
  return out


def format_table(rep: dict) -> str:
  names = {**BRAHMIC_LANGS, **OTHER_LANGS}
  lines = [f"{'language':<11}{'words':>8}{'brahmic':>9}{'o200k':>8}{'ratio':>8}"]
  for lang, r in rep.items():
    lines.append(f"{names.get(lang, lang):<11}{r['words']:>8}{r['fertility']:>9.3f}"
                 f"{r['o200k_fertility']:>8.3f}{r['ratio']:>8.3f}")
  br = [r for lang, r in rep.items() if lang in BRAHMIC_LANGS]
  if br:
    m = sum(r["fertility"] for r in br) / len(br)
    mr = sum(r["o200k_fertility"] for r in br) / len(br)
    lines.append(f"{'Brahmic mean':<19}{m:>9.3f}{mr:>8.3f}{m / mr:>8.3f}")
  return "\n".join(lines)


def define_flags(fv=flags.FLAGS):
  flags.DEFINE_string("tokenizer", str(DEFAULT_TOKENIZER), "Tokenizer directory (default: the "
                      "committed build, tokenizer/brahmic131k).", flag_values=fv)
  flags.DEFINE_string("corpus", str(REPO / "corpus"), "Corpus root: <lang>/eval.txt for the "
                      "Brahmic languages, en/ and code/ read whole.", flag_values=fv)
  flags.DEFINE_string("json", None, "Also write the table as JSON to this file.", flag_values=fv)


def main(argv: list[str]) -> int:
  """In-process entry (tests): `argv` as on the command line, without the program name."""
  return cli.in_process("tokenizer.fertility", define_flags, run, argv)


def run(a, args=()) -> int:
  """The table with parsed flags `a` (absl FlagValues); `args`: stray positional arguments."""
  if args:
    print(f"error: unexpected arguments {list(args)}; options look like --tokenizer=DIR.",
          file=sys.stderr)
    return 2
  try:
    enc = artifacts.load_encoding(a.tokenizer)
  except base.TokenizerFileError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  rep = report(enc, base.load_o200k_base(), a.corpus)
  print(f"tokens per word, {enc.name} vs o200k_base, held-out samples under {a.corpus}")
  print(format_table(rep))
  if a.json:
    pathlib.Path(a.json).write_text(json.dumps(rep, indent=1) + "\n")
  return 0


if __name__ == "__main__":
  define_flags()
  app.run(lambda argv: sys.exit(run(flags.FLAGS, argv[1:])))
