"""Every advantage estimator and loss term of the online RL stages, as functions of tensors.

Shapes: a batch of N sampled responses, right-padded to R tokens: `mask` [N, R] is 1 on real response
tokens; `scores` [N] is one reward per response; `groups` [N] names the prompt a response answers
(the n samples of one prompt share a group).

Estimators (`ADVANTAGE_ESTIMATORS`, chosen by `ppo.advantage_estimator`):
    gae           PPO with a critic: delta_t = r_t + gamma V_{t+1} - V_t, A_t = delta_t + gamma lam A_{t+1}
    grpo          (r - mean_group r) / std_group r  (Shao et al. 2024); mean only = Dr. GRPO (Liu et al. 2025)
    rloo          r - mean of the other samples of the prompt (Ahmadian et al. 2024)
    reinforce_pp  discounted return of the token rewards, whitened over the batch (Hu 2025, REINFORCE++)
The critic-free ones broadcast a response's advantage to all its tokens.

Loss aggregation (`agg_loss`, `ppo.loss_agg_mode`):
    token_mean            sum over all tokens / number of tokens in the batch (DAPO)
    seq_mean_token_mean   mean over responses of each response's token mean (original GRPO)
    seq_mean_token_sum    mean over responses of each response's token sum (ELO's sequence log-likelihood)
    token_sum_norm        sum over all tokens / (N x a fixed length) (Dr. GRPO)
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# ---------------------------------------------------------------------------------------------
# Masked statistics
# ---------------------------------------------------------------------------------------------


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp_min(1)


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, reduce_sum=lambda t: t) -> torch.Tensor:
    """Zero mean, unit variance over the masked entries; `reduce_sum` sums over ranks, for the global statistics."""
    count = reduce_sum((mask.sum()).float())
    mean = reduce_sum((x * mask).sum()) / count
    var = reduce_sum((((x - mean) ** 2) * mask).sum()) / count
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    return (out if shift_mean else out + mean) * mask


# ---------------------------------------------------------------------------------------------
# KL to the reference
# ---------------------------------------------------------------------------------------------


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from tokens sampled from pi (Schulman's k1, k2, k3).

    As a reward (no gradient) any of them estimates the KL. As a loss term only k2 and k3 have useful
    gradients: on-policy, E[grad k2] = grad KL(pi || pi_ref) and E[grad k3] = grad KL(pi_ref || pi); the
    gradient of k1 is grad log pi, whose expectation is zero whatever the reference.
    """
    log_ratio = logp - ref_logp
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio**2
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}; expected k1, k2 or k3")


def token_level_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """r_t = -kl_coef * KL_t on every response token, plus the response's score on its last real token."""
    rewards = -kl_coef * kl * mask
    last = (mask.sum(1).long() - 1).clamp_min(0)
    rewards[torch.arange(len(scores), device=scores.device), last] += scores
    return rewards


# ---------------------------------------------------------------------------------------------
# Advantage estimators
# ---------------------------------------------------------------------------------------------


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    """Generalised advantage estimation over right-padded responses; returns (advantages, returns)."""
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])
    next_advantage = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = delta + gamma * lam * next_advantage
        advantages[:, t] = advantage * m
        # padding after the last token carries nothing back
        next_value = torch.where(m.bool(), values[:, t], torch.zeros_like(next_value))
        next_advantage = torch.where(m.bool(), advantage, torch.zeros_like(next_advantage))
    return advantages, (advantages + values) * mask


def group_baseline(scores: torch.Tensor, groups: torch.Tensor, leave_one_out: bool) -> torch.Tensor:
    """Per response: the mean score of its group, or of the rest of its group (a lone sample: its own score)."""
    out = torch.empty_like(scores)
    for g in groups.unique():
        idx = groups == g
        r = scores[idx]
        # a lone sample's mean is its own score, leave-one-out or not
        out[idx] = (r.sum() - r) / (len(r) - 1) if leave_one_out and len(r) > 1 else r.mean()
    return out


def grpo_advantages(scores, groups, mask, std_normalize: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """(r - group mean) / (group std + eps), the std unbiased as in the GRPO paper; Dr. GRPO drops the std."""
    centred = scores - group_baseline(scores, groups, leave_one_out=False)
    if std_normalize:
        std = torch.empty_like(scores)
        for g in groups.unique():
            idx = groups == g
            std[idx] = scores[idx].std() if idx.sum() > 1 else 0.0
        centred = centred / (std + eps)
    return centred[:, None] * mask


def rloo_advantages(scores, groups, mask) -> torch.Tensor:
    return (scores - group_baseline(scores, groups, leave_one_out=True))[:, None] * mask


def reinforce_pp_advantages(token_rewards, mask, gamma: float = 1.0, reduce_sum=lambda t: t) -> torch.Tensor:
    """Discounted returns G_t = sum_{s>=t} gamma^(s-t) r_s (the KL is in the token rewards), whitened over the batch."""
    returns = torch.zeros_like(token_rewards)
    running = torch.zeros_like(token_rewards[:, 0])
    for t in reversed(range(token_rewards.shape[1])):
        running = token_rewards[:, t] + gamma * running * mask[:, t]
        returns[:, t] = running * mask[:, t]
    return whiten(returns, mask, reduce_sum=reduce_sum)


ADVANTAGE_ESTIMATORS = ("gae", "grpo", "rloo", "reinforce_pp")
CRITIC_ESTIMATORS = ("gae",)


# ---------------------------------------------------------------------------------------------
# Loss aggregation and the policy / value losses
# ---------------------------------------------------------------------------------------------


def agg_loss(loss: torch.Tensor, mask: torch.Tensor, mode: str, max_length: int | None = None,
             mean_over_ranks: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Reduce per-token losses [N, R] to a scalar (modes in the module docstring).

    `mean_over_ranks` (token_mean only, data parallel): divide by the ranks' mean token count instead of this
    rank's, so that averaging the ranks' gradients gives the token mean of the global batch. Dividing by the
    local count would weigh a token on a rank with short responses more than one on a rank with long ones."""
    if mode == "token_mean":
        count = mask.sum().clamp_min(1) if mean_over_ranks is None else mean_over_ranks(mask.sum().float()).clamp_min(1e-6)
        return (loss * mask).sum() / count
    if mode == "seq_mean_token_mean":
        return ((loss * mask).sum(1) / mask.sum(1).clamp_min(1)).mean()
    if mode == "seq_mean_token_sum":
        return (loss * mask).sum(1).mean()
    if mode == "token_sum_norm":
        if not max_length:
            raise ValueError("loss_agg_mode token_sum_norm needs a fixed max_length")
        return (loss * mask).sum() / (loss.shape[0] * max_length)
    raise ValueError(f"unknown loss aggregation {mode!r}; expected token_mean, seq_mean_token_mean, seq_mean_token_sum "
                     "or token_sum_norm")


LOSS_AGG_MODES = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "token_sum_norm")


def policy_loss(logp, old_logp, advantages, mask, clip_low: float, clip_high: float, agg: str = "token_mean",
                max_length: int | None = None, weights: torch.Tensor | None = None, mean_over_ranks=None):
    """Clipped surrogate -min(ratio A, clip(ratio, 1 - clip_low, 1 + clip_high) A), per token, aggregated.
    `weights` [N, R] multiply each token's loss (the truncated importance weights of `tis_weights`)."""
    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio)
    losses = torch.max(-advantages * ratio, -advantages * ratio.clamp(1 - clip_low, 1 + clip_high))
    if weights is not None:
        losses = losses * weights
    loss = agg_loss(losses, mask, agg, max_length, mean_over_ranks)
    with torch.no_grad():
        stats = {
            "clip_fraction": masked_mean(((ratio < 1 - clip_low) | (ratio > 1 + clip_high)).float(), mask),
            "approx_kl": masked_mean(ratio - 1 - log_ratio, mask),  # k3 estimate of KL(pi_old || pi)
        }
    return loss, stats


def value_loss(values, old_values, returns, mask, clip_range: float, mean_over_ranks=None) -> torch.Tensor:
    """0.5 mean max((V - R)^2, (clip(V, V_old - eps, V_old + eps) - R)^2) over real tokens (of every rank)."""
    clipped = old_values + (values - old_values).clamp(-clip_range, clip_range)
    return 0.5 * agg_loss(torch.max((values - returns) ** 2, (clipped - returns) ** 2), mask, "token_mean",
                          mean_over_ranks=mean_over_ranks)


def ppo_losses(logp, old_logp, advantages, values, old_values, returns, mask, clip_range: float, value_clip_range: float):
    """PPO's symmetric clipped policy loss (token mean) and the clipped value loss, with diagnostics."""
    loss, stats = policy_loss(logp, old_logp, advantages, mask, clip_range, clip_range)
    return loss, value_loss(values, old_values, returns, mask, value_clip_range), stats


# ---------------------------------------------------------------------------------------------
# DAPO's refinements and the engine/trainer mismatch
# ---------------------------------------------------------------------------------------------


def overlong_penalty(lengths: torch.Tensor, max_new_tokens: int, buffer: int, penalty: float) -> torch.Tensor:
    """DAPO's soft overlong punishment: 0 up to max - buffer tokens, then falling linearly to -penalty at max."""
    if buffer <= 0:
        return torch.zeros_like(lengths, dtype=torch.float)
    over = (lengths.float() - (max_new_tokens - buffer)).clamp_min(0)
    return -penalty * (over / buffer).clamp(max=1.0)


def tis_weights(trainer_logp: torch.Tensor, engine_logp: torch.Tensor, cap: float) -> torch.Tensor:
    """Truncated importance sampling between the sampler and the trainer (Yao et al. 2025):
    min(pi_trainer(y_t) / pi_engine(y_t), cap), no gradient. Both log-probs of the sampled distribution."""
    return torch.exp(trainer_logp.detach() - engine_logp).clamp(max=cap)


def equal_reward_groups(scores: torch.Tensor, groups: torch.Tensor, atol: float = 1e-6) -> torch.Tensor:
    """[N] bool: True where every response of the group got the same score (zero advantage: no signal)."""
    out = torch.zeros_like(scores, dtype=torch.bool)
    for g in groups.unique():
        idx = groups == g
        out[idx] = bool((scores[idx].max() - scores[idx].min()) <= atol)
    return out
