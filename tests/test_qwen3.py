"""Qwen3 end to end: a tiny random Qwen3 with the real Qwen3 tokenizer and chat template (tests/qwen3.py) through
train.py: one warm-start step on expert trajectories, one GRPO step on sampled ones, a checkpoint that loads back.
The engine's own invariants on Qwen3 run in tests/test_rollout.py (its `tok` fixture's "qwen3" parameter).

    python -m pytest -q tests/test_qwen3.py
"""

import json
import sys

import pytest
import torch
from conftest import item_corpus
from test_train import free_port
from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM


@pytest.fixture(scope="module")
def qwen3_policy(tmp_path_factory, qwen3_tok):
    """A dir with policy/ (tiny random Qwen3: 151,936 embedding rows, as the real ones), index/, qa.jsonl."""
    d = tmp_path_factory.mktemp("qwen3")
    torch.manual_seed(0)
    cfg = Qwen3Config(
        vocab_size=151_936,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        head_dim=16,
        num_key_value_heads=2,
        intermediate_size=128,
        tie_word_embeddings=True,
        eos_token_id=qwen3_tok.eos_token_id,
        pad_token_id=qwen3_tok.pad_token_id,
    )
    Qwen3ForCausalLM(cfg).save_pretrained(d / "policy")
    qwen3_tok.save_pretrained(d / "policy")
    item_corpus(d, repeats=2)
    qa = {
        "question": "In which city was item 3 founded?",
        "answers": ["Lima"],
        "supporting_titles": ["Item 3"],
    }
    (d / "qa.jsonl").write_text(json.dumps(qa) + "\n")
    return d


def test_qwen3_warm_start_and_grpo_step(qwen3_policy, tmp_path, monkeypatch):
    """train.main in-process (a gloo world of one), LoRA: an SFT step on the expert trajectory (think + search, its
    passages, think + answer in Qwen3's template), then a GRPO step whose engine and trainer log-probs agree; the
    checkpoint's hf/ folder is a Qwen3 with the Qwen3 chat template."""
    import train

    for k, v in {
        "RANK": "0",
        "WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
    }.items():
        monkeypatch.setenv(
            k, v
        )  # init_distributed's setdefault would otherwise leave them set in this process
    monkeypatch.setattr(sys, "argv", ["train.py"])
    d, out = qwen3_policy, tmp_path / "run"
    flags = [
        "--model",
        str(d / "policy"),
        "--dataset",
        str(d / "qa.jsonl"),
        "--index",
        str(d / "index"),
        "--group-size",
        "4",
        "--prompts-per-step",
        "1",
        "--max-turns",
        "1",
        "--max-turn-tokens",
        "16",
        "--max-total-tokens",
        "40",
        "--micro-batch",
        "4",
        "--beta",
        "0.04",
        "--lora-rank",
        "4",
        "--sft-steps",
        "1",
        "--sft-batch",
        "1",
        "--steps",
        "1",
        "--warmup-steps",
        "1",
        "--out",
        str(out),
    ]
    assert train.main(flags) == 0
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [(r["step"], r["phase"]) for r in log] == [(1, "sft"), (2, "grpo")]
    assert all(torch.isfinite(torch.tensor(r["loss"])) and not r["skipped"] for r in log)
    print(
        f"qwen3 fp32: logp_diff_mean {log[1]['logp_diff_mean']:.3g}, max {log[1]['logp_diff_max']:.3g}"
    )
    assert log[1]["logp_diff_mean"] <= 1e-5 and log[1]["logp_diff_over_0.1"] == 0.0
    hf = out / "checkpoints" / "step_000002" / "hf"
    assert Qwen3ForCausalLM.from_pretrained(hf).config.model_type == "qwen3"
    assert "reasoning_content" in AutoTokenizer.from_pretrained(hf).chat_template
