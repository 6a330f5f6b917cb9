"""Engine-trainer agreement: PPO's old log-probs are the engine's sampling log-probs (Trajectory.logprobs), so the
trainer's log-probs of the same tokens, before any update, must equal them. train.grpo_update logs how far apart
they are on each step's first micro-batch: logp_diff_mean, logp_diff_max, logp_diff_over_0.1.

The policy is conftest's tiny_policy, an untrained tiny Qwen2 over the SmolLM2 tokenizer: its near-flat
distributions keep torch's CPU fp32 log_softmax within ~1e-6 of fp64. On a peaked one (conftest's coin_policy) that
kernel is ~1e-4 off (it sums exp over 49k ids per SIMD lane), and the logged drift with it; the engine is not.

    python -m pytest -q tests/test_agreement.py
"""

import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from test_train import free_port, spawn_ranks

import kr1
import retrieval

SETTING = dict(
    group_size=4,
    max_turns=1,
    max_turn_tokens=16,
    max_total_tokens=40,
    temperature=1.0,
    beta=0.0,
    agg="token",
    grad_ckpt=False,
    lr=1e-2,
    warmup_steps=1,
)


def setting(d: Path, **kw):
    """(Config, search, rows): the one question twice, so 2 groups of 4 trajectories."""
    import train

    cfg = train.Config(
        model=str(d / "policy"),
        dataset=str(d / "qa.jsonl"),
        index=str(d / "index"),
        **SETTING,
        **kw,
    )
    index = retrieval.open_index(cfg.index)
    search = kr1.RecordingSearch(lambda qs: index.search(qs, k=cfg.top_k_passages))
    return cfg, search, retrieval.read_qa(cfg.dataset) * 2


@pytest.fixture
def world_of_one(monkeypatch):
    for k, v in {
        "RANK": "0",
        "WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
    }.items():
        monkeypatch.setenv(k, v)
    dist.init_process_group("gloo")
    yield
    dist.destroy_process_group()


def test_fp32_engine_and_trainer_log_probs_agree(tiny_policy, world_of_one):
    """fp32 on CPU, full fine-tuning, one micro-batch with an expert row (its log-probs are 0.0 placeholders): the
    sampled tokens' log-probs agree to 1e-5 on average, the expert row does not count, and a drift of 0.5 planted on
    one sampled token shows in the max and the share over 0.1."""
    import train

    cfg, search, rows = setting(tiny_policy, micro_batch=16)
    model, _, tok, _ = train.build_models(cfg, torch.device("cpu"), 1)
    trajs, scores, _ = train.rollout_and_score(model, tok, cfg, rows, search, 0)
    trajs[-1] = train.expert(cfg, tok, rows[-1], search)
    model.train()
    adv = torch.tensor([1.0, -1.0] * 4)  # (8,)
    rec = train.step_metrics(trajs, scores, train.grpo_update(model, None, cfg, trajs, adv))
    print(f"fp32: logp_diff_mean {rec['logp_diff_mean']:.3g}, max {rec['logp_diff_max']:.3g}")
    assert (
        rec["logp_diff_mean"] <= 1e-5
        and rec["logp_diff_max"] <= 1e-4
        and rec["logp_diff_over_0.1"] == 0.0
    )
    n = sum(sum(t.mask[1:]) for t in trajs[:-1])  # the sampled tokens; the expert row's are not
    k = trajs[0].mask.index(1)
    trajs[0].logprobs[k] += 0.5
    rec = train.step_metrics(trajs, scores, train.grpo_update(model, None, cfg, trajs, adv))
    assert abs(rec["logp_diff_max"] - 0.5) < 1e-4 and rec["logp_diff_over_0.1"] == pytest.approx(
        1 / n
    )
    assert rec["logp_diff_mean"] == pytest.approx(0.5 / n, rel=0.05)


def lora_worker(rank: int, port: int, ready, d: Path, out: Path) -> None:
    """Roll out, update the LoRA (one AdamW step), roll out again with the same seed; the trainer's post-update
    log-probs of both rollouts (grpo_update's logged drift; its gradients are never stepped)."""
    from test_train import join

    import train

    join(rank, port, ready)
    cfg, search, rows = setting(d, lora_rank=4, micro_batch=8)
    rows = rows[: len(rows) // 2]  # this rank's prompt
    model, _, tok, opt = train.build_models(cfg, torch.device("cpu"), 2)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])  # (4,)
    first, scores, _ = train.rollout_and_score(model, tok, cfg, rows, search, 0)
    out_1 = train.grpo_update(model, None, cfg, first, adv)
    outcome = train.optimizer_step(model, opt, cfg, 0, out_1.loss)
    rec = {**train.step_metrics(first, scores, out_1), "skipped": not outcome.stepped}
    second, scores, _ = train.rollout_and_score(model, tok, cfg, rows, search, 0)  # the same seed
    model.train()
    again = {
        name: train.step_metrics(trajs, scores, train.grpo_update(model, None, cfg, trajs, adv))
        for name, trajs in (("second", second), ("first", first))
    }
    got = {"step": rec, **again, "trajs": [[t.__dict__ for t in ts] for ts in (first, second)]}
    (out / f"rank{rank}.json").write_text(json.dumps(got))
    os._exit(0)  # as test_train.finite_worker


def test_a_lora_update_reaches_the_next_rollout(tiny_policy, tmp_path):
    """FSDP2 on 2 gloo ranks with LoRA: after an optimizer step the engine samples with the new weights (no stale
    copy): the second rollout's log-probs differ from the first's for the same tokens, and equal the trainer's
    post-update log-probs, while the first rollout's no longer do."""
    spawn_ranks(lora_worker, tiny_policy, tmp_path)
    for rank in (0, 1):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got["step"]["logp_diff_mean"] <= 1e-5 and not got["step"]["skipped"], got["step"]
        assert got["second"]["logp_diff_mean"] <= 1e-5 and got["second"]["logp_diff_max"] <= 1e-4, (
            got["second"]
        )
        assert got["first"]["logp_diff_mean"] > 1e-3, got["first"]  # the update moved the log-probs
        moved = []
        for a, b in zip(*got["trajs"], strict=True):
            k = a["prompt_len"]
            while (
                k < min(len(a["ids"]), len(b["ids"])) and a["ids"][k] == b["ids"][k]
            ):  # the same seed: same tokens
                moved.append(abs(a["logprobs"][k] - b["logprobs"][k]))
                k += 1
        print(
            f"rank {rank}: {len(moved)} shared tokens moved {sum(moved) / len(moved):.3g} on average"
        )
        assert len(moved) >= 4 and sum(moved) / len(moved) > 1e-3, moved
