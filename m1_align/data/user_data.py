"""Load a user's own data (JSONL, Parquet or a saved `datasets` folder) into the shapes the stages
train on, with one clear error naming the file, the line and the expected shape when it is wrong.

    sft:        messages, or prompt/completion (normalised to messages)
    preference: prompt, chosen, rejected   (prompt -> messages; chosen/rejected -> strings)
    rl:         prompt, answer             (prompt -> messages); rule: how the answer is checked, or "open"
                                           for an open question the reward model scores (answer: a reference)

A prompt may be a string (one user turn) or a list of {"role", "content"} messages; other columns
are kept as they are.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

EXPECTED = {
    "sft": "keys messages (a list of {role, content}) or prompt, completion",
    "preference": "keys prompt, chosen, rejected",
    "rl": "keys prompt, answer",
}
ROLES = ("system", "user", "assistant")
# an RL row's rule for an open question: no rule checks it, the reward model scores the response (reward.model)
OPEN_RULE = "open"


class DataError(ValueError):
    """User data that cannot be read in the requested shape."""


def load_user_data(path: str | Path, kind: str):
    """Read path as `kind` ("sft", "preference" or "rl") and return a datasets.Dataset."""
    from datasets import Dataset

    if kind not in EXPECTED:
        raise DataError(f"unknown data kind {kind!r}; expected one of {', '.join(EXPECTED)}")
    path = Path(path)
    rows = [normalise_row(row, kind, where, _shape(path, kind)) for where, row in _read_rows(path, kind)]
    if not rows:
        raise DataError(f"{path.name}: no rows; expected {_shape(path, kind)}")
    rows = drop_degenerate(rows, kind, path.name)
    # Every column of any row (from_list would keep only the first row's keys); absent -> None.
    columns = list(dict.fromkeys(key for row in rows for key in row))
    return Dataset.from_dict({c: [row.get(c) for row in rows] for c in columns})


def degenerate_reason(row: dict[str, Any], kind: str) -> str | None:
    """Why a row can teach nothing (and would only train towards a constant loss), or None."""
    if kind == "preference":
        if not row["chosen"].strip() or not row["rejected"].strip():
            return "an empty response"
        if row["chosen"].strip() == row["rejected"].strip():
            return "chosen == rejected"
    elif kind == "rl" and not row["answer"].strip():
        return "an empty answer"
    elif kind == "sft" and not any(m["content"].strip() for m in row["messages"] if m["role"] == "assistant"):
        return "an empty assistant message"
    return None


# what a row of each kind needs to teach something (degenerate_reason), said when no row has it
USABLE_ROW = {"preference": "give each pair a non-empty chosen and rejected that differ",
              "rl": "give each question a non-empty answer", "sft": "give each conversation an assistant reply with text"}


def drop_degenerate(rows: list[dict[str, Any]], kind: str, source: str) -> list[dict[str, Any]]:
    """Drop rows that carry no signal, with a count per reason; all of them degenerate is an error."""
    reasons = Counter()
    kept = []
    for row in rows:
        reason = degenerate_reason(row, kind)
        if reason is None:
            kept.append(row)
        else:
            reasons[reason] += 1
    if reasons:
        counts = ", ".join(f"{n} with {reason}" for reason, n in reasons.most_common())
        if not kept:
            raise DataError(f"{source}: every row is degenerate ({counts}), nothing to train on; {USABLE_ROW[kind]}")
        print(f"warning: {source}: dropped {len(rows) - len(kept)} of {len(rows)} rows ({counts}); they carry no signal",
              file=sys.stderr)
    return kept


def _shape(path: Path, kind: str) -> str:
    unit = "one JSON object per line" if path.suffix in (".jsonl", ".json") else "rows"
    return f"{unit} with {EXPECTED[kind]}"


def _read_rows(path: Path, kind: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """(location for error messages, row) pairs."""
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    if path.is_dir():
        yield from _read_saved_dataset(path)
    elif path.suffix in (".jsonl", ".json"):
        yield from _read_jsonl(path, kind)
    elif path.suffix == ".parquet":
        yield from _read_parquet(path, kind)
    else:
        raise DataError(
            f"{path.name}: unsupported file type '{path.suffix}'; expected a .jsonl or .parquet file "
            "or a folder written by datasets' save_to_disk"
        )


def _read_jsonl(path: Path, kind: str) -> Iterator[tuple[str, dict[str, Any]]]:
    if path.stat().st_size == 0:
        raise DataError(f"{path.name}: file is empty; expected {_shape(path, kind)}")
    with path.open(encoding="utf-8") as f:
        try:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path.name} line {number}"
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{where}: not valid JSON ({e}); expected {_shape(path, kind)}") from None
                if not isinstance(row, dict):
                    raise DataError(
                        f"{where}: a JSON {type(row).__name__}, not an object; expected {_shape(path, kind)}"
                    )
                yield where, row
        except UnicodeDecodeError as e:
            raise DataError(f"{path.name}: not UTF-8 text ({e.reason}); save the file as UTF-8") from None


def _read_parquet(path: Path, kind: str) -> Iterator[tuple[str, dict[str, Any]]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for a corrupt or empty file
        raise DataError(
            f"{path.name}: not a readable Parquet file ({e}); expected {_shape(path, kind)}"
        ) from None
    for number, row in enumerate(table.to_pylist(), 1):
        yield f"{path.name} row {number}", row


def _read_saved_dataset(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    from datasets import DatasetDict, load_from_disk

    try:
        data = load_from_disk(str(path))
    except Exception as e:
        raise DataError(f"{path.name}: not a folder written by datasets' save_to_disk ({e})") from None
    if isinstance(data, DatasetDict):
        if "train" not in data:
            raise DataError(f"{path.name}: a DatasetDict without a 'train' split (has {', '.join(data)})")
        data = data["train"]
    for number, row in enumerate(data, 1):
        yield f"{path.name} row {number}", row


# ---------------------------------------------------------------------------------------------
# Shapes
# ---------------------------------------------------------------------------------------------


def normalise_row(
    row: dict[str, Any], kind: str, where: str = "row", expected: str | None = None
) -> dict[str, Any]:
    """One row in the canonical shape of `kind`, or a DataError naming `where` and the shape."""

    def fail(problem: str) -> DataError:
        return DataError(f"{where}: {problem}; expected {expected or EXPECTED[kind]}")

    def require(*keys: str) -> None:
        missing = [k for k in keys if row.get(k) is None]
        if missing:
            raise fail(f"missing key{'s' if len(missing) > 1 else ''} {', '.join(missing)}")

    out = dict(row)
    if kind == "sft":
        if row.get("messages") is not None:
            out["messages"] = _messages(row["messages"], "messages", fail)
        else:
            require("prompt", "completion")
            completion = row["completion"]
            completion = (
                _messages(completion, "completion", fail)
                if isinstance(completion, list)
                else [{"role": "assistant", "content": _text(completion, "completion", fail)}]
            )
            out["messages"] = _messages(row["prompt"], "prompt", fail) + completion
            del out["prompt"], out["completion"]
        if not any(m["role"] == "assistant" for m in out["messages"]):
            raise fail("no assistant message to train on")
    elif kind == "preference":
        require("prompt", "chosen", "rejected")
        out["prompt"] = _messages(row["prompt"], "prompt", fail)
        out["chosen"] = _response(row["chosen"], "chosen", fail)
        out["rejected"] = _response(row["rejected"], "rejected", fail)
    else:
        require("prompt", "answer")
        out["prompt"] = _messages(row["prompt"], "prompt", fail)
        out["answer"] = _text(row["answer"], "answer", fail)
        if row.get("rule") is not None:
            from m1_align.data.rules import RULES

            if row["rule"] not in RULES and row["rule"] != OPEN_RULE:
                raise fail(f"unknown rule {row['rule']!r} (known: {', '.join(RULES)}; {OPEN_RULE!r} for an open "
                           "question the reward model scores)")
    return out


def _text(value: Any, key: str, fail) -> str:
    if not isinstance(value, str):
        raise fail(f"'{key}' must be a string, not {type(value).__name__}")
    return value


def _messages(value: Any, key: str, fail) -> list[dict[str, str]]:
    """A string becomes one user turn; a list must hold {role, content} dicts."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise fail(f"'{key}' must be a string or a non-empty list of {{role, content}} messages")
    messages = []
    for i, message in enumerate(value):
        if (
            not isinstance(message, dict)
            or message.get("role") not in ROLES
            or not isinstance(message.get("content"), str)
        ):
            raise fail(f'\'{key}\'[{i}] must be {{"role": one of {"/".join(ROLES)}, "content": a string}}')
        messages.append({"role": message["role"], "content": message["content"]})
    return messages


def _response(value: Any, key: str, fail) -> str:
    """chosen/rejected: a string, or assistant messages (TRL's conversational form) joined."""
    if isinstance(value, list):
        return "".join(m["content"] for m in _messages(value, key, fail) if m["role"] == "assistant")
    return _text(value, key, fail)
