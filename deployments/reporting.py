"""A replica's load, pushed to the ``LoadBoard`` every ``period`` seconds from its event loop."""

from __future__ import annotations

import asyncio
import logging
from typing import Callable

from ray.serve.handle import DeploymentHandle

logger = logging.getLogger("ray.serve")


class LoadReporter:
    def __init__(self, board: DeploymentHandle | None, pool: str, replica: str, stats: Callable[[], dict], period: float):
        self.board, self.pool, self.replica, self.stats, self.period = board, pool, replica, stats, period
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
        while True:
            try:
                await asyncio.wait_for(self.board.report.remote(self.pool, self.replica, self.stats()), timeout=max(1.0, 5 * self.period))
                self._warned = False
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 — the board is down or slow: routers fall back to their own view
                if not self._warned:
                    logger.warning("%s replica could not report its load (%s); retrying", self.pool, type(exc).__name__)
                    self._warned = True
            await asyncio.sleep(self.period)
