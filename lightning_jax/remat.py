"""What a layer of the plain stack keeps for its backward pass (`model.remat`).

  "none"       everything autodiff saves: every intermediate of the layer that a backward rule
               reads (at stage_2b's width, 3.3 GB per DeltaNet layer of 4,096 tokens).
  "selective"  the outputs of the matmuls without batch dimensions (the projections, the FFN, the
               stream coefficients' projection) and the values named KEEP: the delta rule
               kernel's residuals and output, the mHC coefficients (Sinkhorn's result) and GSA's
               selection. The elementwise work between them (norms, the short convolution, SiLU,
               L2 normalisation, rotary, the stream mixing, casts) is recomputed in the backward.
               No matmul and no Pallas kernel runs twice; cuDNN's flash attention forward does,
               since its softmax statistics cannot be named from outside.
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
LEGACY = CONVERTED["model.remat"]   # model.remat was a bool before "selective" existed


def keep(tree):
  """Name every array of `tree` KEEP (a no-op outside jax.checkpoint)."""
  return jax.tree_util.tree_map(lambda a: checkpoint_name(a, KEEP), tree)


def mode_of(value) -> str:
  """model.remat as one of MODES (a stored bool maps to its old meaning)."""
  if isinstance(value, bool):
    return LEGACY[value]
  if value not in MODES:
    raise ValueError(f"model.remat={value!r} must be one of {list(MODES)}.")
  return value


def policy(mode: str):
  """jax.checkpoint policy of a remat mode (None for "none")."""
  mode = mode_of(mode)
  if mode == "none":
    return None
  if mode == "full":
    return jax.checkpoint_policies.nothing_saveable
  return jax.checkpoint_policies.save_from_both_policies(
      jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
      jax.checkpoint_policies.save_only_these_names(KEEP))


def wrap(fn, mode, in_scan: bool = True):
  """fn under jax.checkpoint with the mode's policy (fn itself for "none"). In a lax.scan body
  (in_scan) common-subexpression elimination cannot merge the recomputation with the forward,
  so it need not be prevented."""
  pol = policy(mode)
  if pol is None:
    return fn
  return jax.checkpoint(fn, policy=pol, prevent_cse=not in_scan)
