"""The synthetic chain-arithmetic task the embedded model is trained and measured on (docs/method.md §7).

Questions read ``What is 37 + 48 - 19?``: operands 0–99, ``+`` and ``-`` evaluated left to right.
Every dataset file is JSONL ``{"question": ..., "answer": ...}``; the grader takes the last integer
after ``</think>`` (or in the whole text when there is no think block) and compares as integers.
"""

from __future__ import annotations

import itertools
import json
import random
import re
from collections.abc import Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Literal

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
    operands: Literal["uniform", "digits", "mixed"] = "uniform"
    """``uniform``: operands uniform in 0..max_operand; ``digits``: the digit length uniform over
    1..len(max_operand), then the operand uniform among numbers of that length up to max_operand
    (with 99: half single-digit, half two-digit operands); ``mixed`` (the v2 model's training mix):
    each operand uniform in 0..99 with probability 0.5, in 0..9 with 0.3, and in 100..max_operand
    with 0.2 (0..99 when max_operand < 100)."""

    @model_validator(mode="after")
    def _check_range(self) -> TaskConfig:
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


def _operand_by_digits(rng: random.Random, max_operand: int) -> int:
    digits = rng.randint(1, len(str(max_operand)))
    return rng.randint(0 if digits == 1 else 10 ** (digits - 1), min(10**digits - 1, max_operand))


def _operand_mixed(rng: random.Random, max_operand: int) -> int:
    r = rng.random()
    if r < 0.3:
        return rng.randint(0, min(9, max_operand))
    if r < 0.8 or max_operand < 100:
        return rng.randint(0, min(99, max_operand))
    return rng.randint(100, max_operand)


def sample_problem(rng: random.Random, num_operators: int, max_operand: int = 99, operands: str = "uniform") -> Problem:
    if operands == "mixed":
        values = tuple(_operand_mixed(rng, max_operand) for _ in range(num_operators + 1))
    elif operands == "digits":
        values = tuple(_operand_by_digits(rng, max_operand) for _ in range(num_operators + 1))
    else:
        values = tuple(rng.randint(0, max_operand) for _ in range(num_operators + 1))
    ops = tuple(rng.choice("+-") for _ in range(num_operators))
    return Problem(values, ops)


def iter_problems(seed: int, config: TaskConfig | None = None) -> Iterator[Problem]:
    """An endless stream of problems, operator counts uniform over the configured range."""
    config = config or TaskConfig()
    rng = random.Random(seed)
    while True:
        yield sample_problem(rng, rng.randint(config.min_operators, config.max_operators), config.max_operand, config.operands)


def generate_problems(
    n: int, seed: int, config: TaskConfig | None = None, exclude: Collection[str] = (), drop_excluded: bool = False
) -> list[Problem]:
    """``n`` problems, operator counts uniform over the configured range; same seed, same list.

    A problem whose question is in ``exclude`` is replaced by the stream's next non-excluded one
    (so there are still ``n``), or, with ``drop_excluded``, left out (fewer than ``n``). Without
    ``exclude`` both give the first ``n`` problems of ``iter_problems(seed, config)``.
    """
    stream = iter_problems(seed, config)
    if drop_excluded or not exclude:
        return [p for p in itertools.islice(stream, n) if p.question not in exclude]
    out: list[Problem] = []
    for drawn, p in enumerate(stream):
        if len(out) == n:
            break
        if drawn >= MAX_DRAWS_PER_PROBLEM * n + MAX_DRAWS_PER_PROBLEM:
            raise ValueError(f"drew {drawn} problems and found only {len(out)} of {n} outside the excluded questions")
        if p.question not in exclude:
            out.append(p)
    return out


# how many draws per wanted problem before generation gives up on finding non-excluded ones
MAX_DRAWS_PER_PROBLEM = 1000


@dataclass(frozen=True)
class OperatorGroup:
    """One part of an operator-count mix: counts uniform over [min_operators, max_operators], share = weight."""

    min_operators: int
    max_operators: int
    weight: Fraction

    @property
    def label(self) -> str:
        lo, hi = self.min_operators, self.max_operators
        return str(lo) if lo == hi else f"{lo}-{hi}"


def parse_operator_mix(spec: str) -> list[OperatorGroup]:
    """Parse ``K:W,...``: K an operator count (``2``) or range (``3-6``), W a weight (``0.35``, ``7/20``
    or a count such as ``210``). Weights are shares after normalising, so counts that add up to the
    dataset size are taken exactly. Raises ValueError with the offending part."""
    groups: list[OperatorGroup] = []
    parts = [part.strip() for part in spec.split(",")]
    if not spec.strip() or any(not part for part in parts):
        raise ValueError(f"empty part in {spec!r}; expected K:W[,K:W...], e.g. 1:0.6,2:0.2,4:0.2")
    for part in parts:
        key, sep, value = part.partition(":")
        match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", key)
        if not sep or match is None:
            raise ValueError(f"bad part {part!r}: expected K:W with K an operator count (2) or range (3-6)")
        lo = int(match.group(1))
        hi = int(match.group(2)) if match.group(2) is not None else lo
        if lo < 1 or hi < lo:
            raise ValueError(f"bad operator count {key.strip()!r} in {part!r}: need 1 <= min <= max")
        try:
            weight = Fraction(value.strip())
        except (ValueError, ZeroDivisionError):
            raise ValueError(f"bad weight {value.strip()!r} in {part!r}: expected a number such as 0.35, 7/20 or 210") from None
        if weight <= 0:
            raise ValueError(f"bad weight {value.strip()!r} in {part!r}: weights must be > 0")
        groups.append(OperatorGroup(lo, hi, weight))
    ranges = sorted((g.min_operators, g.max_operators) for g in groups)
    for (lo1, hi1), (lo2, hi2) in itertools.pairwise(ranges):
        if lo2 <= hi1:
            raise ValueError(f"operator counts overlap in {spec!r}: {lo1}-{hi1} and {lo2}-{hi2}")
    return groups


def mix_counts(n: int, groups: Sequence[OperatorGroup]) -> list[int]:
    """Problems per group: ``n · weight / total`` rounded by largest remainder (ties: earlier group),
    so the counts add up to ``n`` and are exact whenever the shares are."""
    total = sum(g.weight for g in groups)
    quotas = [n * g.weight / total for g in groups]
    counts = [int(q) for q in quotas]  # floor: quotas are >= 0
    order = sorted(range(len(groups)), key=lambda i: (-(quotas[i] - counts[i]), i))
    for i in order[: n - sum(counts)]:
        counts[i] += 1
    return counts


def generate_mix(
    n: int,
    seed: int,
    groups: Sequence[OperatorGroup],
    max_operand: int = 99,
    exclude: Collection[str] = (),
    drop_excluded: bool = False,
    operands: str = "uniform",
) -> list[Problem]:
    """``n`` problems split over ``groups`` by ``mix_counts``, group after group in the given order.
    Group i (from 1) is ``generate_problems(count_i, seed * 10 + i, its range, exclude, drop_excluded)``."""
    out: list[Problem] = []
    for i, (group, count) in enumerate(zip(groups, mix_counts(n, groups)), 1):
        config = TaskConfig(min_operators=group.min_operators, max_operators=group.max_operators, max_operand=max_operand, operands=operands)
        out += generate_problems(count, seed * 10 + i, config, exclude, drop_excluded)
    return out


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


STYLES = ("native", "gsm8k", "math")
"""How ``write_jsonl`` writes a row: ``{"question", "answer"}``; GSM8K's worked answer ending in
``#### N``; MATH's ``{"problem", "solution"}`` ending in ``\\boxed{N}`` (docs/data.md reads all three)."""


def problem_row(p: Problem, style: str = "native") -> dict:
    """One dataset row of ``p`` in ``style`` (``STYLES``)."""
    worked = " ".join(f"then {v}." for v in p.running_values())
    if style == "native":
        return {"question": p.question, "answer": str(p.answer)}
    if style == "gsm8k":
        return {"question": p.question, "answer": f"{worked}\n#### {p.answer}"}
    if style == "math":
        return {"problem": p.question, "solution": f"{worked} So the result is $\\boxed{{{p.answer}}}$."}
    raise ValueError(f"style must be one of {STYLES}, got {style!r}")


def write_jsonl(problems: Iterable[Problem], path: str | Path, style: str = "native") -> int:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with path.open("w") as f:
        for p in problems:
            f.write(json.dumps(problem_row(p, style)) + "\n")
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
