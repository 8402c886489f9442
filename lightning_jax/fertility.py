"""Fertility (tokens per word) of a vocabulary per language on the bundled held-out samples, and
the corpus reader the tokenizer tools and this measurement share.

Samples: corpus/<lang>/eval.txt for the nine Brahmic languages (held out from the audit corpus);
corpus/en and corpus/code (every .jsonl/.txt there; the audit reads no English or code, so any
of it is unseen). A word is a whitespace-separated string (str.split); tokens are
encode_ordinary of each document, summed. `python -m tokenizer.fertility` prints the table and
launch.docs_numbers writes it into docs/tokenizer.md.
"""
from __future__ import annotations

import json
import pathlib

from lightning_jax import vocab

SKIP_NAMES = ("eval", "val", "valid", "validation", "heldout", "test")



def _is_heldout(p: pathlib.Path) -> bool:
  stem = p.stem.lower()
  return any(stem == n or stem.endswith("_" + n) or stem.endswith("-" + n) for n in SKIP_NAMES)


def read_texts(root, heldout: bool = False) -> list[str]:
  """Documents of a directory (or file): .txt lines, .jsonl 'text' fields.

  With heldout=False, files named eval/val/valid/validation/heldout/test (also as a _/- suffix)
  are skipped; with heldout=True only those are read.
  """
  root = pathlib.Path(root)
  files = [root] if root.is_file() else sorted(
      p for p in root.rglob("*") if p.suffix in (".txt", ".jsonl") and p.is_file())
  out = []
  for p in files:
    if root.is_dir() and _is_heldout(p) != heldout:
      continue
    with open(p, encoding="utf-8") as f:
      for line in f:
        line = line.rstrip("\n")
        if not line.strip():
          continue
        if p.suffix == ".jsonl":
          t = json.loads(line).get("text", "")
          if t.strip():
            out.append(t)
        else:
          out.append(line)
  return out


BRAHMIC_LANGS = {"hi": "Hindi", "bn": "Bengali", "pa": "Punjabi", "gu": "Gujarati", "or": "Odia",
                 "ta": "Tamil", "te": "Telugu", "kn": "Kannada", "ml": "Malayalam"}
OTHER_LANGS = {"en": "English", "code": "code"}
DEFAULT_TOKENIZER = vocab.DEFAULT_BRAHMIC_DIR


def samples(corpus) -> dict[str, list[str]]:
  corpus = pathlib.Path(corpus)
  out = {}
  for lang in BRAHMIC_LANGS:
    p = corpus / lang / "eval.txt"
    if p.exists():
      out[lang] = read_texts(p)
  for lang in OTHER_LANGS:
    p = corpus / lang
    if p.is_dir():
      texts = read_texts(p) + read_texts(p, heldout=True)
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
