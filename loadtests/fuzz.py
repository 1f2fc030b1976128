"""``kvswitch fuzz``: schemathesis against the running service's own OpenAPI schema.

Every operation of ``GET /openapi.json`` gets ``--examples`` generated requests per generation
mode: *positive* (bodies that fit the schema) and *negative* (bodies that break it: wrong types,
missing fields, out-of-range numbers). A second, *deep* pass pins ``model`` to the served model so
positive cases get past the model check and reach tokenisation, routing and generation. Every
case must answer below 500 within ``--timeout`` seconds; the report counts cases, statuses,
server errors (with a curl command to replay each) and hangs.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Any

import httpx
from pydantic import BaseModel, ConfigDict, Field

from loadtests.runner import auth_headers


class FuzzConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str = Field("http://127.0.0.1:8000", description="base URL of the service (no /v1)")
    examples: int = Field(50, ge=1, description="generated cases per operation, generation mode and pass")
    timeout: float = Field(60.0, gt=0, description="seconds after which a case counts as a hang")
    deep: bool = Field(True, description="also fuzz with model pinned to the served model")
    seed: int = 0
    out: str | None = None


def _pin_model(schema: dict, model: str) -> dict:
    """A copy of ``schema`` whose request bodies' ``model`` property only takes ``model``."""
    pinned = copy.deepcopy(schema)
    for component in pinned.get("components", {}).get("schemas", {}).values():
        props = component.get("properties", {})
        if "model" in props and "model" in component.get("required", []):
            props["model"] = {"type": "string", "enum": [model], "title": props["model"].get("title", "Model")}
    return pinned


def _served_model(client: httpx.Client, url: str) -> str:
    r = client.get(f"{url}/v1/models")
    r.raise_for_status()
    return r.json()["data"][0]["id"]


def _fuzz_schema(raw: dict, cfg: FuzzConfig, label: str, headers: dict, results: dict) -> None:
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, seed, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode

    schema = schemathesis.openapi.from_dict(raw)
    for result in schema.get_all_operations():
        op = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            key = f"{label} {mode.value} {op.method.upper()} {op.path}"
            tally = results["operations"].setdefault(key, {"cases": 0, "statuses": {}})

            @seed(cfg.seed)
            @settings(max_examples=cfg.examples, deadline=None, database=None, phases=[Phase.explicit, Phase.generate],
                      suppress_health_check=list(HealthCheck))
            @given(case=op.as_strategy(generation_mode=mode))
            def run(case) -> None:
                started = time.perf_counter()
                try:
                    resp = case.call(base_url=cfg.url, headers=headers, timeout=cfg.timeout)
                    status = str(resp.status_code)
                except Exception as exc:  # noqa: BLE001 — requests' timeouts and dropped connections are findings
                    timed_out = "timeout" in type(exc).__name__.lower() or "timed out" in str(exc).lower()
                    status = "hang" if timed_out else f"connection:{type(exc).__name__}"
                    resp = None
                elapsed = time.perf_counter() - started
                tally["cases"] += 1
                tally["statuses"][status] = tally["statuses"].get(status, 0) + 1
                results["cases"] += 1
                results["slowest_s"] = max(results["slowest_s"], elapsed)
                bad = status == "hang" or status.startswith("connection") or (status.isdigit() and int(status) >= 500)
                if bad and len(results["failures"]) < 50:
                    results["failures"].append({"operation": key, "status": status, "elapsed_s": round(elapsed, 2),
                                                "body": None if resp is None else resp.text[:500],
                                                "curl": case.as_curl_command(headers={"Authorization": "Bearer $KVSWITCH_API_KEY"}
                                                                             if headers else None, base_url=cfg.url)})

            try:
                run()
            except Unsatisfiable:  # e.g. no invalid request exists for GET /health: nothing to send
                tally["unsatisfiable"] = True


def run_fuzz(cfg: FuzzConfig, progress: bool = True) -> dict:
    headers = auth_headers()
    with httpx.Client(timeout=30, headers=headers) as client:
        resp = client.get(f"{cfg.url}/openapi.json")
        resp.raise_for_status()
        raw = resp.json()
        model = _served_model(client, cfg.url) if cfg.deep else None
    results: dict[str, Any] = {"cases": 0, "slowest_s": 0.0, "failures": [], "operations": {}}
    started = time.perf_counter()
    passes = [("schema", raw)] + ([("deep", _pin_model(raw, model))] if model else [])
    for label, schema in passes:
        if progress:
            print(f"fuzz: {label} pass, {cfg.examples} cases per operation and mode", flush=True)
        _fuzz_schema(schema, cfg, label, headers, results)
    statuses: dict[str, int] = {}
    for op in results["operations"].values():
        for status, n in op["statuses"].items():
            statuses[status] = statuses.get(status, 0) + n
    server_errors = sum(n for s, n in statuses.items() if s.isdigit() and int(s) >= 500)
    hangs = statuses.get("hang", 0)
    dropped = sum(n for s, n in statuses.items() if s.startswith("connection"))
    return {"url": cfg.url, "cases": results["cases"], "server_errors": server_errors, "hangs": hangs, "dropped_connections": dropped,
            "statuses": dict(sorted(statuses.items())), "slowest_s": round(results["slowest_s"], 2),
            "elapsed_s": round(time.perf_counter() - started, 1), "operations": results["operations"], "failures": results["failures"],
            "config": cfg.model_dump()}


def format_fuzz(report: dict) -> str:
    lines = [f"fuzz: {report['cases']} cases in {report['elapsed_s']} s: {report['server_errors']} server errors (5xx), "
             f"{report['hangs']} hangs, {report['dropped_connections']} dropped connections; slowest case {report['slowest_s']} s",
             f"  statuses: {report['statuses']}"]
    for key, op in report["operations"].items():
        lines.append(f"  {key}: {op['cases']} cases {op['statuses']}")
    for f in report["failures"][:10]:
        lines.append(f"  FAILURE {f['operation']} -> {f['status']}: {f['curl']}")
    return "\n".join(lines)


def add_parser(sub) -> None:
    p = sub.add_parser("fuzz", help="fuzz the running service's OpenAPI schema with schemathesis: counts cases, 5xx and hangs")
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--examples", type=int, default=50, help="cases per operation, generation mode and pass (default 50)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds after which a case counts as a hang")
    p.add_argument("--no-deep", action="store_true", help="skip the pass with model pinned to the served model")
    p.add_argument("--out", help="JSON report")
    p.set_defaults(func=_cli)


def _cli(args) -> int:
    cfg = FuzzConfig(url=args.url, examples=args.examples, timeout=args.timeout, deep=not args.no_deep, out=args.out)
    report = run_fuzz(cfg)
    print(format_fuzz(report))
    if cfg.out:
        Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.out).write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {cfg.out}")
    return 0 if not (report["server_errors"] or report["hangs"] or report["dropped_connections"]) else 1
