"""The synthetic chain-arithmetic task the embedded model is trained and measured on (docs/method.md §7).

Questions read ``What is 37 + 48 - 19?``: operands 0–99, ``+`` and ``-`` evaluated left to right.
Every dataset file is JSONL ``{"question": ..., "answer": ...}``; the grader takes the last integer
after ``</think>`` (or in the whole text when there is no think block) and compares as integers.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, Field, model_validator

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
_INT_RE = re.compile(r"-?\d+")
_QUESTION_RE = re.compile(r"What is (\d+(?: [+-] \d+)+)\?")


class TaskConfig(BaseModel):
    """Shape of the generated questions; the defaults are the task the embedded model serves."""

    min_operators: int = Field(1, ge=1)
    max_operators: int = Field(6, ge=1)
    max_operand: int = Field(99, ge=1)

    @model_validator(mode="after")
    def _check_range(self) -> "TaskConfig":
        if self.min_operators > self.max_operators:
            raise ValueError("min_operators must be <= max_operators")
        return self


@dataclass(frozen=True)
class Problem:
    """One chain-arithmetic question: ``operands[0] ops[0] operands[1] ...``."""

    operands: tuple[int, ...]
    ops: tuple[str, ...]

    @property
    def num_operators(self) -> int:
        return len(self.ops)

    @property
    def question(self) -> str:
        parts = [str(self.operands[0])]
        for op, value in zip(self.ops, self.operands[1:]):
            parts += [op, str(value)]
        return f"What is {' '.join(parts)}?"

    def running_values(self) -> list[int]:
        """Value after each operator, evaluated left to right (the worked steps)."""
        values, acc = [], self.operands[0]
        for op, value in zip(self.ops, self.operands[1:]):
            acc = acc + value if op == "+" else acc - value
            values.append(acc)
        return values

    @property
    def answer(self) -> int:
        return self.running_values()[-1]


def parse_question(question: str) -> Problem | None:
    """Parse a question of the exact task form back into a Problem (None if it is not one)."""
    match = _QUESTION_RE.fullmatch(question.strip())
    if match is None:
        return None
    tokens = match.group(1).split()
    return Problem(tuple(int(t) for t in tokens[0::2]), tuple(tokens[1::2]))


def sample_problem(rng: random.Random, num_operators: int, max_operand: int = 99) -> Problem:
    operands = tuple(rng.randint(0, max_operand) for _ in range(num_operators + 1))
    ops = tuple(rng.choice("+-") for _ in range(num_operators))
    return Problem(operands, ops)


def generate_problems(n: int, seed: int, config: TaskConfig | None = None) -> list[Problem]:
    """``n`` problems, operator counts uniform over the configured range; same seed, same list."""
    config = config or TaskConfig()
    rng = random.Random(seed)
    return [
        sample_problem(rng, rng.randint(config.min_operators, config.max_operators), config.max_operand)
        for _ in range(n)
    ]


def extract_answer(text: str) -> int | None:
    """The graded answer: last integer after the last ``</think>``, else last integer in the text."""
    if THINK_CLOSE in text:
        text = text.rsplit(THINK_CLOSE, 1)[1]
    found = _INT_RE.findall(text)
    return int(found[-1]) if found else None


def reference_answer(answer: str | int) -> int:
    """A dataset's reference answer as an integer, read as-is (never run through the extractor)."""
    return int(str(answer).strip())


def is_correct(generated: str, answer: str | int) -> bool:
    predicted = extract_answer(generated)
    return predicted is not None and predicted == reference_answer(answer)


def num_operators(question: str) -> int:
    """Operator count of a task-form question (0 if the question is not of that form)."""
    problem = parse_question(question)
    return problem.num_operators if problem else 0


def write_jsonl(problems: Iterable[Problem], path: str | Path) -> int:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with path.open("w") as f:
        for p in problems:
            f.write(json.dumps({"question": p.question, "answer": str(p.answer)}) + "\n")
            count += 1
    return count


def read_jsonl(path: str | Path) -> Iterator[dict]:
    """Rows of a dataset file; raises ValueError naming the line if a row lacks question/answer."""
    with Path(path).open() as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if not isinstance(row, dict) or "question" not in row or "answer" not in row:
                raise ValueError(f"{path}:{line_no}: expected an object with 'question' and 'answer'")
            yield row
