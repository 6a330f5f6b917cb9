#!/usr/bin/env bash
# Does GRPO itself improve the model? The controlled experiment of BENCHMARKS.md ("GRPO's own gain"), CPU, ~2 h:
#   1. warm-start (preset warmstart-qa): SFT on expert trajectories of data/qa.jsonl over the embedded corpus:
#      the protocol (think / search / answer), nothing from 2Wiki;
#   2. trained arm (preset grpo-2wiki): GRPO alone from that checkpoint on 2Wiki questions never evaluated on
#      (train.jsonl + test.jsonl questions 401-1000);
#   3. control arm: the same command with --no-update (same prompts, same sampling seeds, no weight changes);
#   4. greedy evaluation of the start and final adapters on 2Wiki test questions 1-400 with the flags of eval.json,
#      the paired test (bench/paired_eval.py) and the trained-vs-control figure (bench/plot_control.py).
# Every stage skips what is already done, so the script can be re-run after a kill (train.py resumes itself).
#
#   python data/prepare_2wiki.py dev.json --aliases id_aliases.json --out runs/2wiki     # first: the data (README)
#   bash bench/grpo_gain.sh [DATA_DIR] [RUN_DIR]     # DATA_DIR/2wiki/{train,test,corpus}.jsonl; default runs runs/grpo-gain
set -euo pipefail
cd "$(dirname "$0")/.."
D=${1:-runs}
[ -f "$D/2wiki/train.jsonl" ] || { echo "grpo_gain.sh: error: no $D/2wiki/train.jsonl (run data/prepare_2wiki.py)" >&2; exit 2; }
R=${2:-runs/grpo-gain}
B=bench/results/grpo-gain
mkdir -p "$R" "$B/eval"
TRAIN=("--dataset" "$R/grpo-train.jsonl" "--index" "$D/2wiki/corpus.jsonl")
[ -s "$R/grpo-train.jsonl" ] || cat "$D/2wiki/train.jsonl" <(sed -n 401,1000p "$D/2wiki/test.jsonl") > "$R/grpo-train.jsonl"

arm() {  # out dir, extra flags: resume an unfinished arm, else start it from the warm-start
  local out=$1; shift
  local from="$R/start"; [ -f "$out/latest" ] && from=$out
  python train.py --preset grpo-2wiki --resume "$from" "${TRAIN[@]}" --out "$out" "$@"
}
[ -f "$R/start/latest" ] || python train.py --preset warmstart-qa --out "$R/start"
arm "$R/trained"
arm "$R/control" --no-update --save-every 0

# eval.json holds the flags both adapters are evaluated with (word-split on purpose below)
FLAGS=$(python -c "import json; print(' '.join(f'--{k.replace(\"_\", \"-\")} {v}' for k, v in json.load(open('$B/eval.json')).items()))")
ev() {  # name, adapter dir
  [ -s "$B/eval/$1.jsonl" ] && return
  python kr1.py --eval "$D/2wiki/test.jsonl" --limit 400 --index "$D/2wiki/corpus.jsonl" --adapter "$2" $FLAGS \
    --out "$B/eval/$1.jsonl.tmp" | tail -1 > "$B/eval/$1.summary.json"
  mv "$B/eval/$1.jsonl.tmp" "$B/eval/$1.jsonl"
}
ev start "$R/start/$(cat "$R/start/latest")/adapter"
ev final "$R/trained/$(cat "$R/trained/latest")/adapter"
python bench/paired_eval.py "$B/eval/start.jsonl" "$B/eval/final.jsonl" | tee "$B/paired.txt"
python bench/plot_control.py "$R/trained/log.jsonl" "$R/control/log.jsonl" --out "$B/control.png" | tee "$B/control.txt"
