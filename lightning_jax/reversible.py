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
               Given the choices it would itself have selected, a layer should compute the same
               output (mode `invert` takes its increments from the reuse path, see below).
  aux        : float32 scalar added to the loss (MoE balance terms), differentiable
  stats_j    : non-differentiated per-layer statistics (expert load, score variance)

run_stack returns (x_out, aux_total, stats, choices) with stats/choices stacked [n_groups, ...]
per pattern position.

The midpoint integrator
-----------------------
With f_n(x) = layer_n(x) - x, c0 = h/2, c = 2h:
    p_0 = x;  p_1 = p_0 + c0 f_0(p_0);  p_{n+1} = a p_{n-1} + (1-a) p_n + c f_n(p_n)  (n >= 1)
and the output is p_N. The whole stack is ONE `jax.custom_vjp`; forward and backward are each
one `lax.scan` over layer groups, so compile time does not grow with depth. The backward is the
adjoint of the float integrator, with G_n = dL/dp_n:
    G_n += (1-a) G_{n+1} + J_n^T (c G_{n+1}) - c G_{n+1};   G_{n-1} += a G_{n+1}
where J_n^T is the layer's vjp at p_n, evaluated with the forward's discrete choices (never
reselected); the layer's aux term gets the aux cotangent in the same vjp.

Three modes (cfg.reversible.mode):

* `store_boundaries` (the reference's behaviour): float state; the forward keeps each layer's
  input state p_n and the backward recomputes inside the layer. The reference keeps the pair
  (p_{n-1}, p_n) per layer; p_{n-1} only enters linearly, and consecutive pairs share a state,
  so keeping p_n alone is the same information at half the memory: ONE state per layer.

* `invert`: the forward keeps only the final two states, a small per-layer bit buffer and the
  choices; the backward rebuilds every earlier state with the inverse formula, BIT-EXACTLY. The
  state is carried as a fixed-point integer P = round(p * 2^F) (int32,
  F = cfg.reversible.fixed_point_bits); the layer sees p = P * 2^-F and its increment enters as
  D_n = round(c (layer(p_n) - p_n) 2^F), so every addition is exact. With a = m / 2^k (dyadic,
  m odd), a P_{n-1} is computed as floor(m P_{n-1} / 2^k) and the k low bits that the division
  drops are kept per layer, packed 32 to a uint32 word (MacKay et al. 2018, "Reversible
  Recurrent Neural Networks"). The inverse
      m P_{n-1} = (P_{n+1} - (P_n - floor(m P_n / 2^k)) - D_n) * 2^k + bits_n
  is exact integer arithmetic. For a = 0.5 that is 1 bit per element and layer (1/32 of an
  int32/float32 state); for a = 1 (leapfrog) nothing is kept and memory is flat in depth.
  Exactness needs the backward's D_n to equal the forward's bit for bit. So D_n is always
  computed on the layer's reuse path (choices given; in the forward a first call selects the
  choices and gives aux and stats, a second computes y), fenced by optimization barriers so XLA
  compiles it as the same isolated computation in both scans; in the backward it is computed
  apart from the vjp (whose own linearisation XLA may fuse differently: without this the real
  model's rebuilt states were off by ~10 units of 2^-24). Cost: about two layer forwards in the
  forward pass and two plus the vjp in the backward. A per-layer checksum of P_n (wrapping int32
  sum) is kept and compared in the backward; on a mismatch every gradient is NaN, never
  silently wrong.
  Range: |P| must stay below about 2^29.4 / |m| (|p| < ~42 at F = 24, ~10900 at F = 16); a state
  outside it makes the stack's output NaN (lower fixed_point_bits then).
  Its output differs from the float integrator's by the fixed-point rounding (about 2^-(F+1)
  per layer and element); gradients are the float integrator's adjoint at these states.

* `store_layers`: the same float integrator as store_boundaries, differentiated by ordinary
  autodiff of its lax.scan (`midpoint_autodiff`, not the custom_vjp): each layer keeps for its
  backward what model.remat lets it keep, so the backward rebuilds nothing. It trades the rebuild
  (a second forward of every layer: 331 of 1,470 ms on a 120B rank, H100 profile) for the
  activations of a plain stack, so it is for cards with room to spare: a 120B rank at B1 x T8192
  with model.remat=selective, compiled for an H200, plans 114.6 GB (an H200, not an H100).
  memory_plan.lighter falls back to store_boundaries when it does not fit.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lightning_jax import remat as remat_lib
from lightning_jax.config import ConfigError

LayerFn = Callable

MODES = ("store_boundaries", "invert", "store_layers")


def _slice(tree, i):
  return jax.tree_util.tree_map(lambda a: a[i], tree)


def plain_stack(layer_fns: Sequence[LayerFn], group_vars: Sequence[dict], x, consts,
                remat: str | bool = "none", unroll: bool = False):
  """x <- layer(x) for every layer, lax.scan over groups; ordinary autodiff. remat: what each
  layer keeps for the backward (lightning_jax.remat; a bool means "full" / "none"). unroll
  (model.unroll_layers): the scan unrolled into straight-line code, so that each group's
  residuals are buffers of their own rather than slices of stacked ones (no dynamic slices or
  copies of them in the backward; compile time grows with the number of groups)."""
  fns = [remat_lib.wrap(f, remat) for f in layer_fns]

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
                                            tuple(group_vars), unroll=bool(unroll))
  return x, aux, stats, choices


# ----------------------------------------------------------------------------- checks
def dyadic(a: float, max_k: int = 8, max_m: int = 1 << 8):
  """(m, k) with a == m / 2**k exactly, m odd (or k = 0); None when a is not such a number."""
  for k in range(max_k + 1):
    m = a * (1 << k)
    if m == math.floor(m) and abs(m) < max_m:
      return int(m), k
  return None


def _check_rcfg(rcfg):
  if rcfg.mode not in MODES:
    raise ConfigError(f"reversible.mode={rcfg.mode!r} must be one of {', '.join(MODES)}.")
  if rcfg.a == 0:
    raise ConfigError("reversible.a=0 makes the midpoint integrator non-invertible; "
                      "expected a non-zero a (the paper uses 0.5).")
  if not rcfg.h > 0:
    raise ConfigError(f"reversible.h={rcfg.h} must be positive.")
  if rcfg.mode == "invert":
    if dyadic(float(rcfg.a)) is None:
      raise ConfigError(f"reversible.a={rcfg.a} cannot be inverted exactly; mode 'invert' needs a "
                        f"dyadic a = m / 2^k with k <= 8 and |m| < 256 (e.g. 0.5, 0.75, 1).")
    f = int(rcfg.fixed_point_bits)
    if not 4 <= f <= 28:
      raise ConfigError(f"reversible.fixed_point_bits={f} must be between 4 and 28 "
                        f"(fractional bits of the int32 state).")


def _check_layers(layer_fns, group_vars, x, consts):
  """Shapes at build time: one clear sentence per problem."""
  if len(layer_fns) != len(group_vars):
    raise ValueError(f"run_stack got {len(layer_fns)} layer functions but {len(group_vars)} "
                     f"group_vars entries; expected one per position of the layer pattern.")
  if len(layer_fns) == 0:
    raise ValueError("run_stack got no layer functions; expected at least one.")
  sizes = {int(l.shape[0]) for gv in group_vars for l in jax.tree_util.tree_leaves(gv)}
  if len(sizes) > 1:
    raise ValueError(f"group_vars leaves have different leading (group) sizes {sorted(sizes)}; "
                     f"expected every leaf stacked over the same n_groups.")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"the stack input has dtype {x.dtype}; expected a floating stream state.")
  for j, (fn, gv) in enumerate(zip(layer_fns, group_vars)):
    y, _, aux, _ = jax.eval_shape(lambda v, xx, c, _f=fn: _f(v, xx, c, None), _slice(gv, 0), x,
                                  consts)
    if y.shape != x.shape or y.dtype != x.dtype:
      raise ValueError(f"layer at pattern position {j} returns {y.dtype}{list(y.shape)} for a "
                       f"{x.dtype}{list(x.shape)} input; a reversible stack needs every layer's "
                       f"output to have its input's shape and dtype.")
    if aux.shape != ():
      raise ValueError(f"layer at pattern position {j} returns aux of shape {aux.shape}; "
                       f"expected a scalar.")
  return sizes.pop() if sizes else None


# ----------------------------------------------------------------------------- helpers
def _zero_cotangent(tree):
  def z(l):
    l = jnp.asarray(l)
    if jnp.issubdtype(l.dtype, jnp.inexact):
      return jnp.zeros_like(l)
    return np.zeros(l.shape, jax.dtypes.float0)
  return jax.tree_util.tree_map(z, tree)


def _split_vars(vj):
  """(params, rebuild) so that rebuild(params) == vj; only `params` is differentiated."""
  if isinstance(vj, dict) and "params" in vj:
    rest = {k: v for k, v in vj.items() if k != "params"}
    return vj["params"], lambda p: {**rest, "params": p}
  return {}, lambda p: vj


def _vars_cotangent(vj, dparams):
  ct = _zero_cotangent(vj)
  if isinstance(vj, dict) and "params" in vj:
    ct = {**ct, "params": dparams}
  return ct


def _mid_float(n, p_prev, p_cur, f, h, a):
  """One step of the float integrator: p_{n+1} from (p_{n-1}, p_n) and f_n(p_n)."""
  first = p_cur + (0.5 * h) * f
  rest = a * p_prev + (1.0 - a) * p_cur + (2.0 * h) * f
  return jnp.where(n == 0, first, rest)


def _coeffs(n, h, a):
  """(a_n, b_n, c_n) of step n: p_{n+1} = a_n p_{n-1} + b_n p_n + c_n f_n(p_n)."""
  first = n == 0
  return (jnp.where(first, 0.0, a), jnp.where(first, 1.0, 1.0 - a),
          jnp.where(first, 0.5 * h, 2.0 * h))


def pack_bits(r, k: int):
  """k low bits of each element of int32 `r` -> uint32 [k, ceil(size/32)] (32 bits a word)."""
  flat = r.reshape(-1)
  nw = -(-flat.size // 32)
  flat = jnp.pad(flat, (0, nw * 32 - flat.size)).reshape(nw, 32)
  shifts = jnp.arange(32, dtype=jnp.uint32)
  planes = [jnp.sum(((flat >> b) & 1).astype(jnp.uint32) << shifts, axis=1, dtype=jnp.uint32)
            for b in range(k)]
  return jnp.stack(planes) if k else jnp.zeros((0, nw), jnp.uint32)


def unpack_bits(w, k: int, shape):
  size = math.prod(shape)
  shifts = jnp.arange(32, dtype=jnp.uint32)
  out = jnp.zeros((size,), jnp.int32)
  for b in range(k):
    bits = ((w[b][:, None] >> shifts) & 1).reshape(-1)[:size].astype(jnp.int32)
    out = out | (bits << b)
  return out.reshape(shape)


def _checksum(P):
  return jnp.sum(P, dtype=jnp.int32)   # wraps modulo 2^32: order-independent, exact


# ----------------------------------------------------------------------------- reference
def midpoint_reference(rcfg, layer_fns, group_vars, x, consts):
  """The float integrator written plainly (Python loop over layers), ordinary autodiff.

  Slow and obvious: the test reference for `run_stack`'s gradients. Returns (x_out, aux).
  """
  h, a = float(rcfg.h), float(rcfg.a)
  n_groups = jax.tree_util.tree_leaves(group_vars)[0].shape[0]
  P = len(layer_fns)
  p_prev = p_cur = x
  aux = jnp.zeros((), jnp.float32)
  for n in range(n_groups * P):
    g, j = divmod(n, P)
    y, _, aj, _ = layer_fns[j](_slice(group_vars[j], g), p_cur, consts, None)
    f = y - p_cur
    if n == 0:
      p_new = p_cur + (0.5 * h) * f
    else:
      p_new = a * p_prev + (1.0 - a) * p_cur + (2.0 * h) * f
    p_prev, p_cur = p_cur, p_new
    aux = aux + aj
  return p_cur, aux


def midpoint_autodiff(rcfg, layer_fns, group_vars, x, consts, remat: str | bool = False):
  """The float integrator as a lax.scan with ordinary autodiff: mode `store_layers`, the
  baseline of benchmarks/reversible_bench.py and the tests' reference at depth.

  Each layer keeps what its backward needs from the forward (under `remat`, model.remat's
  policy: "none" everything, "selective" the matmul outputs and kernel residuals, "full" nothing;
  a bool means "full" / "none"), so the backward rebuilds nothing: the same float math as
  store_boundaries, the memory of a plain stack plus the one extra state per layer the integrator
  reads (p_{n-1}). Returns (x_out, aux, stats, choices).
  """
  h, a = float(rcfg.h), float(rcfg.a)
  P = len(layer_fns)
  fns = [remat_lib.wrap(f, remat) for f in layer_fns]

  def body(carry, xs):
    p_prev, p_cur, aux = carry
    gv, g = xs
    stats, choices = [], []
    for j, fn in enumerate(fns):
      n = g * P + j
      y, ch, aj, st = fn(gv[j], p_cur, consts, None)
      p_prev, p_cur = p_cur, _mid_float(n, p_prev, p_cur, y - p_cur, h, a)
      aux = aux + aj
      stats.append(st)
      choices.append(ch)
    return (p_prev, p_cur, aux), (tuple(stats), tuple(choices))

  n_groups = jax.tree_util.tree_leaves(group_vars)[0].shape[0]
  (_, x, aux), (stats, choices) = jax.lax.scan(
      body, (x, x, jnp.zeros((), jnp.float32)),
      (tuple(group_vars), jnp.arange(n_groups, dtype=jnp.int32)))
  return x, aux, stats, choices


# ----------------------------------------------------------------------------- the custom_vjp
def _build(rcfg, layer_fns, n_groups: int, debug: bool, remat: str | bool = "none"):
  """The custom_vjp function (group_vars, x, consts, probe) -> (x_out, aux, stats, choices).

  remat: what each layer's rebuild keeps between its forward and its vjp (lightning_jax.remat):
  "selective" recomputes the layer's elementwise work once more to hold one layer's matmul
  outputs and kernel residuals instead of all its intermediates.

  `probe` is a float32 scalar that does not affect the output. Its cotangent is 0, except with
  debug=True in mode 'invert': then the forward also keeps every state P_n and the probe's
  cotangent is max_n max|P_n(rebuilt in the backward) - P_n(forward)| (exactly 0 when exact).
  """
  mode = rcfg.mode
  h, a = float(rcfg.h), float(rcfg.a)
  P = len(layer_fns)
  invert = mode == "invert"
  if invert:
    m, k = dyadic(a)
    F = int(rcfg.fixed_point_bits)
    lim = float(math.floor(2.0 ** 31 / (2.0 + 2.0 * abs(a)) / max(abs(m), 1)))
    mask = (1 << k) - 1
  group_ids = jnp.arange(n_groups, dtype=jnp.int32)

  def to_fix(p):
    return jnp.round(p.astype(jnp.float32) * (2.0 ** F)).astype(jnp.int32)

  def from_fix(Pi, dtype):
    return (Pi.astype(jnp.float32) * (2.0 ** -F)).astype(dtype)

  def increment(n, y, p):
    """D_n = round(c_n (y - p) 2^F) and whether it is out of range."""
    _, _, c_n = _coeffs(n, h, a)
    fq = (y - p).astype(jnp.float32) * (c_n * (2.0 ** F))
    return jnp.round(fq).astype(jnp.int32), jnp.any(jnp.abs(fq) >= lim)

  def primal(fn, vj, p, ch):
    """The layer's output for the increment D_n, computed the same way in forward and backward:
    always on the reuse path (choices given), fenced by optimization barriers so that XLA
    compiles it as the same isolated computation in both scans."""
    vj, p, ch = jax.lax.optimization_barrier((vj, p, ch))
    y = fn(vj, p, consts_ref[0], ch)[0]
    return jax.lax.optimization_barrier(y)

  consts_ref = [None]

  def a_part(Pi):
    return (Pi * m) >> k if m != 1 else Pi >> k

  # ------------------------------------------------------------------ forward
  def fwd_scan(group_vars, x, consts):
    xdt = x.dtype
    consts_ref[0] = consts

    def body(carry, xs):
      gv, g = xs
      stats, choices, saved = [], [], []
      if invert:
        Pp, Pc, aux, bad = carry
      else:
        pp, pc, aux = carry
      for j, fn in enumerate(layer_fns):
        n = g * P + j
        if invert:
          pc = from_fix(Pc, xdt)
          _, ch, aj, st = fn(gv[j], pc, consts, None)
          y = primal(fn, gv[j], pc, ch)
          D, over = increment(n, y, pc)
          mp = Pp * m if m != 1 else Pp
          rem = jnp.where(n == 0, 0, mp & mask)
          rest = (mp >> k) + (Pc - a_part(Pc)) + D
          Pn = jnp.where(n == 0, Pc + D, rest)
          bad = bad | over | jnp.any(jnp.abs(Pn) >= lim)
          res = (pack_bits(rem, k), _checksum(Pc)) + ((Pc,) if debug else ())
          Pp, Pc = Pc, Pn
        else:
          y, ch, aj, st = fn(gv[j], pc, consts, None)
          res = (pc,)
          pp, pc = pc, _mid_float(n, pp, pc, y - pc, h, a)
        aux = aux + aj
        stats.append(st)
        choices.append(ch)
        saved.append(res)
      carry = (Pp, Pc, aux, bad) if invert else (pp, pc, aux)
      return carry, (tuple(stats), tuple(choices), tuple(saved))

    zero = jnp.zeros((), jnp.float32)
    if invert:
      P0 = to_fix(x)
      bad0 = jnp.any(jnp.abs(x.astype(jnp.float32)) * (2.0 ** F) >= lim)
      carry, ys = jax.lax.scan(body, (P0, P0, zero, bad0), (tuple(group_vars), group_ids))
      Pp, Pc, aux, bad = carry
      out = from_fix(Pc, xdt)
      out = jnp.where(bad, jnp.asarray(jnp.nan, xdt), out)
      final = (Pp, Pc)
    else:
      carry, ys = jax.lax.scan(body, (x, x, zero), (tuple(group_vars), group_ids))
      _, out, aux = carry
      final = ()
    return out, aux, ys, final

  @jax.custom_vjp
  def stack(group_vars, x, consts, probe):
    del probe
    out, aux, (stats, choices, _), _ = fwd_scan(group_vars, x, consts)
    return out, aux, stats, choices

  def stack_fwd(group_vars, x, consts, probe):
    del probe
    out, aux, (stats, choices, saved), final = fwd_scan(group_vars, x, consts)
    res = (group_vars, consts, choices, saved, final, jnp.zeros(x.shape, x.dtype)[(0,) * x.ndim])
    return (out, aux, stats, choices), res

  # ------------------------------------------------------------------ backward
  def stack_bwd(res, cts):
    group_vars, consts, choices, saved, final, x0 = res
    g_out, g_aux = cts[0], cts[1]
    xdt = x0.dtype
    g_aux = jnp.asarray(g_aux, jnp.float32)
    consts_ref[0] = consts

    def layer_vjp(fn, vj, p, ch, u):
      params, rebuild = _split_vars(vj)

      def f(prm, xx):
        y, _, aj, _ = fn(rebuild(prm), xx, consts, ch)
        return y, aj

      # prevent_cse: the recomputation sits in the same scan body as this forward
      with jax.named_scope("rebuild"):   # the layer's forward again, for its vjp
        (y, _), vjp_fn = jax.vjp(remat_lib.wrap(f, remat, prevent_cse=True, rebuild=True),
                                 params, p)
      with jax.named_scope("layer_vjp"):
        dparams, dx = vjp_fn((u.astype(y.dtype), g_aux))
      return y, dparams, dx

    def body(carry, xs):
      gv, ch_g, sv, g = xs
      if invert:
        Pn1, Pc, Gc, Gp, ok, diff = carry
      else:
        Gc, Gp = carry
      dps = [None] * P
      for j in reversed(range(P)):
        n = g * P + j
        an, bn, cn = _coeffs(n, h, a)
        u = cn * Gc
        if invert:
          p = from_fix(Pc, xdt)
          _, dparams, dx = layer_vjp(layer_fns[j], gv[j], p, ch_g[j], u)
          D, _ = increment(n, primal(layer_fns[j], gv[j], p, ch_g[j]), p)
          words, cks = sv[j][0], sv[j][1]
          ok = ok & (_checksum(Pc) == cks)
          if debug:
            diff = jnp.maximum(diff, jnp.max(jnp.abs(Pc - sv[j][2])).astype(jnp.float32))
          A = Pn1 - (Pc - a_part(Pc)) - D
          mp = (A << k) | unpack_bits(words, k, Pc.shape)
          Pm1 = mp // m if m != 1 else mp
          Pm1 = jnp.where(n == 0, Pc, Pm1)
          Pn1, Pc = Pc, Pm1
        else:
          p = sv[j][0]
          _, dparams, dx = layer_vjp(layer_fns[j], gv[j], p, ch_g[j], u)
        Gc, Gp = Gp + bn * Gc + dx.astype(jnp.float32) - u, an * Gc
        dps[j] = dparams
      carry = (Pn1, Pc, Gc, Gp, ok, diff) if invert else (Gc, Gp)
      return carry, tuple(dps)

    G0 = jnp.asarray(g_out, jnp.float32)
    zeros = jnp.zeros_like(G0)
    xs = (tuple(group_vars), choices, saved, group_ids)
    if invert:
      Pp, Pc = final
      carry0 = (Pc, Pp, G0, zeros, jnp.asarray(True), jnp.zeros((), jnp.float32))
      (_, _, Gx, _, ok, diff), dps = jax.lax.scan(body, carry0, xs, reverse=True)
      poison = lambda t: jnp.where(ok, t, jnp.nan).astype(t.dtype)
      Gx = poison(Gx)
      dps = jax.tree_util.tree_map(poison, dps)
      probe_ct = diff
    else:
      (Gx, _), dps = jax.lax.scan(body, (G0, zeros), xs, reverse=True)
      probe_ct = jnp.zeros((), jnp.float32)
    ct_vars = tuple(_vars_cotangent(gv, dp) for gv, dp in zip(group_vars, dps))
    return ct_vars, Gx.astype(xdt), _zero_cotangent(consts), probe_ct

  stack.defvjp(stack_fwd, stack_bwd)
  return stack


def reversible_stack(rcfg, layer_fns: Sequence[LayerFn], group_vars: Sequence[dict], x, consts,
                     probe=None, debug: bool = False, remat: str | bool = "none"):
  """The midpoint integrator as one custom_vjp (see the module docstring).

  `probe`/`debug` exist for the exactness test: with debug=True (mode 'invert') the gradient
  with respect to `probe` is the largest |rebuilt - forward| state difference over all layers.
  remat: what each layer's rebuild keeps for its vjp (see _build).
  """
  _check_rcfg(rcfg)
  n_groups = _check_layers(layer_fns, group_vars, x, consts)
  fn = _build(rcfg, tuple(layer_fns), n_groups, debug and rcfg.mode == "invert",
              remat_lib.mode_of(remat))
  if probe is None:
    probe = jnp.zeros((), jnp.float32)
  return fn(tuple(group_vars), x, consts, probe)


def run_stack(rcfg, layer_fns: Sequence[LayerFn], group_vars: Sequence[dict], x, consts,
              remat: str | bool = "none", unroll: bool = False):
  """Dispatch on the `reversible` config section (plain stack when disabled).

  `remat` (model.remat): in the plain stack and the reversible stack's store_layers mode, what
  each layer keeps from the forward for the backward; in the other modes, which rebuild every
  layer anyway, what each layer's rebuild keeps for its vjp. `unroll` (model.unroll_layers):
  the plain stack's scan unrolled (see plain_stack; the config refuses it with a reversible stack).
  """
  if not rcfg.enabled:
    return plain_stack(layer_fns, group_vars, x, consts, remat=remat, unroll=unroll)
  if rcfg.mode == "store_layers":
    _check_rcfg(rcfg)
    _check_layers(layer_fns, group_vars, x, consts)
    # as in the other modes only the parameters are differentiated (frozen buffers and stats get
    # zero cotangents)
    fixed = [{k: (v if k == "params" else jax.lax.stop_gradient(v)) for k, v in vj.items()}
             if isinstance(vj, dict) and "params" in vj else jax.lax.stop_gradient(vj)
             for vj in group_vars]
    return midpoint_autodiff(rcfg, layer_fns, fixed, x, consts, remat=remat)
  return reversible_stack(rcfg, layer_fns, group_vars, x, consts, remat=remat)
