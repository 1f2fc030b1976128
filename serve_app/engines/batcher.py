"""Continuous batching for the HF engine on an asyncio loop: the HF ``Engine`` of a serving pool."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from dataclasses import dataclass, field
from typing import AsyncIterator, Sequence

import torch

from serve_app.core.policy import OnlineConfig
from serve_app.core.probe import Probe
from serve_app.engines.base import EngineStats, GenerationError, GenRequest, GenResult
from serve_app.engines.decode import DecodeBatch, Row
from serve_app.engines.hf import HFEngine

logger = logging.getLogger("kvswitch.engine")


@dataclass(eq=False)
class _Ticket:
    request: GenRequest
    predicted_tokens: float
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    row: Row | None = None
    sent: int = 0
    done: bool = False
    cancelled: bool = False
    error: Exception | None = None


class ContinuousBatcher:
    """Requests join the live decode batch between steps and stream their tokens out.

    One background task drives ``DecodeBatch`` in a worker thread, one step per tick, so the
    replica's event loop stays free for new requests and cancellations. A cancelled stream (a
    client that went away) leaves the batch at the next step and frees its slot.
    """

    def __init__(self, engine: HFEngine, probe: Probe, online: OnlineConfig, max_batch_size: int = 16):
        self.engine, self.probe, self.online = engine, probe, online
        self.max_batch_size = max_batch_size
        self.batch = self._new_batch()
        self.pending: deque[_Ticket] = deque()
        self.inflight: list[_Ticket] = []
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None

    # the Engine protocol's attributes come from the wrapped HFEngine
    tokenizer = property(lambda self: self.engine.tokenizer)
    prompts = property(lambda self: self.engine.prompts)
    eos_id = property(lambda self: self.engine.eos_id)
    pad_id = property(lambda self: self.engine.pad_id)
    prefix_ids = property(lambda self: self.engine.prefix_ids)

    def _new_batch(self) -> DecodeBatch:
        return DecodeBatch(self.engine, self.probe, self.online)

    def _features(self, prompts: Sequence[Sequence[int]], embedding: bool) -> list[dict[str, torch.Tensor]]:
        with torch.inference_mode():
            feats = self.engine.prompt_features(prompts, self.probe.pooling, embedding=embedding)
        return [{k: v[i] for k, v in feats.items()} for i in range(len(prompts))]

    async def features(self, prompts: Sequence[Sequence[int]], embedding: bool = False) -> list[dict[str, torch.Tensor]]:
        """Probe feature (``kv``) and, with ``embedding``, the KV embedding of each prompt: one
        batched prefill in a worker thread (the event loop stays free)."""
        return await asyncio.to_thread(self._features, prompts, embedding)

    def stats(self) -> EngineStats:
        """Queue depth, running rows and predicted tokens still to generate on this replica."""
        outstanding = sum(max(t.predicted_tokens - (t.row.generated + t.row.appended if t.row else 0), 0.0)
                          for t in list(self.inflight) + list(self.pending))
        return EngineStats(queued=len(self.pending), running=len(self.inflight), predicted_tokens=float(outstanding))

    async def stream(self, request: GenRequest, predicted_tokens: float = 0.0) -> AsyncIterator[tuple[list[int], GenResult | None]]:
        """Yield ``(new token ids, None)`` as the row decodes, then ``([...], result)`` once."""
        if self._task is None or self._task.done():
            self._wake = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._run())
        ticket = _Ticket(request, predicted_tokens)
        self.pending.append(ticket)
        self._wake.set()
        try:
            while True:
                item = await ticket.queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item[1] is not None:
                    return
        finally:
            if not ticket.done:
                ticket.cancelled = True
                if ticket.row is not None:
                    self.batch.cancel(ticket.row)

    def _admit(self, new: list[_Ticket]) -> list[_Ticket]:
        """Prefill ``new`` into the batch; returns the tickets whose prefill failed (their
        ``error`` set). A failed batched prefill is retried one request at a time, so one bad
        request fails alone; ``DecodeBatch.add`` changes the batch only once its prefill succeeded."""
        try:
            rows = self.batch.add([t.request for t in new])
        except Exception as exc:  # noqa: BLE001 — find the culprit below
            if len(new) == 1:
                new[0].error = exc
                return new
            failed = []
            for t in new:
                try:
                    t.row = self.batch.add([t.request])[0]
                except Exception as exc1:  # noqa: BLE001 — that request alone fails
                    t.error = exc1
                    failed.append(t)
            return failed
        for t, row in zip(new, rows):
            t.row = row
        return []

    def _tick(self, new: list[_Ticket]) -> list[_Ticket]:
        failed = self._admit(new) if new else []
        for t in new:
            if t.row is not None and t.cancelled:
                self.batch.cancel(t.row)
        if self.batch.rows:
            self.batch.step()
        return failed

    def _fail(self, t: _Ticket, exc: BaseException) -> None:
        """End one stream with ``GenerationError``: the details go to the log, not to the client."""
        logger.error("generation failed for request %s", t.request.request_id or "?", exc_info=exc)
        t.done = True
        t.queue.put_nowait(GenerationError(t.request.request_id))

    async def _run(self) -> None:
        while True:
            if not self.batch.rows and not self.pending:
                self._wake.clear()
                await self._wake.wait()
                continue
            new = []
            while self.pending and len(self.inflight) + len(new) < self.max_batch_size:
                t = self.pending.popleft()
                if not t.cancelled:
                    new.append(t)
            try:
                failed = await asyncio.to_thread(self._tick, new)
            except Exception as exc:  # noqa: BLE001 — the batch's forward pass failed: its rows fail, never the replica
                broken = self.inflight + new
                self.inflight, self.batch = [], self._new_batch()
                for t in broken:
                    self._fail(t, t.error or exc)
                continue
            for t in failed:
                self._fail(t, t.error)
            self.inflight.extend(t for t in new if t.row is not None)
            still = []
            for t in self.inflight:
                row = t.row
                ids = row.out_ids[t.sent :]
                t.sent = len(row.out_ids)
                if row.error is not None:  # this row's sampling failed; the others go on
                    self._fail(t, row.error)
                elif row.result is not None:
                    t.done = True
                    t.queue.put_nowait((ids, row.result))
                elif t.cancelled:
                    continue
                else:
                    if ids:
                        t.queue.put_nowait((ids, None))
                    still.append(t)
            self.inflight = still
