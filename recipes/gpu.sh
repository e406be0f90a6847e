#!/usr/bin/env bash
# The GPU recipe for issue 12: MLE vs conditional training at GPU scale, ready before a GPU is.
#
#   bash recipes/gpu.sh pack          # here (CPU, network to PyPI): the data pack and the wheels the device lacks
#   bash recipes/gpu.sh run           # on the device (one H200, no network): train, evaluate, copy results to $OUT
#   bash recipes/gpu.sh toy           # the same run at toy scale on the CPU (what tests/test_recipe.py runs)
#
# The pack (.recipe/pack, ~7 MB) holds the labeled fortunes (segments, scores, tags cut at the safest 25 %) and the
# BPE tokenizer trained here, so the device trains on exactly the data and vocabulary measured on the CPU. The
# wheels (.whl, ~15 MB) are the pure-Python scorers and their scikit-learn, for the device's Python 3.12.
# device.run: command "bash recipes/gpu.sh run", carry [".recipe", ".whl"], timeout_s 600.
set -euo pipefail
cd "$(dirname "$0")/.."
mode="${1:-run}"
PY="${PY:-python3}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
PACK=.recipe/pack
TOKENS="${TOKENS:-3000000 12000000}"  # the budget curve: one experiment per budget

case "$mode" in
pack)
  PY="${PY_HERE:-.venv/bin/python}"
  mkdir -p "$PACK"
  $PY -m pretag label fortunes --schema recipes/toxicity-q25-schema.yaml --num-proc 2 --out "$PACK/labeled"
  $PY - <<'PYEOF'
from pretag.tokens import read_labeled, train_tokenizer
schema, rows = read_labeled(".recipe/pack/labeled")
tok = train_tokenizer((r["text"] for r in rows), schema, vocab_size=8192)
tok.save_pretrained(".recipe/pack/tokenizer")
print(f"tokenizer: {len(tok)} entries -> .recipe/pack/tokenizer")
PYEOF
  rm -rf .whl && mkdir -p .whl
  for w in scikit-learn==1.9.1 alt-profanity-check==1.9.1 pysbd==0.3.4 pycodestyle==2.15.0; do
    $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 --platform any -d .whl "$w"
  done
  size=$(du -sm .recipe .whl | awk '{s += $1} END {print s}')
  echo "pack + wheels: ${size} MiB (device limit 64 MiB in all; the recipe's budget 60)"
  [ "$size" -le 60 ] || { echo "the pack is over 60 MiB" >&2; exit 1; }
  ;;
run|toy)
  out="${OUT:-runs/recipe-out}"
  work="${WORK:-/tmp/pretag-recipe}"
  mkdir -p "$out" "$work"
  if [ "$mode" = run ]; then
    [ -d "$PACK/labeled" ] || { echo "no data pack at $PACK: run 'bash recipes/gpu.sh pack' here first" >&2; exit 2; }
    if [ -d .whl ]; then
      $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
      export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
    fi
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
    quick=""
  else
    quick="--quick"
  fi
  export PYTHONPATH="$PWD:${PYTHONPATH:-}"
  $PY -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), \
'transformers', transformers.__version__)"
  for t in $TOKENS; do
    cfg="$work/gpu-toxicity-$t.yaml"
    sed "s/^tokens: .*/tokens: $t/; s/^name: gpu-toxicity/name: gpu-toxicity-$t/" recipes/gpu-toxicity.yaml > "$cfg"
    [ "$mode" = toy ] && sed -i "s#\.recipe/pack#${PACK_DIR:-$PACK}#g" "$cfg"
    $PY -m pretag experiment "$cfg" $quick --out "$work/exp-$t" 2>&1 | tail -n 40
    cp "$work/exp-$t/results.md" "$out/results-$t.md"
    cp "$work/exp-$t/results.json" "$out/results-$t.json"
  done
  cp "$work/exp-${TOKENS##* }/pareto.png" "$out/pareto.png" 2>/dev/null || true
  ls -la "$out"
  ;;
*)
  echo "usage: bash recipes/gpu.sh pack|run|toy" >&2; exit 2 ;;
esac
