"""`m1-align elo`: Exploratory Log-likelihood Optimisation (Baichuan-M1, section 5.2.2, eqs. 1-3).

The reasoning c is a latent variable sampled from the policy. For a question Q with gold answer A:
    sample K reasoning paths      c_k ~ pi_T(. | Q)                    (rollout engine at rollout.temperature T)
    reward of a path              r_k = log pi(A | Q, c_k)             (teacher forcing, the model itself: T = 1)
    baseline                      b   = mean_k r_k  (or leave-one-out: mean of the other K-1)
    loss = -mean_k[(r_k - b).detach() * log pi_T(c_k | Q)] - lambda * mean_k r_k  [+ kl_coef * KL(pi_T || pi_ref,T)]
The first term is eq. 3's score-function gradient of the Jensen bound (eq. 2), taken with the log-probs
of the distribution that was sampled; the second is the pathwise part of the same gradient that eq. 3
leaves out (lambda 0 gives eq. 3 alone). The optional KL is a k3 (or k2) loss term over the reasoning
tokens, whose gradient pulls towards the reference. With elo.epochs_per_batch > 1 the score term is
PPO's clipped per-token surrogate: the same gradient on the first pass, importance-weighted after it.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from m1_align.config import ELOConfig
from m1_align.data.chat import prompt_ids
from m1_align.logprobs import causal_lm_logprobs, right_pad, span_mask
from m1_align.rl.algorithms import agg_loss, group_baseline, kl_penalty, policy_loss
from m1_align.rl.loop import OnlineLoop
from m1_align.stage_data import eval_rows, rl_rows

# ---------------------------------------------------------------------------------------------
# The loss
# ---------------------------------------------------------------------------------------------


def elo_loss(
    reasoning_logp: torch.Tensor, old_reasoning_logp: torch.Tensor, reasoning_mask: torch.Tensor,
    answer_logp: torch.Tensor, advantages: torch.Tensor, lambda_answer: float, clip_range: float = 0.2,
    mean_over_ranks=None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """reasoning_logp: log pi_T per reasoning token [N, L] (with grad), old_reasoning_logp: the same at
    sampling time (no grad), answer_logp: r_k [N] (with grad), advantages: (r_k - b) [N], fixed for the batch.
    Loss = -mean_k sum_t clipped(ratio_kt) A_k - lambda mean_k r_k; at ratio 1 its gradient is eq. 3's.
    `mean_over_ranks` (data parallel): the means over k divide by the ranks' mean path count, since dropped
    paths leave the ranks with different counts and gradient averaging must give the global mean."""
    score_term, stats = policy_loss(reasoning_logp, old_reasoning_logp, advantages[:, None].expand_as(reasoning_logp),
                                    reasoning_mask, clip_range, clip_range, agg="seq_mean_token_sum")
    loss = score_term - lambda_answer * answer_logp.mean()
    if mean_over_ranks is not None:  # mean over this rank's N paths -> sum over them / the ranks' mean N
        n = torch.tensor(float(len(answer_logp)), device=answer_logp.device)
        loss = loss * n / mean_over_ranks(n)
    return loss, stats


def elo_advantages(rewards: torch.Tensor, groups: torch.Tensor, baseline: str) -> torch.Tensor:
    """r_k - b_k with b the mean of the question's paths, the mean of its other paths, or 0."""
    if baseline == "none":
        return rewards
    if baseline not in ("mean", "leave_one_out"):
        raise ValueError(f"unknown baseline {baseline!r}; expected mean, leave_one_out or none")
    return rewards - group_baseline(rewards, groups, leave_one_out=baseline == "leave_one_out")


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
    """The sampled text before the answer delimiter, as tokens; None when the path never reaches it.

    The sampled tokens are kept up to the last one that ends at or before the delimiter; a token that
    straddles it (".\nAns" say) is replaced by the encoding of its part before the delimiter, so no
    reasoning text is lost and none of the delimiter is counted as reasoning."""
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
    rest = text[len(tokenizer.decode(tokens[:lo], skip_special_tokens=False)) : cut]
    return tokens[:lo] + (tokenizer.encode(rest, add_special_tokens=False) if rest else [])


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


@dataclass
class PathBatch:
    """One teacher-forced batch of paths: ids [N, W] and next-token masks [N, W-1] of each span."""

    ids: torch.Tensor
    mask: torch.Tensor
    reasoning_mask: torch.Tensor
    answer_mask: torch.Tensor


def path_batch(paths: list[ReasoningPath], pad_id: int, device) -> PathBatch:
    rows = [p.prompt + p.reasoning + p.answer for p in paths]
    ids, mask = right_pad(rows, pad_id, device)
    mids = [len(p.prompt) + len(p.reasoning) for p in paths]
    reasoning = span_mask([(len(p.prompt), m) for p, m in zip(paths, mids, strict=True)], ids.shape[1], device)
    answer = span_mask([(m, len(r)) for m, r in zip(mids, rows, strict=True)], ids.shape[1], device)
    return PathBatch(ids, mask, reasoning, answer)


def path_logprobs(model, batch: PathBatch, temperature: float, length_normalize: bool,
                  pack: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """From one forward: log pi_T of every reasoning token [N, W-1] (0 outside the span) and
    r_k = log pi(A | Q, c_k) [N] at temperature 1 (optionally per answer token)."""
    # the head runs from the first scored column on (the shortest prompt's end), not over every prompt token
    first = int((batch.reasoning_mask + batch.answer_mask).sum(0).nonzero()[0])
    sampled, _, model_logp = causal_lm_logprobs(model, batch.ids, batch.mask, first + 1, temperature, with_raw=True, pack=pack)
    sampled, model_logp = (torch.nn.functional.pad(x, (first, 0)) for x in (sampled, model_logp))  # back to [N, W-1]
    reasoning_logp = sampled * batch.reasoning_mask
    answer_logp = (model_logp * batch.answer_mask).sum(1)
    if length_normalize:
        answer_logp = answer_logp / batch.answer_mask.sum(1)
    return reasoning_logp, answer_logp


# ---------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------


class ELOLoop(OnlineLoop):
    stage = "elo"
    cfg: ELOConfig

    def setup(self) -> None:
        self.rows = rl_rows(self.cfg)
        self.eval_set = eval_rows(self.cfg, self.cfg.train.eval_limit, split="dev")
        self.delimiter = self.cfg.elo.answer_delimiter
        self.per_rank(self.cfg.elo.prompts_per_step, "elo.prompts_per_step")

    def total_steps(self) -> int:
        if self.cfg.train.max_steps > 0:
            return self.cfg.train.max_steps
        return math.ceil(len(self.rows) * self.cfg.train.num_epochs / self.cfg.elo.prompts_per_step)

    def updates_per_step(self) -> int:
        return self.cfg.elo.epochs_per_batch

    def collect(self, step: int) -> tuple[list[ReasoningPath], dict[str, float]]:
        """K sampled reasoning paths per question, each cut at the answer delimiter and paired with the gold
        answer's tokens; degenerate paths dropped (elo.drop_degenerate), and questions left with one path."""
        cfg, tok = self.cfg, self.tokenizer
        rows = self.shard(self.prompt_batch(step, cfg.elo.prompts_per_step))  # this rank's questions
        prompts = [prompt_ids(tok, r["prompt"]) for r in rows]
        samples = self.engine.generate(prompts, self.sampling(n=cfg.elo.k, prompts=len(prompts)))
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
        # A question needs two paths for a baseline; drop lonely ones.
        counts = {g: sum(p.group == g for p in paths) for g in {p.group for p in paths}}
        paths = [p for p in paths if counts[p.group] >= 2]
        return paths, {f"dropped/{k}": v / (len(rows) * cfg.elo.k) for k, v in dropped.items()}

    def update(self, paths: list[ReasoningPath]) -> dict[str, float]:
        """elo.epochs_per_batch updates on the paths: eq. 3's policy gradient with the answer log-likelihood
        as reward (fixed at the first epoch), plus lambda x the answer term, plus the KL loss."""
        cfg = self.cfg
        groups = torch.tensor([p.group for p in paths])
        batch = path_batch(paths, self.tokenizer.pad_token_id, self.device)
        temperature = cfg.rollout.temperature or 1.0  # greedy sampling has no distribution to score; use the model's
        ref_logp, metrics = None, {}
        if cfg.elo.kl_coef > 0:
            with torch.no_grad(), self.reference_context():
                ref_logp, _ = path_logprobs(self.reference_model, batch, temperature, False, self.pack)
        for epoch in range(cfg.elo.epochs_per_batch):
            reasoning_logp, answer_logp = path_logprobs(self.policy, batch, temperature, cfg.elo.length_normalize, self.pack)
            if epoch == 0:  # the sampling-time log-probs and the advantages stay fixed for the whole batch
                old_logp = reasoning_logp.detach()
                rewards = answer_logp.detach()
                advantages = elo_advantages(rewards, groups.to(rewards.device), cfg.elo.baseline)
            ranks = self.rank_mean if self.world_size > 1 else None
            loss, stats = elo_loss(reasoning_logp, old_logp, batch.reasoning_mask, answer_logp, advantages,
                                   cfg.elo.lambda_answer, cfg.elo.clip_range, ranks)
            if ref_logp is not None:
                kl = agg_loss(kl_penalty(reasoning_logp, ref_logp, cfg.elo.kl_estimator), batch.reasoning_mask, "token_mean",
                              mean_over_ranks=ranks)
                loss = loss + cfg.elo.kl_coef * kl
                metrics["kl"] = kl.item()
            self.optimizer_step({"policy": loss})
        return {
            **metrics,
            "loss": loss.item(),
            "reward/mean": rewards.mean().item(),
            "reward/std": rewards.std().item() if len(rewards) > 1 else 0.0,
            "advantage/abs_mean": advantages.abs().mean().item(),
            "clip/ratio_outside_fraction": stats["clip/ratio_outside_fraction"].item(),
            "clip/pg_clipfrac": stats["clip/pg_clipfrac"].item(),
        }

    def step(self, step: int) -> dict[str, float]:
        t0 = time.time()
        paths, metrics = self.collect(step)
        t1 = time.time()
        if self.reduce_sum(torch.tensor(float(not paths))).item() > 0:  # every rank steps, or none does
            return {**metrics, "time/sample": t1 - t0, "skipped": 1.0}
        metrics.update(self.update(paths))
        t2 = time.time()
        sync_diff = self.sync_engine(paths[0].prompt + paths[0].reasoning)
        t3 = time.time()
        return {
            **metrics,
            "reasoning_length": sum(len(p.reasoning) for p in paths) / len(paths),
            "paths": float(len(paths)),
            "time/sample": t1 - t0,
            "time/score_and_train": t2 - t1,
            "time/sync": t3 - t2,
            "sync/logprob_diff": sync_diff,
        }

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
            batch = path_batch(paths[start : start + 16], self.tokenizer.pad_token_id, self.device)
            values.append(path_logprobs(self.policy, batch, 1.0, False, self.pack)[1])
        metrics["gold_answer_logp"] = torch.cat(values).mean().item() if values else float("nan")
        return metrics


def run(cfg: ELOConfig):
    return ELOLoop(cfg, needs_reference=cfg.elo.kl_coef > 0).run()

