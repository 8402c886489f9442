"""Kernels vs XLA references vs named anchors on one GPU (docs/PERFORMANCE.md, "Kernels").

    python -m benchmarks.kernels_bench [--small] [--only ceilings,delta,prep,gsa,resources]
                                       [--iters 10] [--json out.json]
    python -m benchmarks.kernels_bench --only resources --triton_python /venv/with/triton/python

ceilings  an 8192^3 bf16 matmul (TFLOP/s) and a 2 GiB device-to-device copy (bytes read + written)
delta     gated delta rule, 32 heads x 128, bf16 q/k/v, float32 decay and beta, at B4 T4096 and
          B2 T8192: the XLA chunked reference (ops/delta_rule/reference.py) forward and
          forward+backward, and the Pallas kernel path (ops/delta_rule/kernel.py) in the
          settings of DELTA_SETTINGS (the default, the XLA prep, bf16 saved states, one pipeline
          stage, a wider dS block), each with its relative error against the XLA path on the
          same inputs (output, dq/dk/dv/dlog_alpha/dbeta). Anchor: FLA 0.6.0
          chunk_gated_delta_rule 4.60 ms fwd+bwd, 1.54 / 1.08 ms fwd (B4T4096 / B2T8192).
          (The removed backward variants' numbers: docs/PERFORMANCE.md, "Gated delta rule".)
prep      the chunk prep alone at B4 T4096 (32 x 128, chunk 64): XLA float32 vs the Pallas prep
          kernel (forward; backward by the Pallas backward kernel at 4 / 8 warps), with the
          Pallas outputs' / input gradients' relative error vs XLA; then each kernel of the
          recurrence alone on random operands (forward, reverse dS, dS + per-chunk gradients),
          float32 and bf16 saved states.
resources registers / spills / shared memory per kernel for sm_90 from the Triton IR, on any host
          (needs --triton_python, a Python with `pip install triton`; no GPU).
gsa       attention core at T=8192, 16 heads x 256, bf16: ops.sparse_attention.api.attend
          over a synthetic selection of 128 causal keys per query (k_max 256 slots, the rest -1),
          modes gather and dense_masked, forward and forward+backward; vs
          jax.nn.dot_product_attention(is_causal=True, implementation="cudnn") and "xla".
          Anchor: cuDNN 4.39 ms fwd+bwd.
Times: median of --iters runs after warm-up, host clock around blocking calls (each call is
milliseconds, so the clock's overhead is small). --small runs the same code at toy shapes (CPU).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from lightning_jax.ops.delta_rule import api as delta_rule_op
from lightning_jax.ops.delta_rule import kernel as kdr
from lightning_jax.ops.pallas import lower_for_gpu, on_gpu
from lightning_jax.ops.sparse_attention import api as attention_op
from lightning_jax.ops.stream_grad import kernel as sg_kernel

RESULTS: dict = {}
JSON_PATH = ""   # set by main: every recorded row is written at once, so a timed-out run keeps them


def _flush():
  if JSON_PATH:
    with open(JSON_PATH + ".tmp", "w") as f:
      json.dump(RESULTS, f, indent=1)
    os.replace(JSON_PATH + ".tmp", JSON_PATH)


def bench(fn, args, iters=10, warmup=2):
  f = jax.jit(fn)
  t0 = time.perf_counter()
  out = f(*args)
  jax.block_until_ready(out)
  first = time.perf_counter() - t0
  for _ in range(warmup - 1):
    jax.block_until_ready(f(*args))
  ts = []
  for _ in range(iters):
    t = time.perf_counter()
    jax.block_until_ready(f(*args))
    ts.append(time.perf_counter() - t)
  return float(np.median(ts)) * 1e3, first, out


def record(name, ms, note="", **extra):
  RESULTS[name] = {"ms": ms, "note": note, **extra}
  _flush()
  print(f"{name:<58} {ms:9.3f} ms  {note}", flush=True)


def guarded(name, fn):
  try:
    fn()
  except Exception as e:  # noqa: BLE001 (report and go on: one failure must not lose the rest)
    RESULTS[name] = {"error": f"{type(e).__name__}: {e}"[:2000]}
    _flush()
    print(f"{name:<58} FAILED {type(e).__name__}: {str(e)[:600]}", flush=True)
    traceback.print_exc(limit=3)


def _rel(a, b):
  a = np.asarray(jnp.asarray(a, jnp.float32), np.float64)
  b = np.asarray(jnp.asarray(b, jnp.float32), np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


# ----------------------------------------------------------------------------- ceilings
def ceilings(small):
  n = 512 if small else 8192
  k = jax.random.split(jax.random.PRNGKey(0), 2)
  a = jax.random.normal(k[0], (n, n), jnp.bfloat16)
  b = jax.random.normal(k[1], (n, n), jnp.bfloat16)
  ms, _, _ = bench(lambda a, b: a @ b, (a, b), iters=20)
  record(f"matmul bf16 {n}^3", ms, f"{2 * n ** 3 / ms / 1e9:.0f} TFLOP/s", tflops=2 * n**3 / ms / 1e9)
  m = (1 << 20) if small else (1 << 30)
  x = jax.random.normal(k[0], (m,), jnp.bfloat16)
  ms, _, _ = bench(lambda x: x * 2, (x,), iters=20)
  gbs = 2 * 2 * m / ms / 1e6
  record(f"copy-scale {2 * m / 2**30:.2f} GiB", ms, f"{gbs:.0f} GB/s read+write", gbs=gbs)


# ----------------------------------------------------------------------------- delta rule
def delta_inputs(key, b, t, h, d):
  ks = jax.random.split(key, 6)
  unit = lambda a: a / jnp.linalg.norm(a, axis=-1, keepdims=True)
  q = unit(jax.random.normal(ks[0], (b, t, h, d))).astype(jnp.bfloat16)
  k = unit(jax.random.normal(ks[1], (b, t, h, d))).astype(jnp.bfloat16)
  v = jax.random.normal(ks[2], (b, t, h, d)).astype(jnp.bfloat16)
  la = -jax.nn.softplus(jax.random.normal(ks[3], (b, t, h)) - 2.0) * jax.random.uniform(
      ks[4], (1, 1, h), minval=0.1, maxval=8.0)
  la = jnp.maximum(la, np.log(1e-6)).astype(jnp.float32)
  beta = jax.nn.sigmoid(jax.random.normal(ks[5], (b, t, h))).astype(jnp.float32)
  return q, k, v, la, beta


DELTA_SETTINGS = [   # (label, DeltaRuleOptions fields, run at both shapes)
    ("default (prep=pallas split, num_stages 2)", {}, True),
    ("prep=xla", dict(prep="xla"), True),
    ("state bf16", dict(state_dtype="bfloat16"), True),
    ("num_stages 1", dict(num_stages=1), True),
    ("prep_fwd fused, prep warps 8", dict(prep_fwd="fused", num_warps_prep_bwd=8), True),
    ("fwd_o split", dict(fwd_o="split"), True),
    ("dS BV 64 warps 8", dict(block_v_bwd=64, num_warps_bwd=8), False),
    # session 19 (its defaults: the series inverse, bf16 W / Uv): the settings before it, the
    # inverse and W / Uv in one kernel, the two residual layouts, the forward kernel's shape
    ("inverse substitution, W / Uv float32", dict(inverse_diag="substitution",
                                                  wy_dtype="float32"), True),
    ("prep_fwd split2", dict(prep_fwd="split2"), True),
    ("residuals qk", dict(residuals="qk"), True),
    ("prep_bwd_p", dict(prep_bwd_p=True), True),
    ("forward kernel 8 warps", dict(num_warps=8), False),
    ("forward kernel BV 32", dict(block_v=32), False),
]


def _errs(og, ref):
  o, g = og
  if "o" not in ref:
    return {}
  return {"o": _rel(o, ref["o"]), "dq": _rel(g[0], ref["g"][0]), "dk": _rel(g[1], ref["g"][1]),
          "dv": _rel(g[2], ref["g"][2]), "dlog_alpha": _rel(g[3], ref["g"][3]),
          "dbeta": _rel(g[4], ref["g"][4])}


def delta(small, iters):
  """XLA chunked reference and the kernel path's settings (DELTA_SETTINGS) at both shapes."""
  shapes = [(2, 128, 4, 16)] if small else [(4, 4096, 32, 128), (2, 8192, 32, 128)]
  for b, t, h, d in shapes:
    tag = f"B{b}T{t}"
    args = delta_inputs(jax.random.PRNGKey(t), b, t, h, d)
    ct = jax.random.normal(jax.random.PRNGKey(1), (b, t, h, d), jnp.bfloat16)

    def fwd(rule):
      return lambda q, k, v, la, be: rule(q, k, v, la, be)[0]

    def fwd_bwd(rule):
      def f(q, k, v, la, be):
        o, vjp = jax.vjp(lambda *a: rule(*a)[0], q, k, v, la, be)
        return o, vjp(ct)
      return f

    xla = lambda *a: delta_rule_op.chunked(*a, chunk_size=64)
    ref = {}

    def run_xla():
      ms, c, o = bench(fwd(xla), args, iters)
      record(f"delta {tag} XLA chunked fwd", ms, f"(compile+first {c:.1f} s)")
      ms, c, og = bench(fwd_bwd(xla), args, iters)
      record(f"delta {tag} XLA chunked fwd+bwd", ms, f"(compile+first {c:.1f} s)")
      ref["o"], ref["g"] = og
    guarded(f"delta {tag} XLA", run_xla)

    for label, st, both in DELTA_SETTINGS:
      if small:
        st = dict(st, block_v=8, block_v_bwd=8, block_k_grads=8)
      elif not both and (b, t) != shapes[0][:2]:
        continue
      opts = delta_rule_op.DeltaRuleOptions(chunk=64, **st)

      def run_kernel(opts=opts, label=label):
        rule = lambda *a: kdr.chunk_gated_delta_rule(*a, options=opts)
        ms, c, o = bench(fwd(rule), args, iters)
        record(f"delta {tag} kernel fwd [{label}]", ms, f"(compile+first {c:.1f} s)")
        ms, c, og = bench(fwd_bwd(rule), args, iters)
        errs = _errs(og, ref)
        record(f"delta {tag} kernel fwd+bwd [{label}]", ms,
               "rel err vs XLA " + " ".join(f"{k}={v:.1e}" for k, v in errs.items()),
               errors=errs)
      guarded(f"delta {tag} kernel [{label}]", run_kernel)


def _plan(h, options, dot=jnp.bfloat16, state=None):
  """The kernels' per-call plan (kernel._Plan) for calling one kernel alone."""
  bf = jnp.dtype(dot)
  return kdr._Plan(options, options.chunk, h, bf, bf, jnp.dtype(state or options.state_dtype),
                   not on_gpu())


def prep(small, iters):
  """The chunk prep alone (W, Uv, P, Qg, Kd, ge from q, k, v, log decay, beta), forward and
  forward+backward: XLA (float32, autodiff) vs the Pallas kernel (bf16 outputs), with the
  Pallas outputs' and input gradients' relative error against the XLA prep. Then each kernel
  of the recurrence alone (forward; reverse dS; per-chunk gradients) on random operands."""
  b, t, h, d = (2, 128, 4, 16) if small else (4, 4096, 32, 128)
  c = 64
  tag = f"B{b}T{t}"
  args = delta_inputs(jax.random.PRNGKey(t), b, t, h, d)
  base = dict(chunk=c, num_stages=1, block_k_grads=8 if small else 32)

  def xla_prep(*a):     # the XLA prep with the Pallas prep's outputs (bf16, ge broadcast)
    w, uv, p, qg, kd, ge = kdr._prep(*a, c)
    return tuple(x.astype(jnp.bfloat16) for x in (w, uv, p, qg, kd)) + (
        jnp.broadcast_to(ge[..., None], ge.shape + (c,)),)
  variants = [("XLA f32", None)] + [
      (f"pallas {pf}, warps fwd {nf}{f' (inverse {ni})' if ni else ''} bwd {nb}",
       _plan(h, delta_rule_op.DeltaRuleOptions(**base, prep_fwd=pf, num_warps_prep=nf,
                                               num_warps_inv=ni, num_warps_prep_bwd=nb)))
      # the old default (fused, 8 warps), the default (split, inverse at 2 warps, backward at 4),
      # then 4 warps for the split's A and W / Uv kernels, and the fused prep at 4 warps
      for pf, nf, ni, nb in (("fused", 8, 0, 8), ("split", 8, 2, 4), ("split", 4, 2, 4),
                             ("fused", 4, 0, 4))]
  ref = {}
  for label, plan in variants:
    def run(label=label, plan=plan):
      f = xla_prep if plan is None else (lambda *a: kdr._prep_pallas(*a, plan))
      ms, _, out = bench(f, args, iters)
      errs = {} if not ref else {n: _rel(x, r) for n, x, r in
                                 zip(("W", "Uv", "P", "Qg", "Kd", "ge"), out, ref["out"])}
      record(f"prep {tag} fwd [{label}]", ms,
             " ".join(f"{k}={v:.1e}" for k, v in errs.items()), errors=errs)
      if "cts" not in ref:
        ref["cts"] = tuple(jax.random.normal(jax.random.PRNGKey(7 + i), x.shape, x.dtype)
                           for i, x in enumerate(out))

      def fb(cts, *a):
        _, vjp = jax.vjp(f, *a)
        return vjp(cts)
      ms, _, g = bench(fb, (ref["cts"],) + tuple(args), iters)
      errs = {} if "g" not in ref else {n: _rel(x, r) for n, x, r in
                                        zip(("dq", "dk", "dv", "dla", "dbeta"), g, ref["g"])}
      record(f"prep {tag} fwd+bwd [{label}]", ms,
             " ".join(f"{k}={v:.1e}" for k, v in errs.items()), errors=errs)
      if plan is None:
        ref["out"], ref["g"] = out, g
    guarded(f"prep {tag} [{label}]", run)

  # the recurrence's kernels alone, random operands of the benchmark's shapes
  n, bh, bf = t // c, b * h, jnp.bfloat16
  ks = jax.random.split(jax.random.PRNGKey(3), 12)
  rnd = lambda i, shape, dt=bf, s=0.1: (s * jax.random.normal(ks[i], shape)).astype(dt)
  w, uv, qg, kd = (rnd(i, (bh, n, c, d)) for i in range(4))
  p = rnd(4, (bh, n, c, c))
  gev = jnp.full((bh, n, c), 0.9, jnp.float32)
  s0 = rnd(5, (bh, d, d), jnp.float32)
  do = rnd(6, (b, t, h, d))
  dsn = rnd(7, (bh, d, d), jnp.float32)
  # block_v 32: twice the forward's programs (256 -> 512 at B4 x 32 heads, on 132 SMs), each
  # with half the state rows; the forward kernel alone is about FLA's whole forward (0.96 ms)
  for label, st in (("f32 states", dict(num_stages=1)),
                    ("bf16 states", dict(state_dtype="bfloat16", num_stages=1)),
                    ("f32 states, num_stages 2", dict(num_stages=2)),
                    ("f32 states, num_stages 2, fwd BV 32", dict(num_stages=2, block_v=32)),
                    ("f32 states, num_stages 2, fwd_o split", dict(num_stages=2, fwd_o="split"))):
    st = {"block_v": 8 if small else 64, **st}
    if small:
      st["block_v"] = min(st["block_v"], 8)
    opts = _plan(h, delta_rule_op.DeltaRuleOptions(
        chunk=c, block_v_bwd=8 if small else 32, block_k_grads=8 if small else 32, **st))

    def run_rec(label=label, opts=opts):
      ms, _, (o, hs, sn) = bench(lambda *a: kdr._fwd_call(*a, opts), (w, uv, p, qg, kd, gev, s0),
                                 iters)
      record(f"recurrence {tag} fwd kernel [{label}]", ms)
      ms, _, _ = bench(lambda *a: kdr._states_call(*a, opts), (w, p, qg, kd, gev, do, dsn), iters)
      record(f"recurrence {tag} dS kernel [{label}, BV {opts.block_v_bwd}]", ms)
      ms, _, _ = bench(lambda *a: kdr._bwd_call_split_pallas(*a, opts),
                       (w, uv, p, qg, kd, gev, hs, do, dsn), iters)
      record(f"recurrence {tag} dS + grads kernels [{label}]", ms)
    guarded(f"recurrence {tag} [{label}]", run_rec)


_TRITON_COMPILE = r"""
import os, subprocess, sys, triton
from triton.backends.compiler import GPUTarget
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
tool = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump")
for path in sys.argv[1:]:
  warps, stages = (int(x) for x in path.rsplit(".", 2)[-2].split("w")[-1].split("s"))
  try:
    k = triton.compile(path, target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": warps, "num_stages": stages})
  except Exception as e:  # noqa: BLE001
    print(path, "COMPILE FAILED", type(e).__name__, str(e)[:400], flush=True)
    continue
  cub = path + ".cubin"
  open(cub, "wb").write(k.asm["cubin"])
  r = subprocess.run([tool, "--dump-resource-usage", cub], capture_output=True, text=True)
  use = " ".join(l.split("Resource usage:")[-1].strip() for l in r.stdout.splitlines()
                 if "REG" in l)
  # layout conversions in Triton's GPU IR and barriers in the PTX: each conversion of a tile is
  # a round trip through shared memory (session 20: 31 of them made a kernel run at 0.66 TB/s)
  conv = k.asm["ttgir"].count("ttg.convert_layout")
  bars = k.asm["ptx"].count("bar.sync")
  print(path, f"shared={k.metadata.shared}", use.split(" TEXTURE")[0],
        f"CONVERT:{conv} BAR:{bars}", flush=True)
"""


def resources(small, triton_python):
  """Per-kernel registers / spills (STACK) / shared memory / layout conversions / barriers of the
  delta rule's and the streams' gradient Pallas kernels for sm_90, without a GPU: lower each
  for CUDA here (ops.pallas.lower_for_gpu), keep each kernel's Triton IR, and compile it with
  the `triton` package of --triton_python (a Python with `pip install triton`; ptxas /
  cuobjdump ship in its wheel). Uses a private JAX hook
  (jax._src.pallas.triton.pallas_call_registration) to see the IR: diagnostic only."""
  import jax._src.pallas.triton.pallas_call_registration as reg
  if not triton_python:
    print("resources: pass --triton_python /path/to/python (with the triton package)")
    return
  out = tempfile.mkdtemp(prefix="gdr_ttir_")
  orig = reg.lowering.lower_jaxpr_to_triton_module
  seen = []

  def dump(jaxpr, *a, **k):
    res = orig(jaxpr, *a, **k)
    caller = sys._getframe(1).f_locals
    name = str(jaxpr.debug_info.func_name)
    path = os.path.join(out, f"{name}_{len(seen)}.w{caller['num_warps']}s{caller['num_stages']}"
                             f".ttir")
    with open(path, "w") as fh:
      fh.write(res.module.operation.get_asm())
    seen.append(path)
    return res
  d = 16 if small else 128
  b, t, h = 1, 128, 2
  args = delta_inputs(jax.random.PRNGKey(0), b, t, h, d)
  reg.lowering.lower_jaxpr_to_triton_module = dump
  try:
    for label, st, _ in DELTA_SETTINGS:
      if st.get("prep", "pallas") != "pallas":
        continue
      opts = delta_rule_op.DeltaRuleOptions(chunk=64, gpu_lowering=True, **st)
      rule = lambda *a, opts=opts: kdr.chunk_gated_delta_rule(*a, options=opts)[0]

      def f(*a, rule=rule):
        o, vjp = jax.vjp(rule, *a)
        return o, vjp(o)
      n0 = len(seen)
      guarded(f"resources lower [{label}]", lambda f=f: lower_for_gpu(f, *args))
      # the primal alone takes its own (lean) kernels
      guarded(f"resources lower primal [{label}]", lambda rule=rule: lower_for_gpu(rule, *args))
      print(f"# {label}: {[os.path.basename(p) for p in seen[n0:]]}", flush=True)
    # the streams' gradient kernels at stage_2b's B1 shape (their default blocks)
    n, ns, w, m = 4096, 4, 4096, 24
    bf, f32 = jnp.bfloat16, jnp.float32
    sds = jax.ShapeDtypeStruct
    sg_args = (sds((n, ns, w), bf), sds((n, ns, w), bf), sds((n, w), bf), sds((n,), f32),
               sds((n,), f32), sds((n, ns), f32), sds((n, ns, ns), f32), sds((n, m), f32),
               sds((ns * w, m), bf))
    for prod in ("fma", "mma"):
      guarded(f"resources lower [stream_state_grad {prod}]", lambda prod=prod: lower_for_gpu(
          lambda *a: sg_kernel.state_grad(*a, product=prod, gpu_lowering=True), *sg_args))
    guarded("resources lower [stream_mix_grads]", lambda: lower_for_gpu(
        lambda *a: sg_kernel.mix_grads(*a, gpu_lowering=True), *sg_args[:3],
        sds((n, ns), f32)))
  finally:
    reg.lowering.lower_jaxpr_to_triton_module = orig
  r = subprocess.run([triton_python, "-c", _TRITON_COMPILE] + seen, capture_output=True,
                     text=True)
  for line in r.stdout.splitlines():
    path, rest = line.split(" ", 1)
    name = os.path.basename(path)
    RESULTS[f"resources {name}"] = {"usage": rest}
    print(f"{name:<48} {rest}", flush=True)
  if r.returncode:
    print(r.stderr[-2000:])


# ----------------------------------------------------------------------------- GSA
def gsa(small, iters):
  b, t, h, d, kb, kmax, qc = (1, 256, 2, 32, 16, 32, 64) if small else (1, 8192, 16, 256, 128,
                                                                         256, 512)
  ks = jax.random.split(jax.random.PRNGKey(5), 5)
  q, k, v = (jax.random.normal(ks[i], (b, t, h, d), jnp.bfloat16) for i in range(3))
  ct = jax.random.normal(ks[3], (b, t, h, d), jnp.bfloat16)
  pos = jnp.arange(t)[:, None]
  u = jax.random.uniform(ks[4], (b, t, kb))
  sel = jnp.floor(u * (pos + 1)).astype(jnp.int32)                  # causal random keys
  sel = sel.at[..., 0].set(pos[:, 0])                                 # the query's own key
  sel = jnp.concatenate([sel, -jnp.ones((b, t, kmax - kb), jnp.int32)], axis=-1)
  flops_sparse = 4 * b * t * h * d * kb
  flops_dense = 4 * b * h * d * t * t / 2

  def fb(f):
    def g(q, k, v):
      o, vjp = jax.vjp(f, q, k, v)
      return o, vjp(ct)
    return g

  for mode in ("gather", "dense_masked"):
    def run(mode=mode):
      f = lambda q, k, v: attention_op.attend(q, k, v, sel, qc, mode)
      ms, c, _ = bench(f, (q, k, v), iters)
      record(f"gsa T{t} {mode} fwd", ms, f"useful {flops_sparse / ms / 1e9:.0f} TFLOP/s")
      ms, c, _ = bench(fb(f), (q, k, v), iters)
      record(f"gsa T{t} {mode} fwd+bwd", ms, f"useful {3.5 * flops_sparse / ms / 1e9:.0f} TFLOP/s"
             " (bwd counted 2.5x fwd)")
    guarded(f"gsa {mode}", run)
  for impl in ("cudnn", "xla"):
    def run(impl=impl):
      f = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                       implementation=impl)
      ms, _, _ = bench(f, (q, k, v), iters)
      record(f"dense causal T{t} {impl} fwd", ms, f"{flops_dense / ms / 1e9:.0f} TFLOP/s")
      ms, _, _ = bench(fb(f), (q, k, v), iters)
      record(f"dense causal T{t} {impl} fwd+bwd", ms,
             f"{3.5 * flops_dense / ms / 1e9:.0f} TFLOP/s (bwd counted 2.5x fwd)")
    guarded(f"dense {impl}", run)


def main(argv=None):
  ap = argparse.ArgumentParser(prog="python -m benchmarks.kernels_bench",
                               description=__doc__.splitlines()[0])
  ap.add_argument("--small", action="store_true", help="Run the same code at toy shapes (CPU "
                  "smoke run).")
  ap.add_argument("--only", default="ceilings,delta,gsa", help="Comma list of parts to run "
                  "(ceilings, delta, prep, gsa, resources; see above).")
  ap.add_argument("--iters", type=int, default=10, help="Timed runs per measurement after "
                  "warm-up (median reported).")
  ap.add_argument("--json", default="", help="Also write the results as JSON here.")
  ap.add_argument("--triton_python", "--triton-python", default="",
                  help="For --only resources: a Python interpreter with the triton package.")
  a = ap.parse_args(argv)
  global JSON_PATH
  JSON_PATH = a.json
  dev = jax.devices()[0]
  head = (f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC  {dev.device_kind}  "
          f"{platform.node()}  jax {jax.__version__}")
  print(head, flush=True)
  RESULTS["_meta"] = {"header": head}
  parts = a.only.split(",")
  if "ceilings" in parts:
    guarded("ceilings", lambda: ceilings(a.small))
  if "delta" in parts:
    delta(a.small, a.iters)
  if "prep" in parts:
    prep(a.small, a.iters)
  if "gsa" in parts:
    gsa(a.small, a.iters)
  if "resources" in parts:
    resources(a.small, a.triton_python)
  _flush()


if __name__ == "__main__":
  main()
