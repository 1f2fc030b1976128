"""``kvswitch set-thresholds``: write switching thresholds chosen on a dev set into a probe checkpoint.

``calibrate`` stores the τ / δ it was given; the ones worth serving are chosen afterwards, by
``kvswitch eval --sweep`` on a dev set (the point with the fewest tokens at accuracy ≥ always-slow − 1
point). This command puts them in the probe, so that serving and ``eval`` use them by default, and
records where they came from (``thresholds_source``).

``--token-map-from`` fits, from a dev ``eval`` report with the ``fast``, ``slow`` and a difficulty
policy's replies, the map from difficulty to generated tokens that serving predicts load with
(``fit_token_map``; ``PolicyConfig``'s defaults are one model's scale). Nothing is generated.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from serve_app.core.policy import OnlineConfig, fit_token_map, unreachable_switches
from serve_app.core.probe import Probe


def dev_thresholds(reports: list[str | Path]) -> dict:
    """τ from a sweep report's matched ``kv-oneshot`` point, δ from one's matched ``kv-online``
    point. A δ sweep runs at one τ (its report's ``online.tau``): it must be the τ being set."""
    from serve_app.offline.sweep import dev_matched_points

    chosen, tau_of_delta = {}, None
    for path in reports:
        report, best = dev_matched_points(path)
        for family, knob in (("kv-oneshot", "tau"), ("kv-online", "delta")):
            if best.get(family) is not None:
                if knob in chosen:
                    raise ValueError(f"two reports choose {knob}: give one sweep per knob")
                chosen[knob] = float(best[family]["knob"])
                if knob == "delta":
                    tau_of_delta = float((report.get("online") or {}).get("tau", float("nan")))
    if not chosen:
        raise ValueError(f"no kv-oneshot or kv-online point at matched accuracy in {', '.join(map(str, reports))}")
    if "delta" in chosen and "tau" in chosen and tau_of_delta != chosen["tau"]:
        raise ValueError(f"the δ sweep ran at τ {tau_of_delta:g}, but τ {chosen['tau']:g} is being set: sweep δ at that τ")
    return chosen


DIFFICULTY_POLICIES = ("kv-oneshot", "kv-online", "hidden-oneshot", "minilm-oneshot")


def dev_token_map(report_path: str | Path) -> dict:
    """``fit_token_map`` on one ``eval`` report: each question's difficulty from the first policy of
    ``DIFFICULTY_POLICIES`` it ran (the probe's prompt score), its slow reply's tokens from ``slow``,
    the fast replies' tokens from ``fast``."""
    report = json.loads(Path(report_path).read_text())
    policies = report.get("policies") or {}
    scored = next((p for p in DIFFICULTY_POLICIES if p in policies), None)
    missing = [p for p in ("fast", "slow") if p not in policies] + ([] if scored else ["one of " + "/".join(DIFFICULTY_POLICIES)])
    if missing:
        raise ValueError(f"{report_path}: a token map needs an eval report with the policies fast, slow and a difficulty one; missing {', '.join(missing)}")
    slow = {r["question"]: r["tokens"] for r in policies["slow"]["records"]}
    pairs = [(r["difficulty"], slow[r["question"]]) for r in policies[scored]["records"]
             if r.get("difficulty") is not None and r["question"] in slow]
    fitted = fit_token_map([d for d, _ in pairs], [t for _, t in pairs], [r["tokens"] for r in policies["fast"]["records"]])
    return {**fitted, "questions": len(pairs), "difficulty_from": scored, "from": str(report_path)}


def set_thresholds(probe_path: str | Path, values: dict, source: dict, out: str | Path | None = None,
                   token_map: dict | None = None) -> tuple[dict, list[str]]:
    """Write ``values`` (every / tau / delta / confirm / max_switches) into the probe's thresholds and,
    when given, ``token_map`` (``dev_token_map``) as its ``token_map``; returns the new thresholds and
    what they can never do (``unreachable_switches``)."""
    probe = Probe.load(probe_path)
    thresholds = OnlineConfig(**{**probe.thresholds, **values}).model_dump()
    data = dict(probe.data)
    if values:  # a token map alone leaves the thresholds' record of where they came from as it is
        data.update(thresholds=thresholds, thresholds_source={**source, "set": values, "previous": dict(probe.thresholds)})
    if token_map is not None:
        data["token_map"] = {**token_map, "command": source["command"]}
    Probe(data).save(out or probe_path)
    return thresholds, unreachable_switches(OnlineConfig(**thresholds))


def _cmd_set_thresholds(args: argparse.Namespace) -> int:
    values = dev_thresholds(args.from_) if args.from_ else {}
    values.update({k: getattr(args, k) for k in ("tau", "delta", "every", "confirm") if getattr(args, k) is not None})
    if not values and not args.token_map_from:
        raise SystemExit("nothing to set: give --from DEV_SWEEP_JSON and/or --tau / --delta / --every / --confirm, or --token-map-from DEV_EVAL_JSON")
    source = {"from": [str(p) for p in args.from_ or []], "command": args.command_line}
    token_map = dev_token_map(args.token_map_from) if args.token_map_from else None
    thresholds, notes = set_thresholds(args.probe, values, source, args.out, token_map)
    print(f"wrote {args.out or args.probe}: " + ", ".join(f"{k} {v:g}" for k, v in thresholds.items()))
    if token_map is not None:
        print(f"token map ({token_map['questions']} questions): fast {token_map['fast_tokens']:.1f}, "
              f"slow {token_map['slow_tokens_min']:.0f} at difficulty 0 to {token_map['slow_tokens_max']:.0f} at 100")
    for note in notes:
        print(f"warning: {note}", file=sys.stderr)
    return 0


def add_set_thresholds(sub) -> None:
    p = sub.add_parser("set-thresholds", help="write switching thresholds chosen on a dev set (`eval --sweep`) into a probe")
    p.add_argument("--probe", required=True, help="probe checkpoint to update")
    p.add_argument("--from", dest="from_", nargs="+", metavar="DEV_SWEEP_JSON",
                   help="`eval --sweep` reports on a dev set: tau from the kv-oneshot matched point, delta from the kv-online one")
    p.add_argument("--tau", type=float, help="routing threshold (overrides --from)")
    p.add_argument("--delta", type=float, help="online hysteresis (overrides --from)")
    p.add_argument("--every", type=int, help="online check every k generated tokens")
    p.add_argument("--confirm", type=int, help="consecutive checks past the threshold before a switch")
    p.add_argument("--token-map-from", metavar="DEV_EVAL_JSON",
                   help="an `eval` report on a dev set with the fast, slow and kv-oneshot policies: fit the difficulty-to-tokens "
                        "map serving predicts load with (policy.fast_tokens / slow_tokens_min / slow_tokens_max unless the config sets them)")
    p.add_argument("--out", help="write the probe here instead of over --probe")
    p.set_defaults(func=_cmd_set_thresholds)
