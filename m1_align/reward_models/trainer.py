"""`m1-align rm`: a Bradley-Terry reward model, loss = -log sigma(r(x, y_w) - r(x, y_l) [- margin]).

TRL's RewardTrainer does the tokenisation and the loss; the model is the hybrid model's
sequence-classification variant (a scalar `score` head on the last token) or any HF
AutoModelForSequenceClassification. At the end the reward model is evaluated on held-out pairs
with `m1-align rm-eval`'s metrics.
"""

from __future__ import annotations

import time

from transformers import set_seed
from trl import RewardConfig, RewardTrainer

from m1_align.config import ConfigError, RMConfig
from m1_align.reward_models.evaluate import evaluate_pairs
from m1_align.runs import MetricsLogger, StageResult
from m1_align.stage_data import preference_datasets
from m1_align.training import (
    CheckpointMarker,
    MetricsCallback,
    WSDScheduleMixin,
    finish_stage,
    last_checkpoint,
    load_model,
    load_tokenizer,
    peft_config,
    resolve_model_dir,
    save_final,
    start_output_dir,
    training_arguments,
    whole_run_train_loss,
)


class M1RewardTrainer(WSDScheduleMixin, RewardTrainer):
    pass


def _with_margin(dataset, column: str | None):
    if column is None or dataset is None:
        return dataset
    if column not in dataset.column_names:
        raise ConfigError(f"rm.margin_column {column!r} is not a column of the preference data ({dataset.column_names})")
    return dataset.rename_column(column, "margin") if column != "margin" else dataset


def run(cfg: RMConfig) -> StageResult:
    start = time.time()
    output_dir = start_output_dir(cfg)
    model_dir = resolve_model_dir(cfg.model.path)
    tokenizer = load_tokenizer(cfg.model, model_dir)
    train, held = preference_datasets(cfg, keep=[cfg.rm.margin_column] if cfg.rm.margin_column else ())
    set_seed(cfg.seed)  # the scalar head is initialised at load time: same seed, same reward model
    model = load_model(cfg.model, kind="seq_cls", model_dir=model_dir, num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id
    logger = MetricsLogger(output_dir, run_name="rm")
    args = RewardConfig(
        **training_arguments(cfg, output_dir),
        max_length=cfg.train.max_length,
        center_rewards_coefficient=cfg.rm.center_rewards_coef,
    )
    trainer = M1RewardTrainer(
        model=model,
        args=args,
        train_dataset=_with_margin(train, cfg.rm.margin_column),
        eval_dataset=_with_margin(held, cfg.rm.margin_column),
        processing_class=tokenizer,
        peft_config=peft_config(cfg.model.lora, task_type="SEQ_CLS") if cfg.model.lora.enabled else None,
        callbacks=[MetricsCallback(logger), CheckpointMarker()],
    )
    trainer.decay_ratio = cfg.train.decay_ratio
    resume = last_checkpoint(output_dir) if cfg.train.resume else None
    train_output = trainer.train(resume_from_checkpoint=resume)
    final_dir = save_final(trainer, tokenizer, cfg, output_dir)

    metrics = {"train_loss": whole_run_train_loss(trainer, train_output, resume), "steps": trainer.state.global_step}
    if held is not None:
        report = evaluate_pairs(trainer.model, tokenizer, list(held), max_length=cfg.train.max_length)
        metrics.update({k: v for k, v in report.items() if isinstance(v, float | int)})
    return finish_stage(trainer, logger, "rm", output_dir, {**metrics, "model": str(final_dir)}, start)
