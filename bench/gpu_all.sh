#!/usr/bin/env bash
# Every GPU measurement the issues ask for, in one call, on one CUDA machine with the project installed
# (README Quick start) and ../shared/data beside the checkout. Results land in $OUT (default runs/gpu).
#
#   bash bench/gpu_all.sh                 # ~35 min on one H100: rollout bench, one train step, learning run
#   OUT=/tmp/gpu bash bench/gpu_all.sh
#
# 1. rollout engine vs HF generate, Qwen2.5-1.5B architecture (random weights, bf16), batch 64 and 256, ~1k context
# 2. one full GRPO step (rollout + update) of the same architecture: seconds split, peak memory vs the estimate
# 3. a learning run of SmolLM2-135M-Instruct on 2WikiMultihopQA (train.jsonl, BM25 over its corpus, <= 20 min),
#    EM on test.jsonl before and after, and the curves (PNG + JSONL)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu}
DATA=${DATA:-../shared/data/2wiki}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.txt"
git rev-parse --short HEAD | tee -a "$OUT/device.txt"

python bench/bench_rollout.py --gpu --out "$OUT/rollout.json" 2>&1 | tee "$OUT/rollout.log"
python bench/bench_train_step.py --out "$OUT/train_step.json" 2>&1 | tee "$OUT/train_step.log"

python retrieval.py build --corpus "$DATA/corpus.jsonl" --out "$OUT/index-2wiki"
eval_em() {  # $1 = tag, then extra flags (--adapter DIR / --no-adapter); the shipped run's rollout settings
  tag=$1; shift
  python kr1.py --eval "$DATA/test.jsonl" --index "$OUT/index-2wiki" --mode agent --batch-size 64 --limit 200 \
    --k 2 --max-turns 2 --max-turn-tokens 64 --max-total-tokens 768 \
    --out "$OUT/eval-$tag.jsonl" "$@" | tail -n 1 | tee "$OUT/eval-$tag.summary"
}
eval_em before --no-adapter
eval_em shipped                     # data/smollm2-kr1-lora, trained on 2 CPU cores
# the shipped recipe at GPU size: G = 8, all 464 train questions per SFT epoch and ~2 GRPO epochs
timeout 1500 python train.py --preset smollm2-2wiki --dataset "$DATA/train.jsonl" --index "$OUT/index-2wiki" \
  --out "$OUT/smollm2-2wiki" --group-size 8 --prompts-per-step 16 --sft-batch 8 --sft-steps 58 --steps 58 \
  --micro-batch 8 --save-every 29 2>&1 | tee "$OUT/train.log" || echo "training stopped (time limit); evaluating the last checkpoint"
eval_em after --adapter "$OUT/smollm2-2wiki/$(cat "$OUT/smollm2-2wiki/latest")/adapter"
python bench/plot_log.py "$OUT/smollm2-2wiki/log.jsonl" --out "$OUT/curves.png" || echo "pip install matplotlib"
echo "results in $OUT"
