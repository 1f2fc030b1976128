"""``kvswitch fit-coe``: choose the served KV-CoE variant on a dev set and fit its confidence there
(``serve_app.offline.coe_eval.run_fit_coe``)."""

from __future__ import annotations

import argparse

from serve_app.config import DEFAULT_MODEL
from serve_app.reports import write_json


def _cmd_fit_coe(args: argparse.Namespace) -> int:
    from serve_app.offline.coe_eval import FitCoeConfig, run_fit_coe

    cfg = FitCoeConfig(model=args.model, probe=args.probe, dataset=args.dataset, out=args.out, limit=args.limit,
                       batch_size=args.batch_size, variant=args.variant, grader=args.grader,
                       **({} if args.max_new_tokens is None else {"max_new_tokens": args.max_new_tokens}))
    report = run_fit_coe(cfg)
    print(f"\nKV-CoE variants on {report['n']} dev questions (errors: {report['errors']}), AUROC with the direction learned there:")
    table = report["dev_auroc_directed"]
    rows = sorted(table["slow"], key=lambda n: -max(table[m][n] if table[m][n] == table[m][n] else 0.0 for m in table))
    print(f"{'variant':<24} {'fast':>6} {'slow':>6}")
    for name in rows[:10]:
        print(f"{name:<24} {table['fast'][name]:>6.3f} {table['slow'][name]:>6.3f}")
    for mode, cell in report["baselines_dev_auroc_directed"].items():
        print(f"{mode} baselines: " + ", ".join(f"{k} {v:.3f}" for k, v in cell.items()))
    print(f"chosen: {report['variant']} -> {report['probe']}")
    if args.report:
        print(f"wrote {write_json({'command': args.command_line, **report}, args.report)}")
    return 0


def add_fit_coe(sub) -> None:
    p = sub.add_parser("fit-coe", help="choose the served KV-CoE variant on a dev set and fit its per-mode confidence there")
    p.add_argument("--model", default=str(DEFAULT_MODEL))
    p.add_argument("--probe", required=True, help="probe checkpoint to update")
    p.add_argument("--dataset", required=True, help="a dev set with errors in both modes (never the test set)")
    p.add_argument("--out", help="write the probe here instead of over --probe")
    p.add_argument("--report", help="also write the report as JSON")
    p.add_argument("--variant", help="fit this variant instead of choosing one")
    p.add_argument("--grader", help="default: the probe's")
    p.add_argument("--limit", type=int)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, help="generation cap per reply (default: eval's, 1792)")
    p.set_defaults(func=_cmd_fit_coe)
