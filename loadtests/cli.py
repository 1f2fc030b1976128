"""``kvswitch loadtest``: options, scenario files and ``--launch``."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from pydantic import ValidationError

from loadtests.client import add_data_arguments
from serve_app.core.early_exit import split_policies


def _floats(text: str) -> list[float]:
    try:
        return [float(p) for p in text.split(",") if p.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected a comma list of numbers, got {text!r}") from exc


def _modes(text: str) -> list[str]:
    return split_policies(text)


def add_parser(sub) -> None:
    p = sub.add_parser("loadtest", help="drive a running service (or any OpenAI-compatible server) with a workload: latency, "
                                        "throughput, goodput, accuracy and tokens, optionally per routing mode side by side",
                       description="Open loop (--rate, Poisson/gamma arrivals) or closed loop (--concurrency); results as JSON "
                                   "plus a PNG beside it. Options given here override the --scenario file's.")
    p.add_argument("--scenario", help="a loadtests/scenarios/*.yaml file (LoadConfig fields)")
    p.add_argument("--url", help="base URL of the service (default http://127.0.0.1:8000, or the launched config's)")
    p.add_argument("--model", help="model id (default: the first one GET /v1/models lists)")
    p.add_argument("--dataset", help="JSONL, JSON or Parquet with a question and an answer per row (docs/data.md)")
    add_data_arguments(p)
    p.add_argument("--shuffle-seed", dest="shuffle_seed", type=int, help="shuffle the questions with this seed")
    p.add_argument("--pattern", choices=["poisson", "closed"], help="arrival pattern (implied by --rate / --concurrency)")
    p.add_argument("--rate", type=float, help="open loop: mean requests per second")
    p.add_argument("--burstiness", type=float, help="open loop: gamma shape of inter-arrival times (1 = Poisson, < 1 burstier)")
    p.add_argument("--concurrency", type=int, help="closed loop: requests in flight")
    p.add_argument("--sweep", type=_floats, help="comma list of rates (with --rate's pattern) or concurrencies to run in turn")
    p.add_argument("--num-requests", dest="num_requests", type=int, help="measured requests per run (default 100)")
    p.add_argument("--duration", type=float, help="stop sending after this many seconds per run")
    p.add_argument("--warmup", type=int, help="requests before each run, not measured (default 4)")
    p.add_argument("--compare", dest="modes", type=_modes, help="routing modes side by side, e.g. auto,slow,fast (default: auto); peers too: "
                        "budget:B, dynasor[:K[,W]], deer[:LAMBDA]")
    p.add_argument("--repeats", type=int, help="rounds of all modes, interleaved; records are pooled (default 1)")
    p.add_argument("--max-tokens", dest="max_tokens", type=int, help="max_tokens per request (default: the server's)")
    p.add_argument("--temperature", type=float)
    p.add_argument("--timeout", type=float, help="seconds before a request counts as a timeout (default 300)")
    p.add_argument("--slo", help="goodput SLOs in ms, e.g. ttft:2000,e2e:10000 (also tpot)")
    p.add_argument("--seed", type=int, help="seed of the open-loop arrival times")
    p.add_argument("--launch", nargs="?", const=True, default=None, metavar="SERVE_CONFIG",
                   help="deploy SERVE_CONFIG (default: the scenario's serve_config) with `serve run` for the test, then stop it")
    p.add_argument("--out", help="JSON report; a PNG goes beside it")
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace):
    from loadtests.runner import LoadConfig, load_scenario

    fields = ("pattern", "url", "model", "dataset", "question_field", "answer_field", "grader", "shuffle_seed", "rate", "burstiness", "concurrency", "sweep", "num_requests", "duration",
              "warmup", "modes", "repeats", "max_tokens", "temperature", "timeout", "slo", "seed", "out")
    given = {k: getattr(args, k) for k in fields if getattr(args, k) is not None}
    if args.rate is not None and args.concurrency is not None:
        raise ValueError("give --rate (open loop) or --concurrency (closed loop), not both")
    if args.rate is not None:
        given.update(pattern="poisson", concurrency=None)
    elif args.concurrency is not None:
        given.update(pattern="closed", rate=None)
    if isinstance(args.launch, str):
        given["serve_config"] = args.launch
    if args.scenario:
        return load_scenario(args.scenario, **given)
    if "dataset" not in given:
        raise ValueError("--dataset (or --scenario) is required")
    if "rate" not in given and "concurrency" not in given and "sweep" not in given:
        raise ValueError("give --rate, --concurrency or --sweep")
    return LoadConfig(**given)


def run(args: argparse.Namespace) -> int:
    from loadtests.report import format_report, plot_report
    from serve_app.reports import write_json

    try:
        cfg = config_from_args(args)
    except (ValueError, ValidationError) as exc:
        print(f"kvswitch loadtest: {exc}", file=sys.stderr)
        return 2
    try:
        report = _run(cfg, args)
    except RuntimeError as exc:
        print(f"kvswitch loadtest: {exc}", file=sys.stderr)
        return 1
    report = {"command": getattr(args, "command_line", None), **report}
    print(format_report(report))
    if cfg.out:
        path = write_json(report, cfg.out, indent=1)
        plot_report(report, path.with_suffix(".png"))
        print(f"wrote {path} and {path.with_suffix('.png')}")
    lost = sum(s["errors"] for e in report["levels"] for s in e["summaries"].values())
    if lost:
        print(f"warning: {lost} requests failed (see errors_by_status)", file=sys.stderr)
    return 0


def _run(cfg, args: argparse.Namespace) -> dict:
    from loadtests.launch import config_url, launched
    from loadtests.runner import run_load

    if not args.launch:
        return asyncio.run(run_load(cfg))
    if not cfg.serve_config:
        raise RuntimeError("--launch needs a serve config (--launch FILE, or serve_config in the scenario)")
    cfg = cfg.model_copy(update={"url": args.url or config_url(cfg.serve_config)})
    log = Path(cfg.out).with_suffix(".serve.log") if cfg.out else None
    with launched(cfg.serve_config, log):
        return asyncio.run(run_load(cfg))
