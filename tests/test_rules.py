"""Rule rewards on tricky strings: the final answer is found and compared the way a grader would."""

import pytest

from m1_align.data.rules import final_answer, score


@pytest.mark.parametrize(
    "text, gold, expected",
    [
        ("A is tempting and B is common, but C fits.\nAnswer: D", "D", 1.0),
        ("Answer: (b)", "B", 0.0),  # lower-case is not an option letter
        ("Answer: (B)", "B", 1.0),
        ("Answer: B. the arteries have elastic recoil", "B", 1.0),
        ("Answer: A or B", "A", 0.0),  # hedging between letters scores nothing
        ("I think the answer is C.", "C", 1.0),
        ("Answer: C\nWait, reconsider.\nAnswer: A", "A", 1.0),  # the last answer counts
        ("no commitment at all", "A", 0.0),
    ],
)
def test_mcq_letter(text, gold, expected):
    assert score("mcq_letter", text, gold).score == expected


@pytest.mark.parametrize(
    "text, gold, expected",
    [
        ("Answer: I24.0", "I24.0", 1.0),
        ("Answer: I240", "I24.0", 1.0),  # dot optional
        ("Answer: i24.0", "I24.0", 1.0),
        ("Answer: I24.1", "I24.0", 0.0),
        ("Answer: I24", "I24.0", 0.0),  # the parent category is not the code
        ("Tuberculous meningitis is A17.0 per the chapter.\nAnswer: A17.0", "A17.0", 1.0),
        ("Answer: tuberculosis", "A17.0", 0.0),
    ],
)
def test_icd10_code(text, gold, expected):
    assert score("icd10_code", text, gold).score == expected


@pytest.mark.parametrize(
    "text, gold, expected",
    [
        ("Answer: Kidney Disease Improving Global Outcomes.", "Kidney Disease Improving Global Outcomes", 1.0),
        ("Answer: the hypoglycemia", "Hypoglycemia", 1.0),
        ("Answer: carbon monoxide", "carbon dioxide | carbon monoxide", 1.0),
        ("Answer: hyperglycemia", "Hypoglycemia", 0.0),
    ],
)
def test_exact_term(text, gold, expected):
    assert score("exact_term", text, gold).score == expected


def test_reason_explains_the_score():
    result = score("mcq_letter", "Answer: A or B", "A")
    assert "several letters" in result.reason and result.parsed == "A or B"
    assert score("format", "nothing here", "").reason == "no final answer found"


def test_final_answer_takes_the_rest_of_the_line():
    assert final_answer("reasoning...\nAnswer: E11.9\n") == "E11.9"


def test_unknown_rule():
    with pytest.raises(ValueError, match="unknown rule 'regex'"):
        score("regex", "x", "y")
