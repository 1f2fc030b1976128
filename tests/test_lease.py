"""In-flight accounting that cannot leak (``serve_app.serving.lease``): a lease is released exactly
once whichever way a streamed reply ends, including the case that leaked before, a client that
leaves before the first byte (Starlette then never starts the body iterator, so a ``finally`` in
it never runs)."""

import asyncio
import gc

import pytest

from serve_app.core.policy import PoolLoad
from serve_app.serving.lease import Lease, LeasedStreamingResponse


class Book:
    """A pool's load as the router keeps it: taken per request, given back through a lease."""

    def __init__(self):
        self.load, self.releases = PoolLoad(), []

    def take(self) -> Lease:
        self.load.running += 1

        def give_back(outcome):
            self.load.running -= 1
            self.releases.append(outcome)

        return Lease(give_back)


def response(book: Book, items: int = 3, delay: float = 0.0):
    lease, started, finished = book.take(), [], []

    async def body():
        started.append(True)
        try:
            for i in range(items):
                await asyncio.sleep(delay)
                yield f"data: {i}\n\n"
        finally:
            finished.append(True)
            lease.release(["final"])

    return LeasedStreamingResponse(body(), lease.release, media_type="text/event-stream"), started, finished


def scope(spec: str = "2.0") -> dict:
    return {"type": "http", "asgi": {"spec_version": spec}, "method": "POST", "path": "/"}


async def never_disconnects():
    await asyncio.sleep(3600)
    return {"type": "http.disconnect"}


async def disconnected():
    return {"type": "http.disconnect"}


def test_a_lease_is_released_exactly_once():
    book = Book()
    lease = book.take()
    lease.release(["a"])
    lease.release(["b"])
    with lease:
        pass
    assert book.load.running == 0 and book.releases == [["a"]]


def test_a_reply_sent_to_the_end_releases_once_with_its_outcome():
    book, sent = Book(), []
    resp, started, finished = response(book)

    async def send(message):
        sent.append(message)

    asyncio.run(resp(scope(), never_disconnects, send))
    assert started and finished and book.load.running == 0 and book.releases == [["final"]]
    assert sent[-1] == {"type": "http.response.body", "body": b"", "more_body": False}


@pytest.mark.parametrize("spec", ["2.0", "2.4"])
def test_a_client_gone_before_the_first_byte_releases_the_lease(spec):
    """The leak: the body iterator never starts, so only the response's own cleanup can release."""
    book = Book()
    resp, started, finished = response(book)

    async def send(message):
        if spec == "2.4":
            raise OSError("client went away")  # ASGI 2.4 servers report a gone client on send
        await asyncio.sleep(3600)  # older servers: the disconnect listener wins

    async def run():
        try:
            await resp(scope(spec), disconnected, send)
        except Exception as exc:  # noqa: BLE001 — Starlette raises ClientDisconnect on 2.4
            return exc

    asyncio.run(run())
    assert not started and not finished  # the iterator's finally never ran: that was the leak
    assert book.load.running == 0 and book.releases == [[]]


def test_a_client_gone_mid_stream_releases_once():
    book, sent = Book(), []
    resp, started, finished = response(book, items=1000, delay=0.001)

    async def send(message):
        sent.append(message)

    async def run():
        task = asyncio.create_task(resp(scope(), never_disconnects, send))
        while len(sent) < 3:
            await asyncio.sleep(0.001)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(run())
    assert started and finished and book.load.running == 0 and book.releases == [["final"]]


def test_a_response_that_is_never_sent_releases_when_collected():
    """The request was cancelled between building the response and sending it."""
    book = Book()
    resp, started, _ = response(book)
    del resp
    gc.collect()
    assert not started and book.load.running == 0 and book.releases == [[]]
