"""`m1-align ppo`: PPO with rule rewards, the medical reward model and vLLM rollouts.

One step, as in Ziegler et al. (2019) / Ouyang et al. (2022), written the CleanRL way:
    1. sample responses y ~ pi_old(. | x) through the rollout engine
    2. recompute in the trainer: old log-probs, reference log-probs, values V(s_t)
    3. score:   reward r_T from the reward router (rule or reward model), minus a penalty without EOS
                per-token reward  r_t = -kl_coef * KL_t  (+ r_T on the last token)
    4. GAE:     delta_t = r_t + gamma V_{t+1} - V_t,  A_t = delta_t + gamma lam A_{t+1},  R_t = A_t + V_t
    5. for each epoch and minibatch (stop the epoch early if approx KL passes its limit):
                ratio = exp(log pi - log pi_old)
                policy loss  = mean max(-A ratio, -A clip(ratio, 1-eps, 1+eps))
                value loss   = 0.5 mean max((V - R)^2, (clip(V, V_old-eps_v, V_old+eps_v) - R)^2)
                loss = policy loss + vf_coef value loss - entropy_coef entropy
    6. push the new weights into the engine and check that they arrived
Prompts are left-padded and responses right-padded, so every response starts in the same column.
"""

from __future__ import annotations

import math
import time

import torch

from m1_align.config import ConfigError, PPOConfig
from m1_align.data.stage_data import eval_rows, rl_rows
from m1_align.evaluation.benchmarks import prompt_ids
from m1_align.reward_models.router import RewardRouter
from m1_align.rl.common import TokenValues
from m1_align.rl.loop import OnlineLoop
from m1_align.training import load_model, resolve_model_dir

# ---------------------------------------------------------------------------------------------
# The algorithm, as functions of tensors shaped [batch, response length]
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


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token KL(pi || pi_ref) estimate from sampled tokens (Schulman's k1 or k3)."""
    log_ratio = logp - ref_logp
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}; expected k1 or k3")


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


def ppo_losses(logp, old_logp, advantages, values, old_values, returns, mask, clip_range: float, value_clip_range: float):
    """Clipped policy and value losses, and the diagnostics PPO users watch."""
    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio)
    pg_losses = torch.max(-advantages * ratio, -advantages * ratio.clamp(1 - clip_range, 1 + clip_range))
    policy_loss = masked_mean(pg_losses, mask)
    values_clipped = old_values + (values - old_values).clamp(-value_clip_range, value_clip_range)
    value_loss = 0.5 * masked_mean(torch.max((values - returns) ** 2, (values_clipped - returns) ** 2), mask)
    with torch.no_grad():
        stats = {
            "clip_fraction": masked_mean(((ratio - 1).abs() > clip_range).float(), mask),
            "approx_kl": masked_mean(ratio - 1 - log_ratio, mask),  # k3 estimate of KL(pi_old || pi)
        }
    return policy_loss, value_loss, stats


class AdaptiveKLController:
    """Ziegler et al. (2019): move the KL coefficient so the measured KL tracks a target."""

    def __init__(self, coef: float, target: float | None, horizon: int = 10000):
        self.coef, self.target, self.horizon = coef, target, horizon

    def update(self, kl: float, n_samples: int) -> None:
        if self.target is None:
            return
        error = max(min(kl / self.target - 1, 0.2), -0.2)
        self.coef *= 1 + error * n_samples / self.horizon


# ---------------------------------------------------------------------------------------------
# Forward passes over the response columns
# ---------------------------------------------------------------------------------------------


def positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).clamp_min(0)


def response_logprobs(model, ids, mask, start: int, with_entropy: bool = False):
    """log pi of the response tokens (columns start..end) and optionally the entropy: [B, R]."""
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask), use_cache=False).logits
    logits = logits[:, start - 1 : -1].float()  # position t predicts token t+1
    logp_all = logits.log_softmax(-1)
    logp = logp_all.gather(-1, ids[:, start:].unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1) if with_entropy else None
    return logp, entropy


def response_values(critic, ids, mask, start: int) -> torch.Tensor:
    """V(s_t) for the state before each response token: [B, R]. `critic` is a TokenValues module."""
    return critic(ids, mask, positions(mask))[:, start - 1 : -1]


# ---------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------


class PPOLoop(OnlineLoop):
    stage = "ppo"
    cfg: PPOConfig

    def setup(self) -> None:
        cfg = self.cfg
        self.rows = rl_rows(cfg)
        self.eval_set = eval_rows(cfg, cfg.train.eval_limit)
        self.kl_ctl = AdaptiveKLController(cfg.ppo.kl_coef, cfg.ppo.adaptive_kl_target)
        reward_model = None
        if cfg.reward.model:
            reward_model = load_model(cfg.model.model_copy(update={"gradient_checkpointing": False}), kind="seq_cls",
                                      model_dir=resolve_model_dir(cfg.reward.model), num_labels=1)
            reward_model.requires_grad_(False).eval().to(self.device)
        self.router = RewardRouter(cfg.reward, reward_model, self.tokenizer, cfg.train.max_length)
        self.per_rank(cfg.ppo.prompts_per_step, "ppo.prompts_per_step")
        self.minibatch_size = self.per_rank(cfg.ppo.minibatch_size, "ppo.minibatch_size")  # on this rank

    def setup_trainables(self) -> None:
        cfg = self.cfg
        source = cfg.reward.model if cfg.ppo.critic_from == "reward_model" else cfg.model.path
        if source is None:
            raise ConfigError("ppo.critic_from=reward_model needs reward.model to be set")
        critic = load_model(cfg.model.model_copy(update={"lora": cfg.model.lora.model_copy(update={"enabled": False})}),
                            kind="seq_cls", model_dir=resolve_model_dir(source), num_labels=1)
        if cfg.ppo.critic_from == "policy":
            torch.nn.init.zeros_(critic.score.weight)  # start from V = 0 rather than a random head
        self.add_trainable("critic", TokenValues(critic), cfg.ppo.critic_learning_rate)

    def total_steps(self) -> int:
        if self.cfg.train.max_steps > 0:
            return self.cfg.train.max_steps
        return math.ceil(len(self.rows) * self.cfg.train.num_epochs / self.cfg.ppo.prompts_per_step)

    def updates_per_step(self) -> int:
        p = self.cfg.ppo
        return p.ppo_epochs * math.ceil(p.prompts_per_step * p.samples_per_prompt / p.minibatch_size)

    def extra_state(self) -> dict:
        return {"kl_coef": self.kl_ctl.coef}

    def load_extra_state(self, state: dict) -> None:
        self.kl_ctl.coef = state["kl_coef"]

    def rollout(self, rows: list[dict]):
        """Sample, then build the padded batch: ids [N, P+R], mask, response mask [N, R], finish reasons."""
        tok, p = self.tokenizer, self.cfg.ppo
        prompts = [prompt_ids(tok, r["prompt"]) for r in rows]
        samples = self.engine.generate(prompts, self.sampling(n=p.samples_per_prompt))
        flat = [(row, prompt, c) for row, prompt, cs in zip(rows, prompts, samples, strict=True) for c in cs]
        width_p = max(len(prompt) for _, prompt, _ in flat)
        width_r = max(max(len(c.token_ids) for _, _, c in flat), 1)
        ids = torch.full((len(flat), width_p + width_r), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, (_, prompt, c) in enumerate(flat):
            ids[i, width_p - len(prompt) : width_p] = torch.tensor(prompt)
            ids[i, width_p : width_p + len(c.token_ids)] = torch.tensor(c.token_ids, dtype=torch.long)
            mask[i, width_p - len(prompt) : width_p + len(c.token_ids)] = 1
        return flat, ids.to(self.device), mask.to(self.device), width_p

    def step(self, step: int) -> dict[str, float]:
        p = self.cfg.ppo
        critic = self.trainables["critic"].model
        rows = self.shard(self.prompt_batch(step, p.prompts_per_step))  # this rank's prompts
        t0 = time.time()
        flat, ids, mask, start = self.rollout(rows)
        response_mask = mask[:, start:].float()
        t1 = time.time()

        with torch.no_grad():
            old_logp, _ = response_logprobs(self.policy, ids, mask, start)
            with self.reference_context():
                ref_logp, _ = response_logprobs(self.reference_model, ids, mask, start)
            old_values = response_values(critic, ids, mask, start) * response_mask
            texts = [c.text for _, _, c in flat]
            lengths = [len(c.token_ids) for _, _, c in flat]
            rewards = self.router([row for row, _, _ in flat], texts, lengths)
            scores = torch.tensor([r.value for r in rewards], device=self.device)
            no_eos = torch.tensor([c.finish_reason != "stop" for _, _, c in flat], device=self.device)
            scores = scores - p.missing_eos_penalty * no_eos.float()
            kl = kl_penalty(old_logp, ref_logp, p.kl_estimator) * response_mask
            token_rewards = -self.kl_ctl.coef * kl
            last = (response_mask.sum(1).long() - 1).clamp_min(0)
            token_rewards[torch.arange(len(flat)), last] += scores
            advantages, returns = gae(token_rewards, old_values, response_mask, p.gamma, p.lam)
            if p.whiten_advantages:
                advantages = whiten(advantages, response_mask, reduce_sum=self.reduce_sum)
        t2 = time.time()

        stats: dict[str, list[float]] = {"policy_loss": [], "value_loss": [], "entropy": [], "clip_fraction": [], "approx_kl": []}
        early_stop = False
        for _ in range(p.ppo_epochs):
            order = torch.randperm(len(flat))
            for batch in order.split(self.minibatch_size):
                logp, entropy = response_logprobs(self.policy, ids[batch], mask[batch], start, with_entropy=True)
                values = response_values(critic, ids[batch], mask[batch], start)
                m = response_mask[batch]
                policy_loss, value_loss, s = ppo_losses(
                    logp, old_logp[batch], advantages[batch], values, old_values[batch], returns[batch], m,
                    p.clip_range, p.value_clip_range,
                )
                entropy_mean = masked_mean(entropy, m)
                # loss = policy loss + vf_coef value loss - entropy_coef entropy; actor and critic share no weights
                self.optimizer_step({"policy": policy_loss - p.entropy_coef * entropy_mean, "critic": p.vf_coef * value_loss})
                for key, value in (("policy_loss", policy_loss), ("value_loss", value_loss), ("entropy", entropy_mean), *s.items()):
                    stats[key].append(value.item())
                approx_kl = self.reduce_sum(s["approx_kl"]) / self.world_size  # every rank stops together
                if p.target_approx_kl is not None and approx_kl > p.target_approx_kl:
                    early_stop = True
                    break
            if early_stop:
                break
        t3 = time.time()
        sync_diff = self.sync_engine(ids[0, mask[0].bool()].tolist()[:64])
        t4 = time.time()

        mean_kl = (self.reduce_sum(kl.sum()) / (len(flat) * self.world_size)).item()  # per response, over all ranks
        self.kl_ctl.update(mean_kl, len(flat) * self.world_size)
        var_returns = torch.var(returns[response_mask.bool()])
        explained = 1 - torch.var((returns - old_values)[response_mask.bool()]) / var_returns.clamp_min(1e-8)
        metrics = {k: sum(v) / len(v) for k, v in stats.items() if v}
        by_source: dict[str, list[float]] = {}
        for r in rewards:
            by_source.setdefault(r.source, []).append(r.value)
        metrics.update({f"reward/{k}": sum(v) / len(v) for k, v in by_source.items()})
        metrics.update(
            {
                "reward/mean": scores.mean().item(),
                "kl": mean_kl,
                "kl_coef": self.kl_ctl.coef,
                "explained_variance": explained.item(),
                "response_length": sum(lengths) / len(lengths),
                "eos_rate": 1 - no_eos.float().mean().item(),
                "sync/logprob_diff": sync_diff,
                "early_stopped": float(early_stop),
                "time/generate": t1 - t0,
                "time/score": t2 - t1,
                "time/train": t3 - t2,
                "time/sync": t4 - t3,
            }
        )
        return metrics


def run(cfg: PPOConfig):
    return PPOLoop(cfg, needs_reference=True).run()
