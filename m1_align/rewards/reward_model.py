"""Scoring conversations with a learned reward model (a sequence classifier with one scalar output)."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm


@torch.no_grad()
def score_conversations(model, tokenizer, conversations: list[list[dict]], max_length: int, batch_size: int = 16) -> list[float]:
    """Scalar reward of each full conversation (right padding; the head pools the last real token).

    A conversation longer than max_length loses its beginning (the prompt's start), never its end: the
    response's final line (its answer) is what the reward model must see."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    scores: list[float] = []
    side = getattr(tokenizer, "truncation_side", None)
    tokenizer.truncation_side = "left"
    try:
        for start in tqdm(range(0, len(conversations), batch_size), desc="score", leave=False, disable=len(conversations) <= batch_size):
            texts = [tokenizer.apply_chat_template(c, tokenize=False) for c in conversations[start : start + batch_size]]
            enc = tokenizer(texts, add_special_tokens=False, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
            enc = {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
            scores += model(**enc).logits[:, 0].float().tolist()
    finally:
        tokenizer.truncation_side = side
        model.train(was_training)
    return scores
