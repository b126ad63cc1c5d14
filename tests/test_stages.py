"""Trainer-based stages end to end on the tiny model: they learn, and an interrupted run resumes to
exactly the result of an uninterrupted one."""

from __future__ import annotations

import json

import pytest
from conftest import stage_overrides

from m1_align.config import SCHEMAS, validate
from m1_align.training import MetricsCallback

RUNNERS = {
    "sft": "m1_align.sft.trainer",
    "tdpo": "m1_align.preference.trainer",
    "rm": "m1_align.reward_models.trainer",
}
FAST = {"train.batch_size": 4, "train.max_length": 512, "train.logging_steps": 1, "train.eval_max_new_tokens": 24, "train.eval_limit": 5}


def config(stage, data_cache, out, model_dir, **extra):
    return validate(SCHEMAS[stage], stage_overrides(data_cache, out, model_dir, **{**FAST, **extra}), "test")


def run(stage, cfg):
    import importlib

    return importlib.import_module(RUNNERS[stage]).run(cfg)


def losses(output_dir):
    lines = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in lines if "loss" in r and "train_loss" not in r}


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["sft", "tdpo", "rm"])
def test_interrupted_run_resumes_to_the_same_result(stage, data_cache, tiny_model_dir, tmp_path, monkeypatch):
    steps = {"train.max_steps": 6, "train.save_steps": 3, "train.learning_rate": 1e-3, "data.eval_per_task": 2}
    straight = run(stage, config(stage, data_cache, tmp_path / "straight", tiny_model_dir, **steps))

    class Interrupt(Exception):
        pass

    def stop_at_4(self, args, state, control, **kwargs):
        if state.global_step == 4:
            raise Interrupt

    with monkeypatch.context() as patch:
        patch.setattr(MetricsCallback, "on_step_end", stop_at_4, raising=False)
        with pytest.raises(Interrupt):
            run(stage, config(stage, data_cache, tmp_path / "resumed", tiny_model_dir, **steps))
    assert not (tmp_path / "resumed" / "result.json").exists()
    with (tmp_path / "resumed" / "metrics.jsonl").open("a") as f:
        f.write('{"step": 4, "lo')  # killed in the middle of a line: dropped with a note on resume
    resumed = run(stage, config(stage, data_cache, tmp_path / "resumed", tiny_model_dir, **steps))
    # every logged step, the last one included, has the loss of the uninterrupted run, and the summary
    # train_loss covers the whole run, not only the steps after the resume
    assert losses(tmp_path / "resumed") == pytest.approx(losses(tmp_path / "straight"), rel=1e-5)
    assert sorted(losses(tmp_path / "resumed")) == [1, 2, 3, 4, 5, 6]
    assert resumed.metrics["steps"] == straight.metrics["steps"] == 6
    assert resumed.metrics["train_loss"] == pytest.approx(straight.metrics["train_loss"], rel=1e-5)


@pytest.mark.slow
def test_tdpo_raises_heldout_preference_accuracy_and_margin(data_cache, tiny_model_dir, tmp_path):
    result = run("tdpo", config("tdpo", data_cache, tmp_path / "tdpo", tiny_model_dir,
                                **{"train.max_steps": 30, "train.learning_rate": 2e-3, "train.batch_size": 8}))
    m = result.metrics
    # the policy prefers the chosen answers of held-out pairs more often than the reference did
    assert m["preference/accuracy"] > m["before/preference/accuracy"] + 0.05
    assert m["rewards/margin"] > m["before/rewards/margin"] + 0.05 and m["rewards/accuracy"] > 0.5
    assert (tmp_path / "tdpo" / "model" / "model.safetensors").is_file()


@pytest.mark.slow
def test_rm_learns_pairs_and_writes_report_metrics(data_cache, tiny_model_dir, tmp_path):
    result = run("rm", config("rm", data_cache, tmp_path / "rm", tiny_model_dir,
                              **{"train.max_steps": 30, "train.learning_rate": 2e-3, "train.batch_size": 8}))
    m = result.metrics
    assert m["accuracy"] > 0.6 and 0.0 <= m["ece"] <= 1.0
    assert (tmp_path / "rm" / "model" / "config.json").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_sft_with_deepspeed_on_two_cpu_processes(zero, data_cache, tiny_model_dir, tmp_path):
    import os
    import subprocess
    import sys

    from conftest import SMALL_DATA

    out = tmp_path / zero
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "m1_align.cli", "sft",
        f"output_dir={out}", f"model.path={tiny_model_dir}", f"data.cache_dir={data_cache}",
        *(f"data.{k}={v}" for k, v in SMALL_DATA.items()),
        f"train.deepspeed=configs/deepspeed/{zero}.json", "train.max_steps=3", "train.batch_size=2",
        "train.max_length=512", "train.eval_limit=1", "train.eval_max_new_tokens=4",
    ]
    done = subprocess.run(command, env={**os.environ, "DS_ACCELERATOR": "cpu"}, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((out / "result.json").read_text())
    assert result["metrics"]["steps"] == 3
    log = (out / "metrics.jsonl").read_text()
    assert log.count('"train_loss"') == 2  # one trainer summary and one stage summary, from the main process only
    from transformers import AutoModelForCausalLM

    import m1_align.model  # noqa: F401

    model = AutoModelForCausalLM.from_pretrained(str(out / "model"))  # gathered, full weights
    assert sum(p.numel() for p in model.parameters()) > 0 and not (out / "model" / "training_args.bin").exists()


@pytest.mark.slow
def test_tdpo_with_lora_takes_the_adapter_disabled_policy_as_reference(data_cache, tiny_model_dir, tmp_path):
    cfg = config("tdpo", data_cache, tmp_path / "lora", tiny_model_dir,
                 **{"train.max_steps": 3, "train.learning_rate": 5e-3, "model.lora.enabled": True, "model.lora.r": 4,
                    "model.lora.merge_on_save": True})
    m = run("tdpo", cfg).metrics
    # with the adapter off the network is the reference: no KL before training (up to the rounding of the
    # output head applied chunk by chunk to the policy and at once to the reference), some after
    assert abs(m["before/rewards/margin"]) < 1e-6 and m["seqkl/chosen"] > 1e-3
    assert (tmp_path / "lora" / "adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "lora" / "model" / "model.safetensors").is_file()  # merged: what the next stage loads
