"""A router replica's load bookkeeping: its own in-flight requests per pool (taken and given back
through leases, ``serve_app.serving.lease``), exchanged with the ``LoadBoard`` so that every router
replica routes on the same view (``serve_app.serving.loadview``), and the operators' status."""

from __future__ import annotations

import asyncio
import logging

from ray.serve.handle import DeploymentHandle

from deployments.metrics import RouterMetrics, add
from serve_app.config import AppConfig
from serve_app.core.policy import PoolLoad, expected_tokens
from serve_app.serving.lease import Lease
from serve_app.serving.loadview import POOLS, BoardSnapshot, PoolView, combined, saturation
from serve_app.serving.messages import Final
from serve_app.serving.plan import Plan

logger = logging.getLogger("ray.serve")
GEN_POOLS = ("fast", "slow")


class RouterLoads:
    def __init__(self, cfg: AppConfig, tau: float, board: DeploymentHandle | None, replica: str, metrics: RouterMetrics):
        self.cfg, self.tau, self.board, self.replica, self.metrics = cfg, tau, board, replica, metrics
        self.load = {p: PoolLoad() for p in GEN_POOLS}
        """This replica's own in-flight requests per pool."""
        self.reported = {p: PoolLoad() for p in GEN_POOLS}
        """``load`` as of the last exchange (what the board's sums hold of this replica)."""
        self.snapshot: BoardSnapshot | None = None
        self.snapshot_at = float("-inf")
        self._sync: asyncio.Task | None = None
        self._warned = False
        self.ensure_sync()

    # ---------------------------------------------------------------------------- leases
    def start(self, plan: Plan, n: int) -> Lease:
        """Count ``n`` choices of ``plan`` as in flight until the returned lease is released (once,
        on every path)."""
        load = self.load[plan.decision.pool]
        load.running += n
        load.predicted_tokens += n * plan.decision.predicted_tokens
        self.metrics.inflight.set(load.running, tags={"route": plan.decision.pool})
        return Lease(lambda finals: self._end(plan, finals, n))

    def _end(self, plan: Plan, finals: list[Final], n: int) -> None:
        pool = plan.decision.pool
        load = self.load[pool]
        load.running -= n
        load.predicted_tokens = max(load.predicted_tokens - n * plan.decision.predicted_tokens, 0.0)
        self.metrics.inflight.set(load.running, tags={"route": pool})
        for f in finals:
            add(self.metrics.tokens, f.completion_tokens, {"route": pool})
            slow_cost = expected_tokens(plan.difficulty if plan.difficulty is not None else self.tau, "slow", self.cfg.policy)
            if pool == "fast" or f.end_mode == "fast":
                add(self.metrics.saved, slow_cost - f.completion_tokens)
            if f.switched_at is not None:
                self.metrics.switches.inc(tags={"direction": f"{f.start_mode}->{f.end_mode}"})

    # ------------------------------------------------------------------- the shared view
    def ensure_sync(self) -> None:
        """Exchange loads with the ``LoadBoard`` in the background (on the running event loop)."""
        if self.board is None or (self._sync is not None and not self._sync.done()):
            return
        try:
            self._sync = asyncio.get_running_loop().create_task(self._sync_loop())
        except RuntimeError:  # no loop yet: the first request starts it
            self._sync = None

    async def _sync_loop(self) -> None:
        period = self.cfg.load_view_period_s
        while True:
            sent = {p: load.model_copy() for p, load in self.load.items()}
            decisions = {p: saturation(p, v, self.cfg.policy) for p, v in self._view().items()}
            try:
                snap = await asyncio.wait_for(self.board.exchange.remote(self.replica, {p: v.model_dump() for p, v in sent.items()},
                                                                         decisions), timeout=max(1.0, 5 * period))
                self.snapshot, self.reported, self.snapshot_at = snap, sent, asyncio.get_running_loop().time()
                self._warned = False
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 — the board is down: decide on this router's own view meanwhile
                if not self._warned:
                    logger.warning("load board unreachable (%s); routing on this router's own load until it is back", type(exc).__name__)
                    self._warned = True
            await asyncio.sleep(period)

    def fresh_snapshot(self) -> BoardSnapshot | None:
        if self.snapshot is None or asyncio.get_running_loop().time() - self.snapshot_at > self.cfg.load_view_stale_s:
            return None
        return self.snapshot

    def view(self) -> dict[str, PoolLoad]:
        """The load routing decides on: every router's in-flight requests per pool (the shared view),
        or this router's own while the board is unreachable."""
        self.ensure_sync()
        return self._view()

    def _view(self) -> dict[str, PoolLoad]:
        snap = self.fresh_snapshot()
        return {p: combined(self.load[p], self.reported[p], snap, p) for p in GEN_POOLS}

    def status(self) -> dict:
        """``GET /v1/kvswitch/status``: each pool's replicas and own reported load, whether routing
        counts it as saturated, this router replica's in-flight requests, and every router replica's
        last decisions (``decisions``: replica -> pool -> saturated, as of its last exchange)."""
        view, snap = self.view(), self.fresh_snapshot()
        pools = {}
        for p in POOLS:
            reported = snap.pools.get(p, PoolView()) if snap else PoolView()
            if p == "prefill":
                saturated = reported.running >= self.cfg.prefill.max_ongoing_requests * max(reported.replicas, 1)
            else:
                saturated = saturation(p, view[p], self.cfg.policy)
            pools[p] = {"replicas": reported.replicas, "running": reported.running, "queued": reported.queued,
                        "predicted_tokens": round(reported.predicted_tokens, 1), "saturated": saturated}
        router = {"replica": self.replica, "view": "shared" if snap else "local", "replicas": snap.router_replicas if snap else 1,
                  "inflight": {p: self.load[p].running for p in GEN_POOLS},
                  "decision_load": {p: {"running": v.running, "predicted_tokens": round(v.predicted_tokens, 1)} for p, v in view.items()},
                  "decisions": {r: {p: d.get(p) for p in GEN_POOLS} for r, d in sorted(snap.decisions.items())} if snap else {}}
        return {"pools": pools, "router": router}
