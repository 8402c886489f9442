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

from lightning_jax.fertility import (BRAHMIC_LANGS, DEFAULT_TOKENIZER, OTHER_LANGS,
                                     fertility, format_table, report, samples)
from tokenizer import artifacts, base, cli

__all__ = ["BRAHMIC_LANGS", "DEFAULT_TOKENIZER", "OTHER_LANGS", "fertility", "format_table",
           "report", "samples"]   # the measurement's home: lightning_jax/fertility.py

REPO = pathlib.Path(__file__).resolve().parent.parent


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
