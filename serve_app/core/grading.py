"""Graders: read the final answer of a reply and decide whether it is right (docs/data.md).

One interface, four rules (``get_grader(name)``):

* ``number`` — the arithmetic task's rule (``serve_app.core.task``): the last integer after the
  last ``</think>``, compared as an integer with an integer reference. The default everywhere.
* ``math``   — ``math-verify`` (sympy): the last ``\\boxed{}`` of the reply, else the expression
  math-verify finds in it, checked for mathematical equivalence with the reference (``1/2`` =
  ``\\frac12`` = ``0.5``; ``[0,1)`` ≠ ``[0,1]``; units such as ``5 cm`` are dropped).
* ``choice`` — a multiple-choice letter A–J: ``\\boxed{C}``, ``answer is (C)`` / ``Answer: C``, a
  last line ``C.`` / ``(C)``, else the last standalone capital A–J; compared case-insensitively.
* ``exact``  — the last ``\\boxed{}`` content, else the last non-empty line without an ``Answer:``
  prefix, equal to the reference after case folding and whitespace collapsing.

Every grader reads the part of the reply after the last ``</think>`` (all of it when there is none).
``extract`` gives the answer in a normal form, so that equal answers vote together (``select:
vote``); ``correct`` is the grade; ``reference`` checks a data set's reference answer up front
(ValueError when the grader cannot use it).

math-verify bounds its sympy work with ``signal.alarm``, which only works in the main thread: Ray
Serve runs request handlers off it (math-verify then raises). The ``math`` grader therefore passes
a timeout (``MATH_TIMEOUT_S``) only when called in the main thread (the offline tools) and none
elsewhere (serving replicas), where a pathological answer can take as long as sympy needs.
"""

from __future__ import annotations

import re
import threading
from abc import ABC, abstractmethod
from functools import lru_cache
from typing import Any, Literal

from serve_app.core.datasets import last_boxed
from serve_app.core.task import (
    THINK_CLOSE,
    extract_answer,
    is_correct,
    reference_answer,
)

GraderName = Literal["number", "math", "choice", "exact"]
DEFAULT_GRADER: GraderName = "number"
MATH_TIMEOUT_S = 5
"""Seconds math-verify may spend per parse / comparison, in the main thread only (module docstring)."""


def answer_part(reply: str) -> str:
    """The reply after the last ``</think>`` (the whole reply when there is no think block)."""
    return reply.rsplit(THINK_CLOSE, 1)[1] if THINK_CLOSE in reply else reply


class Grader(ABC):
    """Reads a reply's final answer (``extract``) and grades it against a reference (``correct``)."""

    name: str

    @abstractmethod
    def extract(self, reply: str) -> str | None:
        """The final answer the reply gives, in a normal form equal answers share; None if none."""

    def reference(self, answer: Any) -> str:
        """A data set's reference answer in the same normal form; ValueError when unusable."""
        text = str(answer).strip()
        if not text:
            raise ValueError("empty reference answer")
        return text

    def correct(self, reply: str, reference: Any) -> bool:
        predicted = self.extract(reply)
        return predicted is not None and predicted == self.reference(reference)


class NumberGrader(Grader):
    """The arithmetic task's grader; ``correct`` is ``serve_app.core.task.is_correct``."""

    name = "number"

    def extract(self, reply: str) -> str | None:
        value = extract_answer(reply)
        return None if value is None else str(value)

    def reference(self, answer: Any) -> str:
        try:
            return str(reference_answer(answer))
        except ValueError:
            raise ValueError(f"reference answer {str(answer)[:80]!r} is not an integer, which the number grader needs "
                             "(grade it with --grader math or exact)") from None

    def correct(self, reply: str, reference: Any) -> bool:
        return is_correct(reply, reference)


def _timeout() -> int | None:
    return MATH_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None


@lru_cache(maxsize=2048)
def _parse(latex: str, timeout: int | None) -> tuple:
    from math_verify import parse

    return tuple(parse(latex, parsing_timeout=timeout))


def _canonical(expr: Any) -> str:
    """A vote key for a parsed answer: numbers simplified (``0.5``, ``\\frac12`` → ``1/2``), ``x = 5`` → ``5``."""
    import sympy

    if isinstance(expr, str):
        return " ".join(expr.split())
    try:
        if isinstance(expr, sympy.Eq) and expr.lhs.is_Symbol:
            expr = expr.rhs
        if getattr(expr, "is_number", False):
            expr = sympy.nsimplify(expr.doit())
    except Exception:  # noqa: BLE001, S110 - sympy raises many kinds; the plain form is a fine vote key
        pass
    return str(expr)


class MathGrader(Grader):
    """Mathematical equivalence by math-verify (see the module docstring for its timeout)."""

    name = "math"

    def _prediction(self, reply: str) -> tuple:
        text = answer_part(reply)
        boxed = last_boxed(text)
        return _parse(text if boxed is None else f"${boxed}$", _timeout())

    def _gold(self, reference: Any) -> tuple:
        text = str(reference).strip().strip("$").strip()
        return _parse(f"${text}$", _timeout()) if text else ()

    def extract(self, reply: str) -> str | None:
        parsed = self._prediction(reply)
        return _canonical(parsed[0]) if parsed else None

    def correct(self, reply: str, reference: Any) -> bool:
        from math_verify import verify

        predicted, gold = self._prediction(reply), self._gold(reference)
        if not predicted:
            return False
        if not gold:  # math-verify cannot read the reference: compare the text
            return ExactGrader.normalize(str(predicted[-1])) == ExactGrader.normalize(str(reference))
        return verify(list(gold), list(predicted), timeout_seconds=_timeout())


_LETTER = r"(?:\(([A-Ja-j])\)|([A-J])(?![A-Za-z0-9])|([a-j])(?=\s*(?:[.,;:!?)*_]|$)))"
"""A choice letter: ``(c)`` / ``(C)``, a capital ``C``, or a lower-case ``c`` only where no word follows."""
_ANCHORED_RE = re.compile(r"(?i:answer)(?:\s+(?i:is))?\s*[:：]?\s*[*_]*\s*" + _LETTER, re.MULTILINE)
_LAST_LINE_RE = re.compile(r"[*_\s]*(?:\(([A-Ja-j])\)|([A-J])(?:[.:)](?:\s|$)|[*_\s]*$))")
_STANDALONE_RE = re.compile(r"(?<![A-Za-z0-9'’])([A-J])(?![A-Za-z0-9'’])")
_REFERENCE_LETTER_RE = re.compile(r"\(?([A-Ja-j])\)?(?:[.):]\s*.*)?", re.DOTALL)
_TEXT_WRAP_RE = re.compile(r"\\(?:text|textbf|mathrm|mathbf)\s*\{([^{}]*)\}")


def _letter(match: re.Match) -> str:
    return next(g for g in match.groups() if g is not None).upper()


class ChoiceGrader(Grader):
    """A multiple-choice letter A–J (see the module docstring for where it is looked for)."""

    name = "choice"

    def extract(self, reply: str) -> str | None:
        text = answer_part(reply)
        boxed = last_boxed(text)
        if boxed is not None:
            m = re.match(r"\s*" + _LETTER, _TEXT_WRAP_RE.sub(r"\1", boxed))
            if m:
                return _letter(m)
        anchored = list(_ANCHORED_RE.finditer(text))
        if anchored:
            return _letter(anchored[-1])
        lines = [line for line in text.splitlines() if line.strip()]
        if lines and (m := _LAST_LINE_RE.match(lines[-1])):
            return _letter(m)
        for m in reversed(list(_STANDALONE_RE.finditer(text))):
            # "A" / "I" before a lower-case word is the article / pronoun, not an option
            if m.group(1) in "AI" and re.match(r"\s+[a-z]", text[m.end():]):
                continue
            return m.group(1)
        return None

    def reference(self, answer: Any) -> str:
        m = _REFERENCE_LETTER_RE.fullmatch(str(answer).strip())
        if m is None:
            raise ValueError(f"reference answer {str(answer)[:80]!r} is not a choice letter A-J, which the choice grader needs")
        return m.group(1).upper()


_ANSWER_PREFIX_RE = re.compile(r"^(?:the\s+)?(?:final\s+)?answer(?:\s+is)?\s*[:：]?\s*", re.IGNORECASE)


class ExactGrader(Grader):
    """Case- and whitespace-insensitive equality of the final answer text."""

    name = "exact"

    @staticmethod
    def normalize(text: str) -> str:
        """Whitespace collapsed, case folded, surrounding ``$ * " ' ` .`` and spaces dropped."""
        return " ".join(text.split()).casefold().strip(" $*\"'`.")

    def extract(self, reply: str) -> str | None:
        text = answer_part(reply)
        boxed = last_boxed(text)
        if boxed is None:
            lines = [line.strip() for line in text.splitlines() if line.strip()]
            boxed = _ANSWER_PREFIX_RE.sub("", lines[-1].strip("*_ ")) if lines else ""
        answer = self.normalize(_TEXT_WRAP_RE.sub(r"\1", boxed))
        return answer or None

    def reference(self, answer: Any) -> str:
        text = self.normalize(str(answer))
        if not text:
            raise ValueError("empty reference answer")
        return text


GRADERS: dict[str, Grader] = {g.name: g for g in (NumberGrader(), MathGrader(), ChoiceGrader(), ExactGrader())}
"""Every grader by name (their order is ``GraderName``'s)."""


def get_grader(name: str | None = None) -> Grader:
    """The grader called ``name`` (``DEFAULT_GRADER`` when None); ValueError naming the choices."""
    name = DEFAULT_GRADER if name is None else name
    if name not in GRADERS:
        raise ValueError(f"unknown grader {name!r}; choose from {', '.join(GRADERS)}")
    return GRADERS[name]


def check_references(rows: list[dict], grader: Grader, where: str = "") -> None:
    """Refuse, before any generation, a data set whose reference answers the grader cannot use."""
    for i, row in enumerate(rows):
        try:
            grader.reference(row["answer"])
        except ValueError as e:
            raise ValueError(f"{where}row {i}: {e}") from None
