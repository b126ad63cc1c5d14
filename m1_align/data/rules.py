"""Rule rewards for verifiable medical answers.

Every rule first finds the final answer in free text (the last `Answer:` line, or a phrase such as
"the answer is ..."), then compares it with the gold answer, and says why it scored what it did.
"""

from __future__ import annotations

import math
import re
import string
from dataclasses import dataclass

ANSWER_LINE = re.compile(r"answer\s*(?:is)?\s*[:：]\s*(.+)", re.IGNORECASE)
ANSWER_PHRASE = re.compile(r"(?:the\s+)?(?:correct\s+|final\s+)?answer\s+is\s+(.+)", re.IGNORECASE)
# ICD-10-CM: letter, digit, alphanumeric, then optionally a dot and up to 4 more characters.
ICD10_CODE = re.compile(r"\b([A-Z][0-9][0-9A-Z])(?:\.?([0-9A-Z]{1,4}))?\b")
LETTER = re.compile(r"(?<![A-Za-z])\(?([A-D])\)?(?![A-Za-z])")


@dataclass
class RuleScore:
    score: float  # 1.0 correct, 0.0 wrong or unparseable
    parsed: str | None  # what we read as the final answer
    reason: str


def final_answer(text: str) -> str | None:
    """The text after the last `Answer:`; else after the last "the answer is"; else None."""
    lines = [m.group(1) for m in ANSWER_LINE.finditer(text)]
    if not lines:
        lines = [m.group(1) for m in ANSWER_PHRASE.finditer(text)]
    if not lines:
        return None
    answer = lines[-1].strip().splitlines()[0] if lines[-1].strip() else ""
    return answer.strip() or None


def mcq_letter(text: str, gold: str) -> RuleScore:
    answer = final_answer(text)
    if answer is None:
        return RuleScore(0.0, None, "no final answer found")
    letters = {m.group(1) for m in LETTER.finditer(answer.split(":")[0].split(".")[0])}
    if not letters:
        letters = {m.group(1) for m in LETTER.finditer(answer)}
    if len(letters) != 1:
        why = "no option letter" if not letters else f"several letters ({', '.join(sorted(letters))})"
        return RuleScore(0.0, answer, f"{why} in the final answer")
    (letter,) = letters
    ok = letter == gold.strip().upper()
    return RuleScore(float(ok), letter, f"letter {letter} {'matches' if ok else 'differs from'} gold {gold}")


def normalize_code(code: str) -> str:
    return code.replace(".", "").upper().strip()


def icd10_code(text: str, gold: str) -> RuleScore:
    answer = final_answer(text)
    if answer is None:
        return RuleScore(0.0, None, "no final answer found")
    codes = ["".join(m.groups(default="")) for m in ICD10_CODE.finditer(answer.upper())]
    if not codes:
        return RuleScore(0.0, answer, "no ICD-10-CM code in the final answer")
    code = codes[0]
    ok = code == normalize_code(gold)
    return RuleScore(float(ok), code, f"code {code} {'matches' if ok else 'differs from'} gold {normalize_code(gold)}")


_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_term(text: str) -> str:
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_term(text: str, gold: str) -> RuleScore:
    """Gold may list several accepted terms separated by ' | ' (e.g. abbreviation senses)."""
    answer = final_answer(text)
    if answer is None:
        return RuleScore(0.0, None, "no final answer found")
    accepted = {normalize_term(g) for g in gold.split(" | ")}
    ok = normalize_term(answer) in accepted
    return RuleScore(float(ok), answer, "term matches gold" if ok else f"term differs from gold {gold!r}")


def answer_format(text: str, gold: str | None = None) -> RuleScore:
    answer = final_answer(text)
    return RuleScore(float(answer is not None), answer, "final answer found" if answer else "no final answer found")


DECIMAL_TOLERANCE = 0.05  # MedCalc-Bench's lower/upper limits: 95% and 105% of the gold
# ---------------------------------------------------------------------------------------------
# MedCalc-Bench's check (the medcalc task family, m1_align.data.medcalc)
# ---------------------------------------------------------------------------------------------

_DATE = re.compile(r"(\d{1,2})/(\d{1,2})/(\d{4})")
# two numbers with a separator between them ("16 weeks, 1 day", "(16, 1)", "16 wk 1 d"), never "16" read as (1, 6)
_WEEKS_DAYS = re.compile(r"(\d+)\s*(?:(?:weeks?|wks?)\s*(?:,|and)?|,|and)\s*(\d+)", re.IGNORECASE)
_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\.\d+")


def gold_output_type(gold: str) -> str:
    """How a gold is scored, read from how it is written (see format_gold)."""
    gold = gold.strip()
    if re.fullmatch(r"\d{2}/\d{2}/\d{4}", gold):
        return "date"
    if re.fullmatch(r"\(\d+, \d+\)", gold):
        return "weeks_days"
    if re.fullmatch(r"-?\d+", gold):
        return "integer"
    if re.fullmatch(r"-?\d+\.\d+(?:e-?\d+)?", gold):
        return "decimal"
    raise ValueError(f"medcalc gold {gold!r} is not an integer, a decimal, MM/DD/YYYY or (weeks, days)")


def medcalc_score(text: str, gold: str, tolerance: float = DECIMAL_TOLERANCE):
    """MedCalc-Bench's correctness check on the model's last `Answer:` line.

    As in the benchmark's evaluation (evaluation/run.py, check_correctness with the dataset's limits):
    integer outputs (rule-based scores and counts) are correct when the answer rounded to an integer equals
    the gold; decimal outputs when the answer lies within [lower, upper] = 95%-105% of the gold (inclusive);
    dates (MM/DD/YYYY, leading zeros optional) and (weeks, days) gestational ages when they are equal.
    The benchmark takes the last number of a free-text answer; we ask for the number alone and take the
    first number on the answer line, so units after it ("62.9 mL/min/1.73 m²") never stand in for it.
    """
    output = gold_output_type(gold)
    answer = final_answer(text)
    if answer is None:
        return RuleScore(0.0, None, "no final answer found")
    if output == "date":
        found = _DATE.search(answer)
        if not found:
            return RuleScore(0.0, answer, "no MM/DD/YYYY date in the final answer")
        parsed = tuple(int(x) for x in found.groups())
        ok = parsed == tuple(int(x) for x in _DATE.fullmatch(gold.strip()).groups())
        return RuleScore(float(ok), found.group(0), f"date {'matches' if ok else 'differs from'} gold {gold}")
    if output == "weeks_days":
        found = _WEEKS_DAYS.search(answer)
        if not found:
            return RuleScore(0.0, answer, "no (weeks, days) in the final answer")
        parsed = (int(found.group(1)), int(found.group(2)))
        ok = f"({parsed[0]}, {parsed[1]})" == gold.strip()
        return RuleScore(float(ok), f"({parsed[0]}, {parsed[1]})", f"(weeks, days) {'match' if ok else 'differ from'} gold {gold}")
    found = _NUMBER.search(answer)
    if not found:
        return RuleScore(0.0, answer, "no number in the final answer")
    value = float(found.group(0).replace(",", ""))
    if not math.isfinite(value):
        return RuleScore(0.0, found.group(0), "the final answer is not a finite number")
    if output == "integer":
        ok = round(value) == int(gold)
        return RuleScore(float(ok), found.group(0), f"{round(value)} {'equals' if ok else 'differs from'} gold {gold}")
    target = float(gold)
    lower, upper = sorted((target * (1 - tolerance), target * (1 + tolerance)))
    ok = lower <= value <= upper
    return RuleScore(
        float(ok), found.group(0),
        f"{value:g} {'within' if ok else 'outside'} [{lower:g}, {upper:g}] ({tolerance:.0%} of gold {gold})",
    )


RULES = {"mcq_letter": mcq_letter, "icd10_code": icd10_code, "exact_term": exact_term, "format": answer_format,
         "medcalc": medcalc_score}


def score(rule: str, text: str, gold: str) -> RuleScore:
    if rule not in RULES:
        raise ValueError(f"unknown rule {rule!r}; expected one of {', '.join(RULES)}")
    return RULES[rule](text, gold)
