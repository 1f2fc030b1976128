"""``kvswitch eval --sweep``: every knob policy's accuracy / tokens curve, the frontier figure and the
"tokens at matched accuracy" table (issue 21).

Families and their knob grids (``DEFAULT_GRIDS``; ``--sweep FAMILY=V1,V2;...`` replaces a family's):

* ``kv-oneshot`` — tau (choices between each question's fast and slow reply, no generation);
* ``kv-online`` — delta, with the probe's tau (one engine run per value);
* ``budget`` — B; ``dynasor`` — K/W pairs written ``K/W``; ``deer`` — lambda (one engine run per value);
* ``length-oneshot`` — L (choices; by default the prompt lengths' deciles).

A family is swept when ``--policy`` names it (in any form). The table gives, per family, the fewest
mean generated tokens among its points whose accuracy is at least always-slow's minus one point, and
the ratio to kv-online's. Choose knobs on a dev set with it, then evaluate those knobs on the test
set as ordinary policies: the table on a test set is an envelope, not a result.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from serve_app.offline.peers import choice, knob_policy
from serve_app.offline.records import choose, summarize

DEFAULT_GRIDS: dict[str, list] = {
    "kv-oneshot": [0, 10, 20, 30, 40, 50, 60, 70, 80, 90, 100],
    "kv-online": [5, 15, 25, 35, 45],
    "budget": [16, 32, 64, 128, 256, 512],
    "dynasor": ["8/2", "16/2", "16/3", "32/3", "64/3"],
    "deer": [0.8, 0.9, 0.95, 0.99, 0.999],
    "length-oneshot": [],
}
MATCH_POINTS = 0.01
"""Matched accuracy: at least always-slow's accuracy minus this (one point)."""


def parse_grids(spec: str | None) -> dict[str, list]:
    """``None`` or ``default``: ``DEFAULT_GRIDS``; else ``family=v1,v2;family=...`` replaces those families' grids."""
    grids = {k: list(v) for k, v in DEFAULT_GRIDS.items()}
    if spec in (None, "", "default"):
        return grids
    for part in spec.split(";"):
        family, _, values = part.partition("=")
        family = family.strip()
        if family not in grids or not values.strip():
            raise ValueError(f"bad --sweep part {part!r}: write FAMILY=V1,V2 with FAMILY one of {list(grids)}")
        cast = str if family == "dynasor" else (float if family == "deer" else int)
        try:
            grids[family] = [cast(v.strip()) for v in values.split(",") if v.strip()]
        except ValueError as exc:
            raise ValueError(f"bad --sweep values for {family}: {values!r}") from exc
    return grids


def _point(knob, records: list[dict]) -> dict:
    summary = summarize(records)
    probe = sum(r.get("probe_tokens", 0) for r in records) / len(records)
    return {"knob": knob, "accuracy": summary["accuracy"], "mean_tokens": summary["mean_tokens"],
            "mean_tokens_with_probes": summary["mean_tokens"] + probe}


def deciles(values: list[int]) -> list[int]:
    """The distinct deciles of ``values`` plus one below the smallest (everything slow)."""
    ordered = sorted(values)
    picks = {ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1) / 10))] for q in range(11)}
    return sorted({ordered[0] - 1, *picks})


def run_sweep(grids: dict[str, list], families: set[str], runs: dict[str, list[dict]], kv_difficulty: list[float] | None,
              prompt_lengths: list[int], engine: Callable[[str, dict], list[dict]]) -> dict:
    """The curves of ``families``. ``runs`` holds the fast and slow records; ``engine(policy, online_update)``
    runs one engine policy over the set and returns its records."""
    fast, slow = runs["fast"], runs["slow"]
    curves: dict[str, list[dict]] = {}
    for family in [f for f in DEFAULT_GRIDS if f in families]:
        grid = grids[family]
        if family in ("kv-oneshot", "length-oneshot"):  # the thresholds of peers.choice, the rule eval runs them by
            grid = grid or deciles(prompt_lengths)
            curves[family] = [_point(v, choose(fast, slow, choice(knob_policy(family, v), None, kv_difficulty, prompt_lengths)[0])) for v in grid]
        elif family == "kv-online":
            curves[family] = [_point(d, engine("kv-online", {"delta": float(d)})) for d in grid]
        else:
            name = {"budget": "budget:{}", "dynasor": "dynasor:{}", "deer": "deer:{}"}[family]
            curves[family] = [_point(v, engine(name.format(str(v).replace("/", ",")), {})) for v in grid]
    anchors = {name: _point(name, recs) for name, recs in (("fast", fast), ("slow", slow),
                                                             ("oracle", [f if f["correct"] else s for f, s in zip(fast, slow)]))}
    return {"curves": curves, "anchors": anchors, "matched": matched_table(curves, anchors["slow"]["accuracy"])}


def matched_table(curves: dict[str, list[dict]], slow_accuracy: float) -> dict:
    """Per family: the point with the fewest mean tokens, side-branch probe tokens included (every
    generated token counts, as the Dynasor and DEER papers count them), whose accuracy is >= slow's -
    ``MATCH_POINTS`` (None when no point gets there), and its tokens as a ratio to kv-online's, with
    and without the probe tokens."""
    target = slow_accuracy - MATCH_POINTS
    table: dict[str, dict | None] = {}
    for family, points in curves.items():
        ok = [p for p in points if p["accuracy"] >= target - 1e-12]
        table[family] = min(ok, key=_cost) if ok else None
    ref = table.get("kv-online")
    for family, best in table.items():
        if best is not None and ref is not None:
            best["tokens_vs_kv_online"] = best["mean_tokens"] / ref["mean_tokens"]
            best["tokens_with_probes_vs_kv_online"] = _cost(best) / _cost(ref)
    return {"target_accuracy": target, "best": table}


def _cost(point: dict) -> float:
    return point.get("mean_tokens_with_probes", point["mean_tokens"])


def chosen_table(report: dict) -> list[dict]:
    """An ``eval --knobs-from`` report's dev-chosen policies as measured on this set: per family,
    accuracy, its distance to always-slow's, tokens with and without probe tokens, and the ratio to
    the dev-chosen kv-online's tokens (probe tokens included)."""
    pols, chosen = report["policies"], report.get("knobs_from", {}).get("chosen", {})
    slow = pols.get("slow")
    ref = pols.get(chosen.get("kv-online", ""))
    rows = []
    for family, name in chosen.items():
        pol = pols[name]
        rows.append({"family": family, "policy": name, "accuracy": pol["accuracy"],
                     "vs_slow_points": None if slow is None else 100 * (pol["accuracy"] - slow["accuracy"]),
                     "mean_tokens": pol["mean_tokens"], "mean_tokens_with_probes": _cost(pol),
                     "tokens_vs_kv_online": None if ref is None else _cost(pol) / _cost(ref)})
    return rows


def format_chosen(rows: list[dict]) -> str:
    out = ["knobs chosen on the dev set, measured here:",
           f"{'family':>15} {'policy':>16} {'accuracy':>9} {'vs slow':>8} {'tokens':>8} {'+probes':>8} {'vs kv-online':>13}"]
    for r in rows:
        d, ratio = r["vs_slow_points"], r["tokens_vs_kv_online"]
        out.append(f"{r['family']:>15} {r['policy']:>16} {r['accuracy']:>9.3f} {'' if d is None else f'{d:+.1f}':>8} "
                   f"{r['mean_tokens']:>8.1f} {r['mean_tokens_with_probes']:>8.1f} {'' if ratio is None else f'{ratio:.2f}x':>13}")
    return "\n".join(out)


def format_matched(sweep: dict) -> str:
    m = sweep["matched"]
    rows = [f"tokens at matched accuracy (>= {m['target_accuracy']:.3f}):",
            f"{'family':>15} {'knob':>8} {'accuracy':>9} {'tokens':>8} {'+probes':>8} {'vs kv-online':>13}"]
    for family, best in m["best"].items():  # the ratio counts probe tokens
        if best is None:
            rows.append(f"{family:>15} {'-':>8} {'never reaches it':>28}")
            continue
        ratio = best.get("tokens_with_probes_vs_kv_online")
        rows.append(f"{family:>15} {str(best['knob']):>8} {best['accuracy']:>9.3f} {best['mean_tokens']:>8.1f} "
                    f"{_cost(best):>8.1f} {'' if ratio is None else f'{ratio:.2f}x':>13}")
    return "\n".join(rows)


def plot_frontier(sweep: dict, path: str | Path, title: str = "", chosen: list[dict] | None = None) -> None:
    """Accuracy vs mean generated tokens, left the whole range (log tokens), right a zoom on the band
    from matched accuracy - 3 points up: a curve per family (dashed: with side-branch tokens), the
    anchors as stars, the matched-accuracy line, and ``chosen`` (``chosen_table`` rows: knobs picked
    on a dev set) as open diamonds at their tokens with probes, labelled in the zoom."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    target = sweep["matched"]["target_accuracy"]
    fig, (ax, zoom) = plt.subplots(1, 2, figsize=(14, 5.5))
    for family, points in sweep["curves"].items():
        pts = sorted(points, key=lambda p: p["mean_tokens"])
        for a in (ax, zoom):
            line, = a.plot([p["mean_tokens"] for p in pts], [p["accuracy"] for p in pts], marker="o", ms=4, label=family)
            if any(p["mean_tokens_with_probes"] > p["mean_tokens"] for p in pts):
                a.plot([p["mean_tokens_with_probes"] for p in pts], [p["accuracy"] for p in pts], ls="--", color=line.get_color(), alpha=0.6,
                       label=f"{family} + probe tokens")
    for name, p in sweep["anchors"].items():
        for a in (ax, zoom):
            a.scatter(p["mean_tokens"], p["accuracy"], marker="*", s=140, zorder=5, color="black")
            a.annotate(name, (p["mean_tokens"], p["accuracy"]), textcoords="offset points", fontsize=9,
                       xytext={"oracle": (-38, -12), "slow": (5, 6)}.get(name, (5, -10)))  # oracle and slow often sit close
    for i, r in enumerate(chosen or []):
        for a in (ax, zoom):
            a.scatter(r["mean_tokens_with_probes"], r["accuracy"], marker="D", s=70, facecolors="none", edgecolors="black", zorder=6)
        zoom.annotate(r["policy"], (r["mean_tokens_with_probes"], r["accuracy"]), textcoords="offset points", fontsize=7,
                      xytext=(6, -14 + 9 * (i % 4)))  # staggered: chosen points often share an accuracy
    for a in (ax, zoom):
        a.axhline(target, color="grey", lw=0.8, ls=":", label="always-slow - 1 point")
        a.grid(alpha=0.3)
    ax.set(xscale="log", xlabel="mean generated tokens (log)", ylabel="accuracy", title=title or "Accuracy / tokens frontier")
    zoom.set(ylim=(target - 0.03, 1.003), xlabel="mean generated tokens", ylabel="accuracy",
             title="zoom: matched accuracy (diamonds: knobs chosen on the dev set)" if chosen else "zoom: matched accuracy")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def dev_matched_points(sweep_report: str | Path) -> tuple[dict, dict]:
    """A dev-set sweep report (``eval --sweep``) and its matched-accuracy point per family."""
    report = json.loads(Path(sweep_report).read_text())
    if "sweep" not in report:
        raise ValueError(f"{sweep_report} holds no sweep: write it with `kvswitch eval --sweep` on a dev set")
    sweep = report["sweep"]
    if "curves" in sweep:  # recomputed: the stored table derives from the curves, by the rule of the version that wrote it
        return report, matched_table(sweep["curves"], sweep["anchors"]["slow"]["accuracy"])["best"]
    return report, sweep["matched"]["best"]


def with_dev_knobs(policies: list[str], sweep_report: str | Path) -> tuple[list[str], dict]:
    """``policies`` with every bare family name that a dev-set sweep report (``eval --sweep``) has a
    matched-accuracy point for replaced by that point's policy; and the choices made."""
    report, best = dev_matched_points(sweep_report)
    chosen = {p: knob_policy(p, best[p]["knob"]) for p in policies if ":" not in p and best.get(p) is not None}
    return [chosen.get(p, p) for p in policies], {"from": str(sweep_report), "dataset": report.get("dataset"), "chosen": chosen}
