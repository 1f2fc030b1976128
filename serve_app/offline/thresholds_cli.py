"""``kvswitch set-thresholds``: write switching thresholds chosen on a dev set into a probe checkpoint.

``calibrate`` stores the τ / δ it was given; the ones worth serving are chosen afterwards, by
``kvswitch eval --sweep`` on a dev set (the point with the fewest tokens at accuracy ≥ always-slow − 1
point). This command puts them in the probe, so that serving and ``eval`` use them by default, and
records where they came from (``thresholds_source``). Nothing is generated.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from serve_app.core.policy import OnlineConfig, unreachable_switches
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


def set_thresholds(probe_path: str | Path, values: dict, source: dict, out: str | Path | None = None) -> tuple[dict, list[str]]:
    """Write ``values`` (every / tau / delta / confirm / max_switches) into the probe's thresholds;
    returns the new thresholds and what they can never do (``unreachable_switches``)."""
    probe = Probe.load(probe_path)
    thresholds = OnlineConfig(**{**probe.thresholds, **values}).model_dump()
    data = {**probe.data, "thresholds": thresholds,
            "thresholds_source": {**source, "set": values, "previous": dict(probe.thresholds)}}
    Probe(data).save(out or probe_path)
    return thresholds, unreachable_switches(OnlineConfig(**thresholds))


def _cmd_set_thresholds(args: argparse.Namespace) -> int:
    values = dev_thresholds(args.from_) if args.from_ else {}
    values.update({k: getattr(args, k) for k in ("tau", "delta", "every", "confirm") if getattr(args, k) is not None})
    if not values:
        raise SystemExit("nothing to set: give --from DEV_SWEEP_JSON and/or --tau / --delta / --every / --confirm")
    source = {"from": [str(p) for p in args.from_ or []], "command": args.command_line}
    thresholds, notes = set_thresholds(args.probe, values, source, args.out)
    print(f"wrote {args.out or args.probe}: " + ", ".join(f"{k} {v:g}" for k, v in thresholds.items()))
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
    p.add_argument("--out", help="write the probe here instead of over --probe")
    p.set_defaults(func=_cmd_set_thresholds)
