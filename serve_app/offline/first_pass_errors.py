"""``kvswitch first-pass-errors``: what went wrong in each wrong first pass, and which kinds the check fixes.

The self-correction table (``checked.self_correction``) counts wrong first passes and how many the
check fixed; it does not say *why* a first pass went wrong, and that decides whether a redo can help:
a redo works the faulty step again the way the first pass did, so a slip (a digit miscopied once) is
mended, while a systematic error comes out of the redo again. This reads each wrong first pass of an
``eval`` report line by line against the step the question asks for (``embedded.step_line``) and names
the first line that differs:

- ``operand``: the step uses another operand than the question's (miscopied, or a neighbour taken);
- ``carried``: the step starts from another value than the previous line stated;
- ``order``: a signed step worked as ``x - y instead`` writes the smaller magnitude first
  (``-65 + 68: 65 - 68 instead``; ``68 - 65`` is right);
- ``instead-copy``: the ``x - y instead`` numbers are not the step's two magnitudes (``-79 + 84: 89 -
  74 instead``);
- ``column``: the numbers are right and the column working or the stated result is not;
- ``unparsed``: the line does not read as a step; ``short``: the first pass has fewer lines than steps.

Each wrong first pass also records whether its step crosses zero (the running value changes sign),
where ``order`` and ``instead-copy`` gather. Nothing is generated: it reads the records ``eval`` wrote.
"""

from __future__ import annotations

import argparse
import json
import re
from collections import Counter
from pathlib import Path

from serve_app.core.task import Problem, parse_question
from serve_app.offline.checked import FIRST_PASS, first_pass_value
from serve_app.offline.embedded import step_line

KINDS = ("operand", "carried", "order", "instead-copy", "column", "unparsed", "short")
_STEP_RE = re.compile(r"(-?\d+) ([+-]) (\d+):(?: (\d+) ([+-]) (\d+) instead,)?")


def classify(problem: Problem, output: str) -> tuple[str, int | None, str | None]:
    """The first wrong line of a reply's first pass: (kind, 0-based step, the line); ``("none", None,
    None)`` when every first-pass line is the step's own (the first pass is then right)."""
    head = output.split(FIRST_PASS.split("{}")[0], 1)[0]
    lines = head.strip("\n").split("\n") if head.strip() else []
    acc = problem.operands[0]
    for j, (op, operand) in enumerate(zip(problem.ops, problem.operands[1:])):
        if j >= len(lines):
            return "short", j, None
        line = lines[j]
        if line != step_line(acc, op, operand):
            return _kind(acc, op, operand, line), j, line
        acc = acc + operand if op == "+" else acc - operand
    return "none", None, None


def _kind(acc: int, op: str, operand: int, line: str) -> str:
    m = _STEP_RE.match(line)
    if m is None:
        return "unparsed"
    if int(m.group(1)) != acc:
        return "carried"
    if m.group(2) != op or int(m.group(3)) != operand:
        return "operand"
    if m.group(4) is not None:
        x, y = int(m.group(4)), int(m.group(6))
        if {x, y} != {abs(acc), operand}:
            return "instead-copy"
        if x < y:
            return "order"
    return "column"


def crosses_zero(problem: Problem, step: int) -> bool:
    """Whether the question's step ``step`` (0-based) changes the running value's sign."""
    before = problem.operands[0] if step == 0 else problem.running_values()[step - 1]
    return (before < 0) != (problem.running_values()[step] < 0)


def error_table(records: list[dict]) -> dict:
    """Over ``eval`` records that state a wrong first pass: per kind, how many and how many the check
    fixed (the final answer right), and how many of them are at a zero-crossing step."""
    rows: dict = {k: {"first_wrong": 0, "fixed": 0, "crossing": 0} for k in KINDS}
    examples: dict = {}
    for r in records:
        first = first_pass_value(r["output"])
        problem = parse_question(r["question"])
        if first is None or problem is None or str(first) == str(r["answer"]).strip():
            continue
        kind, step, line = classify(problem, r["output"])
        if kind == "none":  # a first pass whose lines are right but whose stated result is not
            kind = "column"
            step = problem.num_operators - 1
        row = rows[kind]
        row["first_wrong"] += 1
        row["fixed"] += bool(r["correct"])
        row["crossing"] += step is not None and crosses_zero(problem, step)
        examples.setdefault(kind, []).append({"question": r["question"], "step": step, "line": line, "fixed": bool(r["correct"])})
    total = Counter()
    for row in rows.values():
        total.update(row)
    return {"by_kind": rows, "all": dict(total), "examples": examples}


def _print(name: str, table: dict) -> None:
    print(f"{name}: {table['all'].get('first_wrong', 0)} wrong first passes, {table['all'].get('fixed', 0)} fixed")
    for kind, row in table["by_kind"].items():
        if row["first_wrong"]:
            print(f"  {kind:13s} {row['fixed']:3d} of {row['first_wrong']:3d} fixed   ({row['crossing']} at a zero-crossing step)")


def plot_tables(tables: dict, path: str | Path) -> None:
    """One stacked bar per kind (fixed / left wrong), pooled over the reports."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pooled = tables["pooled"]["by_kind"]
    kinds = [k for k in KINDS if pooled[k]["first_wrong"]]
    fixed = [pooled[k]["fixed"] for k in kinds]
    left = [pooled[k]["first_wrong"] - pooled[k]["fixed"] for k in kinds]
    fig, ax = plt.subplots(figsize=(7, 3.8))
    ax.bar(kinds, fixed, label="fixed by the check", color="tab:green")
    ax.bar(kinds, left, bottom=fixed, label="left wrong", color="tab:red")
    ax.set_ylabel("wrong first passes")
    ax.set_title(f"What went wrong in the first pass ({len(tables['reports'])} reports pooled)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _cmd(args: argparse.Namespace) -> int:
    from serve_app.reports import write_json

    tables, pooled = {}, []
    for path in args.reports:
        report = json.loads(Path(path).read_text())
        policy = (report.get("policies") or {}).get(args.policy)
        if policy is None:
            raise SystemExit(f"{path}: no '{args.policy}' policy in this eval report")
        tables[str(path)] = error_table(policy["records"])
        pooled += policy["records"]
        _print(str(path), tables[str(path)])
    result = {"policy": args.policy, "reports": tables, "pooled": error_table(pooled)}
    if len(args.reports) > 1:
        _print("pooled", result["pooled"])
    if args.out:
        out = write_json(result, args.out)
        plot_tables(result, out.with_suffix(".png"))
        print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


def add_first_pass_errors(sub) -> None:
    p = sub.add_parser("first-pass-errors", help="why each wrong first pass went wrong, and which kinds the check fixes (reads eval reports)")
    p.add_argument("reports", nargs="+", help="JSON reports `kvswitch eval --out` wrote (v2 slow replies)")
    p.add_argument("--policy", default="slow", help="the policy whose replies to read (default slow)")
    p.add_argument("--out", help="write the tables as JSON here, and a PNG beside it")
    p.set_defaults(func=_cmd)
