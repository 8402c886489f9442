"""Built tokenizer directory: write (the reading half lives in lightning_jax/vocab.py).

Layout of a tokenizer directory (written by `python -m tokenizer.build`):
  tokenizer.json        name, pre-tokenizer pattern, special tokens {text: id}, n_vocab,
                        ranks file name + SHA-256 of its decompressed content, build report
  <name>.tiktoken.gz    mergeable ranks, tiktoken's format (base64 token, rank), ids 0..M-1
  id_order.npz          frequency order: new_from_old int32 [V] (natural id -> frequency id),
                        old_from_new int32 [V] (its inverse), counts int64 [V] (natural order);
                        most frequent mergeable token = 0, special tokens keep their top ids
  kronecker_natural.npz / kronecker_frequency.npz
                        bytes uint8 [V, 32] and lengths int16 [V] for the Kronecker codec, in
                        natural and in frequency id order (lightning_jax.layers.kronecker)
"""
from __future__ import annotations

import base64
import gzip
import hashlib
import json
import pathlib

import numpy as np
import tiktoken

from lightning_jax.layers.kronecker import build_byte_buffers
from lightning_jax.vocab import (ID_ORDER, KRON, META, load_byte_buffers, load_encoding,
                                 load_id_order, read_meta)

__all__ = ["ID_ORDER", "KRON", "META", "frequency_order", "load_byte_buffers", "load_encoding",
           "load_id_order", "make_encoding", "ranks_bytes", "read_meta", "save",
           "special_token_names"]


def special_token_names(n: int) -> list[str]:
  """The special tokens at the top ids, in id order: end of text, pad, chat, then reserved."""
  fixed = ["<|endoftext|>", "<|pad|>", "<|endofprompt|>", "<|im_start|>", "<|im_end|>",
           "<|im_sep|>"]
  if n < 2:
    raise ValueError(f"num_specials={n}; expected at least 2 (end of text and pad).")
  names = fixed[:n]
  names += [f"<|reserved_{i}|>" for i in range(n - len(names))]
  return names


def ranks_bytes(tokens: list[bytes]) -> bytes:
  return b"".join(base64.b64encode(t) + b" " + str(i).encode() + b"\n"
                  for i, t in enumerate(tokens))


def make_encoding(name: str, tokens: list[bytes], pattern: str, specials: dict[str, int] | None = None):
  return tiktoken.Encoding(name=name, pat_str=pattern,
                           mergeable_ranks={t: i for i, t in enumerate(tokens)},
                           special_tokens=dict(specials or {}))


def frequency_order(counts: np.ndarray, n_mergeable: int):
  """(new_from_old, old_from_new): mergeable ids by count desc (ties: lower id first); specials fixed."""
  v = len(counts)
  ids = np.arange(n_mergeable)
  order = ids[np.lexsort((ids, -counts[:n_mergeable]))]      # old ids, most frequent first
  old_from_new = np.concatenate([order, np.arange(n_mergeable, v)]).astype(np.int32)
  new_from_old = np.empty(v, np.int32)
  new_from_old[old_from_new] = np.arange(v, dtype=np.int32)
  return new_from_old, old_from_new


def save(out, name: str, tokens: list[bytes], pattern: str, specials: dict[str, int],
         counts: np.ndarray, report: dict, max_bytes: int = 32) -> dict:
  out = pathlib.Path(out)
  out.mkdir(parents=True, exist_ok=True)
  raw = ranks_bytes(tokens)
  ranks_file = f"{name}.tiktoken.gz"
  (out / ranks_file).write_bytes(gzip.compress(raw, mtime=0))
  v = len(tokens) + len(specials)
  new_from_old, old_from_new = frequency_order(counts, len(tokens))
  np.savez_compressed(out / ID_ORDER, new_from_old=new_from_old, old_from_new=old_from_new,
           counts=counts.astype(np.int64))
  by_id = list(tokens) + [b""] * len(specials)
  for s, i in specials.items():
    by_id[i] = s.encode("utf-8")
  for order, ids in (("natural", np.arange(v)), ("frequency", old_from_new)):
    b, l = build_byte_buffers([by_id[int(i)] for i in ids], max_bytes=max_bytes)
    np.savez_compressed(out / KRON.format(order=order), bytes=b, lengths=l)
  meta = {
      "name": name, "pattern": pattern, "n_vocab": v, "n_mergeable": len(tokens),
      "special_tokens": specials, "ranks_file": ranks_file,
      "ranks_sha256": hashlib.sha256(raw).hexdigest(), "id_order_file": ID_ORDER,
      "max_bytes": max_bytes, "report": report,
  }
  (out / META).write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
  return meta
