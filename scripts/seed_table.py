"""The README's results tables: held-out metrics of every stage over several seeds of a pipeline.

    .venv/bin/python scripts/seed_table.py runs/smollm2-seed42 runs/smollm2-seed43 runs/smollm2-seed44

Reads <run_dir>/<stage>/eval/eval.json (and base/eval/eval.json). One run: each accuracy with its 95%
Wilson interval. Several: mean ± population standard deviation over the runs, each run's value in
brackets, and the Wilson interval of the pooled count (all runs' questions together).

Then each stage against the one it started from, question by question on the verifiable tasks
(eval_samples.jsonl), pooled over the runs: how many answers became right and how many wrong, and the
exact two-sided McNemar (sign test) p-value of that split, which a difference in means alone cannot give.
"""

import json
import math
import statistics
import sys
from pathlib import Path

import yaml

STAGES = ("base", "pretrain", "sft", "elo", "tdpo", "ppo", "grpo")
ROWS = [  # (metric, label, count key or None)
    ("verifiable/accuracy", "verifiable tasks, answer accuracy", "verifiable/n"),
    ("verifiable/elixhauser/accuracy", "  Elixhauser category", None),
    ("verifiable/hpo_disease_mcq/accuracy", "  phenotypes -> disease (4 options)", None),
    ("verifiable/icd_code/accuracy", "  ICD-10 code", None),
    ("verifiable/abbreviation/accuracy", "  abbreviation", None),
    ("verifiable/gold_answer_logp", "gold-answer log-likelihood after its own reasoning (nats)", None),
    ("mmlu_medical/accuracy_generation", "MMLU-medical, letter from free generation", "mmlu_medical/n_generation"),
    ("mmlu_medical/accuracy_loglik", "MMLU-medical, option log-likelihood", "mmlu_medical/n"),
]


def wilson(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return float("nan"), float("nan")
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def load(run: Path) -> dict[str, dict]:
    found = {}
    for stage in STAGES:
        path = run / stage / "eval" / "eval.json"
        if path.is_file():
            found[stage] = json.loads(path.read_text())
    return found


def cell(values: list[float], counts: list[int] | None) -> str:
    if not values:
        return "–"
    mean = statistics.fmean(values)
    text = f"{mean:.3f}" if len(values) == 1 else f"{mean:.3f} ± {statistics.pstdev(values):.3f} ({', '.join(f'{v:.3f}' for v in values)})"
    if counts:
        low, high = wilson(sum(v * n for v, n in zip(values, counts, strict=True)), sum(counts))
        text += f" [{low:.3f}, {high:.3f}]"
    return text


# what each stage starts from in configs/smollm2.yaml; runs whose config.yaml records the wiring (from
# 2026-11-30 on) are read from it instead
PARENT = {"sft": "base", "elo": "sft", "tdpo": "elo", "ppo": "tdpo", "grpo": "tdpo"}


def parents(run: Path) -> dict[str, str]:
    """Each policy stage -> the stage of this run whose model it started from ("base" for an outside model)."""
    path = run / "config.yaml"
    config = yaml.safe_load(path.read_text()) if path.is_file() else {}
    stages = config.get("stages") or {}
    found = {}
    for stage in PARENT:
        start = ((stages.get(stage) or {}).get("model") or {}).get("path")
        if start is None:
            found[stage] = PARENT[stage]  # an older dump that does not record it
        elif Path(start).parent == Path(config["run_dir"]):
            found[stage] = Path(start).name
        else:
            found[stage] = "base"
    return found


def verifiable_answers(run: Path, stage: str) -> dict[tuple[str, str], tuple[bool, str]]:
    """(task, item) -> (right, the parsed answer)."""
    path = run / stage / "eval" / "eval_samples.jsonl"
    if not path.is_file():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return {(r["task"], r["item"]): (bool(r["correct"]), str(r.get("parsed"))) for r in rows if r.get("benchmark") == "verifiable"}


def mcnemar_p(newly_right: int, newly_wrong: int) -> float:
    """Exact two-sided sign test on the discordant pairs."""
    n, k = newly_right + newly_wrong, min(newly_right, newly_wrong)
    if n == 0:
        return 1.0
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n)


def paired_table(runs: list[Path]) -> None:
    print("\n| stage vs. the one it started from | questions | answer changed | newly right | newly wrong | McNemar p |")
    print("|---|---|---|---|---|---|")
    wiring = [parents(run) for run in runs]
    for stage in PARENT:
        starts = {w[stage] for w in wiring}
        if len(starts) > 1:
            raise SystemExit(f"{stage} starts from different stages in these runs ({', '.join(sorted(starts))}): pool runs of one recipe")
        parent = starts.pop()
        questions = changed = right = wrong = 0
        for run in runs:
            after, before = verifiable_answers(run, stage), verifiable_answers(run, parent)
            shared = after.keys() & before.keys()
            questions += len(shared)
            changed += sum(after[q][1] != before[q][1] for q in shared)
            right += sum(after[q][0] and not before[q][0] for q in shared)
            wrong += sum(before[q][0] and not after[q][0] for q in shared)
        if questions:
            print(f"| {stage} vs. {parent} | {questions} | {changed} | {right} | {wrong} | {mcnemar_p(right, wrong):.2f} |")


def main(runs: list[str]) -> None:
    results = [load(Path(r)) for r in runs]
    stages = [s for s in STAGES if any(s in r for r in results)]
    print(f"runs: {', '.join(runs)}\n")
    print("| held-out metric | " + " | ".join(stages) + " |")
    print("|---|" + "---|" * len(stages))
    for key, label, count_key in ROWS:
        cells = []
        for stage in stages:
            present = [r[stage] for r in results if stage in r and key in r[stage]]
            values = [m[key] for m in present]
            counts = [int(m[count_key]) for m in present] if count_key else None
            cells.append(cell(values, counts))
        n = next((int(r[s][count_key]) for r in results for s in stages if count_key and s in r and count_key in r[s]), None)
        print(f"| {label}{f' ({n})' if n else ''} | " + " | ".join(cells) + " |")
    paired_table([Path(r) for r in runs])


if __name__ == "__main__":
    main(sys.argv[1:])
