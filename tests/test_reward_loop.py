"""The reward model in the RL loop: open prompts in the RL split and in user files, routed to the reward model
beside rule-checked ones in the same batch; the length controls on the model's scores; the per-step share and
length-bias metrics; and the reward-hacking guard, on a planted reward that pays for length alone."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import CharTokenizer

from m1_align.config import ConfigError, DataConfig, HackingGuardSection, PPOConfig, RewardSection, validate
from m1_align.data.build import build_datasets, read_split_rows
from m1_align.data.tokenizer import train_tokenizer
from m1_align.data.user_data import DataError
from m1_align.rewards.hacking import HackingGuard, batch_reward_metrics, reward_hacking, trend
from m1_align.rewards.reward_model import score_conversations
from m1_align.rewards.router import RewardRouter, length_slope
from m1_align.rewards.verifiable import verifiable_sets
from m1_align.rl.loop import OnlineLoop

TEXTS = [f"The phenotype {w} means {d} of the {o}. Answer: {w} {d}" for w in ("short", "broad", "absent", "small")
         for d in ("a reduction", "an excess", "loss", "malformation") for o in ("hand", "heart", "ear", "kidney")]


# ---------------------------------------------------------------------------------------------
# Open prompts in the built RL split
# ---------------------------------------------------------------------------------------------


def test_open_tasks_join_the_rl_split_and_nothing_else_changes(tmp_path):
    small = {"seed": 0, "max_per_task": 12, "eval_per_task": 5, "tasks": ["icd_code", "icd_description", "hpo_definition"]}
    plain = build_datasets(tmp_path / "plain", **small)
    mixed = build_datasets(tmp_path / "open", rl_open_tasks=["icd_description"], **small)
    assert "rl_open_tasks" not in plain["params"]  # a default build keeps its params, so its cache
    assert mixed["params"]["rl_open_tasks"] == ["icd_description"]
    for split in plain["splits"]:
        same = plain["splits"][split]["sha256"] == mixed["splits"][split]["sha256"]
        assert same == (split != "rl"), split
    rl = read_split_rows(tmp_path / "open", "rl")
    assert [r for r in rl if r["task"] == "icd_code"] == read_split_rows(tmp_path / "plain", "rl")
    open_rows = [r for r in rl if r["task"] == "icd_description"]
    assert len(open_rows) == 12 and all(r["rule"] is None and r["answer"] for r in open_rows)
    held = set(json.loads((tmp_path / "open" / "heldout_items.json").read_text())["icd_description"])
    assert not held & {r["item"] for r in open_rows}  # a held-out item never becomes an open RL prompt
    with pytest.raises(ValueError, match=r"rl_open_tasks \['icd_code'\] are not non-verifiable"):
        build_datasets(tmp_path / "bad", rl_open_tasks=["icd_code"], **small)


def test_open_tasks_config_errors_are_one_line():
    assert DataConfig(rl_open_tasks=["icd_description", "hpo_definition"]).rl_open_tasks == ["hpo_definition", "icd_description"]
    for data, message in (({"rl_open_tasks": ["icd_code"]}, r"\['icd_code'\] are not open \(non-verifiable\) built tasks"),
                          ({"rl_open_tasks": ["hpo_definition"], "tasks": ["icd_code"]}, "left out by data.tasks")):
        with pytest.raises(ConfigError, match=message) as error:
            validate(PPOConfig, {"data": data}, "test")
        assert "\n" not in str(error.value)


# ---------------------------------------------------------------------------------------------
# A mixed batch: each prompt to its scorer, with a tiny real reward model
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    path = tmp_path_factory.mktemp("rm") / "rm"
    tokenizer = train_tokenizer(TEXTS, 300, path)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, num_labels=1, pad_token_id=tokenizer.pad_token_id)
    LlamaForSequenceClassification(config).save_pretrained(path)
    return path


def load_rm(path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    return AutoModelForSequenceClassification.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


MIXED = [
    {"prompt": [{"role": "user", "content": "ICD-10-CM code for unstable angina?"}], "answer": "I20.0", "rule": "icd10_code"},
    {"prompt": [{"role": "user", "content": "Define the phenotype short hand."}], "answer": "A reduction of the hand.",
     "rule": None, "task": "hpo_definition"},
    {"prompt": [{"role": "user", "content": "Abbreviation BP?"}], "answer": "blood pressure", "rule": "exact_term"},
    {"prompt": [{"role": "user", "content": "Define the phenotype broad heart."}], "answer": "An excess of the heart."},
]
RESPONSES = ["Answer: I20.0", "It means a reduction of the hand.", "Answer: heart rate", "An excess of the heart."]


def test_a_mixed_batch_routes_each_prompt_to_its_scorer(rm_dir):
    model, tokenizer = load_rm(rm_dir)
    router = RewardRouter(RewardSection(model=str(rm_dir)), model, tokenizer)
    rewards = router(MIXED, RESPONSES, [4, 9, 4, 7])
    assert [r.source for r in rewards] == ["rule:icd10_code", "model", "rule:exact_term", "model"]
    assert [router.source(row) for row in MIXED] == [r.source for r in rewards]
    # the model's rows get exactly what the reward model says of that conversation, one at a time
    alone = [score_conversations(model, tokenizer, [MIXED[i]["prompt"] + [{"role": "assistant", "content": RESPONSES[i]}]], 1024)[0]
             for i in (1, 3)]
    assert [rewards[1].value, rewards[3].value] == pytest.approx(alone, abs=1e-5)
    assert alone[0] != pytest.approx(alone[1])  # a real model: the two open answers score differently
    assert [rewards[0].value, rewards[2].value] == [1.0, 0.0]  # the rules: right code, wrong term
    assert [r.model_score for r in rewards] == [None, pytest.approx(alone[0], abs=1e-5), None, pytest.approx(alone[1], abs=1e-5)]


class LengthRM(torch.nn.Module):
    """A planted reward model that pays for length alone: its score is the conversation's token count."""

    def __init__(self):
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask=None):
        return type("Out", (), {"logits": attention_mask.sum(-1, keepdim=True).float()})()


def test_length_penalty_on_model_scores_only():
    router = RewardRouter(RewardSection(length_penalty=0.5, length_penalty_on="model"), LengthRM(), CharTokenizer())
    rewards = router(MIXED, RESPONSES, [4, 9, 4, 7])
    prompt_chars = [len(MIXED[i]["prompt"][0]["content"]) for i in range(4)]
    assert [r.value for r in rewards] == pytest.approx(
        [1.0, prompt_chars[1] + len(RESPONSES[1]) - 4.5, 0.0, prompt_chars[3] + len(RESPONSES[3]) - 3.5])
    everyone = RewardRouter(RewardSection(length_penalty=0.5), LengthRM(), CharTokenizer())(MIXED, RESPONSES, [4, 9, 4, 7])
    assert everyone[0].value == pytest.approx(1.0 - 2.0)  # the default, as before: every response pays


def test_model_length_control_takes_out_the_batch_length_fit():
    rows = [{"prompt": [{"role": "user", "content": "q"}], "answer": "ref"}] * 3
    texts = ["ab", "abcd", "abcdefgh"]
    # scores (the LengthRM counts the conversation's characters): 3, 5, 9; lengths in tokens 2, 4, 8: slope 1
    router = RewardRouter(RewardSection(mode="model", model_length_control=True), LengthRM(), CharTokenizer())
    rewards = router(rows, texts, [2, 4, 8])
    assert [r.value for r in rewards] == pytest.approx([17 / 3] * 3)  # all that remains is the mean score
    assert [r.model_score for r in rewards] == pytest.approx([3, 5, 9])  # logged raw: the bias stays visible
    assert length_slope([1.0, 2.0, 0.0], [1, 2, 3]) == pytest.approx(-0.5)
    assert length_slope([1.0, 2.0], [3, 3]) == 0.0


def test_share_and_length_bias_metrics():
    sources = ["rule:exact_term", "model", "model", "rule:exact_term", "model"]
    metrics = batch_reward_metrics(sources, ["model", "rule:exact_term", "rule:icd10_code"],
                                   [None, 1.0, 2.0, None, 4.0], [10, 3, 5, 2, 9])
    assert metrics["reward/share:model"] == pytest.approx(0.6)
    assert metrics["reward/share:rule:exact_term"] == pytest.approx(0.4)
    assert metrics["reward/share:rule:icd10_code"] == 0.0  # a source with no prompt this step still counts, as 0
    # Pearson of (1, 2, 4) with (3, 5, 9): both centred (-4/3, -1/3, 5/3) and (-8/3, -2/3, 10/3): exactly 1
    assert metrics["reward/rm_length_corr"] == pytest.approx(1.0)
    anti = batch_reward_metrics(["model"] * 3, ["model"], [3.0, 1.0, 2.0], [1, 3, 2])
    assert anti["reward/rm_length_corr"] == pytest.approx(-1.0)
    uneven = batch_reward_metrics(["model"] * 3, ["model"], [1.0, 0.0, 0.0], [0, 1, 2])
    assert uneven["reward/rm_length_corr"] == pytest.approx(-1 / math.sqrt(2 / 3 * 2))  # sxy -1, score ss 2/3, length ss 2
    assert "reward/rm_length_corr" not in batch_reward_metrics(["rule:x", "model"], [], [None, 2.0], [3, 4])


# ---------------------------------------------------------------------------------------------
# Open rows in a user's file
# ---------------------------------------------------------------------------------------------


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


USER_ROWS = [{"prompt": "Define the phenotype short hand.", "answer": "A reduction of the hand.", "rule": "open"},
             {"prompt": "Abbreviation BP?", "answer": "blood pressure"},
             {"prompt": "Define the phenotype broad heart.", "answer": "An excess of the heart.", "rule": "open"}]


def test_user_open_rows_reach_the_reward_model(tmp_path, rm_dir):
    from m1_align.stage_data import rl_rows
    from m1_align.training import check_inputs

    path = write_rows(tmp_path / "rl.jsonl", USER_ROWS)
    cfg = validate(PPOConfig, {"data": {"train_file": path}, "reward": {"model": str(rm_dir)}}, "test")
    check_inputs(cfg)
    rows = rl_rows(cfg)
    assert [r["rule"] for r in rows] == [None, "exact_term", None]  # no rule: exact match, as before
    model, tokenizer = load_rm(rm_dir)
    rewards = RewardRouter(cfg.reward, model, tokenizer)(rows, ["x", "Answer: blood pressure", "y"], [1, 3, 1])
    assert [r.source for r in rewards] == ["model", "rule:exact_term", "model"]


@pytest.mark.parametrize(("reward", "file_field", "message"), [
    ({}, "train_file", "data.train_file: 2 rows have rule 'open' (open questions), but no reward model is set to score "
                       "them; set reward.model"),
    ({"mode": "mix"}, "train_file", "but reward.mode=mix needs a rule on every prompt; set reward.mode=route"),
    ({"model": "RM"}, "answer_eval_file", "data.answer_eval_file: 2 rows have rule 'open' (open questions), but "
                                          "held-out answer accuracy checks each answer by its rule"),
])
def test_user_open_rows_without_a_scorer_are_one_line_errors(tmp_path, rm_dir, reward, file_field, message):
    from m1_align.training import check_inputs

    reward = {k: str(rm_dir) if v == "RM" else v for k, v in reward.items()}
    cfg = validate(PPOConfig, {"data": {file_field: write_rows(tmp_path / "rl.jsonl", USER_ROWS)}, "reward": reward}, "test")
    with pytest.raises(DataError) as error:
        check_inputs(cfg)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_built_open_prompts_without_a_reward_model_are_one_line_errors(tmp_path, rm_dir):
    from m1_align.training import check_inputs

    data = {"rl_open_tasks": ["hpo_definition"], "cache_dir": str(tmp_path)}
    with pytest.raises(ConfigError, match=r"^data.rl_open_tasks=\['hpo_definition'\] puts open prompts in the RL split, "
                                          r"but no reward model is set to score them; set reward.model"):
        check_inputs(validate(PPOConfig, {"data": data}, "test"))
    with pytest.raises(ConfigError, match="reward.mode=rule needs a rule on every prompt"):
        check_inputs(validate(PPOConfig, {"data": data, "reward": {"mode": "rule", "model": str(rm_dir)}}, "test"))
    check_inputs(validate(PPOConfig, {"data": data, "reward": {"model": str(rm_dir)}}, "test"))


# ---------------------------------------------------------------------------------------------
# The reward-hacking guard
# ---------------------------------------------------------------------------------------------


def test_trend_by_hand():
    fit = trend([0, 1, 2, 3], [1.0, 3.0, 2.0, 5.0])
    # slope = sum((x - 1.5)(y - 2.75)) / sum((x - 1.5)^2) = 5.5 / 5; residuals -0.1, 0.8, -1.3, 0.6: SSE 2.7
    assert fit.slope == pytest.approx(1.1)
    assert fit.se == pytest.approx(math.sqrt(2.7 / 2 / 5))
    assert trend([0, 1, 2], [4.0, 2.0, 0.0]).t == -math.inf  # a perfect fall is sure of its sign
    with pytest.raises(ValueError, match="3 or more points"):
        trend([0, 1], [1.0, 2.0])


def test_the_rule_needs_both_trends_past_the_threshold():
    rising, falling, flat_noise = [0.1, 0.2, 0.31, 0.4], [0.8, 0.7, 0.58, 0.5], [0.6, 0.55, 0.62, 0.57]
    history = lambda train, heldout: [(10 * (i + 1), r, h) for i, (r, h) in enumerate(zip(train, heldout, strict=True))]  # noqa: E731
    assert reward_hacking(history(rising, falling), window=4, threshold=3.0).hacking
    assert "rose" in reward_hacking(history(rising, falling), window=4, threshold=3.0).message
    assert not reward_hacking(history(rising, flat_noise), window=4, threshold=3.0).hacking  # held-out only wobbles
    assert not reward_hacking(history(falling, falling), window=4, threshold=3.0).hacking  # reward falls too
    assert not reward_hacking(history(rising, falling)[:3], window=4, threshold=3.0).hacking  # too few evaluations
    # only the last `window` evaluations count: an old fall the held-out measure has recovered from is forgotten
    recovered = history(rising + [0.5, 0.6, 0.7], falling + [0.55, 0.6, 0.66])
    assert not reward_hacking(recovered, window=4, threshold=3.0).hacking


HELDOUT = [{"prompt": [{"role": "user", "content": f"Term {i}?"}], "answer": f"term{i}", "rule": "exact_term", "task": "t"}
           for i in range(20)]
TRAIN = [{"prompt": [{"role": "user", "content": f"Define {i}."}], "answer": f"ref {i}", "rule": None} for i in range(8)]


class StubPolicyLoop(OnlineLoop):
    """The real loop (run: logging, evaluations, the guard) around a policy whose answers are written out: a hacking
    policy pads its answers by 3 words a step while forgetting the held-out terms, an honest one's answers grow by a
    word a step as it learns them. Its training reward is the real router's, with the planted length-only reward model."""

    stage = "stub"

    def __init__(self, cfg, hacking: bool):
        super().__init__(cfg)
        self.hacking = hacking
        self.router = RewardRouter(cfg.reward, LengthRM(), CharTokenizer())
        self.saved = []

    def prepare(self) -> int:
        from accelerate import Accelerator

        from m1_align.rl.loop import Trainable

        self.accelerator, self.output_dir = Accelerator(cpu=True), Path(self.cfg.output_dir)
        self.output_dir.mkdir(parents=True)
        scheduler = type("Constant", (), {"get_last_lr": lambda self: [1e-5]})()
        self.trainables = {"policy": Trainable(torch.nn.Linear(1, 1), None, scheduler)}
        self.policy, self.engine = self.trainables["policy"].model, type("Engine", (), {"close": lambda self: None})()
        return 0

    def total_steps(self) -> int:
        return self.cfg.train.max_steps

    def answer(self, step: int, i: int) -> str:
        words = 3 * step if self.hacking else 4 + step  # the honest policy's answers grow too, as they get fuller
        known = 16 - step if self.hacking else 6 + step  # how many held-out terms the policy still (or now) knows
        return "It is" + " very" * words + f" clear.\nAnswer: {f'term{i}' if (i * 7) % 20 < known else 'unsure'}"

    def step(self, step: int) -> dict[str, float]:
        texts = [self.answer(step, i) for i in range(len(TRAIN))]
        rewards = self.router(TRAIN, texts, [len(t.split()) for t in texts])
        return {"reward/mean": sum(r.value for r in rewards) / len(rewards)}

    def evaluate(self) -> dict[str, float]:
        return verifiable_sets(HELDOUT, lambda prompts: [self.answer(self.current_step, i) for i in range(len(prompts))])[0]

    def save_checkpoint(self, step: int) -> None:
        self.saved.append(step)

    def save_final(self) -> None: ...


def stub_cfg(tmp_path, **hacking) -> PPOConfig:
    return validate(PPOConfig, {"output_dir": str(tmp_path / "out"), "train": {"max_steps": 12, "eval_steps": 2},
                                "reward": {"mode": "model", "hacking": hacking}}, "test")


def logged(tmp_path, key):
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r[key]) for r in records if key in r]


def test_the_guard_fires_on_a_planted_length_reward_and_stops_the_run(tmp_path, capsys):
    result = StubPolicyLoop(stub_cfg(tmp_path, stop=True), hacking=True).run()
    # evaluations at 2, 4, 6, 8: the fourth completes the window; the run ends there, evaluated and saved
    assert logged(tmp_path, "guard/reward_hacking") == [(2, 0.0), (4, 0.0), (6, 0.0), (8, 1.0)]
    assert result.metrics["steps"] == 8 and result.metrics["stopped_for_reward_hacking"] == 1.0
    assert result.metrics["verifiable/accuracy"] < result.metrics["initial/verifiable/accuracy"]
    assert "step 8: possible reward hacking: over steps 2-8 the training reward rose" in capsys.readouterr().err


def test_the_guard_warns_without_stop_and_stays_quiet_on_an_honest_policy(tmp_path, capsys):
    result = StubPolicyLoop(stub_cfg(tmp_path / "warn"), hacking=True).run()
    assert result.metrics["steps"] == 12 and "stopped_for_reward_hacking" not in result.metrics
    assert [v for _, v in logged(tmp_path / "warn", "guard/reward_hacking")] == [0, 0, 0, 1, 1, 1]  # 2..10, final 12
    assert capsys.readouterr().err.count("possible reward hacking") == 3

    honest = StubPolicyLoop(stub_cfg(tmp_path / "honest", stop=True), hacking=False).run()
    assert honest.metrics["steps"] == 12
    assert [v for _, v in logged(tmp_path / "honest", "guard/reward_hacking")] == [0] * 6
    assert "reward hacking" not in capsys.readouterr().err


def test_the_guard_averages_the_reward_between_evaluations_and_checks_its_metric_name(tmp_path):
    guard = HackingGuard(HackingGuardSection(window=3))
    for value in (1.0, 3.0, float("nan")):
        guard.observe({"reward/mean": value})
    guard.observe({"skipped": 1.0})
    verdict, metrics = guard.check(10, {"verifiable/accuracy": 0.5})
    assert guard.history == [(10, 2.0, 0.5)] and metrics == {"guard/reward_hacking": 0.0} and not verdict.hacking
    guard.check(20, {"verifiable/accuracy": 0.4})  # no step since the last evaluation: no point
    assert len(guard.history) == 1

    from m1_align.rewards.hacking import hacking_guard

    with pytest.raises(ConfigError, match=r"reward.hacking.heldout_metric=verifiable/acc is not a metric of the "
                                          r"evaluation \(it reports verifiable/accuracy, verifiable/n\)"):
        hacking_guard(stub_cfg(tmp_path, heldout_metric="verifiable/acc"), {"verifiable/accuracy": 0.5, "verifiable/n": 20})
    assert hacking_guard(stub_cfg(tmp_path, heldout_metric=None), {"verifiable/accuracy": 0.5}) is None


# ---------------------------------------------------------------------------------------------
# One real PPO rollout on a mixed user file: the loop's own wiring of routes, shares and length bias
# ---------------------------------------------------------------------------------------------


def test_a_ppo_step_logs_each_source_share_and_the_rm_length_bias(data_cache, tiny_model_dir, tmp_path):
    from conftest import stage_overrides

    from m1_align.rewards.hacking import pearson
    from m1_align.rl.ppo import PPOLoop
    from m1_align.rollout.engine import Completion

    path = write_rows(tmp_path / "rl.jsonl", USER_ROWS + [{"prompt": "Abbreviation HR?", "answer": "heart rate"}])
    values = {"rollout.engine": "hf", "rollout.max_new_tokens": 12, "rollout.temperature": 1.5, "train.max_steps": 1,
              "train.padding_free": False, "ppo.samples_per_prompt": 2, "ppo.prompts_per_step": 4,
              "ppo.minibatch_size": 8, "ppo.advantage_estimator": "grpo", "data.train_file": path,
              # the policy's checkpoint read as a sequence classifier: a real reward model with an untrained head
              "reward.model": str(tiny_model_dir)}
    loop = PPOLoop(validate(PPOConfig, stage_overrides(data_cache, tmp_path / "out", tiny_model_dir, **values), "test"))
    loop.prepare()
    assert loop.reward_sources == ["model", "rule:exact_term"]
    samples, _ = loop.rollout(0)
    batch = loop.collect(samples)
    loop.advantages(batch)
    metrics = loop.step_metrics(samples, batch)
    assert sorted(s.source for s in samples) == ["model"] * 4 + ["rule:exact_term"] * 4
    model_samples = [s for s in samples if s.source == "model"]
    assert all(s.row["rule"] is None for s in model_samples) and all(s.model_score is None for s in samples if s not in model_samples)
    again = score_conversations(loop.router.reward_model, loop.tokenizer,
                                [s.row["prompt"] + [{"role": "assistant", "content": s.completion.text}] for s in model_samples],
                                loop.cfg.train.max_length)
    assert [s.model_score for s in model_samples] == pytest.approx(again, abs=1e-4)
    assert metrics["reward/share:model"] == pytest.approx(0.5) and metrics["reward/share:rule:exact_term"] == pytest.approx(0.5)
    corr = pearson([s.model_score for s in model_samples], [float(len(s.completion.token_ids)) for s in model_samples])
    assert metrics.get("reward/rm_length_corr") == (pytest.approx(corr) if corr is not None else None)

    # a random tiny policy rarely ends before max_new_tokens: cut the model-scored responses to four lengths
    # so the correlation is defined, and read it back from the step's metrics
    for k, s in zip((3, 5, 9, 12), model_samples, strict=True):
        c = s.completion
        s.completion = Completion(c.token_ids[:k], c.logprobs[:k], "length", loop.tokenizer.decode(c.token_ids[:k]))
    batch = loop.collect(samples)
    loop.advantages(batch)
    metrics = loop.step_metrics(samples, batch)
    scores = [s.model_score for s in model_samples]
    assert len(set(scores)) > 1
    assert metrics["reward/rm_length_corr"] == pytest.approx(pearson(scores, [3.0, 5.0, 9.0, 12.0]))
