"""Score files with a trained run: per-file and per-domain mean cross-entropy, perplexity, bits/byte.

  python -m launch.score RUN --input FILE_OR_DIR [--input ...] [--step N] [--out scores.json]
  python -m launch.score runs/tiny --input corpus/en --input corpus/hi
  python -m launch.score runs/tiny --input runs/tiny/data --split val   # prepared shards

Inputs: .txt files (one document each), .jsonl files (one {"text": ...} document per line), a
directory of them, or a prepared data directory (manifest.json; its shards of --split, by
domain). A file's domain is its first directory below the input directory (as prepare_data has
it), or the input directory's own name for the files directly in it (`--input corpus/en`: "en"),
or a single file's parent directory name.
Windows, padding and bits per byte: lightning_jax/scoring.py. Prints a table and writes the
JSON (--out, default RUN/scores/<step>.json): {"run", "step", "seq_len", "files": {path:
{"domain", "tokens", "bytes", "ce", "perplexity", "bits_per_byte"}}, "domains": {...}, "total"}.
"""
from __future__ import annotations

import pathlib
import sys

from absl import flags
import numpy as np

from lightning_jax import checkpoint as ck
from lightning_jax import inference
from lightning_jax import scoring
from lightning_jax.config import ConfigError
from lightning_jax.data import shards
from lightning_jax.data.shards import DataError
from lightning_jax.decode import GenerationError


def _token_streams(inputs, vocab, split: str):
  """[(name, domain, tokens)] of every input."""
  out = []
  for item in inputs:
    p = pathlib.Path(item)
    if p.is_dir() and (p / shards.MANIFEST).exists():
      man = shards.load_manifest(p)
      _check_same_vocab(man, p, vocab)
      entries = shards.shards_of(man, split)
      if not entries:
        raise shards.DataError(f"{p} has no {split!r} shards; expected --split train or val.")
      for e in entries:
        out.append((str(p / e["file"]), e["domain"], np.asarray(shards.open_shard(p, e), np.int64)))
      continue
    for path, root in shards.iter_input_files([str(p)]):
      rel = path.relative_to(root).parts if root is not None else ()
      domain = rel[0] if len(rel) > 1 else (root.name if root is not None else path.parent.name)
      docs = shards.read_documents([str(path)])
      toks = [t for d in docs for t in vocab.encode_document(d.text)]
      out.append((str(path), domain, np.asarray(toks, np.int64)))
  return out


def _check_same_vocab(man, where, vocab):
  src = pathlib.Path(vocab.source)
  if src.exists() and src.resolve() == where.resolve():
    return
  ids = None
  if man.get("vocab_ids"):
    ids = np.load(where / man["vocab_ids"]).astype(np.int64)
  same = (man["vocab_size"] == vocab.size and man["tokenizer"] == vocab.encoding.name and
          ((ids is None and vocab.data_to_tok is None) or
           (ids is not None and vocab.data_to_tok is not None and np.array_equal(ids, vocab.data_to_tok))))
  if not same:
    raise GenerationError(f"the shards in {where} use another vocabulary ({man['tokenizer']}, "
                          f"{man['vocab_size']} ids, {man.get('id_order')} order) than the run "
                          f"({vocab.source}); score the raw .txt/.jsonl files instead.")


def score(run, inputs, *, seq_len=None, batch=None, split="val", log=print) -> dict:
  vocab = run.vocab
  nbytes = vocab.n_bytes()
  sc = scoring.Scorer(run.cfg, run.variables, seq_len=seq_len, batch=batch, mesh=run.mesh)
  files, dom_acc = {}, {}
  for name, domain, toks in _token_streams(inputs, vocab, split):
    if len(toks) and int(toks.max()) >= vocab.size:
      raise scoring_error(name, int(toks.max()), vocab.size)
    sums, counts, tgt, msk = sc.window_scores(toks)
    nll, n = float(sums.sum()), int(counts.sum())
    nb = int((nbytes[tgt] * (msk > 0)).sum())
    files[name] = {"domain": domain, **scoring.summary(nll, n, nb)}
    a = dom_acc.setdefault(domain, [0.0, 0, 0])
    a[0] += nll
    a[1] += n
    a[2] += nb
    log(f"{name}: {n} tokens, CE {files[name]['ce']:.4f}")
  domains = {d: scoring.summary(*a) for d, a in sorted(dom_acc.items())}
  tot = [sum(a[i] for a in dom_acc.values()) for i in range(3)]
  return {"step": run.step, "seq_len": sc.seq_len, "files": files, "domains": domains,
          "total": scoring.summary(*tot)}


def scoring_error(name, bad, size):
  return GenerationError(f"{name} holds token id {bad}, outside the run's vocabulary of {size} ids.")


def table(res) -> str:
  rows = [f"{'domain':<14} {'tokens':>10} {'CE':>8} {'ppl':>10} {'bits/byte':>10}"]
  for d, s in list(res["domains"].items()) + [("TOTAL", res["total"])]:
    rows.append(f"{d:<14} {s['tokens']:>10,} {s['ce']:>8.4f} {s['perplexity']:>10.2f} "
                f"{s['bits_per_byte']:>10.4f}")
  return "\n".join(rows)


def main(argv):
  F = flags.FLAGS
  if len(argv) != 2:
    print("error: expected one run directory, e.g. python -m launch.score runs/tiny --input "
          "corpus/en.", file=sys.stderr)
    return 2
  if not F.input:
    print("error: no --input was given; expected a .txt/.jsonl file, a directory of them or a "
          "prepared data directory.", file=sys.stderr)
    return 2
  try:
    run = inference.load_run(argv[1], step=F.step, mesh=F.mesh, data=F.data or None,
                             tokenizer=F.tokenizer or None)
    res = score(run, F.input, seq_len=F.seq_len or None, batch=F.batch or None, split=F.split)
  except (ConfigError, ck.CheckpointError, DataError, GenerationError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  res = {"run": str(pathlib.Path(argv[1]).absolute()), **res}
  out = F.out or str(inference.locate(argv[1])[0].parent / "scores" / f"{run.step}.json")
  inference.write_json(out, res)
  print(table(res))
  print(f"wrote {out}")
  return 0


def _define_flags():
  flags.DEFINE_multi_string("input", [], "A .txt/.jsonl file, a directory of them, or a prepared "
                            "data directory (repeatable).")
  flags.DEFINE_integer("step", -1, "Checkpoint step to use (default: the newest).")
  flags.DEFINE_integer("seq_len", 0, "Window length in tokens (default: the run's train.seq_len).")
  flags.DEFINE_integer("batch", 0, "Windows per forward (default: the run's train.eval_batch).")
  flags.DEFINE_string("split", "val", "For prepared data directories: the split to score.")
  flags.DEFINE_string("out", "", "JSON output file (default RUN/scores/<step>.json).")
  flags.DEFINE_string("data", "", "The run's prepared data directory (default: the config's "
                      "data.path, else RUN/data): its vocabulary maps text to the model's ids.")
  flags.DEFINE_string("tokenizer", "", "Tokenizer name; must match the run's (default: the run's).")
  flags.DEFINE_string("mesh", "auto", "auto: the run's mesh.expert x mesh.tensor layout when this "
                      "host has the devices for it (the sharded 120B); none: one device.")


if __name__ == "__main__":
  from absl import app, logging as absl_logging
  absl_logging.set_verbosity(absl_logging.ERROR)
  _define_flags()
  app.run(lambda argv: sys.exit(main(argv)))
