"""Tokenizers: o200k_base offline (base.py) and BrahmicTokenizer-131K (build.py, SPEC §7).

`load(cfg.tokenizer)` is what the training and data code call:
  tokenizer.name     "o200k_base" | "brahmic" (a built tokenizer directory)
  tokenizer.path     the built directory; "" = the committed tokenizer/brahmic131k
  tokenizer.id_order "natural" | "frequency" (the permutation saved beside a built tokenizer)
"""
from __future__ import annotations

import dataclasses
import pathlib

import numpy as np

DEFAULT_BRAHMIC_DIR = pathlib.Path(__file__).resolve().parent / "brahmic131k"


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
    from tokenizer.base import token_bytes_list
    natural = token_bytes_list(self.encoding)
    if self.old_from_new is None:
      return natural
    return [natural[int(i)] for i in self.old_from_new]


def load(cfg) -> Tokenizer:
  """The tokenizer that `cfg` (the config's `tokenizer` section) names; see the module docstring."""
  from lightning_jax.config import ConfigError
  from tokenizer import artifacts, base
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
    return Tokenizer(base.load_o200k_base())
  if name not in ("brahmic", "brahmic131k"):
    raise ConfigError(f"tokenizer.name={name!r}; expected 'o200k_base' or 'brahmic'.")
  d = pathlib.Path(path) if path else DEFAULT_BRAHMIC_DIR
  if not (d / artifacts.META).exists():
    raise ConfigError(f"tokenizer.path={str(d)!r} holds no built tokenizer ({artifacts.META}); "
                      "expected the --out directory of `python -m tokenizer.build`.")
  enc = artifacts.load_encoding(d)
  if order == "natural":
    return Tokenizer(enc, "natural", None, None, str(d))
  nfo, ofn = artifacts.load_id_order(d)
  if len(nfo) != enc.n_vocab:
    raise ConfigError(f"tokenizer.path={str(d)!r}: the id permutation has {len(nfo)} ids but the "
                      f"encoding {enc.n_vocab}; expected equal (rebuild the tokenizer).")
  return Tokenizer(enc, "frequency", nfo, ofn, str(d))
