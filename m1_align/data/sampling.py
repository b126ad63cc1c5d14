"""Taking a few rows out of many so that every task or subset is represented."""

from __future__ import annotations

import itertools
from collections import defaultdict
from typing import Any


def take_balanced(rows: list[dict[str, Any]], key: str, limit: int | None) -> list[dict[str, Any]]:
    """At most `limit` rows, taken round-robin over the groups of `key` so every group shows up."""
    if limit is None or len(rows) <= limit:
        return rows
    groups: dict[Any, list] = defaultdict(list)
    for row in rows:
        groups[row.get(key)].append(row)
    interleaved = (
        row for batch in itertools.zip_longest(*groups.values()) for row in batch if row is not None
    )
    return list(itertools.islice(interleaved, limit))


def limit_per_task(rows: list[dict[str, Any]], limit: int | None, from_end: bool = False) -> list[dict[str, Any]]:
    """At most `limit` rows per task, the first ones (or the last ones: from_end)."""
    if limit is None:
        return rows
    kept: dict[str, list] = defaultdict(list)
    for row in reversed(rows) if from_end else rows:
        if len(kept[row.get("task", "")]) < limit:
            kept[row.get("task", "")].append(row)
    return [row for rows_ in kept.values() for row in (reversed(rows_) if from_end else rows_)]
