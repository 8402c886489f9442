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
def normal(std: float) -> Initializer:
  def f(key, shape, dtype):
    return (std * jax.random.normal(key, shape, jnp.float32)).astype(dtype)
  return f


def zeros(key, shape, dtype):
  del key
  return jnp.zeros(shape, dtype)


def ones(key, shape, dtype):
  del key
  return jnp.ones(shape, dtype)


def constant(value: float) -> Initializer:
  def f(key, shape, dtype):
    del key
    return jnp.full(shape, value, dtype)
  return f


def uniform(lo: float, hi: float) -> Initializer:
  def f(key, shape, dtype):
    return jax.random.uniform(key, shape, jnp.float32, lo, hi).astype(dtype)
  return f


# ----------------------------------------------------------------------------- tree helpers
def path_keys(path) -> list[str]:
  """A jax key path as strings: dict keys, sequence indices, attribute names (one home)."""
  return [str(getattr(p, "key", getattr(p, "idx", getattr(p, "name", p)))) for p in path]


def path_str(path) -> str:
  """A jax key path as "a/b/0" (the project's one path-to-string rule)."""
  return "/".join(path_keys(path))


def path_key(key: jax.Array, path: str) -> jax.Array:
  """A key derived from `key` and a leaf path, independent of tree order."""
  digest = hashlib.sha256(path.encode()).digest()
  return jax.random.fold_in(key, int.from_bytes(digest[:4], "little") & 0x7FFFFFFF)


def init(specs, key: jax.Array):
  """Materialise a spec tree. Each leaf's key depends only on `key` and its path."""
  def one(path, spec):
    return spec.init(path_key(key, path_str(path)), tuple(spec.shape), spec.dtype)
  return jax.tree_util.tree_map_with_path(one, specs, is_leaf=is_spec)


def logical_axes(specs):
  return jax.tree_util.tree_map(lambda s: tuple(s.axes), specs, is_leaf=is_spec)


def abstract(specs):
  return jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(tuple(s.shape), s.dtype), specs,
                                is_leaf=is_spec)


def stack(specs, n: int, axis_name: str | None = "layers"):
  """Specs of `n` independently initialised copies stacked on a new leading axis."""
  def one(s: Spec) -> Spec:
    def init_fn(key, shape, dtype, _s=s):
      keys = jax.random.split(key, shape[0])
      return jax.vmap(lambda k: _s.init(k, shape[1:], dtype))(keys)
    return Spec((n,) + tuple(s.shape), (axis_name,) + tuple(s.axes), init_fn, s.dtype)
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
