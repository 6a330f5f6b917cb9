#!/usr/bin/env bash
# Before/after table of the learning run (greedy, the run's own rollout settings), one kr1.py --eval per cell:
# the shipped (final) adapter, the warm-start-only checkpoint and the untrained base on 2Wiki test (first 200) in
# agent / rag / direct modes, data/qa.jsonl, and MuSiQue + HotpotQA (first 100 each; transfer). Then bench/eval_table.py.
#
#   bash bench/eval_learning.sh DATA_DIR [RUN_DIR] [WARM_STEP] [FINAL_STEP]   # default runs/smollm2-2wiki 40 68
# DATA_DIR holds 2wiki/ (data/prepare_2wiki.py), musique/ and hotpotqa/ ({question, answers} JSONL + corpus.jsonl).
set -euo pipefail
cd "$(dirname "$0")/.."
D=${1:?usage: bash bench/eval_learning.sh DATA_DIR [RUN_DIR] [WARM_STEP] [FINAL_STEP]}
RUN=${2:-runs/smollm2-2wiki}
WARM=$RUN/checkpoints/step_$(printf %06d "${3:-40}")/adapter
FINAL=$RUN/checkpoints/step_$(printf %06d "${4:-68}")/adapter
O=$RUN/eval
mkdir -p "$O"
SET=(--k 2 --max-turns 2 --max-turn-tokens 64 --max-total-tokens 768 --batch-size 32)
W2=("$D/2wiki/test.jsonl" --index "$D/2wiki/corpus.jsonl" --limit 200)
ev() {  # name, then kr1.py --eval arguments; skips cells already done (the script can be re-run after a kill)
  local name=$1; shift
  [ -s "$O/$name.summary.json" ] && return
  python kr1.py --eval "$@" "${SET[@]}" --out "$O/$name.jsonl" | tail -1 > "$O/$name.summary.json.tmp"
  mv "$O/$name.summary.json.tmp" "$O/$name.summary.json"
  echo "$name $(cat "$O/$name.summary.json")"
}
ev final-2wiki-agent "${W2[@]}" --adapter "$FINAL"
ev warm-2wiki-agent "${W2[@]}" --adapter "$WARM"
ev final-2wiki-rag "${W2[@]}" --adapter "$FINAL" --mode rag
ev final-qa-agent --adapter "$FINAL"
ev final-musique-agent "$D/musique/questions.jsonl" --index "$D/musique/corpus.jsonl" --limit 100 --adapter "$FINAL"
ev final-hotpotqa-agent "$D/hotpotqa/questions.jsonl" --index "$D/hotpotqa/corpus.jsonl" --limit 100 --adapter "$FINAL"
ev final-2wiki-direct "${W2[@]}" --adapter "$FINAL" --mode direct
ev warm-2wiki-rag "${W2[@]}" --adapter "$WARM" --mode rag
ev base-2wiki-agent "${W2[@]}" --no-adapter
ev warm-qa-agent --adapter "$WARM"
ev base-qa-agent --no-adapter
python bench/eval_table.py "$O"
