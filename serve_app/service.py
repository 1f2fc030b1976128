"""The serving core without Ray: model runtime, continuous batching on an asyncio loop, and
incremental reply parsing (thinking vs answer, stop strings). Deployments wrap these."""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, field
from typing import AsyncIterator

import torch

from serve_app.config import AppConfig
from serve_app.engine import DecodeBatch, GenRequest, GenResult, HFEngine, OnlineConfig, _Row
from serve_app.embedded import THINK_CLOSE, THINK_OPEN
from serve_app.probe import Probe


@dataclass
class Runtime:
    engine: HFEngine
    probe: Probe
    online: OnlineConfig
    online_enabled: bool


def online_config(cfg: AppConfig, probe: Probe) -> OnlineConfig:
    """The probe's calibrated switching thresholds with the config's overrides on top."""
    thresholds = dict(probe.thresholds)
    thresholds.update({k: v for k, v in cfg.online.model_dump(exclude={"enabled"}).items() if v is not None})
    return OnlineConfig(**thresholds)


def routing_limits(cfg: AppConfig, probe: Probe, model_config) -> tuple[float, int]:
    """The router's τ (``policy.tau``, else the switching τ) and context length (config, else the model's)."""
    tau = cfg.policy.tau if cfg.policy.tau is not None else online_config(cfg, probe).tau
    return tau, cfg.context_length or int(getattr(model_config, "max_position_embeddings", 4096))


def load_runtime(cfg: AppConfig) -> Runtime:
    """Model, tokenizer and probe from local files (never the hub); the probe must match the model."""
    from serve_app.evaluate import load_model

    torch.set_num_threads(cfg.torch_threads)
    model, tokenizer = load_model(cfg.model)
    probe = Probe.load(cfg.probe, model.config)
    return Runtime(HFEngine(model, tokenizer), probe, online_config(cfg, probe), cfg.online.enabled)


def load_vllm_engine(cfg: AppConfig, overrides: dict):
    """A ``VLLMEngine`` on the config's model with its probe (checked against the model's config);
    ``overrides``: the pool's ``vllm`` AsyncEngineArgs."""
    from transformers import AutoConfig

    from serve_app.vllm_engine import VLLMEngine

    torch.set_num_threads(cfg.torch_threads)
    probe = Probe.load(cfg.probe, AutoConfig.from_pretrained(cfg.model, local_files_only=True))
    return VLLMEngine.create(cfg.model, probe, online_config(cfg, probe), **overrides)


# ------------------------------------------------------------------------- continuous batching


@dataclass(eq=False)
class _Ticket:
    request: GenRequest
    predicted_tokens: float
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    row: _Row | None = None
    sent: int = 0
    done: bool = False
    cancelled: bool = False


class ContinuousBatcher:
    """Requests join the live decode batch between steps and stream their tokens out.

    One background task drives ``DecodeBatch`` in a worker thread, one step per tick, so the
    replica's event loop stays free for new requests and cancellations. A cancelled stream (a
    client that went away) leaves the batch at the next step and frees its slot.
    """

    def __init__(self, runtime: Runtime, max_batch_size: int):
        self.runtime = runtime
        self.max_batch_size = max_batch_size
        self.batch = self._new_batch()
        self.pending: deque[_Ticket] = deque()
        self.inflight: list[_Ticket] = []
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None

    def _new_batch(self) -> DecodeBatch:
        rt = self.runtime
        return DecodeBatch(rt.engine, rt.probe, rt.online)

    def stats(self) -> dict:
        """Queue depth, running rows and predicted tokens still to generate on this replica."""
        outstanding = sum(max(t.predicted_tokens - (t.row.generated + t.row.appended if t.row else 0), 0.0)
                          for t in list(self.inflight) + list(self.pending))
        return {"queued": len(self.pending), "running": len(self.inflight), "predicted_tokens": float(outstanding)}

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


# ------------------------------------------------------------------------------ reply parsing


class ReplyStream:
    """Turns generated token ids into (reasoning, content) text deltas.

    Text inside a think block is reasoning; the rest is content. Decoding is incremental (only
    the last tokens are re-decoded) and holds back a few characters so that a think tag or a stop
    string split across tokens is still found. A stop string ends the reply (``stopped``).
    """

    def __init__(self, tokenizer, thinking: bool, stops: list[str] = (), skip_ids: set[int] = frozenset(),
                 open_tag: str = THINK_OPEN, close_tag: str = THINK_CLOSE):
        self.tok = tokenizer
        self.in_think = thinking
        self.stops = list(stops)
        self.skip = set(skip_ids)
        self.open_tag, self.close_tag = open_tag, close_tag
        self.hold = max([len(open_tag), len(close_tag)] + [len(s) for s in self.stops]) - 1
        self.ids: list[int] = []
        self.prefix_offset = self.read_offset = 0
        self.pending = ""
        self.stopped = False
        self.reasoning_tokens = 0
        self.after_thought = False

    def _detok(self, ids: list[int]) -> str:
        self.ids.extend(i for i in ids if i not in self.skip)
        before = self.tok.decode(self.ids[self.prefix_offset : self.read_offset])
        after = self.tok.decode(self.ids[self.prefix_offset :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return after[len(before) :]
        return ""

    def _emit(self, reasoning: list[str], content: list[str], text: str) -> None:
        if self.in_think:
            reasoning.append(text)
            return
        if self.after_thought:  # the answer starts after the blank line that closes a thought
            text = text.lstrip("\n")
            self.after_thought = not text
        content.append(text)

    def push(self, ids: list[int], final: bool = False) -> tuple[str, str]:
        """Feed new token ids; returns the (reasoning, content) text now safe to emit."""
        if self.stopped:
            return "", ""
        if self.in_think:
            self.reasoning_tokens += len(ids)
        self.pending += self._detok(ids)
        for stop in self.stops:
            at = self.pending.find(stop)
            if at >= 0:
                self.pending, self.stopped, final = self.pending[:at], True, True
        reasoning, content = [], []
        while True:
            tag = self.close_tag if self.in_think else self.open_tag
            at = self.pending.find(tag)
            if at < 0:
                break
            self._emit(reasoning, content, self.pending[:at])
            self.pending = self.pending[at + len(tag) :]
            self.in_think = not self.in_think
            self.after_thought = not self.in_think
        keep = 0 if final else min(self.hold, len(self.pending))
        emit, self.pending = self.pending[: len(self.pending) - keep], self.pending[len(self.pending) - keep :]
        self._emit(reasoning, content, emit)
        return "".join(reasoning), "".join(content)
