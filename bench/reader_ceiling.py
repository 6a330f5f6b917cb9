"""The reader's ceiling: EM when rag mode's one retrieval returns the question's gold supporting
passages instead of BM25's hits, on the open questions (grpo.question_kind) of a QA file that name
supporting_titles (2Wiki, MuSiQue); each title stands for its first passage in the index. It
measures what the model makes of the right evidence: the most that better retrieval could lift
`kr1.py --eval --mode rag` to.

    python bench/reader_ceiling.py runs/2wiki/test.jsonl --index runs/2wiki/corpus.jsonl --limit 5

Any other flag is kr1.py's (--adapter, --model, --limit, --batch-size, --out, --device, ...),
with kr1.py's defaults: the shipped adapter, its kr1_rollout.json's budgets. The mode is rag; --k
does not apply, since a question gets all its gold passages. --limit counts open questions. The
gold passages are found in one pass over the index's passages: 0.07 s for 2Wiki's 8,651, so about
3 minutes for wiki-18's 21 M. Output: kr1.py --eval's per-kind table (stderr) and summary line
(stdout, `tail -1`); its support_recall is the share of the gold titles the index has.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import kr1  # noqa: E402


def parsed(argv: list[str] | None) -> argparse.Namespace:
    """kr1.py's checked flags for an --eval of FILE in rag mode."""
    head, rest = __doc__.split("\n\n", 1)
    p = argparse.ArgumentParser(
        description=head,
        epilog=rest,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("file", help="QA JSONL whose rows name supporting_titles")
    own, kr1_flags = p.parse_known_args(argv)
    args = kr1.parse_args(["--eval", own.file, *kr1_flags])
    if args.mode not in (None, "rag"):
        p.error("the mode is rag: drop --mode")
    args.mode = "rag"
    return args


def gold_rows(rows: list[dict]) -> list[dict]:
    """The open questions that name supporting titles."""
    import grpo

    return [
        r
        for r in rows
        if r.get("supporting_titles") and grpo.question_kind(r["question"], r["answers"]) == "open"
    ]


def first_passages(index, titles: set[str]) -> dict[str, dict]:
    """Per wanted title (casefolded), its first passage in the index; one pass, ending when all are
    found."""
    found: dict[str, dict] = {}
    for i in range(len(index)):
        passage = index.passage(i)
        title = passage["title"].casefold()
        if title in titles:
            found.setdefault(title, passage)
            if len(found) == len(titles):
                break
    return found


def gold_search(rows: list[dict], passages: dict[str, dict], tok):
    """rag's search callable: per question (as rollout sanitises it), the passages of its supporting
    titles that the index has, in the order the row names them."""
    import rollout

    gold = {}
    for r in rows:
        titles = dict.fromkeys(title.casefold() for title in r["supporting_titles"])
        hits = [passages[title] for title in titles if title in passages]
        gold[rollout.sanitize(r["question"], tok)] = hits
    return lambda queries: [gold[q] for q in queries]


def main(argv: list[str] | None = None) -> int:
    args = parsed(argv)
    import retrieval
    import rollout

    try:
        kr1.settle(args)
        rows = gold_rows(retrieval.read_qa(args.eval))[: args.limit]
        if not rows:
            raise retrieval.RetrievalError(f"{args.eval}: no open question names supporting_titles")
        index = retrieval.open_index(args.index)
        titles = {title.casefold() for r in rows for title in r["supporting_titles"]}
        passages = first_passages(index, titles)
        print(
            f"gold passages: the index has {len(passages)} of {len(titles)} titles", file=sys.stderr
        )
        model, tok = kr1.loaded(args, index)
        search = kr1.RecordingSearch(gold_search(rows, passages, tok))
        with rollout.bf16_autocast(args.device, args.bf16):
            kr1.evaluate(args, rows, model, tok, search)
        return 0
    except (kr1.RolloutSettingsError, retrieval.RetrievalError, rollout.ModelLoadError) as e:
        print(f"reader_ceiling.py: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
