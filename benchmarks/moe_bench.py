"""Routed-expert forward+backward at one device's share of the 120B shape, vs dense bf16.

One device at 120B (expert parallel 8): 58 local experts, 65,536 tokens x top-12 routed rows
(786,432 rows after the all_to_all), SwiGLU 4096 -> 1024 -> 4096, bf16 compute.
Useful FLOPs of forward+backward = 3 matmuls x (2 fwd + 4 bwd) x rows x 4096 x 1024.

Rows of the table (every TFLOP/s figure counts only the useful FLOPs above; each row runs in its
own try/except, so one failure prints its error and the rest still run):
  dense        one SwiGLU of width 1024 over all 786,432 rows (same FLOPs, no routing): the target
  grouped      lightning_jax.layers.moe.grouped_swiglu on equal groups [58, C, 4096]
  ragged       the same SwiGLU on expert-sorted rows [786432, 4096] with jax.lax.ragged_dot and
               with tokamax.ragged_dot (optional package; absent -> one line says so)
  dispatch     moe.dispatch (sort, gather-only pack, grouped SwiGLU, gather-only combine; custom
               VJPs, no scatter-add) on random balanced / skewed routing, dropless and capacity
  legacy       the same dispatch with plain-autodiff pack/combine (gathers whose backward is a
               scatter-add, and the [N, k, d] picked-rows combine): the code before issue 11
  movement     dispatch with identity experts: sort, maps, pack, combine and their backward only

Usage (GPU):  python -m benchmarks.moe_bench            (full shape; about 30 GB of HBM)
              python -m benchmarks.moe_bench --only dense,dispatch   (row groups, comma list)
              python -m benchmarks.moe_bench --small    (CPU smoke run of the same code)
"""
from __future__ import annotations

import argparse
import contextlib
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from configs import stage_120b
from lightning_jax.layers import moe


def timeit(fn, *args, iters=5, warmup=2):
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  t = time.perf_counter()
  for _ in range(iters):
    out = fn(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - t) / iters


def routing(key, n, e, k, skew):
  """[n, k] distinct expert ids per token; skew > 0 draws experts with Zipf-like preference."""
  logits = jax.random.gumbel(key, (n, e))
  if skew:
    logits = logits - skew * jnp.log1p(jnp.arange(e, dtype=jnp.float32))
  _, eid = jax.lax.top_k(logits, k)
  gates = jax.random.uniform(jax.random.fold_in(key, 1), (n, k), jnp.float32, 0.1, 1.0)
  return eid.astype(jnp.int32), gates / gates.sum(-1, keepdims=True)


def _plain_dispatch_rows(x, src, slot):
  """Pre-issue-11 pack: a masked gather differentiated by autodiff (backward = scatter-add)."""
  n, k = slot.shape
  ok = (src < n * k)[:, None]
  return jnp.where(ok, x[jnp.clip(src // k, 0, n - 1)], 0).astype(x.dtype)


def _plain_combine_rows(ys, gates, src, slot):
  """Pre-issue-11 combine: [N, k, d] picked rows, then an einsum with the gates."""
  del src
  rows = ys.shape[0]
  picked = ys[jnp.clip(slot, 0, rows - 1)]
  g = (gates * (slot < rows)).astype(picked.dtype)
  return jnp.einsum("nkd,nk->nd", picked, g, preferred_element_type=jnp.float32)


@contextlib.contextmanager
def _patched(**names):
  """Temporarily swap module-level functions of layers/moe.py (picked up at trace time)."""
  old = {k: getattr(moe, k) for k in names}
  for k, v in names.items():
    setattr(moe, k, v)
  try:
    yield
  finally:
    for k, v in old.items():
      setattr(moe, k, v)


def main():
  ap = argparse.ArgumentParser(prog="python -m benchmarks.moe_bench",
                               description=__doc__.splitlines()[0])
  ap.add_argument("--small", action="store_true", help="Tiny shapes (CPU smoke test).")
  ap.add_argument("--iters", type=int, default=5, help="Timed runs per row after two warm-up "
                  "runs (mean reported).")
  ap.add_argument("--only", default="dense,grouped,ragged,dispatch,legacy,movement",
                  help="Comma list of row groups to run (see above).")
  args = ap.parse_args()
  only = set(args.only.split(","))
  e, n, k, d, f = (58, 65536, 12, 4096, 1024) if not args.small else (6, 512, 3, 64, 32)
  rows = n * k
  flops = 18.0 * rows * d * f
  dt = jnp.bfloat16
  key = jax.random.PRNGKey(0)
  ks = jax.random.split(key, 8)
  w = {"gate": (0.02 * jax.random.normal(ks[0], (e, d, f))).astype(dt),
       "up": (0.02 * jax.random.normal(ks[1], (e, d, f))).astype(dt),
       "down": (0.02 * jax.random.normal(ks[2], (e, f, d))).astype(dt)}
  x = jax.random.normal(ks[3], (n, d), dt)
  cfg = stage_120b.get_config()
  cfg.tqp.enabled = False
  cfg.mesh.expert = 1
  cfg.model.d_model, cfg.moe.expert_width, cfg.moe.top_k = d, f, k
  if args.small:
    cfg.moe.group_pad = 8

  print(f"device: {jax.devices()[0].device_kind}  jax {jax.__version__}")
  print(f"shape: {e} experts, {n} tokens x top-{k} = {rows} rows, {d}->{f}->{d}, bf16; "
        f"useful fwd+bwd FLOPs {flops / 1e12:.2f} T")
  table = []
  t_dense = None

  def row(name, thunk):
    """Time one variant; print and keep going on failure."""
    try:
      t = thunk()
    except Exception as err:  # noqa: BLE001  (a failing variant must not lose the others)
      traceback.print_exc()
      print(f"FAILED {name}: {type(err).__name__}: {str(err)[:300]}", flush=True)
      table.append((name, None))
      return None
    table.append((name, t))
    pct = f"{100 * t_dense / t:.1f}% of dense" if t_dense else ""
    print(f"  {name}: {t * 1e3:.2f} ms, {flops / t / 1e12:.1f} TFLOP/s {pct}", flush=True)
    return t

  # dense: one SwiGLU over all rows, same FLOPs
  def dense_row():
    xd = jax.random.normal(ks[4], (rows, d), dt)
    wd = {m: v[0] for m, v in w.items()}

    def dense_loss(wd, xd):
      h = jax.nn.silu(xd @ wd["gate"]) * (xd @ wd["up"])
      return jnp.sum((h @ wd["down"]).astype(jnp.float32))
    return timeit(jax.jit(jax.grad(dense_loss, argnums=(0, 1))), wd, xd, iters=args.iters)
  if "dense" in only:
    t_dense = row("dense SwiGLU (same FLOPs)", dense_row)

  # grouped only: equal groups, capacity rounded to 128
  def grouped_row():
    c = -(-rows // e // 128) * 128 if not args.small else -(-rows // e)
    xg = jax.random.normal(ks[5], (e, c, d), dt)

    def grouped_loss(w, xg):
      return jnp.sum(moe.grouped_swiglu(w, None, xg, cfg).astype(jnp.float32))
    grouped = jax.jit(jax.grad(grouped_loss, argnums=(0, 1)))
    return timeit(grouped, w, xg, iters=args.iters) * rows / (e * c)   # scale to useful rows
  if "grouped" in only:
    row("grouped_swiglu [E, C, d] equal groups (scaled to useful rows)", grouped_row)

  # ragged: expert-sorted rows, group sizes of a balanced routing. Some lowerings expand
  # ragged_dot into a masked dense dot (x58 FLOPs): a forward probe on 1/8 of the rows skips the
  # full row when it runs below 50 TFLOP/s.
  eid_b, _ = routing(ks[6], n, e, k, 0.0)
  sizes = jnp.asarray(np.bincount(np.asarray(eid_b).ravel(), minlength=e), jnp.int32)

  def swiglu_loss(rdot, gs):
    def loss(w, xs):
      g = rdot(xs, w["gate"], gs)
      u = rdot(xs, w["up"], gs)
      h = (jax.nn.silu(g.astype(jnp.float32)) * u.astype(jnp.float32)).astype(dt)
      return jnp.sum(rdot(h, w["down"], gs).astype(jnp.float32))
    return loss

  def ragged_row(rdot, flag=None):
    old = None
    if flag is not None:
      old = getattr(jax.config, flag)
      jax.config.update(flag, True)
    try:
      m = rows // 8
      gs = sizes // 8
      gs = gs.at[0].add(m - gs.sum())
      xp = jax.random.normal(ks[4], (m, d), dt)
      probe = jax.jit(swiglu_loss(rdot, gs))
      t = timeit(probe, w, xp, iters=1, warmup=1)
      rate = 6.0 * m * d * f / t / 1e12
      if rate < 50 and not args.small:
        raise RuntimeError(f"forward probe on {m} rows ran at {rate:.1f} TFLOP/s; full row "
                           "skipped (masked dense lowering?)")
      del xp
      xs = jax.random.normal(ks[4], (rows, d), dt)
      return timeit(jax.jit(jax.grad(swiglu_loss(rdot, sizes), argnums=(0, 1))), w, xs,
                    iters=args.iters)
    finally:
      if flag is not None:
        jax.config.update(flag, old)
  if "ragged" in only:
    row("ragged SwiGLU, jax.lax.ragged_dot default lowering (sorted rows, no padding)",
        lambda: ragged_row(lambda a, b, gs: jax.lax.ragged_dot(a, b, gs)))
    row("ragged SwiGLU, jax.lax.ragged_dot Pallas-Triton lowering",
        lambda: ragged_row(lambda a, b, gs: jax.lax.ragged_dot(a, b, gs),
                           "jax_ragged_dot_use_gpu_pallas_triton_lowering"))
    try:
      import tokamax
    except ImportError as err:
      print(f"  tokamax.ragged_dot: not installed ({err}); row skipped", flush=True)
    else:
      row("ragged SwiGLU, tokamax.ragged_dot (sorted rows, no padding)",
          lambda: ragged_row(lambda a, b, gs: tokamax.ragged_dot(a, b, gs)))

  def dispatch_loss(w, x, eid, gates, cfg_):
    y, _ = moe.dispatch(w, None, x, eid, gates, cfg_)
    return jnp.sum(y)

  def dispatch_row(skew, mode, cf, patch=None, label="dispatch"):
    cc = cfg.copy_and_resolve_references()
    cc.moe.dispatch, cc.moe.capacity_factor = mode, cf
    eid, gates = routing(ks[6], n, e, k, skew)
    load = np.bincount(np.asarray(eid).ravel(), minlength=e)
    c0, c1, rounds = moe.capacities(cc, n, e)
    extra = max(0, -(-(int(load.max()) - c0) // c1)) if c1 else 0
    name = (f"{label} {mode} cf={cf} skew={skew} (max/mean load {load.max() / load.mean():.2f}, "
            f"C0={c0}, overflow rounds run {extra})")

    def thunk():
      with _patched(**(patch or {})):
        fn = jax.jit(jax.grad(lambda w, x, eid, g, _c=cc: dispatch_loss(w, x, eid, g, _c),
                              argnums=(0, 1, 3)))
        fn = fn.lower(w, x, eid, gates).compile()
      return timeit(fn, w, x, eid, gates, iters=args.iters)
    row(name, thunk)

  if "dispatch" in only:
    # cf=1.05: the padding costs only ~6% extra matmul rows; dropless stays exact (overflow
    # rounds take what does not fit)
    for skew, mode, cf in [(0.0, "dropless", 1.05), (0.0, "dropless", 1.0),
                           (0.0, "dropless", 1.25), (0.0, "capacity", 1.25),
                           (0.5, "dropless", 1.25)]:
      dispatch_row(skew, mode, cf)
  if "legacy" in only:
    dispatch_row(0.0, "capacity", 1.25, label="legacy (autodiff scatter-add)",
                 patch={"dispatch_rows": _plain_dispatch_rows,
                        "combine_rows": _plain_combine_rows})
  if "movement" in only:
    ident = lambda wp, wf, xg, cfg_: xg * wp["gate"][:, :1, :1].astype(xg.dtype)
    dispatch_row(0.0, "capacity", 1.25, label="movement only (identity experts)",
                 patch={"grouped_swiglu": ident})

  print(f"\n{'case':<100} {'ms':>9} {'TFLOP/s':>9} {'% dense':>8}")
  for name, t in table:
    if t is None:
      print(f"{name:<100} {'FAILED':>9}")
      continue
    tf = flops / t / 1e12
    pct = f"{100 * t_dense / t:7.1f}%" if t_dense else "      -"
    print(f"{name:<100} {t * 1e3:9.2f} {tf:9.1f} {pct}")


if __name__ == "__main__":
  main()
