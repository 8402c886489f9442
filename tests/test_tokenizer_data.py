"""The data pipeline switches to the BrahmicTokenizer by config (no model compile: fast)."""
import numpy as np
from ml_collections import ConfigDict

import tokenizer as tokenizer_lib
from lightning_jax.data import shards


def test_prepare_with_brahmic_tokenizer(tmp_path):
  src = tmp_path / "hi"
  src.mkdir()
  text = "भारत एक विशाल देश है। यहाँ अनेक भाषाएँ बोली जाती हैं।"
  (src / "a.txt").write_text(text, encoding="utf-8")
  (src / "b.txt").write_text("ଓଡ଼ିଆ ଭାଷା " + text, encoding="utf-8")
  tok = tokenizer_lib.load(ConfigDict({"name": "brahmic", "path": "", "id_order": "natural"}))
  m = shards.prepare([str(src)], str(tmp_path / "out"), encoding=tok.encoding, id_order="natural",
                     val_fraction=0.0, log=lambda *_: None)
  assert m["tokenizer"] == tok.encoding.name == "brahmic131k"
  assert m["vocab_size"] == 131072
  # the shard holds exactly the Brahmic encoding of the documents (with end-of-text separators)
  ids = np.concatenate([np.fromfile(tmp_path / "out" / s["file"], np.uint32)
                        for s in m["shards"] if s["split"] == "train"])
  expect = {tuple(tok.encoding.encode_ordinary(t)) for t in (text, "ଓଡ଼ିଆ ଭାଷା " + text)}
  pieces = np.split(ids, np.where(ids == tok.encoding.eot_token)[0])
  docs = {tuple(int(t) for t in p if t != tok.encoding.eot_token) for p in pieces}
  docs.discard(())
  assert docs == expect
  # the Kronecker byte buffers follow the same ids
  tb = shards.token_bytes(str(tmp_path / "out"))
  some = int(ids[0])
  assert tb[some] == tok.encoding.decode_single_token_bytes(some)
