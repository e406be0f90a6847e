#!/usr/bin/env bash
# The GPU recipe for issue 12: MLE vs conditional training (inline tags) at GPU scale, ready before a GPU is.
#
#   bash recipes/gpu.sh pack          # here (CPU, network to PyPI): the data pack and the wheels the device lacks
#   bash recipes/gpu.sh run           # on the device (one H200, no network): train, evaluate, pack results into $OUT
#   bash recipes/gpu.sh toy           # the same run at toy scale on the CPU (what tests/test_recipe.py runs)
#
# The pack (.recipe/pack, ~30 MB) holds the inline-tagged fortunes for two tasks (profanity: <|bad|> before each
# word scoring > 0.05 alone; negativity: > 0.5), fortunes with the human "offensive" label on every sentence (the
# warning-light job, smol-offensive) and the BPE tokenizer trained here, so the device trains on exactly
# the data and vocabulary measured on the CPU. The wheels (.whl, ~10 MB) are the pure-Python scorers and their
# scikit-learn, for the device's Python 3.12.
# device.run: command "bash recipes/gpu.sh run", carry [".recipe", ".whl"], timeout_s 600.
#
# JOBS (task:seed:tokens ...) run side by side on the one GPU (each `pretag experiment` is half CPU work: data,
# scoring); DEADLINE (seconds) stops what is still running so the finished jobs come back. After each job ends,
# $OUT/results.tgz (every finished job's results, evaluations with verbatim samples, plots, training curves and
# logs) and $OUT/summary.md are rewritten, so a run cut short still returns what finished.
set -euo pipefail
cd "$(dirname "$0")/.."
mode="${1:-run}"
PY="${PY:-python3}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
PACK=.recipe/pack
SMOL_DIR="${SMOL_DIR:-/tmp/pretag-smol}"   # where the device keeps the GGUF parts between warm calls
SMOL_PARTS="${SMOL_PARTS:-.recipe-smol}"     # where `pack-smol` writes them here (carried one per call)

case "$mode" in
pack)
  PY="${PY_HERE:-.venv/bin/python}"
  tmp="${WORK:-runs/recipe-pack}"
  mkdir -p "$PACK" "$tmp"
  $PY -m pretag label fortunes --schema recipes/toxicity-q25-schema.yaml --num-proc 2 --out "$tmp/tox-labeled"
  $PY -m pretag inline "$tmp/tox-labeled" --out "$PACK/tox-inline05" --word-threshold 0.05
  $PY -m pretag label fortunes --schema recipes/negativity-schema.yaml --num-proc 2 --out "$tmp/neg-labeled"
  $PY -m pretag inline "$tmp/neg-labeled" --out "$PACK/neg-inline" --word-threshold 0.5
  $PY -m pretag label fortunes --schema docs/results/warning/offensive-schema.yaml --num-proc 2 --out "$PACK/offensive"
  $PY - <<'PYEOF'
from pretag.tokens import read_labeled, train_tokenizer
from pretag.train import split_rows
schema, rows = read_labeled(".recipe/pack/tox-inline05")
train_rows, _ = split_rows(rows, 0.05)  # what `pretag train` trains its tokenizer on: the CPU runs' vocabulary
tok = train_tokenizer((r["text"] for r in train_rows), schema, vocab_size=8192)
tok.save_pretrained(".recipe/pack/tokenizer")
print(f"tokenizer: {len(tok)} entries -> .recipe/pack/tokenizer")
PYEOF
  rm -rf .whl && mkdir -p .whl
  for w in scikit-learn==1.9.1 alt-profanity-check==1.9.1 pysbd==0.3.4 pycodestyle==2.15.0 vaderSentiment==3.3.2 \
      gguf==0.19.0; do
    $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 --platform any -d .whl "$w"
  done
  size=$(du -sm .recipe .whl | awk '{s += $1} END {print s}')
  echo "pack + wheels: ${size} MiB (the device takes 64 MiB with the working tree)"
  [ "$size" -le 40 ] || { echo "the pack is over 40 MiB" >&2; exit 1; }
  ;;
pack-smol)  # SmolLM2-135M's GGUF (94 MiB) in parts that each fit one device call beside the ~28 MiB repository
  src="${SMOL_GGUF:-$(.venv/bin/python -c 'from pretag.models import smollm2_gguf; print(smollm2_gguf())')}"
  rm -rf "$SMOL_PARTS" && mkdir -p "$SMOL_PARTS"
  split -b "${PART_SIZE:-32M}" -d -a 1 "$src" "$SMOL_PARTS/part-"
  sha256sum < "$src" | awk '{print $1}' > "$SMOL_PARTS/SHA256"
  ls -la "$SMOL_PARTS"
  ;;
stash)  # on the device: keep the GGUF parts this call carried in $SMOL_DIR (it survives while the machine is warm)
  mkdir -p "$SMOL_DIR"
  cp "$SMOL_PARTS"/* "$SMOL_DIR"/
  ls -la "$SMOL_DIR"
  ;;
run|toy)
  out="${OUT:-runs/recipe-out}"
  work="${WORK:-/tmp/pretag-recipe}"
  pack="${PACK_DIR:-$PACK}"
  mkdir -p "$out" "$work"
  if [ "$mode" = run ]; then
    JOBS="${JOBS:-toxicity:0:6000000 toxicity:1:6000000 negativity:0:6000000 toxicity:0:2000000}"
    DEADLINE="${DEADLINE:-520}"
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}"  # four jobs on 16 cores: scoring and data work side by side
    export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"  # jobs share one GPU
    quick=""
    if [ -d .whl ]; then
      $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
      export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
    fi
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
  else
    JOBS="${JOBS:-toxicity:0:8192 negativity:0:8192}"
    DEADLINE="${DEADLINE:-0}"
    quick="--quick"
  fi
  for job in $JOBS; do  # every job's data pack must have come along (each call carries only what it names)
    IFS=: read -r task _ _ <<< "$job"
    [ -f "recipes/gpu-$task.yaml" ] || { echo "job $job: no recipe recipes/gpu-$task.yaml" >&2; exit 2; }
    lab=$(awk '/^  labeled:/ {print $2}' "recipes/gpu-$task.yaml" | sed "s#\.recipe/pack#$pack#")
    [ -d "$lab" ] || { echo "job $job: no data pack at $lab (run 'bash recipes/gpu.sh pack' here, carry it)" >&2; exit 2; }
  done
  export PYTHONPATH="$PWD:${PYTHONPATH:-}"
  if [[ " $JOBS" == *" smol-"* ]]; then  # SmolLM2 jobs: the GGUF from the parts stashed by earlier calls and this one
    mkdir -p "$SMOL_DIR"
    cp "$SMOL_PARTS"/* "$SMOL_DIR"/ 2>/dev/null || true
    cat "$SMOL_DIR"/part-* > "$SMOL_DIR/smollm2.gguf"
    want=$(cat "$SMOL_DIR/SHA256" 2>/dev/null || true)
    got=$(sha256sum "$SMOL_DIR/smollm2.gguf" | awk '{print $1}')
    [ -n "$want" ] && [ "$got" = "$want" ] || {
      echo "SmolLM2 GGUF in $SMOL_DIR is incomplete (sha256 $got, want ${want:-?}; parts: $(ls "$SMOL_DIR"))" >&2; exit 3; }
    export PRETAG_SMOLLM2_GGUF="$SMOL_DIR/smollm2.gguf"
  fi
  $PY -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), \
'transformers', transformers.__version__)"
  t0=$SECONDS
  declare -A pid_of=()
  for job in $JOBS; do
    IFS=: read -r task seed tokens <<< "$job"
    name="$task-s$seed-$tokens"
    cfg="$work/$name.yaml"
    sed "s/^tokens: .*/tokens: $tokens/; s/^seed: .*/seed: $seed/; s/^name: .*/name: gpu-$name/; \
s#\.recipe/pack#$pack#g" "recipes/gpu-$task.yaml" > "$cfg"
    $PY -m pretag experiment "$cfg" $quick --out "$work/$name" > "$work/$name.log" 2>&1 &
    pid_of[$name]=$!
    echo "started $name (pid $!)"
  done
  collect() {  # every finished job's results (no model weights) -> $out/results.tgz, their tables -> summary.md
    local done=()
    : > "$out/summary.md.tmp"
    for d in "$work"/*/; do
      n=$(basename "$d")
      [ -f "$d/results.json" ] || continue
      done+=("$n")
      { echo "## $n"; echo; cat "$d/results.md"; echo; } >> "$out/summary.md.tmp"
    done
    mv "$out/summary.md.tmp" "$out/summary.md"
    (cd "$work" && tar czf "$out/results.tgz.tmp" --exclude='checkpoints' --exclude='*.safetensors' \
      --exclude='*.bin' --exclude='*.pt' --exclude='data-inline' *.log *.yaml "${done[@]}" 2>/dev/null) || true
    mv "$out/results.tgz.tmp" "$out/results.tgz"
  }
  failed=0
  while [ ${#pid_of[@]} -gt 0 ]; do
    for name in "${!pid_of[@]}"; do
      if ! kill -0 "${pid_of[$name]}" 2>/dev/null; then
        rc=0; wait "${pid_of[$name]}" || rc=$?
        echo "$name: exit $rc after $((SECONDS - t0)) s"; tail -n 25 "$work/$name.log"
        [ "$rc" = 0 ] || failed=1
        unset "pid_of[$name]"
        collect
      fi
    done
    if [ "$DEADLINE" -gt 0 ] && [ $((SECONDS - t0)) -ge "$DEADLINE" ] && [ ${#pid_of[@]} -gt 0 ]; then
      echo "deadline ${DEADLINE} s: stopping ${!pid_of[*]}"
      for name in "${!pid_of[@]}"; do kill "${pid_of[$name]}" 2>/dev/null || true; tail -n 8 "$work/$name.log"; done
      failed=1; break
    fi
    sleep 2
  done
  # the KL floor: two MLE models that differ only by seed, for each budget run on both seeds (read KL against it)
  for d in "$work"/*-s0-*/; do
    other="${d/-s0-/-s1-}"
    if [ -f "$d/results.json" ] && [ -f "$other/results.json" ] && [ "$mode" = run ]; then
      timeout "${KL_FLOOR_TIMEOUT:-90}" $PY docs/results/kl_floor.py "${d%/}" "${other%/}" > "${d%/}/kl-floor.md" \
        2>> "$work/kl-floor.log" || true
      cat "${d%/}/kl-floor.md"
    fi
  done
  collect
  # LoRA adapters (SmolLM2 jobs) come back small enough to ship: bf16, gzipped, split into 15 MiB parts. ADAPTERS
  # (globs on job/run, e.g. "smol-toxicity-*/* smol-negativity-*/conditional_ul") picks which, so that they and
  # results.tgz stay under the 64 MiB a call brings back (~10.5 MiB each).
  if compgen -G "$work/*/models/*/adapter_model.safetensors" > /dev/null; then
    set -f  # ADAPTERS' globs are recipes/adapters.py's to match, not the shell's
    rm -rf "$work/adapters" && $PY recipes/adapters.py "$work" "$work/adapters" ${ADAPTERS:-} && \
      [ -d "$work/adapters" ] && (cd "$work" && tar czf - adapters) | split -b 15M -d -a 1 - \
      "$out/adapters.tgz.part-" || echo "adapters: not packed" >&2
    set +f
  fi
  cat "$out/summary.md"
  ls -la "$out"
  exit $failed
  ;;
*)
  echo "usage: bash recipes/gpu.sh pack|pack-smol|stash|run|toy" >&2; exit 2 ;;
esac
