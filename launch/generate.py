"""Generate text with a trained run, decoding with the model's own recurrent state.

  python -m launch.generate RUN --prompt "def main(" [--max_new_tokens 64] [--temperature 0.8]
  python -m launch.generate RUN --prompts prompts.txt --greedy --out completions.jsonl
  python -m launch.generate RUN --step 25 --prompt "The " --top_p 0.9 --top_k 50 --seed 1

RUN is a launch.train run directory (or one of its checkpoints/<step>, a grown run, launch.ema's
output, imported weights). --prompts FILE: one prompt per line (.txt; write "\\n" for a newline
inside a prompt) or {"prompt": ...} per line (.jsonl). All prompts run as one batch: a prefill
pass over the prompts (chunked delta rule, sparse attention writing its caches), then one token
per step for every row (lightning_jax/decode.py). With one prompt the text streams to the
terminal as it comes; with several, each completion is printed as soon as its row ends
(end-of-text or --max_new_tokens). Sampling: --temperature 0 (or --greedy) is greedy, else
temperature, then --top_k, then --top_p (nucleus). --out writes {"prompt", "completion",
"tokens"} per prompt as JSON lines.
"""
from __future__ import annotations

import codecs
import json
import pathlib
import sys
import time

from absl import flags

from lightning_jax import checkpoint as ck
from lightning_jax import inference, sampling
from lightning_jax.config import ConfigError
from lightning_jax.data.shards import DataError
from lightning_jax.decode import GenerationError


def read_prompts(prompt: str | None, path: str | None) -> list[str]:
  if prompt and path:
    raise GenerationError("both --prompt and --prompts were given; expected one of them.")
  if prompt:
    return [prompt]
  if not path:
    raise GenerationError("no prompt was given; expected --prompt \"text\" or --prompts FILE.")
  p = pathlib.Path(path)
  if not p.is_file():
    raise GenerationError(f"--prompts {p} does not exist; expected a .txt file with one prompt per "
                          f"line or a .jsonl file with {{\"prompt\": ...}} per line.")
  out = []
  for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
    if not line.strip():
      continue
    if p.suffix == ".jsonl":
      try:
        rec = json.loads(line)
      except json.JSONDecodeError as e:
        raise GenerationError(f"{p}:{n} is not valid JSON ({e.msg}); expected {{\"prompt\": ...}}.")
      if not isinstance(rec, dict) or not isinstance(rec.get("prompt", rec.get("text")), str):
        raise GenerationError(f"{p}:{n} has no string field \"prompt\"; expected "
                              f"{{\"prompt\": ...}} per line.")
      out.append(rec.get("prompt", rec.get("text")))
    else:
      out.append(line.replace("\\n", "\n"))
  if not out:
    raise GenerationError(f"--prompts {p} holds no prompt; expected one per line.")
  return out


class Printer:
  """Streams one row's text token by token; several rows are printed as each one ends."""

  def __init__(self, vocab, prompts, stream=sys.stdout):
    self.vocab, self.prompts, self.out = vocab, prompts, stream
    self.single = len(prompts) == 1
    self.dec = [codecs.getincrementaldecoder("utf-8")(errors="replace") for _ in prompts]
    self.text = ["" for _ in prompts]
    self.shown = [False] * len(prompts)
    if self.single:
      self.out.write(prompts[0])
      self.out.flush()

  def __call__(self, step, tokens, done):
    for i, t in enumerate(tokens):
      if t < 0 or self.shown[i]:
        continue
      piece = self.dec[i].decode(self.vocab.bytes_of([int(t)]))
      self.text[i] += piece
      if self.single and piece:
        self.out.write(piece)
        self.out.flush()
    for i, d in enumerate(done):
      if d and not self.shown[i]:
        self.text[i] += self.dec[i].decode(b"", final=True)
        self.shown[i] = True
        if self.single:
          self.out.write("\n")
        else:
          self.out.write(f"=== [{i}] ===\n{self.prompts[i]}{self.text[i]}\n")
        self.out.flush()


def main(argv):
  F = flags.FLAGS
  if len(argv) != 2:
    print("error: expected one run directory, e.g. python -m launch.generate runs/tiny --prompt "
          "\"def main(\".", file=sys.stderr)
    return 2
  try:
    params = sampling.SamplingParams(temperature=0.0 if F.greedy else F.temperature,
                                     top_k=F.top_k, top_p=F.top_p, seed=F.seed).check()
    prompts = read_prompts(F.prompt, F.prompts)
    log = (lambda *a, **k: print(*a, file=sys.stderr, **k))
    run = inference.load_run(argv[1], step=F.step, mesh=F.mesh, data=F.data or None,
                             tokenizer=F.tokenizer or None, log=log)
    ids = [run.vocab.encode(p) for p in prompts]
    printer = Printer(run.vocab, prompts)
    t0 = time.perf_counter()
    gen = sampling.generate(run.variables, run.cfg, ids, F.max_new_tokens, params,
                            eot_id=run.vocab.eot_id, allowed=run.vocab.allowed(), mesh=run.mesh,
                            on_tokens=printer)
  except (ConfigError, ck.CheckpointError, DataError, GenerationError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  n_new = sum(len(t) for t in gen.tokens)
  log(f"[{len(prompts)} prompt(s), {sum(map(len, ids))} prompt tokens, {n_new} new tokens; "
      f"prefill {gen.prefill_s:.2f}s, decode {gen.decode_s:.2f}s ({gen.steps} steps, "
      f"{n_new / max(gen.decode_s, 1e-9):.1f} tokens/s incl. compile); total "
      f"{time.perf_counter() - t0:.1f}s]")
  if F.out:
    p = pathlib.Path(F.out)
    p.parent.mkdir(parents=True, exist_ok=True)
    with open(p, "w", encoding="utf-8") as f:
      for pr, toks in zip(prompts, gen.tokens):
        f.write(json.dumps({"prompt": pr, "completion": run.vocab.decode(toks), "tokens": toks},
                           ensure_ascii=False) + "\n")
    log(f"wrote {p}")
  return 0


def _define_flags():
  flags.DEFINE_string("prompt", None, "One prompt (text).")
  flags.DEFINE_string("prompts", None, "A file of prompts: .txt one per line, .jsonl "
                      "{\"prompt\": ...} per line; all run as one batch.")
  flags.DEFINE_integer("step", -1, "Checkpoint step to use (default: the newest).")
  flags.DEFINE_integer("max_new_tokens", 64, "New tokens per prompt at most (a row also ends at "
                       "end-of-text).")
  flags.DEFINE_float("temperature", 1.0, "Sampling temperature; 0 = greedy.")
  flags.DEFINE_bool("greedy", False, "Greedy decoding (the same as --temperature 0).")
  flags.DEFINE_integer("top_k", 0, "Sample among the k most likely tokens only (0 = off).")
  flags.DEFINE_float("top_p", 1.0, "Nucleus sampling: the smallest set of most likely tokens "
                     "with this much probability (1 = off).")
  flags.DEFINE_integer("seed", 0, "Random seed of the sampling.")
  flags.DEFINE_string("out", "", "Write the completions as JSON lines to this file.")
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
