"""In-flight accounting that cannot leak.

The router counts the requests it has sent to a pool (its ``PoolLoad``). A count taken must be
given back on every path: the reply finished, failed, timed out, the client left mid-stream — and
the client left *before the first byte*, when Starlette never starts the body iterator of a
``StreamingResponse`` (so a ``finally`` in that iterator never runs). ``Lease`` is released exactly
once; ``LeasedStreamingResponse`` releases its lease when it is done being sent, however that
ends, and, should it never be sent at all, when it is garbage-collected."""

from __future__ import annotations

import weakref
from typing import Callable

from starlette.responses import StreamingResponse


class Lease:
    """One request's share of a pool's load, given back exactly once by ``release``.

    ``on_release(outcome)`` runs on the first ``release``; later calls do nothing. ``outcome`` is
    whatever the caller reports (the router passes the finished choices, for its metrics)."""

    def __init__(self, on_release: Callable[[list], None]):
        self._on_release = on_release
        self.released = False

    def release(self, outcome: list | None = None) -> None:
        if self.released:
            return
        self.released = True
        self._on_release(list(outcome or []))

    def __enter__(self) -> "Lease":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class LeasedStreamingResponse(StreamingResponse):
    """A ``StreamingResponse`` that runs ``cleanup()`` once it has been sent, cancelled or dropped.

    ``cleanup`` runs at most once through the response (``weakref.finalize``); it must not reference
    the response itself, or the response would never be collected."""

    def __init__(self, content, cleanup: Callable[[], None], **kwargs):
        super().__init__(content, **kwargs)
        self._cleanup = weakref.finalize(self, cleanup)

    def cleanup(self) -> None:
        """Run the cleanup now (at most once over the response's life)."""
        self._cleanup()

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:  # also when the body iterator never started (the client left before the first byte)
            self._cleanup()
