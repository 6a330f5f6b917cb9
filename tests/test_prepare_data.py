"""data/prepare_2wiki.py: 2WikiMultihopQA's own release format -> the question and corpus files the presets read.

python -m pytest -q tests/test_prepare_data.py
"""

import json
import subprocess
import sys
from pathlib import Path

import retrieval

ROOT = Path(__file__).resolve().parents[1]
DEV = [  # two records in dev.json's format (abridged real 2Wiki questions)
    {
        "_id": "q1",
        "type": "compositional",
        "question": "Where was the husband of Octavie Coudreau born?",
        "answer": "Sonnac",
        "answer_id": "Q1",
        "context": [
            [
                "Octavie Coudreau",
                ["Octavie Coudreau was a French explorer.", "She married Henri Coudreau."],
            ],
            ["Henri Coudreau", ["Henri Coudreau was born in Sonnac."]],
            ["Sonnac", ["Sonnac is a commune."]],
        ],
        "supporting_facts": [["Octavie Coudreau", 1], ["Henri Coudreau", 0]],
    },
    {
        "_id": "q2",
        "type": "comparison",
        "question": "Who was born first, Henri Coudreau or Octavie Coudreau?",
        "answer": "Henri Coudreau",
        "answer_id": "Q2",
        "context": [
            ["Henri Coudreau", ["Henri Coudreau was born in Sonnac."]],
            ["Octavie Coudreau", ["Octavie Coudreau was a French explorer."]],
        ],
        "supporting_facts": [["Henri Coudreau", 0], ["Octavie Coudreau", 0]],
    },
]
ALIASES = [{"Q_id": "Q1", "aliases": ["Sonnac, Charente-Maritime"], "demonyms": []}]


def test_release_files_become_qa_and_corpus_files_the_project_reads(tmp_path):
    (tmp_path / "dev.json").write_text(json.dumps(DEV))
    (tmp_path / "id_aliases.json").write_text("".join(json.dumps(r) + "\n" for r in ALIASES))
    out = tmp_path / "2wiki"
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "data" / "prepare_2wiki.py"),
            str(tmp_path / "dev.json"),
            "--aliases",
            str(tmp_path / "id_aliases.json"),
            "--out",
            str(out),
            "--test",
            "1",
            "--train",
            "1",
        ],
        check=True,
    )
    test, train = retrieval.read_qa(out / "test.jsonl"), retrieval.read_qa(out / "train.jsonl")
    assert [r["question"] for r in test + train] == [r["question"] for r in DEV]
    assert test[0]["answers"] == ["Sonnac", "Sonnac, Charente-Maritime"] and train[0][
        "answers"
    ] == ["Henri Coudreau"]
    assert (
        test[0]["supporting_titles"] == ["Octavie Coudreau", "Henri Coudreau"]
        and test[0]["type"] == "compositional"
    )
    corpus = [json.loads(x) for x in (out / "corpus.jsonl").read_text().splitlines()]
    assert [c["title"] for c in corpus] == [
        "Octavie Coudreau",
        "Henri Coudreau",
        "Sonnac",
    ]  # one per title
    assert (
        corpus[0]["text"] == "Octavie Coudreau was a French explorer. She married Henri Coudreau."
    )
    index = retrieval.Index.build(out / "corpus.jsonl", tmp_path / "index", show_progress=False)
    assert index.search(["husband of Octavie Coudreau"], k=1)[0][0]["title"] == "Octavie Coudreau"


def test_a_release_without_answer_ids_is_refused_in_one_line(tmp_path):
    """data.zip's dev.json has no answer_id: with --aliases nothing could be mapped, so the script says so and stops."""
    (tmp_path / "dev.json").write_text(
        json.dumps([{k: v for k, v in r.items() if k != "answer_id"} for r in DEV])
    )
    (tmp_path / "id_aliases.json").write_text("".join(json.dumps(r) + "\n" for r in ALIASES))
    cmd = [
        sys.executable,
        str(ROOT / "data" / "prepare_2wiki.py"),
        str(tmp_path / "dev.json"),
        "--out",
        str(tmp_path),
    ]
    p = subprocess.run(
        [*cmd, "--aliases", str(tmp_path / "id_aliases.json")], capture_output=True, text=True
    )
    assert p.returncode == 2 and not (tmp_path / "test.jsonl").exists()
    assert (
        p.stderr.strip().splitlines()[-1].startswith("prepare_2wiki.py: error:")
        and "answer_id" in p.stderr
    )
    assert (
        subprocess.run([*cmd, "--no-aliases"], capture_output=True).returncode == 0
    )  # asked for: one answer each
