#!/usr/bin/env bash
# Session 21's device calls (issue 17; docs/PERFORMANCE.md, session 21), from the repository root:
#   OUT=/some/dir COMMIT=<sha> [NOBENCH=1] [CASES="old base unroll lse kern full"] [UB=4] \
#     bash benchmarks/session21_call.sh
# Unless NOBENCH is set: benchmarks.topk_bench and benchmarks.stream_grad_bench. Cases: base (the
# B4 step, profiled), kern (model.hc.pre=kernel), unroll (model.unroll_layers=True at batches UB),
# old (the same B4 step from .before/, a trimmed `git archive` of the baseline, carried; its
# commit label OLD_COMMIT), lse
# (benchmarks.lse_bench), full (issue 17's whole record on an H200: B8, B4, B1, B2, the delta rule).
set -u
: "${OUT:=/tmp/out}"; export OUT
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
if [ -d .whl ]; then python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl; fi
export PYTHONPATH=/tmp/site
[ -z "${NOBENCH:-}" ] && { echo "=== topk_bench $(date -u +%T)"; timeout 60 python3 -m benchmarks.topk_bench 2>&1 | tail -8 | tee $OUT/topk.txt
echo "=== stream_grad_bench $(date -u +%T)"; timeout 90 python3 -m benchmarks.stream_grad_bench 2>&1 | tail -14 | tee $OUT/sgb.txt; }
prof() { python3 -m benchmarks.profile_table --trace "$(ls -t /tmp/step_*/t.json.gz|head -1)" --top 40 --grep stream_,gdr_,sort,reduce --json $OUT/prof_$1.json 2>&1 | head -60 > $OUT/prof_$1.txt; grep -i "stream_\|sort" $OUT/prof_$1.txt | head -6; }
for c in ${CASES:-base old kern}; do
  echo "=== case $c $(date -u +%T)"
  case $c in
    base) OUT=$OUT COMMIT=$COMMIT T_STEP2B=170 NAME=s21_base EXTRA="--batches 4 --no_delta" bash benchmarks/run_rank120.sh step2b | grep -v '^\s*$' | grep -iv "warn" | tail -12; prof base ;;
    kern) OUT=$OUT COMMIT=$COMMIT T_STEP2B=170 NAME=s21_kern EXTRA="--batches 4 --no_delta --set model.hc.pre=kernel" bash benchmarks/run_rank120.sh step2b | grep -v '^\s*$' | grep -iv "warn" | tail -12; prof kern ;;
    unroll) OUT=$OUT COMMIT=$COMMIT T_STEP2B=${TU:-300} NAME=s21_unroll EXTRA="--batches ${UB:-4,1,2} --no_delta --set model.unroll_layers=True" bash benchmarks/run_rank120.sh step2b | grep -v '^\s*$' | grep -iv "warn" | tail -14; prof unroll ;;
    lse) timeout 60 python3 -m benchmarks.lse_bench 2>&1 | tail -4 | tee $OUT/lse.txt ;;
    full) OUT=$OUT COMMIT=$COMMIT NAME=step2b_h200 T_STEP2B=520 EXTRA="--batches 8,4,1,2 --delta_variant pbp:model.deltanet.kernel.prep_bwd_p=True" bash benchmarks/run_rank120.sh step2b 2>&1 | grep -v '^\s*$' | grep -iv warn | tail -60 ;;
    old) (cd .before && OUT=$OUT COMMIT=${OLD_COMMIT:-unknown} T_STEP2B=170 NAME=s21_old EXTRA="--batches 4 --no_delta" bash benchmarks/run_rank120.sh step2b | grep -v '^\s*$' | grep -iv "warn" | tail -12); prof old ;;
  esac
done
ls -la $OUT
