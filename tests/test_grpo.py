"""Tests for grpo.py: answer metrics, format reward, hack guards, advantages, chunked log-probs, the GRPO loss.

Run: python -m pytest -q tests/test_grpo.py   (CPU, ~20 s; the memory test runs one subprocess)
"""

import json
import math
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from grpo import (
    answer_accuracy,
    cover_exact_match,
    exact_match,
    f1_score,
    format_reward,
    group_advantages,
    grpo_loss,
    is_candidate_list,
    normalize_answer,
    question_kind,
    reward,
    sft_loss,
    support_recall,
    token_logprobs,
)

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- answers
def test_normalize_answer_squad_rules():
    assert normalize_answer("The  Quick, Brown fox!") == "quick brown fox"
    assert normalize_answer("An apple a day") == "apple day"
    assert (
        normalize_answer("Theory of Anarchy") == "theory of anarchy"
    )  # articles only as whole words
    assert normalize_answer("U.S.A.") == "usa"
    assert normalize_answer("  Jean-Paul\tSartre\n") == "jeanpaul sartre"
    assert normalize_answer("The") == ""


def test_exact_match_aliases_and_empty():
    golds = ["Barack Obama", "Obama"]
    assert exact_match("the obama.", golds) == 1.0
    assert exact_match("Barack  OBAMA", golds) == 1.0
    assert exact_match("Michelle Obama", golds) == 0.0
    assert exact_match(None, golds) == 0.0
    assert exact_match("", golds) == 0.0
    assert exact_match("a", ["The"]) == 0.0  # both normalise to "": an empty answer never matches


def test_f1_squad_and_hotpot_cases():
    assert f1_score("Barack Obama", ["Obama"]) == pytest.approx(2 / 3)  # P = 1/2, R = 1
    assert f1_score("President Barack Obama", ["Barack Obama"]) == pytest.approx(0.8)
    assert f1_score("Obama", ["Barack Obama", "Obama"]) == 1.0  # max over aliases
    assert f1_score("George Bush", ["Barack Obama"]) == 0.0
    assert f1_score("the the", ["the"]) == 0.0  # empty after normalisation
    assert f1_score("yes it is", ["yes"]) == 0.0  # HotpotQA: yes/no is all or nothing
    assert f1_score(None, ["x"]) == 0.0


def test_cover_exact_match_whole_words():
    assert cover_exact_match("The answer is Paris, France.", ["paris"]) == 1.0
    assert cover_exact_match("a party", ["art"]) == 0.0
    assert cover_exact_match("London", ["Paris", "London"]) == 1.0
    assert cover_exact_match(None, ["Paris"]) == 0.0
    assert cover_exact_match("anything", ["The"]) == 0.0  # an empty gold covers nothing


# ----------------------------------------------------------------------------- format
GOOD = [
    "<think>I need the director.</think>\n<search>director of Jaws</search>",
    "<think>Spielberg. Now his birthplace.</think><search>Steven Spielberg birthplace</search>",
    "<think>Cincinnati.</think>\n<answer>Cincinnati</answer>\n",
]


@pytest.mark.parametrize(
    "responses, expected",
    [
        (GOOD, 1.0),
        (GOOD[-1:], 1.0),  # answering without searching is well-formed
        (["<think>x</think><answer>y</answer>"], 1.0),
        ([], -1.0),
        (["<search>q</search>", GOOD[-1]], -1.0),  # searching turn without think
        (GOOD[:-1] + ["<answer>Cincinnati</answer>"], -1.0),  # answer turn without think
        (["<think>x</think><answer></answer>"], -1.0),  # empty answer
        (["<think>x</think><answer>   </answer>"], -1.0),  # blank answer
        (["<think> </think><answer>y</answer>"], -1.0),  # blank think
        (["<think>x</think><search></search>", GOOD[-1]], -1.0),  # empty query
        (["<think>x</think><answer>y</answer> and more text"], -1.0),  # text after </answer>
        (["Sure! <think>x</think><answer>y</answer>"], -1.0),  # text before <think>
        (["<think>x</think> so <answer>y</answer>"], -1.0),  # text between the tags
        (["<think>a <think>b</think></think><answer>y</answer>"], -1.0),  # nested think
        (["<think>a</think><think>b</think><answer>y</answer>"], -1.0),  # duplicated think
        (["<think>a</think><answer>y</answer><answer>z</answer>"], -1.0),  # duplicated answer
        (["<think>a</think><answer>y <search>q</search></answer>"], -1.0),  # tag inside the answer
        (
            ["<think>a</think><search>q</search><answer>y</answer>"],
            -1.0,
        ),  # search and answer in one turn
        (GOOD[:-1], -1.0),  # last turn is a search: no answer
        ([GOOD[-1], GOOD[-1]], -1.0),  # answering turn where a search turn must be
        (["<think>x</think><answer>y</answer"], -1.0),  # truncated
    ],
)
def test_format_reward(responses, expected):
    assert format_reward(responses) == expected


# ----------------------------------------------------------------------------- reward + hacks
def traj(answer, responses):
    return types.SimpleNamespace(
        answer=answer, responses=responses
    )  # what reward() reads of a Trajectory


def test_reward_sums_weighted_parts():
    assert reward(traj("Cincinnati", GOOD), ["Cincinnati, Ohio", "Cincinnati"]) == {
        "reward": 2.0,
        "accuracy": 1.0,
        "format": 1.0,
        "support": 0.0,
    }
    assert reward(traj("Dayton", GOOD), ["Cincinnati"]) == {
        "reward": 1.0,
        "accuracy": 0.0,
        "format": 1.0,
        "support": 0.0,
    }
    assert reward(traj(None, GOOD[:-1]), ["Cincinnati"]) == {
        "reward": -1.0,
        "accuracy": 0.0,
        "format": -1.0,
        "support": 0.0,
    }
    r = reward(
        traj("Cincinnati", ["<answer>Cincinnati</answer>"]), ["Cincinnati"], w_acc=2.0, w_fmt=0.5
    )
    assert r == {"reward": 1.5, "accuracy": 1.0, "format": -1.0, "support": 0.0}
    assert reward(traj("Ohio Cincinnati", GOOD), ["Cincinnati"], acc="f1")[
        "accuracy"
    ] == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        reward(traj("x", GOOD), ["x"], acc="bleu")


def test_support_recall_compares_titles_case_insensitively():
    read = [["Aretha Franklin", "Detroit"], ["i can't see myself leaving you"]]
    gold = ["Aretha Franklin", "I Can't See Myself Leaving You", "Memphis"]
    assert support_recall(gold, read) == round(2 / 3, 4)
    assert support_recall(gold, []) == 0.0
    assert support_recall([], read) is None and support_recall(None, read) is None


def test_support_reward_adds_its_weight_times_the_recall():
    r = reward(traj("Dayton", GOOD), ["Cincinnati"], w_support=0.5, support=0.5)
    assert r == {"reward": 1.25, "accuracy": 0.0, "format": 1.0, "support": 0.5}


def test_empty_answer_earns_nothing():
    r = reward(
        traj("", ["<think>x</think><answer></answer>"]), ["The"], acc="f1"
    )  # gold normalises to "" too
    assert r == {"reward": -1.0, "accuracy": 0.0, "format": -1.0, "support": 0.0}


@pytest.mark.parametrize("acc", ["em", "f1"])
@pytest.mark.parametrize(
    "answer",
    [
        "Paris, London, Berlin",
        "Paris or London",
        "Paris / London",
        "Paris; London",
        "Paris | Rome",
        "Paris\nLondon",
        "it could be Paris or maybe it is London or Berlin or Rome, honestly",  # also far too long
        "Paris Paris Paris Paris Paris Paris",  # no separator, but > 2 * 1 + 3 words
    ],
)
def test_candidate_lists_earn_no_accuracy(answer, acc):
    assert is_candidate_list(answer, ["Paris"])
    assert answer_accuracy(answer, ["Paris"], acc) == 0.0
    assert f1_score(answer, ["Paris"]) > 0  # ... although plain F1 would have paid for it


def test_candidate_guard_spares_real_answers():
    assert (
        answer_accuracy("Washington, D.C.", ["Washington, D.C."], "f1") == 1.0
    )  # gold has a comma too
    assert (
        answer_accuracy("Paris, France", ["Paris France"], "em") == 1.0
    )  # an exact match always counts
    assert answer_accuracy("Tom and Jerry", ["Tom and Jerry"], "f1") == 1.0  # "and" is no separator
    assert answer_accuracy("Bosnia and Herzegovina", ["Herzegovina"], "f1") == 0.5  # P 1/3, R 1
    assert answer_accuracy("President Barack Obama", ["Barack Obama"], "f1") == pytest.approx(0.8)
    assert not is_candidate_list(
        "the 44th president Barack Obama", ["Barack Obama"]
    )  # 5 words <= 2*2+3
    assert answer_accuracy("Oregon", ["Oregon"], "f1") == 1.0  # "or" only as a whole word


# ----------------------------------------------------------------------------- advantages
def test_group_advantages_hand_computed():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0, 2.0, 2.0, 2.0])  # 2 prompts x G=4
    std = math.sqrt(0.75 * 0.25)  # population std of {1, 0, 0, 0}
    expected = torch.tensor([0.75 / std, -0.25 / std, -0.25 / std, -0.25 / std, 0, 0, 0, 0])
    torch.testing.assert_close(group_advantages(rewards[:4], 4, eps=0.0), expected[:4])
    torch.testing.assert_close(group_advantages(rewards, 4), expected * std / (std + 1e-4))
    dr = group_advantages(rewards.tolist(), 4, scale_std=False)  # Dr. GRPO: centre only
    torch.testing.assert_close(dr, torch.tensor([0.75, -0.25, -0.25, -0.25, 0, 0, 0, 0]))
    torch.testing.assert_close(group_advantages([3.0, 1.0], 2, eps=0.0), torch.tensor([1.0, -1.0]))


# ----------------------------------------------------------------------------- loss
def reference_loss(logp, old, adv, mask, ref, beta, lo, hi, agg, normaliser):
    """Straightforward float64 loop over tokens: the loss as written in the papers."""
    B, T = logp.shape
    seq_terms, total, n_tok = [], 0.0, 0
    for b in range(B):
        row = []
        for t in range(T):
            if not mask[b, t]:
                continue
            ratio = torch.exp(logp[b, t] - old[b, t])
            term = -torch.minimum(ratio * adv[b], torch.clamp(ratio, 1 - lo, 1 + hi) * adv[b])
            if beta:
                d = ref[b, t] - logp[b, t]
                term = term + beta * (torch.exp(d) - d - 1)
            row.append(term)
        n_tok += len(row)
        total = total + sum(row)
        seq_terms.append(sum(row) / max(len(row), 1))
    if agg == "token":
        return total / (n_tok if normaliser is None else normaliser)
    if agg == "seq":
        return sum(seq_terms) / (B if normaliser is None else normaliser)
    return total / normaliser


def random_batch(B=6, T=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3  # (B, T)
    old = logp + 0.4 * torch.randn(
        B, T, generator=g, dtype=torch.float64
    )  # ratios well outside [0.8, 1.28]
    ref = logp + 0.5 * torch.randn(B, T, generator=g, dtype=torch.float64)
    mask = torch.rand(B, T, generator=g) < 0.6  # (B, T)
    mask[:, 0] = True  # every row has tokens
    adv = torch.randn(B, generator=g, dtype=torch.float64)  # (B,) both signs
    ent = torch.rand(B, T, generator=g, dtype=torch.float64)
    return logp, old, ref, mask, adv, ent


@pytest.mark.parametrize("agg", ["token", "seq", "const"])
@pytest.mark.parametrize("beta", [0.0, 0.05])
@pytest.mark.parametrize("clip", [(0.2, 0.28), (0.2, 0.2)])
def test_loss_and_grad_match_float64_reference(agg, beta, clip):
    logp, old, ref, mask, adv, _ = random_batch()
    norm = 9 * 6 if agg == "const" else None
    lp32 = logp.float().requires_grad_()
    loss, met = grpo_loss(
        lp32, old.float(), adv.float(), mask, ref.float(), beta, *clip, agg=agg, normaliser=norm
    )
    loss.backward()
    lp64 = logp.clone().requires_grad_()
    expected = reference_loss(lp64, old, adv, mask, ref, beta, *clip, agg, norm)
    expected.backward()
    torch.testing.assert_close(loss.double(), expected.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lp32.grad.double(), lp64.grad, rtol=1e-4, atol=1e-6)
    assert 0 < met["clip_frac_low"] and 0 < met["clip_frac_high"]  # both clip branches fired
    if beta == 0:  # clipped tokens carry no gradient (with beta > 0 they still carry the KL's)
        assert ((lp32.grad == 0) & mask).sum() / mask.sum() >= met["clip_frac"] - 1e-6


def test_metrics_values():
    logp, old, ref, mask, adv, ent = random_batch()
    _, met = grpo_loss(
        logp.float(),
        old.float(),
        adv.float(),
        mask,
        ref.float(),
        0.0,
        clip_high=0.28,
        entropy=ent.float(),
    )
    ratio = torch.exp(logp - old)[mask]
    k3 = (torch.exp(ref - logp) - (ref - logp) - 1)[mask]
    lo, hi = (
        (ratio < 0.8) & (adv[:, None].expand_as(mask)[mask] < 0),
        (ratio > 1.28) & (adv[:, None].expand_as(mask)[mask] > 0),
    )
    want = {
        "clip_frac_low": lo.double().mean(),
        "clip_frac_high": hi.double().mean(),
        "clip_frac": (lo | hi).double().mean(),
        "ratio_mean": ratio.mean(),
        "ratio_min": ratio.min(),
        "ratio_max": ratio.max(),
        "kl": k3.mean(),  # reported even when beta == 0, since ref was given
        "entropy": ent[mask].mean(),
        "adv_mean": adv.mean(),
        "adv_std": adv.std(correction=0),
        "adv_min": adv.min(),
        "adv_max": adv.max(),
        "n_tokens": mask.sum().double(),
    }
    assert set(met) == set(want)
    for k, v in want.items():
        assert met[k].dim() == 0 and not met[k].requires_grad
        assert met[k].item() == pytest.approx(v.item(), rel=1e-5, abs=1e-6), k


@pytest.mark.parametrize("agg", ["token", "seq"])
def test_global_normaliser_makes_accumulation_exact(agg):
    """Two micro-batches with the global count give the same gradient as one big batch."""
    logp, old, ref, mask, adv, _ = random_batch(B=8)
    full = logp.clone().requires_grad_()
    grpo_loss(full, old, adv, mask, ref, 0.04, agg=agg)[0].backward()
    parts = logp.clone().requires_grad_()
    norm = mask.sum() if agg == "token" else mask.shape[0]
    for sl in (slice(0, 3), slice(3, 8)):  # unequal micro-batches, unequal token counts
        grpo_loss(parts[sl], old[sl], adv[sl], mask[sl], ref[sl], 0.04, agg=agg, normaliser=norm)[
            0
        ].backward()
    torch.testing.assert_close(parts.grad, full.grad)


def test_on_policy_ratio_is_one_and_gradient_is_policy_gradient():
    logp, _, _, mask, adv, _ = random_batch()
    lp = logp.clone().requires_grad_()
    loss, met = grpo_loss(lp, lp.detach(), adv, mask, agg="token")
    for k in ("ratio_mean", "ratio_min", "ratio_max"):
        assert met[k].item() == 1.0
    assert met["clip_frac"].item() == 0.0 and met["kl"].item() == 0.0
    loss.backward()
    expected = torch.where(
        mask, -adv[:, None] / mask.sum(), 0.0
    )  # d/dlogp of -A * exp(logp - sg(logp)) / n
    torch.testing.assert_close(lp.grad, expected)


@pytest.mark.parametrize("agg", ["token", "seq", "const"])
def test_masked_positions_cannot_leak(agg):
    logp, old, ref, mask, adv, ent = random_batch()
    clean = logp.clone().requires_grad_()
    loss0, met0 = grpo_loss(clean, old, adv, mask, ref, 0.1, agg=agg, normaliser=54.0, entropy=ent)
    loss0.backward()
    junk = torch.tensor(
        [float("nan"), float("inf"), -float("inf"), 1e30, -1e30], dtype=torch.float64
    )
    idx = torch.arange(int((~mask).sum())) % len(junk)

    def poison(x):  # junk at every masked position
        x = x.clone()
        x[~mask] = junk[idx]
        return x

    dirty = poison(logp).requires_grad_()
    loss1, met1 = grpo_loss(
        dirty,
        poison(old),
        adv,
        mask,
        poison(ref),
        0.1,
        agg=agg,
        normaliser=54.0,
        entropy=poison(ent),
    )
    loss1.backward()
    assert torch.isfinite(loss1) and torch.isfinite(dirty.grad).all()
    assert loss1.item() == loss0.item()
    assert torch.equal(dirty.grad, clean.grad)
    assert torch.equal(dirty.grad[~mask], torch.zeros_like(dirty.grad[~mask]))
    for k in met0:
        assert met1[k].item() == met0[k].item(), k


def test_beta_zero_needs_no_reference_and_bad_args_raise():
    logp, old, ref, mask, adv, _ = random_batch()
    loss, met = grpo_loss(logp, old, adv, mask)  # no ref at all
    loss_r, _ = grpo_loss(logp, old, adv, mask, ref_logp=ref, beta=0.0)
    assert loss.item() == loss_r.item() and met["kl"].item() == 0.0
    with pytest.raises(ValueError):
        grpo_loss(logp, old, adv, mask, beta=0.1)
    with pytest.raises(ValueError):
        grpo_loss(logp, old, adv, mask, agg="const")
    with pytest.raises(ValueError):
        grpo_loss(logp, old, adv, mask, agg="sum")


# ----------------------------------------------------------------------------- chunked log-probs
@pytest.fixture(scope="module")
def tiny_model():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    return Qwen2ForCausalLM(cfg).float().eval()


def padded_batch(side: str, B=3, T=12, V=300, seed=0):
    """Rows of 12, 9 and 5 real tokens (the same for either side), padded with id 0 on `side`."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(B, T, dtype=torch.long)  # (B, T)
    am = torch.zeros(B, T, dtype=torch.long)  # (B, T)
    for b, n_pad in enumerate([0, 3, 7][:B]):
        real = torch.randint(1, V, (T - n_pad,), generator=g)
        sl = slice(n_pad, T) if side == "left" else slice(0, T - n_pad)
        ids[b, sl], am[b, sl] = real, 1
    return ids, am


def full_logits_logp(model, ids, am, temperature=1.0):
    """The unchunked way: materialise (B, T, V) float32 logits, log-softmax, gather."""
    pos = (am.cumsum(-1) - 1).clamp(min=0)
    logits = (
        model(input_ids=ids, attention_mask=am, position_ids=pos).logits.float()[:, :-1]
        / temperature
    )
    logq = torch.log_softmax(logits, -1)  # (B, T-1, V)
    return logq.gather(-1, ids[:, 1:, None]).squeeze(-1), -(logq.exp() * logq).sum(-1)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_logprobs_match_full_logits(tiny_model, side, temperature):
    ids, am = padded_batch(side)
    valid = (am[:, :-1] * am[:, 1:]).bool()  # (B, T-1) real prefix and real target
    w = torch.randn(valid.shape, generator=torch.Generator().manual_seed(1))
    grads = []
    for fn in (
        full_logits_logp,
        lambda m, i, a, t: token_logprobs(m, i, a, t, chunk_size=5, with_entropy=True),
    ):
        tiny_model.zero_grad()
        logp, ent = fn(tiny_model, ids, am, temperature)
        assert logp.shape == ent.shape == (3, 11) and logp.dtype == torch.float32
        (torch.where(valid, logp, 0.0) * w).sum().backward()
        grads.append({n: p.grad.clone() for n, p in tiny_model.named_parameters()})
        if fn is full_logits_logp:
            want_lp, want_ent = logp.detach(), ent.detach()
    torch.testing.assert_close(logp[valid].detach(), want_lp[valid], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent[valid], want_ent[valid], rtol=1e-5, atol=1e-5)
    assert not ent.requires_grad
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-4, atol=1e-6, msg=n)


def test_token_logprobs_padding_side_does_not_matter(tiny_model):
    """The same real tokens give the same log-probs whether the row is left- or right-padded, and right-padded rows
    the same without a mask (train.py's path: SDPA's causal kernel)."""
    ids_r, am_r = padded_batch("right")
    ids_l, am_l = padded_batch("left")
    with torch.no_grad():
        lr, ll = token_logprobs(tiny_model, ids_r, am_r), token_logprobs(tiny_model, ids_l, am_l)
        lr_unmasked = token_logprobs(tiny_model, ids_r, None)
    for b, n_pad in enumerate([0, 3, 7]):
        n = 11 - n_pad  # real (prefix, target) pairs in the row
        torch.testing.assert_close(lr[b, :n], ll[b, n_pad:], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lr_unmasked[b, :n], lr[b, :n], rtol=1e-5, atol=1e-5)


def test_token_logprobs_chunk_invariance_and_as_a_module(tiny_model):
    ids, am = padded_batch("left")
    outs, grads = [], []
    for chunk in (1, 7, 33, 4096):
        tiny_model.zero_grad()
        lp = token_logprobs(tiny_model, ids, am, chunk_size=chunk)
        (lp * am[:, 1:]).sum().backward()
        outs.append(lp.detach())
        grads.append(tiny_model.model.embed_tokens.weight.grad.clone())
    for o, g in zip(outs[1:], grads[1:]):
        torch.testing.assert_close(o, outs[0], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(
            g, grads[0], rtol=1e-4, atol=1e-6
        )  # only the summation order differs
    from train import (
        LogProbs,
    )  # how train.py calls it: the forward of a module around the causal LM

    with torch.no_grad():
        torch.testing.assert_close(
            LogProbs(tiny_model)(ids, am, chunk_size=4), outs[0], rtol=1e-6, atol=1e-6
        )


def test_token_logprobs_over_the_tokenizer_vocab_only(tiny_model):
    """vocab=N: the softmax over the first N logits, as rollout() samples (a padded embedding's rows left out)."""
    ids, am = padded_batch("right", V=250)  # every target id < 250
    pos = (am.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = tiny_model(input_ids=ids, attention_mask=am, position_ids=pos).logits[
            :, :-1, :250
        ]  # (B, T-1, 250)
        want = logits.log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0]
        got, full = (
            token_logprobs(tiny_model, ids, am, chunk_size=5, vocab=250),
            token_logprobs(tiny_model, ids, am),
        )
    valid = (am[:, :-1] * am[:, 1:]).bool()
    torch.testing.assert_close(got[valid], want[valid], rtol=1e-5, atol=1e-5)
    assert (got[valid] > full[valid]).all()  # less mass to share: every log-prob is higher


MEMORY_SCRIPT = r"""
import json, resource, sys
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM
sys.path.insert(0, sys.argv[1])
from grpo import token_logprobs

B, T, V, CHUNK = 2, 512, 150_000, 64
torch.manual_seed(0)
cfg = Qwen2Config(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                  num_key_value_heads=2, tie_word_embeddings=True)
model = Qwen2ForCausalLM(cfg).float()
ids = torch.randint(0, V, (B, T))
am = torch.ones_like(ids)
am[1, :100] = 0  # one left-padded row
peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
token_logprobs(model, ids[:, :8], am[:, :8], chunk_size=4).sum().backward()  # warm up lazy allocations
model.zero_grad(set_to_none=False)
base = peak()
token_logprobs(model, ids, am, chunk_size=CHUNK).sum().backward()  # chunked first: ru_maxrss only grows
chunked = peak() - base
model.zero_grad(set_to_none=False)
pos = (am.cumsum(-1) - 1).clamp(min=0)
logits = model(input_ids=ids, attention_mask=am, position_ids=pos).logits.float()  # (B, T, V)
torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).sum().backward()
del logits
full = peak() - base
print(json.dumps({"chunked": chunked, "full": full, "btv4": B * T * V * 4, "chunk": CHUNK * V * 4, "vh4": V * 64 * 4}))
"""


def test_chunked_logprobs_peak_memory():
    """Peak RSS of forward+backward: chunked stays within a few chunks of logits, unchunked holds several (B,T,V)."""
    proc = subprocess.run(
        [sys.executable, "-c", MEMORY_SCRIPT, str(ROOT)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads(proc.stdout.strip().splitlines()[-1])
    mb = {k: round(v / 2**20) for k, v in m.items()}
    # chunked: logits, log-softmax and their grads for ONE chunk, the embedding grad, activations: well under (B,T,V)
    bound = 5 * m["chunk"] + 2 * m["vh4"] + 64 * 2**20
    assert m["chunked"] < bound < 0.6 * m["btv4"], mb
    assert m["chunked"] < m["full"] - 0.75 * m["btv4"], mb
    assert m["full"] > 2 * m["btv4"], (
        mb
    )  # the comparison is real: the unchunked path holds >= 2 copies of logits


# ----------------------------------------------------------------------------- warm-start, masked head
def test_sft_loss_is_the_masked_mean_nll():
    logp = torch.tensor([[-1.0, -2.0, float("-inf")], [-0.5, -4.0, -3.0]], requires_grad=True)
    mask = torch.tensor(
        [[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]]
    )  # the -inf sits at a masked (context) slot
    loss = sft_loss(logp, mask)
    assert loss.item() == pytest.approx((1 + 2 + 4 + 3) / 4)
    loss.backward()
    assert torch.equal(
        logp.grad, -mask / 4
    )  # finite everywhere: the masked -inf never reached the gradient
    assert sft_loss(logp, mask, normaliser=8.0).item() == pytest.approx(
        10 / 8
    )  # global count over micro-batches


def test_token_logprobs_loss_mask_equals_full_head_at_masked_positions():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=300,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=64,
        )
    )
    ids = torch.randint(0, 300, (2, 12))
    attn = torch.ones_like(ids)
    attn[1, 9:] = 0  # right padding
    mask = torch.zeros(2, 11)
    mask[0, 3:7], mask[1, 5:8] = 1, 1
    full, ent_full = token_logprobs(model, ids, attn, 0.7, chunk_size=5, with_entropy=True)
    part, ent_part = token_logprobs(
        model, ids, attn, 0.7, chunk_size=5, with_entropy=True, loss_mask=mask
    )
    m = mask.bool()
    torch.testing.assert_close(part[m], full[m])
    torch.testing.assert_close(ent_part[m], ent_full[m])
    assert torch.all(part[~m] == 0) and torch.all(ent_part[~m] == 0)
    part[
        m
    ].sum().backward()  # gradients flow through the scatter to the selected positions' head inputs
    assert model.lm_head.weight.grad.abs().sum() > 0


def test_question_kind_names_what_a_guess_can_score():
    assert question_kind("Is Oslo in Norway?", ["yes"]) == "yes-no"
    assert (
        question_kind("Which film came out first, Heat or Alien?", ["Alien", "Alien (film)"])
        == "two-option"
    )
    assert question_kind("Who directed Alien?", ["Ridley Scott"]) == "open"
    # whole words after normalisation: the alias "fr" of France is not named by "from"
    assert question_kind("Which country is Anthony I's father from?", ["France", "fr"]) == "open"
    assert question_kind("Who was born first, The Edge or Bono?", ["the Edge"]) == "two-option"
