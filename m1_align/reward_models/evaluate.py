"""`m1-align rm-eval`: how good is a reward model, beyond one accuracy number.

For every pair it scores both responses, then reports pairwise accuracy, the mean margin, accuracy
per subset, calibration of the Bradley-Terry probability sigma(r_w - r_l) (expected calibration
error, with a reliability diagram), length bias (how often the longer response wins, against how
often the longer response is the chosen one) and the worst pairs. Reads our preference files and
RewardBench-style files (`prompt`, `chosen`, `rejected`, `subset`).
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from m1_align.rewards.reward_model import score_conversations
from m1_align.runs import atomic_write_text


def _messages(prompt: Any, response: Any) -> list[dict[str, str]]:
    prompt = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
    response = response if isinstance(response, list) else [{"role": "assistant", "content": response}]
    return list(prompt) + list(response)


def _text(response: Any) -> str:
    return response[-1]["content"] if isinstance(response, list) else response


def expected_calibration_error(probs: list[float], outcomes: list[int], bins: int = 10) -> tuple[float, list[dict]]:
    """ECE over equal-width bins, and the bins themselves (for the reliability diagram)."""
    table, ece, n = [], 0.0, len(probs)
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        idx = [i for i, p in enumerate(probs) if lo <= p < hi or (b == bins - 1 and p == 1.0)]
        if not idx:
            continue
        confidence = sum(probs[i] for i in idx) / len(idx)
        accuracy = sum(outcomes[i] for i in idx) / len(idx)
        ece += len(idx) / n * abs(accuracy - confidence)
        table.append({"lo": lo, "hi": hi, "count": len(idx), "confidence": confidence, "accuracy": accuracy})
    return ece, table


def pair_report(rows: list[dict], chosen_scores: list[float], rejected_scores: list[float], worst: int = 5) -> dict:
    margins = [c - r for c, r in zip(chosen_scores, rejected_scores, strict=True)]
    n = len(margins)
    by_subset: dict[str, list[float]] = defaultdict(list)
    for row, m in zip(rows, margins, strict=True):
        by_subset[str(row.get("subset") or row.get("task") or "all")].append(float(m > 0))
    # Calibration: each pair in both orders, so "first response wins" has outcome 1 and 0 equally often.
    probs = [1 / (1 + math.exp(-m)) for m in margins]
    ece, bins = expected_calibration_error(probs + [1 - p for p in probs], [1] * n + [0] * n)
    lengths = [(len(_text(r["chosen"])), len(_text(r["rejected"]))) for r in rows]
    unequal = [i for i, (a, b) in enumerate(lengths) if a != b]
    longer_wins = [float((margins[i] > 0) == (lengths[i][0] > lengths[i][1])) for i in unequal]
    longer_is_chosen = [float(lengths[i][0] > lengths[i][1]) for i in unequal]
    order = sorted(range(n), key=lambda i: margins[i])[:worst]
    return {
        "pairs": n,
        "accuracy": sum(m > 0 for m in margins) / n,
        "mean_margin": sum(margins) / n,
        "ece": ece,
        "longer_wins_rate": sum(longer_wins) / len(longer_wins) if unequal else float("nan"),
        "longer_is_chosen_rate": sum(longer_is_chosen) / len(longer_is_chosen) if unequal else float("nan"),
        "accuracy_by_subset": {k: sum(v) / len(v) for k, v in sorted(by_subset.items())},
        "calibration_bins": bins,
        "worst_pairs": [
            {"margin": margins[i], "subset": rows[i].get("subset"), "prompt": str(rows[i]["prompt"])[-200:],
             "chosen": _text(rows[i]["chosen"])[:200], "rejected": _text(rows[i]["rejected"])[:200]}
            for i in order
        ],
    }


def evaluate_pairs(model, tokenizer, rows: list[dict], max_length: int = 1024, batch_size: int = 16) -> dict:
    chosen = score_conversations(model, tokenizer, [_messages(r["prompt"], r["chosen"]) for r in rows], max_length, batch_size)
    rejected = score_conversations(model, tokenizer, [_messages(r["prompt"], r["rejected"]) for r in rows], max_length, batch_size)
    return pair_report(rows, chosen, rejected)


def markdown(report: dict, title: str) -> str:
    lines = [f"# Reward model evaluation: {title}", "", "| metric | value |", "|---|---|"]
    for key in ("pairs", "accuracy", "mean_margin", "ece", "longer_wins_rate", "longer_is_chosen_rate"):
        value = report[key]
        lines.append(f"| {key} | {value:.4f} |" if isinstance(value, float) else f"| {key} | {value} |")
    lines += ["", "| subset | accuracy |", "|---|---|"]
    lines += [f"| {k} | {v:.4f} |" for k, v in report["accuracy_by_subset"].items()]
    lines += ["", "Worst pairs (most confidently wrong):", ""]
    lines += [f"- margin {w['margin']:.3f} [{w['subset']}]: chosen {w['chosen']!r} vs rejected {w['rejected']!r}" for w in report["worst_pairs"]]
    return "\n".join(lines) + "\n"


def reliability_diagram(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    bins = report["calibration_bins"]
    ax.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    ax.bar([b["lo"] for b in bins], [b["accuracy"] for b in bins], width=[b["hi"] - b["lo"] for b in bins],
           align="edge", alpha=0.6, edgecolor="black", label="observed")
    ax.set_xlabel("predicted P(first response preferred)")
    ax.set_ylabel("fraction preferred")
    ax.set_title(f"Reliability (ECE {report['ece']:.3f})")
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(report: dict, output_dir: Path, title: str) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(output_dir / "rm_eval.json", json.dumps(report, indent=2) + "\n")
    atomic_write_text(output_dir / "rm_eval.md", markdown(report, title))
    reliability_diagram(report, output_dir / "reliability.png")
