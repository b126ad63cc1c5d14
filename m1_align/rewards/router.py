"""The reward router: one score per sampled response, from the rule that checks a verifiable answer or
from the learned medical reward model, or a weighted mix, with optional length controls on the model's
scores and per-batch normalisation (Baichuan-M1 5.2.1: rules for verifiable answers, a model for the rest)."""

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
    model_score: float | None = None  # the reward model's raw score, before any length control or penalty


def open_prompt_problem(cfg: RewardSection) -> str | None:
    """Why prompts without a rule (open questions) cannot be scored under these reward settings, or None."""
    if cfg.mode in ("rule", "mix"):
        return f"reward.mode={cfg.mode} needs a rule on every prompt; set reward.mode=route to score open ones with the reward model"
    if cfg.model is None:
        return "no reward model is set to score them; set reward.model to a trained `m1-align rm` output"
    return None


def is_verifiable(row: dict) -> bool:
    return bool(row.get("answer")) and bool(row.get("rule"))


def length_slope(scores: list[float], lengths: list[int]) -> float:
    """Least-squares slope of the scores on the lengths; 0 when the lengths do not vary."""
    y, x = torch.tensor(scores, dtype=torch.float64), torch.tensor(lengths, dtype=torch.float64)
    dx = x - x.mean()
    spread = (dx * dx).sum()
    return float((dx * (y - y.mean())).sum() / spread) if len(scores) > 1 and spread > 0 else 0.0


class RewardRouter:
    def __init__(self, cfg: RewardSection, reward_model=None, tokenizer=None, max_length: int = 1024):
        if cfg.mode in ("model", "mix") and reward_model is None:
            raise ConfigError(f"reward.mode={cfg.mode} needs a reward model: set reward.model to a trained `m1-align rm` output")
        self.cfg, self.reward_model, self.tokenizer, self.max_length = cfg, reward_model, tokenizer, max_length

    def source(self, row: dict) -> str:
        """Which scorer a prompt's responses go to: "rule:<name>", "model" or "mix"."""
        if self.cfg.mode == "mix":
            return "mix"
        if self.cfg.mode == "model" or (self.cfg.mode == "route" and not is_verifiable(row)):
            return "model"
        return f"rule:{row['rule']}"

    def _model_scores(self, rows: list[dict], responses: list[str], wanted: list[int]) -> dict[int, float]:
        if not wanted:
            return {}
        conversations = [list(rows[i]["prompt"]) + [{"role": "assistant", "content": responses[i]}] for i in wanted]
        return dict(zip(wanted, score_conversations(self.reward_model, self.tokenizer, conversations, self.max_length), strict=True))

    def _length_controlled(self, scores: dict[int, float], lengths: list[int]) -> dict[int, float]:
        """The model's scores with their batch least-squares fit on length taken out (reward.model_length_control)."""
        if not self.cfg.model_length_control or len(scores) < 2:
            return scores
        wanted = list(scores)
        slope = length_slope([scores[i] for i in wanted], [lengths[i] for i in wanted])
        mean_length = sum(lengths[i] for i in wanted) / len(wanted)
        return {i: scores[i] - slope * (lengths[i] - mean_length) for i in wanted}

    def __call__(self, rows: list[dict], responses: list[str], response_lengths: list[int]) -> list[Reward]:
        cfg = self.cfg
        verifiable = [is_verifiable(r) for r in rows]
        if cfg.mode in ("rule", "mix") and not all(verifiable):
            raise ConfigError(f"reward.mode={cfg.mode} needs an answer and a rule on every prompt; use mode=route for open questions")
        if cfg.mode == "route" and not all(verifiable) and self.reward_model is None:
            raise ConfigError("some prompts have no verifiable answer and no reward model is set (reward.model)")
        use_model = [i for i, v in enumerate(verifiable) if cfg.mode in ("model", "mix") or not v]
        raw_scores = self._model_scores(rows, responses, use_model)
        model_scores = self._length_controlled(raw_scores, response_lengths)

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
            reward.model_score = raw_scores.get(i)
            if cfg.length_penalty and (cfg.length_penalty_on == "all" or i in raw_scores):
                reward.value -= cfg.length_penalty * response_lengths[i]
            rewards.append(reward)
        if cfg.normalize and len(rewards) > 1:
            values = torch.tensor([r.value for r in rewards])
            values = (values - values.mean()) / (values.std() + 1e-6)
            for reward, value in zip(rewards, values.tolist(), strict=True):
                reward.value = value
        return rewards
