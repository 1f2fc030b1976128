"""read_dataset (serve_app.core.datasets): one set of questions written in every supported format
reads back as the same questions and reference answers."""

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from serve_app.core.datasets import last_boxed, read_dataset, reference_from_text
from serve_app.core.grading import get_grader
from serve_app.core.task import generate_problems, problem_row, read_jsonl, write_jsonl

ROOT = Path(__file__).resolve().parent.parent
PROBLEMS = generate_problems(20, seed=19)
QUESTIONS = [p.question for p in PROBLEMS]
REFERENCES = [str(p.answer) for p in PROBLEMS]


def _native(tmp: Path) -> Path:
    write_jsonl(PROBLEMS, tmp / "native.jsonl")
    return tmp / "native.jsonl"


def _gsm8k(tmp: Path) -> Path:
    write_jsonl(PROBLEMS, tmp / "gsm8k.jsonl", style="gsm8k")
    return tmp / "gsm8k.jsonl"


def _math(tmp: Path) -> Path:
    rows = [{**problem_row(p, "math"), "level": "Level 1"} for p in PROBLEMS]
    path = tmp / "math.json"
    path.write_text(json.dumps({"data": rows}))
    return path


def _parquet(tmp: Path) -> Path:
    path = tmp / "arith.parquet"
    pq.write_table(pa.Table.from_pylist([{"prompt": p.question, "target": p.answer} for p in PROBLEMS]), path)  # int answers
    return path


@pytest.mark.parametrize("write", [_native, _gsm8k, _math, _parquet])
def test_every_format_reads_back_the_same_questions_and_references(tmp_path, write):
    rows = read_dataset(write(tmp_path))
    assert [r["question"] for r in rows] == QUESTIONS
    assert [r["answer"] for r in rows] == REFERENCES
    number = get_grader("number")
    assert all(number.correct(f"</think>\n\n{p.answer}", r["answer"]) for p, r in zip(PROBLEMS, rows))


def test_the_raw_answer_and_other_columns_are_kept(tmp_path):
    gsm = read_dataset(_gsm8k(tmp_path))[0]
    assert gsm["answer_text"].endswith(f"\n#### {PROBLEMS[0].answer}") and gsm["answer"] == REFERENCES[0]
    math = read_dataset(_math(tmp_path))[0]
    assert math["level"] == "Level 1" and "\\boxed{" in math["solution"] and math["answer"] == REFERENCES[0]


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "data").glob("*.jsonl")))
def test_the_repositorys_data_files_read_as_before(name):
    before = list(read_jsonl(ROOT / "data" / name))
    after = read_dataset(ROOT / "data" / name)
    assert [(r["question"], r["answer"]) for r in after] == [(r["question"], r["answer"]) for r in before]


def test_limit_reads_the_first_rows(tmp_path):
    assert [r["question"] for r in read_dataset(_parquet(tmp_path), limit=3)] == QUESTIONS[:3]
    assert len(read_dataset(_gsm8k(tmp_path), limit=100)) == 20


def test_json_lists_and_json_lines_saved_as_json(tmp_path):
    plain = tmp_path / "list.json"
    plain.write_text(json.dumps([{"Question": q, "Answer": a} for q, a in zip(QUESTIONS, REFERENCES)]))  # names match case-insensitively
    assert [r["answer"] for r in read_dataset(plain)] == REFERENCES
    lines = tmp_path / "lines.json"
    lines.write_text(_native(tmp_path).read_text())
    assert [r["question"] for r in read_dataset(lines)] == QUESTIONS


def test_fields_can_be_named(tmp_path):
    path = tmp_path / "custom.jsonl"
    path.write_text("".join(json.dumps({"input": "ignored", "text": q, "gold": a}) + "\n" for q, a in zip(QUESTIONS, REFERENCES)))
    with pytest.raises(ValueError, match=r"found no answer field .*the columns are \['input', 'text', 'gold'\].*--answer-field"):
        read_dataset(path)
    rows = read_dataset(path, question_field="text", answer_field="gold")
    assert [r["question"] for r in rows] == QUESTIONS and [r["answer"] for r in rows] == REFERENCES
    with pytest.raises(ValueError, match=r"no question field 'query'; the columns are \['input', 'text', 'gold'\]"):
        read_dataset(path, question_field="query", answer_field="gold")


def test_a_row_without_the_fields_is_refused_by_line(tmp_path):
    path = _native(tmp_path)
    path.write_text(path.read_text() + json.dumps({"question": "What is 1 + 1?", "solution": "2"}) + "\n")
    with pytest.raises(ValueError, match=r"native\.jsonl:21: no 'answer' field; this row has \['question', 'solution'\]"):
        read_dataset(path)


@pytest.mark.parametrize("content,match", [
    ('{"meta": {"n": 1}}', r"under one of \['data', .*it has keys \['meta'\]"),
    ('[{"question": "", "answer": "1"}]', "must be non-empty text"),
    ('[{"question": "Q?", "answer": [1, 2]}]', "must be text or a number"),
    ('[{"question": "Q?", "answer": "work\\n#### "}]', "empty reference answer"),
    ('[["Q?", "1"]]', "expected an object"),
    ('{"question": "Q?", "answer": "1"', "not JSON"),
])
def test_bad_json_is_refused_with_a_clear_message(tmp_path, content, match):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=match):
        read_dataset(path)


def test_unknown_formats_and_missing_files_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"unknown data set format '\.csv'"):
        read_dataset(tmp_path / "data.csv")
    with pytest.raises(FileNotFoundError, match="no data set at"):
        read_dataset(tmp_path / "missing.jsonl")


@pytest.mark.parametrize("text,reference", [
    ("Natalia sold 48/2 = 24 clips in May.\n#### 72", "72"),
    ("total 1,234,567 then\n#### 1,234,567", "1234567"),
    ("#### -11", "-11"),
    ("so $x = \\boxed{\\frac{1}{\\sqrt{2}}}$", "\\frac{1}{\\sqrt{2}}"),
    ("first \\boxed{3}, in the end \\boxed{\\{1, 2\\} \\cup \\{3\\}}", "\\{1, 2\\} \\cup \\{3\\}"),
    ("\\fbox{7}", "7"),
    ("\\boxed{unclosed", "\\boxed{unclosed"),
    ("  Paris ", "Paris"),
    (72, "72"),
])
def test_reference_answers_of_gsm8k_math_and_plain_answers(text, reference):
    assert reference_from_text(text) == reference


def test_last_boxed_keeps_nested_braces():
    assert last_boxed("\\boxed{a} and \\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert last_boxed("no box") is None
