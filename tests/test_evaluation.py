"""Held-out evaluation (`m1-align eval`) and the run report, on a tiny model and a small data build."""

from __future__ import annotations

import itertools
import json
import shutil

import pytest
import torch

from m1_align.cli import main
from m1_align.config import load_config
from m1_align.data.build import build_datasets, build_dir_name, corpus_texts, read_split_rows
from m1_align.data.chat import prompt_ids
from m1_align.data.sampling import take_balanced
from m1_align.data.tokenizer import train_tokenizer
from m1_align.evaluation import benchmarks
from m1_align.evaluation.report import write_run_report
from m1_align.evaluation.run import resolve_target, run

DATA = {"seed": 0, "max_per_task": 10, "eval_per_task": 5}


def tiny_models(tokenizer):
    """(causal LM, scalar-head model): the hybrid model when it imports, else tiny Llamas."""
    torch.manual_seed(0)
    ids = dict(
        vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id
    )
    try:
        from m1_align.model import BaichuanM1ForCausalLM, BaichuanM1ForSequenceClassification, preset_config

        return (
            BaichuanM1ForCausalLM(preset_config("tiny", **ids)),
            BaichuanM1ForSequenceClassification(preset_config("tiny", num_labels=1, **ids)),
        )
    except ImportError:
        from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

        config = LlamaConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, **ids
        )
        return LlamaForCausalLM(config), LlamaForSequenceClassification(
            LlamaConfig(**config.to_dict(), num_labels=1)
        )


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    built = root / "cache" / build_dir_name(**DATA)
    build_datasets(built, **DATA)
    tokenizer = train_tokenizer(itertools.islice(corpus_texts(built), 300), 400, root / "tok")
    lm, rm = tiny_models(tokenizer)
    for model, name in ((lm, "lm"), (rm, "rm")):
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    data_args = [f"data.cache_dir={root / 'cache'}"] + [f"data.{k}={v}" for k, v in DATA.items()]
    return {"root": root, "built": built, "tokenizer": tokenizer, "lm": lm.eval(), "data_args": data_args}


def test_take_balanced_covers_every_group():
    rows = [{"s": "a"}] * 5 + [{"s": "b"}] * 5 + [{"s": "c"}]
    kept = take_balanced(rows, "s", 4)
    assert [r["s"] for r in kept] == ["a", "b", "c", "a"]
    assert take_balanced(rows, "s", None) == rows


def test_continuation_logprobs_match_hand_computation(env):
    model, tok = env["lm"], env["tokenizer"]
    context, continuation = (
        tok("Fever and cough", add_special_tokens=False)["input_ids"],
        tok(" pneumonia", add_special_tokens=False)["input_ids"],
    )
    longer = (context * 3, continuation)  # in the same batch: the first sequence is right-padded
    got = benchmarks.continuation_logprobs(
        model, [(context, continuation), longer], tok.pad_token_id, batch_size=2
    )

    with torch.no_grad():
        ids = torch.tensor([context + continuation])
        logp = model(input_ids=ids).logits[0].log_softmax(-1)
    by_hand = sum(logp[len(context) + i - 1, token].item() for i, token in enumerate(continuation))
    assert got[0] == pytest.approx(by_hand, abs=1e-4)


def test_gold_answer_logprob_scores_the_answer_line_after_the_models_reasoning(env):
    model, tok = env["lm"], env["tokenizer"]
    row = {"prompt": [{"role": "user", "content": "Which code?"}], "answer": "A01.1", "task": "icd_code"}
    completion = "Typhoid is coded under A01." + benchmarks.ANSWER_DELIMITER + " Z99"
    got = benchmarks.gold_answer_logprobs(model, tok, [row], [completion])

    # by hand: the reasoning before the delimiter stays, the model's own answer line is replaced by the gold one
    context = prompt_ids(tok, row["prompt"]) + tok.encode("Typhoid is coded under A01.", add_special_tokens=False)
    answer = tok.encode(benchmarks.ANSWER_DELIMITER + " A01.1", add_special_tokens=False) + [tok.eos_token_id]
    with torch.no_grad():
        logp = model(input_ids=torch.tensor([context + answer])).logits[0].log_softmax(-1)
    by_hand = sum(logp[len(context) + i - 1, token].item() for i, token in enumerate(answer))
    assert got["verifiable/gold_answer_logp"] == pytest.approx(by_hand, abs=1e-4)
    assert got["verifiable/icd_code/gold_answer_logp"] == got["verifiable/gold_answer_logp"]


def test_loglik_scoring_picks_the_option_the_model_was_taught(env):
    tok = env["tokenizer"]
    shortest = min(
        read_split_rows(env["built"], "mmlu_medical"),
        key=lambda r: len(r["question"]) + len("".join(r["options"])),
    )
    row = dict(shortest, answer="C")
    model, _ = tiny_models(tok)
    (before,) = benchmarks.option_logliks(model, tok, [row])
    # Teach the model the third option after "Answer:" (the scoring context).
    context = (
        prompt_ids(tok, row["prompt"])
        + tok(benchmarks.LOGLIK_PREFIX, add_special_tokens=False)["input_ids"]
    )
    target = tok(" " + row["options"][2], add_special_tokens=False)["input_ids"]
    ids = torch.tensor([context + target])
    labels = ids.clone()
    labels[0, : len(context)] = -100
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(8):
        optimizer.zero_grad()
        model(input_ids=ids, labels=labels).loss.backward()
        optimizer.step()

    (scores,) = benchmarks.option_logliks(model, tok, [row])
    assert max(range(4), key=before.__getitem__) != 2  # the preference was learnt, not there already
    assert max(range(4), key=scores.__getitem__) == 2
    metrics, samples = benchmarks.mmlu_medical(
        model, tok, [row], lambda prompts: ["Answer: C"] * len(prompts)
    )
    assert (
        metrics["mmlu_medical/accuracy_loglik"] == 1.0 and metrics["mmlu_medical/accuracy_generation"] == 1.0
    )
    assert samples[0]["loglik_letter"] == "C"


def test_eval_writes_metrics_for_every_benchmark(env):
    out = env["root"] / "out"
    cfg = load_config(
        "eval",
        None,
        [
            f"model.path={env['root'] / 'lm'}",
            f"output_dir={out}",
            "eval.limit=6",
            "eval.mmlu_limit=6",
            "eval.max_new_tokens=4",
            f"eval.reward_model={env['root'] / 'rm'}",
            *env["data_args"],
        ],
    )
    result = run(cfg)
    metrics = json.loads((out / "eval.json").read_text())
    subjects = [
        "anatomy",
        "clinical_knowledge",
        "college_biology",
        "college_medicine",
        "medical_genetics",
        "professional_medicine",
    ]
    expected = [
        "mmlu_medical/accuracy_generation",
        "mmlu_medical/accuracy_loglik",
        "verifiable/accuracy",
        "reward_model/mean",
        "verifiable/gold_answer_logp",
    ]
    expected += [f"mmlu_medical/{s}/accuracy_{kind}" for s in subjects for kind in ("generation", "loglik")]
    assert set(expected) <= set(metrics)
    assert metrics["mmlu_medical/n"] == 6 and metrics["reward_model/n"] <= 6
    tasks = {r["task"] for r in read_split_rows(env["built"], "eval")}
    assert {f"verifiable/{t}/accuracy" for t in tasks} <= set(metrics)
    for key, value in metrics.items():
        if "accuracy" in key or "win_rate" in key:
            assert 0.0 <= value <= 1.0, key
    samples = (out / "eval_samples.jsonl").read_text().splitlines()
    assert len(samples) == metrics["mmlu_medical/n"] + metrics["verifiable/n"] + metrics["reward_model/n"]
    assert (out / "result.json").is_file() and set(result.metrics) == set(expected[:5])
    assert metrics["verifiable/gold_answer_logp"] < 0


def test_eval_cli_on_a_run_dir_evaluates_its_last_policy_stage(env, capsys):
    run_dir = env["root"] / "run"
    for stage in ("sft", "tdpo", "rm"):  # rm is a reward model, not a policy: never picked
        shutil.copytree(env["root"] / "lm", run_dir / stage / "model")
        (run_dir / stage / "result.json").write_text("{}")
    assert resolve_target(run_dir) == (run_dir / "tdpo" / "model", run_dir / "tdpo")

    code = main(
        [
            "eval",
            str(run_dir),
            "eval.limit=1",
            "eval.mmlu_limit=1",
            "eval.max_new_tokens=2",
            "eval.mmlu_medical=false",
            *env["data_args"],
        ]
    )
    assert code == 0
    metrics = json.loads((run_dir / "tdpo" / "eval" / "eval.json").read_text())
    assert metrics["model"] == str(run_dir / "tdpo" / "model") and "verifiable/accuracy" in metrics
    assert "verifiable/accuracy" in capsys.readouterr().out


def test_eval_cli_bad_model_path_is_one_line(env, capsys):
    assert main(["eval", str(env["root"]), *env["data_args"]]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: model path") and "\n" not in err


def test_run_report_has_every_stage_and_plots(env):
    run_dir = env["root"] / "report_run"
    stages = ("pretrain", "sft", "elo", "tdpo", "rm", "ppo")  # the quickstart's
    for i, stage in enumerate(stages):
        stage_dir = run_dir / stage
        (stage_dir / "eval").mkdir(parents=True)
        (stage_dir / "eval.json").write_text(json.dumps({"train_loss": 3.0 - i * 0.3}))
        if stage != "rm":
            (stage_dir / "eval" / "eval.json").write_text(
                json.dumps(
                    {
                        "model": "x",
                        "mmlu_medical/n": 20,
                        "mmlu_medical/accuracy_loglik": 0.25 + 0.05 * i,
                        "verifiable/n": 10,
                        "verifiable/accuracy": 0.1 * i,
                    }
                )
            )
        (stage_dir / "result.json").write_text(json.dumps({"seconds": 10.0 + i}))
        records = [{"step": s, "loss": 3.0 - 0.1 * s} for s in range(1, 4)]
        if stage == "tdpo":
            records = [dict(r, **{"seqkl/chosen": 0.1 * r["step"], "seqkl/rejected": 0.2}) for r in records]
        if stage == "ppo":
            records = [dict(r, **{"reward/mean": 0.2 * r["step"], "kl": 0.01 * r["step"]}) for r in records]
        (stage_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (run_dir / "config.yaml").write_text(
        f"run_dir: {run_dir}\nstages:\n  sft:\n    data:\n      cache_dir: {env['root'] / 'cache'}\n"
        + "".join(f"      {k}: {v}\n" for k, v in DATA.items())
    )

    path = write_run_report(run_dir, list(reversed(stages)))  # any order in, pipeline order out
    text = path.read_text()
    assert "| metric | pretrain | sft | elo | tdpo | rm | ppo |" in text
    assert "| mmlu_medical/accuracy_loglik | 0.25 | 0.3 | 0.35 | 0.4 | – | 0.5 |" in text
    for name in ("heldout_accuracy", "loss", "reward", "kl"):
        assert (run_dir / "plots" / f"{name}.png").stat().st_size > 1000
        assert f"plots/{name}.png" in text
    assert "| mmlu_medical | 1089 |" in text  # the data manifest
    assert "| ppo | 15 | – |" in text and "| transformers |" in text and "cache_dir:" in text


@pytest.mark.parametrize("which", ["hybrid", "llama"])
def test_prompt_once_option_scores_equal_scoring_each_option_in_full(env, tiny_llama_dir, which):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if which == "hybrid":
        model, tok = env["lm"], env["tokenizer"]
    else:
        model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir))
        tok = AutoTokenizer.from_pretrained(str(tiny_llama_dir))
    rows = read_split_rows(env["built"], "mmlu_medical")[:5]  # prompts of different lengths: left padding
    got = benchmarks.option_logliks(model, tok, rows, batch_size=3)
    prefix = tok(benchmarks.LOGLIK_PREFIX, add_special_tokens=False)["input_ids"]
    for row, scores in zip(rows, got, strict=True):
        context = prompt_ids(tok, row["prompt"]) + prefix
        plain = benchmarks.continuation_logprobs(
            model, [(context, tok(" " + o, add_special_tokens=False)["input_ids"]) for o in row["options"]], tok.pad_token_id, 1)
        assert scores == pytest.approx(plain, abs=2e-4)
