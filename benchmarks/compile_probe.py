"""How long XLA takes to compile each part of a training step (compile time, not run time).

    python -m benchmarks.compile_probe --config configs/tiny.py [--batch 8] [--seq 128]
        [--parts forward,grad,update,step] [--set section.field=value ...] [--timeout 240]

Each part is compiled in its own subprocess (so a part that does not finish within --timeout
seconds is reported as such and the others still run; they run in parallel):
  forward   jit(loss_fn)                      the model forward, MTP, chunked CE
  grad      jit(grad(loss_fn))                forward + backward
  update    jit(tx.update + apply_updates)    clip + AdamW over the parameter tree
  step      lightning_jax.run.step.make_train_step      what the training loop compiles
Reports trace+lower seconds, compile seconds and the optimized HLO's instruction and fusion
counts, one JSON line per part. Use it to find which construct makes a backend's compile slow.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import step as S
from lightning_jax import model, optim, sharding
from lightning_jax.config import load_config
from lightning_jax.run.step import make_train_step

PARTS = ("forward", "grad", "update", "step")


def _child(args):
  cfg = S.apply_overrides(load_config(args.config), args.set)
  cfg = S.bench_config(cfg, layers=args.layers, seq=args.seq, batch=args.batch, n_dev=1)
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), ("data", "expert", "tensor"))
  ab = model.abstract_variables(cfg)
  tx, _ = optim.make_optimizer(cfg, ab["params"], 1000)
  opt_abs = jax.eval_shape(tx.init, ab["params"])
  ids = jax.ShapeDtypeStruct((cfg.train.global_batch, cfg.train.seq_len + 2), jnp.int32)
  part = args.part
  if part == "forward":
    fn = jax.jit(lambda p, f, s, i: model.loss_fn(p, f, s, {"ids": i}, cfg)[0])
    a = (ab["params"], ab["frozen"], ab["stats"], ids)
  elif part == "grad":
    fn = jax.jit(jax.grad(lambda p, f, s, i: model.loss_fn(p, f, s, {"ids": i}, cfg)[0]))
    a = (ab["params"], ab["frozen"], ab["stats"], ids)
  elif part == "update":

    def upd(g, o, p):
      u, o = tx.update(g, o, p)
      return optax.apply_updates(p, u), o
    fn = jax.jit(upd)
    a = (ab["params"], opt_abs, ab["params"])
  else:
    state = {**ab, "opt_state": opt_abs, "step": jax.ShapeDtypeStruct((), jnp.int32)}
    fn = jax.jit(make_train_step(cfg, tx, 1, model, mesh))
    a = (state, {"ids": ids})
  t0 = time.perf_counter()
  with sharding.use_mesh(mesh):
    low = fn.lower(*a)
    t1 = time.perf_counter()
    comp = low.compile()
  t2 = time.perf_counter()
  txt = comp.as_text() or ""
  rec = {"part": part, "lower_s": round(t1 - t0, 2), "compile_s": round(t2 - t1, 2),
         "hlo_instructions": sum(1 for line in txt.splitlines() if " = " in line),
         "fusions": txt.count(" fusion("), "while_loops": txt.count(" while("),
         "backend": jax.default_backend()}
  print("RESULT " + json.dumps(rec), flush=True)


def main(argv=None):
  ap = argparse.ArgumentParser(prog="python -m benchmarks.compile_probe",
                               description=__doc__.splitlines()[0])
  ap.add_argument("--config", default="configs/tiny.py", help="Config file (stage) to compile.")
  ap.add_argument("--layers", type=int, default=0, help="Override model.n_layers, a multiple of "
                  "the pattern length (0: the config's).")
  ap.add_argument("--seq", type=int, default=0, help="Sequence length in tokens (0: the "
                  "config's train.seq_len).")
  ap.add_argument("--batch", type=int, default=8, help="Sequences per step (the global batch "
                  "on the one device the parts compile for).")
  ap.add_argument("--parts", default=",".join(PARTS), help="Comma list of parts to compile, "
                  f"each in its own subprocess, in parallel (of {','.join(PARTS)}).")
  ap.add_argument("--set", action="append", default=[], help="section.field=value config "
                  "override (repeatable).")
  ap.add_argument("--timeout", type=float, default=240, help="Seconds from the start (parts run "
                  "in parallel) after which a part still compiling is killed and reported.")
  ap.add_argument("--part", default="", help="Internal: the part this subprocess compiles "
                  "(set by the parent; empty: run as the parent).")
  args = ap.parse_args(argv)
  if args.part:
    return _child(args)
  parts = [p for p in args.parts.split(",") if p]
  bad = [p for p in parts if p not in PARTS]
  if bad:
    raise SystemExit(f"--parts {bad} unknown; expected a comma list of {PARTS}.")
  procs = {}
  base = [sys.executable, "-m", "benchmarks.compile_probe", "--config", args.config,
          "--layers", str(args.layers), "--seq", str(args.seq), "--batch", str(args.batch)]
  for s in args.set:
    base += ["--set", s]
  t0 = time.perf_counter()
  for p in parts:
    procs[p] = subprocess.Popen(base + ["--part", p], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, env=os.environ.copy())
  for p, pr in procs.items():
    left = max(1.0, args.timeout - (time.perf_counter() - t0))
    try:
      out, _ = pr.communicate(timeout=left)
    except subprocess.TimeoutExpired:
      pr.kill()
      pr.communicate()
      print(json.dumps({"part": p, "compile_s": None,
                        "note": f"did not finish within {args.timeout:.0f} s"}), flush=True)
      continue
    got = [line[7:] for line in out.splitlines() if line.startswith("RESULT ")]
    print(got[0] if got else json.dumps({"part": p, "error": out.strip().splitlines()[-3:]}),
          flush=True)


if __name__ == "__main__":
  main()
