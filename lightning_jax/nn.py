"""Parameter specifications: one declaration gives init, logical axes and abstract shapes.

Every building block declares its variables as a nested dict of `Spec` (shape, logical axis
names, initializer). From that one tree we derive:
  * `init(specs, key)`         -> nested dict of arrays (deterministic per leaf path),
  * `logical_axes(specs)`      -> the same tree of axis-name tuples (sharding.py maps them),
  * `abstract(specs)`          -> ShapeDtypeStructs for `jax.eval_shape`-style counting,
  * `stack(specs, n, axis)`    -> the specs of n copies stacked on a leading axis (lax.scan).

These declarations are the one source of a block's variables: the pure trees the training
step, growth, TQP conversion, checkpoints and the optimizer work on (the reversible custom_vjp
and the scans over layer groups want pure functions of pytrees), and the Flax NNX modules of
lightning_jax/modules, whose variables carry the same paths and logical axes.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

Initializer = Callable[[jax.Array, tuple, Any], jax.Array]


@dataclasses.dataclass(frozen=True)
class Spec:
  """One variable: shape, one logical axis name (or None) per dim, initializer, dtype."""
  shape: tuple
  axes: tuple
  init: Initializer
  dtype: Any = jnp.float32

  def __post_init__(self):
    if len(self.shape) != len(self.axes):
      raise ValueError(f"Spec shape {self.shape} has {len(self.shape)} dims but axes {self.axes} "
                       f"name {len(self.axes)}; expected one axis name (or None) per dim.")


def is_spec(x) -> bool:
  return isinstance(x, Spec)


# ----------------------------------------------------------------------------- initializers
# Every key is derived with fold_in: a leaf's from the tree's key and a hash of its path, slice
# i of a stacked leaf's from the leaf's and i, and block b of a random initializer's draws
# (BLOCK elements each, for leaves or slices of at most SMALL elements) from the slice's and b.
# So a leaf's values depend only on the key, its path, its shape and its initializer, and
# `init` derives every key of a tree in one vmapped fold_in per level and draws every small
# leaf in one vmapped call per distribution, with exactly the values each initializer gives
# alone. That is for the compile: XLA:CPU compiles each threefry hash (a draw, a fold_in or a
# split) as kernels of its own, about 45-70 ms each at the tests' optimisation level, and a
# tiny model's initializer had about 430 of them (8 s). Leaves above SMALL keep a draw of their
# own, which XLA partitions by the output's sharding.
BLOCK = 1024
SMALL = 1 << 20


def _blocks(n: int) -> int:
  return -(-n // BLOCK)


def _fold(keys, counts):
  """keys [M, ...key], counts (M static ints) -> [sum(counts), ...key]: fold_in(keys[j], i) for
  i < counts[j], in order; one vmapped fold_in."""
  counts = np.asarray(counts, np.int64)
  total = int(counts.sum())
  rep = jnp.repeat(keys, counts, axis=0, total_repeat_length=total)
  idx = np.concatenate([np.arange(c, dtype=np.uint32) for c in counts] or
                       [np.zeros(0, np.uint32)])
  return jax.vmap(jax.random.fold_in)(rep, jnp.asarray(idx, jnp.uint32))


def _standard(dist: str, block_keys):
  """[n_blocks * BLOCK] float32 standard draws: N(0, 1) or U[0, 1)."""
  one = {"normal": lambda k: jax.random.normal(k, (BLOCK,), jnp.float32),
         "uniform": lambda k: jax.random.uniform(k, (BLOCK,), jnp.float32)}[dist]
  return jax.vmap(one)(block_keys).reshape(-1)


@dataclasses.dataclass(frozen=True)
class Draws:
  """An initializer that maps iid standard draws elementwise: N(0, std^2) for dist "normal",
  U[lo, hi) for "uniform" (never below lo), then `post` (an elementwise function) if given."""
  dist: str
  std: float = 1.0
  lo: float = 0.0
  hi: float = 1.0
  post: Callable | None = None

  def finish(self, z, dtype):
    x = self.std * z if self.dist == "normal" else jnp.maximum(self.lo,
                                                               self.lo + (self.hi - self.lo) * z)
    if self.post is not None:
      x = self.post(x)
    return x.astype(dtype)

  def __call__(self, key, shape, dtype):
    n = math.prod(shape)
    if n > SMALL:
      z = (jax.random.normal(key, shape, jnp.float32) if self.dist == "normal" else
           jax.random.uniform(key, shape, jnp.float32))
    else:
      z = _standard(self.dist, _fold(jnp.asarray(key)[None], [_blocks(n)]))[:n].reshape(shape)
    return self.finish(z, dtype)


@dataclasses.dataclass(frozen=True)
class Const:
  """Every entry `value` (no key is used)."""
  value: float

  def __call__(self, key, shape, dtype):
    del key
    return jnp.full(shape, self.value, dtype)


def normal(std: float) -> Initializer:
  return Draws("normal", std=float(std))


def uniform(lo: float, hi: float) -> Initializer:
  return Draws("uniform", lo=float(lo), hi=float(hi))


zeros = Const(0.0)
ones = Const(1.0)


def constant(value: float) -> Initializer:
  return Const(float(value))


def _keyless(fn) -> bool:
  return isinstance(fn, Const) or (isinstance(fn, _Stacked) and _keyless(fn.inner))


@dataclasses.dataclass(frozen=True)
class _Stacked:
  """The initializer of `stack`: slice i drawn by `inner` with fold_in(key, i)."""
  inner: Initializer

  def __call__(self, key, shape, dtype):
    if _keyless(self.inner):
      return self.inner(key, shape, dtype)
    keys = _fold(jnp.asarray(key)[None], [shape[0]])
    return jax.vmap(lambda k: self.inner(k, shape[1:], dtype))(keys)


# ----------------------------------------------------------------------------- tree helpers
def path_keys(path) -> list[str]:
  """A jax key path as strings: dict keys, sequence indices, attribute names (one home)."""
  return [str(getattr(p, "key", getattr(p, "idx", getattr(p, "name", p)))) for p in path]


def path_str(path) -> str:
  """A jax key path as "a/b/0" (the project's one path-to-string rule)."""
  return "/".join(path_keys(path))


def _path_hash(path: str) -> int:
  return int.from_bytes(hashlib.sha256(path.encode()).digest()[:4], "little") & 0x7FFFFFFF


def path_key(key: jax.Array, path: str) -> jax.Array:
  """A key derived from `key` and a leaf path, independent of tree order."""
  return jax.random.fold_in(key, _path_hash(path))


def init(specs, key: jax.Array):
  """Materialise a spec tree. Each leaf's key depends only on `key` and its path
  (`path_key`), and its values equal `spec.init(path_key(key, path), shape, dtype)`; the keys
  and the small random leaves are computed together (see "initializers" above)."""
  flat, treedef = jax.tree_util.tree_flatten_with_path(specs, is_leaf=is_spec)
  if not flat:
    return jax.tree_util.tree_unflatten(treedef, [])
  hashes = np.array([_path_hash(path_str(p)) for p, _ in flat], np.uint32)
  keys = jax.vmap(lambda h: jax.random.fold_in(key, h))(jnp.asarray(hashes, jnp.uint32))
  out = [None] * len(flat)
  plans = []                     # (leaf index, stack counts, slice shape, Draws)
  for i, (_, spec) in enumerate(flat):
    fn, shape, counts = spec.init, tuple(spec.shape), []
    while isinstance(fn, _Stacked) and not _keyless(fn):
      fn, counts, shape = fn.inner, counts + [shape[0]], shape[1:]
    if isinstance(fn, Draws) and math.prod(shape) <= SMALL:
      plans.append((i, counts, shape, fn))
    else:
      out[i] = spec.init(keys[i], tuple(spec.shape), spec.dtype)
  if not plans:
    return jax.tree_util.tree_unflatten(treedef, out)
  # slice keys, one stacking level at a time: each plan's keys [m] -> [m * n]
  cur = [keys[i:i + 1] for i, *_ in plans]
  for level in range(max(len(c) for _, c, _, _ in plans)):
    todo = [j for j, (_, c, _, _) in enumerate(plans) if len(c) > level]
    ns = [plans[j][1][level] for j in todo]
    got = _fold(jnp.concatenate([cur[j] for j in todo]),
                np.repeat(ns, [cur[j].shape[0] for j in todo]))
    off = 0
    for j, nj in zip(todo, ns):
      m = cur[j].shape[0] * nj
      cur[j], off = got[off:off + m], off + m
  for dist in sorted({d.dist for *_, d in plans}):
    mine = [j for j, p in enumerate(plans) if p[3].dist == dist]
    nb = [_blocks(math.prod(plans[j][2])) for j in mine]
    z = _standard(dist, _fold(jnp.concatenate([cur[j] for j in mine]),
                              np.repeat(nb, [cur[j].shape[0] for j in mine])))
    off = 0
    for j, b in zip(mine, nb):
      i, _, shape, draws = plans[j]
      m, n = cur[j].shape[0], math.prod(shape)
      rows = z[off:off + m * b * BLOCK].reshape(m, b * BLOCK)[:, :n]
      off += m * b * BLOCK
      out[i] = draws.finish(rows.reshape(tuple(flat[i][1].shape)), flat[i][1].dtype)
  return jax.tree_util.tree_unflatten(treedef, out)


def logical_axes(specs):
  return jax.tree_util.tree_map(lambda s: tuple(s.axes), specs, is_leaf=is_spec)


def abstract(specs):
  return jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(tuple(s.shape), s.dtype), specs,
                                is_leaf=is_spec)


def stack(specs, n: int, axis_name: str | None = "layers"):
  """Specs of `n` independently initialised copies stacked on a new leading axis."""
  def one(s: Spec) -> Spec:
    return Spec((n,) + tuple(s.shape), (axis_name,) + tuple(s.axes), _Stacked(s.init), s.dtype)
  return jax.tree_util.tree_map(one, specs, is_leaf=is_spec)


def count(tree) -> int:
  """Number of scalar entries in a tree of arrays, ShapeDtypeStructs or Specs."""
  leaves = jax.tree_util.tree_leaves(tree, is_leaf=is_spec)
  return int(sum(math.prod(l.shape) for l in leaves))


def flatten(tree, sep: str = "/") -> dict:
  """Nested dict -> {"a/b/c": leaf}."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_spec)[0]:
    out[sep.join(path_str([p]) for p in path)] = leaf
  return out


def unflatten(flat: dict, sep: str = "/") -> dict:
  out: dict = {}
  for k, v in flat.items():
    node = out
    parts = k.split(sep)
    for p in parts[:-1]:
      node = node.setdefault(p, {})
    node[parts[-1]] = v
  return out


def cast(x, dtype):
  """Cast floating arrays to the compute dtype; leave integer arrays alone."""
  if jnp.issubdtype(x.dtype, jnp.floating):
    return x.astype(dtype)
  return x


def dtype_of(name: str):
  return {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[name]
