#!/usr/bin/env bash
# Reduced-precision weight storage (Gupta et al. 2015) on LeNet-5 / mnist5k: test accuracy per number format
# and rounding mode, three seeds each, default hyper-parameters otherwise. Prints one line per run.
set -euo pipefail
for spec in "fp32 nearest" "bf16 nearest" "bf16 stochastic" "fp16 nearest" "fp16 stochastic" \
            "fixed:4.12 nearest" "fixed:4.12 stochastic" "fixed:4.10 nearest" "fixed:4.10 stochastic" \
            "fixed:4.8 nearest" "fixed:4.8 stochastic"; do
  set -- $spec
  for seed in 0 1 2; do
    line=$(polytrain train --dataset mnist5k --model lenet5 --precision "$1" --set rounding="$2" --seed "$seed" | tail -1)
    echo "$1 $2 seed $seed: $line"
  done
done
