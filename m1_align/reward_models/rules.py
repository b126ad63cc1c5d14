"""Rule rewards for verifiable medical answers.

Every rule first finds the final answer in free text (the last `Answer:` line, or a phrase such as
"the answer is ..."), then compares it with the gold answer, and says why it scored what it did.
"""

from __future__ import annotations

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


def medcalc(text: str, gold: str) -> RuleScore:
    """MedCalc-Bench's check (m1_align.data.medcalc.medcalc_score): scores exact, decimals within 5%, dates exact."""
    # imported here, not at the top: rules stay importable without the data layer's imports
    from m1_align.data.medcalc import medcalc_score

    return medcalc_score(text, gold)


RULES = {"mcq_letter": mcq_letter, "icd10_code": icd10_code, "exact_term": exact_term, "format": answer_format,
         "medcalc": medcalc}


def score(rule: str, text: str, gold: str) -> RuleScore:
    if rule not in RULES:
        raise ValueError(f"unknown rule {rule!r}; expected one of {', '.join(RULES)}")
    return RULES[rule](text, gold)
