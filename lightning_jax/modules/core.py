"""NNX variable types and the one way a module's variables are made and read back.

Three variable types, as the three trees of docs/ARCHITECTURE.md:
  nnx.Param  trained float leaves (float32 masters; AdamW state exists for these only)
  Frozen     fixed buffers: the Kronecker byte buffers or table, the TQP quantized base experts
  Stat       running statistics updated after each step (GSA variance EMA, router bias / use)

Every variable carries its logical axis names as sharding metadata (`out_sharding`, Flax's
name for them); `sharding.RULES` is the one table that maps them to mesh axes
(`logical_axes(module)` reads them back). A module's attributes carry today's dict keys, so
`nnx.split(module, nnx.Param, Frozen, Stat)` gives the same three trees as
`model.init_variables`: checkpoints, growth, TQP conversion, the optimizer's labels and the
reference import/export work on those plain trees unchanged.
"""
from __future__ import annotations

import jax
from flax import nnx

from lightning_jax import nn, sharding


class Frozen(nnx.Variable):
  """A fixed buffer: never differentiated, no optimizer state."""


class Stat(nnx.Variable):
  """A running statistic: read-only in the forward, updated after each optimizer step."""


KINDS = {"params": nnx.Param, "frozen": Frozen, "stats": Stat}
_AXES_KEYS = ("out_sharding", "sharding_names", "sharding")


def variable(kind: type, value, axes) -> nnx.Variable:
  """One variable with its logical axes as sharding metadata (placed later, by the step's
  shardings: eager placement is off)."""
  return kind(value, out_sharding=tuple(axes) if axes is not None else None,
              eager_sharding=False)


def axes_of(v: nnx.Variable):
  meta = v.get_metadata() if hasattr(v, "get_metadata") else getattr(v, "metadata", {})
  for k in _AXES_KEYS:
    if meta.get(k) is not None:
      return tuple(meta[k])
  return None


class Vars(nnx.Module):
  """A node of variables built from nested dicts: values, and per kind the same tree of axes.

  `Vars(params=..., frozen=..., stats=..., axes={"params": ..., ...})` sets one attribute per
  key; a dict value becomes a child `Vars` (or the child class given in `children`), so paths
  stay the dict paths. A key held by two kinds is refused (the trees would not split back)."""

  def __init__(self, trees: dict, axes: dict, children: dict | None = None):
    children = children or {}
    keys: dict[str, str] = {}
    for kind, tree in trees.items():
      for k in (tree or {}):
        if k in keys and k not in children and not isinstance(tree[k], dict):
          raise ValueError(f"variable {k!r} is both {keys[k]} and {kind}; expected one kind.")
        keys.setdefault(k, kind)
    for k in keys:
      sub = {kind: tree[k] for kind, tree in trees.items() if tree and k in tree}
      sub_axes = {kind: (axes.get(kind) or {}).get(k) for kind in sub}
      if k in children:
        setattr(self, k, children[k](sub, sub_axes))
      elif all(isinstance(v, dict) for v in sub.values()):
        setattr(self, k, Vars(sub, sub_axes))
      else:
        (kind, value), = sub.items()
        setattr(self, k, variable(KINDS[kind], value, sub_axes[kind]))

  def tree(self, kind: str = "params") -> dict:
    """This node's variables of one kind as a nested dict of values (what the layer functions
    take)."""
    return tree_of(self, KINDS[kind])


def to_pure_dict(state) -> dict:
  """An nnx.State as nested dicts of values (nnx.to_pure_dict in newer Flax)."""
  f = getattr(nnx, "to_pure_dict", None)
  return f(state) if f is not None else state.to_pure_dict()


def _flat(state):
  f = getattr(nnx, "to_flat_state", None)
  return f(state) if f is not None else state.flat_state()


def tree_of(module: nnx.Module, var_type: type) -> dict:
  """The values of one variable type under `module`, as nested dicts."""
  return to_pure_dict(nnx.state(module, var_type))


def logical_axes(module: nnx.Module, var_type: type = nnx.Param) -> dict:
  """The logical axis names of every variable of one type, as nested dicts."""
  state = nnx.state(module, var_type)
  flat = {}
  for path, v in _flat(state):
    flat["/".join(str(p) for p in path)] = axes_of(v) if isinstance(v, nnx.Variable) else None
  return nn.unflatten(flat)


def shardings(module: nnx.Module, mesh, var_type: type = nnx.Param) -> dict:
  """NamedShardings of one variable type under `module`: its logical-axes metadata resolved
  by sharding.RULES (the one table), a dim that an axis does not divide left unsplit."""
  values = tree_of(module, var_type)
  abstract = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), values)
  return sharding.tree_shardings(mesh, logical_axes(module, var_type), abstract)


def fill(skeleton, tree: dict):
  """`tree` (nested dicts of values) in the exact structure of `skeleton` (empty dicts
  included), e.g. model.abstract_variables(cfg)["stats"]."""
  flat = nn.flatten(tree)

  def pick(path, _):
    key = nn.path_str(path)
    if key not in flat:
      raise KeyError(f"the module holds no variable {key}")
    return flat[key]
  return jax.tree_util.tree_map_with_path(pick, skeleton)
