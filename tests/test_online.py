"""ELO and PPO end to end on a tiny SFT'd model, with both rollout engines; resume."""

from __future__ import annotations

import json
import math

import pytest
from conftest import stage_overrides

from m1_align.config import ELOConfig, PPOConfig, SFTConfig, validate


@pytest.fixture(scope="session")
def task_files(built_data, tmp_path_factory):
    """One medical task alone (ICD-10-CM code -> Elixhauser comorbidity category), as user files: SFT
    conversations, RL prompts and held-out questions. Its reasoning (code -> Elixhauser measure) is
    short, which a tiny model learns within a short test."""
    from m1_align.data.build import read_split_rows

    folder = tmp_path_factory.mktemp("elixhauser")
    for split, name in (("sft", "train.jsonl"), ("rl", "rl.jsonl"), ("eval", "eval.jsonl")):
        rows = [r for r in read_split_rows(built_data, split) if r["task"] == "elixhauser"]
        (folder / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder / "train.jsonl", folder / "rl.jsonl", folder / "eval.jsonl"


def short_sft(data_cache, tiny_model_dir, task_files, out, steps: int):
    from m1_align.sft.trainer import run

    extra = {"train.max_steps": steps, "train.batch_size": 8, "train.max_length": 512, "train.learning_rate": 3e-3,
             "train.eval_max_new_tokens": 128, "train.save_steps": 1000,
             "data.train_file": str(task_files[0]), "data.answer_eval_file": str(task_files[2])}
    run(validate(SFTConfig, stage_overrides(data_cache, out, tiny_model_dir, **extra), "test"))
    return out


@pytest.fixture(scope="session")
def sft_model_dir(data_cache, tiny_model_dir, task_files, tmp_path_factory):
    """The tiny model after a short SFT: it now reasons briefly and ends with an `Answer:` line."""
    return short_sft(data_cache, tiny_model_dir, task_files, tmp_path_factory.mktemp("sft_for_rl") / "sft", 100)


@pytest.fixture(scope="session")
def early_sft_model_dir(data_cache, tiny_model_dir, task_files, tmp_path_factory):
    """A shorter SFT: the answer format is there, the answers are not yet (after 100 steps the held-out
    gold answer costs only ~0.4 nats, too little left for ELO to raise within a test)."""
    return short_sft(data_cache, tiny_model_dir, task_files, tmp_path_factory.mktemp("early_sft") / "sft", 40)


@pytest.mark.slow
def test_sft_raises_answer_accuracy_above_base(task_files, tiny_model_dir, sft_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from m1_align.rewards.verifiable import answer_accuracy

    rows = [json.loads(line) for line in task_files[2].read_text().splitlines()]
    base = answer_accuracy(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)),
                           AutoTokenizer.from_pretrained(str(tiny_model_dir)), rows, max_new_tokens=128)
    sft = json.loads((sft_model_dir / "eval.json").read_text())
    print(f"held-out answer accuracy: base {base['verifiable/accuracy']:.3f}, after SFT {sft['verifiable/accuracy']:.3f}")
    assert sft["verifiable/accuracy"] > base["verifiable/accuracy"]


ONLINE = {"rollout.max_new_tokens": 128, "train.eval_limit": 4, "train.max_length": 512, "rollout.kv_cache_gib": 0.5}


def metrics(output_dir):
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def elo_config(data_cache, out, model_dir, **extra):
    values = {**ONLINE, "train.learning_rate": 1e-4, "train.max_steps": 6, "elo.k": 4, "elo.prompts_per_step": 4,
              "elo.lambda_answer": 1.0, "train.lr_scheduler": "constant", "train.warmup_ratio": 0.0, **extra}
    return validate(ELOConfig, stage_overrides(data_cache, out, model_dir, **values), "test")


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["hf", "vllm"])
def test_elo_raises_gold_answer_likelihood(engine, data_cache, early_sft_model_dir, task_files, tmp_path):
    from m1_align.rl.elo import run

    result = run(elo_config(data_cache, tmp_path / "elo", early_sft_model_dir, **{"rollout.engine": engine,
                 "data.train_file": str(task_files[1]), "data.answer_eval_file": str(task_files[2])}))
    m = result.metrics
    assert m["gold_answer_logp"] > m["initial/gold_answer_logp"]
    assert m["verifiable/accuracy"] >= m["initial/verifiable/accuracy"] - 0.05
    steps = [r for r in metrics(tmp_path / "elo") if "loss" in r]
    assert steps, "every step was skipped: no reasoning path reached the answer"
    assert all(r["sync/logprob_diff"] < 0.01 for r in steps)  # the engine samples from the trained weights


@pytest.fixture(scope="session")
def one_answer_prompts(task_files, tmp_path_factory):
    """A toy verifiable task: the task's prompts, rewarded only for one answer (its most common one)."""
    from collections import Counter

    rows = [json.loads(line) for line in task_files[1].read_text().splitlines()]
    target = Counter(r["answer"] for r in rows).most_common(1)[0][0]
    path = tmp_path_factory.mktemp("toy") / "one_answer.jsonl"
    path.write_text("".join(json.dumps({"prompt": r["prompt"], "answer": target, "rule": "exact_term", "task": "one_answer"}) + "\n"
                            for r in rows))
    return path


def ppo_config(data_cache, out, model_dir, **extra):
    values = {**ONLINE, "train.learning_rate": 5e-4, "train.max_steps": 20, "ppo.prompts_per_step": 8,
              "ppo.samples_per_prompt": 4, "ppo.minibatch_size": 16, "ppo.missing_eos_penalty": 0.0, "ppo.kl_coef": 0.01, "ppo.critic_learning_rate": 1e-3,
              "train.lr_scheduler": "constant", "train.warmup_ratio": 0.0, "reward.mode": "rule", **extra}
    return validate(PPOConfig, stage_overrides(data_cache, out, model_dir, **values), "test")


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["hf", "vllm"])
def test_ppo_learns_a_toy_verifiable_reward(engine, data_cache, sft_model_dir, one_answer_prompts, tmp_path):
    from m1_align.rl.ppo import run

    cfg = ppo_config(data_cache, tmp_path / "ppo", sft_model_dir, **{"rollout.engine": engine,
                     "data.train_file": str(one_answer_prompts), "data.answer_eval_file": str(one_answer_prompts)})
    run(cfg)
    steps = [r for r in metrics(tmp_path / "ppo") if "reward/mean" in r]
    # the second half of the run against the first 4 steps: at this learning rate a single step can dip
    # (float noise between engines sends runs down different paths), a half-run mean does not
    first, last = steps[:4], steps[len(steps) // 2 :]
    mean = lambda rows, key: sum(r[key] for r in rows) / len(rows)  # noqa: E731
    assert mean(last, "reward/rule:exact_term") > mean(first, "reward/rule:exact_term") + 0.2
    # the toy rewards one answer for every question, so the policy must move far from the reference;
    # the KL is logged and finite, and the adaptive controller is left off here
    assert all(math.isfinite(r["kl"]) for r in steps)
    assert all(r["sync/logprob_diff"] < 0.01 for r in steps)
    # every step's ratio starts at 1: the old log-probs are the policy's own, at the sampling temperature
    assert all(r["ratio/first_minibatch_max_dev"] < 1e-3 for r in steps)
    for key in ("clip/ratio_outside_fraction", "clip/pg_clipfrac", "approx_kl/k1", "approx_kl/k3", "value_loss", "entropy", "explained_variance", "eos_rate", "time/generate", "time/sync"):
        assert key in steps[-1]


@pytest.mark.slow
def test_grpo_learns_a_toy_verifiable_reward_without_a_critic(data_cache, sft_model_dir, one_answer_prompts, tmp_path):
    from m1_align.rl.ppo import GRPOLoop

    cfg = ppo_config(data_cache, tmp_path / "grpo", sft_model_dir, **{
        "rollout.engine": "vllm", "data.train_file": str(one_answer_prompts), "data.answer_eval_file": str(one_answer_prompts),
        "ppo.advantage_estimator": "grpo", "ppo.kl_coef": 0.0, "ppo.kl_loss_coef": 0.01, "ppo.ppo_epochs": 1,
        "ppo.minibatch_size": 32, "ppo.clip_range_high": 0.28, "ppo.dynamic_sampling": True, "ppo.max_sampling_rounds": 2})
    loop = GRPOLoop(cfg, needs_reference=True)
    loop.run()
    assert "critic" not in loop.trainables  # no value model is loaded or trained
    steps = [r for r in metrics(tmp_path / "grpo") if "reward/mean" in r]
    first, last = steps[:4], steps[len(steps) // 2 :]
    mean = lambda rows, key: sum(r[key] for r in rows) / len(rows)  # noqa: E731
    assert mean(last, "reward/rule:exact_term") > mean(first, "reward/rule:exact_term") + 0.2
    assert all(r["sync/logprob_diff"] < 0.01 and r["ratio/first_minibatch_max_dev"] < 1e-3 for r in steps)
    assert all("dynamic/dropped_groups" in r and "engine_mismatch/mean" in r and "kl_loss" in r for r in steps)


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["elo", "ppo", "grpo"])
def test_online_resume_continues_the_same_run(stage, data_cache, sft_model_dir, one_answer_prompts, task_files, tmp_path,
                                               monkeypatch):
    import importlib

    module = importlib.import_module(f"m1_align.rl.{'elo' if stage == 'elo' else 'ppo'}")
    loop = getattr(module, {"elo": "ELOLoop", "ppo": "PPOLoop", "grpo": "GRPOLoop"}[stage])
    run = module.run_grpo if stage == "grpo" else module.run
    make = elo_config if stage == "elo" else ppo_config
    extra = {"rollout.engine": "hf", "train.max_steps": 4, "train.save_steps": 2}
    extra.update({"data.train_file": str(task_files[1]), "data.answer_eval_file": str(task_files[2])})
    if stage in ("ppo", "grpo"):
        extra.update({"data.train_file": str(one_answer_prompts), "data.answer_eval_file": str(one_answer_prompts)})
    if stage == "grpo":
        extra.update({"ppo.advantage_estimator": "grpo", "ppo.kl_coef": 0.0, "ppo.kl_loss_coef": 0.01})
    run(make(data_cache, tmp_path / "straight", sft_model_dir, **extra))

    original = loop.step

    def crash_at_step_3(self, step):
        if step == 2:
            raise KeyboardInterrupt
        return original(self, step)

    with monkeypatch.context() as patch:
        patch.setattr(loop, "step", crash_at_step_3)
        with pytest.raises(KeyboardInterrupt):
            run(make(data_cache, tmp_path / "resumed", sft_model_dir, **extra))
    run(make(data_cache, tmp_path / "resumed", sft_model_dir, **extra))

    def trained(path):
        return {r["step"]: r for r in metrics(path) if "time/sample" in r or "time/generate" in r}

    straight, resumed = trained(tmp_path / "straight"), trained(tmp_path / "resumed")
    assert sorted(resumed) == sorted(straight) == [1, 2, 3, 4]
    key = "loss" if stage == "elo" else "policy_loss"
    for step in (3, 4):
        assert resumed[step].get(key) == pytest.approx(straight[step].get(key), rel=1e-4, abs=1e-6)


def torchrun(stage: str, overrides: dict, processes: int = 2):
    """`m1-align <stage>` on several CPU processes; returns the Popen object (started)."""
    import os
    import subprocess
    import sys

    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "-m", "m1_align.cli", stage,
               *(f"{k}={v}" for k, v in overrides.items())]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def run_on_two_zero2_processes(stage: str, overrides: dict) -> None:
    """`m1-align <stage>` on two processes under DeepSpeed ZeRO-2, to completion."""
    proc = torchrun(stage, {**overrides, "train.deepspeed": "configs/deepspeed/zero2.json"})
    output, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, output[-3000:]


def cli_overrides(data_cache, out, model_dir, values: dict) -> dict:
    from conftest import SMALL_DATA

    return {"output_dir": out, "model.path": model_dir, "model.dtype": "float32", "data.cache_dir": data_cache,
            **{f"data.{k}": v for k, v in SMALL_DATA.items()}, **values}


@pytest.mark.slow
def test_elo_on_two_deepspeed_processes_equals_one_process(data_cache, sft_model_dir, task_files, tmp_path):
    """Data parallel ELO (ZeRO-2, each rank samples and trains on half of the questions) takes the same
    steps as one process on the whole batch. Greedy paths make the samples independent of how the batch
    is split, so the losses must agree: the ranks' averaged gradient is the whole batch's gradient."""
    from m1_align.rl.elo import run

    # a decaying learning rate: DeepSpeed's optimizer must follow the loop's scheduler
    values = {**ONLINE, "rollout.engine": "hf", "rollout.temperature": 0.0, "train.max_steps": 3, "train.save_steps": 3, "elo.k": 4,
              "elo.prompts_per_step": 4, "elo.drop_degenerate": False, "elo.lambda_answer": 1.0, "train.learning_rate": 3e-4,
              "train.lr_scheduler": "linear", "train.warmup_ratio": 0.0,
              "data.train_file": str(task_files[1]), "data.answer_eval_file": str(task_files[2])}
    run(elo_config(data_cache, tmp_path / "one", sft_model_dir, **values))
    run_on_two_zero2_processes("elo", cli_overrides(data_cache, tmp_path / "two", sft_model_dir, values))
    one = [r for r in metrics(tmp_path / "one") if "loss" in r]
    two = [r for r in metrics(tmp_path / "two") if "loss" in r]
    assert [r["step"] for r in two] == [1, 2, 3]
    for a, b in zip(one, two, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-3)
        assert b["reward/mean"] == pytest.approx(a["reward/mean"], rel=1e-3)
        assert b["sync/logprob_diff"] < 0.01
    assert (tmp_path / "two" / "model" / "model.safetensors").is_file()


@pytest.mark.slow
def test_grpo_on_two_deepspeed_processes_equals_one_process(data_cache, sft_model_dir, one_answer_prompts, tmp_path):
    """Data-parallel GRPO (ZeRO-2, each rank samples and trains on half of the prompts) takes the same steps as
    one process on the whole batch. Each prompt's samples are seeded by its place in the global batch
    (rollout.seed_per_prompt), so both runs draw the same responses at temperature 1. Their lengths differ from
    rank to rank, so the token-mean loss must divide by the global token count, not the rank's own."""
    from m1_align.rl.ppo import run_grpo

    values = {**ONLINE, "rollout.engine": "hf", "rollout.seed_per_prompt": True, "reward.mode": "rule",
              "ppo.advantage_estimator": "grpo", "ppo.prompts_per_step": 4, "ppo.samples_per_prompt": 4,
              "ppo.minibatch_size": 16, "ppo.ppo_epochs": 1, "ppo.kl_coef": 0.0, "ppo.kl_loss_coef": 0.0,
              "ppo.missing_eos_penalty": 0.0, "train.max_steps": 3, "train.save_steps": 3, "train.learning_rate": 5e-4,
              "train.lr_scheduler": "constant", "train.warmup_ratio": 0.0,
              "data.train_file": str(one_answer_prompts), "data.answer_eval_file": str(one_answer_prompts)}
    run_grpo(validate(PPOConfig, stage_overrides(data_cache, tmp_path / "one", sft_model_dir, **values), "test"))
    run_on_two_zero2_processes("grpo", cli_overrides(data_cache, tmp_path / "two", sft_model_dir, values))
    one = [r for r in metrics(tmp_path / "one") if "policy_loss" in r]
    two = [r for r in metrics(tmp_path / "two") if "policy_loss" in r]
    assert [r["step"] for r in two] == [1, 2, 3]
    assert any(r["advantage/abs_mean"] > 0 for r in one)  # some group had a signal: the losses are not all zero
    for a, b in zip(one, two, strict=True):
        assert b["reward/mean"] == pytest.approx(a["reward/mean"], abs=1e-6)  # the same samples
        assert b["response_length"] == pytest.approx(a["response_length"], abs=1e-6)
        assert b["policy_loss"] == pytest.approx(a["policy_loss"], rel=1e-3, abs=1e-6)


@pytest.mark.slow
def test_ppo_on_two_zero3_processes_with_vllm_resumes_after_a_kill(data_cache, sft_model_dir, one_answer_prompts, tmp_path):
    """ZeRO-3 partitions actor and critic over two processes; each rank's own vLLM engine gets the
    gathered weights after every update (checked by the probe), and a run killed after a checkpoint
    resumes from DeepSpeed's partitioned optimizer states."""
    import time

    import psutil

    out = tmp_path / "ppo"
    values = {**ONLINE, "rollout.engine": "vllm", "train.max_steps": 6, "train.save_steps": 1, "ppo.prompts_per_step": 4,
              "ppo.samples_per_prompt": 2, "ppo.minibatch_size": 4, "ppo.missing_eos_penalty": 0.0, "reward.mode": "rule",
              "train.learning_rate": 5e-4, "train.lr_scheduler": "constant", "train.warmup_ratio": 0.0,
              "train.deepspeed": "configs/deepspeed/zero3.json",
              "data.train_file": str(one_answer_prompts), "data.answer_eval_file": str(one_answer_prompts)}
    overrides = cli_overrides(data_cache, out, sft_model_dir, values)
    proc = torchrun("ppo", overrides)
    deadline = time.time() + 900
    state = out / "checkpoint" / "state.json"
    while not (state.is_file() and json.loads(state.read_text())["step"] >= 2) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.5)
    for process in [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]:
        process.kill()  # torchrun puts its workers in sessions of their own: kill every one
    output, _ = proc.communicate()
    assert state.is_file(), output[-3000:]
    killed_at = json.loads(state.read_text())["step"]
    assert 2 <= killed_at < 6 and not (out / "result.json").exists()

    proc = torchrun("ppo", overrides)
    output, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, output[-3000:]
    steps = [r for r in metrics(out) if "policy_loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    assert all(r["sync/logprob_diff"] < 0.01 for r in steps)
    assert json.loads((out / "result.json").read_text())["metrics"]["steps"] == 6


@pytest.mark.slow
def test_ppo_with_lora_syncs_merged_weights_into_vllm(data_cache, sft_model_dir, one_answer_prompts, tmp_path):
    """LoRA PPO: the reference is the adapter-disabled policy (no KL before the first update), vLLM gets
    the merged weights after every update, and the stage writes the adapter beside the model."""
    from m1_align.rl.ppo import run

    cfg = ppo_config(data_cache, tmp_path / "lora", sft_model_dir, **{
        "rollout.engine": "vllm", "train.max_steps": 2, "ppo.prompts_per_step": 4, "ppo.samples_per_prompt": 2,
        "ppo.minibatch_size": 8, "model.lora.enabled": True, "model.lora.r": 4, "train.learning_rate": 5e-3,
        "data.train_file": str(one_answer_prompts), "data.answer_eval_file": str(one_answer_prompts)})
    run(cfg)
    steps = [r for r in metrics(tmp_path / "lora") if "policy_loss" in r]
    assert steps[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # LoRA's B starts at zero: policy == reference
    assert all(r["sync/logprob_diff"] < 0.01 for r in steps)
    assert (tmp_path / "lora" / "adapter" / "adapter_config.json").is_file()


@pytest.mark.slow
def test_elo_with_lora_and_a_kl_penalty_to_the_adapter_disabled_policy(data_cache, sft_model_dir, task_files, tmp_path):
    from m1_align.rl.elo import run

    cfg = elo_config(data_cache, tmp_path / "lora", sft_model_dir, **{
        "rollout.engine": "vllm", "train.max_steps": 2, "model.lora.enabled": True, "model.lora.r": 4, "elo.kl_coef": 0.1,
        "train.learning_rate": 5e-3, "data.train_file": str(task_files[1]), "data.answer_eval_file": str(task_files[2])})
    result = run(cfg)
    steps = [r for r in metrics(tmp_path / "lora") if "loss" in r]
    assert steps and all(r["sync/logprob_diff"] < 0.01 for r in steps)  # vLLM samples from the merged weights
    assert result.metrics["steps"] == 2 and (tmp_path / "lora" / "adapter" / "adapter_config.json").is_file()
