"""SFT: assistant-only loss, packing equivalence, learning on the medical data, resume."""

from __future__ import annotations

import inspect

import pytest
import torch
from conftest import stage_overrides

from m1_align.config import SFTConfig, validate
from m1_align.runs import MetricsLogger
from m1_align.sft.trainer import add_labelled_head, build_trainer


def sft_config(data_cache, tmp_path, model_dir, **extra) -> SFTConfig:
    defaults = {"train.batch_size": 4, "train.max_length": 512, "train.logging_steps": 1, "train.learning_rate": 2e-3}
    return validate(SFTConfig, stage_overrides(data_cache, tmp_path / "sft", model_dir, **{**defaults, **extra}), "test")


@pytest.fixture(scope="module")
def trainer(data_cache, tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sft_trainer")
    cfg = sft_config(data_cache, tmp, tiny_model_dir, **{"train.max_steps": 1})
    built, tokenizer = build_trainer(cfg, tmp / "sft", MetricsLogger(tmp / "sft"))
    return built, tokenizer


def samples(batch, pad_id):
    """(row, start, end) of each packed sample: a run of positions counting up from 0, padding left out."""
    found = []
    for row, positions in enumerate(batch["position_ids"]):
        starts = (positions == 0).nonzero().flatten().tolist() + [len(positions)]
        found += [(row, a, b) for a, b in zip(starts[:-1], starts[1:], strict=True)
                  if not (b - a == 1 and batch["input_ids"][row, a] == pad_id)]
    return found


def test_loss_mask_covers_only_assistant_tokens(trainer):
    built, tokenizer = trainer
    batch = next(iter(built.get_train_dataloader()))
    for row, a, b in samples(batch, tokenizer.pad_token_id):
        ids, labels = batch["input_ids"][row, a:b], batch["labels"][row, a:b]
        trained = tokenizer.decode(ids[labels != -100])
        ignored = tokenizer.decode(ids[labels == -100])
        # the loss sees the assistant's reasoning, answer and closing </s>, never the prompt
        assert "Answer:" in trained and trained.endswith(tokenizer.eos_token)
        assert "<C_Q>" not in trained and "<B_SYS>" not in trained and "<C_A>" not in trained
        assert ignored.startswith("<B_SYS>") and ignored.endswith("<C_A>")


def test_packed_batch_equals_unpacked(trainer):
    built, tokenizer = trainer
    model = built.model.eval()
    batch = next(iter(built.get_train_dataloader()))
    assert "position_ids" in batch and "attention_mask" not in batch  # packed rows, samples told apart by position
    found = samples(batch, tokenizer.pad_token_id)
    assert len(found) > batch["input_ids"].shape[0], "the packed rows should hold several conversations"
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
        for row, a, b in found:
            alone = model(input_ids=batch["input_ids"][row : row + 1, a:b]).logits[0]
            torch.testing.assert_close(packed[row, a:b], alone, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(("model", "assistant_only"), [("hybrid", True), ("llama", True), ("llama", False)])
def test_row_packed_batches_give_the_padding_free_loss(model, assistant_only, data_cache, tiny_model_dir, tiny_llama_dir,
                                                        tmp_path):
    """Without a varlen attention kernel the packed bins go row by row ([B, max_length]) instead of into one
    padding-free row; the loss over the same examples is the same."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from m1_align.sft.trainer import RowPackedCollator

    cfg = sft_config(data_cache, tmp_path, tiny_model_dir if model == "hybrid" else tiny_llama_dir,
                     **{"train.max_steps": 1, "sft.assistant_only_loss": assistant_only})
    built, tokenizer = build_trainer(cfg, tmp_path / "sft", MetricsLogger(tmp_path / "sft"))
    assert isinstance(built.data_collator, RowPackedCollator)
    examples = [built.train_dataset[i] for i in range(4)]
    rows = built.data_collator(examples)
    one_row = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id, padding_free=True)(examples)
    assert rows["input_ids"].shape[0] == 4 and one_row["input_ids"].shape[0] == 1
    assert (rows["labels"] != -100).sum() == (one_row["labels"] != -100).sum()
    net = built.model.eval()
    with torch.no_grad():
        row_loss, flat_loss = net(**rows).loss, net(**one_row).loss  # the batches as the trainer hands them over
    torch.testing.assert_close(row_loss, flat_loss, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("model,chunk_tokens", [("hybrid", None), ("llama", None), ("llama", 7)])
def test_labelled_head_gives_the_full_logits_loss_metrics_and_gradients(model, chunk_tokens, data_cache, tiny_model_dir,
                                                                       tiny_llama_dir, tmp_path):
    """The SFT trainer's output head on labelled positions only (add_labelled_head) against the model's own
    full logits on a row-packed batch: loss, per-token log-probs, entropy, top-1 hits and every gradient, in
    one chunk (the default) and in many, recomputed in backward but the last. (TRL's fused head fails this on
    the hybrid model: it multiplies by NormHead's raw weight.)"""
    cfg = sft_config(data_cache, tmp_path, tiny_model_dir if model == "hybrid" else tiny_llama_dir,
                     **{"train.max_steps": 1})
    built, _ = build_trainer(cfg, tmp_path / "sft", MetricsLogger(tmp_path / "sft"))
    if chunk_tokens:
        add_labelled_head(built.model, chunk_tokens)
    batch = built.data_collator([built.train_dataset[i] for i in range(4)])
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    assert 0 < mask.sum() < mask.numel() * 0.9  # prompts and padding carry no label
    net = built.model.train()

    def gradients(loss):
        net.zero_grad()
        loss.backward()
        return {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}

    out = net(**batch, use_cache=False, fused_lm_head=True)  # how TRL's compute_loss calls it
    our_grads = gradients(out.loss)
    logits = net(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[:, :-1].float()
    log_probs = logits.log_softmax(-1)
    logp = log_probs.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
    entropy = -(log_probs.exp() * log_probs).sum(-1) * mask
    top1 = (logits.argmax(-1) == labels) & mask
    loss = -logp.sum() / mask.sum()
    torch.testing.assert_close(out.loss, loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.log_probs, logp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.entropy, entropy.detach(), atol=1e-4, rtol=1e-4)
    assert torch.equal(out.is_top1.bool(), top1) and torch.equal(out.label_mask, mask)
    across_accumulation = net(**batch, fused_lm_head=True, num_items_in_batch=2 * mask.sum()).loss  # Trainer's count
    torch.testing.assert_close(across_accumulation, loss / 2, atol=1e-5, rtol=1e-5)
    full_grads = gradients(loss)
    assert our_grads.keys() == full_grads.keys() and len(our_grads) > 5
    for name in our_grads:
        torch.testing.assert_close(our_grads[name], full_grads[name], atol=1e-5, rtol=1e-4, msg=name)

    # a micro-batch whose labels were all cut away backpropagates zeros instead of failing
    unlabelled = {**batch, "labels": torch.full_like(batch["labels"], -100)}
    empty = net(**unlabelled, use_cache=False, fused_lm_head=True)
    assert empty.loss.item() == 0 and not empty.label_mask.any()
    assert all(g.abs().sum() == 0 for g in gradients(empty.loss).values())
    # generate() reads which arguments the model takes from its forward's signature
    assert {"input_ids", "position_ids", "logits_to_keep"} <= set(inspect.signature(net.forward).parameters)


def test_models_that_rescale_their_logits_are_told_apart():
    """Softcapping or a logit multiplier: the SFT trainer keeps TRL's head, and log-prob paths refuse them."""
    from transformers import Gemma2Config, LlamaConfig

    from m1_align.logprobs import rescales_logits

    assert not rescales_logits(LlamaConfig())
    assert rescales_logits(LlamaConfig(logit_scale=0.5))
    assert rescales_logits(Gemma2Config())  # final_logit_softcapping=30
