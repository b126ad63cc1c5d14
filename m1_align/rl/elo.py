"""`m1-align elo`: Exploratory Log-likelihood Optimisation (Baichuan-M1, section 5.2.2, eqs. 1-3).

The reasoning c is a latent variable sampled from the policy. For a question Q with gold answer A:
    sample K reasoning paths      c_k ~ pi(. | Q)                      (rollout engine, vLLM by default)
    reward of a path              r_k = log pi(A | Q, c_k)             (teacher forcing)
    baseline                      b   = mean_k r_k  (or leave-one-out: mean of the other K-1)
    loss = -mean_k[(r_k - b).detach() * log pi(c_k | Q)] - lambda * mean_k r_k
The first term is eq. 3's score-function gradient of the Jensen bound (eq. 2); the second is the
pathwise part of the same gradient that eq. 3 leaves out (lambda 0 gives eq. 3 alone).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from m1_align.config import ELOConfig
from m1_align.data.stage_data import eval_rows, rl_rows
from m1_align.evaluation.benchmarks import prompt_ids
from m1_align.rl.common import right_pad, span_mask, token_logprobs
from m1_align.rl.loop import OnlineLoop

# ---------------------------------------------------------------------------------------------
# The loss
# ---------------------------------------------------------------------------------------------


def baselines(rewards: torch.Tensor, groups: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-path baseline from the other paths of the same question. rewards, groups: [N]."""
    out = torch.zeros_like(rewards)
    for g in groups.unique():
        idx = (groups == g).nonzero().squeeze(-1)
        r = rewards[idx]
        if kind == "mean":
            out[idx] = r.mean()
        elif kind == "leave_one_out":
            out[idx] = (r.sum() - r) / (len(r) - 1) if len(r) > 1 else r
        elif kind == "none":
            out[idx] = 0.0
        else:
            raise ValueError(f"unknown baseline {kind!r}; expected mean, leave_one_out or none")
    return out


def elo_loss(
    reasoning_logp: torch.Tensor, answer_logp: torch.Tensor, groups: torch.Tensor, baseline: str, lambda_answer: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """reasoning_logp = log pi(c_k|Q), answer_logp = r_k = log pi(A|Q,c_k), both [N] with grad.
    Returns the loss and the (detached) advantages r_k - b."""
    rewards = answer_logp.detach()
    advantages = rewards - baselines(rewards, groups, baseline)
    loss = -(advantages * reasoning_logp).mean() - lambda_answer * answer_logp.mean()
    return loss, advantages


# ---------------------------------------------------------------------------------------------
# Paths: cut a sampled completion into reasoning, then score the gold answer after it
# ---------------------------------------------------------------------------------------------


@dataclass
class ReasoningPath:
    group: int  # index of the question in the batch
    prompt: list[int]
    reasoning: list[int]
    answer: list[int]  # delimiter + gold answer + eos, teacher-forced


def reasoning_tokens(tokens: list[int], tokenizer, delimiter: str) -> list[int] | None:
    """The sampled tokens before the answer delimiter; None when the path never reaches it."""
    text = tokenizer.decode(tokens, skip_special_tokens=False)
    cut = text.find(delimiter)
    if cut < 0:
        return None
    # The longest token prefix whose text ends at or before the delimiter.
    lo, hi = 0, len(tokens)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if len(tokenizer.decode(tokens[:mid], skip_special_tokens=False)) <= cut:
            lo = mid
        else:
            hi = mid - 1
    return tokens[:lo]


def degenerate(reasoning: list[int] | None, n: int = 4, max_repeats: int = 3) -> str | None:
    """Why a path is unusable: it never reached the answer, is empty, or loops."""
    if reasoning is None:
        return "truncated"
    if not reasoning:
        return "empty"
    grams = [tuple(reasoning[i : i + n]) for i in range(len(reasoning) - n + 1)]
    if grams and max(grams.count(g) for g in set(grams)) > max_repeats:
        return "repeating"
    return None


def answer_tokens(tokenizer, delimiter: str, answer: str) -> list[int]:
    return tokenizer.encode(f"{delimiter} {answer}", add_special_tokens=False) + [tokenizer.eos_token_id]


def path_logprobs(model, paths: list[ReasoningPath], pad_id: int, length_normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """log pi(c_k | Q) and r_k = log pi(A | Q, c_k) from one teacher-forced forward: [N] each."""
    device = next(model.parameters()).device
    rows = [p.prompt + p.reasoning + p.answer for p in paths]
    ids, mask = right_pad(rows, pad_id, device)
    logp = token_logprobs(model, ids, mask)  # [N, T-1]
    starts = [len(p.prompt) for p in paths]
    mids = [len(p.prompt) + len(p.reasoning) for p in paths]
    ends = [len(r) for r in rows]
    reasoning_mask = span_mask(list(zip(starts, mids, strict=True)), ids.shape[1], device)
    answer_mask = span_mask(list(zip(mids, ends, strict=True)), ids.shape[1], device)
    reasoning_logp = (logp * reasoning_mask).sum(1)
    answer_logp = (logp * answer_mask).sum(1)
    if length_normalize:
        answer_logp = answer_logp / answer_mask.sum(1)
    return reasoning_logp, answer_logp


# ---------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------


class ELOLoop(OnlineLoop):
    stage = "elo"
    cfg: ELOConfig

    def setup(self) -> None:
        self.rows = rl_rows(self.cfg)
        self.eval_set = eval_rows(self.cfg, self.cfg.train.eval_limit)
        self.delimiter = self.cfg.elo.answer_delimiter
        self.per_rank(self.cfg.elo.prompts_per_step, "elo.prompts_per_step")

    def total_steps(self) -> int:
        if self.cfg.train.max_steps > 0:
            return self.cfg.train.max_steps
        return math.ceil(len(self.rows) * self.cfg.train.num_epochs / self.cfg.elo.prompts_per_step)

    def updates_per_step(self) -> int:
        return self.cfg.elo.epochs_per_batch

    def step(self, step: int) -> dict[str, float]:
        cfg, tok = self.cfg, self.tokenizer
        rows = self.shard(self.prompt_batch(step, cfg.elo.prompts_per_step))  # this rank's questions
        prompts = [prompt_ids(tok, r["prompt"]) for r in rows]

        t0 = time.time()
        samples = self.engine.generate(prompts, self.sampling(n=cfg.elo.k))
        t1 = time.time()

        paths, dropped = [], {"truncated": 0, "empty": 0, "repeating": 0}
        for group, (row, prompt, completions) in enumerate(zip(rows, prompts, samples, strict=True)):
            answer = answer_tokens(tok, self.delimiter, row["answer"])
            for completion in completions:
                reasoning = reasoning_tokens(completion.token_ids, tok, self.delimiter)
                why = degenerate(reasoning)
                if why and cfg.elo.drop_degenerate:
                    dropped[why] += 1
                    continue
                paths.append(ReasoningPath(group, prompt, reasoning if reasoning is not None else list(completion.token_ids), answer))
        metrics: dict[str, float] = {f"dropped/{k}": v / (len(rows) * cfg.elo.k) for k, v in dropped.items()}
        # A question needs two paths for a baseline; drop lonely ones.
        counts = {g: sum(p.group == g for p in paths) for g in {p.group for p in paths}}
        paths = [p for p in paths if counts[p.group] >= 2]
        if self.reduce_sum(torch.tensor(float(not paths))).item() > 0:  # every rank steps, or none does
            return {**metrics, "time/sample": t1 - t0, "skipped": 1.0}

        groups = torch.tensor([p.group for p in paths])
        for _ in range(cfg.elo.epochs_per_batch):
            reasoning_logp, answer_logp = path_logprobs(self.policy, paths, tok.pad_token_id, cfg.elo.length_normalize)
            loss, advantages = elo_loss(reasoning_logp, answer_logp, groups, cfg.elo.baseline, cfg.elo.lambda_answer)
            if cfg.elo.kl_coef > 0:
                loss = loss + cfg.elo.kl_coef * self.reference_kl(paths)
            self.optimizer_step({"policy": loss})
        t2 = time.time()
        sync_diff = self.sync_engine(paths[0].prompt + paths[0].reasoning)
        t3 = time.time()

        rewards = answer_logp.detach()
        metrics.update(
            {
                "loss": loss.item(),
                "reward/mean": rewards.mean().item(),
                "reward/std": rewards.std().item() if len(rewards) > 1 else 0.0,
                "advantage/abs_mean": advantages.abs().mean().item(),
                "reasoning_length": sum(len(p.reasoning) for p in paths) / len(paths),
                "paths": float(len(paths)),
                "time/sample": t1 - t0,
                "time/score_and_train": t2 - t1,
                "time/sync": t3 - t2,
                "sync/logprob_diff": sync_diff,
            }
        )
        return metrics

    def reference_kl(self, paths: list[ReasoningPath]) -> torch.Tensor:
        """Sampled-token estimate of KL(pi || pi_start) over the reasoning tokens (k1)."""
        ids, mask = right_pad([p.prompt + p.reasoning for p in paths], self.tokenizer.pad_token_id, self.device)
        spans = span_mask([(len(p.prompt), len(p.prompt) + len(p.reasoning)) for p in paths], ids.shape[1], self.device)
        logp = token_logprobs(self.policy, ids, mask)
        with torch.no_grad(), self.reference_context():
            ref = token_logprobs(self.reference_model, ids, mask)
        return ((logp - ref) * spans).sum() / spans.sum().clamp_min(1)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Held-out answer accuracy and gold-answer log-likelihood after the model's greedy reasoning."""
        metrics = self.answer_accuracy(self.eval_set)
        completions = self.last_eval_completions
        paths = []
        for i, (row, completion) in enumerate(zip(self.eval_set, completions, strict=True)):
            reasoning = reasoning_tokens(completion, self.tokenizer, self.delimiter) or []
            answer = answer_tokens(self.tokenizer, self.delimiter, row["answer"])
            paths.append(ReasoningPath(i, prompt_ids(self.tokenizer, row["prompt"]), reasoning, answer))
        values = []
        for start in range(0, len(paths), 16):
            values.append(path_logprobs(self.policy, paths[start : start + 16], self.tokenizer.pad_token_id, False)[1])
        metrics["gold_answer_logp"] = torch.cat(values).mean().item() if values else float("nan")
        return metrics


def run(cfg: ELOConfig):
    return ELOLoop(cfg, needs_reference=cfg.elo.kl_coef > 0).run()

