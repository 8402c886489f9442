"""Layer stacks: plain (scan over layer groups) and the reversible midpoint integrator (SPEC §2.6).

Interface shared by model.py and this module
--------------------------------------------
A *group* is one period of the layer pattern (DDDG = 4 layers). Variables of the layers at
position j of the pattern are stacked over groups: `group_vars[j]` is a dict
{"params": ..., "frozen": ..., "stats": ...} whose leaves have leading dim n_groups.

    layer_fn(vars_j, x, consts, choices_j) -> (y, choices_j, aux, stats_j)

  x, y       : stream state [B, T, S, d] (the full 4-stream state; y = layer(x), not f(x))
  consts     : pytree shared by all layers (rotary tables, ...), never differentiated
  choices_j  : discrete decisions (MoE top-k ids, sparse-attention key ids). None -> the layer
               selects and returns them; given -> the layer must reuse them, never reselect.
  aux        : float32 scalar added to the loss (MoE balance terms), differentiable
  stats_j    : non-differentiated per-layer statistics (expert load, score variance)

run_stack returns (x_out, aux_total, stats, choices) with stats/choices stacked [n_groups, ...]
per pattern position.
"""
from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp

LayerFn = Callable


def _slice(tree, i):
  return jax.tree_util.tree_map(lambda a: a[i], tree)


def plain_stack(layer_fns: Sequence[LayerFn], group_vars: Sequence[dict], x, consts,
                remat: bool = False):
  """x <- layer(x) for every layer, lax.scan over groups; ordinary autodiff."""
  fns = [jax.checkpoint(f) if remat else f for f in layer_fns]

  def body(carry, gv):
    h, aux = carry
    stats, choices = [], []
    for j, f in enumerate(fns):
      h, ch, a, st = f(gv[j], h, consts, None)
      aux = aux + a
      stats.append(st)
      choices.append(ch)
    return (h, aux), (tuple(stats), tuple(choices))

  (x, aux), (stats, choices) = jax.lax.scan(body, (x, jnp.zeros((), jnp.float32)),
                                            tuple(group_vars))
  return x, aux, stats, choices


def run_stack(rcfg, layer_fns: Sequence[LayerFn], group_vars: Sequence[dict], x, consts,
              remat: bool = False):
  """Dispatch on the `reversible` config section (plain stack when disabled)."""
  if not rcfg.enabled:
    return plain_stack(layer_fns, group_vars, x, consts, remat=remat)
  raise NotImplementedError("reversible.enabled=True: the midpoint integrator is not built yet.")
