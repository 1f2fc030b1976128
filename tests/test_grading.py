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


# ------------------------------------------------- the grader wherever answers are read (no model loaded)


def _reply(content: str):
    from serve_app.serving.messages import Final, Reply

    return Reply("", content, Final("stop", 1, 1, 0, "fast", "fast", None, None, None))


def test_select_vote_counts_the_answers_the_configured_grader_reads():
    from serve_app.serving.responses import rank_choices

    outs = [_reply(c) for c in ("\\boxed{3}", "\\boxed{0.5}", "\\boxed{\\frac{1}{2}}")]
    _, _, by_math = rank_choices(outs, [{} for _ in outs], "vote", seed=0, grader=MATH)
    assert by_math["chosen_sample"] == 1 and by_math["scores"] == [1.0, 2.0, 2.0]
    _, _, by_default = rank_choices(outs, [{} for _ in outs], "vote", seed=0)  # number: 3, 5 and 2 all differ
    assert by_default["chosen_sample"] == 0 and by_default["scores"] == [1.0, 1.0, 1.0]


def test_the_service_config_takes_a_grader_by_name():
    from pydantic import ValidationError

    from serve_app.config import AppConfig

    assert AppConfig().grader is None  # build_app settles it from the probe
    assert AppConfig(grader="math").grader == "math"
    with pytest.raises(ValidationError, match="grader"):
        AppConfig(grader="regex")


def _probe_file(path, calibration: dict):
    import torch

    from serve_app.core.kv_features import PoolingConfig
    from serve_app.core.policy import OnlineConfig
    from serve_app.core.probe import FORMAT, LabelConfig

    torch.save({"format": FORMAT, "pooling": PoolingConfig().model_dump(), "labels": LabelConfig().model_dump(),
                "thresholds": OnlineConfig().model_dump(), "model_fingerprint": "0" * 64, "heads": {}, "calibration": calibration}, path)
    return path


def test_offline_tools_grade_like_the_probe_was_calibrated(tmp_path, model_dir):
    from serve_app.core.probe import Probe
    from serve_app.offline.common import grader_name

    assert Probe.load(model_dir / "probe.pt").grader == "number"  # calibrated before graders were recorded
    math_probe = _probe_file(tmp_path / "math.pt", {"grader": "math"})
    assert Probe.load(math_probe).grader == "math"
    assert grader_name(None, math_probe) == "math"
    assert grader_name("exact", math_probe) == "exact"
    assert grader_name(None, tmp_path / "missing.pt") == "number"
    with pytest.raises(ValueError, match="unknown grader 'regex'"):
        grader_name(None, _probe_file(tmp_path / "bad.pt", {"grader": "regex"}))


def test_setup_refuses_references_the_grader_cannot_use_before_loading_a_model(tmp_path):
    from serve_app.offline.common import setup

    data = tmp_path / "capitals.json"
    data.write_text('[{"prompt": "Capital of France?", "target": "Paris"}]')
    with pytest.raises(ValueError, match=r"capitals\.json: row 0: reference answer 'Paris' is not an integer"):
        setup(tmp_path / "no-model", data, grader="number")
    with pytest.raises(FileNotFoundError):  # past the check: the model is what is missing
        setup(tmp_path / "no-model", data, grader="exact")


def test_load_test_client_grades_with_the_grader_it_is_given():
    from loadtests.client import grade

    assert grade("</think>\n\n-11", "-11") and not grade("</think>\n\n11", "-11")
    assert grade("It is Paris.", "paris")  # number, today's rule: a non-integer reference by containment
    assert not grade("\\boxed{\\frac12}", "0.5") and grade("\\boxed{\\frac12}", "0.5", "math")
    assert grade("The answer is (C)", "c", "choice") and not grade("The answer is (C)", "D", "choice")


def test_the_service_grades_like_its_probe_unless_told_otherwise(tmp_path, model_dir):
    import torch

    from serve_app.app import _with_probe
    from serve_app.config import AppConfig

    data = torch.load(model_dir / "probe.pt", map_location="cpu", weights_only=True)
    data["calibration"]["grader"] = "math"
    torch.save(data, tmp_path / "math.pt")
    assert _with_probe(AppConfig(probe=str(tmp_path / "math.pt")))[0].grader == "math"
    assert _with_probe(AppConfig(probe=str(tmp_path / "math.pt"), grader="exact"))[0].grader == "exact"
    assert _with_probe(AppConfig())[0].grader == "number"  # the shipped probe records none
