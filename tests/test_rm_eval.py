"""`m1-align rm-eval`: pair metrics on hand-made scores, RewardBench-style files, one-line errors."""

from __future__ import annotations

import json
import math

import pytest
import torch

from m1_align.cli import main
from m1_align.config import load_config
from m1_align.data.tokenizer import train_tokenizer
from m1_align.reward_models.cli_eval import run
from m1_align.reward_models.evaluate import pair_report

TEXTS = [
    f"Patient {i} presents with {s} and {t}; the likely diagnosis is {d}. Answer: {d}"
    for i, (s, t, d) in enumerate(
        (s, t, d)
        for s in ("fever", "cough", "chest pain", "headache", "rash")
        for t in ("fatigue", "nausea", "dyspnea", "weight loss")
        for d in ("pneumonia", "migraine", "angina", "measles", "anemia")
    )
]


def tiny_reward_model(tokenizer):
    torch.manual_seed(0)
    ids = dict(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        num_labels=1,
    )
    try:
        from m1_align.model import BaichuanM1ForSequenceClassification, preset_config

        return BaichuanM1ForSequenceClassification(preset_config("tiny", **ids))
    except ImportError:
        from transformers import LlamaConfig, LlamaForSequenceClassification

        return LlamaForSequenceClassification(
            LlamaConfig(
                hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, **ids
            )
        )


@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("rm") / "rm"
    tokenizer = train_tokenizer(TEXTS, 320, path)
    tiny_reward_model(tokenizer).save_pretrained(path)
    return path


def pair(chosen: str, rejected: str, subset: str = "s") -> dict:
    return {"prompt": "q", "chosen": chosen, "rejected": rejected, "subset": subset}


def test_pair_report_accuracy_and_calibration():
    rows = [pair("aa", "b")] * 4
    third = math.log(3)  # sigma(log 3) = 0.75: right 3 times out of 4 at 75% confidence is calibrated
    calibrated = pair_report(rows, [third, third, third, -third], [0.0] * 4)
    overconfident = pair_report(rows, [5.0, 5.0, 5.0, -5.0], [0.0] * 4)
    assert calibrated["accuracy"] == overconfident["accuracy"] == 0.75
    assert calibrated["ece"] == pytest.approx(0.0, abs=1e-9)
    assert overconfident["ece"] == pytest.approx(1 / (1 + math.exp(-5)) - 0.75, abs=1e-9)
    assert calibrated["mean_margin"] == pytest.approx(third / 2)
    assert overconfident["worst_pairs"][0]["margin"] == -5.0


def test_pair_report_length_bias_counts():
    rows = [
        pair("long answer", "short"),  # longer chosen, model right -> longer wins
        pair("long answer", "short"),  # longer chosen, model wrong -> shorter wins
        pair("short", "long answer"),  # longer rejected, model wrong -> longer wins
        pair("same", "SAME"),  # equal lengths: not counted
    ]
    report = pair_report(rows, [1.0, -1.0, -1.0, 1.0], [0.0] * 4)
    assert report["longer_is_chosen_rate"] == pytest.approx(2 / 3)
    assert report["longer_wins_rate"] == pytest.approx(2 / 3)
    assert report["accuracy"] == 0.5


def test_rm_eval_on_rewardbench_style_jsonl(rm_dir, tmp_path):
    data = tmp_path / "rb.jsonl"
    rows = [
        pair(f"Answer: {d}", f"Answer: not {d}", subset)
        for subset in ("alpacaeval-easy", "hep-python")
        for d in ("anemia", "angina", "measles")
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = run(
        load_config(
            "rm-eval",
            None,
            [f"model.path={rm_dir}", f"data.eval_file={data}", f"output_dir={tmp_path / 'out'}", "limit=4"],
        )
    )
    report = json.loads((tmp_path / "out" / "rm_eval.json").read_text())
    assert report["pairs"] == 4 and set(report["accuracy_by_subset"]) == {"alpacaeval-easy", "hep-python"}
    assert 0 <= result.metrics["accuracy"] <= 1 and 0 <= result.metrics["ece"] <= 1
    assert (tmp_path / "out" / "reliability.png").stat().st_size > 1000
    assert "| hep-python |" in (tmp_path / "out" / "rm_eval.md").read_text()


def test_rm_eval_cli_on_our_format_keeps_the_task(rm_dir, tmp_path, capsys):
    data = tmp_path / "ours.jsonl"
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Code for anemia?"}]
    rows = [
        {"prompt": prompt, "chosen": "Answer: D64.9", "rejected": "Answer: I20.9", "task": task}
        for task in ("icd_code", "abbreviation")
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    stage = tmp_path / "rm_stage"  # a finished rm stage: the report goes to <stage>/rm_eval
    stage.mkdir()
    (stage / "model").symlink_to(rm_dir)
    assert main(["rm-eval", str(stage), "batch_size=1", "--data", str(data)]) == 0
    report = json.loads((stage / "rm_eval" / "rm_eval.json").read_text())
    assert set(report["accuracy_by_subset"]) == {"icd_code", "abbreviation"}
    assert "rm-eval finished" in capsys.readouterr().out


def test_missing_data_file_is_one_line(rm_dir, tmp_path, capsys):
    missing = tmp_path / "nope.jsonl"
    assert main(["rm-eval", str(rm_dir), "--data", str(missing)]) == 2
    err = capsys.readouterr().err
    assert err == f"error: data.eval_file: {missing}: no such file or folder\n"


def test_missing_model_is_one_line(tmp_path, capsys):
    assert main(["rm-eval", f"model.path={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: model path") and err.count("\n") == 1
