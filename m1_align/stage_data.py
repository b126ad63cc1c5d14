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
        check_open_rows(cfg, "answer_eval_file", [r["rule"] for r in rows])
    elif cfg.data.builtin:
        rows = _split(cfg, "eval")
    else:
        return []
    if split not in ("test", "dev"):
        raise ValueError(f"unknown held-out split {split!r}; expected test or dev")
    # rows that name their side (the medcalc family) are split by it: test and dev never share a patient
    sided = [r for r in rows if r.get("heldout") == split]
    return limit_per_task([r for r in rows if "heldout" not in r], limit, from_end=split == "dev") + limit_per_task(sided, limit)


def user_rl_rows(path: str) -> list[dict[str, Any]]:
    """A user's RL rows: a row without a rule is checked by exact (normalised) match, and an open one (rule
    "open") gets rule None, as the built open prompts have: the reward router sends it to the reward model."""
    from m1_align.data.user_data import OPEN_RULE

    rows = [{"rule": "exact_term", "task": "user", **{k: v for k, v in r.items() if v is not None}} for r in _user(path, "rl")]
    return [{**r, "rule": None} if r["rule"] == OPEN_RULE else r for r in rows]


def check_open_rows(cfg: StageConfig, field: str, rules: list[str | None]) -> None:
    """A user file's open rows (rule "open", `rules` its rule column) are read only where something scores them:
    ELO (the reference's log-likelihood) and PPO/GRPO with a reward model. A DataError of one line otherwise."""
    from m1_align.data.user_data import OPEN_RULE, DataError
    from m1_align.rewards.router import open_prompt_problem

    n_open = sum(rule == OPEN_RULE for rule in rules)
    if not n_open:
        return
    problem = None
    if field != "train_file":
        problem = "held-out answer accuracy checks each answer by its rule; give them a rule or leave them out"
    elif type(cfg).__name__ == "TDPOConfig":
        problem = "tdpo.pairs=on_policy checks each sample by its rule; give them a rule or leave them out"
    elif getattr(cfg, "reward", None) is not None:
        problem = open_prompt_problem(cfg.reward)
    if problem:
        raise DataError(f"{n_open} rows have rule {OPEN_RULE!r} (open questions), but {problem}")


def check_open_tasks(cfg: StageConfig) -> None:
    """data.rl_open_tasks on an RL stage whose rewards cannot score open prompts: a ConfigError of one line."""
    from m1_align.config import ConfigError
    from m1_align.rewards.router import open_prompt_problem

    reward = getattr(cfg, "reward", None)
    problem = open_prompt_problem(reward) if reward is not None and cfg.data.rl_open_tasks and not cfg.data.train_file else None
    if problem:
        raise ConfigError(f"data.rl_open_tasks={cfg.data.rl_open_tasks} puts open prompts in the RL split, but {problem}")


def rl_rows(cfg: StageConfig) -> list[dict[str, Any]]:
    """Training prompts (ELO, PPO): verifiable ones with their rule, open ones (rule None, `answer` a reference)
    when data.rl_open_tasks or the user's file has them."""
    if cfg.data.train_file:
        return user_rl_rows(cfg.data.train_file)
    return _split(cfg, "rl")
