"""On-policy preference pairs: the starting model's own answers, right against wrong.

The built preference split pairs a written gold explanation with a sibling item's: text the model did not
write. `tdpo.pairs=on_policy` instead samples `pair_samples` responses to each of `pair_prompts` verifiable
training questions from the starting model (the rollout engine: vLLM where installed), checks each answer
with its rule, and pairs a right response (chosen) with a wrong one (rejected) of the same question, as
Iterative RPO does (Pang et al. 2024, with the NLL term `tdpo.rpo_alpha`). Questions whose samples are all
right or all wrong give no pair. With several processes each samples its share of the questions with its own
engine, and all get every pair. The pairs are written once to `<output_dir>/pairs.jsonl` and reused on resume
while the model and the sampling settings they came from are the same.
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

import m1_align.model  # noqa: F401  registers baichuan_m1 with AutoConfig
from m1_align.config import ConfigError, TDPOConfig
from m1_align.data.chat import prompt_ids
from m1_align.data.rules import score as rule_score
from m1_align.rollout.engine import Completion, SamplingSettings
from m1_align.rollout.factory import stage_engine
from m1_align.runs import atomic_write_text
from m1_align.stage_data import rl_rows

logger = logging.getLogger(__name__)

PAIRS_FILE = "pairs.jsonl"
COUNTS_FILE = "pairs_counts.json"  # written after PAIRS_FILE: its presence marks both complete
SAMPLING_CHUNK = 32  # questions per engine call (and per progress-bar update)


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
    return list(zip(right, wrong, strict=False))[:per_prompt]  # as many as the shorter side


def sample_pairs(
    engine, tokenizer, rows: Sequence[dict[str, Any]], settings: SamplingSettings, per_prompt: int,
    judge: Callable[[dict[str, Any], str], float] = lambda row, text: rule_score(row["rule"], text, row["answer"]).score,
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Pairs in the built preference split's format (prompt messages, chosen, rejected, task), and counts."""
    prompts = [prompt_ids(tokenizer, row["prompt"]) for row in rows]
    completions = []
    with tqdm(total=len(rows), desc="sampling on-policy pairs", unit="question") as progress:
        for start in range(0, len(rows), SAMPLING_CHUNK):
            # a fresh seed per chunk, past every seed the previous chunks used (vLLM seeds a request's samples
            # seed, seed + 1, ...; a seeded CPU engine would otherwise replay one random stream per chunk)
            seed = None if settings.seed is None else settings.seed + start * settings.n
            completions += engine.generate(prompts[start : start + SAMPLING_CHUNK], replace(settings, seed=seed))
            progress.update(len(prompts[start : start + SAMPLING_CHUNK]))
    pairs, n_right, n_samples, rejected_cut_off = [], 0, 0, 0
    for row, samples in zip(rows, completions, strict=True):
        scores = [judge(row, sample.text) for sample in samples]
        n_right += sum(s >= 1.0 for s in scores)
        n_samples += len(scores)
        cut_off = {s.text for s in samples if s.finish_reason == "length"}
        for chosen, rejected in right_wrong_pairs(samples, scores, per_prompt):
            pairs.append({"prompt": row["prompt"], "chosen": chosen, "rejected": rejected, "task": row.get("task", "user")})
            rejected_cut_off += rejected in cut_off
    counts = {"pairs/count": len(pairs), "pairs/prompts": len(rows), "pairs/right_samples": n_right,
              "pairs/samples": n_samples, "pairs/rejected_cut_off": rejected_cut_off}
    return pairs, counts


def _provenance(cfg: TDPOConfig, model_dir: Path) -> dict[str, Any]:
    """What the pairs depend on: a resumed run reuses its pairs only while all of it is unchanged."""
    weights = sorted(model_dir.glob("*.safetensors"))
    return json.loads(json.dumps({"model": str(model_dir.resolve()), "model_mtime": max((w.stat().st_mtime for w in weights), default=0.0),
            "seed": cfg.seed, "data": cfg.data.model_dump(), "pairs": cfg.tdpo.model_dump(include={"pair_prompts", "pair_samples", "pairs_per_prompt"}),
            "rollout": cfg.rollout.model_dump(include={"temperature", "top_p", "max_new_tokens", "engine"})}))  # as read back


def _sample_share(cfg: TDPOConfig, model_dir: Path, tokenizer, rows, world_size: int, rank: int):
    """This process's pairs and counts, sampled with its own engine."""
    r = cfg.rollout
    engine = stage_engine(cfg, model_dir, tokenizer, world_size=world_size, rank=rank)
    try:
        settings = SamplingSettings(n=cfg.tdpo.pair_samples, temperature=r.temperature, top_p=r.top_p,
                                    max_new_tokens=r.max_new_tokens, stop_token_ids=[tokenizer.eos_token_id], seed=cfg.seed)
        return sample_pairs(engine, tokenizer, rows, settings, cfg.tdpo.pairs_per_prompt)
    finally:
        engine.close()


def on_policy_pairs(cfg: TDPOConfig, model_dir: Path, tokenizer, output_dir: Path) -> tuple[list[dict[str, Any]], dict, bool]:
    """The stage's pairs, their counts, and whether they were sampled now (False: read from `output_dir`, where
    an interrupted run of the same model and settings wrote them). Every process of a multi-process run calls
    this together; each samples its share and all return every pair; the main process writes the files."""
    from accelerate import PartialState
    from accelerate.utils import gather_object

    state = PartialState()
    path, counts_path = output_dir / PAIRS_FILE, output_dir / COUNTS_FILE
    provenance = _provenance(cfg, model_dir)
    if path.is_file() and counts_path.is_file():
        counts = json.loads(counts_path.read_text())
        if counts.pop("provenance", None) == provenance:
            return [json.loads(line) for line in path.read_text().splitlines() if line.strip()], counts, False
        logger.warning("%s came from another model or other settings; sampling the pairs again", path)
    rows = [row for row in rl_rows(cfg) if row.get("answer") and row.get("rule")]
    if not rows:
        raise ConfigError("tdpo.pairs=on_policy needs training questions with an answer and a rule (the built rl split, "
                          "or data.train_file in the rl format); use tdpo.pairs=built for written pairs")
    random.Random(cfg.seed).shuffle(rows)
    rows = rows[: cfg.tdpo.pair_prompts]

    share = rows[state.process_index :: state.num_processes]
    try:  # an error on one process must reach the others, which would otherwise wait for it forever
        outcome = _sample_share(cfg, model_dir, tokenizer, share, state.num_processes, state.process_index)
    except Exception as error:  # noqa: BLE001  re-raised below, on every process
        outcome = error
    outcomes = gather_object([outcome]) if state.num_processes > 1 else [outcome]
    failed = next((o for o in outcomes if isinstance(o, BaseException)), None)
    if failed is not None:
        if isinstance(outcome, BaseException):
            raise outcome
        raise RuntimeError(f"tdpo.pairs=on_policy: another process failed while sampling ({failed})")
    pairs = [pair for share_pairs, _ in outcomes for pair in share_pairs]
    counts = {key: sum(c[key] for _, c in outcomes) for key in outcomes[0][1]}
    counts["pairs/sample_accuracy"] = counts["pairs/right_samples"] / max(counts["pairs/samples"], 1)
    logger.info("on-policy pairs: %s", counts)
    if not pairs:
        raise ConfigError(
            f"tdpo.pairs=on_policy: none of {len(rows)} questions had both a right and a wrong answer among "
            f"{cfg.tdpo.pair_samples} samples (sample accuracy {counts['pairs/sample_accuracy']:.3f}); raise "
            "tdpo.pair_samples or tdpo.pair_prompts, or use tdpo.pairs=built"
        )
    if state.is_main_process:
        atomic_write_text(path, "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs))
        atomic_write_text(counts_path, json.dumps({**counts, "provenance": provenance}, indent=2) + "\n")
    state.wait_for_everyone()
    return pairs, counts, True
