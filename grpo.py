"""GRPO for Knowledge-R1: rewards, group-relative advantages, chunked per-token log-probs and the clipped loss.

Run the checks:  python -m pytest -q tests/test_grpo.py   and   ruff check grpo.py tests/test_grpo.py

Rewards (plain Python, one trajectory at a time)
  accuracy  exact match (EM) after SQuAD/HotpotQA normalisation against any gold alias, or token F1 (`acc="f1"`,
            HotpotQA's yes/no rule). Reward-hack guards: an empty answer scores 0; in F1 mode so does a *candidate
            list* (more pieces split on , ; / | newline or "or" than every gold has, or over 2 x longest gold + 3
            words; "and" is no separator: "Bosnia and Herzegovina"). EM needs no guard: a list never equals a gold.
            `cover_exact_match` is for evaluation only: as a reward it pays for listing candidates.
  format    the original Knowledge-R1 rule, +1 / -1: every turn but the last is <think>..</think><search>..</search>,
            the last <think>..</think><answer>..</answer>. Stricter than the original (which counted tags and
            checked order): only whitespace outside the tags, no tag content blank or holding another tag.
  support   recall of the question's gold supporting titles among the passages the agent read (0 where the data
            names none). Not in the original; recall as a reward is DeepRetrieval's (Jiang et al. 2025), and
            StepSearch (Wang et al. 2025) pays the same evidence per search. Dense where accuracy is sparse: a
            small model that rarely answers right still learns which searches find the evidence.
  reward    w_acc * accuracy + w_fmt * format + w_support * support, default 1, 1 and 0: the original's plain
            sum. A well-formed wrong answer (1) then beats a malformed right one (0): the protocol is learnt
            first, as the searches need it.

Against the GRPO paper (DeepSeekMath, Shao et al. 2024), choice by choice:
  advantage  A_i = (r_i - mean(r)) / (std(r) + eps) over the G consecutive samples of one prompt (paper, outcome
             supervision), population std; `scale_std=False` drops the division (Dr. GRPO, Liu et al. 2025: it
             up-weights groups almost all right or all wrong). A group with equal rewards carries no signal.
  clip       PPO's per-token clipped surrogate, min(rho*A, clip(rho, 1-eps_low, 1+eps_high)*A), with DAPO's
             decoupled "clip-higher" (Yu et al. 2025): default 0.2 both, the paper's; eps_high = 0.28 is DAPO's.
  ratio      rho = exp(logp - old_logp). With one optimizer step per rollout batch old_logp == logp, rho == 1 and
             the gradient is exactly the policy gradient A * grad logp (clipping never fires); it matters only
             with several updates per batch (ppo epochs / mini-batches) or stale rollouts. old_logp may be the
             sampler's log-probs (Trajectory.logprobs) or a recomputation; they differ by numerics only.
  KL         k3 = exp(ref - logp) - (ref - logp) - 1 (Schulman's unbiased, non-negative estimator; paper eq. 4),
             added per token with weight beta. beta == 0 needs no reference model: pass ref_logp=None.
  aggregate  "seq": mean over each sequence's tokens, then mean over sequences (paper: 1/G sum_i 1/|o_i| sum_t);
             "token": sum over all tokens / number of tokens (DAPO, no length bias between sequences);
             "const": sum / constant, e.g. max_response_len * num_sequences (Dr. GRPO).
             `normaliser` is the count over every micro-batch and rank of one optimizer step, so accumulated
             gradients equal the one-big-batch gradient.
  warm-start `sft_loss`: masked mean of -log p over expert trajectories' assistant tokens, before GRPO. Not in the
             paper (its policy already follows the format); a small model that never emits the protocol gives
             every group equal rewards and GRPO exactly zero gradient.
  mixing     David-GRPO (arXiv 2601.21699): an expert trajectory replaces one sample of a group in which no sample
             is correct (train.py --expert-mix); its old log-probs are the current ones, so ratio = 1 there.
Masked positions (prompt, retrieved passages, template glue, padding) are selected away with torch.where, never
multiplied by 0, so inf/NaN there cannot reach the loss or the gradient.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from functools import partial

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# ----------------------------------------------------------------------------- answers
_PUNCT = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_SEP = re.compile(r"[,;/|\n]|\bor\b", re.IGNORECASE)


def normalize_answer(s: str) -> str:
    """SQuAD/HotpotQA normalisation: lowercase, remove punctuation, remove articles, collapse whitespace."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", s).split())


def exact_match(prediction: str | None, golds: list[str]) -> float:
    """1.0 if the normalised prediction equals any normalised gold alias (an empty prediction never matches)."""
    p = normalize_answer(prediction) if prediction is not None else ""
    return float(bool(p) and any(p == normalize_answer(g) for g in golds))


def _f1(p: str, g: str) -> float:
    if p != g and (p in ("yes", "no", "noanswer") or g in ("yes", "no", "noanswer")):
        return 0.0  # HotpotQA: a yes/no question is all or nothing
    same = sum((Counter(p.split()) & Counter(g.split())).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(p.split()), same / len(g.split())
    return 2 * precision * recall / (precision + recall)


def f1_score(prediction: str | None, golds: list[str]) -> float:
    """SQuAD token F1 of the normalised strings, max over gold aliases."""
    p = normalize_answer(prediction) if prediction is not None else ""
    return max((_f1(p, normalize_answer(g)) for g in golds), default=0.0) if p else 0.0


def cover_exact_match(prediction: str | None, golds: list[str]) -> float:
    """1.0 if some normalised gold is a whole-word substring of the normalised prediction. Evaluation only."""
    p = normalize_answer(prediction) if prediction is not None else ""
    return float(any(g and f" {g} " in f" {p} " for g in map(normalize_answer, golds)))


def question_kind(question: str, golds: list[str]) -> str:
    """What a question asks: "yes-no" (the gold is yes or no), "two-option" (a gold alias is named in the question,
    as in "Which film came out first, X or Y?": a guess among the names scores) or "open" (it must be found)."""
    if normalize_answer(golds[0]) in ("yes", "no"):
        return "yes-no"
    q = f" {normalize_answer(question)} "
    return (
        "two-option" if any(g and f" {g} " in q for g in map(normalize_answer, golds)) else "open"
    )


def _n_parts(s: str) -> int:
    return sum(1 for part in _SEP.split(s) if normalize_answer(part))


def is_candidate_list(answer: str, golds: list[str]) -> bool:
    """True if `answer` hedges: more separator-delimited pieces than every gold, or far longer than the longest."""
    longest = max((len(normalize_answer(g).split()) for g in golds), default=0)
    too_long = len(normalize_answer(answer).split()) > 2 * longest + 3
    return too_long or _n_parts(answer) > max((_n_parts(g) for g in golds), default=1)


def answer_accuracy(answer: str | None, golds: list[str], acc: str = "em") -> float:
    """Accuracy reward in [0, 1]: EM (default) or guarded F1 (see the module docstring)."""
    if acc not in ("em", "f1"):
        raise ValueError(f"acc must be 'em' or 'f1', got {acc!r}")
    if exact_match(answer, golds):
        return 1.0
    # f1_score gives an empty answer 0
    if acc == "em" or not answer or is_candidate_list(answer, golds):
        return 0.0
    return f1_score(answer, golds)


# ----------------------------------------------------------------------------- format
_TAG = re.compile(r"</?(?:think|search|answer)>")
_TURN = {
    kind: re.compile(
        rf"\s*<think>(?P<think>.*?)</think>\s*<{kind}>(?P<body>.*?)</{kind}>\s*", re.DOTALL
    )
    for kind in ("search", "answer")
}


def _turn_ok(text: str, kind: str) -> bool:
    m = _TURN[kind].fullmatch(text)
    return bool(m) and all(
        part.strip() and not _TAG.search(part) for part in (m["think"], m["body"])
    )


def format_reward(responses: list[str]) -> float:
    """+1 if all turns but the last are think+search and the last is think+answer, else -1."""
    ok = (
        bool(responses)
        and all(_turn_ok(r, "search") for r in responses[:-1])
        and _turn_ok(responses[-1], "answer")
    )
    return 1.0 if ok else -1.0


def support_recall(gold_titles: list[str] | None, read_titles: list[list[str]]) -> float | None:
    """The share of the gold supporting titles among the titles of the passages read (one list per search),
    compared case-insensitively; None when the question names none."""
    gold = {title.casefold() for title in gold_titles or []}
    if not gold:
        return None
    read = {title.casefold() for hits in read_titles for title in hits}
    return round(len(gold & read) / len(gold), 4)


def reward(
    traj,
    golds: list[str],
    *,
    w_acc: float = 1.0,
    w_fmt: float = 1.0,
    acc: str = "em",
    w_support: float = 0.0,
    support: float = 0.0,
) -> dict[str, float]:
    """Score one trajectory (.answer, .responses) against its gold aliases; `support`: its support_recall (the
    caller knows the titles it read). train.py logs every key (mean over trajectories), so a new reward term is
    one new key here and one line in the sum."""
    a, f = answer_accuracy(traj.answer, golds, acc), format_reward(traj.responses)
    total = w_acc * a + w_fmt * f + w_support * support
    return {"reward": total, "accuracy": a, "format": f, "support": support}


# ----------------------------------------------------------------------------- advantages
def group_advantages(
    rewards: torch.Tensor | list[float], group_size: int, scale_std: bool = True, eps: float = 1e-4
) -> torch.Tensor:
    """Group-relative advantages; rewards (P*G,) with the G samples of a prompt consecutive -> (P*G,) float32."""
    r = torch.as_tensor(rewards, dtype=torch.float32).view(-1, group_size)  # (P, G)
    adv = r - r.mean(dim=1, keepdim=True)  # (P, G)
    if scale_std:
        # (P, G) population std, as a z-score
        adv = adv / (r.std(dim=1, keepdim=True, correction=0) + eps)
    return adv.reshape(-1)  # (P*G,)


# ----------------------------------------------------------------------------- log-probs
def _chunk_logp(
    head: torch.nn.Module,
    h: torch.Tensor,
    y: torch.Tensor,
    temperature: float,
    with_entropy: bool,
    vocab: int | None = None,
):
    # (n, V) float32: the one big tensor, alive for one chunk only
    logits = head(h)[:, :vocab].float()
    if temperature != 1.0:
        logits = logits / temperature  # (n, V)
    # (n,) fused log-softmax + gather: fewer (n, V) passes
    logp = -F.cross_entropy(logits, y, reduction="none")
    if not with_entropy:
        return logp, None
    # entropy is a metric; computed after logp so checkpoint's recompute stops before it
    with torch.no_grad():
        logq = torch.log_softmax(logits, dim=-1)  # (n, V)
        ent = -(logq.exp() * logq).sum(-1)  # (n,)
    return logp, ent


def token_logprobs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    with_entropy: bool = False,
    loss_mask: torch.Tensor | None = None,
    vocab: int | None = None,
):
    """logp[:, t] = log softmax(logits_t / temperature)[input_ids[:, t+1]], (B, T-1), never holding (B*T, V); with
    `with_entropy`, (logp, entropy).

    Rows may be left- or right-padded (positions restart at each row's first real token); attention_mask None: pads
    only on the right, unseen by causal attention (mask their values out), so SDPA runs its fused causal kernel. With
    grad, each chunk of `chunk_size` tokens is checkpointed: backward rebuilds its logits. `loss_mask` (B, T-1): the
    head runs only where it is 1 (0.0 elsewhere: prompt and passages need none). `vocab`: softmax over the
    tokenizer's first `vocab` ids only, as rollout() samples (Qwen2.5 has more embedding rows than ids)."""
    B, T = input_ids.shape
    everything = torch.ones(B, T - 1, dtype=torch.bool, device=input_ids.device)
    sel = everything if loss_mask is None else loss_mask.bool()  # (B, T-1)
    hidden = last_hidden(model, input_ids, attention_mask)[:, :-1][sel]  # (N, H), N = selected
    targets = input_ids[:, 1:][sel]  # (N,)
    head = model.get_output_embeddings()
    chunk = _chunk_logp
    # store only h (n, H): backward rebuilds logits
    if torch.is_grad_enabled() and hidden.requires_grad:
        chunk = partial(checkpoint, _chunk_logp, use_reentrant=False)
    starts = range(0, hidden.shape[0], chunk_size)
    spans = [(hidden[s : s + chunk_size], targets[s : s + chunk_size]) for s in starts]
    # [((n,), (n,) or None)]
    parts = [chunk(head, h, y, temperature, with_entropy, vocab) for h, y in spans]
    zeros = hidden.new_zeros(B, T - 1, dtype=torch.float32)  # (B, T-1)
    if not parts:
        return (zeros, zeros) if with_entropy else zeros
    lps, ents = zip(*parts)
    logp = zeros.masked_scatter(sel, torch.cat(lps))  # (B, T-1) float32
    if not with_entropy:
        return logp
    return logp, zeros.masked_scatter(sel, torch.cat(ents)).detach()  # (B, T-1) each


def last_hidden(
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
) -> torch.Tensor:
    """The model body's last hidden states (B, T, H); positions restart at each row's first real token."""
    position_ids = None
    if attention_mask is not None:
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T)
    out = model.model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=False,
    )
    return out.last_hidden_state


# ----------------------------------------------------------------------------- loss
def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    ref_logp: torch.Tensor | None = None,
    beta: float = 0.0,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    agg: str = "seq",
    normaliser: float | torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped GRPO surrogate + beta * k3 KL, masked and aggregated; metrics are detached 0-d tensors.

    logp, old_logp, ref_logp, entropy, mask: (B, T); advantages: (B,). `normaliser` defaults to this batch's
    count (tokens for "token", sequences for "seq"); it is required for "const".
    """
    if agg not in ("token", "seq", "const"):
        raise ValueError(f"agg must be 'token', 'seq' or 'const', got {agg!r}")
    if agg == "const" and normaliser is None:
        raise ValueError("agg='const' needs normaliser (e.g. max_response_len * num_sequences)")
    if beta > 0 and ref_logp is None:
        raise ValueError("beta > 0 needs ref_logp")
    m = mask.bool()  # (B, T)
    zero = logp.new_zeros(())
    lp = torch.where(m, logp, zero)  # (B, T) masked slots -> 0: no inf/NaN in forward or backward
    old = torch.where(m, old_logp.to(lp.dtype), zero)  # (B, T)
    adv = advantages.to(lp.dtype)[:, None]  # (B, 1)
    ratio = torch.exp(lp - old)  # (B, T) exactly 1 on masked slots
    per_tok = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - clip_low, 1 + clip_high))  # (B, T)
    kl = None
    if ref_logp is not None:
        d = torch.where(m, ref_logp.to(lp.dtype), zero) - lp  # (B, T) log(pi_ref / pi)
        kl = torch.exp(d) - d - 1  # (B, T) k3 >= 0, 0 on masked slots
        if beta > 0:
            per_tok = per_tok + beta * kl
    per_tok = torch.where(m, per_tok, zero)  # (B, T)
    if agg == "seq":
        # (B, T) each sequence's tokens sum to its mean
        per_tok = per_tok / m.sum(1, keepdim=True).clamp(min=1)
    if normaliser is None:
        normaliser = m.sum().clamp(min=1) if agg == "token" else m.shape[0]
    loss = per_tok.sum() / normaliser
    return loss, loss_metrics(m, ratio, advantages, clip_low, clip_high, kl, entropy)


@torch.no_grad()
def loss_metrics(
    m: torch.Tensor,
    ratio: torch.Tensor,
    advantages: torch.Tensor,
    clip_low: float,
    clip_high: float,
    kl: torch.Tensor | None,
    entropy: torch.Tensor | None,
) -> dict[str, torch.Tensor]:
    """grpo_loss's detached 0-d metrics: clip fractions, ratio range, KL, advantage stats, entropy (no host sync)."""
    r = ratio.detach()  # (B, T)
    zero, n_tok, adv = r.new_zeros(()), m.sum(), advantages.to(r.dtype)[:, None]  # adv: (B, 1)
    den = n_tok.clamp(min=1).to(r.dtype)
    low = m & (adv < 0) & (r < 1 - clip_low)  # (B, T) clipped branch active, gradient zero
    high = m & (adv > 0) & (r > 1 + clip_high)  # (B, T)
    a = advantages.detach().float()
    # no host sync
    inf, one, has = (torch.full_like(zero, float("inf")), torch.ones_like(zero), n_tok > 0)
    metrics = {
        "clip_frac_low": low.sum() / den,
        "clip_frac_high": high.sum() / den,
        "clip_frac": (low | high).sum() / den,
        "ratio_mean": torch.where(m, r, zero).sum() / den,
        "ratio_min": torch.where(has, torch.where(m, r, inf).amin(), one),
        "ratio_max": torch.where(has, torch.where(m, r, -inf).amax(), one),
        "kl": kl.detach().sum() / den if kl is not None else zero,
        "adv_mean": a.mean(),
        "adv_std": a.std(correction=0),
        "adv_min": a.min(),
        "adv_max": a.max(),
        "n_tokens": n_tok.float(),
    }
    if entropy is not None:
        metrics["entropy"] = torch.where(m, entropy.detach().to(r.dtype), zero).sum() / den
    return metrics


# ----------------------------------------------------------------------------- warm-start
def sft_loss(
    logp: torch.Tensor, mask: torch.Tensor, normaliser: float | torch.Tensor | None = None
) -> torch.Tensor:
    """Warm-start on expert trajectories: masked mean of -log p over the expert's own tokens (mask 1); logp, mask:
    (B, T). `normaliser`: the token count over micro-batches and ranks (default: this batch's), as in grpo_loss."""
    m = mask.bool()  # (B, T)
    # where, not *: inf at a masked slot cannot leak
    nll = torch.where(m, -logp, logp.new_zeros(())).sum()
    return nll / (m.sum().clamp(min=1) if normaliser is None else normaliser)
