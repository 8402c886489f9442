"""o200k_base loaded offline: the tokenizer tools' names for what lightning_jax/vocab.py holds
(the library's one home of the loader, the content hash and the token byte lists)."""
from __future__ import annotations

from lightning_jax.vocab import (ENDOFPROMPT, ENDOFTEXT, O200K_PATTERN, O200K_SHA256,
                                 O200K_SPECIALS, TokenizerFileError, bundled_o200k_path,
                                 load_o200k_base, load_ranks, token_bytes_list)

__all__ = ["ENDOFPROMPT", "ENDOFTEXT", "O200K_PATTERN", "O200K_SHA256", "O200K_SPECIALS",
           "TokenizerFileError", "bundled_o200k_path", "load_o200k_base", "load_ranks",
           "token_bytes_list"]
