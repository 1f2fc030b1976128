"""Graders (serve_app.core.grading) on the answer forms real replies and data sets use."""

import threading
from typing import get_args

import pytest

from serve_app.core.grading import GRADERS, GraderName, check_references, get_grader
from serve_app.core.task import extract_answer, is_correct

MATH = get_grader("math")
CHOICE = get_grader("choice")
EXACT = get_grader("exact")
NUMBER = get_grader("number")


def test_registry_names_every_grader_once():
    assert list(GRADERS) == list(get_args(GraderName)) == ["number", "math", "choice", "exact"]
    assert get_grader(None) is NUMBER
    with pytest.raises(ValueError, match="unknown grader 'regex'; choose from number, math, choice, exact"):
        get_grader("regex")


@pytest.mark.parametrize("reply", [
    "</think>\n\n-11", "<think>12 then 5</think>\n\nThe answer is 66.", "007", "no answer", "3 + 4 = 7", "</think>\n\n",
    "<think>7</think>\n\n<think>8</think>\n\n9", "-0",
])
@pytest.mark.parametrize("reference", ["-11", "66", "7", "9", "0", 8])
def test_number_grader_is_todays_rule(reply, reference):
    assert NUMBER.correct(reply, reference) == is_correct(reply, reference)
    predicted = extract_answer(reply)
    assert NUMBER.extract(reply) == (None if predicted is None else str(predicted))


def test_number_grader_refuses_a_reference_that_is_no_integer():
    assert NUMBER.reference(" 066 ") == "66"
    with pytest.raises(ValueError, match="not an integer"):
        NUMBER.reference("\\frac12")


MATH_EQUAL = [
    ("The answer is 1/2", "\\frac{1}{2}"),
    ("so the answer is \\boxed{\\dfrac12}.", "1/2"),
    ("\\boxed{0.5}", "\\frac{1}{2}"),
    ("<think>maybe \\boxed{7}</think>\n\nIt is $\\boxed{\\frac{1}{\\sqrt{2}}}$", "\\frac{\\sqrt{2}}{2}"),
    ("\\boxed{\\left(\\frac{1}{2}\\right)^{2}}", "\\frac14"),
    ("The side is 5 cm.", "5"),
    ("\\boxed{5\\text{ cm}}", "5"),
    ("\\boxed{[0,1)}", "[0,1)"),
    ("so $x = -3$", "-3"),
    ("\\boxed{-\\frac{3}{4}}", "-0.75"),
    ("\\boxed{50\\%}", "50\\%"),
    ("The growth was 50%.", "50"),
    ("\\boxed{1000}", "1,000"),
    ("\\boxed{1+x^2}", "x^2+1"),
]
MATH_UNEQUAL = [
    ("\\boxed{[0,1]}", "[0,1)"),
    ("\\boxed{(0,1)}", "[0,1]"),
    ("The answer is 1/2", "1/3"),
    ("\\boxed{3}", "-3"),
    ("\\boxed{\\frac{1}{2}} but first \\boxed{0.5}... no: \\boxed{\\frac13}", "\\frac12"),  # the last box counts
    ("no number here", "5"),
    ("\\boxed{x^2-1}", "x^2+1"),
]


@pytest.mark.parametrize("reply,reference", MATH_EQUAL)
def test_math_grader_accepts_equivalent_forms(reply, reference):
    assert MATH.correct(reply, reference)


@pytest.mark.parametrize("reply,reference", MATH_UNEQUAL)
def test_math_grader_refuses_different_answers(reply, reference):
    assert not MATH.correct(reply, reference)


def test_math_grader_votes_equal_numbers_together():
    assert MATH.extract("\\boxed{\\dfrac12}") == MATH.extract("\\boxed{0.5}") == MATH.extract("it is 1/2") == "1/2"
    assert MATH.extract("\\boxed{\\frac{1}{3}}") != MATH.extract("\\boxed{\\frac{1}{2}}")
    assert MATH.extract("\\boxed{x = 5}") == "5"
    assert MATH.extract("nothing to see") is None


def test_math_grader_works_off_the_main_thread():
    # a Ray Serve replica grades off the main thread, where math-verify's signal timeout would raise
    out = {}
    worker = threading.Thread(target=lambda: out.update(ok=MATH.correct("\\boxed{\\frac{2}{4}}", "0.5"),
                                                        no=MATH.correct("\\boxed{[0,2]}", "[0,2)")))
    worker.start()
    worker.join(60)
    assert out == {"ok": True, "no": False}


@pytest.mark.parametrize("reply,letter", [
    ("The answer is (C).", "C"),
    ("Answer: c", "C"),
    ("answer is **D**", "D"),
    ("Therefore \\boxed{B}", "B"),
    ("\\boxed{\\text{(E)}}", "E"),
    ("Let me check each option.\nJ.", "J"),
    ("(b)", "B"),
    ("C. Paris", "C"),
    ("I think B is right, I guess", "B"),
    ("A train leaves at noon, so it must be G", "G"),
    ("<think>the answer is A</think>\n\nThe answer is (F)", "F"),
    ("the answer is a number I cannot find", None),
    ("no letter here", None),
    ("K is not an option", None),
])
def test_choice_grader_finds_the_final_letter(reply, letter):
    assert CHOICE.extract(reply) == letter
    assert CHOICE.correct(reply, "c") == (letter == "C")


def test_choice_grader_reads_references_and_refuses_others():
    assert [CHOICE.reference(r) for r in ("c", "(D)", "B. Paris", " a ")] == ["C", "D", "B", "A"]
    with pytest.raises(ValueError, match="not a choice letter"):
        CHOICE.reference("Paris")
    with pytest.raises(ValueError, match="not a choice letter"):
        CHOICE.reference("2")  # an MMLU-style index must be stored as its letter


@pytest.mark.parametrize("reply,reference,ok", [
    ("Paris", "paris", True),
    ("Let me think.\nThe answer is  New   York.", "new york", True),
    ("**Final answer: Blue**", "BLUE", True),
    ("\\boxed{\\text{Blue}}", "blue", True),
    ("<think>Rome</think>\n\nParis", "Paris", True),
    ("Paris, France", "Paris", False),
    ("Paris\nor maybe Rome", "Paris", False),  # the final line counts
    ("", "Paris", False),
])
def test_exact_grader_matches_normalised_final_answers(reply, reference, ok):
    assert EXACT.correct(reply, reference) is ok


def test_check_references_names_the_row_the_grader_cannot_use():
    rows = [{"answer": "C"}, {"answer": "(a)"}, {"answer": "Paris"}]
    check_references(rows[:2], CHOICE)
    with pytest.raises(ValueError, match=r"data\.jsonl: row 2: reference answer 'Paris' is not a choice letter"):
        check_references(rows, CHOICE, "data.jsonl: ")
    check_references(rows, EXACT)
