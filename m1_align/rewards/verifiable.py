"""Rule-checked accuracy of a model's answers to held-out verifiable questions, per task and overall."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from m1_align.data.chat import prompt_ids
from m1_align.data.rules import score
from m1_align.rollout.hf_engine import greedy_generate

Messages = list[dict[str, str]]
Generate = Callable[[list[Messages]], list[str]]
Metrics = dict[str, float | int]


def mean_or_nan(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def metric_key(name: str) -> str:
    return str(name).replace(" ", "_")


def hf_generator(model, tokenizer, max_new_tokens: int, batch_size: int) -> Generate:
    def generate(prompts: list[Messages]) -> list[str]:
        ids = [prompt_ids(tokenizer, p) for p in prompts]
        return greedy_generate(model, tokenizer, ids, max_new_tokens, batch_size)

    return generate


def verifiable_sets(rows: list[dict[str, Any]], generate: Generate) -> tuple[Metrics, list[dict]]:
    """Rule-checked accuracy per task (and over all questions); rows carry prompt/answer/rule/task."""
    completions = generate([row["prompt"] for row in rows])
    samples = []
    for row, completion in zip(rows, completions, strict=True):
        result = score(row["rule"], completion, row["answer"])
        samples.append(
            {
                "benchmark": "verifiable",
                "task": row["task"],
                "item": row.get("item"),
                "answer": row["answer"],
                "completion": completion,
                "parsed": result.parsed,
                "correct": result.score,
                "reason": result.reason,
            }
        )
    metrics: Metrics = {
        "verifiable/n": len(samples),
        "verifiable/accuracy": mean_or_nan([x["correct"] for x in samples]),
    }
    for task in sorted({x["task"] for x in samples}):
        metrics[f"verifiable/{metric_key(task)}/accuracy"] = mean_or_nan(
            [x["correct"] for x in samples if x["task"] == task]
        )
    return metrics, samples


def answer_accuracy(model, tokenizer, rows: list[dict[str, Any]], max_new_tokens: int = 96, batch_size: int = 32) -> Metrics:
    """verifiable_sets with greedy HF generation: what a trainer stage reports at its end."""
    return verifiable_sets(rows, hf_generator(model, tokenizer, max_new_tokens, batch_size))[0] if rows else {}
