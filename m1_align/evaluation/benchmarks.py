"""Held-out medical benchmarks for one causal LM.

- MMLU-medical: the letter parsed from a free (greedy) generation, and the option with the highest
  log-likelihood sum log p(option text | prompt, "Answer:"), overall and per subject;
- the held-out verifiable sets: rule-checked answer accuracy per task;
- open questions: a reward model's average score of the model's greedy answers.

Generation goes through a `Generate` callable (messages -> completion texts), so the backend is
chosen in one place (evaluation.run.make_generator). Each benchmark returns flat metrics
("mmlu_medical/accuracy_loglik", ...) and one sample record per question for eval_samples.jsonl.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from typing import Any

import torch
from tqdm.auto import tqdm

from m1_align.data.chat import prompt_ids
from m1_align.data.rules import score
from m1_align.data.tasks import ANSWER_DELIMITER, LETTERS
from m1_align.rewards.reward_model import score_conversations
from m1_align.rewards.verifiable import mean_or_nan, metric_key
from m1_align.training import eager_generation

Messages = list[dict[str, str]]
Generate = Callable[[list[Messages]], list[str]]
Metrics = dict[str, float | int]

# The built data's answers end with "Answer: <answer>", so an option is scored where the model
# states its answer, right after this prefix (its reasoning is skipped).
LOGLIK_PREFIX = "Answer:"


# ---------------------------------------------------------------------------------------------
# MMLU-medical
# ---------------------------------------------------------------------------------------------


@torch.inference_mode()
def continuation_logprobs(
    model, sequences: list[tuple[list[int], list[int]]], pad_id: int, batch_size: int = 8
) -> list[float]:
    """sum log p(continuation | context) for each (context ids, continuation ids) pair.

    Rows are left-padded so every continuation ends in the last column, and the output head runs on the
    last (longest continuation + 1) positions only (`logits_to_keep`): a 49K-word vocabulary is never
    projected over the prompts."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    # Longest first, so each batch holds similar lengths (little padding) and memory peaks early.
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i][0]) - len(sequences[i][1]))
    totals = [0.0] * len(sequences)
    for start in range(0, len(order), batch_size):
        indices = order[start : start + batch_size]
        rows = [sequences[i][0] + sequences[i][1] for i in indices]
        width = max(len(r) for r in rows)
        ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows], device=device)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
        keep = max(len(sequences[i][1]) for i in indices) + 1
        logits = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp_min(0),
                       use_cache=False, logits_to_keep=keep).logits  # [B, keep, V]: positions width-keep .. width-1
        for row, i in enumerate(indices):
            n = len(sequences[i][1])
            # the logit at column t predicts token t+1: the continuation's n tokens come from the n columns before the last
            logp = logits[row, keep - n - 1 : keep - 1].float().log_softmax(-1)
            totals[i] = logp.gather(-1, ids[row, width - n :, None]).sum().item()
    model.train(was_training)
    return totals


@torch.inference_mode()
def option_logliks(model, tokenizer, rows: list[dict[str, Any]], batch_size: int = 8) -> list[list[float]]:
    """Per row, sum log p(" " + option text | prompt + "Answer:") for each of its options.

    The prompt runs once per question: its KV cache is repeated for the options, which continue from it
    (`batch_repeat_interleave`), so an n-option question costs one prompt forward, not n."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    prefix = tokenizer(LOGLIK_PREFIX, add_special_tokens=False)["input_ids"]
    pad = tokenizer.pad_token_id
    contexts = [prompt_ids(tokenizer, row["prompt"]) + prefix for row in rows]
    options = [[tokenizer(" " + o, add_special_tokens=False)["input_ids"] for o in row["options"]] for row in rows]
    out: list[list[float]] = [[] for _ in rows]
    # questions with as many options share a batch; longest prompts first (little padding)
    order = sorted(range(len(rows)), key=lambda i: (len(options[i]), -len(contexts[i])))
    progress = tqdm(total=len(rows), desc="option log-likelihood", leave=False, disable=len(rows) <= batch_size)
    with eager_generation():  # prompt and options run against a KV cache: as generation does, eagerly
        for _, same_n in itertools.groupby(order, key=lambda i: len(options[i])):
            same_n = list(same_n)
            for start in range(0, len(same_n), batch_size):
                batch = same_n[start : start + batch_size]
                progress.update(len(batch))
                n = len(options[batch[0]])
                width = max(len(contexts[i]) for i in batch)
                ids = torch.tensor([[pad] * (width - len(contexts[i])) + contexts[i] for i in batch], device=device)
                mask = torch.tensor([[0] * (width - len(contexts[i])) + [1] * len(contexts[i]) for i in batch], device=device)
                prompt = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp_min(0),
                               use_cache=True, logits_to_keep=1)
                first = prompt.logits[:, -1].float().log_softmax(-1).repeat_interleave(n, 0)  # [B*n, V]: the first option token
                cache = prompt.past_key_values
                cache.batch_repeat_interleave(n)
                opts = [o for i in batch for o in options[i]]
                length = max(len(o) for o in opts)
                opt_ids = torch.tensor([o + [pad] * (length - len(o)) for o in opts], device=device)
                opt_mask = torch.tensor([[1] * len(o) + [0] * (length - len(o)) for o in opts], device=device)
                full_mask = torch.cat([mask.repeat_interleave(n, 0), opt_mask], dim=1)
                positions = mask.sum(1).repeat_interleave(n, 0)[:, None] + torch.arange(length, device=device)
                logits = model(input_ids=opt_ids, attention_mask=full_mask, position_ids=positions, past_key_values=cache,
                               use_cache=True).logits.float()  # [B*n, L, V]: column j predicts option token j+1
                rest = logits[:, :-1].log_softmax(-1).gather(-1, opt_ids[:, 1:, None])[..., 0] * opt_mask[:, 1:]
                totals = first.gather(-1, opt_ids[:, :1])[:, 0] + rest.sum(1)
                for k, i in enumerate(batch):
                    out[i] = totals[k * n : (k + 1) * n].tolist()
    progress.close()
    model.train(was_training)
    return out


def mmlu_medical(
    model, tokenizer, rows: list[dict[str, Any]], generate: Generate, batch_size: int = 8, generation_limit: int | None = None
) -> tuple[Metrics, list[dict]]:
    """Log-likelihood accuracy on every row and generated-letter accuracy on the first `generation_limit`
    (rows come balanced over the subjects), overall and per subject."""
    generated = rows[:generation_limit] if generation_limit is not None else rows
    completions = generate([row["prompt"] for row in generated]) + [None] * (len(rows) - len(generated))
    logliks = option_logliks(model, tokenizer, rows, batch_size)
    samples = []
    for row, completion, scores in zip(rows, completions, logliks, strict=True):
        parsed = score(row["rule"], completion, row["answer"]) if completion is not None else None
        best = LETTERS[max(range(len(scores)), key=scores.__getitem__)]
        samples.append(
            {
                "benchmark": "mmlu_medical",
                "subject": row["subject"],
                "item": row["item"],
                "answer": row["answer"],
                "completion": completion,
                "parsed": parsed.parsed if parsed else None,
                "generation_correct": parsed.score if parsed else None,
                "option_logliks": scores,
                "loglik_letter": best,
                "loglik_correct": float(best == row["answer"]),
            }
        )
    metrics: Metrics = {"mmlu_medical/n": len(samples), "mmlu_medical/n_generation": len(generated)}
    groups = [("", samples)] + [
        (f"{metric_key(s)}/", [x for x in samples if x["subject"] == s])
        for s in sorted({x["subject"] for x in samples})
    ]
    for prefix, group in groups:
        metrics[f"mmlu_medical/{prefix}accuracy_generation"] = mean_or_nan([x["generation_correct"] for x in group
                                                                       if x["generation_correct"] is not None])
        metrics[f"mmlu_medical/{prefix}accuracy_loglik"] = mean_or_nan([x["loglik_correct"] for x in group])
    return metrics, samples


# ---------------------------------------------------------------------------------------------
# Verifiable held-out sets
# ---------------------------------------------------------------------------------------------


def gold_answer_logprobs(model, tokenizer, rows: list[dict[str, Any]], completions: list[str], batch_size: int = 32) -> Metrics:
    """log p(gold answer | question, the model's own reasoning): the answer line teacher-forced after the
    greedy completion cut at the answer delimiter (all of it when the model never got there), as ELO's
    reward. A graded signal where a tiny model's accuracy is mostly zeros."""
    sequences = []
    for row, completion in zip(rows, completions, strict=True):
        reasoning = completion.split(ANSWER_DELIMITER)[0]
        context = prompt_ids(tokenizer, row["prompt"]) + tokenizer.encode(reasoning, add_special_tokens=False)
        answer = tokenizer.encode(f"{ANSWER_DELIMITER} {row['answer']}", add_special_tokens=False) + [tokenizer.eos_token_id]
        sequences.append((context, answer))
    logps = continuation_logprobs(model, sequences, tokenizer.pad_token_id, batch_size)
    metrics: Metrics = {"verifiable/gold_answer_logp": mean_or_nan(logps)}
    for task in sorted({row["task"] for row in rows}):
        metrics[f"verifiable/{metric_key(task)}/gold_answer_logp"] = mean_or_nan([lp for row, lp in zip(rows, logps, strict=True) if row["task"] == task])
    return metrics


# ---------------------------------------------------------------------------------------------
# Reward model on open questions
# ---------------------------------------------------------------------------------------------


def reward_model_scores(
    rows: list[dict[str, Any]],
    generate: Generate,
    reward_model,
    reward_tokenizer,
    max_length: int = 1024,
    batch_size: int = 8,
) -> tuple[Metrics, list[dict]]:
    """Average reward of the model's answers; the reference (chosen) answers' average for scale."""
    completions = generate([row["prompt"] for row in rows])

    def rewards(responses: list[str]) -> list[float]:
        conversations = [
            row["prompt"] + [{"role": "assistant", "content": r}]
            for row, r in zip(rows, responses, strict=True)
        ]
        return score_conversations(reward_model, reward_tokenizer, conversations, max_length, batch_size)

    model_scores = rewards(completions)
    reference_scores = rewards([row["chosen"] for row in rows])
    mean = mean_or_nan(model_scores)
    metrics: Metrics = {
        "reward_model/n": len(rows),
        "reward_model/mean": mean,
        "reward_model/std": math.sqrt(mean_or_nan([(s - mean) ** 2 for s in model_scores])),
        "reward_model/mean_reference": mean_or_nan(reference_scores),
        # how often the model's answer scores at least as high as the reference answer
        "reward_model/win_rate_vs_reference": mean_or_nan(
            [float(m >= r) for m, r in zip(model_scores, reference_scores, strict=True)]
        ),
    }
    samples = [
        {
            "benchmark": "reward_model",
            "task": row.get("task"),
            "item": row.get("item"),
            "completion": c,
            "reward": s,
            "reference_reward": r,
        }
        for row, c, s, r in zip(rows, completions, model_scores, reference_scores, strict=True)
    ]
    return metrics, samples
