#!/usr/bin/env bash
# Issue 10 at reduced depth: stage_120b (TQP 4-bit, 460 experts, expert parallel) trained for STEPS
# optimizer steps from a TQP checkpoint grown by the growth CLIs from a randomly initialised
# 9B-shape model, on DEVICES GPUs with LAYERS layers; then per-device peak memory, loss /
# tokens/s / MFU per step, and launch.plan's prediction for the same config.
#
#   bash benchmarks/run_120b_reduced.sh                         # 4 layers on 4 GPUs, 20 steps
#   LAYERS=4 DEVICES=4 STEPS=20 OUT=/tmp/r120 PHASES=init,grow bash benchmarks/run_120b_reduced.sh
#   ... PHASES=train,report ...                                  # (each call < 10 min on x4 H200)
#   TINY=1 bash benchmarks/run_120b_reduced.sh                   # the same pipeline on 4 CPU devices
#
# Environment (defaults in brackets):
#   LAYERS [4]   model.n_layers of every stage (a multiple of 4: the DDDG pattern)
#   DEVICES [4]  mesh.expert of the 120B run (460 experts padded to 464 = DEVICES x 464/DEVICES)
#   STEPS [20]   optimizer steps;  MICRO [1] sequences per device per forward;  ACCUM [1]
#                accumulation steps: global batch = DEVICES x MICRO x ACCUM sequences of seq_len
#   OUT [runs/120b_reduced_L$LAYERS]  logs, metrics.jsonl copy, report.{json,md}, plan.txt
#   RUNS [$OUT/runs]  run directories (checkpoints: ~10 GB 9B-shape, ~40 GB TQP at 4 layers)
#   DATA [benchmarks/data/bundled]  token shards of the bundled corpus (o200k_base, frequency id
#                order, 10% held out: the same as benchmarks/train_gpu.sh). Prepared here if missing;
#                the GPU image has no o200k file, so prepare them on a CPU host beforehand:
#                  python -m launch.prepare_data --input corpus --output benchmarks/data/bundled --val_fraction 0.1
#   PLAN_GB      launch.plan's per-device total to compare with when OUT has no plan.txt
#   PHASES [init,grow,train,report]  any of: init grow train report plan (plan: launch.plan on
#                DEVICES virtual CPU devices; minutes of CPU)
#   EXTRA        more --config.x=y flags for every stage. Default memory settings (every stage, they
#                are part of the model): reversible.mode=invert, model.embed.form=on_the_fly (the
#                launch.plan variant that fits an H200; MEMORY=default keeps the config's own).
#   TWO_STEP [0] 1: growth.expand_experts then growth.to_tqp (two CLIs, a dense intermediate run:
#                ~280 GB at 4 layers full width: too big for the x4 host's disk) instead of
#                growth.expand_to_tqp (the same result in one process)
#   TINY [0]     1: configs/tiny_deep.py -> configs/tiny_120b.py at tiny widths on DEVICES forced
#                CPU devices (tests the pipeline; SMALL overrides of tests/test_lineage.py)
#   PY [python]   WHEELS [shared/wheels]: grain / ml_collections wheels, installed when missing
# Steps (each skipped when its output exists, so a later call continues):
#   init   python -m growth.init --dst $RUNS/init9b --config=configs/stage_9b.py <flags>
#   grow   python -m growth.expand_to_tqp --src $RUNS/init9b --dst $RUNS/tqp120b --config=configs/stage_120b.py
#            <flags> --ratio 0.5 --router_sigma 0.05 --seed 1337
#   train  python -m launch.train --config=configs/stage_120b.py <flags> --workdir=$RUNS/tqp120b --no_progress
#          (resumes the grown step 0; one checkpoint at the end only)
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
LAYERS=${LAYERS:-4}
DEVICES=${DEVICES:-4}
STEPS=${STEPS:-20}
MICRO=${MICRO:-1}
ACCUM=${ACCUM:-1}
TINY=${TINY:-0}
TWO_STEP=${TWO_STEP:-0}
PY=${PY:-python}
OUT=${OUT:-runs/120b_reduced_L${LAYERS}}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
RUNS=${RUNS:-$OUT/runs}
DATA=${DATA:-benchmarks/data/bundled}
PHASES=${PHASES:-init,grow,train,report}
MEMORY=${MEMORY:-reduced}
GLOBAL=$((DEVICES * MICRO * ACCUM))
mkdir -p "$RUNS"
RUNS=$(cd "$RUNS" && pwd)
has() { [[ ",$PHASES," == *",$1,"* ]]; }

if [ "$TINY" = 1 ]; then
  SRC_CFG=configs/tiny_deep.py
  DST_CFG=configs/tiny_120b.py
  export JAX_PLATFORMS=cpu
  export XLA_FLAGS="--xla_force_host_platform_device_count=$DEVICES --xla_cpu_multi_thread_eigen=false --xla_backend_optimization_level=0"
  # tests/test_lineage.py's SMALL widths; moe.shared_width = model.ffn_width as growth.lineage sets it
  MODEL=(--config.model.d_model=32 --config.model.ffn_width=64 --config.moe.shared_width=64
         --config.model.deltanet.n_heads=2 --config.model.deltanet.head_dim=16
         --config.model.deltanet.chunk_size=16 --config.model.gsa.n_heads=1 --config.model.gsa.head_dim=32
         --config.model.gsa.idx_heads=2 --config.model.gsa.idx_dim=8 --config.model.gsa.k_min=4
         --config.model.gsa.k_base=8 --config.model.gsa.k_max=16 --config.model.gsa.query_chunk=32
         --config.model.ce_chunk=128 --config.moe.expert_width=16 --config.tqp.rank=2
         --config.train.seq_len=32 --config.optim.warmup_steps=1)
else
  SRC_CFG=configs/stage_9b.py
  DST_CFG=configs/stage_120b.py
  MODEL=()
  # jax preallocates 75% of each GPU by default; the step needs more than that of an H200's 141 GB
  export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}
fi
if [ "$MEMORY" != default ]; then
  MODEL+=(--config.reversible.mode=invert --config.model.embed.form=on_the_fly)
fi
# every stage: the same depth, data (already prepared shards; never built on the GPU host) and
# held-out batch size (growth's report evaluates one held-out sequence per model)
COMMON=(--config.model.n_layers="$LAYERS" --config.data.path="$REPO/$DATA" --config.data.build_from=
        --config.train.eval_batch=1 "${MODEL[@]}")
# shellcheck disable=SC2206
EXTRA_FLAGS=(${EXTRA:-})
# the 120B run: expert parallel over DEVICES, STEPS steps, batch DEVICES x MICRO x ACCUM, no held-out
# evaluation, a checkpoint only at the end, a log line every step
DST=(--config.mesh.expert="$DEVICES" --config.train.steps="$STEPS" --config.train.global_batch="$GLOBAL"
     --config.train.micro_batch="$MICRO" --config.train.eval_every=0 --config.train.log_every=1
     --config.checkpoint.every_steps=0 --config.checkpoint.every_seconds=0)
GROW=(--ratio 0.5 --router_sigma 0.05 --seed 1337)

step() {  # name, command...: run, tee the log into $OUT/<name>.log, print the wall time
  local name=$1; shift
  echo "=== $name ($(date -u +%H:%M:%S) UTC): $*"
  local t0=$SECONDS rc
  set +e
  "$@" 2>&1 | tee "$OUT/$name.log"
  rc=${PIPESTATUS[0]}
  set -e
  echo "=== $name: exit $rc after $((SECONDS - t0)) s"
  echo "$name $rc $((SECONDS - t0))" >> "$OUT/times.txt"
  return "$rc"
}
done_ckpt() {  # a complete checkpoints/0 (orbax finalizes a step only when it is fully written)
  [ -d "$1/checkpoints" ] && $PY -c "import sys; from lightning_jax import checkpoint as ck
c = ck.Checkpointer(sys.argv[1], ck.config_ns(keep=0), read_only=True); sys.exit(0 if 0 in c.steps() else 1)" \
    "$1/checkpoints" 2>/dev/null
}

echo "run_120b_reduced: LAYERS=$LAYERS DEVICES=$DEVICES STEPS=$STEPS global batch $GLOBAL (micro $MICRO x accum $ACCUM) TINY=$TINY"
echo "  OUT=$OUT RUNS=$RUNS DATA=$DATA PHASES=$PHASES"
WHEELS=${WHEELS:-shared/wheels}
if ! $PY -c "import grain, ml_collections" 2>/dev/null; then     # as benchmarks/train_gpu.sh
  $PY -m pip install -q --no-index --find-links "$WHEELS" grain ml_collections \
    || { echo "grain/ml_collections are missing and cannot be installed from $WHEELS" >&2; exit 1; }
fi
if has train; then
  $PY -c "import jax, sys; d = jax.devices(); print('jax', jax.__version__, d)
if len(d) < $DEVICES: sys.exit(f'DEVICES=$DEVICES but jax sees {len(d)} devices')"
fi

if [ ! -f "$DATA/manifest.json" ] && { has init || has grow || has train; }; then
  step prepare_data $PY -m launch.prepare_data --input corpus --output "$DATA" --val_fraction 0.1
fi

if has init; then
  if done_ckpt "$RUNS/init9b"; then echo "init: $RUNS/init9b/checkpoints/0 exists; skipped"
  else
    rm -rf "$RUNS/init9b"
    step init $PY -m growth.init --dst="$RUNS/init9b" --config="$SRC_CFG" "${COMMON[@]}" "${EXTRA_FLAGS[@]}"
  fi
fi

if has grow; then
  if done_ckpt "$RUNS/tqp120b"; then echo "grow: $RUNS/tqp120b/checkpoints/0 exists; skipped"
  else
    rm -rf "$RUNS/tqp120b"
    if [ "$TWO_STEP" = 1 ]; then
      rm -rf "$RUNS/dense120b"
      step expand_experts $PY -m growth.expand_experts --src="$RUNS/init9b" --dst="$RUNS/dense120b" \
        --config="$DST_CFG" "${COMMON[@]}" "${DST[@]}" "${EXTRA_FLAGS[@]}" "${GROW[@]}"
      step to_tqp $PY -m growth.to_tqp --src="$RUNS/dense120b" --dst="$RUNS/tqp120b" \
        --config="$DST_CFG" "${COMMON[@]}" "${DST[@]}" "${EXTRA_FLAGS[@]}"
    else
      step expand_to_tqp $PY -m growth.expand_to_tqp --src="$RUNS/init9b" --dst="$RUNS/tqp120b" \
        --config="$DST_CFG" "${COMMON[@]}" "${DST[@]}" "${EXTRA_FLAGS[@]}" "${GROW[@]}"
    fi
  fi
fi

if has train; then
  # always from the grown step 0: drop the steps an earlier train call wrote (frozen/0 stays)
  find "$RUNS/tqp120b/checkpoints" -mindepth 1 -maxdepth 1 -regex '.*/[0-9]+' ! -name 0 -exec rm -rf {} +
  rm -f "$RUNS/tqp120b/metrics.jsonl"
  step train $PY -m launch.train --config="$DST_CFG" "${COMMON[@]}" "${DST[@]}" "${EXTRA_FLAGS[@]}" \
    --workdir="$RUNS/tqp120b" --no_progress
  cp "$RUNS/tqp120b/metrics.jsonl" "$OUT/metrics.jsonl"
fi

if has plan; then
  # the same config on DEVICES virtual CPU devices (launch.plan forces them; nothing allocated)
  step plan env JAX_PLATFORMS=cpu XLA_FLAGS= $PY -m launch.plan --devices="$DEVICES" \
    --config="$DST_CFG" "${COMMON[@]}" "${DST[@]}" "${EXTRA_FLAGS[@]}"
  cp "$OUT/plan.log" "$OUT/plan.txt"
fi

if has report; then
  $PY - "$OUT" "$RUNS" "$LAYERS" "$DEVICES" "$GLOBAL" <<'PYEOF' | tee "$OUT/report.md"
import json, os, pathlib, re, statistics, sys
out, runs = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
layers, devices, gbatch = sys.argv[3:6]
mf = out / "metrics.jsonl"
if not mf.exists():
  mf = runs / "tqp120b" / "metrics.jsonl"
recs = [json.loads(l) for l in mf.read_text().splitlines() if l.strip()] if mf.exists() else []
steps = [r for r in recs if "loss" in r and "tokens_per_s" in r]
summ = next((r["summary"] for r in reversed(recs) if "summary" in r), {})
note = next((r["note"] for r in recs if "note" in r), "")
print(f"## stage_120b, {layers} layers, {devices} devices, global batch {gbatch}: {len(steps)} steps")
print("| step | loss | grad_norm | lr | tokens/s | MFU | step s |")
print("| --- | --- | --- | --- | --- | --- | --- |")
nan = float("nan")
for r in steps:
  mfu = r.get("mfu")
  mfu = f"{mfu:.2%}" if isinstance(mfu, float) and mfu == mfu else "n/a"
  print(f"| {r['step']} | {r['loss']:.4f} | {r.get('grad_norm', nan):.3g} | {r.get('lr', nan):.3g} | "
        f"{r['tokens_per_s']:,.0f} | {mfu} | {r.get('step_time_s', nan):.3f} |")
rep = {"layers": int(layers), "devices": int(devices), "global_batch": int(gbatch),
       "steps": [{k: r.get(k) for k in ("step", "loss", "grad_norm", "lr", "tokens_per_s", "mfu",
                                         "step_time_s")} for r in steps],
       "summary": summ, "peak_note": note}
if len(steps) > 3:
  later = steps[2:]                      # the first steps include compilation
  rep["median_tokens_per_s"] = statistics.median(r["tokens_per_s"] for r in later)
  mf_ = [r["mfu"] for r in later if isinstance(r.get("mfu"), float)]
  mf_ = [m for m in mf_ if m == m]
  rep["median_mfu"] = statistics.median(mf_) if mf_ else None
  mfu = f"{rep['median_mfu']:.2%}" if rep["median_mfu"] is not None else "n/a"
  print(f"\nmedian over steps 3..{len(steps)}: {rep['median_tokens_per_s']:,.0f} tokens/s, MFU {mfu}")
print(f"\n{note}")
peaks = summ.get("peak_bytes_in_use")
if peaks:
  print(f"peak device memory (memory_stats peak_bytes_in_use): max {max(peaks) / 1e9:.2f} GB; "
        f"per device {[round(p / 1e9, 2) for p in peaks]} GB (limits "
        f"{[round(p / 1e9, 1) for p in summ.get('bytes_limit', [])]} GB)")
else:
  print("peak device memory: not reported (a backend without memory_stats, e.g. CPU)")
plan, plan_gb = out / "plan.txt", os.environ.get("PLAN_GB", "")
if plan.exists():
  m = re.search(r"total\s+([\d.]+) GB", plan.read_text())
  plan_gb = m.group(1) if m else plan_gb
if plan_gb:
  rep["plan_total_gb"] = float(plan_gb)
  print(f"launch.plan (virtual CPU devices) predicts {float(plan_gb):.2f} GB per device", end="")
  if peaks:
    ratio = max(peaks) / 1e9 / float(plan_gb)
    rep["measured_over_plan"] = ratio
    print(f"; measured max / plan = {ratio:.2f}", end="")
  print()
times = out / "times.txt"
if times.exists():
  rep["times"] = [l.split() for l in times.read_text().splitlines() if l.strip()]
  print("wall times: " + ", ".join(f"{n} {s} s (exit {rc})" for n, rc, s in rep["times"]))
(out / "report.json").write_text(json.dumps(rep, indent=1))
PYEOF
fi
