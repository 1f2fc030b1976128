"""``kvswitch bench-autoscale``: how soon the slow pool scales up under an easy-heavy burst, with
Ray's request-count policy and with kvswitch's predicted-tokens policy, side by side in one run.

Each serve config is deployed in turn (``serve run``, as ``loadtest --launch``) and sent the same
burst: ``--requests`` questions drawn from ``--dataset`` (``--seed``), spread over ``--ramp`` s. While it runs, the
service's ``GET /v1/kvswitch/status`` is polled: the slow pool's replicas (a replica counts once it
reports its load), running, queued and predicted tokens; and, through the Ray cluster, the replicas
Serve has placed. The figures of merit are the times from the burst's start until Serve decides on a
second slow replica and until it serves."""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from pathlib import Path

import httpx

from serve_app.core.datasets import read_dataset

DEFAULT_CONFIGS = ["loadtests/serve_configs/autoscale-requests.yaml", "loadtests/serve_configs/autoscale-tokens.yaml"]


def load_questions(path: str | Path, n: int, seed: int = 0) -> list[str]:
    """``n`` questions of ``path`` drawn without replacement (seeded): the data files are ordered by
    operator count, so their first lines are all one-operator questions."""
    questions = [row["question"] for row in read_dataset(path)]
    if len(questions) < n:
        raise ValueError(f"{path} has {len(questions)} questions; --requests asks for {n}")
    return random.Random(seed).sample(questions, n)


def slow_replicas_placed(app: str = "kvswitch") -> int | None:
    """The slow pool's replicas that Serve has decided on (starting or running), or None when this
    process is not connected to the service's Ray cluster."""
    import ray
    from ray import serve

    if not ray.is_initialized():
        return None
    dep = serve.status().applications[app].deployments.get("slow")
    return sum(dep.replica_states.get(s, 0) for s in ("STARTING", "RUNNING")) if dep else 0


async def run_burst(url: str, questions: list[str], poll_s: float = 0.25, timeout: float = 600.0, settle_s: float = 0.0,
                    ramp_s: float = 0.0) -> dict:
    """Send the questions (spread evenly over ``ramp_s``; 0: all at once) and poll the status until
    all replies are back. Two times per run: the upscale decision (the slow pool's second replica is
    placed: Serve's status, when connected to the cluster) and the second replica serving (it
    reports its load)."""
    async with httpx.AsyncClient(timeout=timeout) as client:
        model = (await client.get(f"{url}/v1/models")).json()["data"][0]["id"]
        timeline: list[dict] = []
        start = time.perf_counter()

        async def one(i: int, q: str) -> dict:
            await asyncio.sleep(ramp_s * i / max(len(questions), 1))
            r = await client.post(f"{url}/v1/chat/completions", json={"model": model, "messages": [{"role": "user", "content": q}]})
            body = r.json()
            return {"status": r.status_code, "route": (body.get("kvswitch") or {}).get("route"),
                    "tokens": (body.get("usage") or {}).get("completion_tokens"), "e2e_s": time.perf_counter() - start}

        tasks = [asyncio.create_task(one(i, q)) for i, q in enumerate(questions)]
        while not all(t.done() for t in tasks) or time.perf_counter() - start < settle_s:
            try:
                slow = (await client.get(f"{url}/v1/kvswitch/status", timeout=10)).json()["pools"]["slow"]
                placed = await asyncio.to_thread(slow_replicas_placed)
                timeline.append({"t": round(time.perf_counter() - start, 3), "placed": placed,
                                 **{k: slow[k] for k in ("replicas", "running", "queued", "predicted_tokens")}})
            except (httpx.HTTPError, KeyError, ValueError):
                pass
            await asyncio.sleep(poll_s)
        replies = [t.result() for t in tasks]
    reached = next((p["t"] for p in timeline if p["replicas"] >= 2), None)
    decided = next((p["t"] for p in timeline if (p["placed"] or 0) >= 2), None)
    e2e = sorted(r["e2e_s"] for r in replies)
    return {"time_to_upscale_decision_s": decided, "time_to_2_replicas_s": reached, "burst_s": round(e2e[-1], 3),
            "median_e2e_s": round(e2e[len(e2e) // 2], 3), "requests": len(replies), "errors": sum(r["status"] != 200 for r in replies),
            "routed_slow": sum(r["route"] == "slow" for r in replies),
            "max_slow_replicas": max((p["replicas"] for p in timeline), default=0), "timeline": timeline}


def run_bench(configs: list[str], dataset: str, requests: int, out: str | None, settle_s: float, seed: int = 0,
              ramp_s: float = 0.0) -> dict:
    import ray

    from loadtests.launch import config_url, launched

    questions = load_questions(dataset, requests, seed)
    runs = {}
    for config in configs:
        name = Path(config).stem
        log = Path(out).with_name(f"{Path(out).stem}.{name}.serve.log") if out else None
        with launched(config, log) as url:
            ray.init(address="auto", log_to_driver=False)
            try:
                print(f"{name}: {requests} requests over {ramp_s:g} s ...", file=sys.stderr, flush=True)
                runs[name] = {"serve_config": config, **asyncio.run(run_burst(url or config_url(config), questions, settle_s=settle_s,
                                                                              ramp_s=ramp_s))}
            finally:
                from ray.serve.context import _set_global_client

                _set_global_client(None)  # the next config runs on a new cluster: forget this one's controller
                ray.shutdown()
    return {"dataset": dataset, "requests": requests, "seed": seed, "ramp_s": ramp_s, "runs": runs}


def format_bench(report: dict) -> str:
    def secs(v):
        return "never" if v is None else f"{v:.2f} s"

    lines = [f"{'config':<22} {'upscale decided':>16} {'2 serving':>10} {'burst':>8} {'median e2e':>11} {'slow':>5} {'errors':>7}"]
    for name, r in report["runs"].items():
        lines.append(f"{name:<22} {secs(r['time_to_upscale_decision_s']):>16} {secs(r['time_to_2_replicas_s']):>10} "
                     f"{r['burst_s']:>7.1f}s {r['median_e2e_s']:>10.1f}s {r['routed_slow']:>5} {r['errors']:>7}")
    return "\n".join(lines)


def plot_bench(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    for name, r in report["runs"].items():
        t = [p["t"] for p in r["timeline"]]
        top.step(t, [p["replicas"] for p in r["timeline"]], where="post", label=f"{name}: serving")
        top.step(t, [p["placed"] or 0 for p in r["timeline"]], where="post", linestyle=":", label=f"{name}: placed")
        bottom.plot(t, [p["predicted_tokens"] for p in r["timeline"]], label=name)
    top.set_ylabel("slow replicas")
    top.set_title(f"Slow pool under {report['requests']} requests over {report.get('ramp_s', 0):g} s")
    top.legend()
    bottom.set_ylabel("predicted outstanding slow tokens")
    bottom.set_xlabel("seconds since the burst started")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def add_parser(sub) -> None:
    p = sub.add_parser("bench-autoscale", help="time for the slow pool to reach 2 replicas under an easy-heavy burst: "
                                               "request-count vs predicted-tokens autoscaling, side by side")
    p.add_argument("--configs", default=",".join(DEFAULT_CONFIGS), help="comma list of serve configs to deploy in turn")
    p.add_argument("--dataset", default="data/dev-mix70-600-seed5050.jsonl", help="JSONL, JSON or Parquet with a question per row (docs/data.md)")
    p.add_argument("--requests", type=int, default=48, help="requests in the burst, drawn from --dataset")
    p.add_argument("--seed", type=int, default=0, help="seed of the draw")
    p.add_argument("--ramp", type=float, default=0.0, help="spread the requests evenly over this many seconds (0: all at once)")
    p.add_argument("--settle", type=float, default=0.0, help="keep polling at least this long after the burst starts (s)")
    p.add_argument("--out", help="JSON report; a PNG goes beside it")
    p.set_defaults(func=_cmd)


def _cmd(args: argparse.Namespace) -> int:
    from serve_app.reports import write_json

    try:
        report = run_bench([c.strip() for c in args.configs.split(",") if c.strip()], args.dataset, args.requests, args.out, args.settle, args.seed,
                            args.ramp)
    except (ValueError, RuntimeError, OSError) as exc:
        print(f"kvswitch bench-autoscale: {exc}", file=sys.stderr)
        return 1
    report = {"command": getattr(args, "command_line", None), **report}
    print(format_bench(report))
    if args.out:
        path = write_json(report, args.out, indent=1)
        plot_bench(report, path.with_suffix(".png"))
        print(f"wrote {path} and {path.with_suffix('.png')}")
    return 0
