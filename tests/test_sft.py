"""SFT: assistant-only loss, packing equivalence, learning on the medical data, resume."""

from __future__ import annotations

import pytest
import torch
from conftest import stage_overrides

from m1_align.config import SFTConfig, validate
from m1_align.runs import MetricsLogger
from m1_align.sft.trainer import build_trainer


def sft_config(data_cache, tmp_path, model_dir, **extra) -> SFTConfig:
    defaults = {"train.batch_size": 4, "train.max_length": 512, "train.logging_steps": 1, "train.learning_rate": 2e-3}
    return validate(SFTConfig, stage_overrides(data_cache, tmp_path / "sft", model_dir, **{**defaults, **extra}), "test")


@pytest.fixture(scope="module")
def trainer(data_cache, tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sft_trainer")
    cfg = sft_config(data_cache, tmp, tiny_model_dir, **{"train.max_steps": 1})
    built, tokenizer = build_trainer(cfg, tmp / "sft", MetricsLogger(tmp / "sft"))
    return built, tokenizer


def test_loss_mask_covers_only_assistant_tokens(trainer):
    built, tokenizer = trainer
    batch = next(iter(built.get_train_dataloader()))
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist() + [len(ids)]
    for a, b in zip(starts[:-1], starts[1:], strict=True):
        trained = tokenizer.decode(ids[a:b][labels[a:b] != -100])
        ignored = tokenizer.decode(ids[a:b][labels[a:b] == -100])
        # the loss sees the assistant's reasoning, answer and closing </s>, never the prompt
        assert "Answer:" in trained and trained.endswith(tokenizer.eos_token)
        assert "<C_Q>" not in trained and "<B_SYS>" not in trained and "<C_A>" not in trained
        assert ignored.startswith("<B_SYS>") and ignored.endswith("<C_A>")


def test_packed_batch_equals_unpacked(trainer):
    built, _ = trainer
    model = built.model.eval()
    batch = next(iter(built.get_train_dataloader()))
    assert "position_ids" in batch and batch["input_ids"].shape[0] == 1  # padding-free packed row
    starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist() + [batch["input_ids"].shape[1]]
    assert len(starts) > 2, "the packed row should hold several conversations"
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0]
        for a, b in zip(starts[:-1], starts[1:], strict=True):
            alone = model(input_ids=batch["input_ids"][:, a:b]).logits[0]
            torch.testing.assert_close(packed[a:b], alone, atol=1e-4, rtol=1e-4)
