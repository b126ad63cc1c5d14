"""`m1-align tdpo`: TDPO1 / TDPO2 (and DPO as the baseline) on TRL's DPOTrainer.

TRL tokenises the pairs and batches them as [chosen; rejected] with a completion mask; we replace
its loss with ours (m1_align/preference/losses.py), which needs the reference model's whole
next-token distribution, so the reference runs live on every batch (no precomputed log-probs).
Built on TRL 1.16.0's private `_compute_loss` hook: the version is pinned in pyproject.toml.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from accelerate.utils import is_peft_model
from transformers.modeling_outputs import CausalLMOutput
from trl import DPOConfig, DPOTrainer
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.utils import use_adapter

from m1_align.config import TDPOConfig
from m1_align.logprobs import final_hidden_states, output_head
from m1_align.preference.losses import preference_loss, response_window, token_terms
from m1_align.preference.on_policy import on_policy_pairs
from m1_align.rewards.verifiable import answer_accuracy
from m1_align.runs import MetricsLogger, StageResult
from m1_align.stage_data import eval_rows, preference_datasets
from m1_align.training import (
    WSDScheduleMixin,
    load_model,
    resolve_model_dir,
    run_trainer_stage,
    source_model,
    trainer_hooks,
    training_arguments,
)


def next_token_labels(input_ids: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
    """Labels [B, T-1] for positions 0..T-2 (position t predicts token t+1): -100 off the completion."""
    return input_ids.masked_fill(completion_mask == 0, -100)[:, 1:]


class TDPOTrainer(WSDScheduleMixin, DPOTrainer):
    def __init__(
        self, *args, tdpo_loss: str = "tdpo2", alpha: float = 0.5, rpo_alpha: float = 0.0, kl_chunk_size: int = 128, **kwargs
    ):
        super().__init__(*args, **kwargs)
        self.tdpo_loss, self.alpha, self.rpo_alpha, self.kl_chunk_size = tdpo_loss, alpha, rpo_alpha, kl_chunk_size

    def _reference_window_logits(self, input_ids, attention_mask, labels) -> torch.Tensor:
        """The reference's logits [2B, W, V] on the response window only (no grad)."""
        if self.ref_model is not None:
            reference, adapter_off = self.ref_model, contextlib.nullcontext()
        else:  # LoRA: the reference is the same network with the adapter switched off.
            unwrapped = self.accelerator.unwrap_model(self.model)
            name = "ref" if "ref" in unwrapped.peft_config else None
            reference, adapter_off = self.model, use_adapter(unwrapped, adapter_name=name)
        with adapter_off:
            hidden = final_hidden_states(reference, input_ids, attention_mask, None)[:, :-1]  # [2B, T-1, H]
            return output_head(reference)(response_window(labels, hidden)[1])

    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]  # [2B, T]: chosen; rejected
        labels = next_token_labels(input_ids, inputs["completion_mask"])  # [2B, T-1]
        hidden = final_hidden_states(model, input_ids, attention_mask, None)[:, :-1]  # [2B, T-1, H]
        window_labels, window_hidden = response_window(labels, hidden)  # [2B, W], [2B, W, H]
        peft = is_peft_model(self.accelerator.unwrap_model(self.model)) and self.ref_model is None
        no_ckpt = disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs)
        with torch.no_grad(), no_ckpt if peft else contextlib.nullcontext():
            ref_logits = self._reference_window_logits(input_ids, attention_mask, labels)  # [2B, W, V]
        terms = token_terms(window_hidden, ref_logits, window_labels, chunk_size=self.kl_chunk_size, head=output_head(model))
        chosen, rejected = terms.halves()
        loss, metrics = preference_loss(
            chosen, rejected, loss=self.tdpo_loss, beta=self.beta, alpha=self.alpha, rpo_alpha=self.rpo_alpha
        )

        for key, value in metrics.items():
            self._metrics[mode][key].append(self.accelerator.gather_for_metrics(value).mean().item())
        if mode == "train":
            self._total_train_tokens += self.accelerator.gather_for_metrics(inputs["attention_mask"].sum()).sum().item()
            self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
        return (loss, CausalLMOutput(loss=loss)) if return_outputs else loss  # no [2B, T, V] logits to return


def build_trainer(cfg: TDPOConfig, output_dir: Path, logger: MetricsLogger):
    """The trainer, its tokenizer, and the on-policy pairs' counts ({} for the built pairs)."""
    model_dir, tokenizer = source_model(cfg)
    # first: the arguments set up the processes (and their timeout) that on-policy sampling shares out its work over
    args = DPOConfig(
        **training_arguments(cfg, output_dir),
        beta=cfg.tdpo.beta,
        max_length=cfg.train.max_length,
        precompute_ref_log_probs=False,
    )
    pairs, counts = None, {}
    if cfg.tdpo.pairs == "on_policy":  # sampled before the models load: the engine's memory is freed by then
        pairs, counts, fresh = on_policy_pairs(cfg, model_dir, tokenizer, output_dir)
        if fresh and args.process_index == 0:
            logger.log(0, **counts)
    train_dataset, eval_dataset = preference_datasets(cfg, train_rows=pairs)
    policy = load_model(cfg.model, model_dir=model_dir)
    ref_model = None
    if not cfg.model.lora.enabled:
        ref_dir = resolve_model_dir(cfg.tdpo.ref_model) if cfg.tdpo.ref_model else model_dir
        ref_model = load_model(cfg.model.model_copy(update={"gradient_checkpointing": False}), model_dir=ref_dir)
        ref_model.requires_grad_(False).eval()
    trainer = TDPOTrainer(
        model=policy, ref_model=ref_model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
        processing_class=tokenizer, **trainer_hooks(cfg, logger),
        tdpo_loss=cfg.tdpo.loss, alpha=cfg.tdpo.alpha, rpo_alpha=cfg.tdpo.rpo_alpha, kl_chunk_size=cfg.tdpo.kl_chunk_size,
    )
    return trainer, tokenizer, counts


def build_and_measure(cfg: TDPOConfig, output_dir: Path, logger: MetricsLogger):
    """build_trainer, and the held-out preference accuracy and rewards before training."""
    trainer, tokenizer, pair_counts = build_trainer(cfg, output_dir, logger)
    metrics = dict(pair_counts)
    if trainer.eval_dataset is not None:
        before = trainer.evaluate()
        metrics.update({"before/" + k.removeprefix("eval_"): v for k, v in before.items() if k.startswith(("eval_rewards", "eval_preference"))})
    return trainer, tokenizer, metrics


def evaluate(cfg: TDPOConfig):
    def held_out(trainer, tokenizer, final_dir) -> dict:
        metrics = {}
        if trainer.eval_dataset is not None:
            after = trainer.evaluate()
            metrics.update({k.removeprefix("eval_"): v for k, v in after.items() if k.startswith(("eval_rewards", "eval_preference", "eval_seqkl", "eval_loss"))})
        rows = eval_rows(cfg, cfg.train.eval_limit, split="dev")
        return {**metrics, **answer_accuracy(trainer.model, tokenizer, rows, max_new_tokens=cfg.train.eval_max_new_tokens)}

    return held_out


def run(cfg: TDPOConfig) -> StageResult:
    return run_trainer_stage(cfg, "tdpo", build_and_measure, evaluate(cfg))
