"""``kvswitch train-model``: its options and the TrainConfig they make (``serve_app.offline.train``)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def train_config(args: argparse.Namespace):
    """``train-model``'s TrainConfig: ``--config`` (JSON / YAML), then the options given."""
    from serve_app.offline.train import TrainConfig

    base = {}
    if args.config:  # a TrainConfig file (e.g. a checkpoint's train_config.json); options given here override it
        import yaml

        base = yaml.safe_load(Path(args.config).read_text()) or {}
    overrides = {k: v for k, v in vars(args).items() if k in TrainConfig.model_fields and v is not None}
    task = {k: v for k, v in (("max_operators", args.max_operators), ("max_operand", args.max_operand), ("operands", args.operands))
            if v is not None}
    if task:
        overrides["task"] = {**base.get("task", {}), **task}
    return TrainConfig(**{**base, **overrides})


def _cmd_train_model(args: argparse.Namespace) -> int:
    from serve_app.offline.train import train

    log = train(train_config(args), Path(args.out))
    print(json.dumps({"params": log["params"], "train_seconds": log["train_seconds"], "monitor": log["monitor"][-1]}))
    return 0


def add_train_model(sub) -> None:
    p = sub.add_parser("train-model", help="train the embedded default model from scratch")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int)
    p.add_argument("--tokens-per-batch", dest="tokens_per_batch", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--layers", type=int)
    p.add_argument("--hidden-size", dest="hidden_size", type=int)
    p.add_argument("--monitor-every", dest="monitor_every", type=int)
    p.add_argument("--monitor-size", dest="monitor_size", type=int, help="questions per operator count and mode in the accuracy monitor (default 32)")
    p.add_argument("--min-lr", dest="min_lr", type=float)
    p.add_argument("--warmup-steps", dest="warmup_steps", type=int)
    p.add_argument("--slow-fraction", dest="slow_fraction", type=float)
    p.add_argument("--forced-close-fraction", dest="forced_close_fraction", type=float)
    p.add_argument("--init-from", dest="init_from", help="fine-tune this checkpoint directory instead of training from scratch")
    p.add_argument("--config", help="a TrainConfig as JSON or YAML (e.g. a checkpoint's train_config.json: the same run again); "
                                    "the options above override it")
    p.add_argument("--reply-format", dest="reply_format", choices=["v1", "checked", "checked-keyed", "checked-judged"],
                   help="slow replies: v1 (the shipped model's), checked (v2: first pass, a step-by-step check that finds and redoes a slip), "
                        "checked-keyed (the check looks the question's operands up by key) "
                        "or checked-judged (each compared pair is written, then judged: '8 6 differ')")
    p.add_argument("--check-slip-fraction", dest="check_slip_fraction", type=float,
                   help="checked: share of right-first-pass slow replies whose check slips once in an undo (a false alarm to mend; default 0)")
    p.add_argument("--double-slip-fraction", dest="double_slip_fraction", type=float,
                   help="checked: share of slipped slow replies whose check also slips, in the undo of the slipped step, "
                        "so the redo must read the question's operand (default 0)")
    p.add_argument("--operation-slip-fraction", dest="operation_slip_fraction", type=float,
                   help="checked: share of first-pass slips that flip the step's operation (- 36 for + 36), "
                        "so the check's undo must take the question's operation (default 0)")
    p.add_argument("--close-step-fraction", dest="close_step_fraction", type=float,
                   help="share of slow training questions with one signed step whose magnitudes differ by at most 9 "
                        "(-65 + 68, 93 - 89; default 0)")
    p.add_argument("--check-weight", dest="check_weight", type=float,
                   help="checked: loss weight of the check's verdict and redo tokens (default 1)")
    p.add_argument("--slip-fraction", dest="slip_fraction", type=float, help="checked: share of slow replies with a first-pass slip (default 0.3)")
    p.add_argument("--fast-small-fraction", dest="fast_small_fraction", type=float,
                   help="share of fast examples with two single-digit operands (default 0)")
    p.add_argument("--max-positions", dest="max_positions", type=int, help="the model's context (default 1024)")
    p.add_argument("--fast-one-operator-fraction", dest="fast_one_operator_fraction", type=float,
                   help="share of fast examples with one operator (default 0.6)")
    p.add_argument("--max-operators", dest="max_operators", type=int, help="longest training chain (default 6)")
    p.add_argument("--max-operand", dest="max_operand", type=int, help="largest training operand (default 99)")
    p.add_argument("--operands", choices=["uniform", "digits", "mixed"], help="training operand distribution (default uniform; gen-data --operands)")
    p.set_defaults(func=_cmd_train_model)
