#!/usr/bin/env bash
# Reproduce the whole peer comparison on smollm2-135m, PTB test, seqlen 512, first MAX_TOKENS tokens:
#
#     bash benchmarks/peers/run_all.sh               # MAX_TOKENS=16384 by default; 0 = whole split (start from an
#                                                    # empty runs/peers/: our existing runs are skipped, peers rescored)
#     LDLQ=1 bash benchmarks/peers/run_all.sh        # also our LDLQ+RHT rows (slow: ~20 min each here)
#     NICE=0 bash benchmarks/peers/run_all.sh        # niceness of the jobs (default 5)
#
# Installs the peers (pip -c constraints.txt: hqq, bitsandbytes; llama.cpp built from the
# llama-cpp-python sdist by build_llamacpp.sh), then runs one job at a time with OMP_NUM_THREADS=1 under
# nice, and collects everything into benchmarks/results/peers_smollm2-135m.json.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"
. .venv/bin/activate
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
N=${MAX_TOKENS:-16384}
MT=(--max-tokens "$N"); [ "$N" = 0 ] && MT=()  # moequant eval ppl: no flag = whole split
export NICE=${NICE:-5}
P=benchmarks/peers
mkdir -p runs/peers/logs
python -c "import hqq" 2>/dev/null || DISABLE_CUDA=1 pip install -c constraints.txt --no-build-isolation hqq
python -c "import bitsandbytes" 2>/dev/null || pip install -c constraints.txt bitsandbytes
bash $P/build_llamacpp.sh

nice -n "$NICE" moequant -q eval ppl smollm2-135m --data ptb "${MT[@]}" --json runs/peers/fp32-cli/ppl.json
nice -n "$NICE" python $P/fp_check.py --max-tokens "$N" --cli-json runs/peers/fp32-cli/ppl.json
nice -n "$NICE" python $P/hqq_peer.py --bits 4 3 2 --group-size 64 --max-tokens "$N"
# bitsandbytes: a failure is recorded in the log, the rest goes on.
nice -n "$NICE" python $P/bnb_peer.py --quant-type nf4 fp4 --max-tokens "$N" || echo "bitsandbytes failed (see above)"
nice -n "$NICE" python $P/llamacpp_peer.py --types F16 Q4_K_M Q3_K_M Q2_K IQ3_XXS IQ2_XS --max-tokens "$N"
MAX_TOKENS=$N LDLQ=${LDLQ:-0} bash $P/ours.sh
python $P/collect.py
