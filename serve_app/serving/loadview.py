"""One load view for every router replica, as pure code (no Ray).

Each router replica counts what it has sent to each pool (its leases, ``serving.lease``); each
pool replica knows what it runs and queues (``EngineStats``). A router alone sees only its own
share, so two router replicas under the same load would each see half of it and decide
differently. ``LoadBook`` (kept by one ``LoadBoard`` deployment) collects both kinds of report and
answers with their sum over live reporters; ``combined`` is a router's side of it: the others'
load from the last exchange plus its own load now, so its own requests count at once. Routers also
hand in their last decisions (which pools they count as saturated), so any router replica can show
whether all of them agree."""

from __future__ import annotations

from dataclasses import dataclass, field

from pydantic import BaseModel

from serve_app.core.policy import PolicyConfig, PoolLoad, slow_saturated

POOLS = ("prefill", "fast", "slow")


class PoolView(BaseModel):
    """A pool's load as its own replicas report it."""

    replicas: int = 0
    running: int = 0
    queued: int = 0
    predicted_tokens: float = 0.0


class BoardSnapshot(BaseModel):
    """What the board knows: the pools' own reports and the routers' in-flight sums (live reporters only)."""

    pools: dict[str, PoolView]
    routers: dict[str, PoolLoad]
    """Sum over router replicas of the requests each has in flight per pool (queued in Ray included)."""
    router_replicas: int = 0
    decisions: dict[str, dict[str, bool]] = {}
    """Each live router replica's last decision per pool (saturated or not), as of its last exchange."""


@dataclass
class LoadBook:
    """The board's state. A reporter that stayed silent for ``stale_s`` (a dead replica) is dropped."""

    stale_s: float = 3.0
    pool_reports: dict[tuple[str, str], tuple[float, PoolView]] = field(default_factory=dict)
    router_reports: dict[str, tuple[float, dict[str, PoolLoad], dict[str, bool]]] = field(default_factory=dict)

    def report_pool(self, pool: str, replica: str, stats: dict, now: float) -> None:
        self.pool_reports[(pool, replica)] = (now, PoolView(replicas=1, **stats))

    def report_router(self, router: str, loads: dict[str, dict], now: float, decisions: dict[str, bool] | None = None) -> None:
        self.router_reports[router] = (now, {p: PoolLoad(**v) for p, v in loads.items()}, dict(decisions or {}))

    def forget(self, now: float) -> None:
        self.pool_reports = {k: v for k, v in self.pool_reports.items() if now - v[0] < self.stale_s}
        self.router_reports = {k: v for k, v in self.router_reports.items() if now - v[0] < self.stale_s}

    def snapshot(self, now: float) -> BoardSnapshot:
        self.forget(now)
        pools = {p: PoolView() for p in POOLS}
        for (pool, _), (_, v) in self.pool_reports.items():
            agg = pools.setdefault(pool, PoolView())
            agg.replicas += 1
            agg.running += v.running
            agg.queued += v.queued
            agg.predicted_tokens += v.predicted_tokens
        routers = {p: PoolLoad() for p in ("fast", "slow")}
        for _, loads, _ in self.router_reports.values():
            for pool, load in loads.items():
                agg = routers.setdefault(pool, PoolLoad())
                agg.running += load.running
                agg.predicted_tokens += load.predicted_tokens
        return BoardSnapshot(pools=pools, routers=routers, router_replicas=len(self.router_reports),
                             decisions={r: d for r, (_, _, d) in self.router_reports.items()})


def combined(own: PoolLoad, reported_own: PoolLoad | None, snapshot: BoardSnapshot | None, pool: str) -> PoolLoad:
    """The load a router decides on: every router's in-flight requests to ``pool`` (the others' as of
    the last exchange, its own now) — and never less than the pool itself reports running and queued."""
    if snapshot is None:
        return own.model_copy()
    board = snapshot.routers.get(pool, PoolLoad())
    mine = reported_own or PoolLoad()
    running = board.running - mine.running + own.running
    tokens = board.predicted_tokens - mine.predicted_tokens + own.predicted_tokens
    view = snapshot.pools.get(pool, PoolView())
    return PoolLoad(running=max(running, view.running + view.queued, 0), predicted_tokens=max(tokens, view.predicted_tokens, 0.0))


def saturation(pool: str, load: PoolLoad, policy: PolicyConfig) -> bool:
    """Whether ``pool`` counts as saturated for routing (``core.policy``'s rules)."""
    if pool == "slow":
        return slow_saturated(load, policy)
    if pool == "fast":
        return load.running >= policy.fast_saturation_requests
    return False
