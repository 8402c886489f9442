"""The 2B seed's training step at batch 1, 2 and 4, and its gated delta rule, as one record.

    python -m benchmarks.step2b --json benchmarks/results/step2b.json        # one GPU (issue 17)
    python -m benchmarks.step2b --tiny --json /tmp/step2b_tiny.json          # configs/tiny.py, CPU

Issue 17's measurements in one command. Each batch runs `benchmarks.step` (the training loop's
own step: forward with MTP, chunked cross-entropy, backward, AdamW) in a process of its own, so
that one batch running out of memory neither stops nor disturbs the others; such a batch is
recorded with the allocation it asked for. The first batch also profiles one step (the top 25 ops
by device time, `benchmarks.profile_table`). The gated delta rule is timed alone at
B4 x T4096 x 32 heads x 128 (bf16), forward and forward + backward, on the path the model takes
(`layers.deltanet.delta_rule`: the Pallas kernels on GPU, the chunked XLA form elsewhere).

The record: device, date, commit; rows [{batch (sequences per device), seq, n_devices, step_ms,
tokens_per_s, peak_gib, mfu, command}] (an out-of-memory batch has `error` and `asks_gib` instead); delta_rule {shape,
fwd_ms, fwdbwd_ms (one call, waited for), fwd_queued_ms, fwdbwd_queued_ms (calls queued back to
back, as triton's do_bench times FLA), fwd_kernel_ms, fwdbwd_kernel_ms (the profile's kernel time
per call), command, profile_fwd, profile_fwdbwd (top 12 kernels of each)}; profile (the first batch's top 25 ops);
complete (False while batches or the delta rule are still to come: --json is rewritten after
every batch, so a run ended early keeps the batches it measured).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import jax

from benchmarks import profile_table, step
from benchmarks.kernels_bench import bench, delta_inputs
from lightning_jax import metrics
from lightning_jax.config import load_config
from lightning_jax.layers import deltanet

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OOM = re.compile(r"RESOURCE_EXHAUSTED.*?allocate ([0-9.]+)\s*([KMGT]i?B)", re.S)
UNITS = {"KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40,
         "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12}


def asks_gib(text: str) -> float | None:
  """The allocation an out-of-memory error asked for, in GiB (None if the text has none)."""
  m = OOM.search(text)
  return float(m.group(1)) * UNITS[m.group(2)] / 2**30 if m else None


def step_row(cfg: str, batch: int, seq: int, steps: int, sets: list, profile: bool,
             tmp: str) -> dict:
  out = os.path.join(tmp, f"step_b{batch}.json")
  cmd = ["python", "-m", "benchmarks.step", "--config", cfg, "--batch", str(batch),
         "--seq", str(seq), "--steps", str(steps)]
  cmd += [x for s in sets for x in ("--set", s)] + (["--profile"] if profile else [])
  shown = " ".join(cmd)
  print(f"$ {shown}", flush=True)
  p = subprocess.run([sys.executable] + cmd[1:] + ["--json", out], cwd=REPO,
                     capture_output=True, text=True)
  sys.stdout.write(p.stdout[-4000:])
  if p.returncode != 0 or not os.path.exists(out):
    text = p.stdout + p.stderr
    asks = asks_gib(text)
    last = [ln for ln in text.strip().splitlines() if ln.strip()][-1:] or ["(no output)"]
    return {"batch": batch, "seq": seq, "command": shown, "asks_gib": asks,
            "error": "out of memory" if asks is not None else last[0][:300]}
  with open(out) as f:
    r = json.load(f)
  row = {"batch": batch, "seq": seq, "n_devices": r["n_devices"], "step_ms": r["step_s"] * 1e3,
         "tokens_per_s": r["tokens_per_s"], "peak_gib": r["peak_mem_bytes"] / 2**30,
         "peak_how": r["peak_mem_how"], "mfu": r["mfu"],
         "flops_per_token": r["flops_per_token"]["total"], "command": shown}
  plan = (r.get("compiled_plan") or {}).get("total")
  if plan is not None:        # the device's own compiled plan, and how far the peak passed it
    row["compiled_plan_gib"] = plan / 2**30
    if "memory_stats" in row["peak_how"]:
      row["peak_minus_plan_gib"] = row["peak_gib"] - row["compiled_plan_gib"]
  if profile:
    row["profile"], row["profile_info"] = r.get("profile", []), r.get("profile_info", {})
  return row


def delta_rule(b: int, t: int, h: int, d: int, iters: int, sets=()) -> dict:
  """Forward and forward+backward of the model's delta-rule path at [b, t, h, d] (bf16), with
  stage_2b's model.deltanet options and the run's --set overrides."""
  cfg = step.apply_overrides(load_config(os.path.join(REPO, "configs", "stage_2b.py")), sets)
  args = delta_inputs(jax.random.PRNGKey(t), b, t, h, d)
  ct = jax.random.normal(jax.random.PRNGKey(1), (b, t, h, d), args[2].dtype)
  rule = lambda *a: deltanet.delta_rule(cfg, *a)[0]

  def fwd_bwd(*a):
    o, vjp = jax.vjp(rule, *a)
    return o, vjp(ct)
  fwd_ms = bench(rule, args, iters)[0]
  fwdbwd_ms = bench(fwd_bwd, args, iters)[0]
  # where the time goes, kernel by kernel (already compiled above, so the trace holds no compile)
  fwd_j, fwd_bwd_j = jax.jit(rule), jax.jit(fwd_bwd)
  jax.block_until_ready((fwd_j(*args), fwd_bwd_j(*args)))
  prof, kern = {}, {}
  for name, f in (("fwd", fwd_j), ("fwdbwd", fwd_bwd_j)):
    rows, info = profile_table.profile_ops(lambda f=f: f(*args), top=12)
    prof[f"profile_{name}"] = rows
    kern[f"{name}_kernel_ms"] = info["op_ms_per_call"]      # every kernel of one call, summed
  # fwd_ms / fwdbwd_ms above time one call from dispatch to the host's wait, so they carry the
  # launch and synchronisation latency of a ~1 ms op. FLA's figures (triton.testing.do_bench)
  # time calls queued back to back; *_queued_ms does the same: `iters` calls dispatched without
  # waiting, then one wait, divided by `iters`.
  queued = {f"{name}_queued_ms": queued_ms(f, args, iters)
            for name, f in (("fwd", fwd_j), ("fwdbwd", fwd_bwd_j))}
  return {"shape": f"B{b}xT{t}x{h}x{d}", "impl": deltanet.resolve_impl(cfg),
          "fwd_ms": fwd_ms, "fwdbwd_ms": fwdbwd_ms, **queued, **kern, "iters": iters, **prof}


def queued_ms(f, args, iters: int) -> float:
  """Milliseconds per call of jitted f with `iters` calls queued back to back (one host wait at
  the end), the median of three such runs."""
  jax.block_until_ready(f(*args))
  runs = []
  for _ in range(3):
    t0 = time.perf_counter()
    outs = [f(*args) for _ in range(iters)]
    jax.block_until_ready(outs)
    runs.append((time.perf_counter() - t0) * 1e3 / iters)
  return sorted(runs)[1]


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(prog="python -m benchmarks.step2b",
                               description=__doc__.split("\n")[0])
  ap.add_argument("--config", default="configs/stage_2b.py", help="Stage config to time.")
  ap.add_argument("--batches", default="1,2,4", help="Comma list of sequences per step "
                  "(one process each).")
  ap.add_argument("--seq", type=int, default=4096, help="Sequence length in tokens.")
  ap.add_argument("--steps", type=int, default=5, help="Timed steps per batch (median "
                  "reported).")
  ap.add_argument("--delta_shape", default="4,4096,32,128", help="B,T,H,D of the delta-rule "
                  "timing (bf16).")
  ap.add_argument("--iters", type=int, default=20, help="Timed calls of the delta rule "
                  "(median reported).")
  ap.add_argument("--no_delta", action="store_true", help="Skip the delta rule's own timing "
                  "(a step-only run beside a full record).")
  ap.add_argument("--delta_variant", action="append", default=[], help="'label:a.b=x,c.d=y': "
                  "also time the delta rule with these overrides (on top of --set), in the same "
                  "process, into the record's delta_variants (repeatable).")
  ap.add_argument("--set", action="append", default=[], help="section.field=value override "
                  "passed to every step run (repeatable).")
  ap.add_argument("--tiny", action="store_true", help="configs/tiny.py at T=64, batch 1, one "
                  "step, a small delta-rule shape (CPU; what CI runs).")
  ap.add_argument("--json", default="", help="Write the record here (default: print only).")
  ap.add_argument("--commit", default="", help="Commit to record (default: the checkout's HEAD).")
  a = ap.parse_args(argv)
  if a.tiny:
    a.config, a.batches, a.seq, a.steps = "configs/tiny.py", "1", 64, 1
    # the record's path is under test, not the model: one DeltaNet layer compiles fastest
    a.set = ["model.n_layers=1", "model.pattern=D", "model.mtp.enabled=False"] + a.set
    a.delta_shape, a.iters = "1,64,2,16", 2
  try:
    batches = [int(x) for x in a.batches.split(",") if x.strip()]
    b, t, h, d = (int(x) for x in a.delta_shape.split(","))
  except ValueError:
    raise SystemExit(f"--batches={a.batches!r} and --delta_shape={a.delta_shape!r} must be "
                     "comma lists of integers (e.g. 1,2,4 and 4,4096,32,128).") from None
  rec = {"device": jax.devices()[0].device_kind,
         "date": f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
         "commit": a.commit or metrics.git_commit(REPO), "config": a.config,
         "mem_fraction": os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", "default (0.75 on GPU)"),
         # the XLA flags every step ran with (e.g. the autotuner's split-K off: PERFORMANCE.md)
         "xla_flags": os.environ.get("XLA_FLAGS", "")}
  # Each batch's line is printed, and the record written, as soon as that batch is measured: a
  # call whose time limit ends the process keeps what it had (session 18 lost a whole H200 call
  # that way). "complete" is False until the delta rule, when asked for, is in.
  rec["rows"], rec["complete"] = [], False
  with tempfile.TemporaryDirectory() as tmp:
    for i, bb in enumerate(batches):
      r = step_row(a.config, bb, a.seq, a.steps, a.set, i == 0, tmp)
      if i == 0:
        rec["profile"] = r.pop("profile", [])
        rec["profile_info"] = r.pop("profile_info", {})
      rec["rows"].append(r)
      print(row_line(r), flush=True)
      _write(rec, a.json)
  if not a.no_delta:
    rec["delta_rule"] = {**delta_rule(b, t, h, d, a.iters, a.set),
                         "command": "python -m benchmarks.step2b --delta_shape "
                                    f"{a.delta_shape} --iters {a.iters}"
                                    + "".join(f" --set {x}" for x in a.set)}
  if a.delta_variant:
    rec["delta_variants"] = []
  for spec in a.delta_variant:
    label, _, sets = spec.partition(":")
    extra = [x for x in sets.split(",") if x.strip()]
    try:
      dv = delta_rule(b, t, h, d, a.iters, list(a.set) + extra)
    except Exception as e:  # noqa: BLE001 (one variant failing must not lose the others)
      dv = {"error": f"{type(e).__name__}: {e}"[:1500]}
    rec["delta_variants"].append({"label": label, "sets": extra, **dv})
    print(variant_line(rec["delta_variants"][-1]), flush=True)
    _write(rec, a.json)
  rec["complete"] = True
  dr = rec.get("delta_rule")
  if dr:
    print(f"delta rule {dr['shape']} ({dr['impl']}): forward {dr['fwd_ms']:.2f} ms, forward + "
          f"backward {dr['fwdbwd_ms']:.2f} ms (one call waited for); queued back to back "
          f"{dr['fwd_queued_ms']:.2f} / {dr['fwdbwd_queued_ms']:.2f} ms; kernels alone "
          f"{dr['fwd_kernel_ms']:.2f} / {dr['fwdbwd_kernel_ms']:.2f} ms")
    for name in ("fwd", "fwdbwd"):
      for row in dr[f"profile_{name}"]:
        print(f"  {name:6s} {row['name'][:60]:60s} {row['calls']:5.0f} {row['ms']:8.3f} ms")
  _write(rec, a.json)
  return rec


def variant_line(v: dict) -> str:
  """One delta-rule variant's summary line, with its kernels by name."""
  if "error" in v:
    return f"delta variant {v['label']}: {v['error']}"
  kern = lambda name: ", ".join(f"{r['name'][:28]} {r['ms']:.3f}" for r in v[f"profile_{name}"]
                                if not r["name"].startswith(("copy", "Memcpy")))
  return (f"delta variant {v['label']}: forward {v['fwd_queued_ms']:.3f} ms queued "
          f"({v['fwd_kernel_ms']:.3f} kernels: {kern('fwd')}), forward + backward "
          f"{v['fwdbwd_queued_ms']:.3f} ms queued ({v['fwdbwd_kernel_ms']:.3f} kernels: "
          f"{kern('fwdbwd')})")


def row_line(r: dict) -> str:
  """One batch's summary line."""
  if "error" in r:
    return (f"B{r['batch']} x T{r['seq']}: {r['error']}"
            + (f" (asks {r['asks_gib']:.1f} GiB)" if r.get("asks_gib") is not None else ""))
  return (f"B{r['batch']} x T{r['seq']}: {r['step_ms']:.1f} ms, {r['tokens_per_s']:,.0f} "
          f"tokens/s, peak {r['peak_gib']:.2f} GiB, MFU {r['mfu'] * 100:.1f}%")


def _write(rec: dict, path: str):
  """The record as JSON at `path` (nothing when empty), replaced in one rename."""
  if not path:
    return
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    json.dump(rec, f, indent=1, default=float)
  os.replace(tmp, path)


if __name__ == "__main__":
  main()
