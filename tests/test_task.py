import json

import pytest

from serve_app.core.task import (
    Problem,
    TaskConfig,
    extract_answer,
    generate_problems,
    is_correct,
    num_operators,
    parse_question,
    read_jsonl,
    write_jsonl,
)


def test_question_has_exact_form_and_left_to_right_answer():
    p = Problem((37, 48, 19), ("+", "-"))
    assert p.question == "What is 37 + 48 - 19?"
    assert p.running_values() == [85, 66]
    assert p.answer == 66
    # left to right: 10 - 20 + 5 is (10 - 20) + 5, not 10 - (20 + 5)
    assert Problem((10, 20, 5), ("-", "+")).answer == -5


def test_parse_question_round_trips_and_rejects_other_text():
    p = Problem((3, 99, 0, 7), ("-", "+", "-"))
    assert parse_question(p.question) == p
    assert parse_question("What is 3?") is None
    assert parse_question("What is 3 * 4?") is None
    assert num_operators(p.question) == 3
    assert num_operators("hello") == 0


def test_generator_is_deterministic_by_seed_and_respects_config():
    a = generate_problems(200, seed=11)
    assert a == generate_problems(200, seed=11)
    assert a != generate_problems(200, seed=12)
    assert {p.num_operators for p in a} == set(range(1, 7))
    assert all(0 <= x <= 99 for p in a for x in p.operands)
    b = generate_problems(50, seed=1, config=TaskConfig(min_operators=4, max_operators=5, max_operand=9))
    assert {p.num_operators for p in b} <= {4, 5}
    assert all(0 <= x <= 9 for p in b for x in p.operands)


def test_task_config_rejects_inverted_range():
    with pytest.raises(ValueError, match="min_operators"):
        TaskConfig(min_operators=5, max_operators=2)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("<think>\n1 + 2 = 3\n</think>\n\n3", 3),
        ("<think>\n5 - 9 = -4\n</think>\n\n-4", -4),  # negative answer
        ("<think>\nthe answer is 12\n</think>\n\nso 7", 7),  # only after </think>
        ("<think>\n7\n</think>\n\nno number here", None),  # integer only inside the thought
        ("The result is 10, no wait, 12.", 12),  # no think block: last integer in the whole text
        ("-0", 0),
        ("", None),
        ("nothing at all", None),
        ("<think>\n\n</think>\n\n42<|im_end|>", 42),
        ("a</think>1</think>2", 2),  # last think close wins
    ],
)
def test_extract_answer_edge_cases(text, expected):
    assert extract_answer(text) == expected


def test_is_correct_compares_as_integers_and_keeps_reference_verbatim():
    assert is_correct("</think>\n\n-11", "-11")
    assert is_correct("</think>\n\n007", 7)
    assert not is_correct("</think>\n\n-11", "11")
    assert not is_correct("no answer", "3")
    with pytest.raises(ValueError):
        is_correct("3", "three")  # a reference that is not an integer is a data error, not a miss


def test_jsonl_round_trip(tmp_path):
    path = tmp_path / "d.jsonl"
    problems = generate_problems(5, seed=3)
    assert write_jsonl(problems, path) == 5
    rows = list(read_jsonl(path))
    assert rows == [{"question": p.question, "answer": str(p.answer)} for p in problems]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "x"}) + "\n")
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        list(read_jsonl(bad))
