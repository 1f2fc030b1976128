"""``kvswitch gen-data``: chain-arithmetic JSONL datasets, reproducible from their command line
(operator-count mixes with ``--operators``, disjoint sets with ``--exclude``)."""

from __future__ import annotations

import argparse
from pathlib import Path


def _cmd_gen_data(args: argparse.Namespace) -> int:
    from serve_app.core.task import (
        TaskConfig,
        generate_mix,
        generate_problems,
        mix_counts,
        write_jsonl,
    )

    parser: argparse.ArgumentParser = args.gen_data_parser
    if args.operators and (args.min_operators is not None or args.max_operators is not None):
        parser.error("--operators sets the operator counts itself; drop --min-operators/--max-operators")
    if args.drop_excluded and not args.exclude:
        parser.error("--drop-excluded needs --exclude")
    if (args.min_operators or 1) > (args.max_operators or 6):
        parser.error(f"--min-operators {args.min_operators or 1} is above --max-operators {args.max_operators or 6}")
    exclude = set().union(*args.exclude) if args.exclude else set()
    if args.operators:
        problems = generate_mix(args.n, args.seed, args.operators, max_operand=args.max_operand, exclude=exclude, drop_excluded=args.drop_excluded,
                                operands=args.operands)
        mix = ", ".join(f"{g.label}: {c}" for g, c in zip(args.operators, mix_counts(args.n, args.operators)))
        print(f"operator mix (problems drawn per operator count) {mix}")
    else:
        lo = 1 if args.min_operators is None else args.min_operators
        hi = 6 if args.max_operators is None else args.max_operators
        problems = generate_problems(args.n, args.seed, TaskConfig(min_operators=lo, max_operators=hi, max_operand=args.max_operand, operands=args.operands), exclude, args.drop_excluded)
    n = write_jsonl(problems, args.out, args.style)
    dropped = f" ({args.n - n} excluded questions dropped)" if n != args.n else ""
    print(f"wrote {n} questions to {args.out}{dropped}")
    return 0


def _operator_mix(value: str):
    from serve_app.core.task import parse_operator_mix

    try:
        return parse_operator_mix(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _question_file(value: str) -> frozenset[str]:
    """The questions of a JSONL dataset file, for --exclude."""
    from serve_app.core.task import read_jsonl

    path = Path(value)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"no such file: {value}")
    try:
        return frozenset(str(row["question"]) for row in read_jsonl(path))
    except (ValueError, UnicodeDecodeError) as e:  # json.JSONDecodeError is a ValueError
        raise argparse.ArgumentTypeError(f"{value} is not a JSONL dataset ({e})") from None


def _positive_int(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {value!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


def add_gen_data(sub) -> None:
    p = sub.add_parser(
        "gen-data", help="write a chain-arithmetic JSONL dataset",
        description="Write N chain-arithmetic questions as JSONL; the same options and seed give the same file. "
                    "Operator counts are uniform over --min-operators..--max-operators (1-6), or follow --operators.")
    p.add_argument("--out", required=True)
    p.add_argument("--n", type=_positive_int, default=600, help="questions to draw (default 600)")
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--min-operators", type=_positive_int, default=None, help="fewest operators (default 1)")
    p.add_argument("--max-operators", type=_positive_int, default=None, help="most operators (default 6)")
    p.add_argument("--operators", type=_operator_mix, default=None, metavar="K:W[,K:W...]",
                   help="operator-count mix instead of --min/--max-operators: K an operator count (2) or range "
                        "(3-6, uniform inside), W its weight (0.35) or count (210); weights are normalised and "
                        "rounded by largest remainder, so the counts add up to --n. The groups are written one "
                        "after the other in the given order; group i (from 1) is drawn with seed SEED*10+i. "
                        "E.g. 1:0.35,2:0.35,3-6:0.30")
    p.add_argument("--operands", choices=["uniform", "digits", "mixed"], default="uniform",
                   help="uniform: operands uniform in 0..max-operand (default); digits: digit length uniform in 1..len(max-operand), "
                        "then uniform within it (with 99: half single-digit operands); mixed: 0-99 half the time, 0-9 30%%, "
                        "100..max-operand 20%% (the v2 model's training mix)")
    p.add_argument("--max-operand", dest="max_operand", type=_positive_int, default=99,
                   help="largest operand (default 99; 999 for three-digit operands)")
    p.add_argument("--exclude", type=_question_file, nargs="+", action="extend", default=None, metavar="FILE",
                   help="JSONL datasets whose questions must not appear (e.g. keep a test set disjoint from the "
                        "calibration set); an excluded draw is replaced by the next one from the same stream")
    p.add_argument("--style", choices=["native", "gsm8k", "math"], default="native",
                   help="row format: native {question, answer} (default); gsm8k {question, answer: '... #### N'}; "
                        "math {problem, solution: '... \\boxed{N}'} - the same questions whatever the style")
    p.add_argument("--drop-excluded", action="store_true",
                   help="with --exclude: leave excluded draws out instead of replacing them (fewer than --n questions)")
    p.set_defaults(func=_cmd_gen_data, gen_data_parser=p)
