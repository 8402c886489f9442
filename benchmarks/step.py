"""Time one full training step of a stage config, with MFU, peak memory and a per-layer-type split.

    python -m benchmarks.step --config configs/stage_2b.py [--layers 4] [--batch 1] [--seq 4096]
        [--steps 5] [--breakdown | --only_breakdown] [--set model.deltanet.impl=kernel --set ...]
        [--json out.json]

What it runs: lightning_jax.run.step.make_train_step (the training loop's own step: forward, MTP, chunked
cross-entropy, backward, global-norm clip, AdamW, stats update) under jit with the loop's
shardings, on random token ids, one micro-batch of `--batch` sequences per device
(train.global_batch = batch x devices, micro_batch = 0). Parameters come from the config's
initialisers; the frozen Kronecker table (or byte buffers) is random, which costs the same.

Reported:
  step time     median over --steps timed steps after two warm-up steps (host clock around a
                blocking step; the first call's compile time is reported apart)
  tokens/s      global_batch x seq_len / step time
  MFU           counting.flops_per_token(cfg, seq)["total"] x tokens/s / peak, where peak is
                lightning_jax.metrics.peak_flops (datasheet dense bf16; CPU nominal)
  peak memory   device.memory_stats()["peak_bytes_in_use"] where the backend keeps it (GPU),
                otherwise the compiled step's memory_analysis (arguments + temporaries)
  breakdown     (--breakdown) forward+backward of each piece in isolation, jit-compiled alone,
                on the shapes the step sees: one D layer (mHC streams + DeltaNet mixer + FFN/MoE),
                one G layer, the DeltaNet mixer alone, the GSA mixer alone, the FFN/MoE sublayer
                alone, head + chunked cross-entropy; "rest" = step - (n_D x D + n_G x G + MTP G +
                2 x head/CE), i.e. embedding, optimizer update, stats and what isolation misses.

--layers N overrides model.n_layers (a multiple of the pattern length) to fit a big stage on
one device; the report says so. --set section.field=value overrides any config field (ints,
floats, booleans and strings are parsed as Python literals when they parse).
"""
from __future__ import annotations

import argparse
import ast
import datetime
import glob
import json
import math
import os
import platform
import re
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
from jax.sharding import AbstractMesh
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np
import optax

from benchmarks import profile_table
from lightning_jax import counting, gpu_target, memory_plan, metrics as metrics_lib, model, nn
from lightning_jax import optim, sharding
from lightning_jax import tqp
from lightning_jax.config import ConfigError, layer_kinds, load_config, validate
from lightning_jax.layers import deltanet
from lightning_jax.layers import deltanet as dn_lib, sparse_attention as gsa_lib
from lightning_jax.layers import ffn, kronecker
from lightning_jax.layers import moe
from lightning_jax.layers import sparse_attention as gsa
from lightning_jax.ops import pallas
from lightning_jax.ops.head_ce import api as ce_api
from lightning_jax.run.state import frozen_shardings
from lightning_jax.run.state import opt_state_shardings
from lightning_jax.run.step import make_train_step


def _parse_value(s: str):
  try:
    return ast.literal_eval(s)
  except (ValueError, SyntaxError):
    return s


def apply_overrides(cfg, sets):
  for item in sets or []:
    if "=" not in item:
      raise ConfigError(f"--set {item!r} must look like section.field=value.")
    path, val = item.split("=", 1)
    node = cfg
    parts = path.split(".")
    for p in parts[:-1]:
      if p not in node:
        raise ConfigError(f"--set {item!r}: config has no section {p!r} on the path {path!r}.")
      node = node[p]
    if parts[-1] not in node:
      raise ConfigError(f"--set {item!r}: config has no field {path!r}.")
    old = node[parts[-1]]
    v = _parse_value(val)
    if isinstance(old, str) and not isinstance(v, str):
      v = val
    if isinstance(old, float) and isinstance(v, int):
      v = float(v)
    node[parts[-1]] = v
  return cfg


def bench_config(cfg, *, layers: int = 0, seq: int = 0, batch: int = 1, n_dev: int = 1):
  """The config the step runs with: layer count, sequence length, one micro-batch per device."""
  m = cfg.model
  if layers:
    if layers % len(m.pattern):
      raise ConfigError(f"--layers={layers} must be a multiple of the pattern length "
                        f"{len(m.pattern)} (model.pattern={m.pattern!r}).")
    m.n_layers = int(layers)
  if seq:
    cfg.train.seq_len = int(seq)
    m.max_seq_len = max(int(m.max_seq_len), int(seq))
  if batch < 1:
    raise ConfigError(f"--batch={batch} must be at least 1 sequence per device.")
  cfg.train.global_batch = int(batch) * n_dev
  cfg.train.micro_batch = 0
  cfg.train.eval_every = 0
  validate(cfg)
  return cfg


def random_frozen(cfg, key):
  """The frozen tree filled with random values (same cost as real): frozen["embed"] of the
  configured form and, with TQP, random quantized bases (tqp.qbase_specs' init)."""
  ab = kronecker.frozen_abstract(cfg)
  k0, k1, k2 = jax.random.split(key, 3)
  if "table" in ab:
    s = ab["table"]
    out = {"embed": {"table": jax.random.normal(k0, s.shape, jnp.float32).astype(s.dtype)}}
  else:
    v, mb = ab["bytes"].shape
    lengths = jax.random.randint(k2, (v,), 1, mb + 1).astype(jnp.int16)
    by = jax.random.randint(k1, (v, mb), 0, 256).astype(jnp.uint8)
    by = jnp.where(jnp.arange(mb)[None] < lengths[:, None], by, 0).astype(jnp.uint8)
    out = {"embed": {"bytes": by, "lengths": lengths}}
  fspecs = model.frozen_specs(cfg)
  if fspecs:
    out.update(nn.init(fspecs, jax.random.fold_in(key, 1)))
  return out


def peak_memory(device, compiled=None) -> tuple[float, str]:
  """(bytes, how it was read)."""
  try:
    st = device.memory_stats()
  except Exception:  # noqa: BLE001 (backends without stats raise different errors)
    st = None
  if st and "peak_bytes_in_use" in st:
    return float(st["peak_bytes_in_use"]), "device.memory_stats peak_bytes_in_use"
  if compiled is not None:
    ma = compiled.memory_analysis()
    if ma is not None:
      b = sum(float(getattr(ma, f, 0) or 0) for f in
              ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes"))
      return b, "compiled memory_analysis (arguments + outputs + temporaries)"
  return float("nan"), "unavailable"


def _median_time(fn, args, steps: int, warmup: int = 2) -> tuple[float, list]:
  out = None
  for _ in range(warmup):
    out = fn(*args)
    jax.block_until_ready(out)
  ts = []
  for _ in range(steps):
    t = time.perf_counter()
    out = fn(*args)
    jax.block_until_ready(out)
    ts.append(time.perf_counter() - t)
  return float(np.median(ts)), ts


# ----------------------------------------------------------------------------- the step
def zero1_split_dims(cfg, abstract_params, ranks: int):
  """Per parameter leaf, the dim that ZeRO-1 splits over the `ranks` devices of an
  expert-parallel node step (mesh data 1 x expert `ranks`), or -1: the rule of
  sharding.zero1_sharding on that mesh. A routed expert's leaf is already the rank's own (its
  expert dim takes the expert axis, and data has size 1), so it is never split again."""
  node = AbstractMesh((1, ranks, 1), sharding.MESH_AXES)

  def one(ax, a):
    if "expert" in ax:
      return -1
    z = sharding.zero1_sharding(node, sharding.named(node, ax, a.shape), a.shape).spec
    return next((i for i, e in enumerate(z) if e is not None and "expert" in
                 ((e,) if isinstance(e, str) else e)), -1)
  return jax.tree_util.tree_map(one, model.param_axes(cfg), abstract_params,
                                is_leaf=lambda x: isinstance(x, tuple))


def zero1_emulation(tx, split_dims, ranks: int, clip_norm: float):
  """`tx` as one rank of a ZeRO-1 node applies it, on one device: the optimizer state holds the
  rank's 1/ranks slice of every split leaf (the first slice stands in for any rank's), the
  update is computed on that slice of the gradient (the reduce-scatter's result) and written
  into a parameter-sized zero update (the all-gather's buffer). The clip uses the whole
  gradient's norm as the node does; tx's own clip then sees a smaller norm and does nothing.
  Memory and optimizer work are the rank's; the two collectives are not run."""

  def cut(tree):
    return jax.tree_util.tree_map(
        lambda x, d: x if d < 0 else jax.lax.slice_in_dim(x, 0, x.shape[d] // ranks, axis=d),
        tree, split_dims)

  def init(params):
    return tx.init(cut(params))

  def update(grads, state, params=None):
    grads, _ = optax.clip_by_global_norm(clip_norm).update(grads, optax.EmptyState())
    u, state = tx.update(cut(grads), state, cut(params))
    full = jax.tree_util.tree_map(
        lambda g, v, d: v if d < 0 else
        jax.lax.dynamic_update_slice_in_dim(jnp.zeros_like(g), v.astype(g.dtype), 0, d),
        grads, u, split_dims)
    return full, state
  return optax.GradientTransformation(init, update)


def step_parts(cfg, mesh, zero1_ranks: int = 1) -> dict:
  """The training loop's own step jitted with its state's shardings, and the state's abstract
  tree (nothing allocated): {"step", "tx", "abstract", "state_abs", "state_shard", "batch_shard"}.
  zero1_ranks > 1 (one rank's emulation, benchmarks.rank120): the optimizer as one rank of a
  ZeRO-1 node of that many ranks holds it."""
  abstract = model.abstract_variables(cfg)
  p_shard = sharding.tree_shardings(mesh, model.param_axes(cfg), abstract["params"])
  rep = NamedSharding(mesh, P())
  tx, _ = optim.make_optimizer(cfg, abstract["params"], 1000)
  if zero1_ranks > 1:
    tx = zero1_emulation(tx, zero1_split_dims(cfg, abstract["params"], zero1_ranks),
                         zero1_ranks, float(cfg.optim.clip_norm))
  opt_abs = jax.eval_shape(tx.init, abstract["params"])
  o_shard = opt_state_shardings(mesh, opt_abs, p_shard)
  state_shard = {"params": p_shard,
                 "frozen": frozen_shardings(mesh, model, cfg, abstract["frozen"]),
                 "stats": jax.tree_util.tree_map(lambda _: rep, abstract["stats"]),
                 "opt_state": o_shard, "step": rep}
  state_abs = {"params": abstract["params"], "frozen": abstract["frozen"],
               "stats": abstract["stats"], "opt_state": opt_abs,
               "step": jax.ShapeDtypeStruct((), jnp.int32)}
  batch_shard = NamedSharding(mesh, P(("data", "expert"), None))
  step = jax.jit(make_train_step(cfg, tx, 1, model, mesh),
                 in_shardings=(state_shard, {"ids": batch_shard}),
                 out_shardings=(state_shard, rep), donate_argnums=(0,))
  return {"step": step, "tx": tx, "abstract": abstract, "state_abs": state_abs,
          "state_shard": state_shard, "batch_shard": batch_shard}


def compile_for(cfg, card: str, zero1_ranks: int = 1, hlo_out: str = "") -> dict:
  """`step_parts`' step (one device, one micro-batch) compiled with XLA:GPU for `card` on a host
  without one (lightning_jax/gpu_target.py): {"plan": memory_plan.plan_bytes, "xla_flops",
  "compile_s", "optimizer_bytes", "devices"}; with hlo_out the optimized HLO is written there.
  Nothing runs."""
  devs = gpu_target.compile_only_devices(card, 1)
  mesh = sharding.make_mesh(cfg.mesh, devices=devs)
  b, t = cfg.train.global_batch, cfg.train.seq_len
  batch_abs = {"ids": jax.ShapeDtypeStruct((b, t + 2), jnp.int32)}
  with pallas.target_gpu():     # the card's code paths (kernels, cuDNN), not this host's
    parts = step_parts(cfg, mesh, zero1_ranks)
    t0 = time.perf_counter()
    with sharding.use_mesh(mesh):
      compiled = parts["step"].lower(parts["state_abs"], batch_abs).compile()
  compile_s = time.perf_counter() - t0
  text = compiled.as_text()
  if hlo_out:
    with open(hlo_out, "w") as f:
      f.write(text)
  ca = compiled.cost_analysis()
  ca = (ca[0] if ca else {}) if isinstance(ca, (list, tuple)) else (ca or {})
  # a compile-only executable's cost analysis has no FLOP count: nan then
  return {"plan": memory_plan.plan_bytes(compiled),
          "xla_flops": float(ca.get("flops", 0.0)) or float("nan"),
          "compile_s": compile_s, "devices": devs,
          # instructions XLA's own rematerialization pass copied to meet the card's memory
          # (named <op>.remat<k>): work the step repeats that the model did not ask for
          "xla_remat_ops": len(re.findall(r"\.remat\d* = ", text)),
          "optimizer_bytes": float(sum(math.prod(x.shape) * x.dtype.itemsize for x in
                                       jax.tree.leaves(parts["state_abs"]["opt_state"])))}


def build_state(cfg, mesh, key, parts: dict) -> dict:
  """`step_parts`' state built on the mesh's devices (random values)."""
  tx, state_shard = parts["tx"], parts["state_shard"]
  p_shard, rep = state_shard["params"], state_shard["step"]
  specs = model.param_specs(cfg)
  k_p, k_f = jax.random.split(key)
  t0 = time.perf_counter()
  with sharding.use_mesh(mesh):
    params = jax.jit(lambda k: nn.init(specs, k), out_shardings=p_shard)(k_p)
    frozen = jax.jit(lambda k: random_frozen(cfg, k), out_shardings=state_shard["frozen"])(k_f)
    stats = jax.jit(lambda: model.init_stats(cfg), out_shardings=state_shard["stats"])()
    opt_state = jax.jit(tx.init, out_shardings=state_shard["opt_state"])(params)
  jax.block_until_ready(opt_state)
  print(f"state built in {time.perf_counter() - t0:.1f} s", flush=True)
  return {"params": params, "frozen": frozen, "stats": stats, "opt_state": opt_state,
          "step": jax.device_put(jnp.int32(0), rep)}


def compile_then_build(cfg, mesh, key, zero1_ranks: int = 1):
  """The step compiled from the abstract state FIRST, then the state built: as launch.train does
  it, so the device's peak is the step's and never the compiler's (autotuning allocates
  candidate kernels' buffers on the device; with the state already resident that high-water mark
  can exceed the step's: the 2B at B1 measured 35.85 GiB against a 33.54 GiB plan that way).
  Returns (compiled step, state, batch sharding, compile seconds)."""
  parts = step_parts(cfg, mesh, zero1_ranks)
  b, t = cfg.train.global_batch, cfg.train.seq_len
  batch_abs = {"ids": jax.ShapeDtypeStruct((b, t + 2), jnp.int32)}
  with sharding.use_mesh(mesh):
    t0 = time.perf_counter()
    lowered = parts["step"].lower(parts["state_abs"], batch_abs)
    print(f"step traced and lowered in {time.perf_counter() - t0:.1f} s", flush=True)
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
  print(f"step compiled in {compile_s:.1f} s", flush=True)
  return compiled, build_state(cfg, mesh, key, parts), parts["batch_shard"], compile_s


def _attribute(trace: str, dump_dir: str) -> dict:
  """The profile by Python source ({"file": rows, "function": rows}) from the step's optimized
  HLO module as XLA dumped it into dump_dir (the largest jit_step_fn): kernels carry their HLO
  instruction's name only with command buffers off (XLA_FLAGS=--xla_gpu_enable_command_buffer=)."""
  hlo = glob.glob(os.path.join(dump_dir, "*step_fn*after_optimizations.txt"))
  if not hlo:
    raise SystemExit(f"--attribute {dump_dir}: no *step_fn*after_optimizations.txt there; run "
                     f"with XLA_FLAGS='--xla_dump_to={dump_dir} --xla_gpu_enable_command_buffer='.")
  return profile_table.attribution(trace, max(hlo, key=os.path.getsize))


def time_step(cfg, mesh, steps: int, seed: int = 0, profile: bool = False,
              attribute: str = "") -> dict:
  key = jax.random.PRNGKey(seed)
  compiled, state, batch_shard, compile_s = compile_then_build(cfg, mesh, key)
  b, t = cfg.train.global_batch, cfg.train.seq_len
  ids = jax.random.randint(jax.random.fold_in(key, 7), (b, t + 2), 0, cfg.model.vocab_size,
                           jnp.int32)
  ids = jax.device_put(ids, batch_shard)
  with sharding.use_mesh(mesh):
    holder = {"state": state}

    def run():
      holder["state"], m = compiled(holder["state"], {"ids": ids})
      return m
    for _ in range(2):
      m = run()
      jax.block_until_ready(m)
    ts = []
    for _ in range(steps):
      t1 = time.perf_counter()
      m = run()
      jax.block_until_ready(m)
      ts.append(time.perf_counter() - t1)
    prof = {}
    if profile or attribute:     # one more step under jax.profiler: the top 25 ops by time
      trace = os.path.join(tempfile.mkdtemp(prefix="step_"), "t.json.gz")
      prof["profile"], prof["profile_info"] = profile_table.profile_ops(run, 1, keep_trace=trace)
      if attribute:
        prof["profile_by_source"] = _attribute(trace, attribute)
  m = jax.device_get(m)
  mem, mem_how = peak_memory(mesh.devices.flat[0], compiled)
  # this device's own compiled plan beside the measured peak: the peak can only be read against
  # the compile that ran (a plan compiled elsewhere, e.g. --compile_for, may differ)
  plan = memory_plan.plan_bytes(compiled)
  return {"step_s": float(np.median(ts)), "step_times_s": ts, "compile_s": compile_s,
          "loss": float(m["loss"]), "finite": bool(m["finite"]),
          "peak_mem_bytes": mem, "peak_mem_how": mem_how, "compiled_plan": plan, **prof}


# ----------------------------------------------------------------------------- breakdown
def _vjp_timer(f, primals, steps: int, key, name: str = "", fixed=None):
  """Median time of forward + backward of f w.r.t. all primals, with a random cotangent."""
  out_shape = jax.eval_shape(lambda *pr: f(*pr, fixed), *primals)
  ct = jax.tree_util.tree_map(
      lambda s: jax.random.normal(key, s.shape, jnp.float32).astype(s.dtype), out_shape)

  @jax.jit
  def fb(prims, ct, fixed):     # fixed: non-differentiated arguments (arguments, not constants)
    out, vjp = jax.vjp(lambda *pr: f(*pr, fixed), *prims)
    return vjp(ct)
  t0 = time.perf_counter()
  ms = _median_time(fb, (primals, ct, fixed), steps)[0]
  print(f"  isolated fwd+bwd {name or getattr(f, '__name__', 'fn')}: {ms * 1e3:.2f} ms "
        f"(with compile {time.perf_counter() - t0:.1f} s)", flush=True)
  return ms


def _init_sharded(specs, key, mesh):
  """nn.init of a spec tree, each leaf placed by its logical axes on `mesh` (experts split)."""
  ab = jax.eval_shape(lambda k: nn.init(specs, k), key)
  shard = sharding.tree_shardings(mesh, nn.logical_axes(specs), ab)
  return jax.jit(lambda k: nn.init(specs, k), out_shardings=shard)(key)


def breakdown(cfg, mesh, steps: int, seed: int = 0) -> dict:
  """Forward+backward time of each layer type and sublayer in isolation (seconds)."""
  m = cfg.model
  dtype = nn.dtype_of(m.dtype)
  b, t, d = cfg.train.global_batch, cfg.train.seq_len, m.d_model
  key = jax.random.PRNGKey(seed + 11)
  ks = jax.random.split(key, 8)
  consts = model.make_consts(cfg, t)
  x_streams = (jax.random.normal(ks[0], (b, t, m.hc.n_streams, d), jnp.float32)).astype(dtype)
  x_flat = jax.random.normal(ks[1], (b, t, d), jnp.float32).astype(dtype)
  # split the batch like the step does (one micro-batch per device), so that each piece is
  # timed at the per-device shape rather than all of it on one device
  bsh = lambda nd: NamedSharding(mesh, P(("data", "expert"), *([None] * (nd - 1))))
  x_streams = jax.device_put(x_streams, bsh(x_streams.ndim))
  x_flat = jax.device_put(x_flat, bsh(x_flat.ndim))
  out = {}
  with sharding.use_mesh(mesh):
    for kind in sorted(set(m.pattern)):
      lspecs, fspecs = model.layer_specs(cfg, kind), {}
      if cfg.moe.enabled and cfg.tqp.enabled:     # routed experts -> adapters + a random base
        lspecs, fspecs = tqp.tqp_specs(lspecs, cfg)
      p = _init_sharded(lspecs, ks[2], mesh)
      fz = _init_sharded(fspecs, jax.random.fold_in(ks[2], 1), mesh) if fspecs else {}
      st = model.layer_stats(cfg, kind)

      def layer(p, x, fz, kind=kind, st=st):
        y, _, aux, _ = model.layer_apply({"params": p, "frozen": fz, "stats": st}, x, consts,
                                         None, cfg=cfg, kind=kind)
        return y
      out[f"layer_{kind}"] = _vjp_timer(layer, (p, x_streams), steps, ks[3], f"layer_{kind}",
                                        fixed=fz)
      if kind == "D":
        out["mixer_D"] = _vjp_timer(
            lambda pm, x, _: deltanet.deltanet_apply(pm, x, consts, cfg), (p["mixer"], x_flat),
            steps, ks[4], "mixer_D")
      else:
        stg = st.get("mixer")
        out["mixer_G"] = _vjp_timer(
            lambda pm, x, _: gsa.gsa_apply(pm, stg, x, consts, cfg)[0], (p["mixer"], x_flat),
            steps, ks[4], "mixer_G")
      if "ffn_done" not in out:
        if cfg.moe.enabled:
          stm = st.get("moe")
          out["ffn"] = _vjp_timer(
              lambda pm, x, fzm: moe.moe_apply(pm, fzm, stm, x, consts, cfg)[0],
              (p["moe"], x_flat), steps, ks[5], "ffn", fixed=fz.get("moe"))
        else:
          out["ffn"] = _vjp_timer(lambda pf, x, _: ffn.swiglu(pf, x, dtype), (p["ffn"], x_flat),
                                  steps, ks[5], "ffn")
        out["ffn_done"] = True
    out.pop("ffn_done", None)
    w = nn.init({"w": nn.Spec((d, m.vocab_size), ("embed", "vocab"), nn.normal(0.02))}, ks[6])["w"]
    tgt = jax.random.randint(ks[7], (b, t), 0, m.vocab_size, jnp.int32)
    if m.ce_impl == "fused":     # the training loss's head (model.loss_fn)
      head = lambda h, w, tg: ce_api.fused_cross_entropy_loss([h], w, [tg], m.ce_chunk, dtype,
                                                              logits=m.ce_logits)[0]
    else:
      head = lambda h, w, tg: ce_api.chunked_cross_entropy(h, w, tg, m.ce_chunk, dtype,
                                                           m.ce_logits)
    out["head_ce"] = _vjp_timer(head, (x_flat, w), steps, ks[7], "head_ce", fixed=tgt)
  return out


# ----------------------------------------------------------------------------- report
def _plan_note(res: dict) -> str:
  """'; compiled plan X GiB (arguments, temporaries)', and ', peak - plan = +Y GiB' where the
  peak is the device's own (memory_stats)."""
  plan = res.get("compiled_plan") or {}
  if not plan or plan.get("total") is None:
    return ""
  txt = (f"; compiled plan {plan['total'] / 2**30:.2f} GiB (arguments "
         f"{plan['arguments'] / 2**30:.2f}, temporaries {plan['temporaries'] / 2**30:.2f})")
  if "memory_stats" not in res.get("peak_mem_how", ""):
    return txt                   # no device peak to set beside it (CPU: the peak IS the plan)
  return txt + f", peak - plan = {(res['peak_mem_bytes'] - plan['total']) / 2**30:+.2f} GiB"


def report(cfg, res: dict, bd: dict | None, n_dev: int, layers_note: str) -> tuple[str, dict]:
  b, t = cfg.train.global_batch, cfg.train.seq_len
  tokens = b * t
  fpt = counting.flops_per_token(cfg, t)
  peak, peak_note = metrics_lib.peak_flops(jax.devices()[:n_dev], cfg.model.dtype)
  tps = tokens / res["step_s"]
  mfu = tps * fpt["total"] / peak if peak == peak and peak > 0 else float("nan")
  dev = jax.devices()[0]
  kinds = layer_kinds(cfg)
  dn_impl, gsa_att = dn_lib.resolve_impl(cfg), gsa_lib.resolve_attention(cfg.model.gsa)
  rec = {"date": f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC", "device": dev.device_kind,
         "n_devices": n_dev, "host": platform.node(), "stage": cfg.stage,
         "layers": cfg.model.n_layers, "layers_note": layers_note, "pattern": "".join(kinds),
         "batch": b, "seq": t, "dtype": cfg.model.dtype,
         "deltanet_impl": dn_impl,
         "gsa_attention": gsa_att, "tokens_per_s": tps, "mfu": mfu,
         "flops_per_token": fpt, "peak_note": peak_note, **res}
  lines = [f"# {rec['date']}  {dev.device_kind} x{n_dev}  stage {cfg.stage}: "
           f"{cfg.model.n_layers} layers {''.join(kinds)}{layers_note}, B={b} T={t} "
           f"{cfg.model.dtype}, deltanet.impl={dn_impl} "
           f"gsa.attention={gsa_att}",
           f"step {res['step_s'] * 1e3:.1f} ms (median of {len(res['step_times_s'])}; compile "
           f"{res['compile_s']:.1f} s; loss {res['loss']:.3f})  tokens/s {tps:,.0f}  "
           f"model {fpt['total'] / 1e9:.3f} GFLOP/token -> {tps * fpt['total'] / 1e12:.1f} "
           f"TFLOP/s, MFU {mfu * 100:.1f}% ({peak_note})",
           f"peak memory {res['peak_mem_bytes'] / 2**30:.2f} GiB ({res['peak_mem_how']})"
           + _plan_note(res)]
  if res.get("profile"):
    lines.append(profile_table.format_table(res["profile"], res["profile_info"], "profile: "))
  for by, rows in (res.get("profile_by_source") or {}).items():
    lines.append(f"by source {by}: " + "; ".join(f"{r['name']} {r['ms']:.2f} ms"
                                                 for r in rows))
  if bd:
    n_d = kinds.count("D")
    n_g = kinds.count("G") + (1 if cfg.model.mtp.enabled else 0)
    n_ce = 2 if cfg.model.mtp.enabled else 1
    parts = {"D layers": n_d * bd.get("layer_D", 0.0), "G layers (incl. MTP)":
             n_g * bd.get("layer_G", 0.0), "head + CE": n_ce * bd["head_ce"]}
    rest = res["step_s"] - sum(parts.values())
    lines.append("breakdown (forward+backward in isolation, ms): " + ", ".join(
        f"{k} {v * 1e3:.2f}" for k, v in bd.items() if not k.startswith("note")))
    for k, v in parts.items():
      lines.append(f"  {k:<22} {v * 1e3:9.1f} ms  {v / res['step_s'] * 100:5.1f}% of the step")
    lines.append(f"  {'rest (embed, optimizer, ...)':<22} {rest * 1e3:9.1f} ms  "
                 f"{rest / res['step_s'] * 100:5.1f}%")
    rec["breakdown_s"] = bd
    rec["breakdown_parts_s"] = {**parts, "rest": rest}
  return "\n".join(lines), rec


def _compile_only(cfg, a, layers_cfg: int, command: str) -> dict:
  """--compile_for: the step's plan on one `a.compile_for` card, compiled here."""
  card = gpu_target.card_of(a.compile_for)
  cfg = bench_config(cfg, layers=a.layers, seq=a.seq, batch=a.batch, n_dev=1)
  out = compile_for(cfg, card, hlo_out=a.hlo_out)
  b, t = cfg.train.global_batch, cfg.train.seq_len
  fpt = counting.flops_per_token(cfg, t)
  plan = {k: v / 2**30 for k, v in out["plan"].items()}
  rec = {"device": f"{gpu_target.CARDS[card]['description']} (compile only, no device)",
         "date": datetime.date.today().isoformat(), "commit": metrics_lib.git_commit(),
         "command": command,
         "stage": cfg.stage, "layers": int(cfg.model.n_layers), "layers_config": layers_cfg,
         "batch": b, "seq": t, "mem_fraction": memory_plan.mem_fraction(),
         "compile_s": out["compile_s"], "compiled_plan_gib": plan,
         "xla_remat_ops": out["xla_remat_ops"],
         "flops_per_token": fpt["total"], "xla_flops_per_token": out["xla_flops"] / (b * t)}
  print(f"{rec['device']}: {cfg.stage}, {rec['layers']} layers, B{b} x T{t}; compiled in "
        f"{out['compile_s']:.1f} s; plan {plan['total']:.2f} GiB (arguments "
        f"{plan['arguments']:.2f}, temporaries {plan['temporaries']:.2f}; XLA rematerialised "
        f"{out['xla_remat_ops']} ops to fit); FLOPs/token model "
        f"{fpt['total'] / 1e9:.2f} G", flush=True)
  if a.json:
    with open(a.json, "w") as f:
      json.dump(rec, f, indent=1, default=float)
  return rec


def main(argv=None):
  ap = argparse.ArgumentParser(prog="python -m benchmarks.step",
                               description=__doc__.split("\n")[0])
  ap.add_argument("--config", default="configs/stage_2b.py", help="Config file (stage) whose "
                  "training step is timed.")
  ap.add_argument("--layers", type=int, default=0, help="Override model.n_layers, a multiple "
                  "of the pattern length (0: the config's).")
  ap.add_argument("--seq", type=int, default=0, help="Sequence length in tokens (0: the "
                  "config's train.seq_len).")
  ap.add_argument("--batch", type=int, default=1, help="Sequences per device per step.")
  ap.add_argument("--steps", type=int, default=5, help="Timed steps after two warm-up steps "
                  "(median reported); also the timed calls per breakdown piece.")
  ap.add_argument("--breakdown", action="store_true", help="Also time each piece (D layer, G "
                  "layer, mixers, FFN/MoE, head + CE) alone, forward+backward.")
  ap.add_argument("--only_breakdown", action="store_true",
                  help="Skip the full step (its compile takes minutes on a GPU): "
                  "breakdown only.")
  ap.add_argument("--set", action="append", default=[], help="section.field=value config "
                  "override (repeatable).")
  ap.add_argument("--profile", action="store_true", help="Run one more step under "
                  "jax.profiler and report its top 25 ops by device time.")
  ap.add_argument("--attribute", default="", help="With XLA_FLAGS='--xla_dump_to=DIR "
                  "--xla_gpu_enable_command_buffer=': profile one step and sum its kernels by "
                  "the Python file and function that built them (DIR: the dump).")
  ap.add_argument("--compile_for", default="", help="h100 or h200: compile the step for that "
                  "card without one (lightning_jax/gpu_target.py: needs JAX's CUDA plugin, no "
                  "driver) and report its memory plan and FLOP count; nothing runs.")
  ap.add_argument("--hlo_out", default="", help="With --compile_for: write the optimized HLO "
                  "here.")
  ap.add_argument("--json", default="", help="Also write the record as JSON here.")
  a = ap.parse_args(argv)
  cfg = load_config(a.config)
  layers_cfg = int(cfg.model.n_layers)
  apply_overrides(cfg, a.set)
  if a.compile_for:
    return _compile_only(cfg, a, layers_cfg, "python -m benchmarks.step " + " ".join(
        argv if argv is not None else sys.argv[1:]))
  n_dev = len(jax.devices())
  cfg = bench_config(cfg, layers=a.layers, seq=a.seq, batch=a.batch, n_dev=n_dev)
  note = (f" (REDUCED from {layers_cfg} layers)" if a.layers and a.layers != layers_cfg else "")
  mesh = sharding.make_mesh(cfg.mesh)
  if a.only_breakdown:
    bd = breakdown(cfg, mesh, a.steps)
    print("isolated forward+backward (ms): " + ", ".join(
        f"{k} {v * 1e3:.2f}" for k, v in bd.items() if not k.startswith("note")), flush=True)
    if a.json:
      with open(a.json, "w") as f:
        json.dump({"breakdown_s": bd, "stage": cfg.stage, "layers": cfg.model.n_layers,
                   "batch": cfg.train.global_batch, "seq": cfg.train.seq_len,
                   "device": jax.devices()[0].device_kind}, f, indent=1, default=float)
    return bd
  res = time_step(cfg, mesh, a.steps, profile=a.profile, attribute=a.attribute)
  text, rec = report(cfg, res, None, n_dev, note)
  print(text, flush=True)
  if a.json:
    with open(a.json, "w") as f:
      json.dump(rec, f, indent=1, default=float)
  if a.breakdown:
    bd = breakdown(cfg, mesh, a.steps)
    text, rec = report(cfg, res, bd, n_dev, note)
    print(text, flush=True)
    if a.json:
      with open(a.json, "w") as f:
        json.dump(rec, f, indent=1, default=float)
  return rec


if __name__ == "__main__":
  main()
