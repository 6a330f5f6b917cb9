#!/usr/bin/env bash
# Does GRPO teach the model to find answers, not to guess among the names a question gives? The controlled
# experiment of BENCHMARKS.md ("Search, not guessing"), CPU, ~2.5 h:
#   1. start: the protocol-only warm-start of bench/grpo_gain.sh (preset warmstart-qa: nothing from 2Wiki);
#   2. trained arm: GRPO from it on the *open* questions (grpo.question_kind) of 2Wiki train + test 401-1000, with
#      expert mixing and 1024 tokens (two searches and an answer fit);
#   3. control arm: the same command with --no-update (same prompts, same sampling seeds, no weight changes);
#   4. greedy evaluation of start and final on the held-out open questions (2Wiki test 1-400, HotpotQA, MuSiQue)
#      with the flags of eval.json, the paired test per set and pooled, and the trained-vs-control figure.
# Every stage skips what is already done, so the script can be re-run after a kill (train.py resumes itself).
# A second design names itself and adds train.py flags to both arms; it shares design 1's start and question files.
# Its control arm samples the same tokens as design 1's (no update, same seeds) but logs its own reward and support.
#
#   python data/prepare_2wiki.py dev.json --aliases id_aliases.json --out DATA_DIR/2wiki   # first (README)
#   bash bench/search_gain.sh DATA_DIR                     # design 1: runs/search-gain, bench/results/search-gain
#   bash bench/search_gain.sh DATA_DIR support --w-support 0.5   # design 2: runs/search-gain-support, ...
set -euo pipefail
cd "$(dirname "$0")/.."
D=${1:?usage: bash bench/search_gain.sh DATA_DIR [NAME TRAIN_FLAGS...]  (DATA_DIR holds 2wiki/, hotpotqa/, musique/)}
NAME=${2:+-$2}
shift $(($# < 2 ? $# : 2))
R=runs/search-gain$NAME
B=bench/results/search-gain$NAME
S=runs/search-gain  # design 1's: the question files and the start
S_B=bench/results/search-gain  # design 1's: eval.json and the start's evaluation
mkdir -p "$S" "$R" "$B/eval" "$S_B/eval"

open_only() {  # the open questions (grpo.question_kind) of a QA JSONL on stdin
  python -c "import grpo, json, sys
for line in sys.stdin:
    r = json.loads(line)
    if grpo.question_kind(r['question'], r['answers']) == 'open':
        print(line, end='')"
}
[ -s "$S/train-open.jsonl" ] || cat "$D/2wiki/train.jsonl" <(sed -n 401,1000p "$D/2wiki/test.jsonl") | open_only \
  > "$S/train-open.jsonl"
[ -s "$S/2wiki-open.jsonl" ] || head -400 "$D/2wiki/test.jsonl" | open_only > "$S/2wiki-open.jsonl"
[ -s "$S/hotpotqa-open.jsonl" ] || open_only < "$D/hotpotqa/questions.jsonl" > "$S/hotpotqa-open.jsonl"
[ -s "$S/musique-open.jsonl" ] || open_only < "$D/musique/questions.jsonl" > "$S/musique-open.jsonl"

TRAIN=(--dataset "$S/train-open.jsonl" --index "$D/2wiki/corpus.jsonl" --expert-mix --max-total-tokens 1024)
arm() {  # out dir, extra flags: resume an unfinished arm, else start it from the warm-start
  local out=$1; shift
  local from="$S/start"; [ -f "$out/latest" ] && from=$out
  python train.py --preset grpo-2wiki --resume "$from" "${TRAIN[@]}" --out "$out" "$@"
}

# eval.json holds the flags both adapters are evaluated with (word-split on purpose below)
FLAGS=$(python -c "import json; print(' '.join(f'--{k.replace(\"_\", \"-\")} {v}' for k, v in json.load(open('$S_B/eval.json')).items()))")
ev() {  # name, adapter dir: the three held-out open sets
  for set in 2wiki hotpotqa musique; do
    local out="$B/eval/$1-$set.jsonl"
    [ -s "$out" ] && continue
    python kr1.py --eval "$S/$set-open.jsonl" --index "$D/$set/corpus.jsonl" --adapter "$2" $FLAGS \
      --out "$out.tmp" | tail -1 > "$B/eval/$1-$set.summary.json"
    mv "$out.tmp" "$out"
  done
}
[ -f "$S/start/latest" ] || python train.py --preset warmstart-qa --out "$S/start"
B=$S_B ev start "$S/start/$(cat "$S/start/latest")/adapter"
arm "$R/trained" "$@"
ev final "$R/trained/$(cat "$R/trained/latest")/adapter"
arm "$R/control" --no-update --save-every 0 "$@"
for set in 2wiki hotpotqa musique; do
  python bench/paired_eval.py "$S_B/eval/start-$set.jsonl" "$B/eval/final-$set.jsonl" > "$B/paired-$set.txt"
done
cat "$S_B"/eval/start-*.jsonl > "$R/start-pooled.jsonl" && cat "$B"/eval/final-*.jsonl > "$R/final-pooled.jsonl"
python bench/paired_eval.py "$R/start-pooled.jsonl" "$R/final-pooled.jsonl" | tee "$B/paired-pooled.txt"
python bench/plot_control.py "$R/trained/log.jsonl" "$R/control/log.jsonl" --out "$B/control.png" | tee "$B/control.txt"
