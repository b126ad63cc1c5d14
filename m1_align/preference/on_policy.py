"""On-policy preference pairs: the starting model's own answers, right against wrong.

The built preference split pairs a written gold explanation with a sibling item's: text the model did not
write. `tdpo.pairs=on_policy` instead samples `pair_samples` responses to each of `pair_prompts` verifiable
training questions from the starting model (the rollout engine: vLLM where installed), checks each answer
with its rule, and pairs a right response (chosen) with a wrong one (rejected) of the same question, as
Iterative RPO does (Pang et al. 2024, with the NLL term `tdpo.rpo_alpha`). Questions whose samples are all
right or all wrong give no pair. The pairs are written once to `<output_dir>/pairs.jsonl` and reused on
resume.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm
from transformers import AutoConfig

import m1_align.model  # noqa: F401  registers baichuan_m1 with AutoConfig
from m1_align.config import ConfigError, TDPOConfig
from m1_align.data.stage_data import rl_rows
from m1_align.evaluation.benchmarks import prompt_ids
from m1_align.reward_models.rules import score as rule_score
from m1_align.rl.rollout import Completion, SamplingSettings, engine_max_len, make_engine, vllm_available
from m1_align.runs import atomic_write_text
from m1_align.training import compute_dtype

logger = logging.getLogger(__name__)

PAIRS_FILE = "pairs.jsonl"
SAMPLING_CHUNK = 32  # questions per engine call


def right_wrong_pairs(samples: Sequence[Completion], scores: Sequence[float], per_prompt: int) -> list[tuple[str, str]]:
    """Up to `per_prompt` (chosen, rejected) texts from one question's samples: a right answer (score 1, ended
    by the stop token, not cut off) against a wrong one, each text used at most once; duplicates count once."""
    right, wrong = [], []
    for sample, value in zip(samples, scores, strict=True):
        if value >= 1.0 and sample.finish_reason == "stop":
            bucket = right
        elif value < 1.0:
            bucket = wrong
        else:
            continue  # a right answer that ran out of tokens is not the behaviour we want more of
        if sample.text not in bucket:
            bucket.append(sample.text)
    return list(zip(right, wrong))[:per_prompt]


def sample_pairs(
    engine, tokenizer, rows: Sequence[dict[str, Any]], settings: SamplingSettings, per_prompt: int,
    judge: Callable[[dict[str, Any], str], float] = lambda row, text: rule_score(row["rule"], text, row["answer"]).score,
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Pairs in the built preference split's format (prompt messages, chosen, rejected, task), and counts."""
    prompts = [prompt_ids(tokenizer, row["prompt"]) for row in rows]
    completions = []
    with tqdm(total=len(rows), desc="sampling on-policy pairs", unit="question") as progress:
        for start in range(0, len(rows), SAMPLING_CHUNK):  # chunks only for the progress bar: the engine batches each
            # a fresh draw per chunk: a seeded CPU engine would otherwise reuse one random stream for every chunk
            chunk_settings = replace(settings, seed=None if settings.seed is None else settings.seed + start)
            completions += engine.generate(prompts[start : start + SAMPLING_CHUNK], chunk_settings)
            progress.update(len(prompts[start : start + SAMPLING_CHUNK]))
    pairs, n_right, n_samples = [], 0, 0
    for row, samples in zip(rows, completions, strict=True):
        scores = [judge(row, sample.text) for sample in samples]
        n_right += sum(s >= 1.0 for s in scores)
        n_samples += len(scores)
        for chosen, rejected in right_wrong_pairs(samples, scores, per_prompt):
            pairs.append({"prompt": row["prompt"], "chosen": chosen, "rejected": rejected, "task": row.get("task", "user")})
    counts = {"pairs/count": len(pairs), "pairs/prompts": len(rows), "pairs/sample_accuracy": n_right / max(n_samples, 1)}
    return pairs, counts


def on_policy_pairs(cfg: TDPOConfig, model_dir: Path, tokenizer, output_dir: Path) -> tuple[list[dict[str, Any]], dict]:
    """The stage's pairs and their counts: read from `output_dir` when an earlier (interrupted) run wrote them,
    else sampled from the model in `model_dir` and written there."""
    path, counts_path = output_dir / PAIRS_FILE, output_dir / "pairs_counts.json"
    if path.is_file() and counts_path.is_file():
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()], json.loads(counts_path.read_text())
    t, r = cfg.tdpo, cfg.rollout
    rows = [row for row in rl_rows(cfg) if row.get("answer") and row.get("rule")]
    if not rows:
        raise ConfigError("tdpo.pairs=on_policy needs training questions with an answer and a rule (the built rl split, "
                          "or data.train_file in the rl format); use tdpo.pairs=built for written pairs")
    random.Random(cfg.seed).shuffle(rows)
    rows = rows[: t.pair_prompts]
    kind = r.engine if r.engine != "auto" else ("vllm" if vllm_available() else "hf")
    engine = make_engine(
        kind, model_dir=str(model_dir), tokenizer=tokenizer, **(
            {} if kind == "hf" else {
                "dtype": str(compute_dtype(cfg.model.dtype)).removeprefix("torch."), "kv_cache_gib": r.kv_cache_gib,
                "gpu_memory_utilization": r.gpu_memory_utilization, "enforce_eager": r.enforce_eager,
                "in_process": r.in_process, "seed": cfg.seed,
                "max_model_len": engine_max_len(AutoConfig.from_pretrained(model_dir), cfg.train.max_length + r.max_new_tokens),
            }
        ),
    )
    try:
        settings = SamplingSettings(
            n=t.pair_samples, temperature=r.temperature, top_p=r.top_p, max_new_tokens=r.max_new_tokens,
            stop_token_ids=[tokenizer.eos_token_id], seed=cfg.seed,
        )
        pairs, counts = sample_pairs(engine, tokenizer, rows, settings, t.pairs_per_prompt)
    finally:
        engine.close()
    logger.info("on-policy pairs: %s", counts)
    if not pairs:
        raise ConfigError(
            f"tdpo.pairs=on_policy: none of {len(rows)} questions had both a right and a wrong answer among "
            f"{t.pair_samples} samples (sample accuracy {counts['pairs/sample_accuracy']:.3f}); raise tdpo.pair_samples "
            "or tdpo.pair_prompts, or use tdpo.pairs=built"
        )
    atomic_write_text(path, "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs))
    atomic_write_text(counts_path, json.dumps(counts, indent=2) + "\n")  # second: its presence marks both complete
    return pairs, counts
