"""The LM head's cross-entropy, float32 and obvious: full logits h @ w [B, T, V], then
mean(logsumexp - the target's logit) over every token, differentiated by autodiff."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def logits(h, w):
  return jnp.einsum("btd,dv->btv", h.astype(jnp.float32), w.astype(jnp.float32),
                    precision=jax.lax.Precision.HIGHEST)


def cross_entropy(h, w, targets):
  lg = logits(h, w)
  picked = jnp.take_along_axis(lg, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
  return jnp.mean(jax.nn.logsumexp(lg, axis=-1) - picked)
