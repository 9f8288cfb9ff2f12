#!/usr/bin/env bash
# Issue #10: the Hadamard rules of --incoherence rht side by side on SmolLM2-135M (whole PTB test split):
# "paley" (H_p ⊗ B_m, format rht v1's transform), "paley-outer" (B_m ⊗ H_p, the default since rht v2) and
# "hartley" (C_o ⊗ H_p over the odd part only), with the same seed, calibration and inner format; then paired
# bootstrap CIs of PPL(hartley) / PPL(paley) and PPL(paley-outer) / PPL(paley) for every recipe.
#   bash benchmarks/rht_rules.sh [WORK] [JSON]
set -euo pipefail
WORK=${1:-runs/rht-rules}
JSON=${2:-benchmarks/results/rht_rules_smollm2-135m.json}
M=smollm2-135m
declare -A RECIPES=(
  [int4-rtn]="--method int --bits 4 --group-size 128 --asym --solver rtn --incoherence rht"
  [int3-ldlq]="--method int --bits 3 --group-size 128 --asym --solver ldlq --incoherence rht --calib-samples 32"
  [int2-ldlq]="--method int --bits 2 --group-size 64 --asym --solver ldlq --incoherence rht --calib-samples 32"
)
pairs=()
for name in int4-rtn int3-ldlq int2-ldlq; do
  for rule in hartley paley paley-outer; do
    out=$WORK/$M-$name-$rule
    if [ ! -f "$out/ppl.json" ]; then
      [ -f "$out/report.json" ] || moequant -q quantize $M ${RECIPES[$name]} --rht-transform $rule --out "$out" --overwrite
      moequant -q eval ppl "$out" --data ptb --json "$out/ppl.json"
    fi
  done
  base=$WORK/$M-$name-paley
  pairs+=("$WORK/$M-$name-hartley" "$base" "$WORK/$M-$name-paley-outer" "$base")
done
python benchmarks/pairs.py --json "$JSON" "${pairs[@]}"
