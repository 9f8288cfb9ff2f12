#!/usr/bin/env bash
# Our side of the peer comparison, on the same model and PTB-test windows:
#
#     bash benchmarks/peers/ours.sh                  # int4 / int3 (sym) and int2 (asym), RTN + MSE clip, g64
#     LDLQ=1 bash benchmarks/peers/ours.sh           # also --solver ldlq --incoherence rht (PTB train calib; slow)
#     MAX_TOKENS=0 bash benchmarks/peers/ours.sh     # whole PTB test split (default 16384 tokens; delete runs/peers/ours-* first: existing runs are skipped)
#     NICE=0 bash benchmarks/peers/ours.sh           # niceness of the jobs (default 5)
#
# Each run: `moequant quantize ... --out runs/peers/ours-<cfg>` then
# `moequant eval ppl runs/peers/ours-<cfg> --data ptb --max-tokens N --json runs/peers/ours-<cfg>/ppl.json`;
# then benchmarks/peers/ours_tag.py adds the peer keys (peer, config, bits_per_weight, checkpoint_bytes from
# report.json) to that ppl.json. Runs that already have a ppl.json are skipped.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"
. .venv/bin/activate
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
N=${MAX_TOKENS:-16384}
MT=(--max-tokens "$N"); [ "$N" = 0 ] && MT=()  # moequant eval ppl: no flag = whole split
NICE=${NICE:-5}
CALIB_SAMPLES=${CALIB_SAMPLES:-64}  # LDLQ calibration windows of 512 PTB-train tokens (CLI default 128; 64 for time)
run() {  # name, quantize args...
    local name=$1; shift
    local out=runs/peers/ours-$name
    if [ -f "$out/ppl.json" ]; then echo "skip $out (has ppl.json)"; return; fi
    rm -rf "$out"
    nice -n "$NICE" moequant -q quantize smollm2-135m "$@" --out "$out" >"runs/peers/logs/ours-$name.quantize.log" 2>&1
    nice -n "$NICE" moequant -q eval ppl "$out" --data ptb "${MT[@]}" --json "$out/ppl.json.tmp"
    python benchmarks/peers/ours_tag.py "$out" "$name"
}
mkdir -p runs/peers/logs
run int4-g64 --method int --bits 4 --group-size 64
run int3-g64 --method int --bits 3 --group-size 64
run int2a-g64 --method int --bits 2 --group-size 64 --asym
if [ "${LDLQ:-0}" = 1 ]; then
    run int3-g64-ldlq-rht --method int --bits 3 --group-size 64 --solver ldlq --incoherence rht --calib ptb --calib-samples "$CALIB_SAMPLES"
    run int2a-g64-ldlq-rht --method int --bits 2 --group-size 64 --asym --solver ldlq --incoherence rht --calib ptb --calib-samples "$CALIB_SAMPLES"
fi
