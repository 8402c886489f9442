"""Decoding speed with the recurrent state (lightning_jax/decode.py), written as JSON.

    python -m benchmarks.decode_bench --out decode_bench.json              # stage_2b, one GPU
    python -m benchmarks.decode_bench --tiny --out /tmp/decode_tiny.json   # configs/tiny.py, CPU

Random weights of the config's shapes (speed does not depend on the values; the codec is built
from a synthetic byte vocabulary of model.vocab_size tokens). Measured, each after a compile
and a warm-up call, as the median over --repeat timed runs:
  * decode tokens/s at batch 1 and 32 (--batches): --new_tokens one-token steps after a prompt of
    --decode_context tokens, greedy next token fed back on the device (one host sync at the end);
  * prefill tokens/s of one --prefill_context-token prompt (batch 1);
  * per-token decode cost (ms) at batch 1 after prompts of each --contexts length (1K vs 8K): the
    DeltaNet state is the same size at any length; GSA's indexer scores every cached key and
    attention gathers at most k_max of them.
model.max_seq_len is raised to fit the longest context. --params_dtype bfloat16 also measures
with the >= 2-D float parameters stored in bfloat16 (the layers cast them to the compute dtype at
use anyway; the 1-D ones, norm scales, decay and biases, stay float32).
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from lightning_jax import decode, metrics, model
from lightning_jax.config import load_config


def synthetic_vocab(n: int) -> list:
  """n distinct byte strings of 1-4 bytes (the Kronecker codec's input)."""
  out, i = [], 0
  while len(out) < n:
    k = 1 + (i % 4)
    out.append(bytes((i * 7 + j * 31) % 256 for j in range(k)) + i.to_bytes(4, "little")[:k])
    i += 1
  return [b[:32] for b in out]


def build(cfg, seed=0):
  return model.init_variables(cfg, jax.random.PRNGKey(seed), synthetic_vocab(cfg.model.vocab_size))


def cast_params(variables, dtype):
  def c(a):
    return a.astype(dtype) if (jnp.issubdtype(a.dtype, jnp.floating) and a.ndim >= 2) else a
  return {**variables, "params": jax.tree_util.tree_map(c, variables["params"])}


def _timed(fn, repeat):
  fn()                                   # warm-up (after the compile)
  ts = []
  for _ in range(repeat):
    t0 = time.perf_counter()
    fn()
    ts.append(time.perf_counter() - t0)
  return statistics.median(ts), ts


def measure(cfg, variables, *, batches, decode_context, new_tokens, prefill_context, contexts,
            repeat, log=print):
  out = {}
  V = cfg.model.vocab_size
  rng = np.random.default_rng(0)
  argmax = jax.jit(lambda lg: jnp.argmax(lg, -1).astype(jnp.int32))

  def decode_run(b, ctx):
    L = ctx + new_tokens + 1
    dec = decode.Decoder(cfg, b, L)
    ids = rng.integers(0, V, (b, ctx)).astype(np.int32)
    lens = np.full(b, ctx, np.int32)
    t0 = time.perf_counter()
    lg, cache = dec.prefill(variables, ids, lens)
    jax.block_until_ready(lg)
    compile_prefill = time.perf_counter() - t0

    def steps():
      nonlocal_cache = dec.prefill(variables, ids, lens)
      lg, c = nonlocal_cache
      tok = argmax(lg)
      pos = jnp.asarray(lens)
      jax.block_until_ready((tok, c))
      t0 = time.perf_counter()
      for _ in range(new_tokens):
        lg, c = dec.step(variables, c, tok, pos)
        tok = argmax(lg)
        pos = pos + 1
      jax.block_until_ready(tok)
      return time.perf_counter() - t0

    t0 = time.perf_counter()
    steps()                                 # compiles the step
    compile_step = time.perf_counter() - t0
    ts = [steps() for _ in range(repeat)]
    med = statistics.median(ts)
    rec = {"batch": b, "context": ctx, "new_tokens": new_tokens, "cache_len": L,
           "step_ms": 1e3 * med / new_tokens, "tokens_per_s": b * new_tokens / med,
           "runs_s": ts, "first_call_s": {"prefill": compile_prefill, "steps": compile_step},
           "cache_bytes": decode.cache_bytes(dec.cfg, b, L)}
    log(f"decode batch {b} context {ctx}: {rec['step_ms']:.3f} ms/step, "
        f"{rec['tokens_per_s']:.1f} tokens/s")
    return rec

  out["decode"] = [decode_run(b, decode_context) for b in batches]
  # prefill
  dec = decode.Decoder(cfg, 1, prefill_context + 1)
  ids = rng.integers(0, V, (1, prefill_context)).astype(np.int32)
  lens = np.full(1, prefill_context, np.int32)
  t0 = time.perf_counter()
  jax.block_until_ready(dec.prefill(variables, ids, lens))
  first = time.perf_counter() - t0
  med, ts = _timed(lambda: jax.block_until_ready(dec.prefill(variables, ids, lens)), repeat)
  out["prefill"] = {"batch": 1, "context": prefill_context, "s": med,
                    "tokens_per_s": prefill_context / med, "runs_s": ts, "first_call_s": first}
  log(f"prefill {prefill_context} tokens: {med * 1e3:.1f} ms, {prefill_context / med:.0f} tokens/s")
  out["per_token_by_context"] = [decode_run(1, c) for c in contexts]
  return out


def main(argv=None):
  ap = argparse.ArgumentParser(prog="python -m benchmarks.decode_bench",
                               description=__doc__.splitlines()[0])
  ap.add_argument("--config", default="configs/stage_2b.py", help="Config file (stage).")
  ap.add_argument("--tiny", action="store_true", help="configs/tiny.py at CPU sizes (contexts "
                  "64/512, prefill 256, batches 1 and 4, 16 new tokens) to check the script.")
  ap.add_argument("--batches", default="1,32", help="Decode batch sizes.")
  ap.add_argument("--decode_context", type=int, default=1024, help="Prompt tokens before the "
                  "timed decode steps.")
  ap.add_argument("--new_tokens", type=int, default=128, help="Timed decode steps per run.")
  ap.add_argument("--prefill_context", type=int, default=4096, help="Prefill prompt length.")
  ap.add_argument("--contexts", default="1024,8192", help="Contexts for the per-token cost.")
  ap.add_argument("--repeat", type=int, default=3, help="Timed runs per measurement (median).")
  ap.add_argument("--params_dtype", default="", help="Also measure with >= 2-D params in this "
                  "dtype (e.g. bfloat16).")
  ap.add_argument("--out", default="decode_bench.json", help="JSON output file.")
  ap.add_argument("--commit", default="", help="Commit to record (default: the checkout's HEAD).")
  a = ap.parse_args(argv)
  if a.tiny:
    a.config, a.batches, a.decode_context, a.new_tokens = "configs/tiny.py", "1,4", 64, 16
    a.prefill_context, a.contexts, a.repeat = 256, "64,512", 2
  cfg = load_config(a.config)
  contexts = [int(x) for x in a.contexts.split(",")]
  need = max(contexts + [a.decode_context, a.prefill_context]) + a.new_tokens + 1
  with cfg.unlocked():
    cfg.model.max_seq_len = max(int(cfg.model.max_seq_len), need)
    cfg.train.seq_len = min(int(cfg.train.seq_len), cfg.model.max_seq_len)
    if a.tiny:
      cfg.model.vocab_size = 4096
  t0 = time.perf_counter()
  variables = build(cfg)
  jax.block_until_ready(variables)
  print(f"init {time.perf_counter() - t0:.1f}s; devices {jax.devices()}")
  kw = dict(batches=[int(x) for x in a.batches.split(",")], decode_context=a.decode_context,
            new_tokens=a.new_tokens, prefill_context=a.prefill_context, contexts=contexts,
            repeat=a.repeat)
  res = {"config": a.config, "stage": cfg.stage, "date": datetime.date.today().isoformat(),
         "commit": a.commit or metrics.git_commit(),
         "device": str(jax.devices()[0].device_kind), "n_devices": jax.device_count(),
         "backend": jax.default_backend(), "jax": jax.__version__, "host": platform.node(),
         "dtype": cfg.model.dtype, "deltanet_impl": cfg.model.deltanet.impl,
         "gsa_attention": cfg.model.gsa.attention, "settings": kw,
         "params_float32": measure(cfg, variables, **kw)}
  if a.params_dtype:
    print(f"--- params in {a.params_dtype}")
    res[f"params_{a.params_dtype}"] = measure(cfg, cast_params(variables, a.params_dtype), **kw)
  with open(a.out, "w") as f:
    json.dump(res, f, indent=1)
  print(f"wrote {a.out}")


if __name__ == "__main__":
  main()
