"""Tokenizers: o200k_base offline and BrahmicTokenizer-131K (build.py, SPEC §7).

The loading half (o200k_base offline, a built directory, `load(cfg.tokenizer)`) is the library's:
lightning_jax/vocab.py. This package holds the tools that build, check and measure tokenizers
(build, check, fertility, crop, retrofit, bpe, scripts, corpus_extract) and re-exports the names
they and older callers use.
"""
from __future__ import annotations

from lightning_jax.vocab import DEFAULT_BRAHMIC_DIR, Tokenizer, load

__all__ = ["DEFAULT_BRAHMIC_DIR", "Tokenizer", "load"]
