"""Using a trained model: recurrent-state decoding against the full forward, scoring against the
training loop's held-out evaluation, the CLIs and their bad-input sentences.

Exactness (float32): greedy decoding with the caches (prefill, then one token per step) gives the
same tokens as a naive loop that re-runs the full forward on the whole prefix at every step, with
logits within 1e-5 relative, for the tiny dense model and the tiny 120B-class model (reversible,
sigmoid-router MoE with its selection bias, TQP experts) on the 8-device mesh (data 2 x expert 4)
with the experts split over "expert". The naive loop runs the training forward with model.gsa.var_row="causal",
the rule decoding implements (lightning_jax/decode.py); the reference forward is evaluated on the
prefix padded to one fixed length, which a causal model's positions cannot see. For the dense
model the training rule "full_row" is checked too, on the unpadded final prefix.
"""
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny, tiny_120b
from lightning_jax import checkpoint as ck
from lightning_jax import decode, inference, model, nn, sampling, scoring, sharding
from lightning_jax.decode import GenerationError

REPO = pathlib.Path(__file__).resolve().parents[1]
VOCAB = 64
SEED = int(np.random.SeedSequence().entropy % (2 ** 31))


def _words(n):
  out = [bytes([32 + i]) for i in range(n - 4)] + ["नम".encode(), b" the", b"<|endoftext|>", b""]
  return out[:n]


def _leaf(path, shape, dtype, rng):
  """A random value for one parameter / frozen leaf, in the range its initialiser gives."""
  name, parent = path.split("/")[-1], path.split("/")[-2] if "/" in path else ""
  if name == "codes":                                    # TQP: packed 4-bit codebook indices
    return rng.integers(0, 256, shape).astype(dtype)
  if name == "signs":                                    # TQP: randomized Hadamard signs
    return rng.choice([-1, 1], shape).astype(dtype)
  if name == "norms":                                    # TQP: row norms of the base experts
    return rng.uniform(0.1, 0.3, shape).astype(dtype)
  if name in ("scale", "D"):
    return (1.0 + 0.1 * rng.standard_normal(shape)).astype(dtype)
  if name.startswith("a_"):                              # mHC coefficient scales
    return (0.1 + 0.02 * rng.standard_normal(shape)).astype(dtype)
  if name == "A_log":
    return np.log(rng.uniform(1.0, 16.0, shape)).astype(dtype)
  if parent.startswith("conv_"):
    return rng.uniform(-0.5, 0.5, shape).astype(dtype)
  if "adapters" in path:
    return (rng.standard_normal(shape) * (0.01 if name == "a" else 0.25)).astype(dtype)
  return (0.02 * rng.standard_normal(shape)).astype(dtype)


def _variables(cfg, codec, seed):
  """Random variables of cfg's shapes, drawn with numpy (model.init_variables compiles its whole
  initialiser, which costs more than these tests' forwards on CPU); the running statistics are set
  away from their initial values, as training leaves them."""
  rng = np.random.default_rng(seed)
  specs, fspecs = model._specs(cfg)
  draw = lambda t: {k: jnp.asarray(_leaf(k, s.shape, np.dtype(s.dtype), rng))
                    for k, s in nn.flatten(t).items()}
  params, fz = nn.unflatten(draw(specs)), nn.unflatten(draw(fspecs)) if fspecs else {}
  frozen = {"embed": model._codec_frozen(codec, cfg), **fz}
  stats = model.init_stats(cfg)
  for lj, st in stats["groups"].items():
    if "mixer" in st:      # GSA variance EMA: budgets between k_min and k_max for these scores
      st["mixer"]["var_ema"] = jnp.asarray(rng.uniform(3e-5, 8e-5, st["mixer"]["var_ema"].shape),
                                           jnp.float32)
    if "moe" in st:        # the sigmoid router's trained selection bias
      st["moe"]["bias"] = jnp.asarray(rng.normal(0, 0.05, st["moe"]["bias"].shape), jnp.float32)
  return {"params": params, "frozen": frozen, "stats": stats}


def _naive_greedy(variables, cfg, prompts, n_new, L):
  """Greedy decoding by re-running the full forward on the whole prefix at every step."""
  fwd = jax.jit(lambda v, x: model.logits(v["params"], model.forward(
      v["params"], v["frozen"], v["stats"], x, cfg, with_mtp=False)["h"], cfg))
  seqs = [list(p) for p in prompts]
  toks, logits = [[] for _ in prompts], []
  for _ in range(n_new):
    ids = np.zeros((len(seqs), L), np.int32)
    for i, s in enumerate(seqs):
      ids[i, :len(s)] = s
    lg = np.asarray(fwd(variables, jnp.asarray(ids)))
    last = np.stack([lg[i, len(s) - 1] for i, s in enumerate(seqs)])
    logits.append(last)
    for i, t in enumerate(np.argmax(last, -1)):
      seqs[i].append(int(t))
      toks[i].append(int(t))
  return toks, logits


def _check_exact(variables, cfg, prompts, n_new, mesh=None, full_row_cfg=None):
  causal = cfg.copy_and_resolve_references()
  causal.model.gsa.var_row = "causal"
  L = max(map(len, prompts)) + n_new
  dec = decode.Decoder(cfg, -(-len(prompts) // decode.batch_multiple(mesh))
                       * decode.batch_multiple(mesh), L, mesh=mesh)
  gen = sampling.generate(variables, cfg, prompts, n_new, sampling.SamplingParams(temperature=0),
                          mesh=mesh, decoder=dec, return_logits=True)
  ref_tok, ref_lg = _naive_greedy(jax.device_get(variables), causal, prompts, n_new, L)
  assert gen.tokens == ref_tok, f"seed {SEED}: {gen.tokens} != {ref_tok}"
  for step, (a, b) in enumerate(zip(gen.logits, ref_lg)):
    a = a[:len(prompts)]
    err = np.max(np.abs(a - b)) / np.max(np.abs(b))
    assert err < 1e-5, f"seed {SEED}: step {step}: relative logit error {err:.2e}"
  # prefill: the logits at every prompt position equal the full forward's
  P = max(map(len, prompts))
  ids = np.zeros((dec.batch, P), np.int32)
  lens = np.zeros(dec.batch, np.int32)
  for i in range(dec.batch):
    p = prompts[i % len(prompts)]
    ids[i, :len(p)], lens[i] = p, len(p)
  all_lg, _ = dec.prefill(variables, ids, lens, all_logits=True)
  fwd = jax.jit(lambda v, x: model.logits(v["params"], model.forward(
      v["params"], v["frozen"], v["stats"], x, causal, with_mtp=False)["h"], causal))
  full = np.asarray(fwd(jax.device_get(variables), jnp.asarray(ids)))
  for i in range(len(prompts)):
    n = len(prompts[i])
    err = np.max(np.abs(np.asarray(all_lg)[i, :n] - full[i, :n])) / np.max(np.abs(full[i, :n]))
    assert err < 1e-5, f"seed {SEED}: prefill row {i}: relative logit error {err:.2e}"
  if full_row_cfg is not None:   # the training rule: the final prefix's last position
    seq = list(prompts[0]) + gen.tokens[0][:-1]
    f = jax.jit(lambda v, x: model.logits(v["params"], model.forward(
        v["params"], v["frozen"], v["stats"], x, full_row_cfg, with_mtp=False)["h"], full_row_cfg))
    want = np.asarray(f(variables, jnp.asarray([seq], jnp.int32)))[0, -1]
    err = np.max(np.abs(gen.logits[-1][0] - want)) / np.max(np.abs(want))
    assert err < 1e-5, f"seed {SEED}: full_row last position: relative logit error {err:.2e}"
  return gen


def _prompts(rng, lens):
  return [rng.integers(0, VOCAB - 2, n).tolist() for n in lens]


def test_greedy_decoding_matches_full_forward_dense():
  cfg = tiny.get_config()
  cfg.model.vocab_size = VOCAB
  cfg.model.pattern, cfg.model.n_layers = "DG", 2   # one layer of each kind (the 120B-class
                                                    # case below decodes across two groups)
  assert cfg.model.gsa.var_row == "full_row" and cfg.model.pattern[-1] == "G"
  v = _variables(cfg, _words(VOCAB), SEED)
  rng = np.random.default_rng(SEED)
  gen = _check_exact(v, cfg, _prompts(rng, [13, 9]), 6, full_row_cfg=cfg)
  assert gen.steps == 6 and all(len(t) == 6 for t in gen.tokens)


def test_greedy_decoding_matches_full_forward_120b_class_on_expert_mesh():
  cfg = tiny_120b.get_config()
  cfg.model.vocab_size = VOCAB
  cfg.mesh.expert = 4                 # 3 of the 12 experts per device (the MTP block's 4: 1 each)
  cfg.model.pattern, cfg.model.n_layers = "DG", 4   # two groups at a quarter of the compile time
  assert cfg.reversible.enabled and cfg.tqp.enabled and cfg.moe.router == "sigmoid"
  v = _variables(cfg, _words(VOCAB), SEED)
  mesh = sharding.make_mesh(cfg.mesh)
  assert dict(mesh.shape) == {"data": 2, "expert": 4, "tensor": 1}
  v = inference.place(v, cfg, mesh)
  rng = np.random.default_rng(SEED + 1)
  prompts = _prompts(rng, [12, 7, 10])
  gen = _check_exact(v, cfg, prompts, 5, mesh=mesh)
  assert gen.logits[0].shape[0] == 8      # the batch was padded to the 8 batch shards


def test_sampling_settings():
  logits = jnp.asarray([[0.0, 1.0, 2.0, 3.0], [3.0, 2.0, 1.0, 0.0]], jnp.float32)
  key = jax.random.PRNGKey(SEED)
  assert sampling.sample(logits, key, 0.0).tolist() == [3, 0]
  assert sampling.sample(logits, key, 1.0, top_k=1).tolist() == [3, 0]
  assert sampling.sample(logits, key, 5.0, top_p=0.2).tolist() == [3, 0]
  allowed = jnp.asarray([True, True, False, False])
  assert sampling.sample(logits, key, 0.0, allowed=allowed).tolist() == [1, 0]
  draws = np.asarray(jax.vmap(lambda k: sampling.sample(logits, k, 1.0, top_k=2))(
      jax.random.split(key, 400)))
  assert set(draws[:, 0].tolist()) == {2, 3} and set(draws[:, 1].tolist()) == {0, 1}
  with pytest.raises(GenerationError, match="temperature=-0.5 is below zero"):
    sampling.SamplingParams(temperature=-0.5).check()


# ----------------------------------------------------------------------------- scoring + CLIs
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  """A run directory in launch.train's format: tiny config (two layers) with a small prepared
  corpus, random weights saved as checkpoint step 3."""
  from lightning_jax.data import shards
  root = tmp_path_factory.mktemp("gen_run")
  src = root / "text"
  for dom, name, text in (
      ("en", "a.txt", "The quick brown fox jumps over the lazy dog. " * 30),
      ("en", "eval.txt", "A held-out sentence about foxes and dogs, and a lazy afternoon. " * 12),
      ("code", "m.txt", "def f(x):\n    return x + 1\n" * 30),
      ("code", "eval.txt", "def g(y):\n    return y * 2\n" * 12)):
    (src / dom).mkdir(parents=True, exist_ok=True)
    (src / dom / name).write_text(text)
  data = root / "run" / "data"
  man = shards.prepare([str(src)], str(data), val_fraction=0.0, log=lambda *a: None)
  cfg = tiny.get_config()
  cfg.model.pattern, cfg.model.n_layers = "DG", 2   # one layer of each kind: less to compile
  cfg.data.build_from = ""
  cfg.data.path = str(data)
  cfg.data.use_pools = False
  cfg.model.vocab_size = int(man["vocab_size"])
  cfg.model.max_seq_len = 64
  cfg.train.seq_len = 16
  cfg.train.eval_batch = 2
  cfg.train.eval_batches = 2
  v = _variables(cfg, shards.token_bytes(data), SEED)
  c = ck.Checkpointer(root / "run" / "checkpoints", ck.config_ns(keep=1))
  c.save(3, {**v, "opt_state": {}, "step": jnp.int32(3)}, {}, ck.config_to_json(cfg), {},
         frozen_version=0)
  c.close()
  return {"dir": root / "run", "cfg": cfg, "variables": v, "data": data, "src": src}


def test_scoring_matches_training_heldout_eval(tiny_run):
  from lightning_jax.run import setup, step as step_lib
  from lightning_jax.data import shards
  cfg, v, data = tiny_run["cfg"], tiny_run["variables"], tiny_run["data"]
  man = shards.load_manifest(data)
  _, evals = setup.make_data(cfg, str(data), man)
  eval_fn = jax.jit(step_lib.make_eval_step(cfg, model))
  run = inference.load_run(tiny_run["dir"], log=lambda *a: None)
  assert run.step == 3 and run.mesh is None
  sc = scoring.Scorer(run.cfg, run.variables)
  for dom in ("en", "code"):
    batches = evals[dom]
    n_win = sum(b.shape[0] for b in batches)
    want = float(np.mean(np.asarray(eval_fn({**v}, np.stack(batches)))))
    toks = run.vocab.encode_document((tiny_run["src"] / dom / "eval.txt").read_text())
    # the held-out file, tokenized here, is the held-out shard the training eval reads
    assert np.array_equal(toks, np.asarray(shards.open_shard(data, shards.shards_of(man, "val", dom)[0])))
    sums, counts, _, _ = sc.window_scores(toks)
    assert len(sums) > n_win and np.all(counts[:n_win] == cfg.train.seq_len)
    got = sums[:n_win].sum() / counts[:n_win].sum()
    assert abs(got - want) <= 1e-5 * abs(want), f"seed {SEED}: {dom}: {got} vs eval {want}"
  # every token after the first is predicted exactly once
  assert counts.sum() == len(toks) - 1


def test_generate_and_score_clis(tiny_run, tmp_path):
  env = dict(os.environ, PYTHONPATH=str(REPO))
  run = str(tiny_run["dir"])
  g = subprocess.run([sys.executable, "-m", "launch.generate", run, "--prompt", "The quick",
                      "--max_new_tokens", "5", "--greedy", "--out", str(tmp_path / "g.jsonl")],
                     capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
  assert g.returncode == 0, g.stderr[-2000:]
  assert g.stdout.startswith("The quick")
  rec = json.loads((tmp_path / "g.jsonl").read_text())
  assert rec["prompt"] == "The quick" and 1 <= len(rec["tokens"]) <= 5
  assert g.stdout.strip() == ("The quick" + rec["completion"]).strip()
  s = subprocess.run([sys.executable, "-m", "launch.score", run, "--input",
                      str(tiny_run["src"] / "en"), "--input", str(tiny_run["data"]),
                      "--out", str(tmp_path / "s.json")],
                     capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
  assert s.returncode == 0, s.stderr[-2000:]
  res = json.loads((tmp_path / "s.json").read_text())
  assert set(res["domains"]) == {"en", "code"}
  f = res["files"][str(tiny_run["src"] / "en" / "eval.txt")]
  shard = [v for k, v in res["files"].items() if k.endswith("val-en-00000.u32")][0]
  assert f["tokens"] == shard["tokens"] and abs(f["ce"] - shard["ce"]) < 1e-6
  assert abs(f["perplexity"] - np.exp(f["ce"])) < 1e-6 * f["perplexity"]
  assert abs(f["bits_per_byte"] - f["nll_sum"] / np.log(2) / f["bytes"]) < 1e-9
  text = (tiny_run["src"] / "en" / "eval.txt").read_text()
  assert text.startswith("A ") and f["bytes"] == len(text.encode()) - 1   # "A" is never predicted


def test_bad_input_sentences(tiny_run, tmp_path):
  # a run without a checkpoint
  (tmp_path / "empty").mkdir()
  with pytest.raises(ck.CheckpointError, match="holds no checkpoint"):
    inference.load_run(tmp_path / "empty")
  # a prompt longer than the context (checked before anything is compiled)
  cfg = tiny_run["cfg"]
  with pytest.raises(GenerationError, match="prompt 1 is 70 tokens, longer than the model's "
                                            "context of model.max_seq_len=64"):
    sampling.generate(None, cfg, [[1, 2], [3] * 70], 4, sampling.SamplingParams())
  with pytest.raises(GenerationError, match="ask for at most 14 new tokens"):
    sampling.generate(None, cfg, [[1] * 50], 20, sampling.SamplingParams())
  # a tokenizer that does not match the run's vocabulary
  with pytest.raises(GenerationError, match="tokenizer 'brahmic' does not match the run's "
                                            "vocabulary, which was built with 'o200k_base'"):
    inference.Vocabulary.for_run(cfg, tiny_run["dir"], tokenizer="brahmic")
  other = cfg.copy_and_resolve_references()
  other.model.vocab_size = cfg.model.vocab_size + 128
  with pytest.raises(GenerationError, match="has .* ids but the run's model.vocab_size is"):
    inference.Vocabulary.for_run(other, tiny_run["dir"])
  # the CLI says it in one line, no traceback
  env = dict(os.environ, PYTHONPATH=str(REPO))
  r = subprocess.run([sys.executable, "-m", "launch.generate", str(tmp_path / "empty"),
                      "--prompt", "x", "--temperature", "-1"], capture_output=True, text=True,
                     cwd=REPO, env=env, timeout=120)
  assert r.returncode == 1 and r.stderr.strip().splitlines() == [
      "error: temperature=-1.0 is below zero; expected 0 (greedy) or a positive temperature "
      "such as 0.8."]
