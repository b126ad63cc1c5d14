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
from m1_align.rewards.hacking import batch_reward_metrics
from m1_align.rewards.router import RewardRouter
from m1_align.rl.algorithms import (
    AdvantageInputs,
    advantage_estimator,
    agg_loss,
    equal_reward_groups,
    kl_penalty,
    masked_mean,
    overlong_penalty,
    policy_loss,
    rollout_correction,
    token_level_rewards,
    value_loss,
)
from m1_align.rl.loop import OnlineLoop
from m1_align.rollout.engine import Completion
from m1_align.stage_data import eval_rows, rl_rows
from m1_align.training import load_scalar_model, resolve_model_dir


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
    model_score: float | None = None  # the reward model's raw score, where it scored this response


@dataclass
class RolloutBatch:
    """One step's samples as tensors. N responses; prompts left-padded to P columns and responses right-padded
    to R, so every response starts in column `start` = P. Per-token tensors are [N, R] over the responses."""

    ids: torch.Tensor  # [N, P + R]
    mask: torch.Tensor  # [N, P + R], 1 on real prompt and response tokens
    start: int
    engine_logp: torch.Tensor  # [N, R] the engine's log-probs of the sampled tokens (temperature 1)
    response_mask: torch.Tensor  # [N, R]
    scores: torch.Tensor  # [N] reward of each response, penalties included
    groups: torch.Tensor  # [N] the prompt each response answers
    truncated: torch.Tensor  # [N] no stop token before max_new_tokens
    on_policy: bool  # old log-probs come from the update's own forward
    old_logp: torch.Tensor | None = None  # [N, R] log pi_old,T of the sampled tokens
    old_raw: torch.Tensor | None = None  # [N, R] the same at temperature 1, to hold against the engine's
    ref_logp: torch.Tensor | None = None  # [N, R] log pi_ref,T; None when no reference model is kept
    old_values: torch.Tensor | None = None  # [N, R] V(s_t), with a critic
    kl: torch.Tensor | None = None  # [N, R] per-token KL(pi_old || pi_ref) estimate
    mismatch: torch.Tensor | None = None  # [N, R] |trainer - engine| log-prob at temperature 1
    tis_weights: torch.Tensor | None = None  # [N, R] truncated importance weights, when ppo.tis_cap is set
    correction: dict | None = None  # rates of the engine-mismatch correction (truncated, masked)
    advantages: torch.Tensor | None = None  # [N, R]
    returns: torch.Tensor | None = None  # [N, R], with a critic
    loss_mask: torch.Tensor | None = None  # [N, R] the tokens the losses read (truncated and masked IS excluded)

    def set_old_logprobs(self, old_logp: torch.Tensor, old_raw: torch.Tensor, p) -> None:
        """Old log-probs and what derives from them: the KL to the reference (no reference model kept: zero),
        the engine mismatch and its correction (importance weights, tokens or responses masked out of the loss)."""
        self.old_logp, self.old_raw = old_logp, old_raw
        ref_logp = self.ref_logp if self.ref_logp is not None else old_logp
        self.kl = kl_penalty(old_logp, ref_logp, p.kl_estimator) * self.response_mask
        self.mismatch = (old_raw - self.engine_logp).abs() * self.response_mask
        self.tis_weights, self.loss_mask, self.correction = rollout_correction(
            old_raw, self.engine_logp, self.loss_mask, p.tis_cap, p.tis_level, p.mis_level, p.mis_low, p.mis_high)


class PPOLoop(OnlineLoop):
    stage = "ppo"
    cfg: PPOConfig

    @property
    def has_critic(self) -> bool:
        return self.estimator.needs_critic

    @property
    def estimator(self):
        return advantage_estimator(self.cfg.ppo.advantage_estimator)

    def setup(self) -> None:
        cfg, p = self.cfg, self.cfg.ppo
        if self.estimator.needs_groups and p.samples_per_prompt < 2:
            raise ConfigError(f"ppo.advantage_estimator={p.advantage_estimator} compares the samples of a prompt: "
                              "set ppo.samples_per_prompt to 2 or more")
        self.rows = rl_rows(cfg)
        self.eval_set = eval_rows(cfg, cfg.train.eval_limit, split="dev")
        self.kl_ctl = AdaptiveKLController(p.kl_coef, p.adaptive_kl_target)
        reward_model = None
        if cfg.reward.model:
            reward_model = load_scalar_model(cfg.model.model_copy(update={"gradient_checkpointing": False}),
                                             resolve_model_dir(cfg.reward.model))
            reward_model.requires_grad_(False).eval().to(self.device)
        self.router = RewardRouter(cfg.reward, reward_model, self.tokenizer, cfg.train.max_length)
        self.reward_sources = sorted({self.router.source(row) for row in self.rows})
        self.prompts_per_rank = self.per_rank(p.prompts_per_step, "ppo.prompts_per_step")
        self.minibatch_size = self.per_rank(p.minibatch_size, "ppo.minibatch_size")  # on this rank

    def setup_trainables(self) -> None:
        cfg = self.cfg
        if not self.has_critic:  # critic-free estimators load and train no value model
            return
        source = cfg.reward.model if cfg.ppo.critic_from == "reward_model" else cfg.model.path
        if source is None:
            raise ConfigError("ppo.critic_from=reward_model needs reward.model to be set")
        critic = load_scalar_model(cfg.model.model_copy(update={"lora": cfg.model.lora.model_copy(update={"enabled": False})}),
                                   resolve_model_dir(source))
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
        return [Sample(row, prompt, c, score, r.source, r.model_score)
                for (row, prompt, c), score, r in zip(flat, scores.tolist(), rewards, strict=True)]

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

    def collect(self, samples: list[Sample]) -> RolloutBatch:
        """The samples as tensors, with everything the update reads that does not change during it: old and
        reference log-probs, values, the KL to the reference. Prompts left-padded, responses right-padded.

        On-policy (one update per step, the whole batch in one minibatch, no KL in the reward) the old
        log-probs are those of the update's own forward (detached), so no separate pass is run here."""
        p, tok, temperature = self.cfg.ppo, self.tokenizer, self.cfg.rollout.temperature or 1.0
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
        ids, mask, start = ids.to(self.device), mask.to(self.device), width_p
        response_mask = mask[:, start:].float()
        batch = RolloutBatch(
            ids=ids, mask=mask, start=start, engine_logp=engine_logp.to(self.device), response_mask=response_mask,
            scores=torch.tensor([s.score for s in samples], device=self.device),
            groups=torch.arange(len(samples), device=self.device) // p.samples_per_prompt,
            truncated=torch.tensor([s.completion.finish_reason != "stop" for s in samples], device=self.device),
            on_policy=p.ppo_epochs == 1 and len(samples) <= self.minibatch_size and p.kl_coef == 0,
        )
        # DAPO's overlong filtering: truncated responses teach nothing about how to end
        batch.loss_mask = response_mask * (~batch.truncated[:, None]).float() if p.mask_truncated else response_mask
        with torch.no_grad():
            if not batch.on_policy:
                batch.old_logp, _, batch.old_raw = response_logprobs(self.policy, ids, mask, start, temperature,
                                                                     with_raw=True, pack=self.pack)
            if self.needs_reference:
                with self.reference_context():
                    batch.ref_logp, _, _ = response_logprobs(self.reference_model, ids, mask, start, temperature,
                                                             pack=self.pack)
            if self.has_critic:
                critic = self.trainables["critic"].model
                batch.old_values = response_values(critic, ids, mask, start) * response_mask
            if not batch.on_policy:
                batch.set_old_logprobs(batch.old_logp, batch.old_raw, p)
        return batch

    def advantages(self, batch: RolloutBatch) -> None:
        """batch.advantages and batch.returns (None without a critic) by the configured estimator; the token
        rewards carry -kl_coef * KL_t, and the score on the last token."""
        p = self.cfg.ppo
        kl = batch.kl if batch.kl is not None else torch.zeros_like(batch.response_mask)  # on-policy: kl_coef is 0
        token_rewards = token_level_rewards(batch.scores, kl, batch.response_mask, self.kl_ctl.coef)
        batch.advantages, batch.returns = self.estimator(AdvantageInputs(
            batch.scores, batch.groups, token_rewards, batch.response_mask, batch.old_values, p.gamma, p.lam,
            p.whiten_advantages, p.grpo_std_normalize, reduce_sum=self.reduce_sum))

    def minibatch_losses(self, batch: RolloutBatch, rows: torch.Tensor) -> tuple[dict, dict]:
        """Every loss term of one minibatch, in one place: the clipped policy loss, the entropy bonus, the KL
        loss to the reference and the clipped value loss; and their statistics."""
        p = self.cfg.ppo
        max_length = p.loss_scale_factor or self.cfg.rollout.max_new_tokens  # L of the fixed-length normalisers
        logp, entropy, raw = response_logprobs(self.policy, batch.ids[rows], batch.mask[rows], batch.start,
                                               self.cfg.rollout.temperature or 1.0, with_entropy=True,
                                               with_raw=batch.on_policy, pack=self.pack)
        if batch.on_policy:  # the whole batch in one minibatch, before any update
            old_logp, old_raw = torch.zeros_like(logp), torch.zeros_like(raw)
            old_logp[rows], old_raw[rows] = logp.detach(), raw.detach()
            batch.set_old_logprobs(old_logp, old_raw, p)
        m = batch.loss_mask[rows]
        # every per-token term (policy, entropy, KL loss; the value loss as a token mean) is aggregated alike;
        # under data parallelism token_mean divides by the global token count, so two ranks step exactly as one
        # process on the whole batch
        ranks = self.rank_mean if self.world_size > 1 else None
        weights = None if batch.tis_weights is None else batch.tis_weights[rows]
        pg_loss, stats = policy_loss(logp, batch.old_logp[rows], batch.advantages[rows], m, p.clip_range,
                                     p.clip_range_high or p.clip_range, p.loss_agg_mode, max_length, weights, ranks,
                                     p.clip_ratio_c)
        losses = {"policy": pg_loss}
        if p.entropy_coef:
            losses["policy"] = pg_loss - p.entropy_coef * agg_loss(entropy, m, p.loss_agg_mode, max_length, ranks)
        if p.kl_loss_coef > 0:
            kl_loss = agg_loss(kl_penalty(logp, batch.ref_logp[rows], p.kl_loss_estimator), m, p.loss_agg_mode,
                               max_length, ranks)
            losses["policy"] = losses["policy"] + p.kl_loss_coef * kl_loss
            stats["kl_loss"] = kl_loss.detach()
        if self.has_critic:
            values = response_values(self.trainables["critic"].model, batch.ids[rows], batch.mask[rows], batch.start)
            stats["value_loss"] = value_loss(values, batch.old_values[rows], batch.returns[rows], m, p.value_clip_range,
                                             ranks)
            losses["critic"] = p.vf_coef * stats["value_loss"]  # actor and critic share no weights: one backward each
        stats = {"policy_loss": pg_loss, "entropy": masked_mean(entropy.detach(), m), **stats}
        # before any update the ratio is exactly 1: a deviation means old log-probs from another distribution
        # (other weights, temperature or dropout), which PPO's clip would act on silently
        stats["ratio/max_dev"] = (((logp.detach() - batch.old_logp[rows]).exp() - 1).abs() * batch.response_mask[rows]).max()
        return losses, stats

    def update(self, batch: RolloutBatch) -> tuple[dict[str, float], bool]:
        """ppo_epochs passes over the batch in shuffled minibatches, stopping early once the approximate KL
        to the sampling policy passes ppo.target_approx_kl."""
        p, n = self.cfg.ppo, batch.ids.shape[0]
        stats: dict[str, list[float]] = {}
        for _ in range(p.ppo_epochs):
            for rows in torch.randperm(n).split(self.minibatch_size):
                losses, s = self.minibatch_losses(batch, rows)
                self.optimizer_step(losses)
                first = "ratio/first_minibatch_max_dev" not in stats
                dev = s.pop("ratio/max_dev")
                if first:
                    stats["ratio/first_minibatch_max_dev"] = [dev.item()]
                for key, value in s.items():
                    stats.setdefault(key, []).append(value.item())
                approx_kl = self.reduce_sum(s["approx_kl/k3"]) / self.world_size  # every rank stops together
                if p.target_approx_kl is not None and approx_kl > p.target_approx_kl:
                    return {k: sum(v) / len(v) for k, v in stats.items() if v}, True
        return {k: sum(v) / len(v) for k, v in stats.items() if v}, False

    def step_metrics(self, samples: list[Sample], batch: RolloutBatch) -> dict[str, float]:
        """What a step logs about its batch: rewards and shares by source, the reward model's length correlation,
        KL, lengths, engine/trainer agreement."""
        n, mask = len(samples), batch.response_mask
        mean_kl = (self.reduce_sum(batch.kl.sum()) / (n * self.world_size)).item()  # per response, over all ranks
        self.kl_ctl.update(mean_kl, n * self.world_size)
        by_source: dict[str, list[float]] = {}
        for s in samples:
            by_source.setdefault(s.source, []).append(s.score)
        metrics = {f"reward/{k}": sum(v) / len(v) for k, v in by_source.items()}
        metrics.update(batch_reward_metrics([s.source for s in samples], self.reward_sources,
                                            [s.model_score for s in samples], [len(s.completion.token_ids) for s in samples]))
        if batch.returns is not None:
            var_returns = torch.var(batch.returns[mask.bool()])
            explained = 1 - torch.var((batch.returns - batch.old_values)[mask.bool()]) / var_returns.clamp_min(1e-8)
            metrics["explained_variance"] = explained.item()
        lengths = batch.mask.sum(-1).tolist()  # what padding costs the forward passes, and what packing leaves of it
        return {
            **metrics,
            "batch/padding_fraction": 1 - sum(lengths) / batch.mask.numel(),
            "batch/padding_fraction_packed": 1 - sum(lengths) / (len(pack_rows(lengths, max(lengths))) * max(lengths)),
            "reward/mean": batch.scores.mean().item(),
            "kl": mean_kl,
            "kl_coef": self.kl_ctl.coef,
            "advantage/abs_mean": masked_mean(batch.advantages.abs(), mask).item(),
            "response_length": mask.sum(1).mean().item(),
            "eos_rate": 1 - batch.truncated.float().mean().item(),
            "engine_mismatch/mean": masked_mean(batch.mismatch, mask).item(),
            "engine_mismatch/max": batch.mismatch.max().item(),
            **{k: float(v) for k, v in (batch.correction or {}).items()},
        }

    # -- one step ------------------------------------------------------------------------------------
    def step(self, step: int) -> dict[str, float]:
        t0 = time.time()
        samples, metrics = self.rollout(step)
        if self.reduce_sum(torch.tensor(float(not samples))).item() > 0:  # every rank steps, or none does
            return {**metrics, "skipped": 1.0}
        t1 = time.time()
        batch = self.collect(samples)
        self.advantages(batch)
        t2 = time.time()
        stats, early_stop = self.update(batch)
        t3 = time.time()
        sync_diff = self.sync_engine(batch.ids[0, batch.mask[0].bool()].tolist()[:64])
        t4 = time.time()
        return {**metrics, **stats, **self.step_metrics(samples, batch), "sync/logprob_diff": sync_diff,
                "early_stopped": float(early_stop), "time/generate": t1 - t0, "time/score": t2 - t1,
                "time/train": t3 - t2, "time/sync": t4 - t3}


class GRPOLoop(PPOLoop):
    stage = "grpo"


def run(cfg: PPOConfig):
    return PPOLoop(cfg, needs_reference=True).run()


def run_grpo(cfg: PPOConfig):
    return GRPOLoop(cfg, needs_reference=cfg.ppo.kl_coef > 0 or cfg.ppo.kl_loss_coef > 0).run()
