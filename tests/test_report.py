"""The run report's figures: held-out accuracy with Wilson intervals and gaps, the trainers' pair accuracy
apart, on a run dir whose files have the shapes the trainers and `m1-align eval` write."""

from __future__ import annotations

import json
import math

import matplotlib
import pytest

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from m1_align.evaluation.report import (  # noqa: E402
    draw_heldout,
    heldout_points,
    trainer_points,
    wilson_interval,
    write_run_report,
)

STAGES = ("base", "sft", "elo", "tdpo", "rm", "ppo")


def benchmark_eval(verifiable: float, loglik: float, generation: float) -> dict:
    """run_dir/<stage>/eval/eval.json as evaluation/run.py writes it (30 MMLU rows, 10 of them generated)."""
    return {
        "model": "runs/x/model",
        "mmlu_medical/n": 30,
        "mmlu_medical/n_generation": 10,
        "mmlu_medical/accuracy_generation": generation,
        "mmlu_medical/accuracy_loglik": loglik,
        "mmlu_medical/anatomy/accuracy_generation": 0.5,
        "mmlu_medical/anatomy/accuracy_loglik": 0.2,
        "seconds/mmlu_medical": 1.2,
        "verifiable/n": 40,
        "verifiable/accuracy": verifiable,
        "verifiable/icd_code/accuracy": 0.0,
        "seconds/verifiable": 1.1,
        "verifiable/gold_answer_logp": -17.6,
        "verifiable/icd_code/gold_answer_logp": -13.4,
        "seconds/gold_answer_logp": 4.1,
    }


# run_dir/<stage>/eval.json as training.finish_stage and the online loop write them
OWN_EVAL = {
    "sft": {"train_loss": 1.75, "steps": 400, "eval_loss": 1.55, "verifiable/n": 8, "verifiable/accuracy": 0.5},
    "elo": {"initial/verifiable/n": 8, "initial/verifiable/accuracy": 0.5, "initial/gold_answer_logp": -15.2,
            "verifiable/n": 8, "verifiable/accuracy": 0.625, "gold_answer_logp": -15.5, "steps": 20},
    "tdpo": {"before/rewards/accuracy": 0.0, "before/preference/accuracy": 0.79, "train_loss": 0.38, "steps": 50,
             "rewards/margin": 2.0, "rewards/accuracy": 0.75, "preference/accuracy": 0.8,
             "seqkl/chosen": 1.66, "verifiable/n": 8, "verifiable/accuracy": 0.25},
    "rm": {"train_loss": 0.38, "steps": 64, "pairs": 120, "accuracy": 0.8, "mean_margin": 2.87, "ece": 0.04,
           "model": "runs/x/rm/model"},
    "ppo": {"initial/verifiable/n": 8, "initial/verifiable/accuracy": 0.25, "verifiable/n": 8,
            "verifiable/accuracy": 0.375, "steps": 20},
}
# 6/40 verifiable right after TDPO, 3/10 MMLU letters generated; ELO's evaluation was interrupted and
# rm (a reward model) has none
HELDOUT = {
    "base": benchmark_eval(0.1, 0.2, 0.1),
    "sft": benchmark_eval(0.2, 0.3, 0.2),
    "tdpo": benchmark_eval(0.15, 0.3, 0.3),
    "ppo": benchmark_eval(0.25, 0.3, 0.2),
}


@pytest.fixture
def run_dir(tmp_path):
    for stage in STAGES:
        folder = tmp_path / stage
        (folder / "eval").mkdir(parents=True)
        if stage in OWN_EVAL:
            (folder / "eval.json").write_text(json.dumps(OWN_EVAL[stage], indent=2))
            (folder / "result.json").write_text(json.dumps({"stage": stage, "metrics": OWN_EVAL[stage], "seconds": 9.0}))
            records = [{"step": s, "time": 1.0 * s, "loss": 2.0 - 0.1 * s} for s in (10, 20, 30)]
            (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        if stage in HELDOUT:
            (folder / "eval" / "eval.json").write_text(json.dumps(HELDOUT[stage], indent=2))
    return tmp_path


def test_wilson_interval_matches_hand_computation():
    # 0 of 10: p = 0 leaves [0, (z²/n) / (1 + z²/n)] = [0, 0.38416 / 1.38416]
    low, high = wilson_interval(0, 10)
    assert low == pytest.approx(0.0, abs=1e-12) and high == pytest.approx(0.38416 / 1.38416, abs=1e-9)
    # 6 of 40: p = 0.15, z²/n = 0.09604, centre = (0.15 + 0.04802) / 1.09604 = 0.180669,
    # half = 1.96 · sqrt(0.15 · 0.85 / 40 + 3.8416 / 6400) / 1.09604 = 1.96 · 0.0615447 / 1.09604 = 0.110058
    low, high = wilson_interval(6, 40)
    assert low == pytest.approx(0.070611, abs=2e-6) and high == pytest.approx(0.290727, abs=2e-6)


def test_heldout_figure_has_an_interval_per_stage_and_gaps_where_no_benchmark_ran(run_dir):
    stage_dirs = {s: run_dir / s for s in STAGES}
    points = heldout_points(stage_dirs)
    # the trainers' own pair accuracies and their smaller verifiable sets stay out of the held-out panels
    assert list(points) == ["verifiable/accuracy", "mmlu_medical/accuracy_loglik", "mmlu_medical/accuracy_generation"]
    fig, axes = plt.subplots(1, len(points))
    draw_heldout(list(axes), list(STAGES), points)
    tdpo = STAGES.index("tdpo")
    for ax, key in zip(axes, points, strict=True):
        line = ax.containers[0][0]
        assert list(line.get_xdata()) == list(range(len(STAGES)))  # every stage keeps its place on the axis
        drawn = dict(zip(STAGES, line.get_ydata(), strict=True))
        # NaN breaks the line: none is drawn through ELO (its trainer's 8-question score is not this
        # benchmark) nor through the reward model
        assert math.isnan(drawn.pop("elo")) and math.isnan(drawn.pop("rm")), key
        assert drawn == {s: HELDOUT[s][key] for s in drawn}
    bars = {key: ax.containers[0][2][0].get_segments() for ax, key in zip(axes, points, strict=True)}
    (_, low), (_, high) = bars["verifiable/accuracy"][tdpo]
    assert (low, high) == pytest.approx((0.070611, 0.290727), abs=2e-6)  # 6 of 40, computed above
    (_, low), (_, high) = bars["mmlu_medical/accuracy_generation"][tdpo]
    assert (low, high) == pytest.approx(wilson_interval(3, 10), abs=1e-9)  # over the 10 generated, not 30
    plt.close(fig)


def test_trainer_pair_accuracy_is_apart_and_only_where_reported(run_dir):
    series = trainer_points({s: run_dir / s for s in STAGES})
    shown = {key: ["gap" if math.isnan(v) else v for v in values] for key, values in series.items()}
    assert shown == {  # stages: base, sft, elo, tdpo, rm, ppo
        "rewards/accuracy": ["gap", "gap", "gap", 0.75, "gap", "gap"],
        "preference/accuracy": ["gap", "gap", "gap", 0.8, "gap", "gap"],
        "accuracy": ["gap", "gap", "gap", "gap", 0.8, "gap"],
    }


def test_report_writes_a_figure_per_kind_and_references_each(run_dir):
    text = write_run_report(run_dir, list(reversed(STAGES))).read_text()
    for name in ("heldout_accuracy", "trainer_accuracy", "loss"):
        assert (run_dir / "plots" / f"{name}.png").stat().st_size > 1000
        assert f"![{name}](plots/{name}.png)" in text
    assert "95% Wilson interval" in text
    assert sorted(p.name for p in (run_dir / "plots").iterdir()) == [
        "heldout_accuracy.png", "loss.png", "trainer_accuracy.png"]


def test_seed_table_plot_leaves_a_gap_where_a_run_has_no_value(run_dir, tmp_path_factory):
    import importlib.util
    import shutil
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("seed_table", Path(__file__).parents[1] / "scripts" / "seed_table.py")
    seed_table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(seed_table)
    other = Path(shutil.copytree(run_dir, tmp_path_factory.mktemp("seed43") / "run"))
    shutil.rmtree(other / "sft" / "eval")  # this run's SFT evaluation is missing
    fig = seed_table.plot([str(run_dir), str(other)], str(other / "stages.png"))
    stages = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert stages == ["base", "sft", "tdpo", "ppo"]
    complete, gapped = (list(line.get_ydata()) for line in fig.axes[0].lines[:2])
    assert complete == [0.1, 0.2, 0.15, 0.25]
    assert math.isnan(gapped[1]) and gapped[:1] + gapped[2:] == [0.1, 0.15, 0.25]
    plt.close(fig)


def test_dev_accuracy_by_step_and_time_for_each_online_stage(run_dir):
    from m1_align.evaluation.report import dev_curves, write_run_report

    records = [{"step": 0, "time": 5.0, "eval/verifiable/accuracy": 0.1}]
    records += [{"step": s, "time": 5.0 + 30 * s, "reward/mean": 0.1 * s} for s in (1, 2, 3, 4)]
    records += [{"step": 2, "time": 70.0, "eval/verifiable/accuracy": 0.2}, {"step": 4, "time": 130.0, "eval/verifiable/accuracy": 0.3}]
    (run_dir / "ppo" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    curves = dev_curves({stage: run_dir / stage for stage in STAGES})
    assert list(curves) == ["ppo"]  # the trainers' loss logs carry no dev checks
    assert curves["ppo"]["step"] == [0, 2, 4] and curves["ppo"]["seconds"] == [5.0, 70.0, 130.0]
    assert curves["ppo"]["accuracy"] == [0.1, 0.2, 0.3] and curves["ppo"]["reward"] == [0.1, 0.2, 0.30000000000000004, 0.4]
    report = write_run_report(run_dir, list(STAGES)).read_text()
    assert "plots/dev_accuracy.png" in report and (run_dir / "plots" / "dev_accuracy.png").is_file()
