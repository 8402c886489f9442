"""Build BrahmicTokenizer-131K (SPEC §7): crop, retrofit, checks, id order, byte buffers.

  python -m tokenizer.build --base=o200k_base --audit_corpus=corpus --out=DIR
      [--target=131072] [--num_specials=32] [--retrofit_slots=2372] [--freq_corpus=DIR]

--base: "o200k_base" (the offline copy, hash-checked) or a .tiktoken(.gz) file, checked against
--base_sha256 (default: o200k_base's content hash). --audit_corpus: a directory of .txt (one
document per line) / .jsonl ("text") files; files named eval/val/test/... are held out and not
read. Prints how many tokens each step removed and added, per script, and writes the tokenizer
directory (see tokenizer/artifacts.py).
"""
from __future__ import annotations

import collections
import pathlib
import sys
import time

import numpy as np
from absl import app, flags

from tokenizer import artifacts, base, bpe, cli, crop, retrofit, scripts

DEFAULT_TARGET = 131072
DEFAULT_SPECIALS = 32
DEFAULT_SLOTS = 2372   # SPEC §7: corpus-dead slots retrofitted


class BuildError(ValueError):
  """Bad build input (one sentence says which)."""


def _script_key(raw: bytes) -> str:
  sc = sorted(scripts.token_scripts(raw))
  if not sc:
    return "(no script)"
  return sc[0] if len(sc) == 1 else "(mixed)"


def build(base_ranks: dict[bytes, int], audit_texts: list[str], *, target: int = DEFAULT_TARGET,
          num_specials: int = DEFAULT_SPECIALS, retrofit_slots: int = DEFAULT_SLOTS,
          pattern: str = base.O200K_PATTERN, max_bytes: int = 32, name: str = "brahmic131k",
          log=print):
  """(tokens in rank order, special tokens {text: id}, report). Raises BuildError/CropError/RetrofitError."""
  if target <= num_specials:
    raise BuildError(f"target size {target} must be larger than the {num_specials} special tokens "
                     "kept at the top ids.")
  target_m = target - num_specials
  if target_m > len(base_ranks):
    raise BuildError(f"target size {target} needs {target_m} mergeable tokens but the base has "
                     f"only {len(base_ranks)}.")
  retrofit.check_audit(retrofit.texts_by_script(audit_texts))   # fail before the slow crop
  t0 = time.time()
  cr = crop.crop(base_ranks, target_m, max_bytes=max_bytes, log=log)
  log(f"crop: kept {len(cr.kept)} of {len(base_ranks)} mergeable tokens ({time.time() - t0:.1f} s)")
  extra = target_m - len(cr.kept)
  mk = lambda toks: artifacts.make_encoding(name + "-work", toks, pattern)
  t1 = time.time()
  rf = retrofit.retrofit(cr.kept, base_ranks, cr.splits, audit_texts, pattern,
                         slots=retrofit_slots, extra_slots=extra, max_bytes=max_bytes,
                         make_encoding=mk, log=log)
  log(f"retrofit: {len(rf.new)} new tokens ({time.time() - t1:.1f} s)")
  tokens = rf.kept + rf.new
  if len(tokens) != target_m:
    raise BuildError(f"internal: built {len(tokens)} mergeable tokens, expected {target_m}.")
  enc = mk(tokens)
  bad = bpe.closure_failures(enc, {t: i for i, t in enumerate(tokens)})
  if bad:
    raise BuildError(f"internal: {len(bad)} tokens do not encode alone to themselves, e.g. "
                     f"{bad[0]!r}.")
  names = artifacts.special_token_names(num_specials)
  specials = {s: target_m + i for i, s in enumerate(names)}

  # ---- report, per script
  rows = collections.defaultdict(lambda: collections.Counter())
  for t in base_ranks:
    rows[_script_key(t)]["base"] += 1
  for cls, toks in cr.removed.items():
    for t in toks:
      rows[_script_key(t)]["crop:" + cls] += 1
  for s, toks in rf.dead.items():
    rows[s]["dead"] += len(toks)
  for s, n in rf.freed.items():
    rows[s]["freed"] += n
  for s, n in rf.added.items():
    rows[s]["added"] += n
  for t in tokens:
    rows[_script_key(t)]["final"] += 1
  report = {
      "target": target, "num_specials": num_specials, "n_mergeable": target_m,
      "base_mergeable": len(base_ranks),
      "crop_removed": cr.counts(), "crop_kept": len(cr.kept), "extra_slots": extra,
      "retrofit_slots": rf.slots, "dead_found": sum(map(len, rf.dead.values())),
      "freed": rf.freed, "added": rf.added, "audit_tokens": rf.audit_tokens,
      "lp_equals_greedy": rf.lp_equals_greedy,
      "curves": {s: v[:rf.slots] for s, v in rf.curves.items()},
      "per_script": {k: dict(v) for k, v in sorted(rows.items())},
  }
  return tokens, specials, report


REPORT_COLS = (("base", "base"), ("nine", "nine-script"), ("too_long", "too_long"),
               ("mixed", "mixed"), ("unreachable", "unreach"), ("closure", "closure"),
               ("extra", "extra"), ("dead", "dead"), ("freed", "freed"), ("added", "added"),
               ("final", "final"))


def _column(key: str) -> str:
  if key.startswith("crop:script:"):
    return "nine"
  if key.startswith("crop:extra:"):
    return "extra"
  return key.removeprefix("crop:")


def format_report(report: dict) -> str:
  """Per-script table: base tokens, crop removals by class, dead/freed/added, final tokens."""
  w = max(len(k) for k in report["per_script"]) + 2
  lines = ["script".ljust(w) + "".join(h.rjust(12) for _, h in REPORT_COLS)]
  tot = collections.Counter()
  for s, v in report["per_script"].items():
    row = collections.Counter()
    for k, n in v.items():
      row[_column(k)] += n
    tot.update(row)
    lines.append(s.ljust(w) + "".join(str(row.get(c, 0)).rjust(12) for c, _ in REPORT_COLS))
  lines.append("TOTAL".ljust(w) + "".join(str(tot.get(c, 0)).rjust(12) for c, _ in REPORT_COLS))
  lines.append("crop removals by class: " + ", ".join(
      f"{k}={v}" for k, v in report["crop_removed"].items()))
  lines.append("nine-script and too_long/mixed removals are forced; 'extra' is the size rule; "
               "tokens of the nine scripts left in 'final' are single bytes (byte fallback).")
  return "\n".join(lines)


def define_flags(fv=flags.FLAGS):
  flags.DEFINE_string("base", "o200k_base", "The base vocabulary: o200k_base (the offline copy, "
                      "hash-checked) or a .tiktoken(.gz) file.", flag_values=fv)
  flags.DEFINE_string("base_sha256", base.O200K_SHA256, "SHA-256 the --base file's content must "
                      "have (default: o200k_base's).", flag_values=fv)
  flags.DEFINE_string("audit_corpus", None, "Directory of .txt (one document per line) / .jsonl "
                      "(\"text\") files for the retrofit audit; files named eval/val/test/... are "
                      "held out and not read.", flag_values=fv)
  flags.DEFINE_string("freq_corpus", None, "Corpus for the frequency id order (default: the audit "
                      "corpus).", flag_values=fv)
  flags.DEFINE_string("out", None, "Output tokenizer directory (a new one: the shipped "
                      "tokenizer/brahmic131k is the committed build).", flag_values=fv)
  flags.DEFINE_integer("target", DEFAULT_TARGET, "Vocabulary size after the crop and retrofit, "
                       "specials included.", flag_values=fv)
  flags.DEFINE_integer("num_specials", DEFAULT_SPECIALS, "Special tokens at the top ids.",
                       flag_values=fv)
  flags.DEFINE_integer("retrofit_slots", DEFAULT_SLOTS, "Corpus-dead slots re-filled with "
                       "Brahmic merges (SPEC section 7).", flag_values=fv)
  flags.DEFINE_integer("max_bytes", 32, "Longest token in bytes.", flag_values=fv)
  flags.DEFINE_string("name", "brahmic131k", "The tokenizer's name (tiktoken Encoding name).",
                      flag_values=fv)
  flags.DEFINE_bool("overwrite", False, "Write into an --out directory that already holds files "
                    "(refused otherwise, so a build never replaces the shipped tokenizer by "
                    "accident).", flag_values=fv)
  flags.mark_flags_as_required(["audit_corpus", "out"], flag_values=fv)


def main(argv: list[str]) -> int:
  """In-process entry (tests): `argv` as on the command line, without the program name."""
  return cli.in_process("tokenizer.build", define_flags, run, argv)


def run(a, args=()) -> int:
  """The build with parsed flags `a` (absl FlagValues); `args`: stray positional arguments."""
  if args:
    print(f"error: unexpected arguments {list(args)}; options look like --out=DIR.",
          file=sys.stderr)
    return 2
  out = pathlib.Path(a.out)
  if out.exists() and any(out.iterdir()) and not a.overwrite:
    print(f"error: --out={a.out} already holds files; expected a new directory (or --overwrite "
          f"to replace what is there).", file=sys.stderr)
    return 2
  t0 = time.time()
  try:
    ranks = (base.load_ranks() if a.base == "o200k_base"
             else base.load_ranks(a.base, a.base_sha256))
    audit = retrofit.read_texts(a.audit_corpus)
    tokens, specials, report = build(ranks, audit, target=a.target, num_specials=a.num_specials,
                                     retrofit_slots=a.retrofit_slots, max_bytes=a.max_bytes,
                                     name=a.name)
    enc = artifacts.make_encoding(a.name, tokens, base.O200K_PATTERN, specials)
    freq_texts = retrofit.read_texts(a.freq_corpus) if a.freq_corpus else audit
    counts = np.zeros(enc.n_vocab, np.int64)
    for ids in enc.encode_ordinary_batch(freq_texts, num_threads=2):
      counts += np.bincount(np.asarray(ids, np.int64), minlength=enc.n_vocab)
    report["freq_corpus"] = a.freq_corpus or a.audit_corpus
    report["audit_corpus"] = a.audit_corpus
    report["base"] = a.base
    report["wall_s"] = round(time.time() - t0, 1)
    artifacts.save(a.out, a.name, tokens, base.O200K_PATTERN, specials, counts, report,
                   max_bytes=a.max_bytes)
  except (base.TokenizerFileError, BuildError, crop.CropError, retrofit.RetrofitError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(format_report(report))
  print("saturation curves (audit tokens saved with k slots; audit tokens under the crop):")
  for sc, curve in report["curves"].items():
    pts = ", ".join(f"{k}:{sum(curve[:k])}" for k in (50, 100, 200, 400, 800) if k <= len(curve))
    print(f"  {sc:<11} {pts}  | allocated {report['added'].get(sc, 0)} -> saves "
          f"{sum(curve[:report['added'].get(sc, 0)])} of {report['audit_tokens'][sc]}")
  print(f"allocation (LP over saturation curves): {report['added']}; greedy gives the same: "
        f"{report['lp_equals_greedy']}")
  print(f"wrote {a.out}: {enc.n_vocab} ids ({len(tokens)} mergeable + {len(specials)} special) "
        f"in {time.time() - t0:.1f} s")
  return 0


if __name__ == "__main__":
  define_flags()
  app.run(lambda argv: sys.exit(run(flags.FLAGS, argv[1:])))
