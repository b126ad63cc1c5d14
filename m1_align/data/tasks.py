"""Templated medical tasks built from the source records.

A task lists its underlying items (an ICD code, an HPO term, a disease, an abbreviation) by a key
shared across tasks ("icd:I24.0" is the same item for ICD lookup and for Elixhauser), and turns one
item into an `Example`: a question, a short templated reasoning drawn from the source facts, the
answer, and a hard negative (the response one would give for the nearest wrong item). Splitting by
these keys keeps an item, and every question about it, on one side of the train/eval boundary.
"""

from __future__ import annotations

import random
import re
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

from m1_align.data.sources import (
    read_abbreviations,
    read_elixhauser,
    read_hpo_diseases,
    read_hpo_terms,
    read_icd10cm,
)

ANSWER_DELIMITER = "\nAnswer:"
SYSTEM_PROMPT = (
    "You are a careful medical assistant. Reason briefly, then give the final answer "
    "on the last line in the form 'Answer: <answer>'."
)
LETTERS = "ABCD"


def _normalise(text: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9]+", " ", text.lower()).split())


@dataclass
class Example:
    item: str  # key of the underlying entity
    question: str
    reasoning: str
    answer: str
    negative_reasoning: str  # a hard negative in the same format
    negative_answer: str
    rule: str  # how the answer is verified: mcq_letter | icd10_code | exact_term
    options: tuple[str, ...] = ()  # MCQ option texts in A-D order


def response(reasoning: str, answer: str) -> str:
    """An assistant turn: reasoning, then the answer on its own last line."""
    return f"{reasoning}{ANSWER_DELIMITER} {answer}"


@dataclass(frozen=True)
class Task:
    name: str
    source: str  # the source name (see sources.Source.name)
    verifiable: bool  # has a rule-checkable short answer: goes to the rl and eval splits
    items: Callable[[], list[str]]  # sorted item keys
    make: Callable[[str, random.Random], Example]


# ---------------------------------------------------------------------------------------------
# ICD-10-CM
# ---------------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _icd() -> dict[str, dict]:
    return {r["code"]: r for r in read_icd10cm().records}


@lru_cache(maxsize=1)
def _icd_unique_phrases() -> set[str]:
    """Descriptions and inclusion terms naming exactly one leaf: unambiguous lookup questions."""
    counts = Counter(
        phrase.lower()
        for r in _icd().values()
        if r["is_leaf"]
        for phrase in {r["description"], *r["inclusion_terms"]}
    )
    return {phrase for phrase, n in counts.items() if n == 1}


@lru_cache(maxsize=1)
def _icd_section_categories() -> dict[str, list[str]]:
    by_section = defaultdict(list)
    for r in _icd().values():
        if r["parent"] is None:
            by_section[r["section"]].append(r["code"])
    return by_section


def _icd_siblings(code: str) -> list[str]:
    record = _icd()[code]
    parent = record["parent"]
    family = _icd()[parent]["children"] if parent else _icd_section_categories()[record["section"]]
    return sorted(c for c in family if c != code)


def _icd_nearest(code: str, rng: random.Random) -> str:
    """A sibling code (same parent); for an only child, a sibling of its parent."""
    siblings = _icd_siblings(code) or _icd_siblings(_icd()[code]["parent"] or code)
    return rng.choice(siblings) if siblings else rng.choice(icd_code_items())[4:]


def _icd_place(code: str) -> str:
    record = _icd()[code]
    parent = record["parent"]
    if parent:
        return f"category {parent} ({_icd()[parent]['description']})"
    return f"the section {record['section']}"


@lru_cache(maxsize=1)
def icd_code_items() -> list[str]:
    unique = _icd_unique_phrases()
    return [f"icd:{c}" for c, r in _icd().items() if r["is_leaf"] and r["description"].lower() in unique]


def make_icd_code(item: str, rng: random.Random) -> Example:
    # The reasoning names the parent category and nothing copied from the question: a tiny model
    # copying a long description back tends to garble it before it reaches the answer.
    code = item[4:]
    record = _icd()[code]
    terms = [t for t in record["inclusion_terms"] if t.lower() in _icd_unique_phrases()]
    wrong = _icd_nearest(code, rng)
    if terms and rng.random() < 0.5:
        question = f'Give the ICD-10-CM code for "{rng.choice(terms)}".'
    else:
        question = f'What is the ICD-10-CM code for "{record["description"]}"?'
    return Example(
        item, question, f"It belongs to {_icd_place(code)}.", code, f"It belongs to {_icd_place(wrong)}.", wrong, "icd10_code"
    )


def make_icd_description(item: str, rng: random.Random) -> Example:
    code = item[4:]
    record = _icd()[code]
    wrong = _icd_nearest(code, rng)
    chapter = f' (chapter "{record["chapter"]}")'
    return Example(
        item,
        f"What does ICD-10-CM code {code} describe?",
        f"{code} is a billable code in {_icd_place(code)}{chapter}.",
        record["description"],
        f"{code} is a billable code in {_icd_place(wrong)}{chapter}.",
        _icd()[wrong]["description"],
        "exact_term",
    )


# ---------------------------------------------------------------------------------------------
# Human Phenotype Ontology
# ---------------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _hpo() -> dict[str, dict]:
    return {t["id"]: t for t in read_hpo_terms().records}


@lru_cache(maxsize=1)
def _hpo_children() -> dict[str, list[str]]:
    children = defaultdict(list)
    for term in _hpo().values():
        for parent in term["parents"]:
            children[parent].append(term["id"])
    return children


@lru_cache(maxsize=1)
def hpo_definition_items() -> list[str]:
    return [
        f"hpo:{t['id']}"
        for t in _hpo().values()
        if t["definition"] and t["parents"] and t["parents"][0] in _hpo()
    ]


def make_hpo_definition(item: str, rng: random.Random) -> Example:
    term = _hpo()[item[4:]]
    parent = _hpo()[term["parents"][0]]
    siblings = [s for s in _hpo_children()[parent["id"]] if s != term["id"] and _hpo()[s]["definition"]]
    wrong = _hpo()[rng.choice(siblings) if siblings else rng.choice(hpo_definition_items())[4:]]
    lead = f'"{term["name"]}" ({term["id"]}) is a kind of "{parent["name"]}" in the Human Phenotype Ontology.'
    if term["layperson"]:
        lead += f' In plain language it is "{term["layperson"][0]}".'
    question = rng.choice(
        [f'Define the phenotype "{term["name"]}".', f'What does the HPO term "{term["name"]}" mean?']
    )
    wrong_lead = f'"{term["name"]}" is a kind of "{parent["name"]}", like "{wrong["name"]}".'
    return Example(item, question, lead, term["definition"], wrong_lead, wrong["definition"], "exact_term")


def _disease_key(name: str) -> str:
    return "disease:" + _normalise(name)


@lru_cache(maxsize=1)
def _diseases() -> dict[str, dict]:
    """One disease per normalised name (OMIM and Orphanet often list the same disease): the one
    with most named phenotypes."""
    best: dict[str, dict] = {}
    for disease in read_hpo_diseases().records:
        phenotypes = [p for p in disease["phenotypes"] if p in _hpo()]
        key = _disease_key(disease["name"])
        if key not in best or len(phenotypes) > len(best[key]["phenotypes"]):
            best[key] = {"name": disease["name"], "id": disease["id"], "phenotypes": phenotypes}
    return best


@lru_cache(maxsize=1)
def _diseases_by_phenotype() -> dict[str, list[str]]:
    postings = defaultdict(list)
    for key, disease in _diseases().items():
        for phenotype in disease["phenotypes"]:
            postings[phenotype].append(key)
    return postings


@lru_cache(maxsize=1)
def hpo_disease_items() -> list[str]:
    return sorted(k for k, d in _diseases().items() if len(d["phenotypes"]) >= 5)


def _nearest_diseases(key: str, shown: list[str], n: int) -> list[tuple[str, int]]:
    """Wrong diseases sharing most of the shown findings, but not all of them (else ambiguous)."""
    shared = Counter()
    for phenotype in shown:
        shared.update(_diseases_by_phenotype()[phenotype])
    ranked = sorted((-count, k) for k, count in shared.items() if k != key and count < len(shown))
    return [(k, -negcount) for negcount, k in ranked[:n]]


def make_hpo_disease_mcq(item: str, rng: random.Random) -> Example:
    disease = _diseases()[item]
    shown = rng.sample(disease["phenotypes"], rng.randint(5, min(8, len(disease["phenotypes"]))))
    nearest = _nearest_diseases(item, shown, 3)
    while len(nearest) < 3:  # rare: too few diseases share these findings
        other = rng.choice(hpo_disease_items())
        if other != item and other not in dict(nearest):
            nearest.append((other, 0))
    names = [disease["name"]] + [_diseases()[k]["name"] for k, _ in nearest]
    order = list(range(4))
    rng.shuffle(order)
    options = tuple(names[i] for i in order)
    answer, wrong = LETTERS[order.index(0)], LETTERS[order.index(1)]
    findings = "; ".join(_hpo()[p]["name"] for p in shown)
    question = (
        f"A patient presents with the following findings: {findings}.\n"
        "Which diagnosis best explains them?\n"
        + "\n".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(options))
        + "\nAnswer with the letter of the correct option."
    )
    # The reasoning cites options by letter: copying long disease names back is where a small model
    # garbles its output before it ever reaches the answer line.
    overlap = nearest[0][1]
    lead = f"All {len(shown)} findings are annotated features of option {answer}; the closest alternative, option {wrong}, shares only {overlap}."
    wrong_lead = f"{overlap} of the {len(shown)} findings are annotated features of option {wrong}, the best match."
    return Example(item, question, lead, answer, wrong_lead, wrong, "mcq_letter", options)


# ---------------------------------------------------------------------------------------------
# Medical abbreviations
# ---------------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _abbreviations() -> dict[str, list[str]]:
    """Unambiguous abbreviations grouped by expansion ("3D-CRT" and "3DCRT" are one item).

    An abbreviation is kept when every spelling that normalises like it ("H/H", "H&H") has one
    and the same sense, so a question never has two right answers.
    """
    senses = defaultdict(set)
    for record in read_abbreviations().records:
        senses[_normalise(record["abbreviation"])].update(_normalise(e) for e in record["expansions"])
    by_expansion = defaultdict(list)
    for record in read_abbreviations().records:
        if len(senses[_normalise(record["abbreviation"])]) == 1:
            by_expansion["abbr:" + _normalise(record["expansions"][0])].append(record["abbreviation"])
    return by_expansion


@lru_cache(maxsize=1)
def _abbreviation_order() -> list[tuple[str, str]]:
    """(abbreviation, item) sorted by abbreviation: neighbours share a prefix (hard negatives)."""
    return sorted((a, item) for item, abbrs in _abbreviations().items() for a in abbrs)


@lru_cache(maxsize=1)
def _expansions() -> dict[str, str]:
    """item -> the expansion as written in the dictionary (the item key is lower-cased)."""
    return {
        "abbr:" + _normalise(r["expansions"][0]): r["expansions"][0] for r in read_abbreviations().records
    }


def abbreviation_items() -> list[str]:
    return sorted(_abbreviations())


def make_abbreviation(item: str, rng: random.Random) -> Example:
    abbreviation = rng.choice(_abbreviations()[item])
    order = _abbreviation_order()
    i = order.index((abbreviation, item))
    neighbours = [other for _, other in order[max(0, i - 3) : i + 4] if other != item]
    wrong = rng.choice(neighbours)
    wrong_abbreviation = _abbreviations()[wrong][0]
    return Example(
        item,
        f'What does the medical abbreviation "{abbreviation}" stand for?',
        f'"{abbreviation}" is a medical abbreviation with a single accepted sense; its letters abbreviate the words of that term.',
        _expansions()[item],
        f'"{abbreviation}" reads like "{wrong_abbreviation}", so it expands to the same term.',
        _expansions()[wrong],
        "exact_term",
    )


# ---------------------------------------------------------------------------------------------
# Elixhauser comorbidities
# ---------------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _elixhauser() -> dict[str, dict]:
    """Codes mapped to exactly one comorbidity measure (a single verifiable category)."""
    return {f"icd:{r['code']}": r for r in read_elixhauser().records if len(r["measures"]) == 1}


@lru_cache(maxsize=1)
def elixhauser_items() -> list[str]:
    return sorted(_elixhauser())


@lru_cache(maxsize=1)
def _elixhauser_position() -> dict[str, int]:
    return {item: i for i, item in enumerate(elixhauser_items())}


def make_elixhauser(item: str, rng: random.Random) -> Example:
    record = _elixhauser()[item]
    items = elixhauser_items()
    position = _elixhauser_position()
    i = position[item]
    # Hard negative: the category of the nearest code (by code order) that maps elsewhere.
    nearby = sorted(items[max(0, i - 40) : i + 40], key=lambda other: abs(position[other] - i))
    wrong = next(
        (_elixhauser()[o] for o in nearby if _elixhauser()[o]["measures"] != record["measures"]), None
    )
    if wrong is None:
        wrong = _elixhauser()[
            rng.choice([o for o in items if _elixhauser()[o]["measures"] != record["measures"]])
        ]
    code = record["code"]
    # Reasoning through the measure (the software's own label) without copying the description.
    return Example(
        item,
        f"Which Elixhauser comorbidity category does ICD-10-CM code {code} ({record['description']}) map to?",
        f"The Elixhauser software flags {code} with the measure {record['measures'][0]}.",
        record["categories"][0],
        f"The Elixhauser software flags {code} with the measure {wrong['measures'][0]}.",
        wrong["categories"][0],
        "exact_term",
    )


TASKS: dict[str, Task] = {
    t.name: t
    for t in [
        Task("icd_code", "icd10cm", True, icd_code_items, make_icd_code),
        Task("icd_description", "icd10cm", False, icd_code_items, make_icd_description),
        Task("hpo_definition", "hpo", False, hpo_definition_items, make_hpo_definition),
        Task("hpo_disease_mcq", "hpo", True, hpo_disease_items, make_hpo_disease_mcq),
        Task("abbreviation", "abbreviations", True, abbreviation_items, make_abbreviation),
        Task("elixhauser", "elixhauser", True, elixhauser_items, make_elixhauser),
    ]
}
