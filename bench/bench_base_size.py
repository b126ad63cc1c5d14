"""Which base-model size learns most from a fixed few minutes of CPU: held-out loss after equal wall time.

    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_base_size.py --data data_cache/<build> \
        --tokenizer runs/quickstart/pretrain/tokenizer --seconds 100

Trains each size from scratch on the same packed corpus rows (batch 8 x 256 tokens, AdamW, 10 warm-up
steps, constant LR) for the same number of seconds, one after the other, then prints steps, tokens seen
and the loss on the same held-out corpus rows. The quickstart preset was chosen with this comparison.
"""

from __future__ import annotations

import argparse
import random
import time

import torch
from transformers import AutoTokenizer

from m1_align.data.build import corpus_texts
from m1_align.model import BaichuanM1ForCausalLM, preset_config

SIZES = {
    # name: (config overrides of the quickstart preset, learning rate)
    "hidden 256 x 6 layers": (
        dict(
            hidden_size=256,
            intermediate_size=704,
            num_hidden_layers=6,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_swa_attention_heads=8,
            num_swa_key_value_heads=4,
        ),
        2e-3,
    ),
    "hidden 128 x 4 layers (quickstart)": ({}, 4e-3),
}


def packed_rows(tokenizer, texts, length: int, limit: int) -> torch.Tensor:
    buffer, rows = [], []
    for text in texts:
        buffer += tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id]
        while len(buffer) >= length and len(rows) < limit:
            rows.append(buffer[:length])
            buffer = buffer[length:]
        if len(rows) >= limit:
            break
    return torch.tensor(rows)


def train_for(model, rows: torch.Tensor, seconds: float, lr: float, batch: int) -> int:
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    generator = torch.Generator().manual_seed(0)
    start, step = time.time(), 0
    while time.time() - start < seconds:
        ids = rows[torch.randint(0, len(rows), (batch,), generator=generator)]
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 10)
        model(input_ids=ids, labels=ids).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        step += 1
    return step


@torch.no_grad()
def heldout_loss(model, rows: torch.Tensor) -> float:
    model.eval()
    losses = [
        model(input_ids=rows[i : i + 16], labels=rows[i : i + 16]).loss.item()
        for i in range(0, len(rows), 16)
    ]
    return sum(losses) / len(losses)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="a built dataset folder (data_cache/medical-...)")
    parser.add_argument("--tokenizer", required=True, help="the pretrain stage's tokenizer folder")
    parser.add_argument("--seconds", type=float, default=100.0)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    texts = list(corpus_texts(args.data, "train"))
    random.Random(0).shuffle(texts)
    train = packed_rows(tokenizer, texts, 256, limit=20000)
    heldout = packed_rows(tokenizer, corpus_texts(args.data, "heldout"), 256, limit=256)

    print(f"{'size':36} {'params':>9} {'lr':>7} {'steps':>6} {'tokens':>9} {'held-out loss':>14}")
    for name, (overrides, lr) in SIZES.items():
        torch.manual_seed(0)
        config = preset_config(
            "quickstart",
            vocab_size=len(tokenizer),
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            bos_token_id=tokenizer.bos_token_id,
            **overrides,
        )
        model = BaichuanM1ForCausalLM(config)
        steps = train_for(model, train, args.seconds, lr, args.batch)
        params = sum(p.numel() for p in model.parameters())
        print(
            f"{name:36} {params:>9,} {lr:>7.0e} {steps:>6} {steps * args.batch * 256:>9,} {heldout_loss(model, heldout):>14.3f}"
        )


if __name__ == "__main__":
    main()
