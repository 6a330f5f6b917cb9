"""bench/bench_memory.py --trace: one train.py step of a tiny Qwen2 traced under FakeTensorMode on a fake process
group of 8 ranks, checked against hand-computed lower bounds and against the same step on real tensors (~15 s).

    python -m pytest -q tests/test_memory.py
"""

import contextlib
import io
import json
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import bench_memory  # noqa: E402

TINY = {
    "model_type": "qwen2",
    "architectures": ["Qwen2ForCausalLM"],
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 512,
    "tie_word_embeddings": False,
    "max_position_embeddings": 4096,
}
# per layer: q, o 64x64 (+ q bias 64), k, v 32x64 (+ biases 32), MLP 3 x 64x128, 2 RMSNorms; embeddings + head + norm
PARAMS = (
    4 * (2 * 64 * 64 + 64 + 2 * (32 * 64 + 32) + 3 * 64 * 128 + 2 * 64) + 2 * 512 * 64 + 64
)  # 214,080
KV_SLOT = (
    4 * 2 * 2 * 16 * 2
)  # bytes per row per cache slot: layers x K,V x kv_heads x head_dim x bf16
WORLD, ROWS, SLOTS = 8, 4, 64 + 192  # 4 prompts x G 8 / 8 ranks; prompt + response tokens
ARGS = [
    "--world",
    str(WORLD),
    "--prompts-per-step",
    "4",
    "--group-size",
    "8",
    "--prompt-tokens",
    "64",
    "--response-tokens",
    "192",
    "--micro-batch",
    "4",
    "--logprob-chunk",
    "128",
]
LINE = re.compile(
    r"traced peak GiB/rank: rollout (\d+\.\d\d), update (\d+\.\d\d), load (\d+\.\d\d)"
)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-qwen2")
    (d / "config.json").write_text(json.dumps(TINY))
    return d


def run(*argv: str) -> tuple[dict, str]:
    """(returned dict, printed text) of `bench_memory.py --trace ...`."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        res = bench_memory.main(["--trace", *argv])
    return res, out.getvalue()


@pytest.fixture(scope="module")
def fake_run(tiny_dir):
    return run("--model", str(tiny_dir), *ARGS)


def test_trace_prints_the_summary_line(fake_run):
    res, text = fake_run
    last = text.rstrip("\n").splitlines()[-1]
    m = LINE.fullmatch(last)
    assert m, last
    got = dict(zip(("rollout", "update", "load"), map(float, m.groups())))
    assert got == {k: round(v, 2) for k, v in res["traced_gib"].items()}
    assert (
        "NCCL" in text and "fragmentation" in text and "CUDA context" in text
    )  # what the trace leaves out


def test_trace_holds_at_least_what_the_step_must_hold(fake_run):
    """Lower bounds in bytes per rank, each from the sizes alone: the trace may add transients, never drop state."""
    res, _ = fake_run
    B = {k: v * 2**30 for k, v in res["traced_gib"].items()}
    shard = PARAMS / WORLD  # every dimension here divides by 8: no FSDP padding
    kv = ROWS * SLOTS * KV_SLOT
    # load: the rank's fp32 policy and bf16 reference shards, and at some moment a whole tensor received from rank 0;
    # never the whole model (each rank read it before sharding until train.load_sharded)
    assert 6 * shard + 2 * 512 * 64 <= B["load"] < 4 * PARAMS / 2
    # rollout: fp32 shards + AdamW's 2 states (grads freed) + bf16 reference shards, all units gathered in bf16, KV
    assert B["rollout"] >= 12 * shard + 2 * shard + 2 * PARAMS + kv
    # update: fp32 shards + grads + AdamW + reference shards, the root (embeddings + head) gathered in bf16, and one
    # (128 tokens x 512 vocab) fp32 logits chunk
    assert B["update"] >= 16 * shard + 2 * shard + 2 * 2 * 512 * 64 + 128 * 512 * 4
    assert res["trace"]["rows"] == ROWS


def test_rollout_grows_by_the_kv_cache(fake_run, tiny_dir):
    """256 more response tokens: the rollout holds 256 more cache slots per row, and one layer's K, V gathered
    for the chunk forward 256 columns wider; the transients of a missing cache could not make up for it."""
    longer, _ = run(
        "--model", str(tiny_dir), *ARGS, "--response-tokens", "448"
    )  # the last value wins
    grow = (longer["traced_gib"]["rollout"] - fake_run[0]["traced_gib"]["rollout"]) * 2**30
    assert grow >= ROWS * 256 * KV_SLOT + ROWS * 256 * KV_SLOT // 4


def test_fake_trace_equals_the_real_tensor_trace(fake_run, tiny_dir):
    """The same step on real tensors (the tiny model allocates what it counts): fake tensors count the same bytes."""
    real = bench_memory.main(["--trace", "--real", "--model", str(tiny_dir), *ARGS])
    fake = fake_run[0]
    for phase in ("load", "rollout", "update"):
        assert fake["traced_gib"][phase] == pytest.approx(real["traced_gib"][phase], rel=0.02), (
            phase
        )


def test_unknown_model_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="config.json"):
        bench_memory.main(["--trace", "--model", str(tmp_path / "nowhere")])


def test_qwen3_alias_is_the_public_config():
    """--model qwen3-1.7b: Qwen3-1.7B's config.json fields, 1.72B parameters (tied embeddings) on the meta device."""
    name, c = bench_memory.model_config("qwen3-1.7b")
    assert (name, c.model_type, c.head_dim, c.num_key_value_heads) == (
        "Qwen3-1.7B",
        "qwen3",
        128,
        8,
    )
    n = sum(p.numel() for p in bench_memory.skeleton(c, None).parameters())
    assert 1.71e9 < n < 1.73e9, n
