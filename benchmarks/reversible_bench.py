"""Memory and step time of the reversible midpoint stack versus plain autodiff.

    python -m benchmarks.reversible_bench [--layers 4,20,40] [--batch 4] [--seq 64] [--d 64]
        [--bits 24] [--repeat 5]

For each depth it compiles one training step (loss + grads w.r.t. params and input; no optimizer,
so the temporaries exclude parameters and optimizer state by construction) and reports XLA's
`memory_analysis().temp_size_in_bytes`, then times the step. Modes:
  autodiff        the float midpoint integrator differentiated by plain jax autodiff (lax.scan)
  autodiff+remat  the same with jax.checkpoint around every layer
  store_boundaries / invert (a=0.5) / invert (a=1): lightning_jax.reversible.run_stack
Also holds the synthetic DDDG layers the tests use (`synthetic_layers`).
"""
from __future__ import annotations

import argparse
import datetime
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict

from lightning_jax import reversible


# ----------------------------------------------------------------------------- synthetic layers
def _rms(x):
  return x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6)


def dense_layer(vj, x, consts, choices):
  """'D': a stream-mixing MLP. Reads float and int frozen leaves and a stats leaf."""
  p, fr, st = vj["params"], vj["frozen"], vj["stats"]
  z = _rms(x) * fr["scale"]
  hdn = jnp.tanh(z @ p["w1"] + st["shift"])
  upd = hdn @ p["w2"]
  # a fixed int permutation of the streams (frozen int leaf)
  upd = upd[:, :, fr["perm"], :] * consts["gain"]
  y = x + upd
  aux = 0.01 * jnp.mean(hdn ** 2)
  return y, choices, aux, {"mean_abs": jnp.mean(jnp.abs(hdn))}


def topk_layer(vj, x, consts, choices, k: int = 2):
  """'G': routes each token to k of E experts by a top-k over router logits (a discrete choice)."""
  p = vj["params"]
  z = _rms(x)
  logits = jnp.einsum("btsd,sde->bte", z, p["router"])
  if choices is None:
    _, choices = jax.lax.top_k(jax.lax.stop_gradient(logits), k)
  sel = jnp.take_along_axis(logits, choices, axis=-1)            # [B, T, k]
  gates = jax.nn.softmax(sel, axis=-1)
  expert_out = jnp.tanh(jnp.einsum("btsd,edf->btesf", z, p["experts"]))  # [B, T, E, S, d]
  picked = jnp.take_along_axis(expert_out, choices[:, :, :, None, None], axis=2)
  y = x + jnp.einsum("btk,btksd->btsd", gates, picked) * consts["gain"]
  probs = jax.nn.softmax(logits, -1)
  aux = 0.1 * jnp.mean(probs.mean((0, 1)) ** 2) * logits.shape[-1]
  load = jnp.zeros(logits.shape[-1]).at[choices.reshape(-1)].add(1.0)
  return y, choices, aux, {"load": load}


def synthetic_vars(seed: int, n_groups: int, s: int, d: int, f: int, n_experts: int = 4,
                   pattern: str = "DDDG"):
  """group_vars for the synthetic pattern (every leaf stacked over n_groups), drawn with numpy
  (no per-shape eager jax compiles)."""
  rng = np.random.default_rng(seed)
  nrm = lambda *shape: rng.standard_normal(shape, dtype=np.float32)
  out = []
  for j, kind in enumerate(pattern):
    if kind == "D":
      out.append({
          "params": {"w1": nrm(n_groups, d, f) / np.sqrt(d), "w2": nrm(n_groups, f, d) / np.sqrt(f)},
          "frozen": {"scale": 1.0 + 0.1 * nrm(n_groups, d),
                     "perm": np.tile(np.roll(np.arange(s, dtype=np.int32), j), (n_groups, 1))},
          "stats": {"shift": np.full((n_groups, f), 0.01, np.float32)},
      })
    else:
      out.append({
          "params": {"router": nrm(n_groups, s, d, n_experts) / np.sqrt(d),
                     "experts": nrm(n_groups, n_experts, d, d) / np.sqrt(d)},
          "frozen": {}, "stats": {},
      })
  return jax.tree_util.tree_map(jnp.asarray, out)


def synthetic_layers(pattern: str = "DDDG"):
  return [dense_layer if c == "D" else topk_layer for c in pattern]


def rcfg(mode="store_boundaries", a=0.5, h=0.25, bits=24, enabled=True):
  c = ConfigDict()
  c.enabled, c.mode, c.a, c.h, c.fixed_point_bits = enabled, mode, a, h, bits
  return c


# ----------------------------------------------------------------------------- benchmark
def _mode_fn(mode, layer_fns, a, bits):
  if mode == "autodiff":
    return lambda gv, x, c: reversible.midpoint_autodiff(rcfg(a=a), layer_fns, gv, x, c)[:2]
  if mode == "autodiff+remat":
    return lambda gv, x, c: reversible.midpoint_autodiff(rcfg(a=a), layer_fns, gv, x, c,
                                                         remat=True)[:2]
  return lambda gv, x, c: reversible.run_stack(rcfg(mode, a=a, bits=bits), layer_fns, gv, x,
                                               c)[:2]


def synthetic_problem(n_layers, batch, seq, d, s=4, f=None):
  f = f or 2 * d
  gv = synthetic_vars(0, n_layers // 4, s, d, f)
  x = jnp.asarray(np.random.default_rng(99).standard_normal((batch, seq, s, d), np.float32))
  return synthetic_layers(), gv, x, {"gain": jnp.float32(1.0)}


def measure(mode, a, n_layers, args):
  layer_fns, gv, x, consts = synthetic_problem(n_layers, args.batch, args.seq, args.d)
  fn = _mode_fn(mode, layer_fns, a, args.bits)
  params = [g["params"] for g in gv]

  def loss(params, x):
    gvv = [{**g, "params": p} for g, p in zip(gv, params)]
    out, aux = fn(gvv, x, consts)
    return jnp.mean(out ** 2) + aux

  step = jax.jit(jax.grad(loss, argnums=(0, 1)))
  t0 = time.perf_counter()
  compiled = step.lower(params, x).compile()
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  temp = int(mem.temp_size_in_bytes) if mem is not None else -1
  jax.block_until_ready(compiled(params, x))
  times = []
  for _ in range(args.repeat):
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(params, x))
    times.append(time.perf_counter() - t0)
  state_bytes = x.size * x.dtype.itemsize
  return temp, float(np.median(times)), compile_s, state_bytes


def main(argv=None):
  ap = argparse.ArgumentParser(prog="python -m benchmarks.reversible_bench",
                               description=__doc__.split("\n")[0])
  ap.add_argument("--layers", default="4,20,40", help="Comma list of stack depths in layers "
                  "(multiples of 4: the synthetic DDDG pattern).")
  ap.add_argument("--batch", type=int, default=4, help="Sequences in the state.")
  ap.add_argument("--seq", type=int, default=64, help="Sequence length in tokens.")
  ap.add_argument("--d", type=int, default=64, help="Model width of each of the 4 streams.")
  ap.add_argument("--bits", type=int, default=24, help="Fractional bits of the fixed-point "
                  "state (reversible.fixed_point_bits) of the run_stack modes.")
  ap.add_argument("--repeat", type=int, default=5, help="Timed steps per (mode, depth) after one "
                  "warm-up step (median reported).")
  args = ap.parse_args(argv)
  depths = [int(v) for v in args.layers.split(",")]
  modes = [("autodiff", 0.5), ("autodiff+remat", 0.5), ("store_boundaries", 0.5),
           ("invert", 0.5), ("invert", 1.0)]
  print(f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
        f"{jax.devices()[0].device_kind} ({platform.processor() or platform.machine()}), "
        f"jax {jax.__version__}; synthetic DDDG stack, state [B={args.batch}, T={args.seq}, "
        f"S=4, d={args.d}] float32")
  rows = {}
  for mode, a in modes:
    for n in depths:
      temp, t, comp, sb = measure(mode, a, n, args)
      rows[(mode, a, n)] = (temp, t, comp, sb)
  sb = rows[(modes[0][0], modes[0][1], depths[0])][3]
  print(f"# one state = {sb} bytes ({sb / 2**20:.3f} MiB)")
  pairs = list(zip(depths[:-1], depths[1:]))
  hdr = ("| mode | a | " + " | ".join(f"temp MiB @{n}" for n in depths) + " | " +
         " | ".join(f"growth/layer (states) {u}->{w}" for u, w in pairs) +
         f" | temp @{depths[-1]} / @{depths[0]} | " +
         " | ".join(f"step ms @{n}" for n in depths) + f" | time vs autodiff+remat @{depths[-1]} |")
  print(hdr)
  print("|" + "---|" * (hdr.count("|") - 1))
  for mode, a in modes:
    temps = [rows[(mode, a, n)][0] for n in depths]
    times = [rows[(mode, a, n)][1] for n in depths]
    growth = [(temps[i + 1] - temps[i]) / (depths[i + 1] - depths[i]) / sb
              for i in range(len(pairs))]
    ref = rows[("autodiff+remat", 0.5, depths[-1])][1]
    print(f"| {mode} | {a} | " + " | ".join(f"{v / 2**20:.2f}" for v in temps) + " | " +
          " | ".join(f"{v:.4f}" for v in growth) + f" | {temps[-1] / temps[0]:.2f}x | " +
          " | ".join(f"{v * 1e3:.1f}" for v in times) +
          f" | {times[-1] / ref:.2f}x |")


if __name__ == "__main__":
  main()
