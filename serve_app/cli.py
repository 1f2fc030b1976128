"""The ``kvswitch`` command line: dispatch only. The offline commands live in
``serve_app.offline.commands``; the load-test, chaos, fuzz and autoscaling-benchmark commands in ``loadtests``."""

from __future__ import annotations

import argparse
import shlex
import sys


def build_parser() -> argparse.ArgumentParser:
    from loadtests.autoscale import add_parser as add_autoscale
    from loadtests.chaos import add_parser as add_chaos
    from loadtests.cli import add_parser as add_loadtest
    from loadtests.fuzz import add_parser as add_fuzz
    from serve_app.offline.commands import COMMANDS

    parser = argparse.ArgumentParser(prog="kvswitch", description="data, training, evaluation, benchmarks, load tests and a two-mode demo")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (*COMMANDS, add_loadtest, add_chaos, add_fuzz, add_autoscale):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from pydantic import ValidationError

    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    args.command_line = shlex.join(["kvswitch", *argv])
    try:
        return args.func(args)
    except ValidationError as e:  # a setting out of range or unknown: say which, not a traceback
        lines = [f"{'.'.join(map(str, err['loc'])) or 'value'}: {err['msg']}" for err in e.errors()]
        parser.exit(2, f"kvswitch {args.command}: error: " + "; ".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
