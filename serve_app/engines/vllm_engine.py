"""Generation and KV features on vLLM (``AsyncLLM``), behind the serving core's stream interface
(``stream(request) → (new ids, None) ... ([], result)``, like ``ContinuousBatcher``).

- Modes: the prompt is ``prompt_ids + prefix_ids[mode]``, the same token ids the HF engine feeds.
- One vLLM request per reply. Online switching, thinking caps, KV-CoE and calibration records happen
  inside the engine while it decodes (``serve_app.engines.vllm_connector``: a KV connector, a logits
  processor and a scheduler subclass); the reply's checks, switch point and CoE path come back with
  its final output in ``kv_transfer_params``.
- Prompt features (probe feature, KV embedding) are one prefill of the prompt (``max_tokens=1``).
- Load (``stats``): the requests this engine streams, split into queued and running by vLLM's own
  scheduler stats (a stat logger).
"""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing
from typing import Any

import torch

from serve_app.core.confidence import CoePath
from serve_app.core.policy import OnlineConfig
from serve_app.core.probe import Probe
from serve_app.core.prompts import ModePrompts, ThinkTags
from serve_app.engines.base import (
    SAMPLING_EPS,
    EngineStats,
    GenRequest,
    GenResult,
    TokenSetup,
    checkpoint_dtype,
)

CONNECTOR = {"kv_connector": "KVFeatureConnector", "kv_connector_module_path": "serve_app.engines.vllm_connector", "kv_role": "kv_both"}


def engine_args(model: str, probe: Probe | None, online: OnlineConfig | None = None, tokens: TokenSetup | None = None,
                pooling=None, decode_pooling=None, **overrides: Any):
    """``AsyncEngineArgs`` for a local checkpoint with kvswitch inside: prefix caching on, the
    KV-feature connector (the probe's poolings and ``kv-decode`` head, the switching thresholds and
    switch tokens), the switch logits processor and the scheduler that hands results out in time.
    ``probe`` None (calibration): features and records only, no switching; ``pooling`` /
    ``decode_pooling`` then say how (they override the probe's when given)."""
    from transformers import AutoConfig
    from vllm.config import KVTransferConfig
    from vllm.engine.arg_utils import AsyncEngineArgs

    from serve_app.engines.vllm_connector import SCHEDULER
    from serve_app.engines.vllm_live import LOGITS_PROCESSOR

    extra: dict[str, Any] = {}
    if probe is not None:
        extra = {"pooling": probe.pooling.model_dump(), "decode_pooling": probe.decode_pooling.model_dump()}
        if getattr(probe, "path", None) is not None:
            extra["probe"] = str(probe.path)
    if pooling is not None:
        extra["pooling"] = pooling.model_dump()
    if decode_pooling is not None:
        extra["decode_pooling"] = decode_pooling.model_dump()
    if online is not None:
        extra["online"] = online.model_dump()
    if tokens is not None:
        extra["switch_ids"] = {m: list(ids) for m, ids in tokens.switch_ids.items()}
        extra["close_ids"] = tokens.tokenizer.encode(tokens.prompts.close_think.strip(), add_special_tokens=False)
    for fixed in ("scheduler_cls", "logits_processors", "async_scheduling", "kv_transfer_config"):
        if fixed in overrides:
            raise ValueError(f"vllm.{fixed} is set by kvswitch (its switching runs inside the engine); remove it from the pool's vllm settings")
    par = {k: overrides.get(k, 1) for k in ("tensor_parallel_size", "pipeline_parallel_size")}
    if max(par.values()) > 1:
        raise ValueError(f"kvswitch reads every head of every layer in one worker: {par} is not supported; scale with replicas")
    # vLLM's "auto" would halve a float32 checkpoint: the checkpoint's own dtype unless the caller gave one
    dtype = overrides.get("dtype") or checkpoint_dtype(AutoConfig.from_pretrained(model, local_files_only=True))
    opts = {"model": model, "dtype": dtype, "enable_prefix_caching": True, "enforce_eager": True, "async_scheduling": False,
            "scheduler_cls": SCHEDULER, "logits_processors": [LOGITS_PROCESSOR],
            "kv_transfer_config": KVTransferConfig(**CONNECTOR, kv_connector_extra_config=extra), **overrides}
    return AsyncEngineArgs(**opts)


class _SchedulerLoad:
    """A vLLM stat logger that keeps the engine's latest scheduler stats (queue depth, running)."""

    def __init__(self, vllm_config, engine_index: int = 0):
        self.engine_index = engine_index
        self.waiting = self.running = 0

    def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0):
        if scheduler_stats is not None:
            self.waiting, self.running = scheduler_stats.num_waiting_reqs, scheduler_stats.num_running_reqs

    def log_engine_initialized(self):
        pass

    def log(self):
        pass

    def record_sleep_state(self, is_awake: int, level: int):
        pass


class VLLMEngine(TokenSetup):
    """The vLLM ``Engine`` of a pool: ``AsyncLLM`` batches and schedules; kvswitch's connector, logits
    processor and scheduler inside it add modes, online switching and KV features."""

    def __init__(self, llm, tokenizer, probe: Probe | None, online: OnlineConfig, prompts: ModePrompts | ThinkTags | None = None, coe: bool | None = None,
                 load: _SchedulerLoad | None = None):
        super().__init__(tokenizer, prompts)
        self.llm, self.probe, self.online = llm, probe, online
        self.coe = bool(getattr(probe, "confidence", None)) if coe is None else coe
        """Record each reply's KV-CoE path (in the engine, one point per decoded token); default: when
        the probe has a confidence calibration to apply to it."""
        self._ids = itertools.count()
        self._live: dict[int, tuple[float, dict]] = {}
        self._load = load

    @classmethod
    def create(cls, model: str, probe: Probe | None, online: OnlineConfig, coe: bool | None = None, pooling=None, decode_pooling=None,
               prompts: ModePrompts | ThinkTags | None = None, **overrides: Any) -> VLLMEngine:
        """``prompts``: the mode prompts or the think tags (``TokenSetup``); ``overrides``:
        ``AsyncEngineArgs`` over ``engine_args``'s (dtype default: the checkpoint's)."""
        from transformers import AutoTokenizer
        from vllm.v1.engine.async_llm import AsyncLLM

        tokenizer = AutoTokenizer.from_pretrained(model, local_files_only=True)
        tokens = TokenSetup(tokenizer, prompts)
        loads: list[_SchedulerLoad] = []

        def factory(vllm_config, engine_index: int = 0):
            loads.append(_SchedulerLoad(vllm_config, engine_index))
            return loads[-1]

        args = engine_args(model, probe, online, tokens, pooling=pooling, decode_pooling=decode_pooling, **overrides)
        llm = AsyncLLM.from_engine_args(args, stat_loggers=[factory])
        return cls(llm, tokenizer, probe, online, tokens.prompts, coe=coe, load=loads[0] if loads else None)

    def _rid(self) -> str:
        return f"kvs-{next(self._ids)}-{uuid.uuid4().hex[:8]}"

    async def _run(self, seq: list[int], params, rid: str | None = None) -> AsyncIterator[Any]:
        from vllm import TokensPrompt

        async with aclosing(self.llm.generate(TokensPrompt(prompt_token_ids=list(seq)), params, rid or self._rid())) as outs:
            async for out in outs:  # closing this generator aborts the vLLM request
                yield out

    async def features(self, prompts: Sequence[Sequence[int]], embedding: bool = False) -> list[dict[str, torch.Tensor]]:
        """Probe feature (``kv``) and KV embedding of each prompt; vLLM batches the requests itself."""
        feats = await asyncio.gather(*(self.prompt_features(p) for p in prompts))
        return [f if embedding else {"kv": f["kv"]} for f in feats]

    async def prompt_features(self, prompt_ids: Sequence[int]) -> dict[str, torch.Tensor]:
        """Probe feature and KV embedding of a prompt from vLLM's paged cache: one prefill, one token."""
        from vllm import SamplingParams

        params = SamplingParams(temperature=0.0, max_tokens=1, detokenize=False, extra_args={"kv_transfer_params": {"kvswitch": "prompt"}})
        final = None
        async for final in self._run(prompt_ids, params):
            pass
        feats = ((final.kv_transfer_params or {}).get("kvswitch") or {}) if final is not None else {}
        if "kv" not in feats:
            raise RuntimeError("vLLM returned no KV feature: is the engine configured with serve_app.engines.vllm_connector?")
        return {k: torch.tensor(feats[k]) for k in ("kv", "embedding")}

    def _params(self, req: GenRequest, rid: str, record: int | None = None):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        mode = req.mode
        opts: dict[str, Any] = {"key": rid, "mode": mode, "already": req.already}
        if req.online and self.probe is not None:
            opts["online"] = True
        if self.coe:
            opts["coe_start"] = len(req.prompt_ids) - 1
        if req.max_thinking_tokens is not None:
            opts["max_thinking"] = req.max_thinking_tokens
        if record or req.record_every:
            opts["record"] = record or req.record_every
        sampled = req.temperature >= SAMPLING_EPS
        return SamplingParams(temperature=req.temperature if sampled else 0.0, top_p=req.top_p if sampled else 1.0,
                              seed=req.seed if sampled else None, max_tokens=req.max_new_tokens, skip_special_tokens=False,
                              detokenize=False, output_kind=RequestOutputKind.DELTA, extra_args={"kv_transfer_params": {"kvswitch": opts}})

    async def stream(self, req: GenRequest, predicted_tokens: float = 0.0, record: int | None = None) -> AsyncIterator[tuple[list[int], GenResult | None]]:
        if req.mode is None:
            raise ValueError("the vLLM engine serves a pool: the request's mode must be fast or slow")
        if req.early_exit is not None:
            raise ValueError(f"early exit ({req.early_exit.kind}) probes answers in side branches of the HF engine's cache; "
                             "the vLLM engine has no such branch: use engine hf for it")
        seq = list(req.prompt_ids) + (self.prefix_ids[req.mode] if req.add_prefix else [])
        rid = self._rid()
        state = {"out": 0}
        key = id(state)
        self._live[key] = (predicted_tokens, state)
        out: list[int] = []
        final = None
        try:
            async with aclosing(self._run(seq, self._params(req, rid, record), rid)) as outs:
                async for final in outs:
                    ids = list(final.outputs[0].token_ids)
                    if ids:
                        out.extend(ids)
                        state["out"] = len(out)
                        yield ids, None
            yield [], self._result(req, out, final)
        finally:  # also when the consumer closes the stream: the running vLLM request is aborted with it
            self._live.pop(key, None)

    def _result(self, req: GenRequest, out: list[int], final) -> GenResult:
        res = ((final.kv_transfer_params or {}).get("kvswitch") or {}) if final is not None else {}
        text = self.tokenizer.decode(out)
        prefix = self.prompts.fast_prefix if req.mode == "fast" else self.prompts.slow_prefix
        finished = final is not None and final.outputs[0].finish_reason == "stop"
        result = GenResult(text=text, reply=prefix + text, tokens=len(out), finished=finished, start_mode=req.mode,
                           end_mode=res.get("end_mode", req.mode), switched_at=res.get("switched_at"),
                           checks=[(int(t), float(d)) for t, d in res.get("checks", [])], thinking_capped=bool(res.get("capped")),
                           token_ids=list(out))
        if self.coe and out:
            coe = res.get("coe") or {"steps": [], "span": [0.0, 0.0]}
            result.kv_trajectory = CoePath(coe["steps"], coe["span"])
            if "layer_sums" in coe:
                result.kv_layer_sums = torch.tensor(coe["layer_sums"], dtype=torch.float64)
                result.kv_counts = (int(coe["counts"][0]), int(coe["counts"][1]))
        result.recorded = [(int(t), torch.tensor(f)) for t, f in res.get("recorded", [])]
        return result

    def stats(self) -> EngineStats:
        """The requests this engine streams, queued vs running as vLLM's scheduler last reported, and
        the predicted tokens still to generate."""
        live = list(self._live.values())
        outstanding = sum(max(pred - st["out"], 0.0) for pred, st in live)
        waiting = min(self._load.waiting, len(live)) if self._load is not None else 0
        return EngineStats(queued=waiting, running=len(live) - waiting, predicted_tokens=float(outstanding))
