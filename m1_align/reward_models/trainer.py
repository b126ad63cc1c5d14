"""`m1-align rm`: a Bradley-Terry reward model, loss = -log sigma(r(x, y_w) - r(x, y_l) [- margin]).

TRL's RewardTrainer does the tokenisation and the loss; the model is the hybrid model's
sequence-classification variant (a scalar `score` head on the last token) or any HF
AutoModelForSequenceClassification. At the end the reward model is evaluated on held-out pairs
with `m1-align rm-eval`'s metrics.
"""

from __future__ import annotations

from pathlib import Path

from transformers import set_seed
from trl import RewardConfig, RewardTrainer

from m1_align.config import ConfigError, RMConfig
from m1_align.reward_models.evaluate import evaluate_pairs
from m1_align.runs import MetricsLogger, StageResult
from m1_align.stage_data import preference_datasets
from m1_align.training import (
    WSDScheduleMixin,
    load_scalar_model,
    run_trainer_stage,
    source_model,
    trainer_hooks,
    training_arguments,
)


class M1RewardTrainer(WSDScheduleMixin, RewardTrainer):
    pass


def _with_margin(dataset, column: str | None):
    if column is None or dataset is None:
        return dataset
    if column not in dataset.column_names:
        raise ConfigError(f"rm.margin_column {column!r} is not a column of the preference data ({dataset.column_names})")
    return dataset.rename_column(column, "margin") if column != "margin" else dataset


def build_trainer(cfg: RMConfig, output_dir: Path, logger: MetricsLogger):
    model_dir, tokenizer = source_model(cfg)
    train, held = preference_datasets(cfg, keep=[cfg.rm.margin_column] if cfg.rm.margin_column else ())
    set_seed(cfg.seed)  # the scalar head is initialised at load time: same seed, same reward model
    model = load_scalar_model(cfg.model, model_dir, tokenizer)
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
        **trainer_hooks(cfg, logger, "SEQ_CLS"),
    )
    trainer.held_out_pairs = held
    return trainer, tokenizer, {}


def evaluate(cfg: RMConfig):
    def held_out(trainer, tokenizer, final_dir) -> dict:
        metrics = {}
        if trainer.held_out_pairs is not None:
            report = evaluate_pairs(trainer.model, tokenizer, list(trainer.held_out_pairs), max_length=cfg.train.max_length)
            metrics.update({k: v for k, v in report.items() if isinstance(v, float | int)})
        return {**metrics, "model": str(final_dir)}

    return held_out


def run(cfg: RMConfig) -> StageResult:
    return run_trainer_stage(cfg, "rm", build_trainer, evaluate(cfg))
