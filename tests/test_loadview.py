"""The shared load view as pure code (``serve_app.serving.loadview``): the board's sums, a router's
combined view, stale reporters dropping out, and every router replica's decisions."""

from __future__ import annotations

from serve_app.core.policy import PolicyConfig, PoolLoad
from serve_app.serving.loadview import LoadBook, combined, saturation

POLICY = PolicyConfig(slow_saturation_requests=48)


def _two_routers(book: LoadBook, a: int, b: int, now: float = 0.0) -> None:
    book.report_router("a", {"slow": {"running": a, "predicted_tokens": 100.0 * a}}, now, {"slow": False})
    book.report_router("b", {"slow": {"running": b, "predicted_tokens": 100.0 * b}}, now, {"slow": True})


def test_the_board_sums_pools_and_routers():
    book = LoadBook(stale_s=3.0)
    book.report_pool("slow", "r1", {"running": 10, "queued": 2, "predicted_tokens": 500.0}, 0.0)
    book.report_pool("slow", "r2", {"running": 20, "queued": 0, "predicted_tokens": 700.0}, 0.0)
    _two_routers(book, 14, 50)
    snap = book.snapshot(1.0)
    assert snap.pools["slow"].replicas == 2 and snap.pools["slow"].running == 30 and snap.pools["slow"].queued == 2
    assert snap.pools["slow"].predicted_tokens == 1200.0 and snap.pools["fast"].replicas == 0
    assert snap.routers["slow"].running == 64 and snap.router_replicas == 2
    assert snap.decisions == {"a": {"slow": False}, "b": {"slow": True}}


def test_each_router_decides_on_everyones_load():
    """Router a has 14 in flight (alone: not saturated at 48); with b's 50 it sees 64 — as does b."""
    book = LoadBook()
    _two_routers(book, 14, 50)
    snap = book.snapshot(0.5)
    mine_a = PoolLoad(running=14, predicted_tokens=1400.0)
    view_a = combined(PoolLoad(running=16, predicted_tokens=1600.0), mine_a, snap, "slow")  # two more since the exchange
    assert view_a.running == 66 and view_a.predicted_tokens == 6600.0
    assert saturation("slow", view_a, POLICY) and not saturation("slow", PoolLoad(running=16), POLICY)
    view_b = combined(PoolLoad(running=50, predicted_tokens=5000.0), PoolLoad(running=50, predicted_tokens=5000.0), snap, "slow")
    assert view_b.running == 64 and saturation("slow", view_b, POLICY)


def test_the_pools_own_report_is_a_floor():
    """Requests another router sent that the board has not heard of yet still count if the pool runs them."""
    book = LoadBook()
    book.report_pool("slow", "r1", {"running": 40, "queued": 12, "predicted_tokens": 9000.0}, 0.0)
    _two_routers(book, 1, 1)
    view = combined(PoolLoad(running=1), PoolLoad(running=1), book.snapshot(0.1), "slow")
    assert view.running == 52 and view.predicted_tokens == 9000.0 and saturation("slow", view, POLICY)


def test_without_a_board_a_router_sees_only_its_own_load():
    own = PoolLoad(running=7, predicted_tokens=70.0)
    assert combined(own, None, None, "slow") == own


def test_silent_reporters_drop_out():
    """A dead pool replica or router replica stops reporting; after ``stale_s`` it no longer counts."""
    book = LoadBook(stale_s=3.0)
    book.report_pool("slow", "dead", {"running": 30, "queued": 0, "predicted_tokens": 0.0}, 0.0)
    book.report_pool("slow", "alive", {"running": 5, "queued": 0, "predicted_tokens": 0.0}, 2.0)
    _two_routers(book, 10, 20, now=0.0)
    book.report_router("a", {"slow": {"running": 11, "predicted_tokens": 0.0}}, 2.5)
    snap = book.snapshot(4.0)
    assert snap.pools["slow"].replicas == 1 and snap.pools["slow"].running == 5
    assert snap.router_replicas == 1 and snap.routers["slow"].running == 11
    assert snap.decisions == {"a": {}}  # a router that sent no decisions yet


def test_fast_saturation_and_prefill():
    assert saturation("fast", PoolLoad(running=64), POLICY) and not saturation("fast", PoolLoad(running=63), POLICY)
    assert not saturation("prefill", PoolLoad(running=10**6), POLICY)


def test_an_idle_replica_reports_a_heartbeat_not_every_period():
    """A pool replica reports every period while its load changes, and only every heartbeat while it
    does not (no board call 10 times a second from every idle replica)."""
    import asyncio

    import pytest

    pytest.importorskip("ray")
    from deployments.reporting import LoadReporter

    class Board:
        def __init__(self):
            self.calls = []
            self.report = self

        async def _call(self, pool, replica, stats):
            self.calls.append(dict(stats))

        def remote(self, *args):
            return self._call(*args)

    async def run(stats) -> list[dict]:
        board = Board()
        reporter = LoadReporter(board, "slow", "r1", stats, period=0.01, heartbeat=0.1)
        reporter.ensure_started()
        await asyncio.sleep(0.35)
        reporter.task.cancel()
        return board.calls

    idle = asyncio.run(run(lambda: {"running": 0}))
    assert 3 <= len(idle) <= 5 and all(c == {"running": 0} for c in idle)  # t = 0, 0.1, 0.2, 0.3
    ticks = iter(range(10_000))
    busy = asyncio.run(run(lambda: {"running": next(ticks)}))
    assert len(busy) >= 15 and [c["running"] for c in busy] == sorted({c["running"] for c in busy})
