"""LoadBoard: the one load view every router replica decides on (``serve_app.serving.loadview``).

Pool replicas report their own running/queued/predicted tokens; router replicas exchange their
in-flight counts for the board's sums. One replica, no CPU reserved: it only adds numbers."""

from __future__ import annotations

import time

from ray import serve

from serve_app.serving.loadview import BoardSnapshot, LoadBook


# no access log: every pool and router replica calls it every load_view_period_s
@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=10_000,
                  logging_config={"enable_access_log": False})
class LoadBoard:
    def __init__(self, stale_s: float = 3.0):
        self.book = LoadBook(stale_s=stale_s)

    def report(self, pool: str, replica: str, stats: dict) -> None:
        """A pool replica's own ``EngineStats``."""
        self.book.report_pool(pool, replica, stats, time.monotonic())

    def exchange(self, router: str, loads: dict[str, dict], decisions: dict[str, bool] | None = None) -> BoardSnapshot:
        """A router replica's in-flight counts (and its last decisions) in, the whole view out."""
        now = time.monotonic()
        self.book.report_router(router, loads, now, decisions)
        return self.book.snapshot(now)

    def snapshot(self) -> BoardSnapshot:
        return self.book.snapshot(time.monotonic())
