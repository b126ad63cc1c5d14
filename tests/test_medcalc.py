"""The medcalc task family: vignettes and golds from MedCalc-Bench's calculators, the benchmark's scoring,
and splits that keep a patient, and the held-out calculators, away from training."""

from __future__ import annotations

import dataclasses
import random
from collections import Counter

import pytest

from m1_align.config import DataConfig, RewardSection, SFTConfig
from m1_align.data import build as build_module
from m1_align.data import medcalc
from m1_align.data.build import (
    TRAIN_SPLITS,
    LeakError,
    build_datasets,
    build_dir,
    build_dir_name,
    read_split_rows,
)
from m1_align.data.medcalc import (
    CALCULATORS,
    DEFAULT_HELDOUT,
    MICRO,
    medcalc_sets,
    question,
    run_calculator,
)
from m1_align.data.rules import RULES, gold_output_type, medcalc_score, score
from m1_align.rewards.router import RewardRouter
from m1_align.stage_data import eval_rows

MEDCALC = {"train_per_calculator": 3, "eval_per_calculator": 30}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    cache = tmp_path_factory.mktemp("medcalc_cache")
    data = DataConfig(cache_dir=str(cache), seed=0, max_per_task=20, eval_per_task=10, medcalc=MEDCALC)
    return data, build_module.build_from_config(data)


# ---------------------------------------------------------------------------------------------
# Vignettes and golds, by hand
# ---------------------------------------------------------------------------------------------


def test_bmi_from_pounds_and_feet_and_inches():
    inputs = {"sex": "Male", "weight": (150, "lbs"), "height": (5, "ft", 10, "in")}
    text = question("bmi_calculator", inputs, random.Random(0))
    assert "5 ft 10 in" in text and "150 lb" in text and "body mass index in kg/m²" in text
    assert text.endswith("Give the final answer on the last line as 'Answer: <number>'.")
    # 70 in * 0.0254 = 1.778 m; 150 lb * 0.453592 = 68.039 kg; 68.039 / 1.778^2 = 21.523
    explanation, gold = run_calculator("bmi_calculator", inputs)
    assert gold == "21.523" and "68.039 kg" in explanation


def test_cha2ds2_vasc_counts_age_sex_and_history():
    inputs = {"age": (78, "years"), "sex": "Female", "hypertension": True, "diabetes": True, "stroke": False}
    text = question("cha2ds2_vasc_score", inputs, random.Random(0))
    assert "78-year-old" in text and "hypertension" in text and "type 2 diabetes" in text and "no previous stroke" in text
    assert "heart failure" not in text  # not in the inputs: not in the note (the package assumes it absent)
    assert run_calculator("cha2ds2_vasc_score", inputs)[1] == "5"  # age >= 75: 2, female 1, HTN 1, diabetes 1


def test_centor_reads_fahrenheit():
    inputs = {"age": (10, "years"), "temperature": (101.3, "degrees fahrenheit"), "exudate_swelling_tonsils": True,
              "tender_lymph_nodes": False, "cough_absent": True}
    text = question("centor_score", inputs, random.Random(0))
    assert "101.3 °F" in text and "denies any cough" in text and "no cervical lymphadenopathy" in text
    # 101.3 °F = 38.5 °C > 38: 1; age 3-14: 1; exudate: 1; no cough: 1
    assert run_calculator("centor_score", inputs)[1] == "4"


def test_calcium_correction_from_albumin_in_g_per_litre():
    inputs = {"albumin": (25, "g/L"), "calcium": (8.0, "mg/dL")}
    assert run_calculator("calcium_correction", inputs)[1] == "9.2"  # 0.8 * (4 - 2.5) + 8.0


def test_ckd_epi_from_micromoles_and_the_si_fidelity_check():
    inputs = {"sex": "Female", "age": (64, "years"), "creatinine": (88, f"{MICRO}mol/L")}
    # 88 µmol/L -> 1.0 mg/dL; 142 * (1.0 / 0.7)^-1.2 * 0.9938^64 * 1.012 = 62.91
    assert run_calculator("ckd_epi_2021_creatinine", inputs)[1] == "62.91"
    assert medcalc._si_is_faithful(88, f"{MICRO}mol/L", 113.12)
    # the package turns 2.1 mmol/L calcium into 8.0 mg/dL (8.42 is right): such a patient gets mg/dL
    assert not medcalc._si_is_faithful(2.1, "mmol/L", 40.08)


def test_dates_due_date_and_gestational_age():
    due = {"menstrual_date": "01/09/2023", "cycle_length": 30}
    assert run_calculator("estimated_due_date", due)[1] == "10/18/2023"  # + 40 weeks = 10/16, + (30 - 28) days
    assert "'Answer: MM/DD/YYYY'" in question("estimated_due_date", due, random.Random(0))
    age = {"menstrual_date": "01/06/2022", "current_date": "04/29/2022"}
    assert run_calculator("gestational_age", age)[1] == "(16, 1)"  # 25 + 28 + 31 + 29 = 113 days


def test_every_calculator_samples_and_its_gold_scores_itself():
    for name, calculator in CALCULATORS.items():
        rng = random.Random(name)
        for _ in range(20):
            inputs = calculator.sample(rng)
            explanation, gold = run_calculator(name, inputs)
            assert gold_output_type(gold) == calculator.output, name
            assert medcalc_score(f"{explanation}\nAnswer: {gold}", gold).score == 1.0, name
            assert calculator.vignette(inputs, rng)


# ---------------------------------------------------------------------------------------------
# Scoring as MedCalc-Bench does
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "answer, gold, expected",
    [
        ("95", "100.0", 1.0),  # lower limit: 95% of the gold, inclusive
        ("105", "100.0", 1.0),  # upper limit: 105%
        ("94.9", "100.0", 0.0),
        ("105.1", "100.0", 0.0),
        ("59.77", "62.91", 1.0),  # 0.95 * 62.91 = 59.7645
        ("59.76", "62.91", 0.0),
        ("62.9 mL/min/1.73 m²", "62.91", 1.0),  # the first number, not the 1.73 of the unit
        ("1,234.5", "1234.0", 1.0),
        ("3", "3", 1.0),
        ("3.4", "3", 1.0),  # integers: the answer rounded, as the benchmark does
        ("2.6", "3", 1.0),
        ("4", "3", 0.0),
        ("3.0", "3.0", 1.0),
        ("10/18/2023", "10/18/2023", 1.0),
        ("1/9/2023.", "01/09/2023", 1.0),  # leading zeros optional
        ("10/17/2023", "10/18/2023", 0.0),
        ("16 weeks and 1 day", "(16, 1)", 1.0),
        ("(16, 1)", "(16, 1)", 1.0),
        ("(16, 2)", "(16, 1)", 0.0),
    ],
)
def test_medcalc_score(answer, gold, expected):
    assert medcalc_score(f"Some working.\nAnswer: {answer}", gold).score == expected


def test_no_number_scores_zero_with_a_reason():
    result = medcalc_score("The score is high.\nAnswer: cannot be determined", "3")
    assert (result.score, result.reason) == (0.0, "no number in the final answer")
    assert medcalc_score("It is 3.", "3").reason == "no final answer found"
    assert medcalc_score("Answer: 16", "(16, 1)").reason == "no (weeks, days) in the final answer"  # never (1, 6)
    assert medcalc_score("Answer: soon", "10/18/2023").reason == "no MM/DD/YYYY date in the final answer"


def test_the_last_answer_line_counts():
    assert medcalc_score("Answer: 5\nOn reflection, age gives 2 not 1.\nAnswer: 3", "3").score == 1.0
    assert medcalc_score("Answer: 3\nOn reflection, age gives 2 not 1.\nAnswer: 5", "3").score == 0.0


def test_bad_gold_is_a_clear_error():
    with pytest.raises(ValueError, match="medcalc gold 'about 3'"):
        medcalc_score("Answer: 3", "about 3")


def test_registered_rule_and_reward_router():
    assert "medcalc" in RULES and score("medcalc", "Answer: 96", "100.0").score == 1.0
    rows = [{"prompt": [], "answer": "100.0", "rule": "medcalc"}, {"prompt": [], "answer": "3", "rule": "medcalc"}]
    rewards = RewardRouter(RewardSection(mode="rule"))(rows, ["Answer: 104", "Answer: 2"], [3, 3])
    assert [r.value for r in rewards] == [1.0, 0.0] and rewards[0].source == "rule:medcalc"


# ---------------------------------------------------------------------------------------------
# Splits
# ---------------------------------------------------------------------------------------------


def test_a_patient_is_on_one_side_only():
    sets = medcalc_sets(0, train_per_calculator=6, eval_per_calculator=8)
    items = {side: [q.example.item for q in questions] for side, questions in sets.items()}
    for side, keys in items.items():
        assert len(keys) == len(set(keys)), side
    sides = list(items)
    for i, a in enumerate(sides):
        for b in sides[i + 1:]:
            assert not set(items[a]) & set(items[b]), (a, b)
    # the held-out patients do not depend on the training budget
    bigger = medcalc_sets(0, train_per_calculator=9, eval_per_calculator=8)
    assert [q.example.item for q in bigger["test"]] == items["test"]
    assert [q.example.question for q in bigger["dev"]] == [q.example.question for q in sets["dev"]]


def test_a_repeated_input_set_is_drawn_again(monkeypatch):
    """A calculator with few possible patients: the stream skips input sets already drawn (patients and decoys)."""

    def tiny(rng):
        return {"age": (rng.randint(40, 79), "years"), "sys_bp": (120, "mm hg"), "dia_bp": (80, "mm hg"),
                "respiratory_rate": (16, "breaths per minute"), "bun": (10, "mg/dL"), "confusion": rng.random() < 0.5}

    monkeypatch.setattr(medcalc, "CALCULATORS", {"curb_65": dataclasses.replace(CALCULATORS["curb_65"], sample=tiny)})
    sets = medcalc_sets(0, train_per_calculator=4, eval_per_calculator=6, heldout_calculators=[])
    items = [q.example.item for questions in sets.values() for q in questions]
    assert len(items) == 24 and len(set(items)) == 24


def test_heldout_calculators_never_reach_training():
    sets = medcalc_sets(1, train_per_calculator=4, eval_per_calculator=5, heldout_calculators=["curb_65", "sch"])
    for side in TRAIN_SPLITS:
        assert {q.calculator for q in sets[side]} == set(CALCULATORS) - {"curb_65", "sch"}
    unseen = [q for side in ("test", "dev") for q in sets[side] if q.task == "medcalc_unseen"]
    assert Counter(q.calculator for q in unseen) == {"curb_65": 10, "sch": 10}


def test_build_guards_against_a_heldout_calculator_in_training(monkeypatch):
    real = medcalc_sets

    def leaky(seed, **kwargs):
        sets = real(seed, **kwargs)
        sets["rl"].append(next(q for q in sets["test"] if q.calculator == DEFAULT_HELDOUT[0]))
        return sets

    monkeypatch.setattr(medcalc, "medcalc_sets", leaky)
    with pytest.raises(LeakError, match=f"held-out calculator.*{DEFAULT_HELDOUT[0]}.*'rl'"):
        build_module.medcalc_rows(0, {"train_per_calculator": 1, "eval_per_calculator": 1})


def test_built_splits_sizes_and_fields(built):
    data, out = built
    trained = len(CALCULATORS) - len(DEFAULT_HELDOUT)
    eval_medcalc = [r for r in read_split_rows(out, "eval") if r["source"] == "medcalc"]
    sides = Counter(r["heldout"] for r in eval_medcalc)
    assert sides == {"test": 30 * len(CALCULATORS), "dev": 30 * len(CALCULATORS)} and sides["test"] >= 500
    for split in TRAIN_SPLITS:
        rows = [r for r in read_split_rows(out, split) if r["source"] == "medcalc"]
        assert len(rows) == 3 * trained and not {r["calculator"] for r in rows} & set(DEFAULT_HELDOUT)
        assert {r["task"] for r in rows} == {"medcalc_score", "medcalc_equation", "medcalc_date"}
    row = eval_medcalc[0]
    assert row["rule"] == "medcalc" and {"calculator", "kind", "output_type"} <= set(row)
    assert {r["kind"] for r in eval_medcalc} == {"score", "equation", "date"}
    # the SFT target is the package's explanation, then the gold on the answer line
    sft = next(r for r in read_split_rows(out, "sft") if r["source"] == "medcalc")
    example = next(q.example for q in medcalc_sets(0, **MEDCALC)["sft"] if q.example.item == sft["item"])
    assert sft["messages"][-1]["content"] == f"{example.reasoning}\nAnswer: {example.answer}"


def test_eval_rows_keep_test_and_dev_patients_apart(built):
    data, out = built
    cfg = SFTConfig(data=data)
    for limit in (None, 40, 1000):
        test = [r for r in eval_rows(cfg, limit, "test") if r["source"] == "medcalc"]
        dev = [r for r in eval_rows(cfg, limit, "dev") if r["source"] == "medcalc"]
        assert test and dev and not {r["item"] for r in test} & {r["item"] for r in dev}
    # a prefix of a task is balanced over its calculators (rows are listed round-robin)
    first = [r for r in eval_rows(cfg, 24, "test") if r["task"] == "medcalc_equation"]
    assert len(first) == 24 and max(Counter(r["calculator"] for r in first).values()) <= 3


def test_without_medcalc_the_build_is_unchanged(tmp_path):
    plain = DataConfig(cache_dir=str(tmp_path), seed=42)
    assert build_dir(plain) == tmp_path / build_dir_name(42, 2000, 200)
    assert "medcalc" not in build_module._params(42, 2000, 200, ["icd_code"])
    with_family = DataConfig(cache_dir=str(tmp_path), seed=42, medcalc={})
    assert build_dir(with_family).name.startswith(build_dir_name(42, 2000, 200) + "-medcalc-")


def test_build_is_deterministic_and_cached(built, tmp_path, monkeypatch):
    data, out = built
    again = build_datasets(tmp_path / "again", seed=0, max_per_task=20, eval_per_task=10, medcalc=MEDCALC)
    assert again["splits"] == build_module.read_manifest(out)["splits"]
    monkeypatch.setattr(build_module, "build_splits", lambda *a, **k: pytest.fail("a current build was rebuilt"))
    build_datasets(tmp_path / "again", seed=0, max_per_task=20, eval_per_task=10, medcalc=MEDCALC)


def test_config_names_unknown_calculators_and_accepts_family_tasks():
    with pytest.raises(ValueError, match="heldout_calculators: unknown calculator"):
        DataConfig(medcalc={"heldout_calculators": ["sofa"]})
    with pytest.raises(ValueError, match="at least one to train on"):
        DataConfig(medcalc={"heldout_calculators": list(CALCULATORS)})
    assert DataConfig(tasks=["medcalc_score", "icd_code"]).tasks == ["medcalc_score", "icd_code"]


def test_a_subset_of_calculators_keeps_their_patients():
    """medcalc.calculators keeps part of the family; each calculator draws from its own stream, so the kept
    ones hold exactly the questions they hold in the whole family."""
    kept = ["bmi_calculator", "mean_arterial_pressure", "conception_date"]
    part = medcalc_sets(7, 3, 2, heldout_calculators=["conception_date"], calculators=kept)
    whole = medcalc_sets(7, 3, 2, heldout_calculators=["conception_date"])
    for side, questions in part.items():
        assert {q.calculator for q in questions} <= set(kept)
        assert [q.example.item for q in questions] == [q.example.item for q in whole[side] if q.calculator in kept]
    with pytest.raises(ValueError, match="leave at least one to train on"):
        DataConfig(medcalc={"calculators": ["conception_date"], "heldout_calculators": ["conception_date"]})
