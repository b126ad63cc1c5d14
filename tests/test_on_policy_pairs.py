"""On-policy TDPO pairs: the starting model's own samples, a right answer against a wrong one."""

from __future__ import annotations

import json

import pytest
from conftest import stage_overrides

from m1_align.config import SCHEMAS, ConfigError, validate
from m1_align.preference.on_policy import right_wrong_pairs, sample_pairs
from m1_align.rollout.engine import Completion, SamplingSettings
from m1_align.rollout.factory import make_engine


def sample(text: str, finish: str = "stop") -> Completion:
    return Completion(token_ids=[], logprobs=[], finish_reason=finish, text=text)


def test_pairs_take_right_finished_answers_against_wrong_ones():
    samples = [sample("r1"), sample("w1"), sample("r-cut", "length"), sample("r1"), sample("r2"), sample("w-cut", "length")]
    scores = [1.0, 0.0, 1.0, 1.0, 1.0, 0.0]
    # the cut-off right answer is neither chosen nor rejected; the repeated right one counts once; a cut-off
    # wrong answer is still wrong
    assert right_wrong_pairs(samples, scores, per_prompt=3) == [("r1", "w1"), ("r2", "w-cut")]
    two_right = [sample("r1"), sample("r2"), sample("w1"), sample("w2"), sample("w3")]
    assert right_wrong_pairs(two_right, [1, 1, 0, 0, 0], per_prompt=3) == [("r1", "w1"), ("r2", "w2")]
    assert right_wrong_pairs(two_right, [1, 1, 0, 0, 0], per_prompt=1) == [("r1", "w1")]
    assert right_wrong_pairs(two_right, [1, 1, 1, 1, 1], per_prompt=2) == []  # no signal without a wrong answer
    assert right_wrong_pairs(two_right, [0, 0, 0, 0, 0], per_prompt=2) == []


def parity(row, text):  # a stand-in rule a random model passes about half the time
    return float(len(text) % 2 == 0)


def test_sampled_pairs_are_the_models_own_samples_judged_right_and_wrong(tiny_llama_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_llama_dir))
    engine = make_engine("hf", model_dir=str(tiny_llama_dir))
    rows = [{"prompt": [{"role": "user", "content": f"question {i}"}], "task": "t", "answer": "x", "rule": "exact_term"}
            for i in range(8)]
    # every even token id stops: samples of uneven length, some cut off at the limit
    settings = SamplingSettings(n=6, temperature=1.0, max_new_tokens=6, stop_token_ids=tuple(range(0, len(tok), 2)), seed=0)
    pairs, counts = sample_pairs(engine, tok, rows, settings, per_prompt=2, judge=parity)
    assert counts["pairs/prompts"] == 8 and counts["pairs/samples"] == 48 and 0 < counts["pairs/right_samples"] < 48
    assert 0 < len(pairs) == counts["pairs/count"] <= 16
    for pair in pairs:
        assert parity(None, pair["chosen"]) == 1.0 and parity(None, pair["rejected"]) == 0.0
        assert pair["prompt"] in [r["prompt"] for r in rows] and pair["task"] == "t"

    cut_off = SamplingSettings(n=6, temperature=1.0, max_new_tokens=6, stop_token_ids=(), seed=0)
    pairs, counts = sample_pairs(engine, tok, rows, cut_off, per_prompt=2, judge=parity)
    assert counts["pairs/right_samples"] > 0 and pairs == []  # right but cut off: never chosen


def tdpo_config(data_cache, out, model_dir, **extra):
    values = {"train.max_steps": 2, "train.batch_size": 2, "train.max_length": 256, "train.eval_limit": 1,
              "train.eval_max_new_tokens": 4, "tdpo.pairs": "on_policy", "tdpo.pair_prompts": 6, "tdpo.pair_samples": 4,
              "rollout.engine": "hf", "rollout.max_new_tokens": 8, "rollout.temperature": 1.0, **extra}
    return validate(SCHEMAS["tdpo"], stage_overrides(data_cache, out, model_dir, **values), "test")


def test_tdpo_trains_on_sampled_pairs_and_reuses_them_on_resume(data_cache, tiny_llama_dir, tmp_path, monkeypatch):
    from m1_align.preference import on_policy, trainer
    from m1_align.runs import MetricsLogger

    # the random model never writes a right answer, so a parity rule stands in for the answer check; it rarely
    # ends its turn either, so every even token id ends it here
    monkeypatch.setattr(on_policy, "rule_score", lambda rule, text, gold: type("S", (), {"score": parity(None, text)}))
    monkeypatch.setattr(on_policy, "SamplingSettings",
                        lambda **k: SamplingSettings(**{**k, "stop_token_ids": tuple(range(0, 2000, 2))}))
    out = tmp_path / "tdpo"
    result = trainer.run(tdpo_config(data_cache, out, tiny_llama_dir))
    pairs = [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]
    assert result.metrics["steps"] == 2 and result.metrics["pairs/count"] == len(pairs) > 0
    assert all(parity(None, p["chosen"]) == 1.0 > parity(None, p["rejected"]) for p in pairs)

    # an interrupted run finds its pairs written and trains on them without sampling again
    sampled = on_policy.sample_pairs
    monkeypatch.setattr(on_policy, "sample_pairs", lambda *a, **k: pytest.fail("sampled again"))
    again = tmp_path / "again"
    again.mkdir()
    for name in ("pairs.jsonl", "pairs_counts.json"):
        (again / name).write_text((out / name).read_text())
    built, _, counts = trainer.build_trainer(tdpo_config(data_cache, again, tiny_llama_dir), again, MetricsLogger(again))
    assert counts["pairs/count"] == len(pairs) == len(built.train_dataset)
    assert sorted(r["chosen"][0]["content"] for r in built.train_dataset) == sorted(p["chosen"] for p in pairs)

    # other sampling settings: the written pairs are not theirs, so they are sampled again
    monkeypatch.setattr(on_policy, "sample_pairs", sampled)
    resampled, _, fresh = on_policy.on_policy_pairs(
        tdpo_config(data_cache, again, tiny_llama_dir, **{"rollout.temperature": 0.9}), tiny_llama_dir,
        built.processing_class, again)
    assert fresh and resampled


def test_no_right_answer_among_the_samples_is_a_clear_error(data_cache, tiny_llama_dir, tmp_path):
    from m1_align.preference import trainer

    with pytest.raises(ConfigError, match="tdpo.pairs=on_policy: none of 6 questions"):
        trainer.run(tdpo_config(data_cache, tmp_path / "none", tiny_llama_dir))
    assert not (tmp_path / "none" / "pairs.jsonl").exists()


@pytest.mark.slow
def test_two_processes_share_the_sampling_and_stop_together_on_no_pairs(data_cache, tiny_llama_dir, tmp_path):
    """Each process samples its half of the questions; a finding on the gathered result (here: no right answer
    anywhere) stops every process with the same one-line error instead of leaving one waiting for the other."""
    import os
    import subprocess
    import sys

    from conftest import SMALL_DATA

    out = tmp_path / "two"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "m1_align.cli", "tdpo",
        f"output_dir={out}", f"model.path={tiny_llama_dir}", f"data.cache_dir={data_cache}", "model.dtype=float32",
        *(f"data.{k}={v}" for k, v in SMALL_DATA.items()),
        "tdpo.pairs=on_policy", "tdpo.pair_prompts=6", "rollout.engine=hf", "rollout.max_new_tokens=8",
        "train.max_steps=2", "train.batch_size=2", "train.eval_limit=1",
    ]
    done = subprocess.run(command, env={**os.environ, "DS_ACCELERATOR": "cpu"}, capture_output=True, text=True, timeout=600)
    assert done.returncode != 0
    assert done.stderr.count("none of 6 questions had both a right and a wrong answer") == 2, done.stderr[-3000:]
    assert not (out / "pairs.jsonl").exists()


def test_on_policy_pairs_sample_the_users_own_questions_from_the_command_line(data_cache, tiny_llama_dir, tmp_path,
                                                                              monkeypatch, capsys):
    """`tdpo.pairs=on_policy data.train_file=FILE`: FILE holds questions with answers (the rl shape), which the
    start-up check accepts and the sampler reads; the pairs are the model's answers to those questions."""
    from conftest import SMALL_DATA

    from m1_align.cli import main
    from m1_align.preference import on_policy

    monkeypatch.setattr(on_policy, "rule_score", lambda rule, text, gold: type("S", (), {"score": parity(None, text)}))
    monkeypatch.setattr(on_policy, "SamplingSettings",
                        lambda **k: SamplingSettings(**{**k, "stop_token_ids": tuple(range(0, 2000, 2))}))
    questions = [f"Which ICD-10 code is condition number {i}?" for i in range(6)]
    user = tmp_path / "questions.jsonl"
    user.write_text("".join(json.dumps({"prompt": q, "answer": f"X{i}", **({"rule": "exact_term"} if i % 2 else {})}) + "\n"
                            for i, q in enumerate(questions)))
    out = tmp_path / "tdpo"
    argv = ["tdpo", f"output_dir={out}", f"model.path={tiny_llama_dir}", f"data.cache_dir={data_cache}",
            *(f"data.{k}={v}" for k, v in SMALL_DATA.items()), "model.dtype=float32", "tdpo.pairs=on_policy",
            f"data.train_file={user}", "tdpo.pair_prompts=6", "rollout.engine=hf", "rollout.max_new_tokens=8",
            "train.max_steps=2", "train.batch_size=2", "train.max_length=128", "train.eval_limit=1",
            "train.eval_max_new_tokens=4"]
    assert main(argv) == 0, capsys.readouterr().err[-2000:]
    pairs = [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]
    assert pairs and {p["prompt"][-1]["content"] for p in pairs} <= set(questions)
    assert all(p["task"] == "user" for p in pairs)
    assert json.loads((out / "result.json").read_text())["metrics"]["steps"] == 2
