"""Turn .txt / .jsonl files into uint32 token shards with a manifest and a per-domain held-out split.

  python -m launch.prepare_data --input corpus --output data/tiny
  python -m launch.prepare_data --input my_docs/ extra.jsonl --output data/mine --id_order natural

.txt: one document per file. .jsonl: one document per line ({"text": ..., "domain"?: ...}).
The domain of a file is its first directory below an --input directory (else its file stem).
Tokenizer: o200k_base loaded offline (lightning_jax/vocab.py), or `--tokenizer brahmic` for the built
BrahmicTokenizer-131K (tokenizer/brahmic131k, or --tokenizer_path DIR from `python -m tokenizer.build`).
The data's id order (--id_order) is applied on top of the tokenizer's own ids. See lightning_jax/data/shards.py.
"""
from __future__ import annotations

import sys

from absl import app, flags
from ml_collections import ConfigDict

from lightning_jax import vocab
from lightning_jax.data.shards import DataError, prepare

flags.DEFINE_multi_string("input", None, "Directories or .txt/.jsonl files (repeatable; "
                          "several values may follow one --input).", required=True)
flags.DEFINE_string("output", None, "Output directory for shards + manifest.json.", required=True)
flags.DEFINE_enum("id_order", "frequency", ["frequency", "natural"],
                  "frequency: renumber seen tokens by count (compact vocabulary); natural: "
                  "tokenizer ids.")
flags.DEFINE_float("val_fraction", 0.05, "Fraction of each domain's documents held out.")
flags.DEFINE_integer("seed", 0, "Seed of the held-out split.")
flags.DEFINE_integer("shard_tokens", 1 << 24, "Tokens per shard file at most.")
flags.DEFINE_integer("vocab_multiple", 128, "Compact vocabulary size is rounded up to this.")
flags.DEFINE_enum("tokenizer", "o200k_base", ["o200k_base", "brahmic"], "Tokenizer to encode with.")
flags.DEFINE_string("tokenizer_path", "", "Built tokenizer directory for --tokenizer brahmic "
                    "(default: the committed tokenizer/brahmic131k).")
FLAGS = flags.FLAGS


def main(argv):
  inputs = list(FLAGS.input) + list(argv[1:])
  try:
    encoding = None
    if FLAGS.tokenizer != "o200k_base":
      encoding = vocab.load(ConfigDict({"name": FLAGS.tokenizer, "path": FLAGS.tokenizer_path,
                                        "id_order": "natural"})).encoding
    prepare(inputs, FLAGS.output, encoding=encoding, id_order=FLAGS.id_order, val_fraction=FLAGS.val_fraction,
            seed=FLAGS.seed, shard_tokens=FLAGS.shard_tokens, vocab_multiple=FLAGS.vocab_multiple)
  except DataError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  app.run(main)
