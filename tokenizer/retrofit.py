"""Retrofit: free corpus-dead Brahmic slots and fill them with merges learned per Brahmic script.

1. Audit: encode the audit corpus with the cropped vocabulary; a kept token whose scripts are
   Brahmic and that is never produced is *dead*. (The audit corpus speaks only for Brahmic text,
   so only Brahmic tokens can be declared dead: a Hindi corpus says nothing about English tokens.)
2. Free up to `slots` dead tokens, highest base rank first, leaf-first (a dead token that is still
   an intermediate of a kept token's merge tree stays), so the kept vocabulary stays merge-closed
   and the audit corpus encodes exactly as before.
3. Learn candidate merges per Brahmic script on that script's audit text (lines are assigned to
   the Brahmic script with most letters in them), starting from the cropped vocabulary; a
   candidate's bytes must be new, at most 32 bytes, and of that script only (Common/Inherited
   aside, but with at least one character of the script). Its savings per slot give the script's saturation curve.
4. Allocate the slots across scripts with a linear program (scipy.optimize.linprog, HiGHS):
   maximise the sum over scripts of the fraction of that script's audit tokens saved, with
   x[s,k] in [0,1] the use of script s's k-th candidate, x[s,k+1] <= x[s,k] (a merge needs the
   merges before it) and sum x <= slots. For concave curves (non-increasing gains) this LP has an
   integral optimum, equal to the greedy that repeatedly takes the best next merge of any script.
5. Append the chosen merges after every kept token (new ranks above every existing rank, each
   new token = two tokens that already exist), in learning order per script.
"""
from __future__ import annotations

import collections
import dataclasses

import numpy as np
import regex
from scipy.optimize import linprog
from scipy.sparse import lil_matrix

from lightning_jax.fertility import SKIP_NAMES, read_texts
from tokenizer import bpe, scripts

__all__ = ["SKIP_NAMES", "read_texts"]   # the corpus reader's home: lightning_jax/fertility.py


class RetrofitError(ValueError):
  """The audit corpus cannot drive the retrofit (one sentence says why)."""


def texts_by_script(texts) -> dict[str, list[str]]:
  """Lines grouped by the Brahmic script with most letters in them (non-Brahmic lines dropped)."""
  out = collections.defaultdict(list)
  for t in texts:
    c = scripts.text_script_counts(t)
    best = max((s for s in scripts.BRAHMIC_SCRIPTS if c.get(s)), key=lambda s: c[s], default=None)
    if best is not None:
      out[best].append(t)
  return dict(out)


def brahmic_script_of(raw: bytes) -> str | None:
  sc = scripts.token_scripts(raw)
  if len(sc) == 1:
    s = next(iter(sc))
    if s in scripts.BRAHMIC_SCRIPTS:
      return s
  return None


def token_counts(enc, texts) -> collections.Counter:
  c = collections.Counter()
  for ids in enc.encode_ordinary_batch(list(texts), num_threads=2):
    c.update(ids)
  return c


def free_dead(kept: list[bytes], ranks: dict[bytes, int], splits, produced: set, slots: int):
  """(dead tokens by script, freed tokens) — see module docstring, step 2."""
  dead = collections.defaultdict(list)
  for t in kept:
    s = brahmic_script_of(t)
    if s is not None and t not in produced:
      dead[s].append(t)
  live_children = collections.Counter()
  for t in kept:
    sp = splits.get(t)
    if sp is not None:
      live_children[sp[0]] += 1
      if sp[1] != sp[0]:
        live_children[sp[1]] += 1
  cand = sorted((t for v in dead.values() for t in v), key=ranks.__getitem__, reverse=True)
  freed = []
  while len(freed) < slots and cand:
    rest = []
    for t in cand:
      if len(freed) >= slots:
        break
      if live_children[t] == 0:
        freed.append(t)
        sp = splits.get(t)
        if sp is not None:
          live_children[sp[0]] -= 1
          if sp[1] != sp[0]:
            live_children[sp[1]] -= 1
      else:
        rest.append(t)
    if len(rest) == len(cand):
      break
    cand = rest
  return dict(dead), freed


def word_counts_for(enc, texts, pattern: str) -> collections.Counter:
  """Pre-tokenizer pieces of `texts` -> count, as tuples of the bytes of their current tokens."""
  pat = regex.compile(pattern)
  pieces = collections.Counter()
  for t in texts:
    pieces.update(pat.findall(t))
  out = collections.Counter()
  for piece, n in pieces.items():
    ids = enc.encode_ordinary(piece)
    if len(ids) > 1:
      out[tuple(enc.decode_single_token_bytes(i) for i in ids)] += n
  return out


def allocate_lp(gains: dict[str, list[float]], slots: int) -> dict[str, int]:
  """Slots per script maximising total gain with prefix constraints (see module docstring)."""
  names = [s for s in gains if gains[s]]
  sizes = [len(gains[s]) for s in names]
  n = sum(sizes)
  if n == 0 or slots <= 0:
    return {s: 0 for s in gains}
  c = -np.concatenate([np.asarray(gains[s], np.float64) for s in names])
  n_prefix = n - len(names)
  a = lil_matrix((1 + n_prefix, n))
  b = np.zeros(1 + n_prefix)
  a[0, :] = 1.0
  b[0] = slots
  row, off = 1, 0
  for k in sizes:
    for j in range(k - 1):
      a[row, off + j + 1] = 1.0
      a[row, off + j] = -1.0
      row += 1
    off += k
  res = linprog(c, A_ub=a.tocsr(), b_ub=b, bounds=(0, 1), method="highs")
  if res.status != 0:
    raise RetrofitError(f"the slot allocation linear program failed: {res.message}")
  x = res.x
  alloc, off = {}, 0
  for s, k in zip(names, sizes):
    alloc[s] = int(np.floor(x[off:off + k].sum() + 1e-6))
    off += k
  # a non-concave curve can leave a fractional optimum: fill what rounding left, greedily
  left = min(slots, n) - sum(alloc.values())
  while left > 0:
    best = max((s for s in names if alloc[s] < len(gains[s])),
               key=lambda s: gains[s][alloc[s]], default=None)
    if best is None:
      break
    alloc[best] += 1
    left -= 1
  for s in gains:
    alloc.setdefault(s, 0)
  return alloc


def allocate_greedy(gains: dict[str, list[float]], slots: int) -> dict[str, int]:
  """Take the best next merge of any script, `slots` times (optimal for non-increasing gains)."""
  alloc = {s: 0 for s in gains}
  for _ in range(slots):
    best = max((s for s in gains if alloc[s] < len(gains[s])),
               key=lambda s: gains[s][alloc[s]], default=None)
    if best is None:
      break
    alloc[best] += 1
  return alloc


@dataclasses.dataclass
class RetrofitResult:
  kept: list[bytes]                      # kept tokens, base-rank order
  new: list[bytes]                       # appended tokens, rank order
  dead: dict[str, list[bytes]]           # dead tokens found, per script
  freed: dict[str, int]                  # dead tokens freed, per script
  added: dict[str, int]                  # new tokens, per script
  curves: dict[str, list[int]]           # tokens saved by the k-th candidate, per script
  audit_tokens: dict[str, int]           # audit tokens per script under the crop
  slots: int
  lp_equals_greedy: bool = True          # the LP's allocation equals the greedy's


def check_audit(by_script: dict) -> None:
  if not by_script:
    raise RetrofitError("the audit corpus holds no Brahmic text (no line with a letter of "
                        "Devanagari, Bengali, Gurmukhi, Gujarati, Oriya, Tamil, Telugu, Kannada "
                        "or Malayalam); the retrofit needs some.")


def retrofit(kept: list[bytes], base_ranks: dict[bytes, int], splits, audit_texts, pattern: str,
             slots: int, extra_slots: int = 0, max_bytes: int = 32, make_encoding=None,
             log=None) -> RetrofitResult:
  """Steps 1-5 of the module docstring. `make_encoding(list_of_tokens)` -> tiktoken.Encoding."""
  log = log or (lambda *a: None)
  by_script = texts_by_script(audit_texts)
  check_audit(by_script)
  enc = make_encoding(kept)
  produced_ids = token_counts(enc, [t for v in by_script.values() for t in v])
  produced = {enc.decode_single_token_bytes(i) for i in produced_ids}
  dead, freed = free_dead(kept, base_ranks, splits, produced, slots)
  freed_set = set(freed)
  kept2 = [t for t in kept if t not in freed_set]
  total_slots = len(freed) + extra_slots
  log(f"retrofit: dead {sum(map(len, dead.values()))}, freed {len(freed)}, "
      f"slots {total_slots} (extra {extra_slots})")
  enc2 = make_encoding(kept2)
  vocab = set(kept2)
  curves, cands, audit_tokens = {}, {}, {}
  for s, texts in sorted(by_script.items()):
    wc = word_counts_for(enc2, texts, pattern)
    audit_tokens[s] = sum(len(ids) for ids in enc2.encode_ordinary_batch(texts, num_threads=2))
    allowed = (lambda raw, s=s: scripts.token_scripts(raw) == {s})
    m = bpe.learn_merges(wc, vocab, total_slots, allowed, max_bytes=max_bytes)
    cands[s] = m
    curves[s] = [g for _, _, g in m]
  gains = {s: [g / max(audit_tokens[s], 1) for g in curves[s]] for s in curves}
  avail = sum(len(v) for v in curves.values())
  if avail < total_slots:
    raise RetrofitError(f"the audit corpus yields only {avail} candidate merges (each seen at "
                        f"least twice) for {total_slots} slots; give more Brahmic text or fewer "
                        "--retrofit_slots.")
  alloc = allocate_lp(gains, total_slots)
  same = alloc == allocate_greedy(gains, total_slots)
  new, added = [], {}
  for s in sorted(cands):
    for left, right, _ in cands[s][:alloc.get(s, 0)]:
      new.append(left + right)
    added[s] = alloc.get(s, 0)
  freed_by = collections.Counter(brahmic_script_of(t) for t in freed)
  return RetrofitResult(kept=kept2, new=new, dead=dead, freed=dict(freed_by), added=added,
                        curves=curves, audit_tokens=audit_tokens, slots=total_slots,
                        lp_equals_greedy=same)
