"""Make the 2WikiMultihopQA files the presets and README commands read, from the dataset's own release.

2WikiMultihopQA (Ho et al., COLING 2020; Apache-2.0, https://github.com/Alab-NII/2wikimultihop) links three
archives; use `data_ids_april7.zip` (or `data_ids.zip`): its `dev.json` (a JSON list: _id, type, question, answer,
answer_id, context [[title, [sentence, ...]], ...], supporting_facts [[title, sentence index], ...]) carries the
answer ids that `id_aliases.json` (JSON lines: Q_id, aliases, demonyms) maps to aliases. The first archive,
`data.zip`, has no answer ids: this script refuses it unless told --no-aliases. It writes, in the format of
retrieval.read_qa and retrieval.py build:

    OUT/test.jsonl     the first --test questions of dev.json        {"id", "question", "answers", "type",
    OUT/train.jsonl    the next --train questions                      "supporting_titles"}
    OUT/corpus.jsonl   every paragraph of both (supporting and distractor), one per title   {"id", "title", "text"}

    unzip data_ids_april7.zip      # -> data_ids_april7/dev.json (and id_aliases.json; see its README)
    python data/prepare_2wiki.py dev.json --aliases id_aliases.json --out runs/2wiki    # then:
    python train.py --preset smollm2-2wiki --dataset runs/2wiki/train.jsonl --index runs/2wiki/corpus.jsonl

The project's own runs used a 1,000-question sample of the same dev set (HippoRAG's, with answer aliases) and 464
further dev questions: the files match in format, not question for question.
"""

import argparse
import json
import sys
from pathlib import Path


def question(rec: dict, aliases: dict) -> dict:
    """One dev.json record as a QA row: the gold answer first, then its entity's aliases and demonyms."""
    extra = aliases.get(rec.get("answer_id"), [])
    answers = list(dict.fromkeys([rec["answer"], *extra]))
    titles = list(dict.fromkeys(t for t, _ in rec["supporting_facts"]))
    return {
        "id": rec["_id"],
        "question": rec["question"],
        "answers": answers,
        "type": rec["type"],
        "supporting_titles": titles,
    }


def read_aliases(path: str) -> dict:
    rows = (json.loads(line) for line in Path(path).read_text().splitlines() if line.strip())
    return {r["Q_id"]: r.get("aliases", []) + r.get("demonyms", []) for r in rows}


def check_answer_ids(recs: list[dict], dev: str) -> None:
    """Aliases are found through answer_id; a release without it would silently give one answer per question."""
    if not any("answer_id" in r for r in recs):
        print(
            f"prepare_2wiki.py: error: {dev} has no answer_id field (data.zip's release), so no answer can get its "
            "aliases: use dev.json from data_ids_april7.zip, or pass --no-aliases",
            file=sys.stderr,
        )
        raise SystemExit(2)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("dev", help="2WikiMultihopQA dev.json")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument(
        "--aliases", help="id_aliases.json: each answer's aliases and demonyms, found by answer_id"
    )
    what.add_argument(
        "--no-aliases", action="store_true", help="one answer per question (EM then misses aliases)"
    )
    p.add_argument("--out", default="runs/2wiki", help="output folder (default runs/2wiki)")
    p.add_argument("--test", type=int, default=1000, help="questions in test.jsonl (default 1000)")
    p.add_argument(
        "--train",
        type=int,
        default=464,
        help="questions in train.jsonl, after the test ones (default 464)",
    )
    a = p.parse_args(argv)
    recs = json.loads(Path(a.dev).read_text())[: a.test + a.train]
    if a.aliases:
        check_answer_ids(recs, a.dev)
    aliases, out = read_aliases(a.aliases) if a.aliases else {}, Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, part in (("test", recs[: a.test]), ("train", recs[a.test :])):
        (out / f"{name}.jsonl").write_text(
            "".join(json.dumps(question(r, aliases)) + "\n" for r in part)
        )
    paragraphs = {}  # title -> its paragraph, first seen (a title recurs across questions)
    for title, sents in (c for r in recs for c in r["context"]):
        paragraphs.setdefault(title, " ".join(s.strip() for s in sents))
    (out / "corpus.jsonl").write_text(
        "".join(
            json.dumps({"id": f"2wm{i:05d}", "title": t, "text": x}) + "\n"
            for i, (t, x) in enumerate(paragraphs.items())
        )
    )
    n_test = len(recs[: a.test])
    with_aliases = sum(r.get("answer_id") in aliases for r in recs)
    print(
        f"{out}: test {n_test}, train {len(recs) - n_test} questions ({with_aliases} with aliases), "
        f"corpus {len(paragraphs)} passages"
    )


if __name__ == "__main__":
    main()
