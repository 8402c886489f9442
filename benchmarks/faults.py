"""Fault injection on the tiny configs (CPU): the long cases of issues 21 and 23, as a table.

    python -m benchmarks.faults [--workdir runs/faults] [--only hang,kill,...] [--steps 12]
        [--json benchmarks/results/faults.json]

Every case runs `python -m launch.train` (and the growth CLIs) as a user would, in subprocesses,
and checks the outcome; results go in docs/RELIABILITY.md. Cases (--only picks some):

  hang_1dev   tiny_moe, one device, XLA_FLAGS=--xla_cpu_multi_thread_eigen=false (the cookbook's
              line): completes within --timeout (it hung in LAPACK trsm before the fix).
  hang_4dev   tiny_moe on a 4-device expert mesh (mesh.expert=4), same flag: completes.
  watchdog    tiny with --debug_hang_step (a step that never returns) and small watchdog
              budgets: the run exits with watchdog.EXIT_CODE naming the step; the same command
              (without the fault) resumes and ends at the uninterrupted run's final loss.
  kill        kill -9 at several moments (while compiling, mid-run, right after a save starts,
              after a checkpoint is committed, at the last step); each resumed run must end at
              the uninterrupted run's final loss with its final checkpoint readable.
  extend      a finished run given twice the steps: refused in one sentence; with
              train.extend_schedule=restart it continues from the LR it reached (no jump to
              mid-cosine); with stretch it runs and says the LR change.
  own_data    the tiny config on a user's own two-domain text: trains as one stream (one note).
  lineage     the cookbook's tiny lineage, its commands exactly as written, timed end to end.

The kill and watchdog cases compare final losses of the last step as printed by launch.train
("final loss ...") and metrics.jsonl (the loss at the final step).
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

from lightning_jax.config import load_config
from lightning_jax.run.setup import resolve_data

REPO = pathlib.Path(__file__).resolve().parents[1]
PY = sys.executable
SINGLE = "--xla_cpu_multi_thread_eigen=false"


def _env(xla=SINGLE):
  e = dict(os.environ, JAX_PLATFORMS="cpu")
  e["XLA_FLAGS"] = xla
  return e


def run(cmd, timeout, env=None, kill_on=None, kill_after=0.0):
  """Run `cmd`; kill -9 it once a stdout/stderr line matches `kill_on` (+kill_after s).
  Returns (rc or 'timeout' or 'killed', output, seconds)."""
  t0 = time.time()
  p = subprocess.Popen(cmd, cwd=REPO, env=env or _env(), stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True, bufsize=1, start_new_session=True)
  lines: queue.Queue = queue.Queue()
  threading.Thread(target=lambda: [lines.put(l) for l in p.stdout], daemon=True).start()
  out, kill_at, killed = [], None, False
  while True:
    try:
      line = lines.get(timeout=0.05)
      out.append(line)
      if kill_on and kill_at is None and re.search(kill_on, line):
        kill_at = time.time() + kill_after
      continue
    except queue.Empty:
      pass
    if kill_at is not None and not killed and p.poll() is None and time.time() >= kill_at:
      os.killpg(p.pid, signal.SIGKILL)
      killed = True
    if p.poll() is not None and lines.empty():
      time.sleep(0.2)
      while not lines.empty():
        out.append(lines.get())
      break
    if time.time() > t0 + timeout:
      os.killpg(p.pid, signal.SIGKILL)
      p.wait()
      return "timeout", "".join(out), time.time() - t0
  return ("killed" if killed else p.returncode), "".join(out), time.time() - t0


def final_loss(workdir):
  recs = [json.loads(l) for l in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()
          if l.strip()]
  steps = [r for r in recs if "loss" in r and "stopped" not in r]
  if not steps:
    return None, None
  last = max(steps, key=lambda r: (r["step"], r["time"]))
  return last["step"], last["loss"]


def train_cmd(config, workdir, *extra):
  return [PY, "-m", "launch.train", f"--config={config}", f"--workdir={workdir}",
          "--no_progress", *extra]


ROWS = []


def row(case, fault, runs, outcome, ok, seconds):
  ROWS.append({"case": case, "fault": fault, "runs": runs, "outcome": outcome, "ok": bool(ok),
               "seconds": round(seconds, 1)})
  print(f"[{'ok' if ok else 'FAIL'}] {case}: {fault} -> {outcome} ({seconds:.0f} s)", flush=True)


# ----------------------------------------------------------------------------- cases
def case_hang(args, data, devices):
  name = f"hang_{devices}dev"
  wd = args.workdir / name
  shutil.rmtree(wd, ignore_errors=True)
  xla = SINGLE + (f" --xla_force_host_platform_device_count={devices}" if devices > 1 else "")
  extra = [f"--config.data.path={data}", f"--config.train.steps={args.steps}",
           "--config.train.total_tokens=0", "--config.train.log_every=1"]
  if devices > 1:
    extra.append(f"--config.mesh.expert={devices}")
  rc, out, dt = run(train_cmd("configs/tiny_moe.py", wd, *extra), args.timeout, _env(xla))
  step, loss = final_loss(wd) if rc == 0 else (None, None)
  row(name, f"tiny_moe, {devices} device(s), {xla}", 1,
      f"completed step {step}, loss {loss:.4f}" if rc == 0 else f"rc={rc}", rc == 0, dt)


def tiny_extra(data, steps, every=4):
  return [f"--config.data.path={data}", f"--config.train.steps={steps}",
          "--config.train.total_tokens=0", f"--config.checkpoint.every_steps={every}",
          "--config.checkpoint.every_seconds=0", "--config.train.log_every=1",
          "--config.train.eval_every=0"]


def baseline(args, data):
  wd = args.workdir / "baseline"
  if not (wd / "metrics.jsonl").exists() or final_loss(wd)[0] != args.steps:
    shutil.rmtree(wd, ignore_errors=True)
    rc, out, dt = run(train_cmd("configs/tiny.py", wd, *tiny_extra(data, args.steps)),
                      args.timeout)
    assert rc == 0, out[-3000:]
    row("baseline", "none (uninterrupted tiny run)", 1, f"loss {final_loss(wd)[1]:.4f}", True, dt)
  return final_loss(wd)


def case_watchdog(args, data, base):
  wd = args.workdir / "watchdog"
  shutil.rmtree(wd, ignore_errors=True)
  k = args.steps // 2 + 1
  cmd = train_cmd("configs/tiny.py", wd, *tiny_extra(data, args.steps),
                  "--config.train.watchdog_min_s=5", "--config.train.watchdog_factor=10")
  rc, out, dt = run(cmd + [f"--debug_hang_step={k - 1}"], args.timeout)
  named = f"step {k} has run" in out
  rc2, out2, dt2 = run(cmd, args.timeout)
  step, loss = final_loss(wd)
  ok = rc == 3 and named and rc2 == 0 and (step, loss) == base
  msg = next((l.strip() for l in out.splitlines() if "watchdog stopped" in l), "no message")
  row("watchdog", f"step {k} never returns", 2,
      f"exit {rc}: {msg[:90]}...; resumed to step {step}, loss {loss} "
      f"({'=' if (step, loss) == base else '!='} uninterrupted)", ok, dt + dt2)


KILLS = (("while compiling", r"compiling the training step", 2.0),
         ("mid-run (step 3)", r"^step 3:", 0.0),
         ("as a save starts (step 4)", r"^step 4:", 0.05),
         ("after a commit (step 5)", r"^step 5:", 0.0),
         ("at the last step", None, 0.0))


def case_kill(args, data, base):
  for label, pattern, delay in KILLS:
    wd = args.workdir / ("kill_" + re.sub(r"\W+", "_", label).strip("_"))
    shutil.rmtree(wd, ignore_errors=True)
    pat = pattern or rf"^step {args.steps}:"
    cmd = train_cmd("configs/tiny.py", wd, *tiny_extra(data, args.steps))
    rc, out, dt = run(cmd, args.timeout, kill_on=pat, kill_after=delay)
    rc2, out2, dt2 = run(cmd, args.timeout)
    step, loss = final_loss(wd)
    ok = rc == "killed" and rc2 == 0 and (step, loss) == base
    resumed = re.search(r"resuming from \S+ \(step (\d+)\)", out2)
    row("kill -9", label, 2, f"resumed from step {resumed.group(1) if resumed else 0}; final "
        f"step {step}, loss {loss} ({'=' if (step, loss) == base else '!='} uninterrupted)",
        ok, dt + dt2)


def case_extend(args, data, base):
  src = args.workdir / "baseline"
  for choice in ("ask", "restart", "stretch"):
    wd = args.workdir / f"extend_{choice}"
    shutil.rmtree(wd, ignore_errors=True)
    shutil.copytree(src, wd)
    extra = tiny_extra(data, 2 * args.steps) + [f"--config.train.extend_schedule={choice}"]
    rc, out, dt = run(train_cmd("configs/tiny.py", wd, *extra), args.timeout)
    if choice == "ask":
      line = next((l for l in out.splitlines() if l.startswith("error:")), "")
      row("extend", f"finished run, train.steps {args.steps} -> {2 * args.steps}", 1,
          f"rc={rc}: {line[:110]}...", rc == 1 and "extend_schedule=restart" in line, dt)
      continue
    recs = [json.loads(l) for l in (wd / "metrics.jsonl").read_text().splitlines()]
    lr = {r["step"]: r["lr"] for r in recs if "lr" in r}
    before, after = lr.get(args.steps), lr.get(args.steps + 1)
    ok = rc == 0 and before is not None and after is not None and (
        after <= before * 1.5 if choice == "restart" else True)
    row("extend", f"same, train.extend_schedule={choice}", 1,
        f"rc={rc}; LR step {args.steps} {before:.3g} -> step {args.steps + 1} {after:.3g}"
        if after else f"rc={rc}", ok, dt)


def case_own_data(args):
  root = args.workdir / "own_text"
  shutil.rmtree(root, ignore_errors=True)
  for dom, src in (("notes", "en"), ("scripts", "code")):
    (root / dom).mkdir(parents=True)
    lines = (REPO / "corpus" / src / f"{src}.jsonl").read_text().splitlines()[:40]
    (root / dom / "a.jsonl").write_text("\n".join(lines) + "\n")
  wd = args.workdir / "own_data"
  shutil.rmtree(wd, ignore_errors=True)
  rc, out, dt = run(train_cmd("configs/tiny.py", wd, f"--config.data.build_from={root}",
                              "--config.train.steps=4", "--config.train.total_tokens=0",
                              "--config.train.eval_every=2"), args.timeout)
  note = next((l.strip() for l in out.splitlines() if "none of the pool domains" in l), "")
  row("own data", "tiny.py on two domains of one's own (no pool layout)", 1,
      f"rc={rc}; {note[:100]}...", rc == 0 and bool(note), dt)


LINEAGE = r"""
set -e
export XLA_FLAGS=--xla_cpu_multi_thread_eigen=false   # see "Known problem" below
R=__R__
S="--config.train.steps=20 --config.train.total_tokens=0"      # steps per stage (any budget works)
python -m launch.train --config=configs/tiny.py --workdir=$R/dense $S --no_progress
D="--config.data.path=$R/dense/data"

python -m growth.dense_to_moe --src $R/dense --dst $R/moe --strategy partition --seed 0 \
  --config=configs/tiny_moe.py $D $S
python -m launch.train --config=configs/tiny_moe.py --workdir=$R/moe $D $S --no_progress

python -m growth.depth_map --src $R/moe --dst $R/deep --mapping 0,1,2,3,0,1,2,3 \
  --config=configs/tiny_deep.py $D $S
python -m launch.train --config=configs/tiny_deep.py --workdir=$R/deep $D $S --no_progress

python -m growth.expand_experts --src $R/deep --dst $R/big_bf16 --ratio 0.5 --router_sigma 0.05 \
  --seed 1337 --config=configs/tiny_120b.py $D $S
python -m growth.to_tqp --src $R/big_bf16 --dst $R/big --config=configs/tiny_120b.py $D $S
python -m launch.train --config=configs/tiny_120b.py --workdir=$R/big $D $S --no_progress

python -m launch.inspect $R/big          # provenance of the TQP step; $R/big_bf16: of the expansion
"""


def case_lineage(args):
  r = args.workdir / "lineage"
  shutil.rmtree(r, ignore_errors=True)
  script = LINEAGE.replace("__R__", str(r))
  t0 = time.time()
  cache = args.workdir / "lineage_compile_cache"      # cold: every command compiles once
  if not args.warm_cache:
    shutil.rmtree(cache, ignore_errors=True)
  p = subprocess.run(["bash", "-c", script], cwd=REPO,
                     env=dict(os.environ, LIGHTNING_JAX_CACHE=str(cache)),
                     capture_output=True, text=True, timeout=args.lineage_timeout)
  dt = time.time() - t0
  (args.workdir / "lineage.log").write_text(p.stdout + p.stderr)
  done = re.findall(r"done: step (\d+)/(\d+) in ([\d.]+)s; final loss ([\d.]+)", p.stdout)
  row("lineage", f"cookbook tiny lineage, commands as written (20 steps/stage), "
      f"{'warm' if args.warm_cache else 'cold'} compilation cache", 1,
      f"rc={p.returncode}; final losses {[float(x[3]) for x in done]}", p.returncode == 0 and
      len(done) == 4, dt)


def main():
  ap = argparse.ArgumentParser(prog="python -m benchmarks.faults",
                               description=__doc__.split("\n")[0])
  ap.add_argument("--workdir", default="runs/faults", help="Directory for the cases' runs, "
                  "logs and data (reused: the baseline run is kept).")
  ap.add_argument("--only", default="hang,watchdog,kill,extend,own_data,lineage",
                  help="Comma list of cases to run (hang runs hang_1dev and hang_4dev).")
  ap.add_argument("--steps", type=int, default=12, help="Training steps of the hang, "
                  "watchdog, kill and extend runs (extend then asks for twice as many).")
  ap.add_argument("--timeout", type=float, default=900, help="Seconds each launch.train "
                  "subprocess may take before it is reported as a timeout.")
  ap.add_argument("--lineage_timeout", type=float, default=3600, help="Seconds the whole "
                  "lineage case (all its commands) may take.")
  ap.add_argument("--warm_cache", action="store_true", help="lineage: keep the compilation "
                  "cache of an earlier lineage run in the same --workdir (default: cold)")
  ap.add_argument("--json", default="", help="Also write the result rows as JSON here "
                  "(default: the table only).")
  args = ap.parse_args()
  args.workdir = pathlib.Path(args.workdir).resolve()
  args.workdir.mkdir(parents=True, exist_ok=True)
  only = set(args.only.split(","))
  data = args.workdir / "data"
  if not (data / "manifest.json").exists():
    resolve_data(load_config("configs/tiny.py"), args.workdir, log=print)
  if "hang" in only:
    case_hang(args, data, 1)
    case_hang(args, data, 4)
  if only & {"watchdog", "kill", "extend"}:
    base = baseline(args, data)
    if "watchdog" in only:
      case_watchdog(args, data, base)
    if "kill" in only:
      case_kill(args, data, base)
    if "extend" in only:
      case_extend(args, data, base)
  if "own_data" in only:
    case_own_data(args)
  if "lineage" in only:
    case_lineage(args)
  print("\n| case | fault | runs | outcome | ok | s |\n|---|---|---|---|---|---|")
  for r in ROWS:
    print(f"| {r['case']} | {r['fault']} | {r['runs']} | {r['outcome']} | "
          f"{'yes' if r['ok'] else 'NO'} | {r['seconds']} |")
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(ROWS, indent=1))
  return 0 if all(r["ok"] for r in ROWS) else 1


if __name__ == "__main__":
  sys.exit(main())
