"""A replica's load, pushed to the ``LoadBoard`` from its event loop: every ``period`` seconds while
it changes, and at least every ``heartbeat`` seconds while it does not (an idle replica stays in the
view without a call every ``period``; the board drops a replica silent for ``load_view_stale_s``)."""

from __future__ import annotations

import asyncio
import logging
from typing import Callable

from ray.serve.handle import DeploymentHandle

logger = logging.getLogger("ray.serve")


class LoadReporter:
    def __init__(self, board: DeploymentHandle | None, pool: str, replica: str, stats: Callable[[], dict], period: float,
                 heartbeat: float | None = None):
        self.board, self.pool, self.replica, self.stats, self.period = board, pool, replica, stats, period
        self.heartbeat = period if heartbeat is None else max(period, heartbeat)
        self.task: asyncio.Task | None = None
        self._warned = False

    def ensure_started(self) -> None:
        """Start reporting on the running event loop (a no-op without one, or once started)."""
        if self.board is None or (self.task is not None and not self.task.done()):
            return
        try:
            self.task = asyncio.get_running_loop().create_task(self._run())
        except RuntimeError:  # no loop yet: the first request starts it
            self.task = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        last, last_at = None, -float("inf")
        while True:
            stats = self.stats()
            try:
                if stats != last or loop.time() - last_at >= self.heartbeat:
                    await asyncio.wait_for(self.board.report.remote(self.pool, self.replica, stats), timeout=max(1.0, 5 * self.period))
                    last, last_at = stats, loop.time()
                self._warned = False
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 — the board is down or slow: routers fall back to their own view
                if not self._warned:
                    logger.warning("%s replica could not report its load (%s); retrying", self.pool, type(exc).__name__)
                    self._warned = True
            await asyncio.sleep(self.period)
