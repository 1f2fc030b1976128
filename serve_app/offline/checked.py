"""The embedded model v2's slow reply: a first pass, then a re-check that really checks (issue 20).

v1's slow thought (``embedded.slow_thought``) re-checks by undoing every step and redoing them, and
always "agrees": it never corrects anything. v2's thought is

1. the **first pass**: the worked steps (``embedded.step_line``, column by column), then
   ``So the first pass gives N.`` (the parseable first-pass result, ``first_pass_value``);
2. the **check**, step by step in order. Each step first states where it went
   (``Step j took V to W.``: V is the question's first number for step 1 and the first pass's
   previous result after that, W the step's stated result), then undoes it from W with the
   *question's* operand (``Undo: `` and a ``step_line``), then compares: ``Want V, got X:`` and the
   two numbers character by character from the left (``compare``: ``3=3 7=7`` when they match,
   up to the first differing pair ``3 vs 2`` when not). The value to come back to is looked up and
   written before the undo is worked, so every check line trains the lookup; the verdict then
   rests on single characters written side by side (the previous format, a bare ``Want V, got X``,
   let the model call 7 of 11 mismatches "right": it judged whole numbers by habit);
3. on the first mismatch, ``..., so step j is wrong. Redo from V:`` and the steps from j on,
   redone, then ``So the answer is N.``; without one, ``Every step checks out, so the answer is N.``

Training replies carry, at a rate the trainer sets, one **slip** in the first pass (``Slip``: an
operand copied wrongly, as the v1 model does with single-digit operands, or a step's result off in
one digit or with its sign flipped, as a swapped subtraction goes wrong; with
``TrainConfig.operation_slip_fraction``, the step's operation flipped, ``- 36`` for ``+ 36``, which
the check finds only when its undo inverts the question's operation); the first pass goes on from
the slipped value and the check finds it. The slipped line
is context only: ``checked_thought`` returns its span so the trainer masks it (the model learns to
find and repair a slip, not to make one).

A check compares with what the *question* says (operands, first number), so a copied operand is
caught; its own arithmetic is the column working the first pass uses.

**Keyed** replies (``keyed=True``, ``train-model --reply-format checked-keyed``) look the question's
operands up by key instead of by position. Right after ``Let me check each step.`` the check copies
the question once, in order, as a keyed list (``The question: start 91, op 1 is - 5, op 2 is + 59.``);
each check step then names its operation before the undo (``Step 2 took 86 to 145, op 2 is + 59.``)
and each redone step before its working (``op 2 is + 59: 86 + 59: ...``). Stage 5 found operands by
position: its undo sometimes took a neighbouring operand (a false alarm whose redo broke a right
first pass) or repeated the first pass's own lookup error (a slip the check then agreed with). The
verdict writes each pair of characters and then judges it (``8 6 differ``, ``1 1 same``): stage 5's
``8=6`` committed to ``=`` before the second character was written.

**Judged** verdicts without keys (``judged=True``, ``train-model --reply-format checked-judged``) are
that verdict with stage 5's positional check. Alone (stage 6) it exposed the check's own slips: an
undo that takes a wrong operand raises a false alarm, and the redo copied the undo's wrong operand,
because in every training reply the redo's operand was the undo's. A **check slip** (``CheckSlip``,
``TrainConfig.check_slip_fraction``) puts that false alarm into training replies whose first pass is
right: the undo of one step takes a wrong operand or states a wrong result (masked, like a first-pass
slip), the verdict finds the mismatch, and the redo, worked with the *question's* operands, comes
back to the first pass's values and the right answer.

A **double slip** (``sample_double_slip``, ``TrainConfig.double_slip_fraction``) puts a check slip at
the *same* step as a first-pass slip: the undo of the slipped step takes a wrong operand that is
neither the question's nor the first pass's (both lines masked), the mismatch stands, and the redo
must read the operand from the question. Stage 7's false alarms rewarded a redo that copies the first
pass (their right redo *is* the first pass's lines); a double slip's right redo copies neither the
first pass nor the undo, so no copy is ever rewarded.
"""

from __future__ import annotations

import random
import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Literal

from serve_app.core.task import Problem
from serve_app.offline.embedded import IM_END, step_line

THINK_CLOSE = "</think>"
FIRST_PASS = "So the first pass gives {}."
CHECK_HEADER = "Let me check each step."
_FIRST_PASS_RE = re.compile(r"So the first pass gives (-?\d+)\.")


@dataclass(frozen=True)
class Slip:
    """One error in a training reply's first pass: at step ``step`` (0-based; for ``operand`` at step
    0 the first number itself may be miscopied, ``first=True``), the step uses ``value`` as its
    operand (``operand``), states ``value`` as its result (``result``), or works the question's
    operand ``value`` with the other operation (``operation``: ``- 36`` for ``+ 36``)."""

    step: int
    kind: Literal["operand", "result", "operation"]
    value: int
    first: bool = False


@dataclass(frozen=True)
class CheckSlip:
    """One error in the check's own undo, in a training reply whose first pass is right: at step
    ``step`` (0-based) the undo takes ``value`` as its operand (``operand``) or states ``value`` as
    its result (``result``). The verdict then reports a mismatch that is a false alarm, and the redo
    must come back to the first pass's values with the question's operands."""

    step: int
    kind: Literal["operand", "result"]
    value: int


def _digit_changed(rng: random.Random, n: int, last: bool = False) -> int:
    """``n`` (>= 0) with one digit (the last one if ``last``) replaced by another (what a copying slip
    does: 91 -> 01, 59 -> 99)."""
    digits = list(str(n))
    i = len(digits) - 1 if last else rng.randrange(len(digits))
    digits[i] = rng.choice([d for d in "0123456789" if d != digits[i]])
    return int("".join(digits))


def sample_slip(rng: random.Random, problem: Problem) -> Slip:
    """A slip at a uniform step: half operand copies (one digit of the operand changed, or for a
    third of them the previous or next operand of the question taken instead), half wrong results:
    one digit off (the sign kept; for half of them the last digit, the column where stage 3's verdicts
    still called a mismatch "right"), or, for a third of nonzero results, the sign flipped."""
    step = rng.randrange(problem.num_operators)
    if rng.random() < 0.5:
        first = step == 0 and rng.random() < 0.3
        operand = problem.operands[0] if first else problem.operands[step + 1]
        neighbours = [o for o in problem.operands[max(1, step):step + 3] if o != operand] if not first else []
        if neighbours and rng.random() < 1 / 3:  # the previous or next operand taken for this one
            return Slip(step, "operand", rng.choice(neighbours))
        return Slip(step, "operand", _digit_changed(rng, operand), first)
    value = problem.running_values()[step]
    if value != 0 and rng.random() < 1 / 3:
        return Slip(step, "result", -value)
    wrong = _digit_changed(rng, abs(value), last=rng.random() < 0.5)
    return Slip(step, "result", -wrong if value < 0 else wrong)


def sample_operation_slip(rng: random.Random, problem: Problem) -> Slip | None:
    """A slip of the operation at a uniform step whose operand is not 0 (where ``+`` and ``-`` differ):
    the first pass works ``- 36`` where the question reads ``+ 36``, as v2 stage 9's first pass did.
    The check's undo takes the inverse of the *question's* operation, so it does not come back and the
    mismatch is found (an undo that inverts the first pass's operation agrees with the slip). None
    when every operand is 0."""
    steps = [j for j, x in enumerate(problem.operands[1:]) if x != 0]
    if not steps:
        return None
    step = rng.choice(steps)
    return Slip(step, "operation", problem.operands[step + 1])


def sample_check_slip(rng: random.Random, problem: Problem) -> CheckSlip:
    """A check slip at a uniform step: three quarters wrong operands in the undo (for a third of them
    the previous or next operand of the question, else one digit changed: what stage 6's undo did,
    ``1 + 42`` for ``- 82``, ``-276 + 09`` for ``- 0``), a quarter a result one digit off."""
    step = rng.randrange(problem.num_operators)
    operand = problem.operands[step + 1]
    if rng.random() < 0.75:
        neighbours = [o for o in problem.operands[max(1, step):step + 3] if o != operand]
        if neighbours and rng.random() < 1 / 3:
            return CheckSlip(step, "operand", rng.choice(neighbours))
        return CheckSlip(step, "operand", _digit_changed(rng, operand))
    back = problem.running_values()[step - 1] if step else problem.operands[0]
    wrong = _digit_changed(rng, abs(back))
    return CheckSlip(step, "result", -wrong if back < 0 else wrong)


def sample_double_slip(rng: random.Random, problem: Problem, slip: Slip, tries: int = 20) -> CheckSlip | None:
    """A check slip at ``slip``'s step: the undo takes a wrong operand, the previous or next operand of
    the question for a third of them, else the question's with one digit changed; never the question's
    own operand nor the one the first pass used, and never one whose undo happens to come back to the
    value the step started from (the mismatch must stand). None when ``tries`` draws find none (a
    one-operator question whose operand has no digit change left that keeps the mismatch)."""
    step = slip.step
    operand = problem.operands[step + 1]
    used = slip.value if slip.kind == "operand" and not slip.first else operand
    _, values, _ = first_pass(problem, slip)
    before = problem.operands[0] if step == 0 else values[step - 1]
    undo = "-" if problem.ops[step] == "+" else "+"
    neighbours = [o for o in problem.operands[max(1, step):step + 3] if o not in (operand, used)]
    for _ in range(tries):
        value = rng.choice(neighbours) if neighbours and rng.random() < 1 / 3 else _digit_changed(rng, operand)
        if value not in (operand, used) and _apply(values[step], undo, value) != before:
            return CheckSlip(step, "operand", value)
    return None


def compare(want: int, got: int, keyed: bool = False) -> str:
    """Two numbers character by character from the left (the sign is a character): every pair
    ``a=a`` when they are equal; up to and including the first differing pair ``a vs b`` when not,
    or ``lengths differ`` when one ends first.

    ``keyed``: each pair is written, then judged: ``3 3 same, 7 7 same``, ``3 2 differ``, joined by ``, ``."""
    a, b = str(want), str(got)
    same, differ, sep = ("{} {} same", "{} {} differ", ", ") if keyed else ("{}={}", "{} vs {}", " ")
    pairs = []
    for x, y in zip(a, b):
        if x != y:
            return sep.join([*pairs, differ.format(x, y)])
        pairs.append(same.format(x, y))
    return sep.join(pairs if len(a) == len(b) else [*pairs, "lengths differ"])


def _apply(acc: int, op: str, operand: int) -> int:
    return acc + operand if op == "+" else acc - operand


def first_pass(problem: Problem, slip: Slip | None = None) -> tuple[list[str], list[int], int | None]:
    """The first pass's step lines, its stated result after each step, and the index of the slipped
    line (None without a slip)."""
    acc = slip.value if slip is not None and slip.first else problem.operands[0]
    lines, values = [], []
    for j, (op, operand) in enumerate(zip(problem.ops, problem.operands[1:])):
        here = slip is not None and slip.step == j
        used = slip.value if here and slip.kind == "operand" and not slip.first else operand
        if here and slip.kind == "operation":
            op = "-" if op == "+" else "+"
        line = step_line(acc, op, used)
        value = _apply(acc, op, used)
        if slip is not None and slip.step == j and slip.kind == "result":
            line = line.rsplit(", so ", 1)[0] + f", so {slip.value}"
            value = slip.value
        lines.append(line)
        values.append(value)
        acc = value
    return lines, values, None if slip is None else slip.step


def operation_key(j: int, op: str, operand: int) -> str:
    """A keyed reply's name for the question's operation ``j`` (1-based): ``op 2 is + 59``."""
    return f"op {j} is {op} {operand}"


def question_list(problem: Problem) -> str:
    """The question copied once as a keyed list (keyed replies): ``The question: start 91, op 1 is - 5, op 2 is + 59.``"""
    keys = [operation_key(j + 1, op, x) for j, (op, x) in enumerate(zip(problem.ops, problem.operands[1:]))]
    return f"The question: start {problem.operands[0]}, {', '.join(keys)}."


def checked_thought(problem: Problem, slip: Slip | None = None, keyed: bool = False, *, judged: bool = False,
                    check_slip: CheckSlip | None = None) -> tuple[str, list[tuple[int, int]]]:
    """The thinking text (no ``</think>``) and the character spans to mask, in order: the slipped line
    and the slipped undo (from ``Undo:`` to the end of its line), each when there is one.

    ``keyed``: the check reads the question's operations from a keyed list (module docstring).
    ``judged``: each verdict pair is written, then judged (``8 6 differ``); keyed replies always are.
    ``slip`` and ``check_slip`` together are a double slip: both at the same step."""
    if slip is not None and check_slip is not None and check_slip.step != slip.step:
        raise ValueError("a check slip beside a first-pass slip must be at the same step (a double slip); "
                         f"got steps {slip.step} and {check_slip.step}")
    judged = judged or keyed
    lines, values, slipped = first_pass(problem, slip)
    out = [*lines, FIRST_PASS.format(values[-1]), CHECK_HEADER, *([question_list(problem)] if keyed else [])]
    before = [problem.operands[0], *values[:-1]]  # what each step's undo must give back
    final, undo_span = values[-1], None
    for j, (op, operand) in enumerate(zip(problem.ops, problem.operands[1:])):
        undo = "-" if op == "+" else "+"
        slipping = check_slip is not None and check_slip.step == j
        used = check_slip.value if slipping and check_slip.kind == "operand" else operand
        work, back = step_line(values[j], undo, used), _apply(values[j], undo, used)
        if slipping and check_slip.kind == "result":
            work, back = work.rsplit(", so ", 1)[0] + f", so {check_slip.value}", check_slip.value
        key = f", {operation_key(j + 1, op, operand)}" if keyed else ""
        head = f"Step {j + 1} took {before[j]} to {values[j]}{key}. "
        if slipping:
            start = sum(len(line) + 1 for line in out) + len(head)
            undo_span = (start, start + len(f"Undo: {work}.") + 1)
        out.append(f"{head}Undo: {work}.")
        verdict = f"Want {before[j]}, got {back}: {compare(before[j], back, judged)}, so step {j + 1} is"
        if back == before[j]:
            out.append(f"{verdict} right.")
            continue
        out.append(f"{verdict} wrong. Redo from {before[j]}:")
        acc = before[j]
        for k, (op2, operand2) in enumerate(zip(problem.ops[j:], problem.operands[j + 1 :]), start=j + 1):
            key = f"{operation_key(k, op2, operand2)}: " if keyed else ""
            out.append(key + step_line(acc, op2, operand2))
            acc = _apply(acc, op2, operand2)
        final = acc
        out.append(f"So the answer is {final}.")
        break
    else:
        out.append(f"Every step checks out, so the answer is {final}.")
    text = "\n".join(out) + "\n"
    spans = []
    if slipped is not None:
        start = sum(len(line) + 1 for line in lines[:slipped])
        spans.append((start, start + len(lines[slipped]) + 1))
    return text, spans + ([] if undo_span is None else [undo_span])


_KEY_RE = re.compile(r", op \d+ is [+-] \d+\.")


def check_spans(thought: str) -> list[tuple[int, int]]:
    """Character spans of the lines that decide what the check does: every verdict (``Want V, got X:
    ... so step j is right/wrong.``), and on a mismatch the redone steps through ``So the answer is
    N.`` The trainer can weight these tokens up (``TrainConfig.check_weight``): they are a few
    percent of a reply, and they are where stage 4 still went wrong (a "right" verdict under a
    mismatch in a middle digit, a redo that miscopied a number). In a keyed reply also the keyed
    list of the question and each step's lookup in it (``, op j is + N.``): where stage 5's undo
    took a neighbouring operand."""
    spans, pos, redo = [], 0, False
    for line in thought.splitlines(keepends=True):
        if line.startswith("Want ") or line.startswith("The question: ") or redo:
            spans.append((pos, pos + len(line)))
        elif line.startswith("Step ") and (key := _KEY_RE.search(line)):
            spans.append((pos + key.start(), pos + key.end()))
        if line.startswith("Want ") and "Redo from" in line:
            redo = True
        elif line.startswith("So the answer is"):
            redo = False
        pos += len(line)
    return spans


def checked_reply(problem: Problem, slip: Slip | None = None, keyed: bool = False, *, judged: bool = False,
                  check_slip: CheckSlip | None = None) -> str:
    """Thought, ``</think>``, then the answer the check arrived at (the true one: a slip is always
    found, and a check slip's redo comes back to it)."""
    thought, _ = checked_thought(problem, slip, keyed, judged=judged, check_slip=check_slip)
    return f"{thought}{THINK_CLOSE}\n\n{problem.answer}{IM_END}"


def first_pass_value(text: str) -> int | None:
    """The first-pass result a v2 slow reply states (``So the first pass gives N.``); None when the
    reply has no such line (v1 replies, fast replies, a thought cut before it)."""
    found = _FIRST_PASS_RE.search(text)
    return int(found.group(1)) if found else None


def self_correction(records: list[dict]) -> dict | None:
    """What the check did, from ``kvswitch eval`` records (``output``, ``predicted``, ``answer``,
    ``correct``, ``operators``) of replies that state a first pass: per operator count and over all,
    how many first passes ended wrong and the share of those whose final answer is right (fixed), how
    many ended right and the share of those still right at the end (kept). None when no reply states
    a first pass (v1 or fast replies).

    For a policy that closes thoughts (records with ``switched_at``, ``route`` slow: kv-online's
    slow → fast switch), ``closed_wrong`` / ``closed_right`` count the replies whose thought was closed
    by a switch after a wrong / right first pass (so the check never ran to its end), and
    ``all.closed_before_first_pass`` those closed before any first pass was stated."""
    cells: dict = defaultdict(lambda: {"n": 0, "first_wrong": 0, "fixed": 0, "first_right": 0, "kept": 0})
    closed_by_switch = [r.get("switched_at") is not None and r.get("route") == "slow" for r in records]
    closes = any(closed_by_switch)
    before = 0
    for r, closed in zip(records, closed_by_switch):
        first = first_pass_value(r["output"])
        if first is None:
            before += closed
            continue
        for key in (str(r["operators"]), "all"):
            c = cells[key]
            c["n"] += 1
            right = str(first) == str(r["answer"]).strip()
            c["first_right" if right else "first_wrong"] += 1
            c["kept" if right else "fixed"] += bool(r["correct"])
            if closes:
                c.setdefault("closed_wrong", 0)
                c.setdefault("closed_right", 0)
                c["closed_right" if right else "closed_wrong"] += closed
    if not cells:
        return None
    for c in cells.values():
        c["fixed_fraction"] = c["fixed"] / c["first_wrong"] if c["first_wrong"] else None
        c["kept_fraction"] = c["kept"] / c["first_right"] if c["first_right"] else None
    total = cells.pop("all")
    if closes:
        total["closed_before_first_pass"] = before
    return {"by_operators": dict(sorted(cells.items(), key=lambda kv: int(kv[0]))), "all": total}
