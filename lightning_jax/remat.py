"""What a layer keeps for its backward pass (`model.remat`): in the plain stack between the forward
and the backward; in the reversible stack, within each layer's rebuild.

  "none"       everything autodiff saves: every intermediate of the layer that a backward rule
               reads (at stage_2b's width, 3.3 GB per DeltaNet layer of 4,096 tokens).
  "selective"  the outputs of the matmuls without batch dimensions (the projections, the FFN, the
               stream coefficients' projection) and the values named KEEP: the delta rule
               kernel's residuals and output, the mHC coefficients (Sinkhorn's result), GSA's
               selection, the routed experts' matmuls (they batch over experts), the TQP base +
               adapter outputs and the MoE overflow rounds' sum. The elementwise work between
               them (norms, the short convolution, SiLU, L2 normalisation, rotary, the stream
               mixing, the dispatch gathers, casts) is recomputed in the backward. Inside the
               reversible stack's rebuild, where a layer's residuals live only for its own
               vjp, it also keeps the values named KEEP_REBUILD: the MoE's gathered expert
               rows (recomputing them costs a gather, and on an expert-parallel mesh an
               all-to-all, per layer). No matmul and
               no Pallas kernel runs twice; cuDNN's flash attention forward does, since its
               softmax statistics cannot be named from outside.
  "full"       the layer's input only: the whole layer is recomputed in the backward.

The choice changes memory and time, never values: the recomputed operations are the same ones,
on the same inputs (tests/test_remat.py compares gradients in float32). The measured effect is in
docs/PERFORMANCE.md.
"""
from __future__ import annotations

import jax
from jax.ad_checkpoint import checkpoint_name

from lightning_jax.config.schema import BY_PATH, CONVERTED

MODES = BY_PATH["model.remat"].choices
KEEP = "lightning_keep"          # checkpoint name of the values "selective" keeps besides matmuls
# kept by "selective" only inside the reversible stack's per-layer rebuild, where a layer's
# residuals live for that layer's vjp alone (in a plain stack they would live for every layer)
KEEP_REBUILD = "lightning_keep_rebuild"
LEGACY = CONVERTED["model.remat"]   # model.remat was a bool before "selective" existed


def keep(tree):
  """Name every array of `tree` KEEP (a no-op outside jax.checkpoint)."""
  return jax.tree_util.tree_map(lambda a: checkpoint_name(a, KEEP), tree)


def keep_in_rebuild(tree):
  """Name every array of `tree` KEEP_REBUILD: kept by "selective" inside the reversible stack's
  rebuild (wrap(..., rebuild=True)), recomputed elsewhere."""
  return jax.tree_util.tree_map(lambda a: checkpoint_name(a, KEEP_REBUILD), tree)


def mode_of(value) -> str:
  """model.remat as one of MODES (a stored bool maps to its old meaning)."""
  if isinstance(value, bool):
    return LEGACY[value]
  if value not in MODES:
    raise ValueError(f"model.remat={value!r} must be one of {list(MODES)}.")
  return value


def policy(mode: str, rebuild: bool = False):
  """jax.checkpoint policy of a remat mode (None for "none"); rebuild: the policy inside the
  reversible stack's per-layer rebuild ("selective" also keeps the KEEP_REBUILD names)."""
  mode = mode_of(mode)
  if mode == "none":
    return None
  if mode == "full":
    return jax.checkpoint_policies.nothing_saveable
  names = (KEEP, KEEP_REBUILD) if rebuild else (KEEP,)
  return jax.checkpoint_policies.save_from_both_policies(
      jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
      jax.checkpoint_policies.save_only_these_names(*names))


def wrap(fn, mode, prevent_cse: bool = False, rebuild: bool = False):
  """fn under jax.checkpoint with the mode's policy (fn itself for "none").

  prevent_cse: keep XLA from merging the recomputation with the forward (which would keep
  everything alive again). Not needed in the plain stack, whose forward and backward are separate
  scans; needed where both sit in one computation (the MTP layer, a reversible layer's rebuild).
  rebuild: fn is a reversible layer's rebuild (see policy)."""
  pol = policy(mode, rebuild)
  if pol is None:
    return fn
  return jax.checkpoint(fn, policy=pol, prevent_cse=prevent_cse)
