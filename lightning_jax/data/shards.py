"""Token shards: uint32 files of packed documents (end-of-text between them) plus a manifest.

Layout of a data directory (written by `python -m launch.prepare_data`):
  manifest.json     format version, tokenizer, id order, vocab size, end-of-text id, shard list
  vocab_ids.npy     (id_order "frequency" only) uint32 [vocab_size]: data id -> tokenizer id,
                    0xFFFFFFFF for padding ids that never occur; most frequent token = id 0
  {split}-{domain}-{i:05d}.u32    raw little-endian uint32 token ids

Splits are "train" and "val" (held out, whole documents, per domain). A domain is the first
path component of a file below the input directory (corpus/en/... -> "en"), or a JSONL
record's "domain" field. Files named eval/val/valid/validation/heldout/test (.txt or .jsonl, also
as a suffix like `news_eval.txt`) are the held-out split of their domain as given; a domain
without such a file gets `val_fraction` of its documents held out at random (seeded).

Id order "frequency" renumbers the tokens that occur in the corpus by count (most frequent =
0, SPEC §6) and keeps only those, so a small corpus gets a compact vocabulary (a small output
head for the tiny model). The Kronecker byte buffers must then be built in the same order:
`token_bytes(manifest_dir)` returns the raw bytes of every data id in data order.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Iterable, Sequence

import numpy as np

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
VOCAB_IDS = "vocab_ids.npy"
TOKEN_BYTES = "token_bytes.npz"   # raw bytes of every data id (data order), offsets [V + 1]
PAD_ID = 0xFFFFFFFF
TOKEN_DTYPE = np.dtype("<u4")


class DataError(ValueError):
  """A data directory, shard or input file is missing or malformed (one sentence says which)."""


# ----------------------------------------------------------------------------- reading inputs
@dataclasses.dataclass
class Document:
  text: str
  domain: str
  source: str
  heldout: bool = False      # came from an explicit eval/val file


HELDOUT_NAMES = ("eval", "val", "valid", "validation", "heldout", "test")


def _is_heldout_file(path: pathlib.Path) -> bool:
  stem = path.stem.lower()
  return any(stem == n or stem.endswith(("_" + n, "-" + n, "." + n)) for n in HELDOUT_NAMES)


def _domain_of(path: pathlib.Path, root: pathlib.Path | None) -> str:
  if root is not None:
    rel = path.relative_to(root)
    if len(rel.parts) > 1:
      return rel.parts[0]
  return path.stem


def iter_input_files(inputs: Sequence[str]) -> list[tuple[pathlib.Path, pathlib.Path | None]]:
  """Expand directories into their .txt/.jsonl files (sorted); each with its root directory."""
  out = []
  for item in inputs:
    p = pathlib.Path(item)
    if p.is_dir():
      files = sorted(f for f in p.rglob("*") if f.suffix in (".txt", ".jsonl") and f.is_file())
      if not files:
        raise DataError(f"input directory {p} contains no .txt or .jsonl files.")
      out.extend((f, p) for f in files)
    elif p.is_file():
      if p.suffix not in (".txt", ".jsonl"):
        raise DataError(f"input file {p} is neither .txt nor .jsonl; expected one of those.")
      out.append((p, None))
    else:
      raise DataError(f"input {p} does not exist; expected a directory or .txt/.jsonl files.")
  return out


def read_documents(inputs: Sequence[str]) -> list[Document]:
  """.txt: one document per file. .jsonl: one document per line, text in the "text" field."""
  docs = []
  for path, root in iter_input_files(inputs):
    domain = _domain_of(path, root)
    held = _is_heldout_file(path)
    if path.suffix == ".txt":
      text = path.read_text(encoding="utf-8")
      if text.strip():
        docs.append(Document(text, domain, str(path), held))
      continue
    with open(path, encoding="utf-8") as f:
      for n, line in enumerate(f, 1):
        if not line.strip():
          continue
        try:
          rec = json.loads(line)
        except json.JSONDecodeError as e:
          raise DataError(f"{path}:{n} is not valid JSON ({e.msg}); expected one object per line.")
        if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
          raise DataError(f"{path}:{n} has no string field \"text\"; expected "
                          f"{{\"text\": ..., \"domain\"?: ...}} per line.")
        if rec["text"].strip():
          docs.append(Document(rec["text"], str(rec.get("domain", domain)), f"{path}:{n}", held))
  return docs


# ----------------------------------------------------------------------------- writing shards
def split_documents(docs: list[Document], val_fraction: float, seed: int):
  """Per domain: explicit held-out files if the domain has any, else round(val_fraction * n)
  whole documents chosen with a seeded permutation (at least 1 when n >= 2)."""
  by_domain: dict[str, list[Document]] = {}
  for d in docs:
    by_domain.setdefault(d.domain, []).append(d)
  train, val = {}, {}
  for dom in sorted(by_domain):
    ds = by_domain[dom]
    if any(d.heldout for d in ds):
      train[dom] = [d for d in ds if not d.heldout]
      val[dom] = [d for d in ds if d.heldout]
      continue
    n_val = int(round(val_fraction * len(ds)))
    if val_fraction > 0 and len(ds) >= 2:
      n_val = min(max(n_val, 1), len(ds) - 1)
    rng = np.random.default_rng([seed, len(ds)] + list(dom.encode()))
    order = rng.permutation(len(ds))
    val_idx = set(order[:n_val].tolist())
    train[dom] = [d for i, d in enumerate(ds) if i not in val_idx]
    val[dom] = [d for i, d in enumerate(ds) if i in val_idx]
  return train, val


def prepare(inputs: Sequence[str], output: str, *, encoding=None, id_order: str = "frequency",
            val_fraction: float = 0.05, seed: int = 0, shard_tokens: int = 1 << 24,
            vocab_multiple: int = 128, num_threads: int = 2, log=print) -> dict:
  """Tokenize documents into shards under `output`; returns the manifest."""
  if id_order not in ("natural", "frequency"):
    raise DataError(f"id_order={id_order!r} must be 'natural' or 'frequency'.")
  if not 0 <= val_fraction < 1:
    raise DataError(f"val_fraction={val_fraction} must be in [0, 1).")
  if encoding is None:
    from tokenizer.base import load_o200k_base
    encoding = load_o200k_base()
  eot_tok = encoding.eot_token
  docs = read_documents(inputs)
  if not docs:
    raise DataError(f"inputs {list(inputs)} hold no non-empty documents.")
  train, val = split_documents(docs, val_fraction, seed)

  def encode(ds: list[Document]) -> list[np.ndarray]:
    ids = encoding.encode_ordinary_batch([d.text for d in ds], num_threads=num_threads)
    return [np.asarray(x, np.int64) for x in ids]

  enc = {(split, dom): encode(ds) for split, parts in (("train", train), ("val", val))
         for dom, ds in parts.items() if ds}

  # id order
  if id_order == "frequency":
    counts = np.zeros(encoding.n_vocab, np.int64)
    for arrs in enc.values():
      for a in arrs:
        counts += np.bincount(a, minlength=encoding.n_vocab)
    counts[eot_tok] = 0
    seen = np.nonzero(counts)[0]
    seen = seen[np.lexsort((seen, -counts[seen]))]           # by count desc, then tokenizer id
    vocab_size = -(-(len(seen) + 1) // vocab_multiple) * vocab_multiple
    data_to_tok = np.full(vocab_size, PAD_ID, np.uint32)
    data_to_tok[:len(seen)] = seen
    eot = vocab_size - 1                                       # specials occupy the top ids
    data_to_tok[eot] = eot_tok
    tok_to_data = np.full(encoding.n_vocab, -1, np.int64)
    tok_to_data[data_to_tok[data_to_tok != PAD_ID]] = np.nonzero(data_to_tok != PAD_ID)[0]
  else:
    vocab_size, eot, tok_to_data, data_to_tok = encoding.n_vocab, eot_tok, None, None

  out = pathlib.Path(output)
  out.mkdir(parents=True, exist_ok=True)
  for old in list(out.glob("*.u32")) + [out / VOCAB_IDS, out / TOKEN_BYTES]:
    old.unlink(missing_ok=True)
  shards = []
  for (split, dom), arrs in sorted(enc.items()):
    stream = np.concatenate([np.append(a, eot_tok) for a in arrs])
    if tok_to_data is not None:
      stream = tok_to_data[stream]
    stream = stream.astype(TOKEN_DTYPE)
    for i, start in enumerate(range(0, len(stream), shard_tokens)):
      piece = stream[start:start + shard_tokens]
      name = f"{split}-{dom}-{i:05d}.u32"
      piece.tofile(out / name)
      shards.append({"file": name, "split": split, "domain": dom, "n_tokens": int(len(piece))})
  manifest = {
      "format_version": FORMAT_VERSION,
      "tokenizer": encoding.name,
      "id_order": id_order,
      "vocab_size": int(vocab_size),
      "eot_id": int(eot),
      "seed": seed,
      "val_fraction": val_fraction,
      "domains": sorted({s["domain"] for s in shards}),
      "documents": {f"{split}/{dom}": len(ds) for split, parts in (("train", train), ("val", val))
                    for dom, ds in parts.items()},
      "shards": shards,
  }
  if data_to_tok is not None:
    np.save(out / VOCAB_IDS, data_to_tok)
    manifest["vocab_ids"] = VOCAB_IDS
  # raw bytes of every data id, so that training needs no tokenizer files (GPU machines)
  from tokenizer.base import token_bytes_list
  natural = token_bytes_list(encoding)
  tb = natural if data_to_tok is None else [b"" if t == PAD_ID else natural[int(t)]
                                              for t in data_to_tok]
  np.savez(out / TOKEN_BYTES, data=np.frombuffer(b"".join(tb), np.uint8),
           offsets=np.cumsum([0] + [len(b) for b in tb]).astype(np.int64))
  manifest["token_bytes"] = TOKEN_BYTES
  tmp = out / (MANIFEST + ".tmp")
  tmp.write_text(json.dumps(manifest, indent=1))
  os.replace(tmp, out / MANIFEST)
  for split in ("train", "val"):
    n = sum(s["n_tokens"] for s in shards if s["split"] == split)
    log(f"{split}: {n:,} tokens in {sum(s['split'] == split for s in shards)} shards")
  log(f"vocabulary: {vocab_size:,} ids ({id_order} order), end-of-text id {eot}; wrote {out}")
  return manifest


# ----------------------------------------------------------------------------- reading shards
def load_manifest(path: str | os.PathLike) -> dict:
  d = pathlib.Path(path)
  if not d.is_dir():
    raise DataError(f"data directory {d} does not exist; create it with "
                    f"`python -m launch.prepare_data --input ... --output {d}`.")
  mf = d / MANIFEST
  if not mf.exists():
    raise DataError(f"data directory {d} has no {MANIFEST}; expected shards written by "
                    f"`python -m launch.prepare_data`.")
  try:
    m = json.loads(mf.read_text())
  except json.JSONDecodeError as e:
    raise DataError(f"{mf} is not valid JSON ({e.msg}).")
  if m.get("format_version") != FORMAT_VERSION:
    raise DataError(f"{mf} has format_version {m.get('format_version')}, expected {FORMAT_VERSION}.")
  return m


def open_shard(data_dir: str | os.PathLike, entry: dict) -> np.ndarray:
  """Memory-map one shard, checking that its size is a whole number of uint32 tokens."""
  p = pathlib.Path(data_dir) / entry["file"]
  if not p.exists():
    raise DataError(f"shard {p} listed in the manifest does not exist.")
  size = p.stat().st_size
  if size % TOKEN_DTYPE.itemsize:
    raise DataError(f"shard {p} has {size} bytes, which is not a whole number of uint32 tokens "
                    f"(4 bytes each).")
  if size // TOKEN_DTYPE.itemsize != entry["n_tokens"]:
    raise DataError(f"shard {p} holds {size // 4} tokens but the manifest says "
                    f"{entry['n_tokens']}; the shard or manifest is stale or truncated.")
  if size == 0:
    return np.zeros(0, TOKEN_DTYPE)
  return np.memmap(p, dtype=TOKEN_DTYPE, mode="r")


def shards_of(manifest: dict, split: str, domain: str | None = None) -> list[dict]:
  return [s for s in manifest["shards"]
          if s["split"] == split and (domain is None or s["domain"] == domain)]


def token_bytes(data_dir: str | os.PathLike, encoding=None) -> list[bytes]:
  """Raw bytes of every data id 0..vocab_size-1 in the data's id order (b'' for padding ids).

  Pass this to the Kronecker codec so its byte buffers follow the data's id order.
  """
  m = load_manifest(data_dir)
  if encoding is None and m.get("token_bytes"):
    z = np.load(pathlib.Path(data_dir) / m["token_bytes"])
    data, off = z["data"].tobytes(), z["offsets"]
    if len(off) != m["vocab_size"] + 1:
      raise DataError(f"{data_dir}/{m['token_bytes']} holds {len(off) - 1} tokens, expected "
                      f"vocab_size={m['vocab_size']}.")
    return [data[off[i]:off[i + 1]] for i in range(len(off) - 1)]
  if encoding is None:
    from tokenizer.base import load_o200k_base
    encoding = load_o200k_base()
  if m["tokenizer"] != encoding.name:
    raise DataError(f"data in {data_dir} was tokenized with {m['tokenizer']!r}, not "
                    f"{encoding.name!r}.")
  from tokenizer.base import token_bytes_list
  natural = token_bytes_list(encoding)
  if m["id_order"] == "natural":
    return natural
  ids = np.load(pathlib.Path(data_dir) / m["vocab_ids"])
  return [b"" if t == PAD_ID else natural[int(t)] for t in ids]


def decode(data_dir, ids: Iterable[int], encoding=None) -> str:
  """Text of data ids (for looking at samples)."""
  tb = token_bytes(data_dir, encoding)
  return b"".join(tb[int(i)] for i in ids).decode("utf-8", errors="replace")
