"""``kvswitch first-pass-errors`` (``serve_app.offline.first_pass_errors``): each wrong first pass read
line by line against the question's steps, named by its first wrong line, and counted with whether
the check fixed it."""

import json

import pytest

from serve_app.core.task import Problem, parse_question
from serve_app.offline.checked import Slip, checked_reply
from serve_app.offline.first_pass_errors import classify, crosses_zero, error_table

P = Problem((91, 5, 59), ("-", "+"))  # 91 - 5 + 59 = 145
Q = "What is 91 - 5 + 59?"
N = Problem((10, 75, 68), ("-", "+"))  # 10 - 75 = -65, -65 + 68 = 3: both steps cross zero


def _with_first_pass(lines: list[str], value: int) -> str:
    return "\n".join(lines) + f"\nSo the first pass gives {value}.\nLet me check each step.\n"


def test_a_right_first_pass_has_no_wrong_line_and_each_slip_kind_is_named():
    assert classify(P, checked_reply(P)) == ("none", None, None)
    assert classify(P, checked_reply(P, Slip(1, "operand", 99)))[:2] == ("operand", 1)
    assert classify(P, checked_reply(P, Slip(0, "operand", 1, first=True)))[:2] == ("carried", 0)
    assert classify(P, checked_reply(P, Slip(1, "result", 155))) == ("column", 1, "86 + 59: 6+9=15, 8+5+1=14, so 155")


def test_the_instead_numbers_are_checked_for_order_and_for_copies():
    first = "10 - 75: 75 - 10 instead, 5-0=5, 7-1=6, so -65"
    order = _with_first_pass([first, "-65 + 68: 65 - 68 instead, 15-8=7, 6-6-1=0, so -7"], -7)
    copied = _with_first_pass([first, "-65 + 68: 88 - 65 instead, 8-5=3, 8-6=2, so 23"], 23)
    assert classify(N, order) == ("order", 1, "-65 + 68: 65 - 68 instead, 15-8=7, 6-6-1=0, so -7")
    assert classify(N, copied)[:2] == ("instead-copy", 1)
    assert classify(N, _with_first_pass([first], -65)) == ("short", 1, None)
    assert classify(N, _with_first_pass([first, "-65 plus 68 is 3"], 3))[:2] == ("unparsed", 1)
    assert classify(N, _with_first_pass([first, "-64 + 68: 68 - 64 instead, 8-4=4, 6-6=0, so 4"], 4))[:2] == ("carried", 1)
    assert crosses_zero(N, 0) and crosses_zero(N, 1) and not crosses_zero(P, 0) and not crosses_zero(P, 1)  # 10 → -65 → 3; 91 → 86 → 145


def _records():
    order = _with_first_pass(["10 - 75: 75 - 10 instead, 5-0=5, 7-1=6, so -65",
                              "-65 + 68: 65 - 68 instead, 15-8=7, 6-6-1=0, so -7"], -7) + "</think>\n\n-7<|im_end|>"
    return [
        {"question": Q, "answer": "145", "output": checked_reply(P), "correct": True},  # right: not counted
        {"question": Q, "answer": "145", "output": checked_reply(P, Slip(1, "operand", 99)), "correct": True},  # fixed
        {"question": Q, "answer": "145", "output": checked_reply(P, Slip(1, "result", 155)), "correct": True},
        {"question": "What is 10 - 75 + 68?", "answer": "3", "output": order, "correct": False},
        {"question": Q, "answer": "145", "output": "145<|im_end|>", "correct": True},  # a fast reply: no first pass
    ]


def test_the_table_counts_each_kind_its_fixes_and_its_zero_crossings():
    assert parse_question("What is 10 - 75 + 68?") == N
    table = error_table(_records())
    assert table["all"] == {"first_wrong": 3, "fixed": 2, "crossing": 1}
    assert table["by_kind"]["operand"] == {"first_wrong": 1, "fixed": 1, "crossing": 0}
    assert table["by_kind"]["column"] == {"first_wrong": 1, "fixed": 1, "crossing": 0}
    assert table["by_kind"]["order"] == {"first_wrong": 1, "fixed": 0, "crossing": 1}
    assert table["examples"]["order"][0]["step"] == 1 and not table["examples"]["order"][0]["fixed"]


def test_the_command_reads_eval_reports_pools_them_and_writes_json_and_png(tmp_path, capsys):
    from serve_app.cli import main

    report = tmp_path / "r.json"
    report.write_text(json.dumps({"policies": {"slow": {"records": _records()}}}))
    out = tmp_path / "errors.json"
    assert main(["first-pass-errors", str(report), str(report), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["pooled"]["all"] == {"first_wrong": 6, "fixed": 4, "crossing": 2}
    assert out.with_suffix(".png").stat().st_size > 0
    assert "order" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no 'fast' policy"):
        main(["first-pass-errors", str(report), "--policy", "fast"])
