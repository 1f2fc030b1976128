"""The ``kvswitch`` command line: data, training, evaluation and a two-mode demo."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "models" / "arith-qwen3-tiny"


def _cmd_gen_data(args: argparse.Namespace) -> int:
    from serve_app.task import TaskConfig, generate_problems, write_jsonl

    task = TaskConfig(min_operators=args.min_operators, max_operators=args.max_operators)
    n = write_jsonl(generate_problems(args.n, args.seed, task), args.out)
    print(f"wrote {n} questions to {args.out}")
    return 0


def _cmd_train_model(args: argparse.Namespace) -> int:
    from serve_app.train import TrainConfig, train

    overrides = {k: v for k, v in vars(args).items() if k in TrainConfig.model_fields and v is not None}
    log = train(TrainConfig(**overrides), Path(args.out))
    print(json.dumps({"params": log["params"], "train_seconds": log["train_seconds"], "monitor": log["monitor"][-1]}))
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from serve_app.evaluate import EvalConfig, plot_report, print_report, run_eval

    cfg = EvalConfig(
        model=args.model,
        dataset=args.dataset,
        policies=[p.strip() for p in args.policy.split(",") if p.strip()],
        batch_size=args.batch_size,
        limit=args.limit,
        **({"max_new_tokens": args.max_new_tokens} if args.max_new_tokens is not None else {}),
    )
    report = run_eval(cfg)
    print_report(report)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
        plot_report(report, Path(args.out).with_suffix(".png"))
        print(f"wrote {args.out} and {Path(args.out).with_suffix('.png')}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from serve_app.evaluate import load_model
    from serve_app.generate import MAX_NEW_TOKENS, build_prompt, generate_greedy
    from serve_app.task import extract_answer, parse_question

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvswitch", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("gen-data", help="write a chain-arithmetic JSONL dataset")
    p.add_argument("--out", required=True)
    p.add_argument("--n", type=int, default=600)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--min-operators", type=int, default=1)
    p.add_argument("--max-operators", type=int, default=6)
    p.set_defaults(func=_cmd_gen_data)

    p = sub.add_parser("train-model", help="train the embedded default model from scratch")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int)
    p.add_argument("--tokens-per-batch", dest="tokens_per_batch", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--layers", type=int)
    p.add_argument("--hidden-size", dest="hidden_size", type=int)
    p.add_argument("--monitor-every", dest="monitor_every", type=int)
    p.set_defaults(func=_cmd_train_model)

    p = sub.add_parser("eval", help="greedy accuracy and generated tokens per policy")
    p.add_argument("--model", default=str(DEFAULT_MODEL))
    p.add_argument("--dataset", required=True)
    p.add_argument("--policy", default="fast,slow", help="comma list: fast, slow")
    p.add_argument("--out")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, help="generation cap per reply (default 512)")
    p.add_argument("--limit", type=int, help="evaluate only the first N questions")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("demo", help="answer one question in both modes")
    p.add_argument("--model", default=str(DEFAULT_MODEL))
    p.add_argument("--question", default="What is 37 + 48 - 19?")
    p.add_argument("--max-new-tokens", type=int, help="generation cap per reply (default 512)")
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
