"""Per-token distillation divergences between a student and a teacher that share a vocabulary, over full
next-token distributions, as in GKD (Agarwal et al., "On-Policy Distillation of Language Models: Learning
from Self-Generated Mistakes", ICLR 2024, arXiv 2306.13649).

At one position, with P the teacher's and Q the student's distribution, softmax(logits / temperature):

    forward KL        KL(P || Q) = sum_v P(v) (log P(v) - log Q(v))        off-policy distillation on text
    reverse KL        KL(Q || P) = sum_v Q(v) (log Q(v) - log P(v))        on-policy (MiniLLM, GKD)
    generalised JSD   M = beta P + (1 - beta) Q,  0 < beta < 1
                      JSD_beta = beta KL(P || M) + (1 - beta) KL(Q || M)   (GKD eq. 1)

The endpoints follow TRL (trl 1.16: DistillationConfig.beta "0.0 = forward KL, 0.5 = JSD, 1.0 = reverse
KL"; experimental GKDTrainer.generalized_jsd_loss): beta = 0 gives the forward KL and beta = 1 the reverse
KL themselves. JSD_beta itself vanishes at both ends (M becomes Q, then P); its leading terms are
beta KL(P || Q) and (1 - beta) KL(Q || P), so JSD_beta / beta -> forward KL and JSD_beta / (1 - beta) ->
reverse KL: the endpoints are the directions JSD_beta tends to, at a scale that jumps there (a learning
rate tuned at beta = 0.9 is about ten times too large at beta = 1). Temperature divides both models'
logits, as in TRL, with no T^2 factor. The teacher's logits are detached: it is never trained. Every
divergence is computed in at least float32.
"""

from __future__ import annotations

import math

import torch
from torch.utils.checkpoint import checkpoint

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")


def kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p || q) over the last dim from log-probs; terms with p(v) = 0 count 0 (a -inf logit is allowed)."""
    terms = logp.exp() * (logp - logq)
    return torch.where(logp == -math.inf, 0.0, terms).sum(-1)


def forward_kl(student_logp: torch.Tensor, teacher_logp: torch.Tensor) -> torch.Tensor:
    return kl(teacher_logp, student_logp)


def reverse_kl(student_logp: torch.Tensor, teacher_logp: torch.Tensor) -> torch.Tensor:
    return kl(student_logp, teacher_logp)


def generalized_jsd(student_logp: torch.Tensor, teacher_logp: torch.Tensor, beta: float) -> torch.Tensor:
    """JSD_beta(P || Q) with P the teacher, M = beta P + (1 - beta) Q; beta 0 and 1: the two KLs (TRL)."""
    if beta == 0:
        return forward_kl(student_logp, teacher_logp)
    if beta == 1:
        return reverse_kl(student_logp, teacher_logp)
    log_m = torch.logaddexp(teacher_logp + math.log(beta), student_logp + math.log1p(-beta))
    return beta * kl(teacher_logp, log_m) + (1 - beta) * kl(student_logp, log_m)


def _divergence(student_logits, teacher_logits, divergence: str, beta: float, temperature: float):
    dtype = torch.promote_types(student_logits.dtype, torch.float32)  # bf16 log-softmax loses too much
    student_logp = (student_logits.to(dtype) / temperature).log_softmax(-1)
    teacher_logp = (teacher_logits.to(dtype) / temperature).log_softmax(-1)
    if divergence == "forward_kl":
        return forward_kl(student_logp, teacher_logp)
    if divergence == "reverse_kl":
        return reverse_kl(student_logp, teacher_logp)
    return generalized_jsd(student_logp, teacher_logp, beta)


def token_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    divergence: str = "reverse_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    chunk_tokens: int | None = 1024,
) -> torch.Tensor:
    """The divergence at every position: [B, T, V] logits (position t of both predicts the same token) and
    an optional [B, T] mask -> [B, T], 0 where the mask is False. Only masked-in positions are computed
    (prompt and padding logits never reach the softmax, so they may hold anything), `chunk_tokens` of them
    at a time; with grad on, each chunk but the last is recomputed in backward (activation checkpointing),
    so the float32 log-softmaxes of both models exist for one chunk at a time."""
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence {divergence!r} is not one of {', '.join(DIVERGENCES)}")
    if divergence == "jsd" and not 0 <= beta <= 1:
        raise ValueError(f"beta {beta} is outside [0, 1] (0 = forward KL, 1 = reverse KL)")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ; distillation needs one vocabulary and aligned positions")
    if mask is None:
        mask = torch.ones(student_logits.shape[:-1], dtype=torch.bool, device=student_logits.device)
    mask = mask.bool()
    if mask.shape != student_logits.shape[:-1]:
        raise ValueError(f"mask {tuple(mask.shape)} does not match the logits' positions {tuple(student_logits.shape[:-1])}")
    student, teacher = student_logits[mask], teacher_logits.detach()[mask]  # [n, V]
    step = chunk_tokens or max(student.shape[0], 1)
    parts = []
    for start in range(0, max(student.shape[0], 1), step):
        piece = (student[start : start + step], teacher[start : start + step], divergence, beta, temperature)
        last = start + step >= student.shape[0]
        if torch.is_grad_enabled() and student.requires_grad and not last:
            parts.append(checkpoint(_divergence, *piece, use_reentrant=False))
        else:
            parts.append(_divergence(*piece))
    values = torch.cat(parts)
    return values.new_zeros(mask.shape).masked_scatter(mask, values)


def token_mean(per_token: torch.Tensor, mask: torch.Tensor | None = None,
               num_tokens: int | torch.Tensor | None = None) -> torch.Tensor:
    """The loss: `token_divergence`'s [B, T] values summed over the masked-in tokens, divided by their count, or
    by `num_tokens` when given (the count of the whole accumulated batch, so gradient accumulation weighs every
    token alike)."""
    if num_tokens is None:
        num_tokens = mask.sum() if mask is not None else per_token.numel()
    return per_token.sum() / torch.as_tensor(num_tokens, device=per_token.device).clamp(min=1)
