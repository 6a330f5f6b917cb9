"""bench/paired_eval.py: exact McNemar against hand-computed binomial tails, gained/lost and the bootstrap interval on
hand-made evaluation files, clustered (several samples per question) files, and clear errors."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import paired_eval  # noqa: E402


def write(
    path: Path, rows: list[tuple[str, str, float]], question="Who built {}?", answers=("Ada",)
) -> str:
    """kr1.py --eval rows; by default open questions (the answer is not named in the question)."""
    path.write_text(
        "".join(
            json.dumps(
                {
                    "id": i,
                    "type": t,
                    "question": question.format(i),
                    "answers": list(answers),
                    "em": em,
                    "f1": em,
                }
            )
            + "\n"
            for i, t, em in rows
        )
    )
    return str(path)


def test_mcnemar_exact_hand_computed():
    # 11 gained, 3 lost: 2 * (C(14,0)+C(14,1)+C(14,2)+C(14,3)) / 2^14 = 2 * 470 / 16384
    assert paired_eval.mcnemar_exact(11, 3) == pytest.approx(940 / 16384, abs=1e-15)
    assert paired_eval.mcnemar_exact(3, 11) == paired_eval.mcnemar_exact(11, 3)
    assert paired_eval.mcnemar_exact(5, 0) == pytest.approx(2 / 32)
    assert paired_eval.mcnemar_exact(0, 0) == 1.0
    assert paired_eval.mcnemar_exact(4, 4) == 1.0  # capped: an even split is no evidence


def test_report_counts_types_and_interval(tmp_path):
    # 20 questions; A right on q0-q4, B right on q2-q11: B gained q5-q11 (7), lost q0-q1 (2)
    a = write(
        tmp_path / "a.jsonl",
        [(f"q{i}", "comparison" if i < 10 else "compositional", float(i < 5)) for i in range(20)],
    )
    b = write(
        tmp_path / "b.jsonl",
        [
            (f"q{i}", "comparison" if i < 10 else "compositional", float(2 <= i < 12))
            for i in range(20)
        ],
    )
    r = paired_eval.report(a, b)
    al = r["all"]
    assert (al["n"], al["gained"], al["lost"]) == (20, 7, 2)
    assert (al["a"], al["b"], al["diff"]) == pytest.approx((0.25, 0.5, 0.25))
    assert al["mcnemar_p"] == pytest.approx(paired_eval.mcnemar_exact(7, 2))
    assert al["ci95"][0] < 0.25 < al["ci95"][1] and al["ci95"][1] - al["ci95"][0] < 0.6
    comp, cmp_ = r["by_type"]["compositional"], r["by_type"]["comparison"]
    assert (comp["gained"], comp["lost"], cmp_["gained"], cmp_["lost"]) == (2, 0, 5, 2)


def test_clustered_samples_average_per_question(tmp_path):
    # four samples per question: A scores 1/4 on q0, B 3/4; questions only in one file are left out
    a = write(
        tmp_path / "a.jsonl",
        [("q0", "x", float(s == 0)) for s in range(4)] + [("q1", "x", 0.0)] * 4,
    )
    b = write(
        tmp_path / "b.jsonl", [("q0", "x", float(s > 0)) for s in range(4)] + [("q2", "x", 1.0)] * 4
    )
    r = paired_eval.report(a, b)
    assert r["samples_per_q"] == [4, 4] and r["only_in_one"] == 2
    assert (r["all"]["n"], r["all"]["a"], r["all"]["b"]) == (1, 0.25, 0.75)
    assert "mcnemar_p" not in r["all"]  # one 0/1 score per question is what McNemar needs


def test_bad_file_names_the_line(tmp_path):
    good = write(tmp_path / "a.jsonl", [("q0", "x", 1.0)])
    bad = tmp_path / "b.jsonl"
    bad.write_text('{"id": "q0", "question": "?", "answers": ["a"], "em": 1.0}\n{"id": "q1"}\n')
    with pytest.raises(SystemExit, match=r"b\.jsonl:2: .*'em'"):
        paired_eval.report(good, str(bad))
    other = write(tmp_path / "c.jsonl", [("z", "x", 1.0)])
    with pytest.raises(SystemExit, match="share no question ids"):
        paired_eval.report(good, other)


def test_kinds_beside_their_chance(tmp_path):
    """Two-option questions name the answer; yes-no ones have yes/no golds: each kind is reported beside what a guess
    scores (0.5; the majority answer's share, 3 of 4 'yes' here) and B's exact binomial p against it."""
    two = [
        (f"t{i}", "comparison", float(i < 9)) for i in range(10)
    ]  # B: 9 of 10 two-option answers right
    a = tmp_path / "a.jsonl"
    b = tmp_path / "b.jsonl"
    lines = [
        write(tmp_path / "part.jsonl", two, "Who came first, Ada or Bob ({})?", ["Ada"]),
        write(
            tmp_path / "yes.jsonl",
            [(f"y{i}", "comparison", 1.0) for i in range(3)],
            "Is {} blue?",
            ["yes"],
        ),
        write(tmp_path / "no.jsonl", [("n0", "comparison", 0.0)], "Is {} red?", ["no"]),
        write(tmp_path / "open.jsonl", [("o0", "compositional", 1.0)]),
    ]
    b.write_text("".join(Path(f).read_text() for f in lines))
    a.write_text(b.read_text().replace('"em": 1.0', '"em": 0.0'))
    k = paired_eval.report(str(a), str(b))["by_kind"]
    assert list(k) == ["open", "two-option", "yes-no"]
    assert (k["two-option"]["n"], k["two-option"]["b"], k["two-option"]["chance"]) == (10, 0.9, 0.5)
    assert k["two-option"]["b_vs_chance_p"] == pytest.approx(
        2 * 11 / 1024
    )  # P(>= 9 or <= 1 of 10 at 1/2)
    assert (k["yes-no"]["n"], k["yes-no"]["chance"]) == (4, 0.75) and k["open"]["chance"] is None
