"""Make the 2WikiMultihopQA files the presets and README commands read, from the dataset's own release.

2WikiMultihopQA (Ho et al., COLING 2020; Apache-2.0) ships `dev.json` (a JSON list: _id, type, question, answer,
context [[title, [sentence, ...]], ...], supporting_facts [[title, sentence index], ...]) and `id_aliases.json`
(JSON lines: Q_id, aliases, demonyms), from https://github.com/Alab-NII/2wikimultihop. This writes, in the format
of retrieval.read_qa and retrieval.py build:

    OUT/test.jsonl     the first --test questions of dev.json        {"id", "question", "answers", "type",
    OUT/train.jsonl    the next --train questions                      "supporting_titles"}
    OUT/corpus.jsonl   every paragraph of both (supporting and distractor), one per title   {"id", "title", "text"}

    python data/prepare_2wiki.py dev.json --aliases id_aliases.json --out runs/2wiki    # then:
    python train.py --preset smollm2-2wiki --dataset runs/2wiki/train.jsonl --index runs/2wiki/corpus.jsonl

The project's own runs used a 1,000-question sample of the same dev set (HippoRAG's, with answer aliases) and 464
further dev questions: the files match in format, not question for question.
"""

import argparse
import json
from pathlib import Path


def question(rec: dict, aliases: dict) -> dict:
    """One dev.json record as a QA row: the gold answer first, then its entity's aliases and demonyms."""
    extra = aliases.get(rec.get("answer_id"), [])
    answers = list(dict.fromkeys([rec["answer"], *extra]))
    titles = list(dict.fromkeys(t for t, _ in rec["supporting_facts"]))
    return {"id": rec["_id"], "question": rec["question"], "answers": answers, "type": rec["type"],
            "supporting_titles": titles}


def read_aliases(path: str | None) -> dict:
    if not path:
        return {}
    rows = (json.loads(line) for line in Path(path).read_text().splitlines() if line.strip())
    return {r["Q_id"]: r.get("aliases", []) + r.get("demonyms", []) for r in rows}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dev", help="2WikiMultihopQA dev.json")
    p.add_argument("--aliases", help="id_aliases.json (answer aliases; without it each question has one answer)")
    p.add_argument("--out", default="runs/2wiki", help="output folder (default runs/2wiki)")
    p.add_argument("--test", type=int, default=1000, help="questions in test.jsonl (default 1000)")
    p.add_argument("--train", type=int, default=464, help="questions in train.jsonl, after the test ones (default 464)")
    a = p.parse_args(argv)
    recs = json.loads(Path(a.dev).read_text())[: a.test + a.train]
    aliases, out = read_aliases(a.aliases), Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, part in (("test", recs[: a.test]), ("train", recs[a.test :])):
        (out / f"{name}.jsonl").write_text("".join(json.dumps(question(r, aliases)) + "\n" for r in part))
    paragraphs = {}  # title -> its paragraph, first seen (a title recurs across questions)
    for title, sents in (c for r in recs for c in r["context"]):
        paragraphs.setdefault(title, " ".join(s.strip() for s in sents))
    (out / "corpus.jsonl").write_text("".join(json.dumps({"id": f"2wm{i:05d}", "title": t, "text": x}) + "\n"
                                              for i, (t, x) in enumerate(paragraphs.items())))
    n_test = len(recs[: a.test])
    print(f"{out}: test {n_test}, train {len(recs) - n_test} questions, corpus {len(paragraphs)} passages")


if __name__ == "__main__":
    main()
