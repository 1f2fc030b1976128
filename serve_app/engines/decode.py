"""The live decode batch of the HF engine (``HFEngine``, ``serve_app.engines.hf``): rows with their
own mode, forced-token queue and switch point on one KV cache; rows join between steps and leave
when they finish, fail or are cancelled. Token accounting: docs/method.md §5."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Literal, Sequence

import torch

from serve_app.core.confidence import token_stats
from serve_app.core.kv_features import PoolingConfig, cache_kv, kv_embedding, pool_hidden, pool_kv, token_kv_layers, token_kv_vectors
from serve_app.core.policy import Mode, OnlineConfig, switch_decision
from serve_app.core.quant import KVQuantConfig, quantize_cache
from serve_app.engines.base import SAMPLING_EPS, DifficultyScorer, GenRequest, GenResult, TokenSetup
from serve_app.engines.early_exit import EarlyExits


@dataclass(eq=False)
class Row:
    req: GenRequest
    mode: Mode
    forced: deque
    forced_counted: bool = False
    """True while the queued forced tokens are a switch (counted), False for the mode prefix."""
    out_ids: list[int] = field(default_factory=list)
    generated: int = 0
    appended: int = 0
    switches: int = 0
    switched_at: int | None = None
    finished: bool = False
    next_pos: int = 0
    since_check: int = 0
    streak: int = 0
    """Consecutive checks past the switch threshold (OnlineConfig.confirm)."""
    checks: list = field(default_factory=list)
    recorded: list = field(default_factory=list)
    traj: list = field(default_factory=list)
    traj_thought: list = field(default_factory=list)
    """Per generated trajectory point: fed inside an open thought."""
    layer_sums: torch.Tensor | None = None
    """float64 [2 (thought, answer), 2 (K, V), layers, D]: sums over generated tokens (serve_app.core.kv_coe)."""
    layer_counts: list = field(default_factory=lambda: [0, 0])
    hidden_sum: torch.Tensor | None = None
    hidden_n: int = 0
    max_probs: list = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    entropies: list = field(default_factory=list)
    generator: torch.Generator | None = None
    difficulty: float | None = None
    prompt_len: int = 0
    feature: torch.Tensor | None = None
    embedding: torch.Tensor | None = None
    hidden_feature: torch.Tensor | None = None
    cancelled: bool = False
    start_mode: Mode | None = None
    in_thought: bool = False
    """Inside an open thought (slow mode, or after a fast -> slow switch), until it closes."""
    think_tokens: int = 0
    """Counted tokens of the open thought (for ``GenRequest.max_thinking_tokens``)."""
    capped: bool = False
    probe_answers: list = field(default_factory=list)
    """Early exit (``GenRequest.early_exit``): every side-branch answer so far (None: not complete)."""
    probe_tokens: int = 0
    probed_at: int = -1
    """``think_tokens`` at the last probe (a row is probed at most once per thinking token)."""
    exited_at: int | None = None
    result: GenResult | None = None
    error: Exception | None = None
    """What ended this row alone (its sampling failed); the other rows go on."""


def position_seed(seed: int, position: int) -> int:
    """The sampling seed of generated token ``position`` of a request seeded with ``seed``."""
    return (seed * 1_000_003 + position) % (1 << 63)


class DecodeBatch:
    """A live decode batch on one KV cache. Rows join between steps (``add``: their own prefill,
    then the caches are left-padded to one width and concatenated) and leave when they finish or
    are cancelled — continuous batching for the serving generator; ``HFEngine.generate`` is one
    ``add`` followed by ``step`` until empty. With ``kv_quant`` every newly written cache column
    is fake-quantized (``serve_app.core.quant``) after prefill and after each step, before any feature,
    KV-CoE point or later step reads it."""

    def __init__(
        self,
        engine: TokenSetup,
        probe: DifficultyScorer | None = None,
        online: OnlineConfig = OnlineConfig(),
        prompt_feature: Literal["kv", "hidden"] = "kv",
        collect_hidden: bool = False,
        keep_features: bool = False,
        record: tuple[PoolingConfig, int] | None = None,
        kv_quant: KVQuantConfig | None = None,
    ):
        self.engine, self.probe, self.online, self.kv_quant = engine, probe, online, kv_quant
        self.prompt_feature, self.collect_hidden, self.keep_features, self.record = prompt_feature, collect_hidden, keep_features, record
        self.rows: list[Row] = []
        """Active rows, in cache batch order."""
        tok = getattr(engine, "tokenizer", None)
        self._close_tag = tok.encode(engine.prompts.close_think.strip(), add_special_tokens=False) if tok is not None else []
        self.cache = self.mask = self.logits = None
        self.exits = EarlyExits(self)

    @torch.inference_mode()
    def add(self, requests: Sequence[GenRequest]) -> list[Row]:
        """Prefill ``requests`` and join them to the live batch; returns their rows (``row.result``
        is set when a row finishes)."""
        eng, probe = self.engine, self.probe
        if not requests:
            return []
        if probe is None and any(r.mode is None or r.online for r in requests):
            raise ValueError("requests without a forced mode, or with online switching, need a calibrated probe")
        if probe is None and self.record is None and any(r.record_every for r in requests):
            raise ValueError("recording (record_every) needs a probe: its decode pooling pools the records")
        need_hidden = self.collect_hidden or (self.prompt_feature == "hidden" and any(r.mode is None for r in requests))
        cache, mask, next_pos, out = eng.prefill([r.prompt_ids for r in requests], hidden=need_hidden)
        if self.kv_quant is not None:
            quantize_cache(cache, self.kv_quant, mask)
        keys, values = cache_kv(cache)
        embedding = kv_embedding(keys, values, mask) if self.keep_features else None  # /v1/embeddings' job
        feature = hidden_feature = difficulty = None
        if probe is not None:
            feature = pool_kv(keys, values, mask, probe.pooling)
            if need_hidden:
                hidden_feature = pool_hidden(out.hidden_states[1:], mask, probe.pooling)
            scored = hidden_feature if self.prompt_feature == "hidden" else feature
            if scored is not None:
                difficulty = probe.prompt_difficulty(scored, kind=self.prompt_feature).tolist()
        # KV-CoE's e_0: the last prompt position (present in every row with left padding).
        last = torch.full((len(requests),), mask.shape[1] - 1, dtype=torch.long)
        start_vecs = token_kv_vectors(keys, values, last)
        rows = []
        for i, req in enumerate(requests):
            d = difficulty[i] if difficulty else None
            mode = req.mode or ("slow" if d > self.online.tau else "fast")
            gen = None
            if req.temperature >= SAMPLING_EPS:
                gen = torch.Generator().manual_seed(req.seed if req.seed is not None else torch.seed())
            prefix = eng.prefix_ids[mode] if req.add_prefix else []
            row = Row(req=req, mode=mode, forced=deque(prefix), next_pos=int(next_pos[i]), generator=gen, difficulty=d, prompt_len=len(req.prompt_ids),
                      since_check=req.already % self.online.every, start_mode=mode, in_thought=mode == "slow",
                      think_tokens=req.already if mode == "slow" else 0)
            if self.keep_features:
                row.feature = None if feature is None else feature[i].clone()
                row.embedding = embedding[i].clone()
                row.hidden_feature = None if hidden_feature is None else hidden_feature[i].clone()
            row.traj.append(start_vecs[i])
            rows.append(row)
        if probe is not None:
            self._resume_streaks(rows, keys, values, mask)
        self._join(cache, mask, out.logits[:, -1, :], rows)
        return rows

    def _resume_streaks(self, rows: list[Row], keys, values, mask: torch.Tensor) -> None:
        """A resumed row (``GenRequest.already``) re-scores the online checks that preceded the
        resume point and are still part of a streak (the last ``confirm - 1``), from its prefilled
        cache, so it switches where the unbroken reply would have."""
        online, pooling = self.online, getattr(self.probe, "decode_pooling", self.probe.pooling)
        for i, row in enumerate(rows):
            req = row.req
            if not (req.already and req.online and online.confirm > 1):
                continue
            points = list(range(online.every, req.already + 1, online.every))[-(online.confirm - 1):]
            for g in points:  # the check after generated token g saw the cache up to and including it
                end = mask.shape[1] - (req.already - g)
                feats = pool_kv([k[i:i + 1, :, :end] for k in keys], [v[i:i + 1, :, :end] for v in values], mask[i:i + 1, :end], pooling)
                _, row.streak = switch_decision(row.mode, float(self.probe.decode_difficulty(feats)[0]), row.streak, online)

    def _join(self, cache, mask: torch.Tensor, logits: torch.Tensor, rows: list[Row]) -> None:
        if self.cache is None:
            self.cache, self.mask, self.logits, self.rows = cache, mask, logits, list(rows)
            return
        width = max(self.mask.shape[1], mask.shape[1])
        pad = lambda t, w: torch.nn.functional.pad(t, (0, 0, w - t.shape[-2], 0)) if t.shape[-2] < w else t  # noqa: E731
        for live, new in zip(self.cache.layers, cache.layers):
            live.keys = torch.cat([pad(live.keys, width), pad(new.keys, width)])
            live.values = torch.cat([pad(live.values, width), pad(new.values, width)])
        padm = lambda m: torch.nn.functional.pad(m, (width - m.shape[1], 0))  # noqa: E731
        self.mask = torch.cat([padm(self.mask), padm(mask)])
        self.logits = torch.cat([self.logits, logits])
        self.rows.extend(rows)

    def cancel(self, row: Row) -> None:
        """Drop ``row`` at the next step (a client went away); its result stays ``None``."""
        row.cancelled = True

    @torch.inference_mode()
    def step(self) -> list[Row]:
        """One decode step for every active row. Returns the rows that finished (``row.result``)."""
        eng, rows = self.engine, self.rows
        logits = self.logits
        feed, keep, fed_counted, done = [], [], [], []
        # Choose every sampled token first, then score them all with one batched softmax.
        self._thinking_caps()
        greedy = logits.argmax(-1).tolist()
        chosen: dict[int, int] = {}
        for b, row in enumerate(rows):
            if row.forced or row.cancelled:
                continue
            try:
                chosen[b] = greedy[b] if row.req.temperature < SAMPLING_EPS else eng._sample(row, logits[b])
            except Exception as exc:  # noqa: BLE001 — one row's failure ends that row, not the batch
                row.error = exc
        stats: dict[int, tuple] = {}
        if chosen:
            idx = list(chosen)
            stats = dict(zip(idx, zip(*(t.tolist() for t in token_stats(logits[idx], torch.tensor([chosen[b] for b in idx]))))))
        for b, row in enumerate(rows):
            if row.cancelled or row.error is not None:
                continue
            tok, counted = self._next_token(row, chosen.get(b), stats.get(b))
            if not row.forced:
                row.forced_counted = False
            total = row.generated + row.appended
            if row.finished or (counted and total >= row.req.max_new_tokens):
                row.result = eng._result(row)
                done.append(row)
                continue
            if counted:
                row.since_check += 1
            keep.append(b)
            feed.append(tok)
            fed_counted.append(counted)
        if len(keep) < len(rows):
            self._select(keep)
        if not self.rows:
            return done
        rows = self.rows
        positions = torch.tensor([[row.next_pos] for row in rows], dtype=torch.long)
        self.mask = torch.cat([self.mask, torch.ones((len(rows), 1), dtype=self.mask.dtype)], 1)
        out = eng.model(
            input_ids=torch.tensor(feed, dtype=torch.long).unsqueeze(1),
            attention_mask=self.mask,
            position_ids=positions,
            past_key_values=self.cache,
            use_cache=True,
            output_hidden_states=self.collect_hidden,
        )
        self.cache = out.past_key_values
        if self.kv_quant is not None:
            quantize_cache(self.cache, self.kv_quant, self.mask, start=self.mask.shape[1] - 1)
        self.logits = out.logits[:, -1, :]
        keys, values = cache_kv(self.cache)
        newest = torch.full((len(rows),), self.mask.shape[1] - 1, dtype=torch.long)
        k_at, v_at = token_kv_layers(keys, values, newest)
        vecs = torch.cat([k_at.mean(1), v_at.mean(1)], -1)
        per_layer = torch.stack([k_at, v_at], 1).to(torch.float64)  # [B, 2, L, D]
        for b, row in enumerate(rows):
            row.next_pos += 1
            if not fed_counted[b]:
                continue  # mode-prefix tokens belong to the prompt, not to the trajectory
            row.traj.append(vecs[b])
            row.traj_thought.append(row.in_thought)
            if row.layer_sums is None:
                row.layer_sums = torch.zeros(2, *per_layer.shape[1:], dtype=torch.float64)
            where = 0 if row.in_thought else 1
            row.layer_sums[where] += per_layer[b]
            row.layer_counts[where] += 1
            if self.collect_hidden:
                h = torch.stack([hs[b, -1] for hs in out.hidden_states]).float()
                row.hidden_sum = h if row.hidden_sum is None else row.hidden_sum + h
                row.hidden_n += 1
        if self.probe is not None:
            self._online_checks(keys, values)
        self._records(keys, values)
        self.exits.after_step()
        return done

    def _next_token(self, row: Row, sampled: int | None, stats: tuple | None) -> tuple[int, bool]:
        """The token ``row`` feeds next: its next forced token, else the sampled one (recorded with
        its max-prob / log-prob / entropy). Returns (token, whether it counts as generated)."""
        if row.forced:
            tok = row.forced.popleft()
            if row.forced_counted:
                row.appended += 1
                row.out_ids.append(tok)
            return tok, row.forced_counted
        mp, lp, ent = stats
        row.max_probs.append(mp)
        row.logprobs.append(lp)
        row.entropies.append(ent)
        row.generated += 1
        row.out_ids.append(sampled)
        if row.in_thought:
            row.think_tokens += 1
            close = self._close_tag
            if close and row.out_ids[-len(close):] == close:  # the model closed its thought itself
                row.in_thought = False
        if sampled == self.engine.eos_id:
            row.finished = True
        return sampled, True

    def _thinking_caps(self) -> None:
        """Close the thought of every row whose open thought reached its ``max_thinking_tokens``:
        the close-think tokens are forced (counted, as a switch's are) and no further switch follows."""
        for row in self.rows:
            cap = row.req.max_thinking_tokens
            if cap is None or row.forced or row.cancelled or not row.in_thought or row.think_tokens < cap:
                continue
            row.forced.extend(self.engine.switch_ids["fast"])
            row.forced_counted, row.mode, row.in_thought, row.capped = True, "fast", False, True
            row.switches = max(row.switches, self.online.max_switches)

    def _select(self, keep: list[int]) -> None:
        """Keep only the rows at ``keep``; drop cache columns no remaining row attends to."""
        self.rows = [self.rows[b] for b in keep]
        if not keep:
            self.cache = self.mask = self.logits = None
            return
        idx = torch.tensor(keep, dtype=torch.long)
        self.cache.batch_select_indices(idx)
        self.mask = self.mask[idx]
        self.logits = self.logits[idx]
        unused = int((self.mask.sum(0) == 0).long().cumprod(0).sum())  # leading all-padding columns
        if unused:
            for layer in self.cache.layers:
                layer.keys = layer.keys[:, :, unused:]
                layer.values = layer.values[:, :, unused:]
            self.mask = self.mask[:, unused:]

    def _online_checks(self, keys, values) -> None:
        online, probe, rows = self.online, self.probe, self.rows
        due = [
            b
            for b, row in enumerate(rows)
            if row.req.online
            and row.switches < online.max_switches
            and not row.forced
            and row.since_check >= online.every
        ]
        if not due:
            return
        idx = torch.tensor(due, dtype=torch.long)
        pooling = getattr(probe, "decode_pooling", probe.pooling)
        feats = pool_kv([k[idx] for k in keys], [v[idx] for v in values], self.mask[idx], pooling)
        scores = probe.decode_difficulty(feats).tolist()
        for b, d in zip(due, scores):
            row = rows[b]
            row.since_check = 0
            row.checks.append((row.generated + row.appended, float(d)))
            target, row.streak = switch_decision(row.mode, float(d), row.streak, online)
            if target is not None:
                row.switched_at = row.generated + row.appended
                row.switches += 1
                row.mode = target
                row.in_thought, row.think_tokens = target == "slow", 0
                row.forced.extend(self.engine.switch_ids[target])
                row.forced_counted = True

    def _records(self, keys, values) -> None:
        """Calibration records: the batch-wide ``record`` (offline), else each row's own
        ``GenRequest.record_every`` (a service's pool, pooled with its probe's decode pooling)."""
        if self.record is not None:
            self._record(keys, values, *self.record)
        elif any(row.req.record_every for row in self.rows):
            self._record(keys, values, getattr(self.probe, "decode_pooling", self.probe.pooling), None)

    def _record(self, keys, values, pooling: PoolingConfig, every: int | None) -> None:
        """Calibration: pool the last S cached positions every ``every`` counted tokens (None: each
        row's own ``GenRequest.record_every``; rows without one are not recorded)."""
        rows = self.rows
        step = [every or row.req.record_every for row in rows]
        due = [b for b, row in enumerate(rows) if step[b] and not row.forced and (row.generated + row.appended) % step[b] == 0]
        due = [b for b in due if not rows[b].recorded or rows[b].recorded[-1][0] != rows[b].generated + rows[b].appended]
        if not due:
            return
        idx = torch.tensor(due, dtype=torch.long)
        feats = pool_kv([k[idx] for k in keys], [v[idx] for v in values], self.mask[idx], pooling)
        for j, b in enumerate(due):
            row = rows[b]
            row.recorded.append((row.generated + row.appended, feats[j].clone()))
