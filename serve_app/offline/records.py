"""An evaluation's per-question records (``kvswitch eval``'s ``records``): their summary, and a
routed policy's records picked question by question from the fast and slow runs. Shared by
``evaluate`` (the policies' tables) and ``sweep`` (the knob curves), so a curve point and a policy
row of the same choice are the same numbers."""

from __future__ import annotations


def summarize(records: list[dict]) -> dict:
    """Count, accuracy, mean generated tokens and the share of replies that finished (0 for none)."""
    n = len(records)
    return {
        "n": n,
        "accuracy": sum(r["correct"] for r in records) / n if n else 0.0,
        "mean_tokens": sum(r["tokens"] for r in records) / n if n else 0.0,
        "finished_fraction": sum(r["finished"] for r in records) / n if n else 0.0,
    }


def choose(fast: list[dict], slow: list[dict], use_fast: list[bool], difficulty: list[float] | None = None) -> list[dict]:
    """Per question the fast record where ``use_fast`` holds, else the slow one (copies), with the
    ``difficulty`` the choice was made on (rounded to 2 places; None without one)."""
    out = []
    for i, f in enumerate(use_fast):
        rec = dict(fast[i] if f else slow[i])
        rec["difficulty"] = None if difficulty is None else round(float(difficulty[i]), 2)
        out.append(rec)
    return out
