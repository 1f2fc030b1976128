"""Drive a running service with a workload and collect per-request records.

A *workload* is the dataset's questions in a fixed order plus, for the open loop, seeded
arrival times; every mode of ``--compare`` and every repeat replays the same workload, so the
modes differ only in routing. Warm-up requests (the questions just after the measured ones) run
before each measured run and are left out of its statistics.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

import httpx
import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from tqdm import tqdm

from loadtests.client import check_mode, discover_model, request_body, send
from loadtests.stats import RequestRecord, headline, parse_slo, ratios, summarize, tokens_saved, window
from serve_app.core.datasets import read_dataset
from serve_app.core.grading import GraderName
from serve_app.reports import machine


class LoadConfig(BaseModel):
    """One load test; also the schema of a ``loadtests/scenarios/*.yaml`` file."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(None, description="scenario name (reports and plots)")
    description: str | None = None
    url: str = Field("http://127.0.0.1:8000", description="base URL of the service (no /v1)")
    model: str | None = Field(None, description="model id; None = the first one GET /v1/models lists")
    dataset: str = Field(..., description="JSONL, JSON or Parquet with a question and an answer per row (docs/data.md)")
    question_field: str | None = Field(None, description="the data set's question column (None = detected)")
    answer_field: str | None = Field(None, description="the data set's answer column (None = detected)")
    grader: GraderName = Field("number", description="how replies are graded (loadtests.client.grade)")
    shuffle_seed: int | None = Field(None, description="shuffle the questions with this seed (None = file order)")
    pattern: Literal["poisson", "closed"] = "closed"
    rate: float | None = Field(None, gt=0, description="open loop: mean arrivals per second")
    burstiness: float = Field(1.0, gt=0, description="open loop: gamma shape of the inter-arrival times (1 = Poisson, < 1 burstier)")
    concurrency: int | None = Field(None, ge=1, description="closed loop: requests in flight")
    sweep: list[float] | None = Field(None, description="rates (poisson) or concurrencies (closed) to run in turn; the first is the headline")
    num_requests: int = Field(100, ge=1, description="measured requests per run (the dataset is cycled if shorter)")
    duration: float | None = Field(None, gt=0, description="stop sending after this many seconds of a run")
    warmup: int = Field(4, ge=0, description="requests run before each measured run and left out of it")
    modes: list[str] = Field(["auto"], min_length=1, description="routing modes (auto, fast, slow) or peer policies (budget:B, dynasor, "
                                                                  "deer) to run side by side")
    repeats: int = Field(1, ge=1, description="rounds of all modes, interleaved (auto, slow, auto, slow, ...); records are pooled")
    max_tokens: int | None = Field(None, ge=1, description="max_tokens per request (None = the server's default)")
    temperature: float = Field(0.0, ge=0)
    timeout: float = Field(300.0, gt=0, description="seconds before a request counts as a timeout")
    slo: str | None = Field("ttft:2000,e2e:10000", description="goodput SLOs, NAME:MS,... with NAME in ttft, tpot, e2e")
    seed: int = Field(0, description="seed of the open-loop arrival times")
    serve_config: str | None = Field(None, description="serve config the scenario deploys with --launch")
    out: str | None = Field(None, description="JSON report path (a PNG is written beside it)")

    @field_validator("modes")
    @classmethod
    def _modes(cls, v: list[str]) -> list[str]:
        return [check_mode(m) for m in v]

    @field_validator("slo")
    @classmethod
    def _slo(cls, v: str | None) -> str | None:
        parse_slo(v)
        return v

    @model_validator(mode="after")
    def _pattern(self) -> "LoadConfig":
        if len(set(self.modes)) != len(self.modes):
            raise ValueError(f"modes repeat: {self.modes}")
        if self.sweep is not None:
            if not self.sweep or any(x <= 0 for x in self.sweep):
                raise ValueError("sweep must list positive rates or concurrencies")
            if self.pattern == "closed" and any(float(x) != int(x) for x in self.sweep):
                raise ValueError("a closed-loop sweep lists whole concurrencies")
        elif self.pattern == "poisson" and self.rate is None:
            raise ValueError("the poisson pattern needs rate (or sweep)")
        elif self.pattern == "closed" and self.concurrency is None:
            raise ValueError("the closed pattern needs concurrency (or sweep)")
        return self

    @property
    def levels(self) -> list[float]:
        if self.sweep is not None:
            return [float(x) for x in self.sweep]
        return [float(self.rate if self.pattern == "poisson" else self.concurrency)]

    @property
    def level_name(self) -> str:
        return "rate_rps" if self.pattern == "poisson" else "concurrency"


def load_scenario(path: str | Path, **overrides) -> LoadConfig:
    """A scenario file, with the options given on the command line on top (an override of None
    removes the scenario's value, e.g. its concurrency when the command line asks for a rate)."""
    data = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a scenario is a mapping of LoadConfig fields")
    data.setdefault("name", Path(path).stem)
    merged = {**data, **overrides}
    return LoadConfig(**{k: v for k, v in merged.items() if v is not None})


def load_questions(cfg: LoadConfig) -> list[dict]:
    rows = read_dataset(cfg.dataset, cfg.question_field, cfg.answer_field)
    if not rows:
        raise ValueError(f"{cfg.dataset} holds no questions")
    if cfg.shuffle_seed is not None:
        random.Random(cfg.shuffle_seed).shuffle(rows)
    return rows


def arrival_times(n: int, rate: float, burstiness: float, seed: int) -> list[float]:
    """Open-loop send times (s): gamma inter-arrivals with mean 1/rate and shape ``burstiness``
    (1 = Poisson; smaller = burstier, as in vLLM's benchmark)."""
    rng = np.random.default_rng(seed)
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=n)
    return np.concatenate([[0.0], np.cumsum(gaps[:-1])]).tolist() if n else []


class _Run:
    """One measured run: one mode at one load level."""

    def __init__(self, cfg: LoadConfig, client: httpx.AsyncClient, model: str, questions: list[dict], mode: str, level: float, label: str,
                 progress: bool = True):
        self.cfg, self.client, self.model, self.questions, self.mode, self.level = cfg, client, model, questions, mode, level
        self.label, self.progress = label, progress

    def _record(self, i: int) -> RequestRecord:
        row = self.questions[i % len(self.questions)]
        return RequestRecord(index=i, question=row["question"], answer=str(row["answer"]), mode=self.mode)

    async def _one(self, rec: RequestRecord, t0: float) -> RequestRecord:
        rec.sent_at = time.perf_counter() - t0
        body = request_body(self.model, rec.question, self.mode, self.cfg.max_tokens, self.cfg.temperature)
        return await send(self.client, self.cfg.url, body, rec, self.cfg.timeout, self.cfg.grader)

    async def warm(self) -> None:
        n = self.cfg.warmup
        if n:
            recs = [self._record(self.cfg.num_requests + i) for i in range(n)]
            t0 = time.perf_counter()
            await asyncio.gather(*(self._one(r, t0) for r in recs))

    async def measure(self) -> list[RequestRecord]:
        cfg, n = self.cfg, self.cfg.num_requests
        bar = tqdm(total=n, desc=self.label, unit="req", leave=False, dynamic_ncols=True, disable=not self.progress)
        records: list[RequestRecord] = []
        t0 = time.perf_counter()
        deadline = None if cfg.duration is None else t0 + cfg.duration

        async def tracked(rec: RequestRecord) -> None:
            await self._one(rec, t0)
            records.append(rec)
            bar.update()

        try:
            if cfg.pattern == "closed":
                it = iter(range(n))

                async def worker() -> None:
                    for i in it:
                        if deadline is not None and time.perf_counter() >= deadline:
                            return
                        await tracked(self._record(i))

                await asyncio.gather(*(worker() for _ in range(int(self.level))))
            else:
                tasks = []
                for i, at in enumerate(arrival_times(n, self.level, cfg.burstiness, cfg.seed)):
                    delay = t0 + at - time.perf_counter()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    if deadline is not None and time.perf_counter() >= deadline:
                        break
                    tasks.append(asyncio.create_task(tracked(self._record(i))))
                await asyncio.gather(*tasks)
        finally:
            bar.close()
        return sorted(records, key=lambda r: r.index)


API_KEY_ENV = "KVSWITCH_API_KEY"


def auth_headers() -> dict[str, str]:
    """``Authorization: Bearer $KVSWITCH_API_KEY`` when that variable is set (for a service with API
    keys). The key is read from the environment only, so it never lands in a scenario or report."""
    key = os.environ.get(API_KEY_ENV, "").strip()
    return {"Authorization": f"Bearer {key}"} if key else {}


async def run_load(cfg: LoadConfig, progress: bool = True, transport: httpx.AsyncBaseTransport | None = None) -> dict:
    """Every (level, repeat, mode) run, then the report (see ``build_report``). ``transport``
    replaces the network (tests)."""
    questions = load_questions(cfg)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(limits=limits, timeout=cfg.timeout, transport=transport, headers=auth_headers()) as client:
        model = cfg.model or await discover_model(client, cfg.url)
        runs: list[dict] = []
        for level in cfg.levels:
            pooled: dict[str, list[RequestRecord]] = {m: [] for m in cfg.modes}
            durations: dict[str, float] = {m: 0.0 for m in cfg.modes}
            for rnd in range(cfg.repeats):
                for mode in cfg.modes:
                    label = f"{mode} @ {cfg.level_name}={level:g}" + (f" round {rnd + 1}/{cfg.repeats}" if cfg.repeats > 1 else "")
                    run = _Run(cfg, client, model, questions, mode, level, label, progress)
                    await run.warm()
                    recs = await run.measure()
                    span = window(recs)
                    pooled[mode].extend(recs)
                    durations[mode] += span
                    if progress:
                        s = summarize(recs, parse_slo(cfg.slo), span)
                        tqdm.write(f"{label}: {s['completed']}/{s['requests']} ok, accuracy {_fmt(s['accuracy'])}, "
                                   f"mean tokens {_fmt(s['mean_tokens'], 1)}, p50 e2e {_fmt(s['e2e_s']['p50'])} s, "
                                   f"{_fmt(s['throughput_rps'])} req/s")
            for mode in cfg.modes:
                runs.append({"mode": mode, "level": level, "records": pooled[mode], "duration_s": durations[mode]})
    return build_report(cfg, model, runs)


def build_report(cfg: LoadConfig, model: str, runs: list[dict]) -> dict:
    """``levels``: every level's per-mode summaries, ratios (mode / slow) and tokens saved;
    ``modes`` and ``ratios`` at top level: the headline (first) level."""
    slo = parse_slo(cfg.slo)
    levels = []
    for level in cfg.levels:
        at = {r["mode"]: r for r in runs if r["level"] == level}
        summaries = {m: summarize(r["records"], slo, r["duration_s"]) for m, r in at.items()}
        entry: dict = {cfg.level_name: level, "summaries": summaries, "modes": {m: headline(s) for m, s in summaries.items()}}
        if "slow" in at:
            entry["ratios_vs_slow"] = {m: ratios(entry["modes"][m], entry["modes"]["slow"]) for m in at if m != "slow"}
            entry["tokens_saved_vs_slow"] = {m: tokens_saved(at[m]["records"], at["slow"]["records"]) for m in at if m != "slow"}
        entry["records"] = {m: [rec.to_json() for rec in r["records"]] for m, r in at.items()}
        levels.append(entry)
    first = levels[0]
    return {
        "name": cfg.name,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": cfg.model_dump(),
        "model": model,
        "machine": machine(),
        "level_name": cfg.level_name,
        "modes": first["modes"],
        "ratios": first.get("ratios_vs_slow", {}),
        "tokens_saved": first.get("tokens_saved_vs_slow", {}),
        "replica_balance": {m: s["replicas"] for m, s in first["summaries"].items()},
        "levels": levels,
    }


def _fmt(v, digits: int = 3) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"
