"""Per-request records and the statistics of a load run. Pure Python + numpy: no network, no Ray.

Definitions (the same as vLLM's ``benchmark_serving`` and GenAI-Perf):

- **TTFT**: request sent → first streamed chunk that carries generated text (thought or answer).
- **E2E**: request sent → last byte of the response.
- **TPOT** (time per output token, per request): ``(e2e - ttft) / (completion_tokens - 1)``;
  undefined for replies of one token.
- **ITL** (inter-token latency): the gaps between successive text-bearing chunks, pooled over
  requests. A chunk may carry several tokens when detokenisation holds text back.
- **Throughput**: completed requests (and generated tokens) per second of the measured window,
  from the first request sent to the last response finished.
- **Goodput**: completed requests per second that met every SLO (DistServe); ``correct_goodput``
  also requires a correct answer.
- Percentiles interpolate linearly between order statistics (``numpy.percentile``'s default).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass, field

import numpy as np

PERCENTILES = (50, 90, 99)
SLO_METRICS = ("ttft", "tpot", "e2e")


@dataclass
class RequestRecord:
    """One request of a load run. Fields kvswitch alone returns (route, replica, ...) stay None
    against another OpenAI-compatible server."""

    index: int
    question: str
    answer: str
    mode: str
    sent_at: float = 0.0
    """Seconds from the start of the measured window."""
    status: str = "ok"
    """``ok``, an HTTP status code, ``timeout``, ``connection``, ``stream_error`` or ``bad_response``."""
    error: str | None = None
    error_type: str | None = None
    """``error.type`` of a JSON (or SSE) error body; None when the failure came without one."""
    error_code: str | None = None
    ttft: float | None = None
    e2e: float | None = None
    chunk_times: list[float] = field(default_factory=list)
    """Arrival of every text-bearing chunk, seconds after sending."""
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    reasoning_tokens: int | None = None
    tokens_from_usage: bool = False
    content: str = ""
    correct: bool | None = None
    finish_reason: str | None = None
    route: str | None = None
    reason: str | None = None
    difficulty: float | None = None
    switched: bool | None = None
    end_mode: str | None = None
    replica: str | None = None
    predicted_tokens: float | None = None
    confidence: float | None = None
    retried: bool | None = None
    resumed: bool | None = None
    """A stream whose replica died mid-reply and that another replica continued (``kvswitch.resumed``)."""
    """kvswitch: the reply came from a second replica after the first one failed."""
    fallback: str | None = None
    """kvswitch: routing fell back (``prefill_unavailable``)."""
    exited_at: int | None = None
    """kvswitch: a peer early-exit rule (``kvswitch.online``) closed the thought here."""
    probe_tokens: int | None = None
    """kvswitch: tokens of that rule's side-branch probes (not in ``completion_tokens``)."""

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def tpot(self) -> float | None:
        if not self.ok or self.ttft is None or self.e2e is None or not self.completion_tokens or self.completion_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.completion_tokens - 1)

    @property
    def itls(self) -> list[float]:
        return [b - a for a, b in zip(self.chunk_times, self.chunk_times[1:])]

    def to_json(self, keep_chunks: bool = False) -> dict:
        out = asdict(self)
        out["tpot"] = self.tpot
        if not keep_chunks:
            out.pop("chunk_times")
        return out


def percentiles(values, ps=PERCENTILES) -> dict[str, float | None]:
    """``{"mean", "p50", "p90", "p99"}`` (None for no values)."""
    vals = np.asarray([v for v in values if v is not None], dtype=float)
    if vals.size == 0:
        return {"mean": None, **{f"p{p}": None for p in ps}}
    return {"mean": float(vals.mean()), **{f"p{p}": float(np.percentile(vals, p)) for p in ps}}


def parse_slo(text: str | None) -> dict[str, float]:
    """``"ttft:1000,e2e:8000"`` (milliseconds) → ``{"ttft": 1.0, "e2e": 8.0}`` (seconds)."""
    if not text:
        return {}
    slo: dict[str, float] = {}
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        name, sep, value = part.partition(":")
        name = name.strip().lower()
        if not sep or name not in SLO_METRICS:
            raise ValueError(f"bad SLO {part!r}: expected NAME:MILLISECONDS with NAME one of {', '.join(SLO_METRICS)}")
        ms = float(value)
        if not ms > 0:
            raise ValueError(f"bad SLO {part!r}: the limit must be > 0 ms")
        slo[name] = ms / 1000.0
    return slo


def meets_slo(rec: RequestRecord, slo: dict[str, float]) -> bool:
    if not rec.ok:
        return False
    for name, limit in slo.items():
        value = rec.tpot if name == "tpot" else getattr(rec, name)
        if name == "tpot" and value is None:  # a one-token reply has no TPOT: nothing to violate
            continue
        if value is None or value > limit:
            return False
    return True


def window(records: list[RequestRecord]) -> float:
    """The measured window: first request sent → last response finished (0 when nothing finished)."""
    ends = [r.sent_at + r.e2e for r in records if r.e2e is not None]
    if not ends:
        return 0.0
    return max(ends) - min(r.sent_at for r in records)


def balance(values: dict[str, float]) -> dict:
    """Load balance over replicas: ``imbalance`` = max / mean − 1 (0 = perfectly even; the
    "percent imbalance" of HPC load balancing), and ``min_over_max``."""
    vals = [float(v) for v in values.values()]
    if not vals:
        return {"replicas": 0, "imbalance": None, "min_over_max": None}
    mean, hi = sum(vals) / len(vals), max(vals)
    return {"replicas": len(vals), "imbalance": (hi / mean - 1.0) if mean > 0 else 0.0,
            "min_over_max": (min(vals) / hi) if hi > 0 else 1.0}


def summarize(records: list[RequestRecord], slo: dict[str, float] | None = None, duration: float | None = None) -> dict:
    """The report of one run (one mode at one load level)."""
    slo = slo or {}
    duration = window(records) if duration is None else duration
    ok = [r for r in records if r.ok]
    graded = [r for r in ok if r.correct is not None]
    errors: dict[str, int] = defaultdict(int)
    for r in records:
        if not r.ok:
            errors[r.status] += 1
    tokens = [r.completion_tokens for r in ok if r.completion_tokens is not None]
    good = [r for r in ok if meets_slo(r, slo)]
    per = lambda n: (n / duration) if duration > 0 else None  # noqa: E731
    by_route: dict[str, list[RequestRecord]] = defaultdict(list)
    for r in ok:
        by_route[r.route or "unknown"].append(r)
    replicas: dict[str, dict[str, dict]] = defaultdict(dict)
    for r in ok:
        if r.replica is None:
            continue
        slot = replicas[r.route or "unknown"].setdefault(r.replica, {"requests": 0, "tokens": 0, "predicted_tokens": 0.0})
        slot["requests"] += 1
        slot["tokens"] += r.completion_tokens or 0
        slot["predicted_tokens"] += r.predicted_tokens or 0.0
    return {
        "requests": len(records),
        "completed": len(ok),
        "errors": len(records) - len(ok),
        "error_rate": (len(records) - len(ok)) / len(records) if records else 0.0,
        "errors_by_status": dict(sorted(errors.items())),
        "accuracy": (sum(r.correct for r in graded) / len(graded)) if graded else None,
        "duration_s": duration,
        "throughput_rps": per(len(ok)),
        "token_throughput_tps": per(sum(tokens)),
        "goodput_rps": per(len(good)),
        "correct_goodput_rps": per(sum(1 for r in good if r.correct)),
        "slo_attainment": (len(good) / len(records)) if records else None,
        "slo": {k: v * 1000.0 for k, v in slo.items()},
        "mean_tokens": (sum(tokens) / len(tokens)) if tokens else None,
        "mean_probe_tokens": _mean([r.probe_tokens for r in ok if r.probe_tokens is not None]),
        "early_exits": sum(1 for r in ok if r.exited_at is not None),
        "total_tokens": sum(tokens),
        "mean_reasoning_tokens": _mean([r.reasoning_tokens for r in ok]),
        "tokens_from_usage": all(r.tokens_from_usage for r in ok) if ok else None,
        "ttft_s": percentiles(r.ttft for r in ok),
        "tpot_s": percentiles(r.tpot for r in ok),
        "itl_s": percentiles(gap for r in ok for gap in r.itls),
        "e2e_s": percentiles(r.e2e for r in ok),
        "routes": {route: {"requests": len(rs), "fraction": len(rs) / len(ok), "mean_tokens": _mean([r.completion_tokens for r in rs]),
                           "accuracy": _mean([float(r.correct) for r in rs if r.correct is not None])}
                   for route, rs in sorted(by_route.items())},
        "reasons": _counts(r.reason for r in ok),
        "switched": sum(1 for r in ok if r.switched),
        "replicas": {route: {"by_replica": reps, "predicted_token_balance": balance({k: v["predicted_tokens"] for k, v in reps.items()}),
                             "token_balance": balance({k: v["tokens"] for k, v in reps.items()}),
                             "request_balance": balance({k: v["requests"] for k, v in reps.items()})}
                     for route, reps in sorted(replicas.items())},
    }


def headline(summary: dict) -> dict:
    """The fields ``--compare`` reports per mode."""
    return {
        "requests": summary["requests"],
        "errors": summary["errors"],
        "accuracy": summary["accuracy"],
        "mean_tokens": summary["mean_tokens"],
        "mean_probe_tokens": summary["mean_probe_tokens"],
        "p50_e2e_s": summary["e2e_s"]["p50"],
        "p99_e2e_s": summary["e2e_s"]["p99"],
        "p50_ttft_s": summary["ttft_s"]["p50"],
        "throughput_rps": summary["throughput_rps"],
        "goodput_rps": summary["goodput_rps"],
    }


def ratios(routed: dict, baseline: dict) -> dict:
    """routed / baseline for tokens, p50 and p99 end-to-end latency, throughput and goodput
    (< 1 is better for tokens and latency, > 1 for throughput and goodput), plus the accuracy gap
    in points."""
    def div(a, b):
        return (a / b) if a is not None and b not in (None, 0) else None

    acc = None
    if routed["accuracy"] is not None and baseline["accuracy"] is not None:
        acc = 100.0 * (routed["accuracy"] - baseline["accuracy"])
    return {
        "tokens": div(routed["mean_tokens"], baseline["mean_tokens"]),
        "token_reduction": div(baseline["mean_tokens"], routed["mean_tokens"]),
        "p50_e2e": div(routed["p50_e2e_s"], baseline["p50_e2e_s"]),
        "p99_e2e": div(routed["p99_e2e_s"], baseline["p99_e2e_s"]),
        "throughput": div(routed["throughput_rps"], baseline["throughput_rps"]),
        "goodput": div(routed["goodput_rps"], baseline["goodput_rps"]),
        "accuracy_points": acc,
    }


def tokens_saved(routed: list[RequestRecord], slow: list[RequestRecord]) -> dict:
    """Tokens the routed run saved against the always-slow cost of the same questions (matched
    by workload index; requests that failed in either run are left out)."""
    cost = {r.index: r.completion_tokens for r in slow if r.ok and r.completion_tokens is not None}
    pairs = [(r.completion_tokens, cost[r.index]) for r in routed if r.ok and r.completion_tokens is not None and r.index in cost]
    got, base = sum(p[0] for p in pairs), sum(p[1] for p in pairs)
    return {"matched": len(pairs), "routed_tokens": got, "slow_tokens": base, "saved_tokens": base - got,
            "saved_fraction": ((base - got) / base) if base else None}


def _mean(values) -> float | None:
    vals = [v for v in values if v is not None]
    return (sum(vals) / len(vals)) if vals else None


def _counts(values) -> dict[str, int]:
    out: dict[str, int] = defaultdict(int)
    for v in values:
        if v is not None:
            out[v] += 1
    return dict(sorted(out.items()))
