"""Benchmark retrieval.py: quality on 2WikiMultihopQA, speed against raw bm25s and rank_bm25, and scale.

1. Quality: recall@2 / recall@5 of the supporting passages (matched by title, as HippoRAG does) for the 1,000
   questions of DATA/test.jsonl over DATA/corpus.jsonl (--data, default runs/2wiki: data/prepare_2wiki.py writes
   it; the numbers in BENCHMARKS.md are HippoRAG's 1,000-question sample), beside HippoRAG's BM25.
2. Speed: all queries in one batch through `Index.search` (numba and numpy scorers) vs raw bm25s on the same
   loaded index (`bm25s.tokenize` + `BM25.retrieve`, what the wrapper wraps) vs `rank_bm25.BM25Okapi` (same
   tokens; slow, so timed on a subset and scaled). Best of --repeats; also the first search in a fresh process.
3. Scale: a synthetic Wikipedia-like corpus (wiki-18 JSONL layout, --words words per passage from a Zipf(1)
   vocabulary whose 33 most frequent words are bm25s' English stopwords) per --scale-sizes; build, load and
   search each run in a fresh subprocess; build memory is the peak PSS of the build process and its workers
   together (sampled every 0.2 s). At --ref-sizes the build also runs in-process (each pass' CPU cost) and as
   bm25s' own in-memory `index()` (the baseline), and the two indexes are compared file by file and by top-10.
   Then a model of the build on wiki-18 (21M passages) on 16 cores.

    python bench/bench_retrieval.py --out runs/bench_retrieval.json                          # full (~40 min)
    python bench/bench_retrieval.py --scale-sizes 20000 50000 --ref-sizes 50000 --rank-queries 20 --repeats 2
    python bench/bench_retrieval.py --skip-scale                                             # 2wiki only
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import bm25s
import numpy as np
import Stemmer
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import retrieval  # noqa: E402  (the repo root is not a package, so it goes on the path first)

HIPPORAG_BM25 = {
    2: 51.8,
    5: 61.9,
}  # HippoRAG (Gutiérrez et al. 2024): BM25 recall@2/@5 on these 1,000 questions
WIKI18 = (
    21_015_324  # passages in FlashRAG/Search-R1 wiki-18 (DPR 100-word chunks of the Dec 2018 dump)
)
WIKI18_TERMS = (
    5_345_516  # unique stemmed terms of Pyserini's Lucene BM25 index of the same passages
)


def mem_gib(field: str) -> float:
    """A /proc/self/status field (VmHWM = peak RSS, VmRSS, RssAnon, RssFile) in GiB."""
    lines = Path("/proc/self/status").read_text().splitlines()
    return next(
        (int(ln.split()[1]) / 2**20 for ln in lines if ln.startswith(field + ":")), float("nan")
    )


def best_of(fn, repeats: int, clock=time.perf_counter) -> float:
    """Smallest time of `repeats` calls in seconds (the least disturbed run); clock=time.process_time gives the
    CPU seconds, which other jobs on a shared machine disturb far less than the wall clock."""
    times = []
    for _ in range(repeats):
        t0 = clock()
        fn()
        times.append(clock() - t0)
    return min(times)


def raw_search(bm25: bm25s.BM25, queries: list[str], k: int, corpus=None):
    """What the wrapper wraps: bm25s' own tokenize + retrieve on the loaded index (doc ids, or `corpus` rows)."""
    tokens = bm25s.tokenize(
        queries, stopwords="en", stemmer=Stemmer.Stemmer("english"), show_progress=False
    )
    return bm25.retrieve(tokens, k=k, corpus=corpus, show_progress=False)


def postings_per_query(index: retrieval.Index, queries: list[str]) -> float:
    """Mean postings a query scores, as a fraction of the corpus (how heavy the queries are)."""
    df = np.diff(np.asarray(index.bm25.scores["indptr"]))  # (vocab,) passages per term
    return float(np.mean([df[q].sum() for q in index.tokenize_queries(queries) if q])) / len(index)


def recall(index: retrieval.Index, rows: list[dict], k: int) -> float:
    """Mean over questions of |gold titles among the top-k titles| / |gold titles|, in %."""
    hits = index.search([r["question"] for r in rows], k=k)
    per_q = [
        len(set(r["supporting_titles"]) & {h["title"] for h in hs})
        / len(set(r["supporting_titles"]))
        for r, hs in zip(rows, hits)
    ]
    return 100 * float(np.mean(per_q))


def bench_2wiki(args, work: Path) -> dict:
    rows = [json.loads(line) for line in (args.data / "test.jsonl").read_text().splitlines()]
    queries = [r["question"] for r in rows]
    t0 = time.perf_counter()
    retrieval.Index.build(args.data / "corpus.jsonl", work / "2wiki")
    build_s = time.perf_counter() - t0
    backends = ["numba", "numpy"] if retrieval.HAS_NUMBA else ["numpy"]
    idx = {
        b: retrieval.Index.load(work / "2wiki", backend=b, threads=1) for b in backends
    }  # raw bm25s: 1 thread
    first = next(iter(idx.values()))
    res = {
        "passages": len(first),
        "build_s": build_s,
        "queries": len(queries),
        "k": args.k,
        "default_backend": retrieval.Index.load(work / "2wiki").bm25.backend,
    }
    print(
        f"\n== 2WikiMultihopQA: {len(queries)} questions over {len(first):,} passages "
        f"(built in {res['build_s']:.1f} s; Index.load picks the {res['default_backend']} scorer by default)"
    )
    for k in (2, 5):
        res[f"recall@{k}"] = recall(first, rows, k)
        print(
            f"recall@{k}: {res[f'recall@{k}']:.1f} %   (HippoRAG paper, BM25: {HIPPORAG_BM25[k]} %)"
        )
    res["postings_per_query"] = postings_per_query(first, queries)
    print(
        f"a query scores {100 * res['postings_per_query']:.2f} % of the corpus' postings on average"
    )

    corpus = bm25s.utils.corpus.JsonlCorpus(
        str(work / "2wiki" / "passages.jsonl"), show_progress=False
    )
    for (
        b,
        ix,
    ) in idx.items():  # the check runs first: numba compiles its kernels there, outside the timings
        raw_ids = [
            [first.passage(int(d))["id"] for d in row]
            for row in raw_search(ix.bm25, queries, args.k)[0]
        ]
        same = [[h["id"] for h in hs] for hs in ix.search(queries, k=args.k)] == raw_ids
        wrap = len(queries) / best_of(lambda ix=ix: ix.search(queries, k=args.k), args.repeats)
        raw = len(queries) / best_of(
            lambda ix=ix: raw_search(ix.bm25, queries, args.k), args.repeats
        )
        texts = len(queries) / best_of(
            lambda ix=ix: raw_search(ix.bm25, queries, args.k, corpus), args.repeats
        )
        res[b] = {
            "wrapper_qps": wrap,
            "raw_bm25s_qps": raw,
            "ratio": wrap / raw,
            "same_top_k": bool(same),
            "raw_bm25s_with_texts_qps": texts,
        }
        print(
            f"[{b}] wrapper {wrap:,.0f} queries/s | raw bm25s {raw:,.0f} queries/s (ids only; {texts:,.0f} with "
            f"passages via bm25s' JsonlCorpus) | ratio {wrap / raw:.2f} (target >= 0.95) | same top-{args.k}: {same}"
        )

    from rank_bm25 import BM25Okapi

    stem = Stemmer.Stemmer("english")
    passages = map(json.loads, (args.data / "corpus.jsonl").read_text().splitlines())
    texts = [f"{p['title']}\n{p['text']}" for p in passages]
    t0 = time.perf_counter()
    okapi = BM25Okapi(
        bm25s.tokenize(texts, stopwords="en", stemmer=stem, return_ids=False, show_progress=False)
    )
    res["rank_bm25_build_s"] = time.perf_counter() - t0
    sub = queries[: args.rank_queries]

    def okapi_search():  # same tokens as bm25s; one get_scores (a dense pass over the corpus) per query
        for q in bm25s.tokenize(
            sub, stopwords="en", stemmer=stem, return_ids=False, show_progress=False
        ):
            np.argpartition(-okapi.get_scores(q), args.k)[: args.k]

    res["rank_bm25_qps"] = len(sub) / best_of(okapi_search, max(1, args.repeats // 2))
    fast = res[next(iter(idx))]["wrapper_qps"] / res["rank_bm25_qps"]
    print(
        f"rank_bm25.BM25Okapi: built in {res['rank_bm25_build_s']:.1f} s, {res['rank_bm25_qps']:,.0f} queries/s "
        f"(timed on the first {len(sub)} queries, scaled) -> the wrapper ({next(iter(idx))}) is {fast:,.0f}x faster"
    )

    for b in idx:  # what `kr1.py --ask` pays: import + load + first search (numba compiles here)
        out = child("first", index=str(work / "2wiki"), backend=b)
        res[b]["first_search_s"], res[b]["load_s"] = out["first_search_s"], out["load_s"]
        print(
            f"[{b}] fresh process: load {out['load_s']:.2f} s, first search {out['first_search_s']:.2f} s"
        )
    return res


def vocabulary(n: int) -> np.ndarray:
    """`n` distinct words by frequency rank: bm25s' English stopwords first, then pseudo-words of CV syllables."""
    syl = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]  # 70 syllables
    words, length = list(bm25s.stopwords.STOPWORDS_EN), 2
    while len(words) < n:
        for i in range(min(len(syl) ** length, n - len(words))):
            words.append("".join(syl[(i // len(syl) ** j) % len(syl)] for j in range(length)))
        length += 1
    return np.array(words[:n], dtype=object)


def zipf(rng: np.random.Generator, vocab: int, shape: tuple) -> np.ndarray:
    """Word ranks drawn from Zipf(s=1) over `vocab` words (Wikipedia's word frequencies follow it closely)."""
    cdf = np.cumsum(1 / np.arange(1, vocab + 1))
    return np.searchsorted(cdf / cdf[-1], rng.random(shape))


def write_corpus(path: Path, n: int, vocab: int, words: int, seed: int = 0) -> None:
    """Stream `n` passages in wiki-18 layout; ~6.5 passages per article share a title, as in wiki-18."""
    rng, voc = np.random.default_rng(seed), vocabulary(vocab)
    titles = rng.integers(
        1000, vocab, (n * 2 // 13 + 1, 2)
    )  # (articles, 2) word ranks: names are rare words
    chunk = 10_000
    with open(path, "w") as f, tqdm(total=n, desc=f"write {path.name}", unit=" passages") as bar:
        for start in range(0, n, chunk):
            m = min(chunk, n - start)
            ids = zipf(rng, vocab, (m, words))  # (m, words) word ranks
            for i, pid in enumerate(range(start, start + m)):
                title = " ".join(voc[titles[pid * 2 // 13]]).title()
                f.write(
                    json.dumps({"id": str(pid), "contents": f'"{title}"\n' + " ".join(voc[ids[i]])})
                    + "\n"
                )
            bar.update(m)


def synthetic_queries(n: int, vocab: int, seed: int = 1) -> list[str]:
    """12-word queries (the mean 2wiki question length) drawn from the corpus' own Zipf distribution."""
    voc = vocabulary(vocab)
    return [" ".join(voc[row]) for row in zipf(np.random.default_rng(seed), vocab, (n, 12))]


def child(phase: str, **kw) -> dict:
    """Run one phase in a fresh interpreter (so VmHWM is that phase's own peak RSS); it prints one JSON line."""
    arg = json.dumps({"phase": phase, **kw})
    proc = subprocess.run(
        [sys.executable, __file__, "--child", arg], stdout=subprocess.PIPE, text=True, check=True
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def tree_pss() -> dict[int, float]:
    """Proportional set size (GiB; shared pages split between the processes sharing them) of this process and of
    its children (the build's workers), by pid."""
    me, pids = os.getpid(), [os.getpid()]
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == me:
                pids.append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            continue
    out = {}
    for pid in pids:
        try:
            lines = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
        except OSError:
            continue
        out[pid] = next(int(ln.split()[1]) for ln in lines if ln.startswith("Pss:")) / 2**20
    return out


def watch_memory(stop: threading.Event, peak: dict) -> None:
    """Every 0.2 s: peak PSS of the whole process tree, of this process and of the largest worker."""
    while not stop.wait(0.2):
        pss, me = tree_pss(), os.getpid()
        peak["tree"] = max(peak.get("tree", 0.0), sum(pss.values()))
        peak["main"] = max(peak.get("main", 0.0), pss.get(me, 0.0))
        peak["worker"] = max([peak.get("worker", 0.0)] + [v for pid, v in pss.items() if pid != me])


def reference_build(corpus: Path, out: Path) -> None:
    """The build before the bounded-memory one: every token id in memory, then bm25s' own `BM25.index()`."""
    tmp, tok, offsets = out.with_name(out.name + ".building"), retrieval._tokenizer(), []
    tmp.mkdir(parents=True)
    with open(tmp / "passages.jsonl", "wb") as pf:

        def texts():
            for lineno, rec in retrieval.read_jsonl(corpus, "corpus file"):
                pid, title, text = retrieval._passage(rec, corpus, lineno)
                offsets.append(pf.tell())
                pf.write(
                    json.dumps(
                        {"id": pid, "title": title, "text": text}, ensure_ascii=False
                    ).encode()
                    + b"\n"
                )
                yield f"{title}\n{text}"

        ids = list(tok.streaming_tokenize(texts(), update_vocab=True))
    bm25 = bm25s.BM25()
    bm25.index((ids, tok.get_vocab_dict()), show_progress=False)
    bm25.save(tmp, show_progress=False)
    tok.save_vocab(tmp)
    tok.save_stopwords(tmp)
    np.save(tmp / "passages.offsets.npy", np.asarray(offsets, dtype=np.int64))
    (tmp / retrieval.MANIFEST).write_text(
        json.dumps({"format": retrieval.INDEX_FORMAT, "passages": len(ids)})
    )
    tmp.rename(out)


def run_build(c: dict, out: dict) -> None:
    path, stop, peak, t0 = Path(c["index"]), threading.Event(), {}, time.perf_counter()
    watcher = threading.Thread(target=watch_memory, args=(stop, peak), daemon=True)
    watcher.start()
    if c["phase"] == "build":
        retrieval.Index.build(Path(c["corpus"]), path, workers=c["workers"], show_progress=False)
        out["seconds"] = json.loads((path / retrieval.MANIFEST).read_text())["seconds"]
    else:
        reference_build(Path(c["corpus"]), path)
    stop.set()
    watcher.join()
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    out.update(
        build_s=time.perf_counter() - t0,
        build_cpu_s=time.process_time() + kids.ru_utime + kids.ru_stime,
        main_cpu_s=time.process_time(),
        peak_rss_gib=mem_gib("VmHWM"),
        peak_pss_gib=peak.get("tree", 0.0),
        main_pss_gib=peak.get("main", 0.0),
        worker_pss_gib=peak.get("worker", 0.0),
        index_gib=sum(f.stat().st_size for f in path.iterdir()) / 2**30,
        passages_gib=(path / "passages.jsonl").stat().st_size / 2**30,
        postings=int(np.load(path / "indptr.csc.index.npy", mmap_mode="r")[-1]),
    )


def run_compare(c: dict, out: dict) -> None:
    """Ours against bm25s' own index() on the same corpus: the matrix files, and top-10 ids and scores."""
    a, b = Path(c["index"]), Path(c["ref"])
    out["same_files"] = all(
        np.array_equal(np.load(a / f, mmap_mode="r"), np.load(b / f, mmap_mode="r"))
        for f in ("data.csc.index.npy", "indices.csc.index.npy", "indptr.csc.index.npy")
    )
    vocab = [json.loads((d / "vocab.index.json").read_text()) for d in (a, b)]
    out["same_vocab"] = vocab[0] == vocab[1]
    queries = synthetic_queries(c["queries"], c["vocab"])
    ours, ref = (
        retrieval.Index.load(p, backend="numba" if retrieval.HAS_NUMBA else "numpy") for p in (a, b)
    )
    top = [
        [[(h["id"], h["score"]) for h in hs] for hs in ix.search(queries, k=10)]
        for ix in (ours, ref)
    ]
    out.update(
        queries=len(queries),
        same_top10=top[0] == top[1],
        differing_queries=sum(x != y for x, y in zip(*top)),
    )


def run_queries(c: dict, out: dict) -> None:
    """Load, RSS, then batches of synthetic queries at 1 and 2 numba threads (and the numpy scorer)."""
    path, t0 = Path(c["index"]), time.perf_counter()
    ix = retrieval.Index.load(path, backend="numba" if retrieval.HAS_NUMBA else "numpy")
    batch, k = c["batch"], c["k"]
    queries = synthetic_queries(c["queries"], c["vocab"])
    out.update(
        load_s=time.perf_counter() - t0,
        load_rss_gib=mem_gib("VmRSS"),
        load_anon_gib=mem_gib("RssAnon"),
        vocab_size=len(ix.bm25.vocab_dict),
        postings_per_query=postings_per_query(ix, queries),
        default_threads=ix.threads,
    )

    def run(threads):
        for s in range(0, len(queries), batch):
            ix.search(queries[s : s + batch], k=k, threads=threads)

    for threads in (1, 2):  # compile numba's serial and parallel kernels + page the index in
        ix.search(queries[:batch], k=k, threads=threads)
    for threads in (1, 2):
        out[f"qps_{threads}t"] = len(queries) / best_of(lambda t=threads: run(t), c["repeats"])
    out["qps_1t_cpu"] = len(queries) / best_of(lambda: run(1), c["repeats"], time.process_time)
    out.update(rss_after_queries_gib=mem_gib("VmRSS"), peak_rss_gib=mem_gib("VmHWM"))
    if retrieval.HAS_NUMBA:  # the numpy scorer is ~25x slower here: one batch is enough
        slow = retrieval.Index.load(path, backend="numpy")
        out["qps_numpy_1t"] = batch / best_of(lambda: slow.search(queries[:batch], k=k), 1)


def run_child(c: dict) -> None:
    out, t0 = {"base_rss_gib": mem_gib("VmRSS")}, time.perf_counter()  # base: after imports
    if c["phase"] in ("build", "reference"):
        run_build(c, out)
    elif c["phase"] == "compare":
        run_compare(c, out)
    elif c["phase"] == "first":
        ix, t1 = retrieval.Index.load(c["index"], backend=c["backend"]), time.perf_counter()
        ix.search(["Who is the spouse of the director of film West Of Shanghai?"], k=3, threads=1)
        out.update(load_s=t1 - t0, first_search_s=time.perf_counter() - t1)
    else:
        run_queries(c, out)
    print(json.dumps(out))


def print_build(name: str, r: dict) -> None:
    print(
        f"[{name}] build {r['build_s']:.1f} s wall, {r['build_cpu_s']:.1f} CPU s ({r['main_cpu_s']:.1f} in the "
        f"main process); peak memory {r['peak_pss_gib']:.2f} GiB PSS over all processes (main {r['main_pss_gib']:.2f}"
        f", largest worker {r['worker_pss_gib']:.2f}; main's VmHWM {r['peak_rss_gib']:.2f} GiB RSS); index on disk "
        f"{r['index_gib']:.2f} GiB (passages.jsonl {r['passages_gib']:.2f}); {r['postings']:,} postings"
    )
    if "seconds" in r:
        print(
            "   passes [wall s, main CPU s]: "
            + ", ".join(f"{k} {v}" for k, v in r["seconds"].items())
        )


def bench_scale(args, work: Path) -> dict:
    res = {}
    for n in args.scale_sizes:
        corpus, out, ref = (
            work / f"synthetic-{n}.jsonl",
            work / f"index-{n}",
            work / f"reference-{n}",
        )
        write_corpus(corpus, n, args.vocab, args.words)
        r = {"corpus_gib": corpus.stat().st_size / 2**30, "workers": args.workers}
        print(
            f"\n== synthetic {n:,} passages x {args.words} words, {args.vocab:,}-word vocabulary, "
            f"{r['corpus_gib']:.2f} GiB"
        )
        r["build"] = child("build", index=str(out), corpus=str(corpus), workers=args.workers)
        print_build(f"ours, {args.workers} workers", r["build"])
        if (
            n in args.ref_sizes
        ):  # the serial run gives each pass' CPU cost; the reference, the old build's
            r["serial"] = child("build", index=str(work / "serial"), corpus=str(corpus), workers=1)
            print_build("ours, in-process", r["serial"])
            shutil.rmtree(work / "serial")
            r["reference"] = child("reference", index=str(ref), corpus=str(corpus))
            print_build("bm25s' own index(), in memory", r["reference"])
            r["compare"] = child(
                "compare",
                index=str(out),
                ref=str(ref),
                queries=args.compare_queries,
                vocab=args.vocab,
            )
            shutil.rmtree(ref)
            b, o = r["reference"], r["build"]
            print(
                f"ours / bm25s index(): peak memory {o['peak_pss_gib'] / b['peak_pss_gib']:.2f}x, wall time "
                f"{o['build_s'] / b['build_s']:.2f}x | identical matrix files: {r['compare']['same_files']}, "
                f"vocabulary: {r['compare']['same_vocab']}, top-10 ids and scores for {r['compare']['queries']:,} "
                f"queries: {r['compare']['same_top10']} ({r['compare']['differing_queries']} differ)"
            )
        corpus.unlink()
        q = child(
            "query",
            index=str(out),
            queries=args.scale_queries,
            vocab=args.vocab,
            batch=args.batch,
            k=args.k,
            repeats=args.repeats,
        )
        r.update({f"q_{key}": v for key, v in q.items()})
        print(
            f"load {q['load_s']:.2f} s, RSS after load {q['load_rss_gib']:.2f} GiB ({q['load_anon_gib']:.2f} anon, "
            f"{q['vocab_size']:,} terms); batch {args.batch}, k={args.k}: {q['qps_1t']:,.0f} queries/s (1 thread; "
            f"{q['qps_1t_cpu']:,.0f} per CPU second), {q['qps_2t']:,.0f} queries/s (2 threads; default "
            f"{q['default_threads']}), numpy scorer {q.get('qps_numpy_1t', float('nan')):,.1f} queries/s; a query "
            f"scores {100 * q['postings_per_query']:.2f} % of the postings"
        )
        res[n] = r
        shutil.rmtree(out)
    return res


def extrapolate(scale: dict, target: int = WIKI18, cores: int = 16) -> dict:
    """wiki-18 on a `cores`-core machine from the synthetic runs, linear in passages:
    - build time, per passage of the largest run: tokenising is spread over the cores but cannot beat the main
      process' share (numbering terms, writing passages and postings), splitting is serial, scoring is spread over
      the workers (its CPU = its wall time x workers: they are saturated);
    - build memory: main process PSS linear in passages (two largest runs), plus wiki-18's larger vocabulary at the
      bytes per term measured after load, plus `cores` workers at the largest worker's peak;
    - disk: the index (linear) plus the spilled postings (12 bytes each) until they are split."""
    sizes = sorted(scale)[-2:]
    n0, n1 = (0, sizes[0]) if len(sizes) == 1 else sizes
    big = scale[n1]

    def fit(get):
        y0, y1 = 0.0 if n0 == 0 else get(scale[n0]), get(scale[n1])
        return y1 + (y1 - y0) / (n1 - n0) * (target - n1)

    b, w = big["build"], big["workers"]
    sec = b["seconds"]  # pass -> [wall, main CPU]
    score_cpu = sec["score"][0] * w
    tok_main, tok_work = (
        sec["tokenize"][1] / n1,
        (b["build_cpu_s"] - b["main_cpu_s"] - score_cpu) / n1,
    )
    split, score = sec["split"][1] / n1, score_cpu / n1  # CPU seconds per passage

    def hours(c, n=target):
        return (
            n * (max(tok_main, (tok_main + tok_work) / c) + split + score / c) / 3600
        )  # c workers + main on c cores

    per_term = (big["q_load_rss_gib"] - big["q_base_rss_gib"]) / big["q_vocab_size"]
    extra = max(0, WIKI18_TERMS - big["q_vocab_size"]) * per_term
    ref_n = max((n for n in scale if "reference" in scale[n]), default=None)
    est = {
        "from_passages": sizes,
        "cores": cores,
        "build_h": hours(cores),
        "build_h_2cores": hours(2),
        "model_s_largest_run": hours(w, n1) * 3600,
        "us_per_passage": {
            "tokenize_main": 1e6 * tok_main,
            "tokenize_workers": 1e6 * tok_work,
            "split": 1e6 * split,
            "score": 1e6 * score,
        },
        "vocab_extra_gib": extra,
        "bytes_per_term": per_term * 2**30,
        "build_peak_gib": fit(lambda r: r["build"]["main_pss_gib"])
        + extra
        + cores * b["worker_pss_gib"],
        "reference_peak_gib": scale[ref_n]["reference"]["peak_pss_gib"] * target / ref_n + extra
        if ref_n
        else None,
        "index_gib": fit(lambda r: r["build"]["index_gib"]),
        "passages_gib": fit(lambda r: r["build"]["passages_gib"]),
        "spill_gib": 12 * fit(lambda r: r["build"]["postings"]) / 2**30,
        "load_rss_gib": fit(lambda r: r["q_load_rss_gib"]) + extra,
        "qps_1t": 1 / fit(lambda r: 1 / r["q_qps_1t"]),
        "qps_2t": 1 / fit(lambda r: 1 / r["q_qps_2t"]),
    }
    print(
        f"\n== wiki-18 ({target:,} passages, {WIKI18_TERMS:,} terms) extrapolated from {sizes}: build "
        f"{60 * est['build_h']:.0f} min on {cores} cores ({60 * est['build_h_2cores']:.0f} min on 2; the model "
        f"gives {est['model_s_largest_run']:.0f} s for the measured {b['build_s']:.0f} s of the {n1:,}-passage run), "
        f"peak memory {est['build_peak_gib']:.1f} GiB (bm25s' own index(): "
        f"{est['reference_peak_gib'] or float('nan'):.0f} GiB), disk {est['index_gib']:.0f} GiB index (of it "
        f"{est['passages_gib']:.0f} GiB passages) + {est['spill_gib']:.0f} GiB temporary, RSS after load "
        f"{est['load_rss_gib']:.1f} GiB, {est['qps_1t']:.1f} / {est['qps_2t']:.1f} queries/s (1 / 2 threads)"
    )
    print(
        "   CPU us per passage: "
        + ", ".join(f"{k} {v:.1f}" for k, v in est["us_per_passage"].items())
    )
    return est


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="write all results as JSON here")
    p.add_argument(
        "--data",
        type=Path,
        default=Path("runs/2wiki"),
        help="2Wiki folder (test.jsonl, corpus.jsonl)",
    )
    p.add_argument(
        "--k",
        type=int,
        default=3,
        help="passages per query in the speed runs (default 3, the agent's)",
    )
    p.add_argument("--repeats", type=int, default=5, help="timings are the best of this many runs")
    p.add_argument(
        "--rank-queries", type=int, default=100, help="queries timed through rank_bm25 (it is slow)"
    )
    p.add_argument("--skip-scale", action="store_true", help="only the 2wiki part")
    p.add_argument(
        "--scale-sizes",
        type=int,
        nargs="+",
        default=[100_000, 1_000_000, 5_000_000],
        help="synthetic corpus sizes",
    )
    p.add_argument(
        "--ref-sizes",
        type=int,
        nargs="*",
        default=[1_000_000],
        help="sizes also built in-process and by bm25s' own index() (the old build), then compared",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=len(os.sched_getaffinity(0)),
        help="build workers (default: all)",
    )
    p.add_argument(
        "--compare-queries", type=int, default=1000, help="queries whose top-10 are compared"
    )
    p.add_argument("--vocab", type=int, default=300_000, help="synthetic vocabulary size")
    p.add_argument(
        "--words", type=int, default=100, help="words per synthetic passage (wiki-18: 100)"
    )
    p.add_argument("--scale-queries", type=int, default=1024, help="synthetic queries per timing")
    p.add_argument(
        "--batch", type=int, default=256, help="queries per search call in the scale runs"
    )
    p.add_argument("--child", type=json.loads, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return run_child(args.child)
    if not (args.data / "test.jsonl").is_file():
        sys.exit(
            f"bench_retrieval.py: error: no {args.data}/test.jsonl (--data; data/prepare_2wiki.py writes it)"
        )
    cpu = [
        ln.split(":", 1)[1].strip()
        for ln in Path("/proc/cpuinfo").read_text().splitlines()
        if "model name" in ln
    ]
    git = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    res = {
        "device": f"{cpu[0] if cpu else '?'}, {os.cpu_count()} cores",
        "commit": git.stdout.strip(),
        "python": platform.python_version(),
        "bm25s": bm25s.__version__,
        "numba": retrieval.HAS_NUMBA,
        "loadavg_start": os.getloadavg(),
    }
    print(
        f"{res['device']} | commit {res['commit']} | bm25s {res['bm25s']} | numba installed: {res['numba']} | "
        f"load average {res['loadavg_start'][0]:.1f} (other jobs on this machine slow every wall-clock timing)"
    )
    with tempfile.TemporaryDirectory(prefix="kr1-bench-") as tmp:
        res["2wiki"] = bench_2wiki(args, Path(tmp))
        if not args.skip_scale:
            res["scale"] = bench_scale(args, Path(tmp))
            res["wiki18"] = extrapolate(res["scale"])
    res["loadavg_end"] = os.getloadavg()
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=1))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
