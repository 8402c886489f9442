"""The device mesh and ONE table of logical-axis rules.

Parameters and activations carry logical axis names (see nn.Spec.axes and `constrain`);
RULES maps each name to mesh axes. Mesh axes:
  data    pure data parallel (batch split, parameters replicated, ZeRO-1 optimizer state split)
  expert  expert parallel: routed-expert weights split; the batch is split over it too
  tensor  tensor parallel for heads / mlp / vocab (1 by default)
"""
from __future__ import annotations

import contextlib
import math
import threading

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lightning_jax import distributed
from lightning_jax.config import ConfigError

MESH_AXES = ("data", "expert", "tensor")

# logical axis name -> mesh axis / tuple of mesh axes / None (replicated)
RULES: dict[str, object] = {
    "batch": ("data", "expert"),
    "seq": None,
    "streams": None,
    "embed": None,
    "codec": None,
    "vocab": "tensor",
    "heads": "tensor",
    "kv": None,
    "mlp": "tensor",
    "expert": "expert",
    "expert_mlp": None,
    "layers": None,
    "rank": None,
    "packed": None,
}

_local = threading.local()


def make_mesh(mesh_cfg, devices=None) -> Mesh:
  """Mesh (data, expert, tensor) from config; data=-1 takes all remaining devices. The devices
  are taken process by process (distributed.ordered_devices), so with several processes "data"
  runs across hosts and "expert" / "tensor" inside one whenever they divide its devices."""
  if devices is None:
    devices = distributed.ordered_devices()
  devices = list(devices)
  n = len(devices)
  expert, tensor = int(mesh_cfg.expert), int(mesh_cfg.tensor)
  if expert < 1 or tensor < 1 or n % (expert * tensor):
    raise ConfigError(f"mesh.expert={expert} x mesh.tensor={tensor} must divide the {n} devices.")
  data = int(mesh_cfg.data)
  if data == -1:
    data = n // (expert * tensor)
  if data * expert * tensor != n:
    raise ConfigError(f"mesh data={data} x expert={expert} x tensor={tensor} = "
                      f"{data * expert * tensor} but {n} devices are present.")
  arr = np.asarray(devices).reshape(data, expert, tensor)
  axis_types = (jax.sharding.AxisType.Auto,) * 3
  return Mesh(arr, MESH_AXES, axis_types=axis_types)


def spec_for(axes) -> P:
  """PartitionSpec for a tuple of logical axis names (a mesh axis is used at most once)."""
  used: set = set()
  out = []
  for name in axes:
    rule = RULES.get(name) if name is not None else None
    if rule is None:
      out.append(None)
      continue
    mesh_axes = (rule,) if isinstance(rule, str) else tuple(rule)
    mesh_axes = tuple(a for a in mesh_axes if a not in used)
    used.update(mesh_axes)
    out.append(mesh_axes if len(mesh_axes) > 1 else (mesh_axes[0] if mesh_axes else None))
  return P(*out)


def _fits(shape, pspec: P, mesh: Mesh) -> P:
  """Drop mesh axes from dims they do not divide (small test shapes stay replicated)."""
  out = []
  for dim, entry in zip(shape, tuple(pspec) + (None,) * (len(shape) - len(pspec))):
    if entry is None:
      out.append(None)
      continue
    axes = (entry,) if isinstance(entry, str) else tuple(entry)
    size = math.prod(mesh.shape[a] for a in axes)
    out.append(entry if dim % size == 0 else None)
  return P(*out)


def named(mesh: Mesh, axes, shape=None) -> NamedSharding:
  ps = spec_for(axes)
  if shape is not None:
    ps = _fits(shape, ps, mesh)
  return NamedSharding(mesh, ps)


def tree_shardings(mesh: Mesh, axes_tree, abstract_tree):
  """NamedSharding for every leaf, from a logical-axes tree and matching shapes."""
  return jax.tree_util.tree_map(
      lambda ax, a: named(mesh, ax, a.shape), axes_tree, abstract_tree,
      is_leaf=lambda x: isinstance(x, tuple))


def zero1_sharding(mesh: Mesh, sharding: NamedSharding, shape) -> NamedSharding:
  """ZeRO-1: additionally split the first free, divisible dim over the unused batch axes."""
  pspec = tuple(sharding.spec) + (None,) * (len(shape) - len(sharding.spec))
  used = set()
  for e in pspec:
    if e is not None:
      used.update((e,) if isinstance(e, str) else e)
  free = tuple(a for a in ("data", "expert") if a not in used and mesh.shape[a] > 1)
  if not free:
    return sharding
  size = math.prod(mesh.shape[a] for a in free)
  for i, (dim, e) in enumerate(zip(shape, pspec)):
    if e is None and dim % size == 0 and dim >= size:
      new = list(pspec)
      new[i] = free if len(free) > 1 else free[0]
      return NamedSharding(mesh, P(*new))
  return sharding


@contextlib.contextmanager
def use_mesh(mesh: Mesh | None):
  """Make `mesh` the target of `constrain` (and of shard_map in layers) inside the block."""
  prev = getattr(_local, "mesh", None)
  _local.mesh = mesh
  try:
    yield mesh
  finally:
    _local.mesh = prev


def current_mesh() -> Mesh | None:
  return getattr(_local, "mesh", None)


def constrain(x, axes):
  """with_sharding_constraint by logical names; a no-op outside `use_mesh`."""
  mesh = current_mesh()
  if mesh is None or mesh.size == 1:
    return x
  return jax.lax.with_sharding_constraint(x, named(mesh, axes, x.shape))
