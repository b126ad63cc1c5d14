"""`m1-align eval`: held-out evaluation of one model (MMLU-medical, verifiable sets, reward model).

    m1-align eval runs/quickstart/sft               # a finished stage (its model/)
    m1-align eval runs/quickstart eval.limit=50     # a pipeline run: its last finished policy stage
    m1-align eval /models/my-hf-model configs/eval.yaml

Writes output_dir/eval.json (flat metrics), eval_samples.jsonl (every question with the model's
answer) and result.json, and prints a one-screen summary.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from m1_align.config import ConfigError, EvalConfig, ModelConfig
from m1_align.data.build import read_split_rows
from m1_align.data.chat import prompt_ids
from m1_align.data.sampling import take_balanced
from m1_align.evaluation import benchmarks
from m1_align.rewards.verifiable import hf_generator, verifiable_sets
from m1_align.runs import RESULT_FILE, StageResult, atomic_write_json, atomic_write_text, prepare_output_dir
from m1_align.stage_data import built_dir, eval_rows
from m1_align.training import (
    FINAL_MODEL,
    ModelPathError,
    load_model,
    load_scalar_model,
    load_tokenizer,
    looks_like_hub_id,
    resolve_model_dir,
)

# Pipeline stages that produce a policy, in pipeline order (rm produces a reward model).
POLICY_STAGES = ("pretrain", "sft", "elo", "tdpo", "ppo", "grpo")
HEADLINE = (
    "mmlu_medical/accuracy_generation",
    "mmlu_medical/accuracy_loglik",
    "verifiable/accuracy",
    "reward_model/mean",
    "verifiable/gold_answer_logp",
)


def resolve_target(path: str | Path) -> tuple[Path, Path | None]:
    """(model folder, stage output folder or None) for a model folder, a stage folder or a run folder."""
    path = Path(path).expanduser()
    if not path.exists() and not looks_like_hub_id(path):  # a Hub id gets resolve_model_dir's own advice
        raise ModelPathError(f"model path {path} does not exist; pass a model folder, a finished stage's output dir "
                             "(runs/NAME/sft) or a pipeline run dir (runs/NAME)")
    finished = [
        path / s
        for s in POLICY_STAGES
        if (path / s / RESULT_FILE).is_file() and (path / s / FINAL_MODEL).is_dir()
    ]
    if finished and not (path / "config.json").is_file():
        path = finished[-1]  # a pipeline run dir
    model_dir = resolve_model_dir(path)
    return model_dir, (path if model_dir != path else None)


def default_output_dir(model_dir: Path, stage_dir: Path | None) -> Path:
    return stage_dir / "eval" if stage_dir else Path("runs/eval") / model_dir.name


def make_generator(cfg: EvalConfig, model, tokenizer, model_dir: Path | None = None):
    """The one place generation is set up (greedy): vLLM where it is installed (rollout.engine auto or vllm)
    and a model folder is given, else HF generate. Returns (generate, close)."""
    from m1_align.rollout.engine import SamplingSettings
    from m1_align.rollout.factory import engine_max_len, make_engine, vllm_available

    loadable = model_dir is not None and (Path(model_dir) / "config.json").is_file()  # not a bare LoRA adapter
    kind = cfg.rollout.engine if cfg.rollout.engine != "auto" else ("vllm" if loadable and vllm_available() else "hf")
    if kind == "hf":
        return hf_generator(model, tokenizer, cfg.eval.max_new_tokens, cfg.eval.batch_size), lambda: None
    if model_dir is None:
        raise ConfigError("rollout.engine=vllm needs a model folder to load")
    engine = make_engine("vllm", model_dir=str(model_dir), tokenizer=tokenizer, dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
                         kv_cache_gib=cfg.rollout.kv_cache_gib, gpu_memory_utilization=cfg.rollout.gpu_memory_utilization,
                         enforce_eager=cfg.rollout.enforce_eager, in_process=cfg.rollout.in_process, seed=cfg.seed,
                         max_model_len=engine_max_len(model.config, cfg.eval.max_length + cfg.eval.max_new_tokens))
    greedy = SamplingSettings(n=1, temperature=0.0, max_new_tokens=cfg.eval.max_new_tokens, stop_token_ids=[tokenizer.eos_token_id])

    def generate(prompts: list[benchmarks.Messages]) -> list[str]:
        outputs = engine.generate([prompt_ids(tokenizer, p) for p in prompts], greedy)
        return [o[0].text for o in outputs]

    return generate, engine.close


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _mmlu_rows(cfg: EvalConfig) -> list[dict[str, Any]]:
    if not (cfg.eval.mmlu_medical and cfg.data.builtin):
        return []
    return take_balanced(
        read_split_rows(built_dir(cfg), "mmlu_medical"), "subject", cfg.eval.mmlu_limit
    )


def _open_rows(cfg: EvalConfig) -> list[dict[str, Any]]:
    rows = read_split_rows(built_dir(cfg), "eval_preference")
    return take_balanced(rows, "task", cfg.eval.limit)


def evaluate(cfg: EvalConfig, model, tokenizer, model_dir: Path | None = None) -> tuple[dict[str, Any], list[dict]]:
    """Every enabled benchmark on a loaded model: (flat metrics, per-question samples)."""
    generate, close = make_generator(cfg, model, tokenizer, model_dir)
    try:
        return _benchmarks(cfg, model, tokenizer, generate)
    finally:
        close()


def _benchmarks(cfg: EvalConfig, model, tokenizer, generate) -> tuple[dict[str, Any], list[dict]]:
    metrics: dict[str, Any] = {}
    samples: list[dict] = []
    clock = time.time()

    def lap(name: str) -> None:  # where evaluation time goes (seconds/<part> in eval.json)
        nonlocal clock
        metrics[f"seconds/{name}"] = round(time.time() - clock, 1)
        clock = time.time()

    mmlu = _mmlu_rows(cfg)
    if mmlu:
        found, rows = benchmarks.mmlu_medical(model, tokenizer, mmlu, generate, cfg.eval.batch_size, cfg.eval.mmlu_generation_limit)
        metrics.update(found)
        samples += rows
        lap("mmlu_medical")
    verifiable = eval_rows(cfg, cfg.eval.limit, cfg.eval.split) if cfg.eval.verifiable_sets else []
    if verifiable:
        found, rows = verifiable_sets(verifiable, generate)
        metrics.update(found)
        lap("verifiable")
        metrics.update(benchmarks.gold_answer_logprobs(model, tokenizer, verifiable, [r["completion"] for r in rows], cfg.eval.batch_size))
        samples += rows
        lap("gold_answer_logp")
    if cfg.eval.reward_model:
        rm_config = ModelConfig(
            path=cfg.eval.reward_model, dtype=cfg.model.dtype, trust_remote_code=cfg.model.trust_remote_code
        )
        rm_dir = resolve_model_dir(rm_config.path)
        rm_tokenizer = load_tokenizer(rm_config, rm_dir)
        reward_model = load_scalar_model(rm_config, rm_dir, rm_tokenizer).to(_device())
        found, rows = benchmarks.reward_model_scores(
            _open_rows(cfg), generate, reward_model, rm_tokenizer, cfg.eval.max_length, cfg.eval.batch_size
        )
        metrics.update(found)
        samples += rows
    return metrics, samples


def format_summary(metrics: dict[str, Any], title: str) -> str:
    """Headline numbers first, then the breakdowns, one metric per line."""
    keys = [k for k in HEADLINE if k in metrics] + sorted(k for k in metrics if k not in HEADLINE)
    width = max((len(k) for k in keys), default=0)
    lines = [title, "-" * len(title)]
    for key in keys:
        value = metrics[key]
        lines.append(
            f"{key:<{width}}  {value:.4f}" if isinstance(value, float) else f"{key:<{width}}  {value}"
        )
    return "\n".join(lines)


def run(cfg: EvalConfig) -> StageResult:
    start = time.time()
    if not cfg.model.path:
        raise ConfigError(
            "eval needs a model: pass a model folder, stage output or run dir (or set model.path)"
        )
    try:
        model_dir, stage_dir = resolve_target(cfg.model.path)
    except ModelPathError as err:
        raise ConfigError(str(err)) from None
    try:
        if cfg.eval.reward_model:
            resolve_model_dir(cfg.eval.reward_model)  # fail before any generation
    except ModelPathError as err:
        raise ConfigError(f"eval.reward_model: {err}") from None
    output_dir = prepare_output_dir(cfg.output_dir or default_output_dir(model_dir, stage_dir), cfg.overwrite)

    torch.manual_seed(cfg.seed)
    tokenizer = load_tokenizer(cfg.model, model_dir)
    model = load_model(cfg.model, model_dir=model_dir).to(_device())
    metrics, samples = evaluate(cfg, model, tokenizer, model_dir)

    atomic_write_json(output_dir / "eval.json", {"model": str(model_dir), **metrics})
    atomic_write_text(
        output_dir / "eval_samples.jsonl", "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples)
    )
    print(format_summary(metrics, f"eval of {model_dir}"))
    headline = {k: metrics[k] for k in HEADLINE if k in metrics}
    result = StageResult("eval", str(output_dir), headline, time.time() - start)
    result.save()
    return result
