"""``kvswitch chaos``: a closed-loop load run while replicas of the running service are killed.

Replicas are Ray actors named ``SERVE_REPLICA::<app>#<deployment>#<id>``; each kill is
``ray.kill(actor, no_restart=True)`` on one of them (a crash as far as Serve can tell: it
replaces the replica). Kills fire when given fractions of the requests have finished. Every
request then ends in one of:

- ``correct`` / ``wrong``: a complete reply, graded against the dataset's answer;
- ``clear_error``: an OpenAI-style JSON error (HTTP status or SSE error event) with a message;
- ``hang``: no complete reply within ``--timeout``;
- ``unclear``: anything else (a dropped connection, a stream cut without an error, a bare 500).

With ``baseline`` (the default) the same requests first run without kills; a wrong answer counts
against the service only if the unfaulted run answered that request correctly (``corrupted``);
the others are the model's own mistakes. A request the prefill fallback sent to another pool than
the unfaulted run's route gets the model's answer on that route: if it is wrong where the unfaulted
one was right, it is counted apart (``rerouted_wrong``), not as corrupted. The service holds up when nothing hangs, nothing is
unclear and nothing is corrupted. The report also
counts requests kvswitch retried on another replica, requests routed by the prefill fallback, and
how long Serve took to bring each killed deployment back to its replica count.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from pathlib import Path

import httpx
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator
from tqdm import tqdm

from loadtests.client import add_data_arguments, discover_model, request_body, send, send_plain
from loadtests.runner import auth_headers, machine
from loadtests.stats import RequestRecord
from serve_app.core.datasets import read_dataset
from serve_app.core.grading import GraderName


class ChaosConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str = Field("http://127.0.0.1:8000", description="base URL of the service (no /v1)")
    app: str = Field("kvswitch", description="Serve application name (serve_config.yaml's applications[].name)")
    model: str | None = None
    dataset: str = Field(..., description="JSONL, JSON or Parquet with a question and an answer per row (docs/data.md)")
    question_field: str | None = Field(None, description="the data set's question column (None = detected)")
    answer_field: str | None = Field(None, description="the data set's answer column (None = detected)")
    grader: GraderName = Field("number", description="how replies are graded (loadtests.client.grade)")
    num_requests: int = Field(300, ge=1)
    concurrency: int = Field(16, ge=1)
    mode: str = Field("auto", description="auto, fast or slow")
    stream: bool = Field(True, description="stream the replies (the loadtest client); a kill then hits streams already under way")
    kill: list[str] = Field(["prefill", "fast", "slow"], description="deployments to kill one replica of, in order")
    kill_at: list[float] | None = Field(None, description="fraction of finished requests at which each kill fires "
                                                          "(default: spread over the first 70%)")
    timeout: float = Field(180.0, gt=0, description="seconds after which a request counts as a hang")
    recover_timeout: float = Field(120.0, gt=0, description="seconds to wait for Serve to replace every killed replica")
    baseline: bool = Field(True, description="first run the same requests without kills, so wrong answers the model also gives "
                                             "unfaulted are told apart from answers the faults changed")
    seed: int = 0
    out: str | None = None

    @model_validator(mode="after")
    def _schedule(self) -> "ChaosConfig":
        if self.kill_at is None:
            n = len(self.kill)
            self.kill_at = [round(0.1 + 0.6 * i / max(n - 1, 1), 3) for i in range(n)] if n > 1 else [0.3] * n
        if len(self.kill_at) != len(self.kill) or any(not 0 <= f < 1 for f in self.kill_at):
            raise ValueError("kill_at needs one fraction in [0, 1) per entry of kill")
        return self


def outcome(rec: RequestRecord) -> str:
    if rec.ok:
        return "correct" if rec.correct else "wrong"
    if rec.status == "timeout":
        return "hang"
    if rec.error_type and rec.error:
        return "clear_error"
    return "unclear"


def replicas(app: str, deployment: str) -> list[dict]:
    import ray

    prefix = f"SERVE_REPLICA::{app}#{deployment}#"
    return [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)]


def kill_replica(app: str, deployment: str, rng: random.Random) -> str:
    """Kill one running replica of ``app``'s ``deployment``; returns its actor name."""
    import ray

    found = replicas(app, deployment)
    if not found:
        raise RuntimeError(f"no replica of {app}/{deployment} to kill (is the app named {app!r}?)")
    victim = rng.choice(sorted(found, key=lambda a: a["name"]))
    ray.kill(ray.get_actor(victim["name"], namespace=victim["namespace"]), no_restart=True)
    return victim["name"]


def running(app: str, deployment: str) -> int:
    from ray import serve

    status = serve.status().applications.get(app)
    dep = status.deployments.get(deployment) if status else None
    return dep.replica_states.get("RUNNING", 0) if dep else 0


def _recovered(app: str, deployment: str, before: int, victim: str) -> bool:
    alive = [a["name"] for a in replicas(app, deployment)]
    return victim not in alive and len(alive) >= before and running(app, deployment) >= before


async def _watch_recovery(app: str, deployment: str, before: int, victim: str, killed_at: float, limit: float) -> float | None:
    """Seconds until ``deployment`` again runs ``before`` replicas, the killed one no longer among them."""
    while time.perf_counter() - killed_at < limit:
        if await asyncio.to_thread(_recovered, app, deployment, before, victim):
            return round(time.perf_counter() - killed_at, 2)
        await asyncio.sleep(0.25)
    return None


def summarize_chaos(records: list[RequestRecord], kills: list[dict], elapsed: float, baseline: list[RequestRecord] | None = None) -> dict:
    outcomes = [outcome(r) for r in records]
    base = {r.index: outcome(r) for r in baseline} if baseline is not None else None
    base_route = {r.index: r.route for r in baseline} if baseline is not None else {}
    changed = [r for r in records if outcome(r) == "wrong" and (base is None or base.get(r.index) == "correct")]
    # the prefill fallback answers in another pool than the unfaulted run did: that answer is the
    # model's own on the fallback route (reported apart), not one the faults corrupted
    rerouted = [r.index for r in changed if r.fallback is not None and r.index in base_route and r.route != base_route[r.index]]
    corrupted = [r.index for r in changed if r.index not in rerouted]
    counts = {k: outcomes.count(k) for k in ("correct", "wrong", "clear_error", "hang", "unclear")}
    by_status: dict[str, int] = {}
    for r in records:
        if not r.ok:
            key = f"{r.status}:{r.error_code}" if r.error_code else r.status
            by_status[key] = by_status.get(key, 0) + 1
    e2e = [r.e2e for r in records if r.e2e is not None]
    return {
        "requests": len(records),
        **counts,
        "corrupted": len(corrupted),
        "corrupted_requests": corrupted,
        "rerouted_wrong": len(rerouted),
        "rerouted_wrong_requests": rerouted,
        "baseline": None if base is None else {k: list(base.values()).count(k) for k in ("correct", "wrong", "clear_error", "hang", "unclear")},
        "held_up": counts["hang"] == 0 and counts["unclear"] == 0 and not corrupted,
        "errors_by_status": by_status,
        "retried": sum(bool(r.retried) for r in records),
        "resumed": sum(bool(r.resumed) for r in records),
        "cut": by_status.get("stream_error:replica_failed", 0) + sum(1 for r in records if outcome(r) == "unclear" and r.status != "timeout"),
        "fallback": sum(r.fallback is not None for r in records),
        "routes": {k: sum(r.route == k for r in records) for k in ("fast", "slow")},
        "e2e_s": {"p50": float(np.percentile(e2e, 50)) if e2e else None, "p99": float(np.percentile(e2e, 99)) if e2e else None,
                  "max": max(e2e) if e2e else None},
        "elapsed_s": round(elapsed, 2),
        "kills": kills,
        "wrong_answers": [{"index": r.index, "question": r.question, "answer": r.answer, "reply": r.content[-200:], "route": r.route,
                           "reason": r.reason, "retried": r.retried, "fallback": r.fallback} for r in records if outcome(r) == "wrong"],
    }


async def run_chaos(cfg: ChaosConfig, progress: bool = True) -> dict:
    """Drive the service at ``cfg.concurrency`` and kill the configured replicas on schedule (after
    an unfaulted baseline run of the same requests). Needs a Ray driver connected to the service's
    cluster (``ray.init(address=...)``)."""
    rows = read_dataset(cfg.dataset, cfg.question_field, cfg.answer_field)
    if not rows:
        raise ValueError(f"{cfg.dataset} has no questions")
    baseline = None
    if cfg.baseline:
        baseline, _, _ = await _drive(cfg.model_copy(update={"kill": [], "kill_at": []}), rows, progress, "baseline")
    records, kills, elapsed = await _drive(cfg, rows, progress, f"chaos {cfg.mode}")
    report = summarize_chaos(records, kills, elapsed, baseline)
    report["config"] = cfg.model_dump()
    report["machine"] = machine()
    report["records"] = [{"index": r.index, "outcome": outcome(r), "status": r.status, "error_code": r.error_code, "error": r.error,
                          "route": r.route, "retried": r.retried, "resumed": r.resumed, "fallback": r.fallback, "e2e": r.e2e,
                          "sent_at": r.sent_at}
                         for r in records]
    return report


async def _drive(cfg: ChaosConfig, rows: list[dict], progress: bool, label: str) -> tuple[list[RequestRecord], list[dict], float]:
    rng = random.Random(cfg.seed)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    records: list[RequestRecord] = []
    kills: list[dict] = []
    watchers: list[asyncio.Task] = []
    async with httpx.AsyncClient(limits=limits, timeout=cfg.timeout, headers=auth_headers()) as client:
        model = cfg.model or await discover_model(client, cfg.url)
        bar = tqdm(total=cfg.num_requests, desc=label, unit="req", dynamic_ncols=True, disable=not progress)
        t0 = time.perf_counter()
        schedule = sorted(zip(cfg.kill_at, cfg.kill))
        fired = 0
        it = iter(range(cfg.num_requests))

        def fire_due() -> None:
            nonlocal fired
            while fired < len(schedule) and len(records) >= schedule[fired][0] * cfg.num_requests:
                deployment = schedule[fired][1]
                before = running(cfg.app, deployment)
                name = kill_replica(cfg.app, deployment, rng)
                at = time.perf_counter()
                kill = {"deployment": deployment, "replica": name, "at_s": round(at - t0, 2), "after_requests": len(records),
                        "replicas_before": before, "recovered_after_s": None}
                kills.append(kill)
                watchers.append(asyncio.create_task(_record_recovery(cfg, kill, before, at)))
                if progress:
                    tqdm.write(f"killed {name} after {len(records)} requests")
                fired += 1

        async def worker() -> None:
            for i in it:
                row = rows[i % len(rows)]
                rec = RequestRecord(index=i, question=row["question"], answer=str(row["answer"]), mode=cfg.mode)
                rec.sent_at = time.perf_counter() - t0
                body = request_body(model, rec.question, cfg.mode, None)
                if not cfg.stream:
                    body["stream"] = False
                    body.pop("stream_options")
                    await send_plain(client, cfg.url, body, rec, cfg.timeout, cfg.grader)
                else:
                    await send(client, cfg.url, body, rec, cfg.timeout, cfg.grader)
                records.append(rec)
                bar.update()
                fire_due()

        fire_due()
        try:
            await asyncio.gather(*(worker() for _ in range(cfg.concurrency)))
        finally:
            bar.close()
        elapsed = time.perf_counter() - t0
        if watchers:
            await asyncio.gather(*watchers)
    return sorted(records, key=lambda r: r.index), kills, elapsed


async def _record_recovery(cfg: ChaosConfig, kill: dict, before: int, at: float) -> None:
    kill["recovered_after_s"] = await _watch_recovery(cfg.app, kill["deployment"], before, kill["replica"], at, cfg.recover_timeout)


def format_chaos(report: dict) -> str:
    lines = [f"chaos: {report['requests']} requests, {report['elapsed_s']} s",
             f"  correct {report['correct']}, wrong {report['wrong']} (changed by the faults: {report['corrupted']}; "
             f"on the prefill fallback's other route: {report.get('rerouted_wrong', 0)}), "
             f"clear errors {report['clear_error']}, hangs {report['hang']}, unclear {report['unclear']}",
             f"  unfaulted baseline: {report['baseline'] or 'not run'}",
             f"  retried on another replica {report['retried']}, streams resumed on another replica {report.get('resumed', 0)}, "
             f"streams cut {report.get('cut', 0)}, prefill fallback {report['fallback']}, routes {report['routes']}",
             f"  errors by status: {report['errors_by_status'] or '-'}",
             f"  e2e p50 {report['e2e_s']['p50']}, p99 {report['e2e_s']['p99']}, max {report['e2e_s']['max']} s"]
    for k in report["kills"]:
        lines.append(f"  killed {k['replica']} at {k['at_s']} s (after {k['after_requests']} requests); "
                     f"back to {k['replicas_before']} running after {k['recovered_after_s']} s")
    for w in report["wrong_answers"][:5]:
        lines.append(f"  wrong: {w['question']} (answer {w['answer']}) route {w['route']}/{w['reason']}, retried {w['retried']}, "
                     f"fallback {w['fallback']}: ...{w['reply'][-80:]!r}")
    lines.append("  HELD UP: every request got its unfaulted answer or a clear error; none hung" if report["held_up"]
                 else "  NOT HELD UP: see corrupted / hang / unclear")
    return "\n".join(lines)


def add_parser(sub) -> None:
    p = sub.add_parser("chaos", help="load a running service while killing replicas; counts correct answers, clear errors and hangs",
                       description="Run on a machine of the service's Ray cluster (it connects with ray.init(address=...)).")
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--app", default="kvswitch", help="Serve application name")
    p.add_argument("--dataset", required=True, help="JSONL, JSON or Parquet with a question and an answer per row (docs/data.md)")
    add_data_arguments(p)
    p.add_argument("--num-requests", type=int, default=300)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--mode", default="auto", choices=["auto", "fast", "slow"])
    p.add_argument("--no-stream", action="store_true", help="non-streamed requests")
    p.add_argument("--kill", default="prefill,fast,slow", help="comma list of deployments, one replica killed each (router too)")
    p.add_argument("--kill-at", help="comma list of fractions of finished requests, one per --kill entry")
    p.add_argument("--timeout", type=float, default=180.0, help="seconds after which a request counts as a hang")
    p.add_argument("--ray-address", default="auto", help="Ray cluster to connect to (default: the local one)")
    p.add_argument("--no-baseline", action="store_true", help="skip the unfaulted run of the same requests")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="JSON report")
    p.set_defaults(func=_cli)


def check_cluster(cfg: ChaosConfig) -> None:
    """Refuse to kill anything unless the connected Ray cluster is the one serving ``cfg.url``: its
    Serve proxy listens on the URL's port and runs ``cfg.app`` (several local clusters can coexist)."""
    from urllib.parse import urlparse

    from ray import serve
    from ray.serve.context import _get_global_client

    port = urlparse(cfg.url).port or 80
    serve_port = _get_global_client().http_config.port
    if serve_port != port:
        raise RuntimeError(f"the Ray cluster connected to serves HTTP on port {serve_port}, not {cfg.url}'s port {port}: pass "
                           "--ray-address of the cluster that serves the URL")
    apps = serve.status().applications
    if cfg.app not in apps:
        raise RuntimeError(f"no Serve application {cfg.app!r} on this cluster (it has {sorted(apps)}); pass --app")


def _cli(args) -> int:
    import ray

    cfg = ChaosConfig(url=args.url, app=args.app, dataset=args.dataset, num_requests=args.num_requests, concurrency=args.concurrency,
                      mode=args.mode, stream=not args.no_stream, kill=[k for k in args.kill.split(",") if k],
                      kill_at=[float(x) for x in args.kill_at.split(",")] if args.kill_at else None, timeout=args.timeout,
                      baseline=not args.no_baseline, seed=args.seed, out=args.out,
                      **{k: getattr(args, k) for k in ("question_field", "answer_field", "grader") if getattr(args, k) is not None})
    ray.init(address=args.ray_address, log_to_driver=False)
    try:
        check_cluster(cfg)
        report = asyncio.run(run_chaos(cfg))
    except RuntimeError as exc:
        print(f"kvswitch chaos: {exc}")
        return 2
    finally:
        ray.shutdown()
    print(format_chaos(report))
    if cfg.out:
        Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.out).write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {cfg.out}")
    return 0 if report["held_up"] else 1
