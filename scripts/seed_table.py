"""The results tables of docs/RESULTS.md: held-out metrics of every stage over several seeds of a pipeline.

    .venv/bin/python scripts/seed_table.py runs/smollm2-seed42 runs/smollm2-seed43 runs/smollm2-seed44 [--plot FILE.png]

Reads <run_dir>/<stage>/eval/eval.json (and base/eval/eval.json). One run: each accuracy with its 95%
Wilson interval. Several: mean ± population standard deviation over the runs, each run's value in
brackets, and the Wilson interval of the pooled count (all runs' questions together).

Then each stage against the one it started from, question by question on the verifiable tasks
(eval_samples.jsonl), pooled over the runs: how many answers became right and how many wrong, and the
exact two-sided McNemar (sign test) p-value of that split, which a difference in means alone cannot give.

--plot FILE.png: held-out verifiable accuracy stage by stage, one line per run, the pooled accuracy with its
95% Wilson interval over them.
"""

import json
import math
import statistics
import sys
from pathlib import Path

import yaml

from m1_align.evaluation.report import wilson_interval as wilson

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


def plot(runs: list[str], path: str):
    """Write the figure to path and return it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = [load(Path(r)) for r in runs]
    key, count_key = "verifiable/accuracy", "verifiable/n"
    stages = [s for s in STAGES if any(key in r.get(s, {}) for r in results)]
    fig, ax = plt.subplots(figsize=(7, 4))
    for run, result in zip(runs, results, strict=True):
        # NaN where this run has no value for a stage: a gap, not a line drawn through it
        values = [result[s][key] if key in result.get(s, {}) else math.nan for s in stages]
        ax.plot(range(len(stages)), values, marker=".", alpha=0.4, label=Path(run).name)
    pooled, low, high = [], [], []
    for stage in stages:
        present = [r[stage] for r in results if key in r.get(stage, {})]
        right, n = sum(m[key] * m[count_key] for m in present), sum(int(m[count_key]) for m in present)
        lo, hi = wilson(right, n)
        mean = right / n if n else float("nan")
        pooled.append(mean)
        low.append(mean - lo)
        high.append(hi - mean)
    ax.errorbar(range(len(stages)), pooled, yerr=[low, high], color="black", marker="o", capsize=4,
                label="pooled, 95% Wilson interval")
    ax.set_xticks(range(len(stages)), stages)
    wiring = parents(Path(runs[0]))
    branches = [f"{s} and {t}" for s, t in zip(stages, stages[1:], strict=False) if wiring.get(s) == wiring.get(t) and s in wiring]
    if branches:  # side by side stages (PPO and GRPO), joined by a line only for the eye
        ax.set_xlabel(", ".join(f"{b} start from the same model" for b in branches))
    ax.set_ylabel("held-out verifiable accuracy")
    ax.set_title(f"stage by stage over {len(runs)} runs")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"\nplot: {path}")
    return fig


if __name__ == "__main__":
    args = sys.argv[1:]
    target = None
    if "--plot" in args:
        at = args.index("--plot")
        if at + 1 >= len(args) or not args[at + 1].endswith(".png"):
            raise SystemExit("--plot needs a .png file name, e.g. --plot docs/smollm2_stages.png")
        target = args[at + 1]
        del args[at : at + 2]
    main(args)
    if target:
        plot(args, target)
