"""The worker-process side of kvswitch inside vLLM that follows each tracked reply's tokens: its
switching state (``Live``, the same bookkeeping as the HF engine's decode ``Row``) and the
``SwitchLogitsProcessor`` (a custom v1 ``LogitsProcessor``) that forces a reply's switch text, or the
close-think text when ``max_thinking`` is reached, into the *same running request*.

``ENGINE`` holds the worker's settings and live replies; the KV connector
(``serve_app.engines.vllm_connector``) runs in the same process, fills in the settings at start-up,
reads the paged cache for the replies here and calls ``Live.decide`` with each online check.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
from vllm.v1.sample.logits_processor.interface import MoveDirectionality

from serve_app.core.policy import OnlineConfig, switch_decision

LOGITS_PROCESSOR = "serve_app.engines.vllm_live:SwitchLogitsProcessor"


def request_options(params) -> dict | None:
    """The kvswitch options of a request's ``SamplingParams`` (None: a plain request)."""
    extra = getattr(params, "extra_args", None) or {}
    opts = (extra.get("kv_transfer_params") or {}).get("kvswitch")
    if opts == "prompt":
        return {"prompt": True}
    return opts if isinstance(opts, dict) else None


# ------------------------------------------------------------------------------ worker state


@dataclass(eq=False)
class Live:
    """One tracked reply in the worker process: the same bookkeeping as the HF engine's decode
    ``Row`` (serve_app.engines.decode), shared by the connector and the logits processor."""

    key: str
    opts: dict
    mode: str = "fast"
    since: int = 0
    streak: int = 0
    switches: int = 0
    in_thought: bool = False
    think: int = 0
    forced: deque = field(default_factory=deque)
    emitted: deque = field(default_factory=deque)
    """Forced tokens sampled but not yet seen in the output."""
    out: list | None = None
    seen: int = 0
    # paged-cache bookkeeping (connector)
    req_id: str = ""
    blocks: list = field(default_factory=list)
    prompt_len: int = 0
    tokens: int = 0
    """Positions in the cache after this step."""
    done_pos: int = -1
    first: torch.Tensor | None = None
    prev: torch.Tensor | None = None
    prompt_done: bool = False
    result: dict = field(default_factory=dict)
    """What this step adds to the reply's results (sent and cleared every step)."""

    @classmethod
    def make(cls, key: str, opts: dict) -> Live:
        mode = opts.get("mode") or "fast"
        already = int(opts.get("already") or 0)
        every = max(int(ENGINE.online.every if ENGINE.online else 1), 1)
        return cls(key, opts, mode=mode, since=already % every, in_thought=mode == "slow", think=already if mode == "slow" else 0)

    def observe(self) -> None:
        """Account the output tokens vLLM appended since the last step (before this step's forward)."""
        out = self.out
        if out is None:
            return
        close = ENGINE.close_ids
        while self.seen < len(out):
            tok = out[self.seen]
            self.seen += 1
            self.since += 1
            if self.emitted and self.emitted[0] == tok:
                self.emitted.popleft()
                continue  # a forced token: counted, not a thought token
            if self.in_thought:
                self.think += 1
                if close and out[max(self.seen - len(close), 0):self.seen] == close:
                    self.in_thought = False

    def check_due(self) -> bool:
        o = ENGINE.online
        return bool(self.opts.get("online")) and o is not None and ENGINE.probe is not None and self.switches < o.max_switches \
            and not self.forced and self.since >= o.every and self.seen > 0

    def record_due(self) -> bool:
        every = self.opts.get("record")
        return bool(every) and not self.forced and self.seen > 0 and self.seen % int(every) == 0

    def decide(self, d: float) -> None:
        """One online check, as ``DecodeBatch._online_checks``."""
        o = ENGINE.online
        self.since = 0
        self.result.setdefault("checks", []).append([self.seen, d])
        target, self.streak = switch_decision(self.mode, d, self.streak, o)
        if target is not None:
            self.result["switched_at"] = self.seen
            self.switches += 1
            self.mode, self.in_thought, self.think = target, target == "slow", 0
            self.forced.extend(ENGINE.switch_ids[target])
            self.result["end_mode"] = self.mode

    def next_forced(self) -> int | None:
        """The token this reply must take now: a queued switch or thinking-cap token, else None."""
        cap = self.opts.get("max_thinking")
        if cap is not None and not self.forced and self.in_thought and self.think >= int(cap):
            self.forced.extend(ENGINE.switch_ids["fast"])
            self.mode, self.in_thought = "fast", False
            self.switches = max(self.switches, ENGINE.online.max_switches if ENGINE.online else 1)
            self.result["capped"], self.result["end_mode"] = True, "fast"
        if not self.forced:
            return None
        tok = self.forced.popleft()
        self.emitted.append(tok)
        return tok


class _EngineState:
    """Worker-process settings and live replies (one engine per worker process)."""

    def __init__(self):
        self.live: dict[str, Live] = {}
        self.online: OnlineConfig | None = None
        self.probe = None
        self.switch_ids: dict[str, list[int]] = {}
        self.close_ids: list[int] = []

    def get(self, key: str, opts: dict) -> Live:
        live = self.live.get(key)
        if live is None:
            live = self.live[key] = Live.make(key, opts)
        return live


ENGINE = _EngineState()


# ------------------------------------------------------------------------- the logits processor


class SwitchLogitsProcessor(LogitsProcessor):
    """Forces a reply's switch (or thinking-cap) tokens into its running request."""

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        self.rows: dict[int, Live] = {}

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        opts = request_options(sampling_params)
        if opts and (opts.get("online") or opts.get("record") or opts.get("max_thinking") is not None) and not opts.get("key"):
            raise ValueError("kvswitch: online switching and max_thinking need a unique 'key' in the request's kvswitch options")

    def is_argmax_invariant(self) -> bool:
        return False

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is not None:
            for index in batch_update.removed:
                live = self.rows.pop(index, None)
                if live is not None and not live.req_id:  # not the connector's: nothing else will drop it
                    ENGINE.live.pop(live.key, None)
            for index, params, _, output_ids in batch_update.added:
                opts = request_options(params)
                # KV-CoE (coe_start) is followed too: its layer sums split the tokens into thought and answer
                if opts and opts.get("key") and (opts.get("online") or opts.get("record") or opts.get("max_thinking") is not None
                                                 or opts.get("coe_start") is not None):
                    live = ENGINE.get(str(opts["key"]), opts)
                    live.out = output_ids
                    self.rows[index] = live
                else:
                    self.rows.pop(index, None)
            for a, b, how in batch_update.moved:
                ra, rb = self.rows.pop(a, None), self.rows.pop(b, None)
                if ra is not None:
                    self.rows[b] = ra
                if rb is not None and how == MoveDirectionality.SWAP:
                    self.rows[a] = rb
        for live in self.rows.values():
            live.observe()

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        for index, live in self.rows.items():
            tok = live.next_forced()
            if tok is not None:
                logits[index] = float("-inf")
                logits[index, tok] = 0.0
        return logits


def live_replies(worker=None) -> int:
    """Replies the worker process still tracks (``AsyncLLM.collective_rpc(live_replies)``; tests)."""
    return len(ENGINE.live)
