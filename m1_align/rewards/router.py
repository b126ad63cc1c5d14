"""The reward router: one score per sampled response, from the rule that checks a verifiable answer or
from the learned medical reward model, or a weighted mix, with an optional length penalty and
per-batch normalisation (Baichuan-M1 5.2.1: rules for verifiable answers, a model for the rest)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from m1_align.config import ConfigError, RewardSection
from m1_align.data.rules import score as rule_score
from m1_align.rewards.reward_model import score_conversations


@dataclass
class Reward:
    value: float
    source: str  # "rule:<name>", "model" or "mix"
    reason: str


class RewardRouter:
    def __init__(self, cfg: RewardSection, reward_model=None, tokenizer=None, max_length: int = 1024):
        if cfg.mode in ("model", "mix") and reward_model is None:
            raise ConfigError(f"reward.mode={cfg.mode} needs a reward model: set reward.model to a trained `m1-align rm` output")
        self.cfg, self.reward_model, self.tokenizer, self.max_length = cfg, reward_model, tokenizer, max_length

    def _model_scores(self, rows: list[dict], responses: list[str], wanted: list[int]) -> dict[int, float]:
        if not wanted:
            return {}
        conversations = [list(rows[i]["prompt"]) + [{"role": "assistant", "content": responses[i]}] for i in wanted]
        return dict(zip(wanted, score_conversations(self.reward_model, self.tokenizer, conversations, self.max_length), strict=True))

    def __call__(self, rows: list[dict], responses: list[str], response_lengths: list[int]) -> list[Reward]:
        cfg = self.cfg
        verifiable = [bool(r.get("answer")) and bool(r.get("rule")) for r in rows]
        if cfg.mode in ("rule", "mix") and not all(verifiable):
            raise ConfigError(f"reward.mode={cfg.mode} needs an answer and a rule on every prompt; use mode=route for open questions")
        if cfg.mode == "route" and not all(verifiable) and self.reward_model is None:
            raise ConfigError("some prompts have no verifiable answer and no reward model is set (reward.model)")
        use_model = [i for i, v in enumerate(verifiable) if cfg.mode in ("model", "mix") or not v]
        model_scores = self._model_scores(rows, responses, use_model)

        rewards = []
        for i, (row, text) in enumerate(zip(rows, responses, strict=True)):
            if cfg.mode == "model" or (cfg.mode == "route" and not verifiable[i]):
                reward = Reward(model_scores[i], "model", "reward model score")
            else:
                rule = rule_score(row["rule"], text, row["answer"])
                reward = Reward(rule.score, f"rule:{row['rule']}", rule.reason)
                if cfg.mode == "mix":
                    value = cfg.rule_weight * rule.score + cfg.model_weight * model_scores[i]
                    reward = Reward(value, "mix", f"{rule.reason}; model {model_scores[i]:.3f}")
            if cfg.length_penalty:
                reward.value -= cfg.length_penalty * response_lengths[i]
            rewards.append(reward)
        if cfg.normalize and len(rewards) > 1:
            values = torch.tensor([r.value for r in rewards])
            values = (values - values.mean()) / (values.std() + 1e-6)
            for reward, value in zip(rewards, values.tolist(), strict=True):
                reward.value = value
        return rewards
