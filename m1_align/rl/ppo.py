"""`m1-align ppo` and `m1-align grpo`: policy-gradient RL with rule rewards, the medical reward model and
vLLM rollouts. One stage, the advantage estimator chosen by name (rl/algorithms.py): GAE with a critic
(PPO, Ziegler et al. 2019 / Ouyang et al. 2022) or a critic-free one (GRPO, RLOO, REINFORCE++), with
DAPO's refinements as options. Written the CleanRL way:
    1. sample n responses per prompt y ~ pi_old,T(. | x) through the rollout engine (temperature T)
       (dynamic sampling: drop prompts whose n responses all scored the same, draw more)
    2. recompute in the trainer: old log-probs, reference log-probs (both of the sampled distribution,
       logits / T), values V(s_t) when the estimator has a critic
    3. score:   reward r_T from the reward router (rule or reward model), minus a penalty without EOS,
                minus the soft overlong penalty; per-token reward r_t = -kl_coef * KL_t (+ r_T on the last token)
    4. advantages: GAE (and returns R_t = A_t + V_t), or group / batch baselines without a critic
    5. for each epoch and minibatch (stop the epoch early if approx KL passes its limit):
                ratio = exp(log pi_T - log pi_old,T)
                policy loss  = agg max(-A ratio, -A clip(ratio, 1 - eps_low, 1 + eps_high))  [x TIS weight]
                value loss   = 0.5 mean max((V - R)^2, (clip(V, V_old-eps_v, V_old+eps_v) - R)^2)
                loss = policy loss + kl_loss_coef KL_k3 - entropy_coef entropy;  vf_coef value loss (critic)
    6. push the new weights into the engine and check that they arrived
Prompts are left-padded and responses right-padded, so every response starts in the same column.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass

import torch
from accelerate.utils import gather_object

from m1_align.config import ConfigError, PPOConfig
from m1_align.data.chat import prompt_ids
from m1_align.logprobs import causal_lm_logprobs, pack_rows
from m1_align.rewards.router import RewardRouter
from m1_align.rl.algorithms import (
    CRITIC_ESTIMATORS,
    agg_loss,
    equal_reward_groups,
    gae,
    grpo_advantages,
    kl_penalty,
    masked_mean,
    overlong_penalty,
    policy_loss,
    reinforce_pp_advantages,
    rloo_advantages,
    tis_weights,
    token_level_rewards,
    value_loss,
    whiten,
)
from m1_align.rl.loop import OnlineLoop
from m1_align.rollout.engine import Completion
from m1_align.stage_data import eval_rows, rl_rows
from m1_align.training import load_model, resolve_model_dir


class TokenValues(torch.nn.Module):
    """PPO's critic: a sequence-classification model's `score` head read at every token, V(s_t) = score(h_t).
    A module of its own so DDP and DeepSpeed see the whole critic forward."""

    def __init__(self, pretrained: torch.nn.Module):
        super().__init__()
        self.pretrained = pretrained

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        hidden = self.pretrained.base_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                            use_cache=False).last_hidden_state
        return self.pretrained.score(hidden).squeeze(-1).float()  # [B, T]

    def save_pretrained(self, *args, **kwargs):
        return self.pretrained.save_pretrained(*args, **kwargs)


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


def response_logprobs(model, ids, mask, start: int, temperature: float = 1.0, with_entropy: bool = False,
                      with_raw: bool = False, pack: bool = False):
    """log pi_T of the response tokens (columns start..end) [B, R], pi_T = softmax(logits / T); optionally the
    entropy of pi_T and the temperature-1 log-probs (the model's own distribution). The output head runs on
    the response positions only, in chunks (causal_lm_logprobs)."""
    return causal_lm_logprobs(model, ids, mask, start, temperature, position_ids=positions(mask), with_raw=with_raw,
                              with_entropy=with_entropy, pack=pack)


def response_values(critic, ids, mask, start: int) -> torch.Tensor:
    """V(s_t) for the state before each response token: [B, R]. `critic` is a TokenValues module."""
    return critic(ids, mask, positions(mask))[:, start - 1 : -1]


# ---------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------


@dataclass
class Sample:
    """One sampled response and its score (rule, reward model, penalties)."""

    row: dict
    prompt: list[int]
    completion: Completion
    score: float
    source: str


class PPOLoop(OnlineLoop):
    stage = "ppo"
    cfg: PPOConfig

    @property
    def has_critic(self) -> bool:
        return self.cfg.ppo.advantage_estimator in CRITIC_ESTIMATORS

    def setup(self) -> None:
        cfg, p = self.cfg, self.cfg.ppo
        if p.advantage_estimator in ("grpo", "rloo") and p.samples_per_prompt < 2:
            raise ConfigError(f"ppo.advantage_estimator={p.advantage_estimator} compares the samples of a prompt: "
                              "set ppo.samples_per_prompt to 2 or more")
        self.rows = rl_rows(cfg)
        self.eval_set = eval_rows(cfg, cfg.train.eval_limit, split="dev")
        self.kl_ctl = AdaptiveKLController(p.kl_coef, p.adaptive_kl_target)
        reward_model = None
        if cfg.reward.model:
            reward_model = load_model(cfg.model.model_copy(update={"gradient_checkpointing": False}), kind="seq_cls",
                                      model_dir=resolve_model_dir(cfg.reward.model), num_labels=1)
            reward_model.requires_grad_(False).eval().to(self.device)
        self.router = RewardRouter(cfg.reward, reward_model, self.tokenizer, cfg.train.max_length)
        self.prompts_per_rank = self.per_rank(p.prompts_per_step, "ppo.prompts_per_step")
        self.minibatch_size = self.per_rank(p.minibatch_size, "ppo.minibatch_size")  # on this rank

    def setup_trainables(self) -> None:
        cfg = self.cfg
        if not self.has_critic:  # critic-free estimators load and train no value model
            return
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

    # -- sampling and scoring ----------------------------------------------------------------------
    def sample_and_score(self, rows: list[dict], draw: int = 0) -> list[Sample]:
        """n responses per prompt with their scores, prompt by prompt."""
        tok, p = self.tokenizer, self.cfg.ppo
        prompts = [prompt_ids(tok, r["prompt"]) for r in rows]
        completions = self.engine.generate(prompts, self.sampling(n=p.samples_per_prompt, prompts=len(rows), draw=draw))
        flat = [(row, prompt, c) for row, prompt, cs in zip(rows, prompts, completions, strict=True) for c in cs]
        rewards = self.router([row for row, _, _ in flat], [c.text for _, _, c in flat], [len(c.token_ids) for _, _, c in flat])
        lengths = torch.tensor([len(c.token_ids) for _, _, c in flat])
        no_eos = torch.tensor([c.finish_reason != "stop" for _, _, c in flat], dtype=torch.float)
        scores = torch.tensor([r.value for r in rewards]) - p.missing_eos_penalty * no_eos
        scores = scores + overlong_penalty(lengths, self.cfg.rollout.max_new_tokens, p.overlong_buffer, p.overlong_penalty)
        return [Sample(row, prompt, c, score, r.source) for (row, prompt, c), score, r in zip(flat, scores.tolist(), rewards, strict=True)]

    def rollout(self, step: int) -> tuple[list[Sample], dict[str, float]]:
        """This rank's samples for the step. With dynamic sampling, prompts whose samples all scored the same
        (no advantage, no gradient) are dropped and more prompts are drawn, up to ppo.max_sampling_rounds."""
        p, n = self.cfg.ppo, self.cfg.ppo.samples_per_prompt
        rows = self.shard(self.prompt_batch(step, p.prompts_per_step))
        samples = self.sample_and_score(rows)
        if not p.dynamic_sampling:
            return samples, {}
        kept, dropped, rounds = [], 0, 0
        while True:
            rounds += 1
            no_signal = equal_reward_groups(torch.tensor([s.score for s in samples]), torch.arange(len(samples)) // n)
            for start in range(0, len(samples), n):
                if no_signal[start]:
                    dropped += 1
                else:
                    kept += samples[start : start + n]
            # every rank draws as many rounds as the neediest one (engines and collectives stay in step)
            short = self.reduce_sum(torch.tensor(float(len(kept) < len(rows) * n)))
            if short.item() == 0 or rounds >= p.max_sampling_rounds:
                break
            draw = random.Random(f"{self.cfg.seed}-{step}-{rounds}-{self.accelerator.process_index}")
            samples = self.sample_and_score(draw.sample(self.rows, min(len(rows), len(self.rows))), draw=rounds)
        # every rank trains on as many samples (DDP and DeepSpeed step all ranks together)
        size = min(len(kept), len(rows) * n)
        if self.world_size > 1:
            size = min(gather_object([size]))
        metrics = {"dynamic/dropped_groups": float(dropped), "dynamic/rounds": float(rounds),
                   "dynamic/kept_fraction": size / (len(rows) * n)}
        return kept[:size], metrics

    def batch(self, samples: list[Sample]):
        """ids [N, P+R] (prompts left-padded, responses right-padded), mask, response start column, and the
        engine's log-probs [N, R]."""
        tok = self.tokenizer
        width_p = max(len(s.prompt) for s in samples)
        width_r = max(max(len(s.completion.token_ids) for s in samples), 1)
        ids = torch.full((len(samples), width_p + width_r), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        engine_logp = torch.zeros((len(samples), width_r))
        for i, (prompt, c) in enumerate((s.prompt, s.completion) for s in samples):
            ids[i, width_p - len(prompt) : width_p] = torch.tensor(prompt)
            ids[i, width_p : width_p + len(c.token_ids)] = torch.tensor(c.token_ids, dtype=torch.long)
            mask[i, width_p - len(prompt) : width_p + len(c.token_ids)] = 1
            engine_logp[i, : len(c.logprobs)] = torch.tensor(c.logprobs)
        return ids.to(self.device), mask.to(self.device), width_p, engine_logp.to(self.device)

    def advantages(self, scores, groups, token_rewards, old_values, response_mask):
        """(advantages, returns) by the configured estimator; returns is None without a critic."""
        p = self.cfg.ppo
        if p.advantage_estimator == "gae":
            advantages, returns = gae(token_rewards, old_values, response_mask, p.gamma, p.lam)
            if p.whiten_advantages:
                advantages = whiten(advantages, response_mask, reduce_sum=self.reduce_sum)
            return advantages, returns
        if p.advantage_estimator == "grpo":
            return grpo_advantages(scores, groups, response_mask, p.grpo_std_normalize), None
        if p.advantage_estimator == "rloo":
            return rloo_advantages(scores, groups, response_mask), None
        return reinforce_pp_advantages(token_rewards, response_mask, p.gamma, reduce_sum=self.reduce_sum), None

    # -- one step ------------------------------------------------------------------------------------
    def step(self, step: int) -> dict[str, float]:
        p, temperature = self.cfg.ppo, self.cfg.rollout.temperature or 1.0
        critic = self.trainables["critic"].model if self.has_critic else None
        t0 = time.time()
        samples, metrics = self.rollout(step)
        if self.reduce_sum(torch.tensor(float(not samples))).item() > 0:  # every rank steps, or none does
            return {**metrics, "skipped": 1.0}
        ids, mask, start, engine_logp = self.batch(samples)
        lengths = mask.sum(-1).tolist()  # what padding costs the forward passes, and what packing leaves of it
        metrics["batch/padding_fraction"] = 1 - sum(lengths) / mask.numel()
        metrics["batch/padding_fraction_packed"] = 1 - sum(lengths) / (len(pack_rows(lengths, max(lengths))) * max(lengths))
        response_mask = mask[:, start:].float()
        scores = torch.tensor([s.score for s in samples], device=self.device)
        groups = torch.arange(len(samples), device=self.device) // p.samples_per_prompt
        truncated = torch.tensor([s.completion.finish_reason != "stop" for s in samples], device=self.device)
        t1 = time.time()

        # One update per step and no KL in the reward: the sampling-time log-probs are those of the policy's
        # own training forward (detached), so the separate no-grad pass over the batch is skipped
        on_policy = p.ppo_epochs == 1 and len(samples) <= self.minibatch_size and p.kl_coef == 0
        with torch.no_grad():
            if on_policy:
                old_logp = old_raw = torch.zeros_like(response_mask)  # filled in by the training forward below
            else:
                old_logp, _, old_raw = response_logprobs(self.policy, ids, mask, start, temperature, with_raw=True, pack=self.pack)
            ref_logp = old_logp  # no KL anywhere: no reference model is kept
            if self.needs_reference:
                with self.reference_context():
                    ref_logp, _, _ = response_logprobs(self.reference_model, ids, mask, start, temperature, pack=self.pack)
            old_values = response_values(critic, ids, mask, start) * response_mask if critic is not None else None
            kl = kl_penalty(old_logp, ref_logp, p.kl_estimator) * response_mask
            token_rewards = token_level_rewards(scores, kl, response_mask, self.kl_ctl.coef)
            advantages, returns = self.advantages(scores, groups, token_rewards, old_values, response_mask)
            # the engine's own numerics against the trainer's, both of the model's (temperature-1) distribution
            mismatch = ((old_raw - engine_logp).abs() * response_mask)
            weights = tis_weights(old_raw, engine_logp, p.tis_cap) if p.tis_cap and not on_policy else None
            # DAPO's overlong filtering: truncated responses teach nothing about how to end
            loss_mask = response_mask * (~truncated[:, None]).float() if p.mask_truncated else response_mask
        t2 = time.time()

        stats: dict[str, list[float]] = {}
        early_stop = False
        max_length = self.cfg.rollout.max_new_tokens
        for _ in range(p.ppo_epochs):
            order = torch.randperm(len(samples))
            for batch in order.split(self.minibatch_size):
                logp, entropy, raw = response_logprobs(self.policy, ids[batch], mask[batch], start, temperature, with_entropy=True,
                                                        with_raw=on_policy, pack=self.pack)
                if on_policy:  # the whole batch in one minibatch, before any update
                    old_logp, old_raw = torch.zeros_like(logp), torch.zeros_like(raw)
                    old_logp[batch], old_raw[batch] = logp.detach(), raw.detach()
                    if not self.needs_reference:
                        ref_logp = old_logp
                    mismatch = (old_raw - engine_logp).abs() * response_mask
                    weights = tis_weights(old_raw, engine_logp, p.tis_cap) if p.tis_cap else None
                    kl = kl_penalty(old_logp, ref_logp, p.kl_estimator) * response_mask  # logged, not in the reward
                m = loss_mask[batch]
                # every per-token term (policy, entropy, KL loss; the value loss as a token mean) is aggregated
                # alike; under data parallelism token_mean divides by the global token count, so two ranks step
                # exactly as one process on the whole batch
                ranks = self.rank_mean if self.world_size > 1 else None
                pg_loss, s = policy_loss(
                    logp, old_logp[batch], advantages[batch], m, p.clip_range, p.clip_range_high or p.clip_range,
                    p.loss_agg_mode, max_length, None if weights is None else weights[batch], ranks,
                )
                losses = {"policy": pg_loss}
                if p.entropy_coef:
                    losses["policy"] = pg_loss - p.entropy_coef * agg_loss(entropy, m, p.loss_agg_mode, max_length, ranks)
                entropy_mean = masked_mean(entropy.detach(), m)
                if p.kl_loss_coef > 0:
                    kl_loss = agg_loss(kl_penalty(logp, ref_logp[batch], p.kl_loss_estimator), m, p.loss_agg_mode, max_length, ranks)
                    losses["policy"] = losses["policy"] + p.kl_loss_coef * kl_loss
                    s["kl_loss"] = kl_loss.detach()
                if critic is not None:
                    values = response_values(critic, ids[batch], mask[batch], start)
                    s["value_loss"] = value_loss(values, old_values[batch], returns[batch], m, p.value_clip_range, ranks)
                    losses["critic"] = p.vf_coef * s["value_loss"]
                # actor and critic share no weights: one backward each
                if "ratio/first_minibatch_max_dev" not in stats:
                    # before any update the ratio is exactly 1: a deviation means old log-probs from another
                    # distribution (other weights, temperature or dropout), which PPO's clip would act on silently
                    dev = ((logp.detach() - old_logp[batch]).exp() - 1).abs() * response_mask[batch]
                    stats["ratio/first_minibatch_max_dev"] = [dev.max().item()]
                self.optimizer_step(losses)
                for key, value in (("policy_loss", pg_loss), ("entropy", entropy_mean), *s.items()):
                    stats.setdefault(key, []).append(value.item())
                approx_kl = self.reduce_sum(s["approx_kl"]) / self.world_size  # every rank stops together
                if p.target_approx_kl is not None and approx_kl > p.target_approx_kl:
                    early_stop = True
                    break
            if early_stop:
                break
        t3 = time.time()
        sync_diff = self.sync_engine(ids[0, mask[0].bool()].tolist()[:64])
        t4 = time.time()

        n = len(samples)
        mean_kl = (self.reduce_sum(kl.sum()) / (n * self.world_size)).item()  # per response, over all ranks
        self.kl_ctl.update(mean_kl, n * self.world_size)
        metrics.update({k: sum(v) / len(v) for k, v in stats.items() if v})
        by_source: dict[str, list[float]] = {}
        for s in samples:
            by_source.setdefault(s.source, []).append(s.score)
        metrics.update({f"reward/{k}": sum(v) / len(v) for k, v in by_source.items()})
        if returns is not None:
            var_returns = torch.var(returns[response_mask.bool()])
            explained = 1 - torch.var((returns - old_values)[response_mask.bool()]) / var_returns.clamp_min(1e-8)
            metrics["explained_variance"] = explained.item()
        metrics.update(
            {
                "reward/mean": scores.mean().item(),
                "kl": mean_kl,
                "kl_coef": self.kl_ctl.coef,
                "advantage/abs_mean": masked_mean(advantages.abs(), response_mask).item(),
                "response_length": response_mask.sum(1).mean().item(),
                "eos_rate": 1 - truncated.float().mean().item(),
                "engine_mismatch/mean": masked_mean(mismatch, response_mask).item(),
                "engine_mismatch/max": mismatch.max().item(),
                "sync/logprob_diff": sync_diff,
                "early_stopped": float(early_stop),
                "time/generate": t1 - t0,
                "time/score": t2 - t1,
                "time/train": t3 - t2,
                "time/sync": t4 - t3,
            }
        )
        return metrics


class GRPOLoop(PPOLoop):
    stage = "grpo"


def run(cfg: PPOConfig):
    return PPOLoop(cfg, needs_reference=True).run()


def run_grpo(cfg: PPOConfig):
    return GRPOLoop(cfg, needs_reference=cfg.ppo.kl_coef > 0 or cfg.ppo.kl_loss_coef > 0).run()
