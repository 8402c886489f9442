"""Shared machinery of the growth transforms: source checks, provenance, and the target guard.

Every transform builds its output as a flat {path: array} dict ("params/groups/l0/moe/router/w")
together with a provenance record {path: how it was written}:
  "copy <source path>"                 copied unchanged,
  "grown <how> from <source path>"     computed from source leaves (experts, tiled routers),
  "fresh <why>"                        deliberately initialised (routers, zero padding, stats).
`finish` then builds the nested output from the TARGET model's abstract tree
(`model.abstract_variables(dst_cfg)`), so the result has exactly the target's structure, and
refuses (GrowthError, naming the leaves) when
  * a target leaf was not written (it would otherwise train from its random init: the
    reference lost weeks to that),
  * a written leaf does not exist in the target (a name that does not match),
  * a shape or dtype differs from the target config,
  * a source leaf was neither used nor listed by the transform as deliberately dropped.

The transforms accept either a params tree or a full variables dict
{"params", "frozen", "stats"} (as checkpoints hold them); they return the same kind.
"""
from __future__ import annotations

import dataclasses
import zlib
from typing import Any

import jax
import numpy as np

from lightning_jax import model, nn

COLLECTIONS = ("params", "frozen", "stats")
MAX_NAMED = 6


class GrowthError(ValueError):
  """A growth transform cannot be applied; the message names the leaves or field at fault."""


@dataclasses.dataclass
class GrowthReport:
  """What a transform did: provenance per output leaf, dropped source leaves, random choices."""
  transform: str
  args: dict
  provenance: dict = dataclasses.field(default_factory=dict)
  dropped: dict = dataclasses.field(default_factory=dict)     # source path -> why
  choices: dict = dataclasses.field(default_factory=dict)     # e.g. channel sets per MoE node

  def fresh(self) -> list[str]:
    return sorted(k for k, v in self.provenance.items() if v.startswith("fresh"))

  def summary(self) -> dict:
    kinds: dict = {}
    for v in self.provenance.values():
      k = v.split(" ", 1)[0]
      kinds[k] = kinds.get(k, 0) + 1
    return {"transform": self.transform, "args": self.args, "leaves": kinds,
            "fresh": self.fresh(), "dropped": dict(sorted(self.dropped.items()))}


# ----------------------------------------------------------------------------- trees
def flatten(tree) -> dict:
  """Nested dict -> {"a/b/c": leaf} (empty dicts vanish; `finish` restores them)."""
  return {nn.path_str(p): v for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def as_variables(tree) -> tuple[dict, bool]:
  """(variables dict, was_full): a bare params tree is wrapped as {"params": tree}."""
  if not isinstance(tree, dict):
    raise GrowthError(f"growth input is a {type(tree).__name__}; expected a nested dict of arrays "
                      f"(a params tree or {{'params', 'frozen', 'stats'}}).")
  if "params" in tree:
    extra = sorted(set(tree) - set(COLLECTIONS))
    if extra:
      raise GrowthError(f"growth input has top-level keys {extra}; expected only {COLLECTIONS}.")
    return dict(tree), True
  return {"params": tree}, False


def _names(paths, n=MAX_NAMED) -> str:
  paths = sorted(paths)
  s = ", ".join(paths[:n])
  return s + (f" and {len(paths) - n} more" if len(paths) > n else "")


def dense_expert_cfg(cfg):
  """The config with TQP off: growth writes routed experts in their dense [E, d, f] form;
  quantizing them is its own step (growth.to_tqp, lightning_jax.tqp.convert_moe_to_tqp)."""
  if cfg.tqp.enabled:
    cfg = cfg.copy_and_resolve_references()
    with cfg.unlocked():
      cfg.tqp.enabled = False
  return cfg


_ABSTRACT_CACHE: dict = {}


def abstract_flat(cfg, collections) -> tuple[dict, dict]:
  """(abstract variables tree restricted to `collections`, its flat form) for cfg (TQP off)."""
  cfg = dense_expert_cfg(cfg)
  key = (cfg.to_json_best_effort(sort_keys=True), id(model.abstract_variables))
  if key not in _ABSTRACT_CACHE:
    if len(_ABSTRACT_CACHE) > 16:
      _ABSTRACT_CACHE.clear()
    _ABSTRACT_CACHE[key] = model.abstract_variables(cfg)
  ab = _ABSTRACT_CACHE[key]
  ab = {c: ab[c] for c in collections}
  return ab, flatten(ab)


def stage_name(cfg) -> str:
  e = cfg.moe
  kind = (f"MoE with {e.n_experts} routed experts ({e.router} router)" if e.enabled else "dense")
  return f"stage {cfg.stage!r}, {kind}, {cfg.model.n_layers} layers"


def check_source(flat_src: dict, src_cfg, collections, transform: str):
  """The source tree must be exactly the tree its config describes (names, shapes, dtypes)."""
  _, want = abstract_flat(src_cfg, collections)
  missing = set(want) - set(flat_src)
  extra = set(flat_src) - set(want)
  if missing or extra:
    parts = []
    if missing:
      parts.append(f"lacks {_names(missing)}")
    if extra:
      parts.append(f"has unexpected {_names(extra)}")
    raise GrowthError(f"{transform}: the source tree does not match its config ({stage_name(src_cfg)}"
                      f"): it {' and '.join(parts)}.")
  bad = [f"{k} {tuple(np.shape(flat_src[k]))}/{np.asarray(flat_src[k]).dtype} (config: "
         f"{tuple(want[k].shape)}/{np.dtype(want[k].dtype)})"
         for k in sorted(want) if tuple(np.shape(flat_src[k])) != tuple(want[k].shape)
         or np.asarray(flat_src[k]).dtype != np.dtype(want[k].dtype)]
  if bad:
    raise GrowthError(f"{transform}: source leaves differ from the source config "
                      f"({stage_name(src_cfg)}): {_names(bad, 4)}.")


def same_fields(src_cfg, dst_cfg, fields, transform: str):
  """Fields (dotted names) the transform keeps must agree between source and target config."""
  for f in fields:
    a, b = src_cfg, dst_cfg
    for part in f.split("."):
      a, b = a[part], b[part]
    if a != b:
      raise GrowthError(f"{transform} keeps {f}: the source has {a!r} but the target config has "
                        f"{b!r}; expected them equal.")


def rng_for(seed: int, *parts) -> np.random.Generator:
  """A numpy Generator that depends only on the seed and the given parts (order independent of
  the tree walk): every random draw of a transform comes from the one seed."""
  words = [int(seed) & 0xFFFFFFFF]
  for p in parts:
    words.append(zlib.crc32(str(p).encode()) if not isinstance(p, (int, np.integer)) else int(p))
  return np.random.default_rng(np.random.SeedSequence(words))


def finish(out: dict, report: GrowthReport, dst_cfg, collections, flat_src: dict,
           used: set, was_full: bool):
  """Guard and assemble: see the module docstring. Returns the nested output (same kind as input)."""
  t = report.transform
  ab, want = abstract_flat(dst_cfg, collections)
  missing = set(want) - set(out)
  if missing:
    raise GrowthError(f"{t}: target leaves were not written from the source nor listed as fresh "
                      f"(they would train from random init): {_names(missing)}.")
  extra = set(out) - set(want)
  if extra:
    raise GrowthError(f"{t}: written leaves do not exist in the target model ({stage_name(dst_cfg)}"
                      f"): {_names(extra)}.")
  unlisted = set(out) - set(report.provenance)
  if unlisted:
    raise GrowthError(f"{t}: leaves written without provenance: {_names(unlisted)}.")
  bad = []
  for k in sorted(want):
    a = out[k]
    if tuple(np.shape(a)) != tuple(want[k].shape) or np.asarray(a).dtype != np.dtype(want[k].dtype):
      bad.append(f"{k} {tuple(np.shape(a))}/{np.asarray(a).dtype} (target config: "
                 f"{tuple(want[k].shape)}/{np.dtype(want[k].dtype)})")
  if bad:
    raise GrowthError(f"{t}: leaves do not match the target config's shapes/dtypes "
                      f"({stage_name(dst_cfg)}): {_names(bad, 4)}.")
  unused = set(flat_src) - set(used) - set(report.dropped)
  if unused:
    raise GrowthError(f"{t}: source leaves were neither used nor listed as dropped (trained "
                      f"weights would be lost silently): {_names(unused)}.")
  tree = jax.tree_util.tree_map_with_path(lambda p, _: out[nn.path_str(p)], ab)
  return tree if was_full else tree["params"]


def np32(x) -> np.ndarray:
  return np.asarray(x, dtype=np.float32)


def layer_index(cfg, t: int) -> tuple[str, int]:
  """Layer t -> (pattern position key 'l{t % P}', group index t // P)."""
  p = len(cfg.model.pattern)
  return f"l{t % p}", t // p


def to_host(tree) -> Any:
  """Device arrays -> numpy (growth runs on the host; inputs may be jax or numpy)."""
  return jax.tree_util.tree_map(np.asarray, tree)
