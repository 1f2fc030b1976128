"""Continuous batching for the HF engine on an asyncio loop: the HF ``Engine`` of a serving pool."""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, field
from typing import AsyncIterator, Sequence

import torch

from serve_app.core.policy import OnlineConfig
from serve_app.core.probe import Probe
from serve_app.engines.base import EngineStats, GenRequest, GenResult
from serve_app.engines.hf import DecodeBatch, HFEngine, Row


@dataclass(eq=False)
class _Ticket:
    request: GenRequest
    predicted_tokens: float
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    row: Row | None = None
    sent: int = 0
    done: bool = False
    cancelled: bool = False


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

    def _tick(self, new: list[_Ticket]) -> None:
        if new:
            rows = self.batch.add([t.request for t in new])
            for t, row in zip(new, rows):
                t.row = row
                if t.cancelled:
                    self.batch.cancel(row)
        if self.batch.rows:
            self.batch.step()

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
                await asyncio.to_thread(self._tick, new)
            except Exception as exc:  # a failed step fails its rows, never the replica
                failed = self.inflight + new
                self.inflight, self.batch = [], self._new_batch()
                for t in failed:
                    t.done = True
                    t.queue.put_nowait(RuntimeError(f"generation failed: {exc}"))
                continue
            self.inflight.extend(new)
            still = []
            for t in self.inflight:
                row = t.row
                ids = row.out_ids[t.sent :]
                t.sent = len(row.out_ids)
                if row.result is not None:
                    t.done = True
                    t.queue.put_nowait((ids, row.result))
                elif t.cancelled:
                    continue
                else:
                    if ids:
                        t.queue.put_nowait((ids, None))
                    still.append(t)
            self.inflight = still


