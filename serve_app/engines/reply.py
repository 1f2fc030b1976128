"""Incremental reply parsing: generated token ids → (reasoning, content) text deltas."""

from __future__ import annotations

from serve_app.core.prompts import THINK_CLOSE, THINK_OPEN


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
