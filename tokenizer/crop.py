"""Script-prune crop of a byte-level BPE vocabulary to a target number of mergeable tokens.

Removal happens in classes; every class removes whole merge trees (a token goes together with
every kept token whose merge tree contains it), so the kept vocabulary stays merge-closed.

Forced (always removed, whatever the target):
  unreachable  tokens that do not encode alone to themselves even in the base;
  script:<S>   tokens with a character (or a partial UTF-8 character, see scripts.py) of one of the
               nine out-of-scope writing systems of SPEC §7: Han, Hangul, Arabic, Cyrillic, Thai,
               Greek, Hebrew, Sinhala, Hiragana/Katakana (Unicode Script property);
  too_long     tokens longer than `max_bytes` (32: the Kronecker codec's byte window);
  mixed        tokens mixing two scripts (Common/Inherited aside).
  closure      kept tokens whose merge tree needs a token removed above.
If more must go to reach the target ("extra" rule), tokens are removed leaf-first (only tokens no
kept token's merge tree still needs) in this order, each class from the highest base rank down
(highest rank = merged last when the base was trained = least frequent there):
  extra:other_script  letters of any other script than Latin and the nine Brahmic scripts;
  extra:latin_nonascii Latin tokens with non-ASCII letters (diacritics);
  extra:rest          everything else but single bytes and Brahmic tokens.
(A class "non-ASCII tokens of no script" before the Latin ones was tried and dropped: it takes
tokens like " ।" (danda) and curly quotes that Brahmic and English text use.)
Single bytes (the 256 byte tokens every text falls back to) and Brahmic tokens (the retrofit's
business) are never removed by the crop's extra rule.
"""
from __future__ import annotations

import collections
import dataclasses

from tokenizer import bpe, scripts


class CropError(ValueError):
  """The crop cannot reach the requested size (one sentence says why)."""


@dataclasses.dataclass
class CropResult:
  kept: list[bytes]                      # kept tokens in base-rank order
  removed: dict[str, list[bytes]]        # class -> removed tokens
  splits: dict                           # base last-split table (for later steps)
  target: int

  def counts(self) -> dict[str, int]:
    return {k: len(v) for k, v in self.removed.items()}


def removed_script(raw: bytes) -> str | None:
  sc = scripts.token_scripts(raw)
  for s in scripts.REMOVED_SCRIPTS:
    if s in sc:
      return s
  return None


def _extra_class(raw: bytes) -> str | None:
  if len(raw) == 1:
    return None
  sc = scripts.token_scripts(raw)
  if sc & set(scripts.BRAHMIC_SCRIPTS):
    return None
  if sc - {"Latin"}:
    return "extra:other_script"
  if "Latin" in sc and any(b >= 0x80 for b in raw):
    return "extra:latin_nonascii"
  return "extra:rest"


EXTRA_ORDER = ("extra:other_script", "extra:latin_nonascii", "extra:rest")


def crop(ranks: dict[bytes, int], target: int, max_bytes: int = 32, log=None) -> CropResult:
  """Remove the forced classes, then the extra classes until `target` tokens remain.

  If the forced removals already leave fewer than `target` tokens, nothing more is removed and
  the retrofit gets the difference as extra slots.
  """
  log = log or (lambda *a: None)
  if target < 256:
    raise CropError(f"crop target {target} is smaller than the 256 single-byte tokens every "
                    "byte-level BPE vocabulary needs.")
  splits, unreachable = bpe.split_table(ranks)
  order = sorted(ranks, key=ranks.__getitem__)
  removed: dict[str, list[bytes]] = collections.defaultdict(list)
  gone: set = set()

  def take(cls, tokens):
    for t in tokens:
      if t not in gone and len(t) > 1:
        gone.add(t)
        removed[cls].append(t)

  take("unreachable", [t for t in order if t in unreachable])
  forced = []
  for t in order:
    if t in gone or len(t) == 1:
      continue
    s = removed_script(t)
    if s is not None:
      forced.append((f"script:{s}", t))
    elif len(t) > max_bytes:
      forced.append(("too_long", t))
    elif scripts.is_mixed(t):
      forced.append(("mixed", t))
  for cls, t in forced:
    take(cls, [t])
  children = bpe.children_of(splits, [t for t in order if t not in gone])
  take("closure", sorted(bpe.descendants([t for _, t in forced], children) - gone,
                         key=ranks.__getitem__))
  log(f"crop: forced removals {dict((k, len(v)) for k, v in removed.items())}")

  kept_n = len(ranks) - len(gone)
  if kept_n > target:
    kept = [t for t in order if t not in gone]
    live_children = collections.Counter()
    for t in kept:
      s = splits.get(t)
      if s is not None:
        live_children[s[0]] += 1
        if s[1] != s[0]:
          live_children[s[1]] += 1
    by_class = collections.defaultdict(list)
    for t in kept:
      c = _extra_class(t)
      if c is not None:
        by_class[c].append(t)
    need = kept_n - target
    for cls in EXTRA_ORDER:
      # highest rank first; removing a leaf may free its parts, so sweep until nothing moves
      cand = sorted(by_class[cls], key=ranks.__getitem__, reverse=True)
      while need > 0 and cand:
        rest = []
        for t in cand:
          if need == 0:
            break
          if live_children[t] == 0:
            gone.add(t)
            removed[cls].append(t)
            need -= 1
            s = splits.get(t)
            if s is not None:
              live_children[s[0]] -= 1
              if s[1] != s[0]:
                live_children[s[1]] -= 1
          else:
            rest.append(t)
        if len(rest) == len(cand):
          break
        cand = sorted(rest, key=ranks.__getitem__, reverse=True)
      if need == 0:
        break
    if need > 0:
      raise CropError(f"crop target {target} cannot be reached: {need} more tokens would have to "
                      "go but only single bytes, Brahmic tokens and parts of kept tokens remain.")
  kept = [t for t in order if t not in gone]
  return CropResult(kept=kept, removed=dict(removed), splits=splits, target=target)

