"""TDPO (Zeng et al., ICML 2024) and DPO losses, written as in the paper.

Notation (per preference pair, w = chosen, l = rejected, sums over response tokens only):
    log ratio      r_y      = sum_t [log pi(y_t | x, y_<t) - log pi_ref(y_t | x, y_<t)]
    sequential KL  SeqKL_y  = sum_t KL( pi_ref(. | x, y_<t) || pi(. | x, y_<t) )     (forward KL, full vocab)
    u              = beta * (r_w - r_l)
    TDPO1 loss     = -log sigmoid(u - beta * (SeqKL_l - SeqKL_w))
    TDPO2 loss     = -log sigmoid(u - alpha * beta * (SeqKL_l - sg(SeqKL_w)))
    DPO loss       = -log sigmoid(u)
    + rpo_alpha * NLL_w, NLL_w = -log pi(y_w | x) / |y_w|   (optional; RPO, Pang et al. 2024, TRL's rpo_alpha)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


@dataclass
class TokenTerms:
    """Per-sequence sums over response tokens, each of shape [batch]."""

    logratio: torch.Tensor  # sum_t log pi - log pi_ref of the taken tokens
    sequential_kl: torch.Tensor  # sum_t KL(pi_ref || pi) over the whole vocabulary
    logp: torch.Tensor  # sum_t log pi of the taken tokens
    n_tokens: torch.Tensor

    def halves(self) -> tuple[TokenTerms, TokenTerms]:
        """Split a [chosen; rejected] batch into its two halves."""
        first, second = ({k: v.chunk(2)[i] for k, v in vars(self).items()} for i in (0, 1))
        return TokenTerms(**first), TokenTerms(**second)


def _chunk_token_terms(logits: torch.Tensor, ref_logits: torch.Tensor, labels: torch.Tensor, head=None):
    # logits, ref_logits: [B, c, V] (logits: hidden states [B, c, H] when a head is given); labels: [B, c]
    # (masked positions hold any valid id)
    if head is not None:
        logits = head(logits)  # [B, c, V], recomputed in backward rather than kept
    # at least float32 (bf16 log-softmax over a large vocabulary loses too much)
    logp = logits.to(torch.promote_types(logits.dtype, torch.float32)).log_softmax(-1)
    ref_logp = ref_logits.to(logp.dtype).log_softmax(-1)
    kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1)  # [B, c]
    token_logp = logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    ref_token_logp = ref_logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return kl, token_logp, ref_token_logp


def token_terms(
    logits: torch.Tensor,
    ref_logits: torch.Tensor,
    labels: torch.Tensor,
    chunk_size: int | None = 128,
    head: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> TokenTerms:
    """Log ratios and sequential KLs from next-token logits.

    logits, ref_logits: [B, T, V], where position t predicts labels[:, t] (already shifted).
    labels: [B, T] with -100 on prompt and padding.
    The float32 log-softmax of both models exists for one chunk of positions at a time; under
    autograd each chunk is recomputed in the backward pass (activation checkpointing), so the peak
    memory stays close to DPO's, which needs the policy's log-softmax anyway. With `head` (the
    policy's output layer), `logits` are the policy's final hidden states [B, T, H] and its
    [B, T, V] logits exist one chunk at a time too.
    """
    mask = labels != -100
    safe_labels = labels.masked_fill(~mask, 0)
    ref_logits = ref_logits.detach()
    step = chunk_size or logits.shape[1]
    kls, logps, ref_logps = [], [], []
    for start in range(0, logits.shape[1], step):
        piece = (logits[:, start : start + step], ref_logits[:, start : start + step], safe_labels[:, start : start + step], head)
        if torch.is_grad_enabled() and logits.requires_grad and chunk_size:
            out = checkpoint(_chunk_token_terms, *piece, use_reentrant=False)
        else:
            out = _chunk_token_terms(*piece)
        kls.append(out[0])
        logps.append(out[1])
        ref_logps.append(out[2])
    kl, logp, ref_logp = (torch.cat(parts, dim=1) * mask for parts in (kls, logps, ref_logps))
    return TokenTerms(
        logratio=(logp - ref_logp).sum(1),
        sequential_kl=kl.sum(1),
        logp=logp.sum(1),
        n_tokens=mask.sum(1),
    )


def response_window(labels: torch.Tensor, *states: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Each row's response positions moved to the front: (labels [B, W], states [B, W, *]), W the longest
    span from a row's first scored position to its last. The loss needs full-vocabulary distributions
    only where a response token is predicted, so prompt positions never reach the output head.
    labels: [B, T] with -100 off the response; states: [B, T, *] aligned with labels."""
    scored = labels != -100  # [B, T]
    width_all = labels.shape[1]
    has = scored.any(1)
    first = torch.where(has, scored.int().argmax(1), 0)  # [B]
    last = torch.where(has, width_all - 1 - scored.flip(1).int().argmax(1), -1)  # [B]
    width = max(int((last - first + 1).max()), 1)
    cols = first[:, None] + torch.arange(width, device=labels.device)  # [B, W]
    inside = cols <= last[:, None]
    cols = cols.clamp_max(width_all - 1)
    window = [labels.gather(1, cols).masked_fill(~inside, -100)]
    window += [s.gather(1, cols[..., None].expand(-1, -1, s.shape[-1])) for s in states]
    return tuple(window)


def preference_loss(
    chosen: TokenTerms,
    rejected: TokenTerms,
    loss: str = "tdpo2",
    beta: float = 0.1,
    alpha: float = 0.5,
    rpo_alpha: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean loss over pairs and the metrics the trainer logs. rpo_alpha > 0 adds the chosen response's
    token-mean negative log-likelihood: the preference terms alone can widen the margin by pushing the
    rejected response down while the chosen one drifts down too."""
    u = beta * (chosen.logratio - rejected.logratio)
    if loss == "tdpo1":
        delta = beta * (rejected.sequential_kl - chosen.sequential_kl)
    elif loss == "tdpo2":
        delta = alpha * beta * (rejected.sequential_kl - chosen.sequential_kl.detach())
    elif loss == "dpo":
        delta = torch.zeros_like(u)
    else:
        raise ValueError(f"unknown preference loss {loss!r}; expected tdpo1, tdpo2 or dpo")
    losses = -F.logsigmoid(u - delta)
    nll_chosen = -chosen.logp / chosen.n_tokens.clamp_min(1)  # [batch]
    if rpo_alpha:
        losses = losses + rpo_alpha * nll_chosen
    # TDPO's implicit reward of a response: beta * (log ratio + sequential KL) (Zeng et al. 2024, the
    # reference code's chosen/rejected rewards); DPO's has no KL term
    kl_term = (lambda terms: terms.sequential_kl.detach()) if loss != "dpo" else (lambda terms: 0.0)
    chosen_reward = beta * (chosen.logratio.detach() + kl_term(chosen))
    rejected_reward = beta * (rejected.logratio.detach() + kl_term(rejected))
    metrics = {
        "rewards/chosen": chosen_reward.mean(),
        "rewards/rejected": rejected_reward.mean(),
        "rewards/margin": (chosen_reward - rejected_reward).mean(),
        "rewards/accuracy": (chosen_reward > rejected_reward).float().mean(),
        # the policy's own preference (per-token log-likelihood), meaningful before training too
        "preference/accuracy": (chosen.logp / chosen.n_tokens.clamp_min(1) > rejected.logp / rejected.n_tokens.clamp_min(1)).float().mean(),
        "seqkl/chosen": chosen.sequential_kl.detach().mean(),
        "seqkl/rejected": rejected.sequential_kl.detach().mean(),
        "logps/chosen": chosen.logp.detach().mean(),
        "logps/rejected": rejected.logp.detach().mean(),
        "nll/chosen": nll_chosen.detach().mean(),
    }
    return losses.mean(), metrics
