"""`m1-align sft`: supervised fine-tuning with TRL's SFTTrainer.

TRL does the tokenisation, the assistant-only loss mask (we do these two for chat templates without
`{% generation %}` markers, such as most HF models' ChatML) and the packing (best-fit decreasing into
padding-free rows whose position ids restart at every sample; the hybrid model turns those restarts
into sample masking for attention and the K/V convolution). We add the config, the data, resume,
metrics.jsonl, the atomic final save and the held-out evaluation.
"""

from __future__ import annotations

import functools
import types
from pathlib import Path

import torch
from trl import SFTConfig as TRLSFTConfig
from trl import SFTTrainer
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling
from trl.trainer.utils import FusedCausalLMOutput

from m1_align.config import SFTConfig
from m1_align.data.chat import chat_template_for, encode_chat, has_generation_markers
from m1_align.logprobs import checkpointed_chunks, rescales_logits
from m1_align.rewards.verifiable import answer_accuracy
from m1_align.runs import MetricsLogger, StageResult
from m1_align.stage_data import eval_rows, sft_datasets
from m1_align.training import (
    WSDScheduleMixin,
    load_model,
    run_trainer_stage,
    source_model,
    trainer_hooks,
    training_arguments,
)

VARLEN_ATTENTION = ("flash_attention_2", "flash_attention_3")  # kernels that read sample bounds from the position ids


class RowPackedCollator(DataCollatorForLanguageModeling):
    """TRL's packed bins as the rows of a [B, max_length] batch, instead of one [1, B x max_length] row.

    Without a varlen attention kernel, transformers attends over a padding-free row densely, under a
    block-diagonal mask it builds from the position-id restarts, so the cost grows with the square of the
    whole batch's tokens: at 4 x 256 tokens that row was 848 tokens; at 16 x 256, 3,570, and the step ran at
    half the tokens/s (bench/bench_sft_step.py). Bin by bin it grows with each bin's square. The rows carry no
    attention mask, since transformers finds the samples from the position ids only without one; padding
    gets position 0 at every token (a sample of one token each) and no label, and no sample's first token is
    a label (it would be predicted from the sample before it), as in TRL's padding-free batches."""

    def torch_call(self, examples):
        batch = super().torch_call(examples)
        batch.pop("attention_mask")
        batch["labels"][batch["position_ids"] == 0] = -100
        return batch


def add_labelled_head(model, chunk_tokens: int = 1024) -> None:
    """Replace the fused output head TRL's SFTTrainer adds (`fused_lm_head=True`) by one that runs the head on
    the labelled positions only, `chunk_tokens` at a time (checkpointed_chunks: all but the last recomputed in
    backward). Off Triton devices (CPUs), TRL's head scores every position, prompt and padding included, and
    casts each tile to fp32 for the matmul and a dozen elementwise passes over [tokens, 32768] tiles; with
    assistant-only loss about half the positions have no label. It calls the head module rather than
    multiplying by its weight, and computes in the forward's dtype, as the model's own forward does (bf16
    logits under bf16 autocast; TRL's kernel accumulates them in fp32). The outputs TRL's compute_loss reads:
    loss, log-probs, and entropy and top-1 hits for its metrics (tests/test_sft.py checks them against the
    full logits)."""
    trl_forward = model.forward

    def scores(h, y):  # [3, n]: log p(label), entropy, whether the label is the most likely token
        logits = model.get_output_embeddings()(h).float()  # [n, V]
        log_z = logits.logsumexp(-1)
        logp = logits.gather(-1, y.unsqueeze(-1)).squeeze(-1) - log_z
        with torch.no_grad():  # metrics only
            entropy = log_z - ((logits - log_z.unsqueeze(-1)).exp() * logits).sum(-1)
            top1 = (logits.argmax(-1) == y).float()
        return torch.stack([logp, entropy, top1])

    @functools.wraps(type(model).forward)  # generate() reads the model's arguments from the forward's signature
    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None, **kwargs):
        if not fused_lm_head or shift_labels is not None or getattr(self.config, "output_router_logits", False):
            return trl_forward(*args, fused_lm_head=fused_lm_head, labels=labels, shift_labels=shift_labels,
                               num_items_in_batch=num_items_in_batch, **kwargs)
        kwargs["use_cache"] = False
        hidden = self.base_model(*args, **kwargs).last_hidden_state[:, :-1]  # [B, T-1, H]
        labels = labels[:, 1:]  # position t predicts token t+1
        mask = labels != -100
        values = checkpointed_chunks(scores, hidden[mask], labels[mask], chunk_tokens)  # [3, n]
        logp, entropy, top1 = (v.new_zeros(mask.shape).masked_scatter(mask, v) for v in values)
        loss = -logp.sum() / (mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch)
        return FusedCausalLMOutput(loss=loss, log_probs=logp, entropy=entropy.detach(), is_top1=top1.detach(),
                                   label_mask=mask)

    model.forward = types.MethodType(forward, model)


class M1SFTTrainer(WSDScheduleMixin, SFTTrainer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.padding_free and self.args.packing and self.model.config._attn_implementation not in VARLEN_ATTENTION:
            self.data_collator = RowPackedCollator(pad_token_id=self._tokenizer.pad_token_id, return_position_ids=True,
                                                   pad_to_multiple_of=self.args.pad_to_multiple_of)
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        # TRL's kernel multiplies by the head's weight, skipping a head module's own forward (the hybrid model's
        # NormHead normalises the rows; a LoRA adapter on the head); its Triton path serves GPUs. It also applies
        # logit softcapping and multipliers, which ours does not: such models keep TRL's head
        if not rescales_logits(base.config) and (
                self.args.device.type == "cpu" or type(base.get_output_embeddings()) is not torch.nn.Linear):
            add_labelled_head(base)


def assistant_masked(dataset, tokenizer):
    """Conversations tokenised here with their assistant-token mask (from prefix rendering, m1_align.data.chat),
    for chat templates without {% generation %} markers; TRL turns `assistant_masks` into labels."""
    if dataset is None:
        return None

    def encode(row):
        out = encode_chat(tokenizer, row["messages"])
        return {"input_ids": out["input_ids"], "assistant_masks": out["assistant_mask"]}

    return dataset.map(encode, remove_columns=dataset.column_names)


def build_trainer(cfg: SFTConfig, output_dir: Path, logger: MetricsLogger):
    model_dir, tokenizer = source_model(cfg)
    train_dataset, eval_dataset = sft_datasets(cfg)
    assistant_only_loss = cfg.sft.assistant_only_loss
    if assistant_only_loss and not has_generation_markers(chat_template_for(tokenizer)):
        # TRL masks through {% generation %} markers, which most HF models' templates (ChatML...) lack
        train_dataset, eval_dataset = (assistant_masked(d, tokenizer) for d in (train_dataset, eval_dataset))
        assistant_only_loss = False  # the `assistant_masks` column carries the mask instead
    args = TRLSFTConfig(
        **training_arguments(cfg, output_dir),
        max_length=cfg.train.max_length,
        packing=cfg.sft.packing,
        assistant_only_loss=assistant_only_loss,
        eos_token=tokenizer.eos_token,
    )
    trainer = M1SFTTrainer(
        model=load_model(cfg.model, model_dir=model_dir),
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        **trainer_hooks(cfg, logger),
    )
    return trainer, tokenizer


def evaluate(cfg: SFTConfig):
    def held_out(trainer, tokenizer, final_dir) -> dict:
        metrics = {"eval_loss": trainer.evaluate()["eval_loss"]} if trainer.eval_dataset is not None else {}
        rows = eval_rows(cfg, cfg.train.eval_limit, split="dev")
        return {**metrics, **answer_accuracy(trainer.model, tokenizer, rows, max_new_tokens=cfg.train.eval_max_new_tokens)}

    return held_out


def run(cfg: SFTConfig) -> StageResult:
    return run_trainer_stage(cfg, "sft", lambda *args: (*build_trainer(*args), {}), evaluate(cfg))
