#!/usr/bin/env bash
# The warning light's budget curve and second seeds on `tiny` (issue 12): each config, then the 128 + 128 probe.
#   bash docs/results/warning/run_curve.sh tiny-off-uo1-2m-s1 tiny-off-2m-s1 ...   (names of configs in this folder)
set -euo pipefail
cd "$(dirname "$0")/../../.."
for name in "$@"; do
    .venv/bin/pretag experiment "docs/results/warning/$name.yaml" --out "runs/exp-$name"
    cp "runs/exp-$name/results.md" "docs/results/warning/results-$name.md"
    cp "runs/exp-$name/results.csv" "docs/results/warning/results-$name.csv"
    .venv/bin/python docs/results/guidance/warning_probe.py "runs/exp-$name/models/conditional" runs/lab-off -n 128 \
        --out "docs/results/warning/warning-$name-untagged.json"
done
