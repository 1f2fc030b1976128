"""Side-branch answer probes for the HF engine's decode batch: Dynasor-CoT and DEER early exit
(the rules: ``serve_app.core.early_exit``).

A probe copies the probing rows of the live cache (``Tensor[idx]`` copies; the other rows are not
touched), appends the close-think tokens and the rule's answer prefix there, and decodes the answer
greedily until EOS or ``max_answer_tokens``. The copy is dropped afterwards: the main reply's cache,
mask and logits are exactly what they would be without the probe (tests/test_peers.py).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache

from serve_app.core.early_exit import EarlyExit, probe_due, should_exit
from serve_app.core.quant import quantize_cache

Row = Any
"""A ``serve_app.engines.decode.Row`` (not imported: decode imports this module)."""


@torch.inference_mode()
def side_answers(model, cache, mask: torch.Tensor, rows: list[int], positions: list[int], probe_ids: list[int], eos_id: int,
                 max_tokens: int, kv_quant=None) -> list[tuple[list[int], list[float], bool]]:
    """Greedy answers of the cache rows ``rows`` after ``probe_ids``, in a copy of their cache.
    Returns per row (answer token ids without EOS, each one's probability, ended with EOS)."""
    idx = torch.tensor(rows, dtype=torch.long)
    side = DynamicCache(config=model.config)
    for layer_idx, layer in enumerate(cache.layers):
        side.update(layer.keys[idx], layer.values[idx], layer_idx)
    n, width = len(rows), len(probe_ids)
    side_mask = torch.cat([mask[idx], torch.ones((n, width), dtype=mask.dtype)], 1)
    pos = torch.tensor(positions, dtype=torch.long)[:, None] + torch.arange(width)
    feed = torch.tensor([probe_ids] * n, dtype=torch.long)
    ids: list[list[int]] = [[] for _ in range(n)]
    probs: list[list[float]] = [[] for _ in range(n)]
    ended = [False] * n
    for t in range(max_tokens):
        out = model(input_ids=feed, attention_mask=side_mask, position_ids=pos, past_key_values=side, use_cache=True)
        side = out.past_key_values
        if kv_quant is not None:
            quantize_cache(side, kv_quant, side_mask, start=side_mask.shape[1] - feed.shape[1])
        p = torch.softmax(out.logits[:, -1, :].float(), -1)
        best = p.argmax(-1)
        for i in range(n):
            if ended[i]:
                continue
            if int(best[i]) == eos_id:
                ended[i] = True
            else:
                ids[i].append(int(best[i]))
                probs[i].append(float(p[i, best[i]]))
        if all(ended) or t == max_tokens - 1:
            break
        side_mask = torch.cat([side_mask, torch.ones((n, 1), dtype=mask.dtype)], 1)
        pos = pos[:, -1:] + 1
        feed = best[:, None]
    return [(ids[i], probs[i], ended[i]) for i in range(n)]


class EarlyExits:
    """The early-exit rules of a ``DecodeBatch``'s rows: after each step, probe the rows that are
    due (``probe_due``) in side branches, and end the thoughts whose rule fires (``should_exit``)."""

    def __init__(self, batch: Any):
        """``batch``: the ``serve_app.engines.decode.DecodeBatch`` whose rows this serves."""
        self.batch = batch
        self._ends_line: dict[int, bool] = {}
        self._probe_ids: dict[str, list[int]] = {}

    def _line_end(self, token: int) -> bool:
        if token not in self._ends_line:
            self._ends_line[token] = "\n" in self.batch.engine.tokenizer.decode([token])
        return self._ends_line[token]

    def _due(self, row: Row) -> bool:
        rule = row.req.early_exit
        if rule is None or not row.in_thought or row.forced or row.cancelled or row.exited_at is not None or not row.out_ids:
            return False
        if row.probed_at == row.think_tokens:
            return False
        return probe_due(rule, row.think_tokens, self._line_end(row.out_ids[-1]))

    def _ids(self, rule: EarlyExit) -> list[int]:
        if rule.answer_prefix not in self._probe_ids:
            eng = self.batch.engine
            self._probe_ids[rule.answer_prefix] = list(eng.switch_ids["fast"]) + eng.tokenizer.encode(rule.answer_prefix, add_special_tokens=False)
        return self._probe_ids[rule.answer_prefix]

    def after_step(self) -> None:
        batch = self.batch
        due = [b for b, row in enumerate(batch.rows) if self._due(row)]
        groups: dict[tuple, list[int]] = {}
        for b in due:
            rule = batch.rows[b].req.early_exit
            groups.setdefault((rule.answer_prefix, rule.max_answer_tokens), []).append(b)
        for (prefix, max_tokens), members in groups.items():
            rows = [batch.rows[b] for b in members]
            probe_ids = self._ids(rows[0].req.early_exit)
            answers = side_answers(batch.engine.model, batch.cache, batch.mask, members, [r.next_pos for r in rows], probe_ids,
                                   batch.engine.eos_id, max_tokens, batch.kv_quant)
            for row, (ids, probs, ended) in zip(rows, answers):
                row.probed_at = row.think_tokens
                row.probe_tokens += len(probe_ids) + len(ids) + int(ended)
                row.probe_answers.append(batch.engine.tokenizer.decode(ids).strip() if ended else None)
                if should_exit(row.req.early_exit, row.probe_answers, probs):
                    self._exit(row)

    def _exit(self, row: Row) -> None:
        """End the thought: the close-think tokens go into the main reply (counted), no switch follows."""
        batch = self.batch
        row.exited_at = row.generated + row.appended
        row.forced.extend(batch.engine.switch_ids["fast"])
        row.forced_counted, row.mode, row.in_thought = True, "fast", False
        row.switches = max(row.switches, batch.online.max_switches)
