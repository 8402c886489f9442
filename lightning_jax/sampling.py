"""Token sampling and the generation loop over lightning_jax.decode.

`sample(logits, key, temperature, top_k, top_p, allowed)` picks one token per row:
temperature 0 is greedy (argmax); otherwise logits / temperature, then (optionally) only the
top_k most likely tokens, then (optionally) the smallest set of most likely tokens whose
probability reaches top_p (nucleus), then a categorical draw. `allowed` (bool [V]) masks ids that
are not tokens (the padding ids of a frequency-ordered compact vocabulary).

`generate` prefills the prompts as one right-padded batch, then runs the compiled one-token step
(decode.Decoder) until every row has produced max_new_tokens tokens or its end-of-text token,
calling `on_tokens(step, tokens, done)` after every step (the CLI streams text from it).
"""
from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from lightning_jax import decode


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  temperature: float = 1.0    # 0: greedy
  top_k: int = 0              # 0: off
  top_p: float = 1.0          # 1: off
  seed: int = 0

  def check(self):
    if not self.temperature >= 0:
      raise decode.GenerationError(f"temperature={self.temperature} is below zero; expected 0 "
                                   f"(greedy) or a positive temperature such as 0.8.")
    if self.top_k < 0:
      raise decode.GenerationError(f"top_k={self.top_k} is negative; expected 0 (off) or a "
                                   f"positive number of tokens.")
    if not 0.0 < self.top_p <= 1.0:
      raise decode.GenerationError(f"top_p={self.top_p} is outside (0, 1]; expected e.g. 0.9 "
                                   f"(1 = off).")
    return self


def sample(logits, key, temperature: float, top_k: int = 0, top_p: float = 1.0, allowed=None):
  """One token id per row of logits [B, V] (float32); the settings are static Python numbers."""
  lg = logits.astype(jnp.float32)
  if allowed is not None:
    lg = jnp.where(allowed[None, :], lg, -jnp.inf)
  if temperature == 0:
    return jnp.argmax(lg, axis=-1).astype(jnp.int32)
  lg = lg / temperature
  v = lg.shape[-1]
  if 0 < top_k < v:
    kth = jax.lax.top_k(lg, top_k)[0][:, -1:]
    lg = jnp.where(lg < kth, -jnp.inf, lg)
  if top_p < 1.0:
    order = jnp.argsort(-lg, axis=-1)
    sorted_lg = jnp.take_along_axis(lg, order, axis=-1)
    probs = jax.nn.softmax(sorted_lg, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs          # mass of the more likely tokens
    keep_sorted = before < top_p                         # the most likely token is always kept
    keep = jnp.zeros_like(keep_sorted).at[jnp.arange(lg.shape[0])[:, None], order].set(
        keep_sorted)
    lg = jnp.where(keep, lg, -jnp.inf)
  return jax.random.categorical(key, lg, axis=-1).astype(jnp.int32)


@dataclasses.dataclass
class Generation:
  tokens: list            # per prompt: the new token ids (up to and including end-of-text)
  logits: list | None     # per step: float32 [B, V] numpy (return_logits=True only)
  prefill_s: float
  decode_s: float
  steps: int


def generate(variables, cfg, prompts: list, max_new_tokens: int, params: SamplingParams,
             *, eot_id: int | None = None, allowed=None, mesh=None, decoder=None,
             max_len: int | None = None, on_tokens=None, return_logits: bool = False):
  """Continue each prompt (a list of token ids) by up to max_new_tokens tokens.

  The batch is padded to a multiple of the mesh's data x expert devices with copies of the
  first prompt (their output is dropped). Returns a Generation.
  """
  params.check()
  if not prompts:
    raise decode.GenerationError("no prompts were given; expected at least one.")
  lens = [len(p) for p in prompts]
  if min(lens) < 1:
    raise decode.GenerationError(f"prompt {lens.index(0)} is empty; expected at least one token "
                                 f"to continue from.")
  if max_new_tokens < 1:
    raise decode.GenerationError(f"max_new_tokens={max_new_tokens}; expected at least 1.")
  ctx = int(cfg.model.max_seq_len)
  longest = max(lens)
  if longest > ctx:
    i = lens.index(longest)
    raise decode.GenerationError(f"prompt {i} is {longest} tokens, longer than the model's context "
                                 f"of model.max_seq_len={ctx} tokens.")
  need = longest + max_new_tokens
  if need > ctx:
    raise decode.GenerationError(f"the longest prompt ({longest} tokens) plus max_new_tokens="
                                 f"{max_new_tokens} needs {need} positions, more than the model's "
                                 f"context of model.max_seq_len={ctx}; ask for at most "
                                 f"{ctx - longest} new tokens.")
  n = len(prompts)
  mult = decode.batch_multiple(mesh)
  b = -(-n // mult) * mult
  rows = list(prompts) + [prompts[0]] * (b - n)
  P = longest
  ids = np.zeros((b, P), np.int32)
  for i, p in enumerate(rows):
    ids[i, :len(p)] = p
  lengths = np.asarray([len(p) for p in rows], np.int32)
  L = max_len or need
  if decoder is None:
    decoder = decode.Decoder(cfg, b, L, mesh=mesh)
  allowed_arr = None if allowed is None else jnp.asarray(allowed, bool)
  pick = jax.jit(functools.partial(sample, temperature=float(params.temperature),
                                   top_k=int(params.top_k), top_p=float(params.top_p)))
  key = jax.random.PRNGKey(params.seed)

  t0 = time.perf_counter()
  logits, cache = decoder.prefill(variables, ids, lengths)
  tok = pick(logits, jax.random.fold_in(key, 0), allowed=allowed_arr)
  tok_np = np.asarray(jax.device_get(tok))
  t1 = time.perf_counter()
  out = [[] for _ in range(n)]
  done = np.zeros(b, bool)
  all_logits = [np.asarray(logits)] if return_logits else None
  pos = lengths.copy()
  steps = 0
  while True:
    for i in range(n):
      if not done[i]:
        out[i].append(int(tok_np[i]))
    newly = np.array([(eot_id is not None and int(tok_np[i]) == eot_id) or
                      len(out[i]) >= max_new_tokens if i < n else True for i in range(b)])
    emitted = np.where(done, -1, tok_np)
    done = done | newly
    if on_tokens is not None:
      on_tokens(steps, emitted[:n], done[:n])
    steps += 1
    if done[:n].all():
      break
    logits, cache = decoder.step(variables, cache, tok, pos)
    if return_logits:
      all_logits.append(np.asarray(logits))
    tok = pick(logits, jax.random.fold_in(key, steps), allowed=allowed_arr)
    tok_np = np.asarray(jax.device_get(tok))
    pos = pos + 1
  t2 = time.perf_counter()
  return Generation(tokens=out, logits=all_logits, prefill_s=t1 - t0, decode_s=t2 - t1,
                    steps=steps)
