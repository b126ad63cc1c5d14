"""Every advantage estimator and loss term of the online RL stages, as functions of tensors, found by
their paper names.

Shapes: a batch of N sampled responses, right-padded to R tokens: `mask` [N, R] is 1 on real response
tokens; `scores` [N] is one reward per response; `groups` [N] names the prompt a response answers
(the n samples of one prompt share a group).

Advantage estimators, registered by name (`advantage_estimator(name)`, config `ppo.advantage_estimator`),
all called alike on an `AdvantageInputs`, returning (advantages [N, R], returns [N, R] or None):
    gae                    PPO with a critic: delta_t = r_t + gamma V_{t+1} - V_t, A_t = delta_t + gamma lam A_{t+1}
    grpo                   (r - mean_group r) / std_group r (Shao et al. 2024)
    dr_grpo                r - mean_group r, no std (Liu et al. 2025, Dr. GRPO)
    rloo                   r - mean of the other samples of the prompt (Ahmadian et al. 2024)
    reinforce_pp           discounted return of the token rewards, whitened over the batch (Hu 2025, REINFORCE++)
    reinforce_pp_baseline  return minus its group's mean, whitened over the batch (Hu 2025, REINFORCE++ with
                           baseline; verl's reinforce_plus_plus_baseline)
The critic-free ones broadcast a response's advantage to all its tokens.

Loss aggregations, registered by name (`loss_aggregation(name)`, `agg_loss`, config `ppo.loss_agg_mode`):
    token_mean               sum over all tokens / number of tokens in the batch (DAPO)
    seq_mean_token_mean      mean over responses of each response's token mean (original GRPO)
    seq_mean_token_sum       mean over responses of each response's token sum (ELO's sequence log-likelihood)
    token_sum_norm           sum over all tokens / (N x L), L a fixed length (Dr. GRPO's constant)
    seq_mean_token_sum_norm  sum over all tokens / L, no 1/N (verl's loss_scale_factor normaliser)

Where this module parts from verl's core_algos.py (b178a3c, January 2026), and how each difference was decided:
  1. The seq_mean modes average over responses that have tokens; a response masked out entirely
     (ppo.mask_truncated, masked importance sampling) does not dilute the others. As verl.
  2. Two normalisers by name: token_sum_norm divides by N x L (Dr. GRPO), seq_mean_token_sum_norm by L
     alone (verl's seq-mean-token-sum-norm); the second grows with the batch size, like verl's.
  3. Dual-clip (Ye et al. 2020): for A < 0 the loss is capped at -c A (`clip_ratio_c`; the config's
     default 3.0 as verl and OpenRLHF; None at the function level: off).
  4. k3 is clamped to [-10, 10] as verl (its log-ratio first to [-20, 20], so exp cannot overflow):
     an outlier token (log pi_ref / pi > 2.4) adds a bounded penalty and no gradient.
  5. A group of one sample is refused by the group estimators (grpo, dr_grpo, rloo, reinforce_pp_baseline)
     with a one-line error: it has no baseline, and passing its raw score through as verl does mixes
     unnormalised scores into a batch of baselined ones. (ELO's `group_baseline` keeps its lone-sample rule:
     paths are dropped there, so lone samples are expected.)
  6. REINFORCE++'s return is zero on padding and starts fresh at the last real token: a reward on padding
     never reaches a real token.
  7. reinforce_pp_baseline is offered (above).
  8. Diagnostics under their dashboard names: `clip/ratio_outside_fraction` (ratio outside the clip band),
     `clip/pg_clipfrac` (the clipped branch taken, verl's pg_clipfrac), `clip/pg_clipfrac_lower` (the
     dual-clip bound taken), `approx_kl/k1` (verl's ppo_kl) and `approx_kl/k3`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


# ---------------------------------------------------------------------------------------------
# Masked statistics
# ---------------------------------------------------------------------------------------------


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp_min(1)


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, reduce_sum=_identity) -> torch.Tensor:
    """Zero mean, unit variance over the masked entries; `reduce_sum` sums over ranks, for the global statistics."""
    count = reduce_sum((mask.sum()).float())
    mean = reduce_sum((x * mask).sum()) / count
    var = reduce_sum((((x - mean) ** 2) * mask).sum()) / count
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    return (out if shift_mean else out + mean) * mask


def _groups(groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(index of each response's group in 0..G-1 [N], size of each group [G])."""
    _, inverse, counts = torch.unique(groups, return_inverse=True, return_counts=True)
    return inverse, counts


def _group_sum(x: torch.Tensor, inverse: torch.Tensor, n_groups: int) -> torch.Tensor:
    return torch.zeros(n_groups, dtype=x.dtype, device=x.device).index_add_(0, inverse, x)


def _refuse_lone_samples(estimator: str, groups: torch.Tensor, counts: torch.Tensor) -> None:
    if (counts < 2).any():
        lone = torch.unique(groups)[counts < 2][0].item()
        raise ValueError(f"advantage estimator {estimator} compares the samples of a prompt, but group {lone} has "
                         "one sample: set ppo.samples_per_prompt to 2 or more")


# ---------------------------------------------------------------------------------------------
# KL to the reference
# ---------------------------------------------------------------------------------------------


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from tokens sampled from pi (Schulman's k1, k2, k3).

    As a reward (no gradient) any of them estimates the KL. As a loss term only k2 and k3 have useful
    gradients: on-policy, E[grad k2] = grad KL(pi || pi_ref) and E[grad k3] = grad KL(pi_ref || pi); the
    gradient of k1 is grad log pi, whose expectation is zero whatever the reference.
    k3 is clamped to [-10, 10] as verl (point 4): a token the reference finds far likelier than pi
    (log pi_ref / pi > ~2.4) would otherwise dominate the loss with a gradient of e^(log pi_ref / pi).
    """
    log_ratio = logp - ref_logp
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio**2
    if estimator == "k3":
        log_ratio = log_ratio.clamp(-20.0, 20.0)  # exp(20) is finite in every dtype we train in
        return (torch.expm1(-log_ratio) + log_ratio).clamp(-10.0, 10.0)
    raise ValueError(f"unknown KL estimator {estimator!r}; expected k1, k2 or k3")


def token_level_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """r_t = -kl_coef * KL_t on every response token, plus the response's score on its last real token."""
    rewards = -kl_coef * kl * mask
    last = (mask.sum(1).long() - 1).clamp_min(0)
    rewards[torch.arange(len(scores), device=scores.device), last] += scores
    return rewards


# ---------------------------------------------------------------------------------------------
# Advantage estimators: the maths, then the registry
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
    """Per response: the mean score of its group, or of the rest of its group (a lone sample: its own score,
    so its advantage is 0; ELO drops paths and meets lone samples)."""
    inverse, counts = _groups(groups)
    sums = _group_sum(scores, inverse, len(counts))[inverse]
    n = counts[inverse].to(scores.dtype)
    mean = sums / n
    if not leave_one_out:
        return mean
    return torch.where(n > 1, (sums - scores) / (n - 1).clamp_min(1), mean)


def grpo_advantages(scores, groups, mask, std_normalize: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """(r - group mean) / (group std + eps), the std unbiased as in the GRPO paper; Dr. GRPO drops the std."""
    inverse, counts = _groups(groups)
    _refuse_lone_samples("grpo" if std_normalize else "dr_grpo", groups, counts)
    n = counts.to(scores.dtype)
    centred = scores - (_group_sum(scores, inverse, len(counts)) / n)[inverse]
    if std_normalize:
        std = (_group_sum(centred**2, inverse, len(counts)) / (n - 1)).sqrt()
        centred = centred / (std[inverse] + eps)
    return centred[:, None] * mask


def rloo_advantages(scores, groups, mask) -> torch.Tensor:
    """r - the mean of the other samples of the prompt."""
    _refuse_lone_samples("rloo", groups, _groups(groups)[1])
    return (scores - group_baseline(scores, groups, leave_one_out=True))[:, None] * mask


def discounted_returns(token_rewards: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """G_t = sum_{s>=t, s real} gamma^(s-t) r_s, zero on padding (point 6: the running return is masked at the
    step it is formed, so a reward on the first padding position never reaches the last real token)."""
    returns = torch.zeros_like(token_rewards)
    running = torch.zeros_like(token_rewards[:, 0])
    for t in reversed(range(token_rewards.shape[1])):
        running = (token_rewards[:, t] + gamma * running) * mask[:, t]
        returns[:, t] = running
    return returns


def reinforce_pp_advantages(token_rewards, mask, gamma: float = 1.0, reduce_sum=_identity) -> torch.Tensor:
    """Discounted returns (the KL is in the token rewards), whitened over the batch (of every rank)."""
    return whiten(discounted_returns(token_rewards, mask, gamma), mask, reduce_sum=reduce_sum)


def reinforce_pp_baseline_advantages(token_rewards, groups, mask, reduce_sum=_identity) -> torch.Tensor:
    """REINFORCE++ with a group baseline: each response's return (its token rewards summed: the score and
    the KL reward, as verl's reinforce_plus_plus_baseline) minus its group's mean return, broadcast to its
    tokens and whitened over the batch's real tokens."""
    inverse, counts = _groups(groups)
    _refuse_lone_samples("reinforce_pp_baseline", groups, counts)
    returns = (token_rewards * mask).sum(1)
    centred = returns - (_group_sum(returns, inverse, len(counts)) / counts.to(returns.dtype))[inverse]
    return whiten(centred[:, None] * mask, mask, reduce_sum=reduce_sum)


@dataclass(frozen=True)
class AdvantageInputs:
    """What every registered estimator is called with; each reads the fields it needs."""

    scores: torch.Tensor  # [N] one reward per response
    groups: torch.Tensor  # [N] the prompt each response answers
    token_rewards: torch.Tensor  # [N, R] -kl_coef KL_t, plus the score on the last real token
    mask: torch.Tensor  # [N, R] 1 on real response tokens
    values: torch.Tensor | None = None  # [N, R] the critic's values (gae)
    gamma: float = 1.0
    lam: float = 0.95
    whiten_advantages: bool = True  # gae: whiten over the batch
    std_normalize: bool = True  # grpo: divide by the group's std (dr_grpo never does)
    eps: float = 1e-6
    reduce_sum: Callable[[torch.Tensor], torch.Tensor] = _identity  # sum over ranks, for batch statistics


Estimate = tuple[torch.Tensor, torch.Tensor | None]


@dataclass(frozen=True)
class AdvantageEstimator:
    name: str
    fn: Callable[[AdvantageInputs], Estimate]
    needs_critic: bool = False  # returns value targets; the loop trains a critic
    needs_groups: bool = False  # compares the samples of a prompt: ppo.samples_per_prompt >= 2

    def __call__(self, inputs: AdvantageInputs) -> Estimate:
        return self.fn(inputs)


class Registry(dict):
    """Entries by their paper's name (verl's register_adv_est / agg_loss): registered once, and an unknown
    name is a one-line error that lists the registered ones."""

    def __init__(self, what: str, entry: Callable[..., Any] = lambda name, fn: fn):
        super().__init__()
        self.what, self.entry = what, entry

    def register(self, name: str, **properties):
        """Decorator: register the function under `name` (with the entry's properties, e.g. needs_critic)."""
        def decorate(fn):
            if name in self:
                raise ValueError(f"{self.what} {name} is registered twice")
            self[name] = self.entry(name, fn, **properties)
            return fn

        return decorate

    def lookup(self, name: str):
        if name not in self:
            raise ValueError(f"unknown {self.what} {name!r}; registered: {', '.join(self)}")
        return self[name]


_ADVANTAGE_ESTIMATORS = Registry("advantage estimator", AdvantageEstimator)
register_advantage_estimator = _ADVANTAGE_ESTIMATORS.register


def advantage_estimators() -> tuple[str, ...]:
    return tuple(_ADVANTAGE_ESTIMATORS)


def advantage_estimator(name: str) -> AdvantageEstimator:
    return _ADVANTAGE_ESTIMATORS.lookup(name)


@register_advantage_estimator("gae", needs_critic=True)
def _gae(x: AdvantageInputs) -> Estimate:
    if x.values is None:
        raise ValueError("advantage estimator gae needs the critic's values")
    advantages, returns = gae(x.token_rewards, x.values, x.mask, x.gamma, x.lam)
    # the value targets are the unwhitened returns
    return (whiten(advantages, x.mask, reduce_sum=x.reduce_sum) if x.whiten_advantages else advantages), returns


@register_advantage_estimator("grpo", needs_groups=True)
def _grpo(x: AdvantageInputs) -> Estimate:
    return grpo_advantages(x.scores, x.groups, x.mask, x.std_normalize, x.eps), None


@register_advantage_estimator("dr_grpo", needs_groups=True)
def _dr_grpo(x: AdvantageInputs) -> Estimate:
    return grpo_advantages(x.scores, x.groups, x.mask, std_normalize=False), None


@register_advantage_estimator("rloo", needs_groups=True)
def _rloo(x: AdvantageInputs) -> Estimate:
    return rloo_advantages(x.scores, x.groups, x.mask), None


@register_advantage_estimator("reinforce_pp")
def _reinforce_pp(x: AdvantageInputs) -> Estimate:
    return reinforce_pp_advantages(x.token_rewards, x.mask, x.gamma, x.reduce_sum), None


@register_advantage_estimator("reinforce_pp_baseline", needs_groups=True)
def _reinforce_pp_baseline(x: AdvantageInputs) -> Estimate:
    return reinforce_pp_baseline_advantages(x.token_rewards, x.groups, x.mask, x.reduce_sum), None


# what rl/ppo.py imports today; `advantage_estimator(name).needs_critic` replaces it


# ---------------------------------------------------------------------------------------------
# Loss aggregation
# ---------------------------------------------------------------------------------------------

# every aggregation: (per-token losses [N, R], mask [N, R], fixed length L or None, mean_over_ranks or None) -> scalar
Aggregation = Callable[..., torch.Tensor]
_LOSS_AGGREGATIONS = Registry("loss aggregation")
register_loss_aggregation = _LOSS_AGGREGATIONS.register


def loss_aggregations() -> tuple[str, ...]:
    return tuple(_LOSS_AGGREGATIONS)


def loss_aggregation(name: str) -> Aggregation:
    return _LOSS_AGGREGATIONS.lookup(name)


def _count(count: torch.Tensor, mean_over_ranks) -> torch.Tensor:
    """This rank's count, or the ranks' mean count: averaging the ranks' gradients then gives the mean over
    the global batch (dividing by the local count would weigh a token on a rank with short responses more)."""
    return count.float().clamp_min(1) if mean_over_ranks is None else mean_over_ranks(count.float()).clamp_min(1e-6)


def _fixed_length(name: str, length: int | None) -> int:
    if not length:
        raise ValueError(f"loss_agg_mode {name} needs a fixed length (rollout.max_new_tokens or ppo.loss_scale_factor)")
    return length


@register_loss_aggregation("token_mean")
def _token_mean(loss, mask, length=None, mean_over_ranks=None):
    return (loss * mask).sum() / _count(mask.sum(), mean_over_ranks)


@register_loss_aggregation("seq_mean_token_mean")
def _seq_mean_token_mean(loss, mask, length=None, mean_over_ranks=None):
    tokens = mask.sum(1)
    per_seq = (loss * mask).sum(1) / tokens.clamp_min(1)
    return per_seq.sum() / _count((tokens > 0).sum(), mean_over_ranks)  # point 1: rows with tokens only


@register_loss_aggregation("seq_mean_token_sum")
def _seq_mean_token_sum(loss, mask, length=None, mean_over_ranks=None):
    return (loss * mask).sum() / _count((mask.sum(1) > 0).sum(), mean_over_ranks)  # point 1


@register_loss_aggregation("token_sum_norm")
def _token_sum_norm(loss, mask, length=None, mean_over_ranks=None):
    """Dr. GRPO (Liu et al. 2025): a constant N x L, so no response's tokens weigh more for being short."""
    rows = _count(loss.new_tensor(float(loss.shape[0])), mean_over_ranks)
    return (loss * mask).sum() / (rows * _fixed_length("token_sum_norm", length))


@register_loss_aggregation("seq_mean_token_sum_norm")
def _seq_mean_token_sum_norm(loss, mask, length=None, mean_over_ranks=None):
    """verl's seq-mean-token-sum-norm: sum / loss_scale_factor, without 1/N (despite the name), so the step
    grows with the batch; per rank, as in verl."""
    return (loss * mask).sum() / _fixed_length("seq_mean_token_sum_norm", length)


def agg_loss(loss: torch.Tensor, mask: torch.Tensor, mode: str, max_length: int | None = None,
             mean_over_ranks: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Reduce per-token losses [N, R] to a scalar by the registered aggregation `mode`. `max_length`: the
    fixed length L of the *_norm modes; `mean_over_ranks` (data parallel): divide by the ranks' mean count."""
    return loss_aggregation(mode)(loss, mask, max_length, mean_over_ranks)


# ---------------------------------------------------------------------------------------------
# The policy and value losses
# ---------------------------------------------------------------------------------------------


def policy_loss(logp, old_logp, advantages, mask, clip_low: float, clip_high: float, agg: str = "token_mean",
                max_length: int | None = None, weights: torch.Tensor | None = None, mean_over_ranks=None,
                clip_ratio_c: float | None = None):
    """Clipped surrogate -min(ratio A, clip(ratio, 1 - clip_low, 1 + clip_high) A) per token, with dual-clip
    (Ye et al. 2020, point 3) for A < 0: the loss is at most -clip_ratio_c A, so a token whose ratio has run
    past c under a negative advantage stops pushing; aggregated by `agg`.
    `weights` [N, R] multiply each token's loss (the importance weights of `rollout_correction`).
    Diagnostics (point 8), over real tokens: clip/ratio_outside_fraction (ratio outside the band),
    clip/pg_clipfrac (the clipped branch taken, verl's pg_clipfrac), clip/pg_clipfrac_lower (the dual-clip
    bound taken), approx_kl/k1 = mean(log pi_old - log pi) (verl's ppo_kl), approx_kl/k3 = mean(ratio - 1 - log ratio)."""
    if clip_ratio_c is not None and clip_ratio_c <= 1:
        raise ValueError(f"clip_ratio_c={clip_ratio_c} must be above 1 (dual-clip caps ratios above it)")
    log_ratio = (logp - old_logp).clamp(-20.0, 20.0)  # as verl: exp cannot overflow into inf * 0 = nan gradients
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_low, 1 + clip_high)
    losses = torch.max(unclipped, clipped)
    if clip_ratio_c is not None:
        dual = -advantages * clip_ratio_c
        dual_taken = (advantages < 0) & (losses > dual)
        losses = torch.where(advantages < 0, torch.min(losses, dual), losses)
    if weights is not None:
        losses = losses * weights
    loss = agg_loss(losses, mask, agg, max_length, mean_over_ranks)
    with torch.no_grad():
        stats = {
            "clip/ratio_outside_fraction": masked_mean(((ratio < 1 - clip_low) | (ratio > 1 + clip_high)).float(), mask),
            "clip/pg_clipfrac": masked_mean((clipped > unclipped).float(), mask),
            "clip/pg_clipfrac_lower": masked_mean(dual_taken.float(), mask) if clip_ratio_c is not None
            else torch.zeros((), device=logp.device),
            "approx_kl/k1": masked_mean(-log_ratio, mask),  # k1 estimate of KL(pi_old || pi)
            "approx_kl/k3": masked_mean(ratio - 1 - log_ratio, mask),  # k3 estimate of KL(pi_old || pi)
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
# DAPO's refinements
# ---------------------------------------------------------------------------------------------


def overlong_penalty(lengths: torch.Tensor, max_new_tokens: int, buffer: int, penalty: float) -> torch.Tensor:
    """DAPO's soft overlong punishment: 0 up to max - buffer tokens, then falling linearly to -penalty at max."""
    if buffer <= 0:
        return torch.zeros_like(lengths, dtype=torch.float)
    over = (lengths.float() - (max_new_tokens - buffer)).clamp_min(0)
    return -penalty * (over / buffer).clamp(max=1.0)


def equal_reward_groups(scores: torch.Tensor, groups: torch.Tensor, atol: float = 1e-6) -> torch.Tensor:
    """[N] bool: True where every response of the group got the same score (zero advantage: no signal)."""
    out = torch.zeros_like(scores, dtype=torch.bool)
    for g in groups.unique():
        idx = groups == g
        out[idx] = bool((scores[idx].max() - scores[idx].min()) <= atol)
    return out


# ---------------------------------------------------------------------------------------------
# The engine/trainer mismatch: importance sampling between the sampler and the trainer
#
# Both log-probs are of the tokens the engine sampled, and must be of the same distribution: for an
# unbiased correction, the one the engine sampled from (its temperature; vLLM's processed log-probs).
# Sources: Yao et al. 2025 (truncated IS, "Your efficient RL framework secretly brings you off-policy RL
# training"); Liu, Li et al. 2025 ("When speed kills stability", sequence-level and masked IS); verl's
# rollout correction (rollout_is / rollout_rs: token and sequence levels, lower bound 1/upper by default).
# ---------------------------------------------------------------------------------------------


def tis_weights(trainer_logp: torch.Tensor, engine_logp: torch.Tensor, cap: float) -> torch.Tensor:
    """Token-level truncated importance sampling: min(pi_trainer(y_t) / pi_engine(y_t), cap), no gradient."""
    return torch.exp(trainer_logp.detach() - engine_logp).clamp(max=cap)


def _rows_with_tokens(mask: torch.Tensor) -> torch.Tensor:
    return mask.sum(1) > 0


def _seq_fraction(flag: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    return (flag & rows).sum().float() / rows.sum().clamp_min(1)


def truncated_importance_weights(trainer_logp, engine_logp, mask, cap: float, level: str = "token"):
    """(weights [N, R], stats). token: min(pi_trainer(y_t) / pi_engine(y_t), cap) per token; sequence: one
    weight per response, min(prod_t pi_trainer(y_t) / pi_engine(y_t), cap) = min(exp(sum_t log ratio_t), cap)
    over its real tokens, on all its tokens (as exp of the summed log ratio: a product of 1000 token ratios
    under- or overflows).
    stats mismatch/tis_truncated_fraction: the tokens (token) or responses (sequence) whose weight hit the cap."""
    log_ratio = (trainer_logp.detach() - engine_logp) * mask
    if level == "token":
        weights = tis_weights(trainer_logp, engine_logp, cap) * mask
        return weights, {"mismatch/tis_truncated_fraction": masked_mean((log_ratio > math.log(cap)).float(), mask)}
    if level == "sequence":
        seq_log_ratio = log_ratio.sum(1)
        weights = torch.exp(seq_log_ratio.clamp(max=math.log(cap)))[:, None] * mask
        truncated = _seq_fraction(seq_log_ratio > math.log(cap), _rows_with_tokens(mask))
        return weights, {"mismatch/tis_truncated_fraction": truncated}
    raise ValueError(f"unknown importance sampling level {level!r}; expected token or sequence")


def masked_importance_sampling(trainer_logp, engine_logp, mask, low: float, high: float, level: str = "token"):
    """(mask [N, R], stats): the loss mask without the tokens (token) or whole responses (sequence) whose
    engine-vs-trainer ratio, per token or the product over the response, leaves [low, high].
    stats: mismatch/mis_masked_token_fraction (real tokens dropped), mismatch/mis_masked_seq_fraction
    (responses with at least one token dropped; at sequence level, the responses dropped)."""
    if not 0 < low < 1 < high:
        raise ValueError(f"masked importance sampling needs 0 < low < 1 < high, got [{low}, {high}]")
    log_ratio = (trainer_logp.detach() - engine_logp) * mask
    if level == "token":
        keep = (log_ratio >= math.log(low)) & (log_ratio <= math.log(high))
    elif level == "sequence":
        seq_log_ratio = log_ratio.sum(1, keepdim=True)
        keep = ((seq_log_ratio >= math.log(low)) & (seq_log_ratio <= math.log(high))).expand_as(mask)
    else:
        raise ValueError(f"unknown importance sampling level {level!r}; expected token or sequence")
    new_mask = mask * keep.to(mask.dtype)
    dropped = (mask - new_mask).sum(1) > 0
    stats = {"mismatch/mis_masked_token_fraction": masked_mean(mask - new_mask, mask),
             "mismatch/mis_masked_seq_fraction": _seq_fraction(dropped, _rows_with_tokens(mask))}
    return new_mask, stats


def rollout_correction(trainer_logp, engine_logp, mask, tis_cap: float | None = None, tis_level: str = "token",
                       mis_level: str = "off", mis_low: float = 0.5, mis_high: float = 2.0):
    """Both corrections as configured (ppo.tis_cap / tis_level, ppo.mis_level / mis_low / mis_high):
    (weights [N, R] or None, loss mask [N, R], stats). Masked tokens carry no loss and do not count in the
    aggregation's denominators (a response masked entirely drops out of the seq_mean modes)."""
    stats: dict[str, torch.Tensor] = {}
    if mis_level != "off":
        mask, stats = masked_importance_sampling(trainer_logp, engine_logp, mask, mis_low, mis_high, mis_level)
    weights = None
    if tis_cap is not None:
        weights, tis_stats = truncated_importance_weights(trainer_logp, engine_logp, mask, tis_cap, tis_level)
        stats.update(tis_stats)
    return weights, mask, stats
