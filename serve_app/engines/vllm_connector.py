"""kvswitch inside vLLM: KV features, online switching and KV-CoE while vLLM decodes, through three of
vLLM 0.32's own extension points. No extra request, no restart, no file.

- ``KVFeatureConnector`` (a ``KVConnectorBase_V1``). vLLM calls ``save_kv_layer`` in every attention
  layer right after the layer wrote the step's K/V into the paged cache. For the requests that asked
  (``SamplingParams.extra_args["kv_transfer_params"]["kvswitch"]``) the worker side reads only what
  this step needs (``serve_app.engines.vllm_kv``): the prompt at the end of a features request's
  prefill; one position per layer per decoded token for KV-CoE; the last S positions of the last n
  layers when an online check or a calibration record is due. Per step and request the work does not
  grow with the reply's length. Results go back to the scheduler side as vLLM's worker metadata
  (``build_connector_worker_meta``) and out with the request's final output in ``kv_transfer_params``.
- ``SwitchLogitsProcessor`` (``serve_app.engines.vllm_live``, same worker process). It follows every
  tracked reply's tokens and forces the switch text into the *same running request* when the one
  shared ``switch_decision`` fires, or the close-think text when ``max_thinking`` is reached.
- ``KVSwitchScheduler`` (vLLM's ``Scheduler``, one change). vLLM frees a request that finishes in a
  step, and hands out its ``kv_transfer_params``, before it passes that step's worker metadata to
  the connector; this scheduler passes it first, so a reply's last step is part of its results.

Request options (``kvswitch``): the string ``"prompt"`` (probe feature + KV embedding of the prompt;
send with ``max_tokens=1``), or a dict with any of ``key`` (unique id; required for switching and
thinking caps), ``prompt`` (bool), ``mode`` (``fast``/``slow``: the mode the prompt's prefix opened),
``online`` (bool), ``coe_start`` (position of KV-CoE's ``e_0``), ``record`` (pool the decode feature
every this many tokens: calibration), ``max_thinking`` and ``already`` (tokens generated before a
resume). The final output's ``kv_transfer_params["kvswitch"]`` holds ``kv``/``embedding``,
``checks`` [[tokens, d]], ``switched_at``, ``end_mode``, ``capped``, ``coe`` {steps, span} and
``recorded`` [[tokens, feature]], as asked.

Engine settings (``kv_connector_extra_config``, built by ``serve_app.engines.vllm_engine.engine_args``):
``pooling``, ``decode_pooling``, ``probe`` (path of the probe checkpoint; its ``kv-decode`` head runs
in the worker), ``online`` (``OnlineConfig``), ``switch_ids`` {mode: token ids}, ``close_ids``.
One worker only: with tensor or pipeline parallelism each rank holds part of the heads or layers,
so the connector refuses those settings at start-up.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorWorkerMetadata,
)
from vllm.v1.core.sched.scheduler import Scheduler

from serve_app.core.confidence import step_summary
from serve_app.core.kv_features import (
    EMBEDDING_LAYERS,
    PoolingConfig,
    kv_embedding,
    pool_kv,
)
from serve_app.core.policy import OnlineConfig
from serve_app.engines.vllm_kv import SLOTS, layout_for_backend, read_slots, token_slots
from serve_app.engines.vllm_live import ENGINE, Live, request_options

log = logging.getLogger(__name__)

SCHEDULER = "serve_app.engines.vllm_connector.KVSwitchScheduler"
_LAYER = re.compile(r"layers\.(\d+)\.")


# ---------------------------------------------------------------------------- metadata types


@dataclass
class _Step:
    """Scheduler → worker, per tracked request scheduled in a step."""

    key: str
    req_id: str
    tokens: int
    """Positions in the cache once this step's forward has run."""
    new_blocks: list[int] | None = None
    replace_blocks: bool = False
    opts: dict | None = None
    prompt_len: int = 0


@dataclass
class FeatureMeta(KVConnectorMetadata):
    steps: list[_Step] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)


@dataclass
class ResultMeta(KVConnectorWorkerMetadata):
    """Worker → scheduler: what each tracked reply gained in a step."""

    results: dict[str, dict] = field(default_factory=dict)

    def aggregate(self, other: ResultMeta) -> ResultMeta:
        for key, res in other.results.items():
            merge_result(self.results.setdefault(key, {}), res)
        return self


def merge_result(into: dict, new: dict) -> None:
    """Add one step's results of a reply to what the scheduler holds for it."""
    for name, value in new.items():
        if name in ("checks", "recorded"):
            into.setdefault(name, []).extend(value)
        elif name == "coe":
            coe = into.setdefault("coe", {"steps": [], "span": [0.0, 0.0]})
            coe["steps"].extend(value["steps"])
            coe["span"] = value["span"]
            if "layer_sums" in value:  # per-layer K/V sums over generated tokens (layer-axis KV-CoE)
                sums = coe.setdefault("layer_sums", torch.zeros_like(value["layer_sums"]))
                sums += value["layer_sums"]
                coe["counts"] = [a + b for a, b in zip(coe.get("counts", [0, 0]), value["counts"])]
        else:
            into[name] = value


# ------------------------------------------------------------------------------ the connector


class KVFeatureConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config, role: KVConnectorRole, kv_cache_config=None):
        super().__init__(vllm_config, role, kv_cache_config)
        par = vllm_config.parallel_config
        if par.tensor_parallel_size > 1 or par.pipeline_parallel_size > 1:
            raise ValueError(f"the kvswitch KV connector reads every head of every layer in one worker; tensor_parallel_size="
                             f"{par.tensor_parallel_size}, pipeline_parallel_size={par.pipeline_parallel_size} split them across "
                             "workers. Serve with one worker per engine (use more replicas instead).")
        extra = self._kv_transfer_config.kv_connector_extra_config or {}
        self.pooling = PoolingConfig(**extra.get("pooling", {}))
        self.decode_pooling = PoolingConfig(**extra.get("decode_pooling", extra.get("pooling", {})))
        self.num_layers = vllm_config.model_config.get_num_layers(par)
        self.prompt_layers = set(range(max(self.num_layers - max(self.pooling.last_layers, EMBEDDING_LAYERS), 0), self.num_layers))
        self.decode_layers = set(range(max(self.num_layers - self.decode_pooling.last_layers, 0), self.num_layers))
        if role == KVConnectorRole.SCHEDULER:
            sched = vllm_config.scheduler_config.scheduler_cls
            name = sched if isinstance(sched, str) else f"{getattr(sched, '__module__', '')}.{getattr(sched, '__name__', '')}"
            if name != SCHEDULER:
                raise ValueError(f"the kvswitch KV connector needs scheduler_cls={SCHEDULER!r} (vLLM hands a finishing request's "
                                 f"kv_transfer_params out before its last step's results otherwise); got {sched!r}")
            self._tracked: dict[str, tuple[str, dict]] = {}  # req_id -> (key, opts)
            self._results: dict[str, dict] = {}
            self._finished: list[str] = []
            return
        # worker side
        self.slots = None  # the reader of this engine's cache layout: register_kv_caches asks vLLM's backend
        ENGINE.online = OnlineConfig(**extra["online"]) if extra.get("online") else None
        ENGINE.switch_ids = {m: list(ids) for m, ids in (extra.get("switch_ids") or {}).items()}
        ENGINE.close_ids = list(extra.get("close_ids") or [])
        if extra.get("probe"):
            from serve_app.core.probe import Probe

            ENGINE.probe = Probe.load(extra["probe"])
        self._plan: list[tuple[Live, _Step]] = []
        self._coe: tuple[list[Live], torch.Tensor, torch.Tensor] | None = None
        self._coe_sum: torch.Tensor | None = None
        self._coe_layers: list[torch.Tensor] = []
        """This step's KV-CoE points per layer ([N, 2D] each, layer order), for the layer-axis sums."""
        self._tail: dict[str, tuple[torch.Tensor, torch.Tensor, int]] = {}
        self._groups: dict[int, tuple[list[Live], torch.Tensor, torch.Tensor]] = {}
        self._group_kv: dict[int, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
        self._kv: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
        self._step_results: dict[str, dict] = {}
        self._keys: dict[str, str] = {}  # vLLM request id -> reply key

    # ------------------------------------------------------------------------------ worker side
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        """Once the paged cache exists: pick its reader from the attention backend vLLM chose
        (``serve_app.engines.vllm_kv.layout_for_backend``); an unreadable layout fails start-up."""
        name, cache = next(iter(kv_caches.items()))
        layer = self._vllm_config.compilation_config.static_forward_context[name]
        backend = layer.get_attn_backend()
        layout = layout_for_backend(backend, dtype=cache.dtype, block_size=cache.shape[2],
                                    head_size=self._vllm_config.model_config.get_head_size(),
                                    kv_cache_dtype=str(self._vllm_config.cache_config.cache_dtype))
        self.slots = SLOTS[layout]
        log.info("kvswitch: reading the %s paged cache with the %r layout", backend.get_name(), layout)

    def bind_connector_metadata(self, connector_metadata) -> None:
        """Plan this step: which positions of which layers each tracked reply needs."""
        super().bind_connector_metadata(connector_metadata)
        for req_id in connector_metadata.finished:
            ENGINE.live.pop(self._keys.pop(req_id, None), None)
        self._plan, self._tail, self._kv, self._groups, self._group_kv = [], {}, {}, {}, {}
        coe_lives, coe_pos = [], []
        tails: dict[int, list[tuple[Live, list[int], list[int]]]] = {}
        for st in connector_metadata.steps:
            live = ENGINE.get(st.key, st.opts or {})
            if st.opts is not None:
                live.req_id, live.prompt_len = st.req_id, st.prompt_len
                self._keys[st.req_id] = st.key
            if st.new_blocks is not None:
                live.blocks = list(st.new_blocks) if st.replace_blocks else live.blocks + list(st.new_blocks)
            live.tokens = st.tokens
            self._plan.append((live, st))
            if live.tokens < live.prompt_len:
                continue  # prefill still running (chunked)
            opts = live.opts
            start = opts.get("coe_start")
            if start is not None:
                new = ([int(start)] if live.first is None else []) + list(range(max(live.done_pos + 1, live.prompt_len), live.tokens))
                if live.first is None:
                    live.done_pos = live.prompt_len - 1
                for p in new:
                    coe_lives.append(live)
                    coe_pos.append(p)
                if new:
                    live.done_pos = max(live.done_pos, live.tokens - 1)
            if opts.get("prompt") and not live.prompt_done:
                self._tail[live.key] = (*self._positions(live, range(live.prompt_len)), live.prompt_len)
            elif live.check_due() or live.record_due():
                s = min(self.decode_pooling.last_tokens, live.tokens)
                slots = [self._slot(live, p) for p in range(live.tokens - s, live.tokens)]
                tails.setdefault(s, []).append((live, [b for b, _ in slots], [o for _, o in slots]))
        for s, group in tails.items():  # the due checks of a step: one read per layer, one pooling, one probe call
            self._groups[s] = ([lv for lv, _, _ in group], torch.tensor([b for _, bl, _ in group for b in bl]),
                               torch.tensor([o for _, _, ol in group for o in ol]))
        self._coe = None
        if coe_pos:
            blocks, offsets = zip(*(self._slot(lv, p) for lv, p in zip(coe_lives, coe_pos)))
            self._coe = (coe_lives, torch.tensor(blocks), torch.tensor(offsets))
            self._coe_sum, self._coe_layers = None, []

    def _slot(self, live: Live, pos: int) -> tuple[int, int]:
        bs = self._block_size
        return live.blocks[pos // bs], pos % bs

    def _positions(self, live: Live, positions: range) -> tuple[torch.Tensor, torch.Tensor]:
        blocks, offsets = token_slots(live.blocks, positions.stop, self._block_size)
        return blocks[positions.start:], offsets[positions.start:]

    @property
    def _block_size(self) -> int:
        return self._vllm_config.cache_config.block_size

    def start_load_kv(self, forward_context, **kwargs: Any) -> None:
        return None

    def wait_for_layer_load(self, layer_name: str) -> None:
        return None

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata, **kwargs: Any) -> None:
        if not self._plan:
            return
        if self.slots is None:
            raise RuntimeError("the kvswitch connector was handed no paged cache (register_kv_caches was not called)")
        match = _LAYER.search(layer_name)
        if match is None:
            return
        layer = int(match.group(1))
        if self._coe is not None:
            _, blocks, offsets = self._coe
            k, v = read_slots(self.slots, kv_layer, blocks.to(kv_layer.device), offsets.to(kv_layer.device))
            point = torch.cat([k.flatten(1), v.flatten(1)], -1).to(torch.float32)
            self._coe_sum = point if self._coe_sum is None else self._coe_sum + point
            self._coe_layers.append(point)
        if layer in self.decode_layers:
            for s, (lives, blocks, offsets) in self._groups.items():
                k, v = read_slots(self.slots, kv_layer, blocks.to(kv_layer.device), offsets.to(kv_layer.device))  # [R*s, H, D]
                shape = (len(lives), s, *k.shape[1:])
                self._group_kv.setdefault(s, {})[layer] = (k.reshape(shape).transpose(1, 2), v.reshape(shape).transpose(1, 2))
        for key, (blocks, offsets, _) in self._tail.items():
            if layer in self.prompt_layers:
                k, v = read_slots(self.slots, kv_layer, blocks.to(kv_layer.device), offsets.to(kv_layer.device))
                self._kv.setdefault(key, {})[layer] = (k.permute(1, 0, 2).unsqueeze(0), v.permute(1, 0, 2).unsqueeze(0))

    def wait_for_save(self) -> None:
        """End of the forward: KV-CoE points, features, online checks; this step's results."""
        if not self._plan:
            return
        if self._coe is not None and self._coe_sum is not None:
            lives, _, _ = self._coe
            points = (self._coe_sum / self.num_layers).cpu()
            per_layer = torch.stack(self._coe_layers, 1).cpu().to(torch.float64)  # [N, L, 2D]
            per_layer = torch.stack(per_layer.chunk(2, -1), 1)  # [N, 2 (K, V), L, D]
            once = len({id(lv) for lv in lives}) == len(lives) and all(lv.first is not None for lv in lives)
            if once:  # the usual decode step: one new point per reply, summarised in one batch
                sums = step_summary(torch.stack([lv.prev for lv in lives]), points, torch.stack([lv.first for lv in lives])).tolist()
            for j, (live, point) in enumerate(zip(lives, points)):
                if live.first is None:
                    live.first = live.prev = point
                    continue
                sn, sa, en, ea = sums[j] if once else step_summary(live.prev, point, live.first).tolist()
                coe = live.result.setdefault("coe", {"steps": [], "span": [0.0, 0.0]})
                coe["steps"].append([sn, sa])
                coe["span"] = [en, ea]
                where = 0 if live.in_thought else 1  # as the HF engine: thought = fed inside an open thought
                layer_sums = coe.setdefault("layer_sums", torch.zeros(2, *per_layer.shape[1:], dtype=torch.float64))
                layer_sums[where] += per_layer[j]
                counts = coe.setdefault("counts", [0, 0])
                counts[where] += 1
                live.prev = point
        for key, layers in self._kv.items():
            live = ENGINE.live[key]
            order = sorted(layers)
            keys = [layers[i][0].cpu() for i in order]
            values = [layers[i][1].cpu() for i in order]
            mask = torch.ones(1, keys[0].shape[2])  # prompt features, per request (their lengths differ)
            live.prompt_done = True
            live.result["kv"] = pool_kv(keys, values, mask, self.pooling)[0].tolist()
            live.result["embedding"] = kv_embedding(keys, values, mask)[0].tolist()
        for s, layers in self._group_kv.items():
            lives = self._groups[s][0]
            order = sorted(layers)
            keys = [layers[i][0].cpu() for i in order]
            values = [layers[i][1].cpu() for i in order]
            feats = pool_kv(keys, values, torch.ones(len(lives), s), self.decode_pooling)
            due = [j for j, lv in enumerate(lives) if lv.check_due()]
            scores = ENGINE.probe.decode_difficulty(feats[due]).tolist() if due else []
            for j, live in enumerate(lives):
                if live.record_due():
                    live.result.setdefault("recorded", []).append([live.seen, feats[j].tolist()])
            for j, d in zip(due, scores):
                lives[j].decide(float(d))
        self._kv, self._tail, self._groups, self._group_kv = {}, {}, {}, {}
        for live, _ in self._plan:
            if live.result:
                self._step_results[live.key] = live.result
                live.result = {}
        self._plan, self._coe, self._coe_sum, self._coe_layers = [], None, None, []

    def build_connector_worker_meta(self) -> ResultMeta | None:
        if not self._step_results:
            return None
        meta, self._step_results = ResultMeta(self._step_results), {}
        return meta

    # --------------------------------------------------------------------------- scheduler side
    def get_num_new_matched_tokens(self, request, num_computed_tokens: int):
        return 0, False

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int) -> None:
        return None

    def build_connector_meta(self, scheduler_output) -> FeatureMeta:
        meta = FeatureMeta(finished=self._finished)
        self._finished = []
        for new in scheduler_output.scheduled_new_reqs:
            opts = request_options(new.sampling_params) if new.sampling_params is not None else None
            if opts is None or not (opts.get("prompt") or opts.get("online") or opts.get("record") or opts.get("coe_start") is not None):
                continue  # nothing to read from the cache for this one (thinking caps are the logits processor's)
            key = str(opts.get("key") or new.req_id)
            self._tracked[new.req_id] = (key, opts)
            blocks = list(new.block_ids[0])
            tokens = new.num_computed_tokens + scheduler_output.num_scheduled_tokens.get(new.req_id, 0)
            meta.steps.append(_Step(key, new.req_id, tokens, blocks, True, opts, len(new.prompt_token_ids or [])))
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            tracked = self._tracked.get(req_id)
            if tracked is None:
                continue
            new_blocks = cached.new_block_ids[i][0] if cached.new_block_ids[i] else None
            resumed = req_id in cached.resumed_req_ids
            tokens = cached.num_computed_tokens[i] + scheduler_output.num_scheduled_tokens.get(req_id, 0)
            meta.steps.append(_Step(tracked[0], req_id, tokens, None if new_blocks is None else list(new_blocks), resumed))
        return meta

    def take_worker_meta(self, meta: ResultMeta | None) -> None:
        """A step's results from the worker (``KVSwitchScheduler`` calls this before requests finish)."""
        for key, res in (meta.results if meta is not None else {}).items():
            merge_result(self._results.setdefault(key, {}), res)

    def update_connector_output(self, connector_output) -> None:
        self.take_worker_meta(connector_output.kv_connector_worker_meta)

    def request_finished(self, request, block_ids) -> tuple[bool, dict[str, Any] | None]:
        tracked = self._tracked.pop(request.request_id, None)
        if tracked is None:
            return False, None  # a plain generation request
        self._finished.append(request.request_id)
        res = self._results.pop(tracked[0], None) or {}
        coe = res.get("coe")
        if coe is not None and "layer_sums" in coe:  # plain lists: kv_transfer_params leave the engine core serialized
            coe["layer_sums"] = coe["layer_sums"].tolist()
        return False, {"kvswitch": res}


class KVSwitchScheduler(Scheduler):
    """vLLM's scheduler, with a step's connector results taken before that step's requests finish."""

    def update_from_output(self, scheduler_output, model_runner_output):
        kv_out = getattr(model_runner_output, "kv_connector_output", None)
        if kv_out is not None and kv_out.kv_connector_worker_meta is not None and isinstance(self.connector, KVFeatureConnector):
            self.connector.take_worker_meta(kv_out.kv_connector_worker_meta)
            kv_out.kv_connector_worker_meta = None
        return super().update_from_output(scheduler_output, model_runner_output)
