"""bench/bench_grpo_step.py: the pieces its fairness rests on (the peer's prompt order, the prompt check, the
per-round ratio); the bench itself is a long measurement, not a test."""

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "bench_grpo_step.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_grpo_step", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_trl_walks_the_given_rows_in_order_with_shuffle_off():
    """The bench hands TRL ours' per-step prompts as rows 0, 1, 2, ... and relies on GRPOTrainer's sampler (with
    the arguments _get_train_sampler passes at steps_per_generation=1, num_iterations=1) taking them in order,
    prompts_per_step at a time, each repeated num_generations times; its default shuffle would not."""
    from trl.trainer.utils import RepeatSampler

    rows, prompts, group = list(range(6)), 2, 3
    ordered = list(RepeatSampler(rows, mini_repeat_count=group, batch_size=prompts, repeat_count=1, shuffle=False, seed=42))
    assert ordered == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4, 5, 5, 5]
    shuffled = list(RepeatSampler(rows, mini_repeat_count=group, batch_size=prompts, repeat_count=1, shuffle=True, seed=42))
    assert shuffled != ordered


def _run(side, run, prompts, seconds=(1.0,)):
    return {"side": side, "run": run, "prompts": prompts, "ids_match": True,
            "steps": [{"seconds": s} for s in seconds]}


def test_check_prompts_refuses_a_step_whose_prompts_differ(bench):
    a = [{"role": "user", "content": "a"}]
    b = [{"role": "user", "content": "b"}]
    same = [_run("ours:hf", 0, [[a], [b]]), _run("trl:hf", 0, [[a], [b]])]
    bench.check_prompts(same, steps=2)
    with pytest.raises(SystemExit, match="step 1: trl:hf run 0 saw other prompts"):
        bench.check_prompts([same[0], _run("trl:hf", 0, [[a], [a]])], steps=2)
    with pytest.raises(SystemExit, match="logged 1 prompt batches for 2 steps"):
        bench.check_prompts([same[0], _run("trl:hf", 0, [[a]])], steps=2)
    with pytest.raises(SystemExit, match="prompt ids differ"):
        bench.check_prompts([same[0], {**same[1], "ids_match": False}], steps=2)


def test_the_ratio_pairs_runs_of_the_same_round(bench):
    runs = [
        _run("ours:vllm", 0, [], seconds=(2.0, 4.0)), _run("trl:hf", 0, [], seconds=(6.0,)),  # 3 / 6
        _run("trl:hf", 1, [], seconds=(2.0,)), _run("ours:vllm", 1, [], seconds=(4.0,)),  # 4 / 2
        _run("ours:vllm", 2, [], seconds=(1.0,)),  # its TRL run of round 2 failed: no pair
        {"side": "trl:hf", "run": 2, "error": "boom"},
    ]
    assert bench.paired_ratio(runs, "ours:vllm", "trl:hf") == {"min": 0.5, "median": 1.25, "max": 2.0, "n": 2}
