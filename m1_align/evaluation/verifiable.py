"""Answer accuracy on held-out verifiable questions: greedy generation, then the rule that checks it."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from typing import Any

import torch
from tqdm.auto import tqdm

from m1_align.reward_models.rules import score


def prompt_ids(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)


@torch.no_grad()
def greedy_generate(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, batch_size: int = 16) -> list[str]:
    """Batched greedy decoding with left padding; returns the decoded completions."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    outputs: list[str] = []
    was_training = model.training
    model.eval()
    for start in tqdm(range(0, len(prompts), batch_size), desc="generate", leave=False, disable=len(prompts) <= batch_size):
        batch = prompts[start : start + batch_size]
        width = max(len(p) for p in batch)
        input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch], device=device)
        attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=device)
        generated = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
            eos_token_id=tokenizer.eos_token_id,
        )
        for row in generated[:, width:]:
            outputs.append(tokenizer.decode(row, skip_special_tokens=True))
    model.train(was_training)
    return outputs


def answer_accuracy(
    model, tokenizer, rows: Iterable[dict[str, Any]], max_new_tokens: int = 96, batch_size: int = 16
) -> dict[str, float]:
    """Accuracy per task and overall; rows carry `prompt` (messages), `answer`, `rule`, `task`."""
    rows = list(rows)
    if not rows:
        return {}
    completions = greedy_generate(model, tokenizer, [prompt_ids(tokenizer, r["prompt"]) for r in rows], max_new_tokens, batch_size)
    by_task: dict[str, list[float]] = defaultdict(list)
    for row, completion in zip(rows, completions, strict=True):
        by_task[row["task"]].append(score(row["rule"], completion, row["answer"]).score)
    result = {f"accuracy/{task}": sum(v) / len(v) for task, v in sorted(by_task.items())}
    result["accuracy/overall"] = sum(sum(v) for v in by_task.values()) / len(rows)
    return result
