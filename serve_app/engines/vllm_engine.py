"""Generation and KV features on vLLM (``AsyncLLM``), behind the serving core's stream interface
(``stream(request) → (new ids, None) ... ([], result)``, like ``ContinuousBatcher``).

- Modes: the prompt is ``prompt_ids + prefix_ids[mode]``, the same token ids the HF engine feeds.
- KV features come from vLLM's own paged cache through ``serve_app.engines.vllm_connector``; only
  requests that ask for them (``extra_args.kv_transfer_params.kvswitch``) are pooled.
- Online switching is *chunked decoding with prefix caching*: a request decodes at most ``every``
  tokens; at each check a scoring request over ``prompt + generated`` (all but its last partial
  block served from the prefix cache) returns the decode feature and, when no switch is due, the
  next token, which is kept. A switch appends the switch tokens, exactly as the HF engine does.
"""

from __future__ import annotations

import asyncio
import itertools
import uuid
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Sequence

import torch

from serve_app.core.policy import OnlineConfig, switch_decision
from serve_app.core.probe import Probe
from serve_app.core.prompts import ModePrompts
from serve_app.engines.base import EngineStats, GenRequest, GenResult, TokenSetup

CONNECTOR = {"kv_connector": "KVFeatureConnector", "kv_connector_module_path": "serve_app.engines.vllm_connector", "kv_role": "kv_both"}


def engine_args(model: str, probe: Probe, **overrides: Any):
    """``AsyncEngineArgs`` for the embedded model (or any local checkpoint): prefix caching on,
    the KV-feature connector configured with the probe's poolings."""
    from vllm.config import KVTransferConfig
    from vllm.engine.arg_utils import AsyncEngineArgs

    extra = {"pooling": probe.pooling.model_dump(), "decode_pooling": probe.decode_pooling.model_dump()}
    opts = {"model": model, "dtype": "float32", "enable_prefix_caching": True, "enforce_eager": True,
            "kv_transfer_config": KVTransferConfig(**CONNECTOR, kv_connector_extra_config=extra), **overrides}
    return AsyncEngineArgs(**opts)


@dataclass
class _State:
    req: GenRequest
    mode: str
    seq: list[int]
    out: list[int] = field(default_factory=list)
    since: int = 0
    streak: int = 0
    switches: int = 0
    switched_at: int | None = None
    start_mode: str = "fast"
    checks: list[tuple[int, float]] = field(default_factory=list)
    finished: bool = False
    in_thought: bool = False
    think: int = 0
    capped: bool = False


class VLLMEngine(TokenSetup):
    """The vLLM ``Engine`` of a pool: ``AsyncLLM`` batches and schedules; this class adds modes, online
    switching and KV features."""

    def __init__(self, llm, tokenizer, probe: Probe, online: OnlineConfig, prompts: ModePrompts = ModePrompts(), coe: bool = True):
        super().__init__(tokenizer, prompts)
        self.llm, self.probe, self.online = llm, probe, online
        self.coe = coe and bool(getattr(probe, "confidence", None))
        """Record each reply's KV-CoE trajectory (one extra, prefix-cached request per reply)."""
        self._ids = itertools.count()
        self._live: dict[int, tuple[float, _State]] = {}

    @classmethod
    def create(cls, model: str, probe: Probe, online: OnlineConfig, **overrides: Any) -> "VLLMEngine":
        from transformers import AutoTokenizer
        from vllm.v1.engine.async_llm import AsyncLLM

        llm = AsyncLLM.from_engine_args(engine_args(model, probe, **overrides))
        return cls(llm, AutoTokenizer.from_pretrained(model, local_files_only=True), probe, online)

    def _rid(self) -> str:
        return f"kvs-{next(self._ids)}-{uuid.uuid4().hex[:8]}"

    def _params(self, req: GenRequest, max_tokens: int, features: str | None = None):
        from vllm import SamplingParams

        extra = {"kv_transfer_params": {"kvswitch": features}} if features else None
        seed = req.seed if req.temperature > 0 else None
        return SamplingParams(temperature=req.temperature, top_p=req.top_p if req.temperature > 0 else 1.0, seed=seed,
                              max_tokens=max_tokens, skip_special_tokens=False, detokenize=False, extra_args=extra)

    async def _run(self, seq: list[int], params) -> AsyncIterator[Any]:
        from vllm import TokensPrompt

        async with aclosing(self.llm.generate(TokensPrompt(prompt_token_ids=list(seq)), params, self._rid())) as outs:
            async for out in outs:  # closing this generator aborts the vLLM request
                yield out

    async def features(self, prompts: Sequence[Sequence[int]], embedding: bool = False) -> list[dict[str, torch.Tensor]]:
        """Probe feature (``kv``) and KV embedding of each prompt; vLLM batches the requests itself."""
        feats = await asyncio.gather(*(self.prompt_features(p) for p in prompts))
        return [f if embedding else {"kv": f["kv"]} for f in feats]

    async def prompt_features(self, prompt_ids: Sequence[int], which: str = "prompt") -> dict[str, torch.Tensor]:
        """Probe feature (and KV embedding) of a prompt from vLLM's paged cache: one prefill, one token."""
        from vllm import SamplingParams

        params = SamplingParams(temperature=0.0, max_tokens=1, detokenize=False, extra_args={"kv_transfer_params": {"kvswitch": which}})
        final = None
        async for final in self._run(prompt_ids, params):
            pass
        feats = (final.kv_transfer_params or {}).get("kvswitch") if final is not None else None
        if not feats:
            raise RuntimeError("vLLM returned no KV feature: is the engine configured with serve_app.engines.vllm_connector?")
        return {k: torch.tensor(v) for k, v in feats.items()}

    async def stream(self, req: GenRequest, predicted_tokens: float = 0.0) -> AsyncIterator[tuple[list[int], GenResult | None]]:
        if req.mode is None:
            raise ValueError("the vLLM engine serves a pool: the request's mode must be fast or slow")
        st = _State(req, req.mode, list(req.prompt_ids) + (self.prefix_ids[req.mode] if req.add_prefix else []), start_mode=req.mode,
                    since=req.already % self.online.every, in_thought=req.mode == "slow", think=req.already if req.mode == "slow" else 0)
        key = id(st)
        self._live[key] = (predicted_tokens, st)
        try:
            while not st.finished and len(st.out) < req.max_new_tokens:
                if self._cap_due(st):
                    yield self._close_thought(st), None
                    continue
                if self._check_due(st):
                    new = await self._check(st)
                else:
                    async with aclosing(self._chunk(st)) as chunk:
                        async for ids in chunk:
                            yield ids, None
                    continue
                if new:
                    yield new, None
            result = self._result(st)
            if self.coe and st.out:
                result.kv_trajectory = await self._trajectory(st)
            yield [], result
        finally:  # also when the consumer closes the stream: the running vLLM request is aborted with it
            self._live.pop(key, None)

    def _check_due(self, st: _State) -> bool:
        o = self.online
        return st.req.online and st.switches < o.max_switches and st.since >= o.every

    def _cap_due(self, st: _State) -> bool:
        cap = st.req.max_thinking_tokens
        return cap is not None and st.in_thought and st.think >= cap

    def _close_thought(self, st: _State) -> list[int]:
        """``max_thinking_tokens`` reached: force the close-think tokens; no switch follows."""
        st.mode, st.in_thought, st.capped, st.switches = "fast", False, True, max(st.switches, self.online.max_switches)
        return self._take(st, list(self.switch_ids["fast"]), forced=True)

    def _take(self, st: _State, ids: list[int], forced: bool = False) -> list[int]:
        ids = ids[: st.req.max_new_tokens - len(st.out)]
        if st.in_thought and not forced:
            close = self.tokenizer.encode(self.prompts.close_think.strip(), add_special_tokens=False)
            for n in range(len(ids)):
                st.think += 1
                if close and (st.out + ids[: n + 1])[-len(close):] == close:  # the model closed its thought itself
                    st.in_thought = False
                    break
        st.out.extend(ids)
        st.seq.extend(ids)
        st.since += len(ids)
        if self.eos_id in ids:
            st.finished = True
        return ids

    async def _chunk(self, st: _State) -> AsyncIterator[list[int]]:
        budget = st.req.max_new_tokens - len(st.out)
        if st.req.online and st.switches < self.online.max_switches:
            budget = min(budget, self.online.every - st.since)
        if st.req.max_thinking_tokens is not None and st.in_thought:
            budget = min(budget, st.req.max_thinking_tokens - st.think)
        seen = 0
        final = None
        async with aclosing(self._run(st.seq, self._params(st.req, budget))) as outs:
            async for final in outs:
                ids = list(final.outputs[0].token_ids)[seen:]
                seen += len(ids)
                if ids:
                    yield self._take(st, ids)
        if final is not None and final.outputs[0].finish_reason == "stop":
            st.finished = True

    async def _check(self, st: _State) -> list[int]:
        """Score ``seq`` with the decode probe; switch, or keep the token the scoring request sampled."""
        st.since = 0
        final = None
        async for final in self._run(st.seq, self._params(st.req, 1, features="decode")):
            pass
        feats = final.kv_transfer_params["kvswitch"]
        d = float(self.probe.decode_difficulty(torch.tensor([feats["kv"]]))[0])
        st.checks.append((len(st.out), d))
        target, st.streak = switch_decision(st.mode, d, st.streak, self.online)
        if target is not None:
            st.switched_at = len(st.out)
            st.switches += 1
            st.mode = target
            st.in_thought, st.think = target == "slow", 0
            return self._take(st, list(self.switch_ids[target]), forced=True)
        new = self._take(st, list(final.outputs[0].token_ids))
        if final.outputs[0].finish_reason == "stop":
            st.finished = True
        return new

    async def _trajectory(self, st: _State) -> torch.Tensor:
        """The reply's KV-CoE trajectory, as the HF engine records it: the last shared-prompt position,
        then every generated token that was fed back (all but the last). One request over the
        sequence, served from the prefix cache but for its last partial block."""
        from vllm import SamplingParams

        prompt_end = len(st.seq) - len(st.out)
        first = len(st.req.prompt_ids) - 1 if st.req.add_prefix else prompt_end - 1
        params = SamplingParams(temperature=0.0, max_tokens=1, detokenize=False,
                                extra_args={"kv_transfer_params": {"kvswitch": "trajectory", "kvswitch_start": [first, prompt_end]}})
        final = None
        async for final in self._run(st.seq[:-1], params):
            pass
        return torch.tensor(final.kv_transfer_params["kvswitch"]["trajectory"])

    def _result(self, st: _State) -> GenResult:
        text = self.tokenizer.decode(st.out)
        prefix = self.prompts.fast_prefix if st.start_mode == "fast" else self.prompts.slow_prefix
        return GenResult(text=text, reply=prefix + text, tokens=len(st.out), finished=st.finished, start_mode=st.start_mode,
                         end_mode=st.mode, switched_at=st.switched_at, checks=st.checks, thinking_capped=st.capped)

    def stats(self) -> EngineStats:
        """Running requests and predicted tokens still to generate (vLLM queues internally: queued is 0)."""
        live = list(self._live.values())
        outstanding = sum(max(pred - len(st.out), 0.0) for pred, st in live)
        return EngineStats(queued=0, running=len(live), predicted_tokens=float(outstanding))
