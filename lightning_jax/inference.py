"""A trained run, ready to use: its config, weights, mesh and vocabulary (launch.generate,
launch.score, benchmarks/decode_bench.py).

`load_run(path, step=None, mesh="auto")` reads a run directory of launch.train (or the output of
growth / launch.ema, or imported weights written in the same format): the config stored with the
checkpoint, then params, frozen buffers and running stats (never the optimizer state), placed on
the devices: with mesh "auto" the run's own mesh.expert x mesh.tensor layout when this host has
more than one device and they divide (the sharded 120B: experts split over "expert"), else one
device.

`Vocabulary` maps text to the ids the model was trained on and back. The run's data directory
(config data.path, else RUN/data) holds the manifest, the id order (`vocab_ids.npy`: data id ->
tokenizer id for frequency-ordered compact vocabularies) and the raw bytes of every id; without
one (imported weights), the tokenizer the config names is used in its natural order. Prompt text
is encoded with the tokenizer, then renumbered; a token the compact vocabulary lacks (never seen
in the training data) is spelled with the longest known pieces of its bytes.
"""
from __future__ import annotations

import dataclasses
import json
import math
import pathlib

import jax
import numpy as np
from ml_collections import ConfigDict

from lightning_jax import checkpoint as ck
from lightning_jax import model, sharding, vocab as vocab_lib
from lightning_jax.config import ConfigError, validate
from lightning_jax.data import shards
from lightning_jax.decode import GenerationError


@dataclasses.dataclass
class Run:
  cfg: object               # ConfigDict (the checkpoint's)
  variables: dict           # params, frozen, stats (device arrays)
  step: int
  step_dir: pathlib.Path
  mesh: object              # jax Mesh or None
  vocab: "Vocabulary | None"
  meta: dict


def locate(path):
  """(checkpoints dir, step or None) of a run dir, its checkpoints/ dir or one checkpoints/<step>
  dir (launch.inspect's rules); a path without any checkpoint is one clear sentence."""
  p = pathlib.Path(path)
  if not p.exists():
    raise ck.CheckpointError(f"{p} does not exist; expected a run directory (the --workdir of "
                             f"launch.train), its checkpoints/ directory or one checkpoints/<step>.")
  if (p / "checkpoints").is_dir():
    return p / "checkpoints", None
  if p.name.isdigit() and (p / "state").is_dir():
    return p.parent, int(p.name)
  if p.is_dir() and any(c.name.isdigit() for c in p.iterdir()):
    return p, None
  raise ck.CheckpointError(f"{p} holds no checkpoint (no checkpoints/<step>/ directory); "
                           f"expected the --workdir of a training run, e.g. `python -m "
                           f"launch.train --config=configs/tiny.py --workdir {p}`.")


def read_config(path, step: int | None = None):
  """(ConfigDict, step, Checkpointer) of a run's newest (or given) complete checkpoint."""
  cdir, at = locate(path)
  c = ck.Checkpointer(cdir, ck.config_ns(keep=0), read_only=True)
  steps = c.steps()
  if not steps:
    c.close()
    raise ck.CheckpointError(f"{cdir} holds no complete checkpoint; expected a run that has "
                             f"saved at least one step (launch.train saves every "
                             f"checkpoint.every_steps and at the end).")
  want = step if step is not None and step >= 0 else at
  if want is None:
    want = steps[-1]
  if want not in steps:
    c.close()
    raise ck.CheckpointError(f"step {want} is not among the checkpoints in {cdir}: {steps}.")
  cfg = ConfigDict(c.read_json(want, "config"))
  return cfg, want, c


def make_mesh(cfg, mode: str = "auto"):
  """The run's mesh on this host (mode "auto"), or None (one device: mode "none")."""
  if mode not in ("auto", "none"):
    raise ConfigError(f"--mesh={mode!r}; expected 'auto' or 'none'.")
  n = jax.device_count()
  e, t = int(cfg.mesh.expert), int(cfg.mesh.tensor)
  if mode == "none" or n == 1 or n % (e * t) or e * t == 1:
    return None
  with cfg.unlocked():
    cfg.mesh.data = -1
  return sharding.make_mesh(cfg.mesh)


def shardings(cfg, mesh):
  """Shardings of params / frozen / stats: training's on a mesh, else the first device."""
  ab = model.abstract_variables(cfg)
  if mesh is None:
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return ab, jax.tree_util.tree_map(lambda _: one, ab)
  rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return ab, {"params": sharding.tree_shardings(mesh, model.param_axes(cfg), ab["params"]),
              "frozen": sharding.tree_shardings(mesh, model.frozen_axes(cfg), ab["frozen"]),
              "stats": jax.tree_util.tree_map(lambda _: rep, ab["stats"])}


def place(variables, cfg, mesh):
  """Put a host tree of variables on the devices as `shardings` says."""
  _, sh = shardings(cfg, mesh)
  return jax.device_put(variables, {k: sh[k] for k in variables})


def load_run(path, step: int | None = None, mesh: str = "auto", data: str | None = None,
             tokenizer: str | None = None, log=print, with_vocab: bool = True) -> Run:
  """Read a run's checkpoint onto the devices (see the module docstring)."""
  cfg, step, c = read_config(path, step)
  try:
    validate(cfg)
    vocab = Vocabulary.for_run(cfg, path, data, tokenizer) if with_vocab else None
    m = make_mesh(cfg, mesh)
    ab, sh = shardings(cfg, m)
    abstract = ck.abstract_with_shardings(ab, sh)
    got = c.restore_variables(step, abstract)
  finally:
    c.close()
  log(f"loaded {c.step_dir(step)} (step {step}, stage {cfg.get('stage')!r}, "
      f"{'mesh ' + str(dict(m.shape)) if m is not None else 'one device: ' + str(jax.devices()[0])})")
  variables = {k: got["state"][k] for k in ("params", "frozen", "stats")}
  return Run(cfg, variables, step, c.step_dir(step), m, vocab, got.get("meta") or {})


# ----------------------------------------------------------------------------- vocabulary
def _load_encoding(name: str, cfg):
  if name == "o200k_base":
    return vocab_lib.load_o200k_base()
  tc = ConfigDict(dict(cfg.tokenizer)) if "tokenizer" in cfg else ConfigDict({})
  with tc.unlocked():
    tc.name = "brahmic" if name.startswith("brahmic") else name
    tc.id_order = "natural"
  return vocab_lib.load(tc).encoding


@dataclasses.dataclass
class Vocabulary:
  """Text <-> the model's ids. data_to_tok: model id -> tokenizer id (None: the same ids)."""
  encoding: object
  data_to_tok: np.ndarray | None
  token_bytes: list
  eot_id: int
  source: str

  @classmethod
  def for_run(cls, cfg, run_path, data: str | None = None, tokenizer: str | None = None):
    d = _data_dir(cfg, run_path, data)
    V = int(cfg.model.vocab_size)
    if d is None:                          # imported weights: the config's tokenizer, natural ids
      name = tokenizer or str(cfg.tokenizer.name)
      enc = _load_encoding(name, cfg)
      if enc.n_vocab > V:
        raise GenerationError(f"tokenizer {enc.name!r} has {enc.n_vocab} ids but the run's "
                              f"vocabulary (model.vocab_size) is {V}; expected the tokenizer the "
                              f"run was trained with.")
      tb = vocab_lib.token_bytes_list(enc)
      return cls(enc, None, tb + [b""] * (V - len(tb)), int(enc.eot_token), f"tokenizer {enc.name}")
    man = shards.load_manifest(d)
    name = tokenizer or man["tokenizer"]
    if name != man["tokenizer"] and not (name == "brahmic" and man["tokenizer"].startswith("brahmic")):
      raise GenerationError(f"tokenizer {name!r} does not match the run's vocabulary, which was "
                            f"built with {man['tokenizer']!r} ({d}/manifest.json); leave "
                            f"--tokenizer out or pass {man['tokenizer']!r}.")
    if int(man["vocab_size"]) != V:
      raise GenerationError(f"the data vocabulary in {d} has {man['vocab_size']} ids but the run's "
                            f"model.vocab_size is {V}; expected the data directory the run was "
                            f"trained on (--data).")
    enc = _load_encoding(man["tokenizer"], cfg)
    d2t = None
    if man.get("id_order") == "frequency":
      d2t = np.load(pathlib.Path(d) / man["vocab_ids"]).astype(np.int64)
      real = d2t[d2t != shards.PAD_ID]
      if real.size and int(real.max()) >= enc.n_vocab:
        raise GenerationError(f"the run's vocabulary in {d} uses tokenizer id {int(real.max())}, "
                              f"but tokenizer {enc.name!r} has only {enc.n_vocab} ids.")
    elif enc.n_vocab != V:
      raise GenerationError(f"tokenizer {enc.name!r} has {enc.n_vocab} ids but the run's "
                            f"vocabulary is {V}; expected the tokenizer the run was trained with.")
    return cls(enc, d2t, shards.token_bytes(d), int(man["eot_id"]), str(d))

  def __post_init__(self):
    self._tok_to_data = None
    if self.data_to_tok is not None:
      m = np.full(self.encoding.n_vocab, -1, np.int64)
      ok = self.data_to_tok != 0xFFFFFFFF
      m[self.data_to_tok[ok]] = np.nonzero(ok)[0]
      self._tok_to_data = m
    self._by_bytes = None

  @property
  def size(self) -> int:
    return len(self.token_bytes)

  def allowed(self) -> np.ndarray:
    """bool [V]: ids that are tokens (not padding ids of a compact vocabulary)."""
    a = np.asarray([len(b) > 0 for b in self.token_bytes])
    a[self.eot_id] = True
    return a

  def _spell(self, raw: bytes, text: str) -> list:
    if self._by_bytes is None:
      self._by_bytes = {}
      for i, b in enumerate(self.token_bytes):
        if b and i != self.eot_id:
          self._by_bytes.setdefault(b, i)
    out, i = [], 0
    while i < len(raw):
      for j in range(min(len(raw), i + 32), i, -1):
        t = self._by_bytes.get(raw[i:j])
        if t is not None:
          out.append(t)
          i = j
          break
      else:
        raise GenerationError(f"the text {text[:40]!r} contains bytes {raw[i:i + 4]!r} that no token "
                              f"of the run's vocabulary ({self.source}) spells; expected text "
                              f"like the training data's.")
    return out

  def encode(self, text: str) -> list:
    ids = self.encoding.encode_ordinary(text)
    if self._tok_to_data is None:
      return [int(i) for i in ids]
    out = []
    for t in ids:
      d = int(self._tok_to_data[t])
      if d >= 0:
        out.append(d)
      else:
        out.extend(self._spell(self.encoding.decode_single_token_bytes(t), text))
    return out

  def encode_document(self, text: str) -> list:
    """A document as prepare_data stores it: its tokens, then end-of-text."""
    return self.encode(text) + [self.eot_id]

  def bytes_of(self, ids) -> bytes:
    return b"".join(self.token_bytes[int(i)] for i in ids if int(i) != self.eot_id)

  def decode(self, ids) -> str:
    return self.bytes_of(ids).decode("utf-8", errors="replace")

  def n_bytes(self) -> np.ndarray:
    """int64 [V]: UTF-8 bytes of each id's text (end-of-text and padding ids: 0)."""
    n = np.asarray([len(b) for b in self.token_bytes], np.int64)
    n[self.eot_id] = 0
    return n


def _data_dir(cfg, run_path, data):
  if data:
    if not (pathlib.Path(data) / shards.MANIFEST).exists():
      raise GenerationError(f"--data {data} holds no {shards.MANIFEST}; expected the prepared "
                            f"data directory the run was trained on.")
    return pathlib.Path(data)
  cands = []
  if cfg.data.path:
    cands.append(pathlib.Path(cfg.data.path))
  cdir, _ = locate(run_path)
  cands.append(cdir.parent / "data")
  for c in cands:
    if (c / shards.MANIFEST).exists():
      return c
  return None


def write_json(path, obj):
  p = pathlib.Path(path)
  p.parent.mkdir(parents=True, exist_ok=True)
  tmp = p.with_suffix(p.suffix + ".tmp")
  tmp.write_text(json.dumps(obj, indent=1, ensure_ascii=False))
  tmp.replace(p)


def nats_to_bits(x: float) -> float:
  return x / math.log(2.0)
