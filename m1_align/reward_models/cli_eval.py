"""`m1-align rm-eval`: score a reward model on preference pairs and write its report.

    m1-align rm-eval runs/quickstart/rm                         # built held-out pairs
    m1-align rm-eval runs/quickstart/rm --data rewardbench.jsonl --output runs/rb
    m1-align rm-eval configs/rm_eval.yaml limit=200

Pairs come from our preference format (prompt as messages or a string, chosen, rejected, task) or
RewardBench-style files (prompt, chosen, rejected, subset), as JSONL, Parquet or a `datasets`
folder; accuracy is broken down by `subset` (else `task`). Writes rm_eval.json, rm_eval.md and
reliability.png (see reward_models.evaluate).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from m1_align.config import ConfigError, RMEvalConfig
from m1_align.data.build import build_from_config, read_split_rows
from m1_align.data.sampling import take_balanced
from m1_align.data.user_data import DataError, load_user_data
from m1_align.reward_models.evaluate import evaluate_pairs, write_report
from m1_align.runs import StageResult
from m1_align.training import (
    ModelPathError,
    load_scalar_model,
    load_tokenizer,
    looks_like_hub_id,
    resolve_model_dir,
)

HEADLINE = ("pairs", "accuracy", "mean_margin", "ece", "longer_wins_rate", "longer_is_chosen_rate")


def load_pairs(cfg: RMEvalConfig) -> list[dict[str, Any]]:
    """The pairs to score, at most cfg.limit of them spread over the subsets."""
    if cfg.data.eval_file:
        try:
            rows = list(load_user_data(cfg.data.eval_file, "preference"))
        except DataError as err:
            raise ConfigError(f"data.eval_file: {err}") from None
    else:
        rows = read_split_rows(build_from_config(cfg.data), "eval_preference")
    for row in rows:
        row["subset"] = row.get("subset") or row.get("task") or "all"
    return take_balanced(rows, "subset", cfg.limit)


def run(cfg: RMEvalConfig) -> StageResult:
    start = time.time()
    if not cfg.model.path:
        raise ConfigError(
            "rm-eval needs a reward model: pass its folder (or a finished rm stage) or set model.path"
        )
    if not Path(cfg.model.path).expanduser().exists() and not looks_like_hub_id(cfg.model.path):
        raise ConfigError(f"reward model path {cfg.model.path} does not exist; pass a reward model folder or a "
                          "finished rm stage's output dir (runs/NAME/rm)")
    try:
        model_dir = resolve_model_dir(cfg.model.path)
    except ModelPathError as err:
        raise ConfigError(str(err)) from None
    rows = load_pairs(cfg)  # before loading the model: a bad data file fails fast
    stage_dir = model_dir.parent if model_dir != Path(cfg.model.path).expanduser() else None
    output_dir = (
        Path(cfg.output_dir)
        if cfg.output_dir
        else stage_dir / "rm_eval"
        if stage_dir
        else Path("runs/rm-eval") / model_dir.name
    )

    tokenizer = load_tokenizer(cfg.model, model_dir)
    model = load_scalar_model(cfg.model, model_dir, tokenizer)
    model.to("cuda" if torch.cuda.is_available() else "cpu")
    report = evaluate_pairs(model, tokenizer, rows, cfg.max_length, cfg.batch_size)
    source = cfg.data.eval_file or "built eval_preference split"
    write_report(report, output_dir, f"{model_dir} on {source}")

    metrics = {k: report[k] for k in HEADLINE}
    print(f"wrote {output_dir}/rm_eval.md, rm_eval.json and reliability.png")
    return StageResult("rm-eval", str(output_dir), metrics, time.time() - start)
