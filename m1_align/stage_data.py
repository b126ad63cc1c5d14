"""The datasets each stage trains and evaluates on: the built medical data, or the user's files."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from datasets import Dataset

from m1_align.config import StageConfig
from m1_align.data.sampling import limit_per_task

HELDOUT_SFT_FRACTION = 0.02  # of the SFT conversations, kept aside for the held-out loss


def built_dir(cfg: StageConfig) -> Path:
    from m1_align.data.build import build_from_config

    return build_from_config(cfg.data)


def _split(cfg: StageConfig, split: str) -> list[dict[str, Any]]:
    """A built split's rows; training splits keep only `data.tasks` when it is set."""
    from m1_align.data.build import TRAIN_SPLITS, read_split_rows

    rows = read_split_rows(built_dir(cfg), split)
    if cfg.data.tasks is not None and split in TRAIN_SPLITS:
        rows = [r for r in rows if r["task"] in cfg.data.tasks]
    return rows


def _user(path: str, kind: str) -> Dataset:
    from m1_align.data.user_data import load_user_data

    return load_user_data(path, kind)


def sft_datasets(cfg: StageConfig) -> tuple[Dataset, Dataset | None]:
    """(train, held-out) conversations with a `messages` column."""
    if cfg.data.train_file:
        train = _user(cfg.data.train_file, "sft").select_columns(["messages"])
        held = _user(cfg.data.eval_file, "sft").select_columns(["messages"]) if cfg.data.eval_file else None
        return train, held
    rows = [{"messages": r["messages"]} for r in _split(cfg, "sft")]
    random.Random(cfg.data.seed).shuffle(rows)
    n_held = max(8, int(len(rows) * HELDOUT_SFT_FRACTION))
    return Dataset.from_list(rows[n_held:]), Dataset.from_list(rows[:n_held])


def _as_trl_preference(row: dict[str, Any], keep: tuple[str, ...]) -> dict[str, Any]:
    # TRL's conversational preference format: the responses are assistant messages too.
    prompt = row["prompt"] if isinstance(row["prompt"], list) else [{"role": "user", "content": row["prompt"]}]
    return {
        "prompt": prompt,
        "chosen": [{"role": "assistant", "content": row["chosen"]}],
        "rejected": [{"role": "assistant", "content": row["rejected"]}],
        "subset": row.get("subset") or row.get("task") or "all",
        **{k: row[k] for k in keep},
    }


def preference_datasets(
    cfg: StageConfig, keep: tuple[str, ...] = (), train_rows: list[dict[str, Any]] | None = None
) -> tuple[Dataset, Dataset | None]:
    """(train, held-out) pairs in TRL's conversational prompt/chosen/rejected format, with a `subset`
    column (the task) and any `keep` columns (e.g. a margin). `train_rows`: pairs made elsewhere (sampled
    on-policy) instead of the data's training pairs; the held-out pairs stay the data's."""
    if cfg.data.train_file:
        train = train_rows if train_rows is not None else _user(cfg.data.train_file, "preference")
        held = _user(cfg.data.eval_file, "preference") if cfg.data.eval_file else None
    else:
        train = train_rows if train_rows is not None else _split(cfg, "preference")
        held = limit_per_task(_split(cfg, "eval_preference"), cfg.train.eval_limit)
    train = [_as_trl_preference(r, keep) for r in train]
    held = [_as_trl_preference(r, keep) for r in held] if held else None
    return Dataset.from_list(train), Dataset.from_list(held) if held else None


def eval_rows(cfg: StageConfig, limit: int | None = None, split: str = "test") -> list[dict[str, Any]]:
    """Held-out verifiable questions: `prompt` (messages), `answer`, `rule`, `task`.

    split "test": the first `limit` questions per task, which the README reports; "dev": the last `limit`
    per task, for tuning and for the stages' own progress checks (disjoint from test while 2 x limit <=
    data.eval_per_task), so settings are never chosen on the reported questions."""
    if cfg.data.answer_eval_file:
        # user rows may omit how to check them: exact (normalised) match under the task "user"
        rows = [{"rule": "exact_term", "task": "user", **{k: v for k, v in r.items() if v is not None}}
                for r in _user(cfg.data.answer_eval_file, "rl")]
    elif cfg.data.builtin:
        rows = _split(cfg, "eval")
    else:
        return []
    if split not in ("test", "dev"):
        raise ValueError(f"unknown held-out split {split!r}; expected test or dev")
    # rows that name their side (the medcalc family) are split by it: test and dev never share a patient
    sided = [r for r in rows if r.get("heldout") == split]
    return limit_per_task([r for r in rows if "heldout" not in r], limit, from_end=split == "dev") + limit_per_task(sided, limit)


def rl_rows(cfg: StageConfig) -> list[dict[str, Any]]:
    """Training prompts with a verifiable answer (ELO, PPO)."""
    if cfg.data.train_file:
        return [{"rule": "exact_term", "task": "user", **{k: v for k, v in r.items() if v is not None}} for r in _user(cfg.data.train_file, "rl")]
    return _split(cfg, "rl")
