"""The transformers API the core relies on, by name, signature and one tiny forward: pyproject's bound
(transformers>=5.4,<5.40) is the range where all of it exists in the form the core uses. Under 5.3 the cache
signature check fails (get_mask_sizes took cache_position there); 5.40 drops the past_key_values keyword
(rollout.cache_keyword passes `cache` where it exists).

    python -m pytest -q tests/test_transformers_api.py
"""

import ast
import importlib
import inspect
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    DynamicCache,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
)

import rollout

ROOT = Path(__file__).resolve().parents[1]
CORE = ["kr1.py", "retrieval.py", "rollout.py", "grpo.py", "train.py"]


def params(fn) -> list[str]:
    """The names that can be passed by position (what a caller's positional arguments bind to)."""
    return [
        n for n, p in inspect.signature(fn).parameters.items() if p.kind == p.POSITIONAL_OR_KEYWORD
    ]


def test_every_name_the_core_imports_from_transformers_exists():
    imported = [
        (node.module, a.name)
        for f in CORE
        for node in ast.walk(ast.parse((ROOT / f).read_text()))
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "transformers"
        for a in node.names
    ]
    assert len(imported) >= 7  # the parse found the imports (rollout.py's at the time of writing)
    missing = [f"{m}.{n}" for m, n in imported if not hasattr(importlib.import_module(m), n)]
    assert not missing, missing
    for interface in (
        "AttentionInterface",
        "AttentionMaskInterface",
    ):  # rollout registers kr1_sdpa in both
        assert callable(
            getattr(getattr(importlib.import_module("transformers"), interface), "register")
        )


def test_the_cache_methods_rollout_overrides_have_the_same_signature():
    """CacheStep is a DynamicCache whose get_seq_length / get_mask_sizes / update transformers calls positionally."""
    for name in ("get_seq_length", "get_mask_sizes", "update"):
        ours, theirs = params(getattr(rollout.CacheStep, name)), params(getattr(DynamicCache, name))
        assert theirs[: len(ours)] == ours, (
            name,
            ours,
            theirs,
        )  # the rest: CacheStep.update takes *args
    assert (
        params(PreTrainedModel.gradient_checkpointing_enable)[1] == "gradient_checkpointing_kwargs"
    )
    assert "state_dict" in params(PreTrainedModel.save_pretrained)


def test_a_tiny_forward_takes_the_keywords_the_core_passes(tmp_path):
    """from_pretrained(dtype=, attn_implementation=) and forward(position_ids, cache, use_cache,
    logits_to_keep) as rollout.py calls them; grpo.py's model.model(...).last_hidden_state and output embeddings."""
    cfg = Qwen2Config(
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=32,
        vocab_size=40,
    )
    Qwen2ForCausalLM(cfg).save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(
        tmp_path, dtype=torch.bfloat16, attn_implementation="kr1_sdpa"
    )
    assert (
        next(model.parameters()).dtype == torch.bfloat16
        and model.config._attn_implementation == "kr1_sdpa"
    )
    ids = torch.tensor([[1, 2, 3]])  # (1, 3)
    cache = DynamicCache()
    with torch.no_grad():
        out = model(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            position_ids=torch.arange(3)[None],
            **{rollout.cache_keyword(model): cache},  # "cache" from 5.25 on
            use_cache=True,
            logits_to_keep=1,
        )
        hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state  # (1, 3, 16)
    assert (
        out.logits.shape == (1, 1, 40) and cache.get_seq_length() == 3
    )  # our cache object was the one used
    assert hidden.shape == (1, 3, 16) and model.get_output_embeddings().weight.shape == (40, 16)
