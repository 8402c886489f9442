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

Validation (cheap, at load; issue 21): prepare records every shard's smallest and largest id
("min_id", "max_id") and the sha256 of vocab_ids.npy in the manifest. `load_manifest` then
checks, each violation one DataError sentence naming the file:
  * every shard (and vocab_ids / token_bytes) is a plain file name inside the data directory;
  * every shard's recorded ids lie in [0, vocab_size) (a negative id written as uint32 is a huge
    one); a manifest written before these fields existed gets a one-time scan of its shards,
    whose result is written back into manifest.json (kept in memory if the directory is read-only);
  * vocab_ids.npy holds vocab_size uint32 ids and matches the recorded sha256.

Invalid UTF-8 in an input file: the policy is REPLACE AND COUNT. Each invalid byte sequence is
decoded as U+FFFD; prepare reports the count per file (and the byte offset of the first one),
and the manifest records them under "invalid_utf8". A held-out split that ends up tiny (fewer
than MIN_HELDOUT_TOKENS tokens, or no document at all) is reported per domain.

Id order "frequency" renumbers the tokens that occur in the corpus by count (most frequent =
0, SPEC §6) and keeps only those, so a small corpus gets a compact vocabulary (a small output
head for the tiny model). The Kronecker byte buffers must then be built in the same order:
`token_bytes(manifest_dir)` returns the raw bytes of every data id in data order.
"""
from __future__ import annotations

import codecs
import dataclasses
import hashlib
import json
import os
import pathlib
from typing import Iterable, Sequence

import numpy as np

from lightning_jax import vocab

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
VOCAB_IDS = "vocab_ids.npy"
TOKEN_BYTES = "token_bytes.npz"   # raw bytes of every data id (data order), offsets [V + 1]
PAD_ID = 0xFFFFFFFF
TOKEN_DTYPE = np.dtype("<u4")
MIN_HELDOUT_TOKENS = 4096        # a held-out split below this is reported as tiny


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


_BAD_UTF8: list = []          # start offsets seen by the counting error handler (one decode)


def _count_invalid(err):
  _BAD_UTF8.append(err.start)
  return "\ufffd", err.end


codecs.register_error("lightning_jax.count_invalid_utf8", _count_invalid)


def decode_utf8(raw: bytes) -> tuple[str, int, int | None]:
  """(text, number of invalid byte sequences replaced by U+FFFD, byte offset of the first)."""
  try:
    return raw.decode("utf-8"), 0, None
  except UnicodeDecodeError:
    pass
  _BAD_UTF8.clear()
  text = raw.decode("utf-8", errors="lightning_jax.count_invalid_utf8")
  return text, len(_BAD_UTF8), _BAD_UTF8[0]


def read_documents(inputs: Sequence[str], invalid_utf8: dict | None = None) -> list[Document]:
  """.txt: one document per file. .jsonl: one document per line, text in the "text" field.

  Invalid UTF-8 is replaced (U+FFFD) and counted: invalid_utf8 (if given) gets
  {file: [count, byte offset of the first]} for every file that had any."""
  docs = []
  for path, root in iter_input_files(inputs):
    domain = _domain_of(path, root)
    held = _is_heldout_file(path)
    text, n_bad, first = decode_utf8(path.read_bytes())
    if n_bad and invalid_utf8 is not None:
      invalid_utf8[str(path)] = [n_bad, first]
    if path.suffix == ".txt":
      if text.strip():
        docs.append(Document(text, domain, str(path), held))
      continue
    for n, line in enumerate(text.split("\n"), 1):
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
    encoding = vocab.load_o200k_base()
  eot_tok = encoding.eot_token
  invalid_utf8: dict = {}
  docs = read_documents(inputs, invalid_utf8)
  for f, (n, first) in invalid_utf8.items():
    log(f"warning: {f} holds {n} invalid UTF-8 byte sequence(s) (the first at byte offset "
        f"{first}); each was replaced by U+FFFD (policy: replace and count).")
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
      shards.append({"file": name, "split": split, "domain": dom, "n_tokens": int(len(piece)),
                     **_id_range(piece)})
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
  if invalid_utf8:
    manifest["invalid_utf8"] = invalid_utf8
  if data_to_tok is not None:
    np.save(out / VOCAB_IDS, data_to_tok)
    manifest["vocab_ids"] = VOCAB_IDS
    manifest["vocab_ids_sha256"] = _sha256(out / VOCAB_IDS)
  # raw bytes of every data id, so that training needs no tokenizer files (GPU machines)
  natural = vocab.token_bytes_list(encoding)
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
  for note in tiny_heldout(manifest):
    log(f"note: {note}")
  log(f"vocabulary: {vocab_size:,} ids ({id_order} order), end-of-text id {eot}; wrote {out}")
  return manifest


def tiny_heldout(manifest: dict, min_tokens: int = MIN_HELDOUT_TOKENS) -> list[str]:
  """One sentence per domain whose held-out split is empty or under min_tokens tokens."""
  out = []
  docs = manifest.get("documents", {})
  if not shards_of(manifest, "val") and not manifest.get("val_fraction"):
    return out                    # no held-out split was asked for
  for dom in manifest["domains"]:
    n_tok = sum(s["n_tokens"] for s in shards_of(manifest, "val", dom))
    n_doc = docs.get(f"val/{dom}", 0)
    if n_tok == 0:
      out.append(f"domain {dom!r} has no held-out text (its {docs.get(f'train/{dom}', '?')} "
                 f"document(s) all went to training), so it gets no held-out loss: add an "
                 f"eval.txt for it, or more documents.")
    elif n_tok < min_tokens:
      out.append(f"domain {dom!r} has a tiny held-out split: {n_tok:,} tokens in {n_doc} "
                 f"document(s), under {min_tokens:,}; its held-out loss will be noisy (and it is "
                 f"not evaluated at all with fewer than train.eval_batch windows of seq_len + 2 "
                 f"tokens): add an eval.txt for it, or raise --val_fraction.")
  return out


def _id_range(arr: np.ndarray) -> dict:
  if not len(arr):
    return {"min_id": None, "max_id": None}
  return {"min_id": int(arr.min()), "max_id": int(arr.max())}


def _sha256(path: pathlib.Path) -> str:
  return hashlib.sha256(path.read_bytes()).hexdigest()


# ----------------------------------------------------------------------------- reading shards
def _inside(d: pathlib.Path, name, what: str, mf: pathlib.Path) -> pathlib.Path:
  """d / name, refused unless it is a plain relative name that stays inside d."""
  if not isinstance(name, str) or not name or pathlib.PurePath(name).is_absolute():
    raise DataError(f"{mf} names {what} {name!r}, which is not a file name inside {d}; expected "
                    f"a relative name like train-en-00000.u32.")
  p = d / name
  root = d.resolve()
  if p.resolve() != root and root not in p.resolve().parents:
    raise DataError(f"{mf} names {what} {name!r}, which lies outside the data directory {d}; "
                    f"expected files inside it.")
  return p


_SCANNED: dict = {}     # (shard path, size, mtime) -> id range, for read-only old manifests


def check_manifest(d: pathlib.Path, m: dict, log=print) -> dict:
  """The cheap load-time checks of the module docstring; returns m (id ranges filled in)."""
  mf = d / MANIFEST
  v = m.get("vocab_size")
  if not isinstance(v, int) or v < 1:
    raise DataError(f"{mf} has vocab_size={v!r}; expected a positive integer.")
  eot = m.get("eot_id")
  if not isinstance(eot, int) or not 0 <= eot < v:
    raise DataError(f"{mf} has eot_id={eot!r}, outside the vocabulary [0, {v}).")
  shards = m.get("shards")
  if not isinstance(shards, list):
    raise DataError(f"{mf} has no shard list; expected \"shards\": [...].")
  scanned = 0
  for e in shards:
    p = _inside(d, e.get("file") if isinstance(e, dict) else None, "the shard", mf)
    if "min_id" not in e or "max_id" not in e:      # a manifest from before the id record
      if not p.exists():
        continue                          # open_shard names it when it is needed
      st = p.stat()
      key = (str(p), st.st_size, st.st_mtime_ns)
      if key not in _SCANNED:
        arr = (np.memmap(p, dtype=TOKEN_DTYPE, mode="r") if st.st_size >= TOKEN_DTYPE.itemsize
               else np.zeros(0, TOKEN_DTYPE))
        _SCANNED[key] = _id_range(arr)
        scanned += 1
      e.update(_SCANNED[key])
    lo, hi = e.get("min_id"), e.get("max_id")
    if lo is None and hi is None:
      continue
    if not (isinstance(lo, int) and isinstance(hi, int) and 0 <= lo <= hi < v):
      raise DataError(f"shard {p} holds token ids {lo}..{hi} but the vocabulary of {mf} is "
                      f"[0, {v}) (a negative id written as uint32 shows as a huge one); expected "
                      f"ids below vocab_size: prepare the data again.")
  if scanned:
    try:
      tmp = d / (MANIFEST + ".tmp")
      tmp.write_text(json.dumps(m, indent=1))
      os.replace(tmp, mf)
      log(f"note: scanned {scanned} shard(s) of {d} once for their token id range and recorded "
          f"it in {mf}.")
    except OSError:
      pass                                # read-only data: the scan is remembered in memory
  for key, what in (("vocab_ids", "vocab_ids"), ("token_bytes", "token_bytes")):
    if m.get(key):
      _inside(d, m[key], what, mf)
  if m.get("vocab_ids"):
    p = d / m["vocab_ids"]
    if not p.exists():
      raise DataError(f"{p} (vocab_ids in {mf}) does not exist; expected the id map written by "
                      f"prepare_data.")
    want = m.get("vocab_ids_sha256")
    if want is not None and _sha256(p) != want:
      raise DataError(f"{p} does not match the sha256 recorded in {mf}; it was changed or "
                      f"truncated after the data was prepared: prepare the data again.")
    try:
      ids = np.load(p, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as e:
      raise DataError(f"{p} is not a readable .npy array ({e}); expected uint32 [{v}].") from e
    if ids.shape != (v,) or ids.dtype != np.uint32:
      raise DataError(f"{p} holds {ids.dtype} {list(ids.shape)} but {mf} has vocab_size={v}; "
                      f"expected uint32 [{v}] (truncated or from another data directory).")
  return m


def load_manifest(path: str | os.PathLike, log=print) -> dict:
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
  return check_manifest(d, m, log)


def open_shard(data_dir: str | os.PathLike, entry: dict) -> np.ndarray:
  """Memory-map one shard, checking that its size is a whole number of uint32 tokens."""
  d = pathlib.Path(data_dir)
  p = _inside(d, entry["file"], "the shard", d / MANIFEST)
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
    encoding = vocab.load_o200k_base()
  if m["tokenizer"] != encoding.name:
    raise DataError(f"data in {data_dir} was tokenized with {m['tokenizer']!r}, not "
                    f"{encoding.name!r}.")
  natural = vocab.token_bytes_list(encoding)
  if m["id_order"] == "natural":
    return natural
  ids = np.load(pathlib.Path(data_dir) / m["vocab_ids"])
  return [b"" if t == PAD_ID else natural[int(t)] for t in ids]


def decode(data_dir, ids: Iterable[int], encoding=None) -> str:
  """Text of data ids (for looking at samples)."""
  tb = token_bytes(data_dir, encoding)
  return b"".join(tb[int(i)] for i in ids).decode("utf-8", errors="replace")
