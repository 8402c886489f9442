"""Byte-level BPE as tiktoken runs it, in Python: merge traces, merge closure, merge learning.

tiktoken's BPE has no merge list: a piece starts as single bytes and, repeatedly, the adjacent
pair whose concatenation has the lowest rank is merged (leftmost on ties) until no adjacent
pair concatenates to a token. So the rank order *is* the merge order, and a vocabulary is
"merge-closed" when every token, encoded alone, comes back as itself.

Facts used by the crop and the retrofit (each follows from "lowest rank first"):
  * The merges inside any final token's span happen exactly as when that token's bytes are
    encoded alone (pairs across a final boundary are never the minimum, else they would merge).
    So every intermediate token formed anywhere lies in the merge tree of some final token.
  * Each token T that encodes to itself has a last split (L, R): the two parts just before the
    last merge; its merge tree is T -> L, R -> their last splits, down to single bytes.
  * Removing a token that lies in no kept token's merge tree changes no kept token's encoding,
    and no encoding of any text except where that token itself was produced.
  * A new token appended with a rank above every existing rank, made of two tokens A, B that
    are adjacent final tokens of some piece, encodes alone to itself (its bytes encode to
    [A, B] under the lower ranks, then merge).
"""
from __future__ import annotations

import collections
import heapq
from typing import Callable, Iterable, Mapping


def merge_trace(raw: bytes, ranks: Mapping[bytes, int]) -> tuple[list[bytes], tuple[bytes, bytes] | None]:
  """(final parts, last split) of tiktoken's BPE on `raw` alone.

  The last split is the pair of parts merged by the final merge when the piece ends as one
  token, else None (single byte, or the piece does not merge to one token).
  """
  parts = [raw[i:i + 1] for i in range(len(raw))]
  last = None
  while len(parts) > 1:
    best, bi = None, -1
    for i in range(len(parts) - 1):
      r = ranks.get(parts[i] + parts[i + 1])
      if r is not None and (best is None or r < best):
        best, bi = r, i
    if best is None:
      break
    if len(parts) == 2:
      last = (parts[0], parts[1])
    parts[bi:bi + 2] = [parts[bi] + parts[bi + 1]]
  return parts, (last if len(parts) == 1 else None)


def split_table(ranks: Mapping[bytes, int], tokens: Iterable[bytes] | None = None):
  """{token: last split or None} and the set of tokens that do not encode alone to themselves."""
  splits, unreachable = {}, set()
  for t in (ranks if tokens is None else tokens):
    if len(t) == 1:
      splits[t] = None
      continue
    parts, last = merge_trace(t, ranks)
    if len(parts) != 1:
      unreachable.add(t)
      splits[t] = None
    else:
      splits[t] = last
  return splits, unreachable


def children_of(splits: Mapping[bytes, tuple[bytes, bytes] | None], kept: Iterable[bytes]):
  """{token: kept tokens whose last split uses it}."""
  ch = collections.defaultdict(list)
  for t in kept:
    s = splits.get(t)
    if s is not None:
      ch[s[0]].append(t)
      if s[1] != s[0]:
        ch[s[1]].append(t)
  return ch


def descendants(roots: Iterable[bytes], children: Mapping[bytes, list]) -> set:
  """All tokens whose merge tree contains one of `roots` (roots included)."""
  out, stack = set(), list(roots)
  while stack:
    t = stack.pop()
    if t in out:
      continue
    out.add(t)
    stack.extend(children.get(t, ()))
  return out


def closure_failures(enc, ranks: Mapping[bytes, int]) -> list[bytes]:
  """Tokens of `ranks` that `enc` (a tiktoken.Encoding) does not encode alone to themselves."""
  bad = []
  for t, r in ranks.items():
    if enc._encode_single_piece(t) != [r]:
      bad.append(t)
  return bad


def learn_merges(word_counts: Mapping[tuple[bytes, ...], int], vocab: set, n_merges: int,
                 allowed: Callable[[bytes], bool], max_bytes: int = 32, min_count: int = 2):
  """Greedy BPE merge learning on pre-encoded words, starting from an existing vocabulary.

  word_counts: each word (a pre-tokenizer piece) as its tuple of current final tokens -> count.
  Returns [(left, right, tokens_saved)] in learning order; each new token is left + right, is
  not in `vocab`, has at most `max_bytes` bytes and passes `allowed`. tokens_saved is the drop
  in the total token count of the weighted words that the merge causes (non-increasing up to
  overlaps like "aaa", which is what makes the saturation curves concave).
  """
  words = [list(w) for w in word_counts]
  freqs = list(word_counts.values())
  pair_count: dict = collections.defaultdict(int)
  pair_words: dict = collections.defaultdict(set)
  for wi, (w, f) in enumerate(zip(words, freqs)):
    for p in zip(w, w[1:]):
      pair_count[p] += f
      pair_words[p].add(wi)
  heap = [(-c, p) for p, c in pair_count.items()]
  heapq.heapify(heap)
  banned, out, vocab = set(), [], set(vocab)
  while heap and len(out) < n_merges:
    negc, p = heapq.heappop(heap)
    c = -negc
    if p in banned or pair_count.get(p, 0) != c:
      continue
    if c < min_count:
      break
    new = p[0] + p[1]
    if new in vocab or len(new) > max_bytes or not allowed(new):
      banned.add(p)
      continue
    saved = 0
    touched = collections.defaultdict(int)
    for wi in list(pair_words[p]):
      w, f = words[wi], freqs[wi]
      nw, i = [], 0
      while i < len(w):
        if i + 1 < len(w) and w[i] == p[0] and w[i + 1] == p[1]:
          nw.append(new)
          i += 2
        else:
          nw.append(w[i])
          i += 1
      if len(nw) == len(w):
        continue
      saved += (len(w) - len(nw)) * f
      for q in zip(w, w[1:]):
        pair_count[q] -= f
        touched[q] += 0
      for q in zip(nw, nw[1:]):
        pair_count[q] += f
        pair_words[q].add(wi)
        touched[q] += 0
      words[wi] = nw
    for q in touched:
      if pair_count[q] > 0 and q not in banned:
        heapq.heappush(heap, (-pair_count[q], q))
    pair_words.pop(p, None)
    vocab.add(new)
    if saved > 0:
      out.append((p[0], p[1], saved))
  return out
