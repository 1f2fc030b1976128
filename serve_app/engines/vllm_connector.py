"""KV features from vLLM's own paged KV cache: an out-of-tree KV connector (``KVConnectorBase_V1``).

No extra forward pass. vLLM calls ``save_kv_layer`` inside each attention layer right after the
layer wrote its K/V into the paged cache; for every request whose prefill completes in this step,
the connector reads the prompt's K/V of the layers the features need (``serve_app.engines.vllm_kv``),
pools them with the same functions as the HF engine (``serve_app.core.kv_features``), and at the end
of the forward (``wait_for_save``) writes them to a per-engine folder. ``request_finished``, on the
scheduler side, reads them and returns them in the request's ``kv_transfer_params`` (how vLLM's
prefill/decode disaggregation hands data out). A file, not worker metadata: vLLM 0.32 frees a
request that finishes in its prefill step (``max_tokens=1``) *before* it hands the step's worker
metadata to the scheduler connector, while the worker's forward, files included, is complete by
then.

    LLM(model, kv_transfer_config=KVTransferConfig(
        kv_connector="KVFeatureConnector", kv_connector_module_path="serve_app.engines.vllm_connector",
        kv_role="kv_both", kv_connector_extra_config={"pooling": PoolingConfig().model_dump()}))
    out = llm.generate(prompt, SamplingParams(max_tokens=1, extra_args={"kv_transfer_params": {"kvswitch": "prompt"}}))
    out.kv_transfer_params["kvswitch"] == {"kv": [...], "embedding": [...]}
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from serve_app.core.kv_features import EMBEDDING_LAYERS, PoolingConfig, kv_coe_points, kv_embedding, pool_kv
from serve_app.engines.vllm_kv import GATHER


def trajectory(keys: list[torch.Tensor], values: list[torch.Tensor], positions: torch.Tensor) -> torch.Tensor:
    """KV-CoE points ``[len(positions), 2 * kv_heads * head_dim]``: per position the layer-average of
    the flattened K and V (``kv_coe_points``, for one request's ``[1, kv_heads, seq, head_dim]`` layers)."""
    return kv_coe_points([k[0, :, positions].transpose(0, 1) for k in keys], [v[0, :, positions].transpose(0, 1) for v in values])


_LAYER = re.compile(r"layers\.(\d+)\.")


@dataclass
class _Prefill:
    req_id: str
    block_ids: list[int]
    num_tokens: int
    kind: str
    """``prompt``: the probe feature and the KV embedding; ``decode``: the decode probe's feature;
    ``trajectory``: KV-CoE points at ``[start[0]] + range(start[1], num_tokens)``."""
    start: tuple[int, int] | None = None


@dataclass
class FeatureMeta(KVConnectorMetadata):
    """Scheduler → worker: requests whose prefill completes in this step."""

    prefills: list[_Prefill] = field(default_factory=list)


class KVFeatureConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config, role: KVConnectorRole, kv_cache_config=None):
        super().__init__(vllm_config, role, kv_cache_config)
        extra = self._kv_transfer_config.kv_connector_extra_config or {}
        self.pooling = PoolingConfig(**extra.get("pooling", {}))
        self.decode_pooling = PoolingConfig(**extra.get("decode_pooling", extra.get("pooling", {})))
        self.embedding = bool(extra.get("embedding", True))
        self.num_layers = vllm_config.model_config.get_num_layers(vllm_config.parallel_config)
        need = max(self.pooling.last_layers, self.decode_pooling.last_layers, EMBEDDING_LAYERS if self.embedding else 0)
        self.layers = set(range(max(self.num_layers - need, 0), self.num_layers))
        from vllm.platforms import current_platform

        self.gather = GATHER["cpu" if current_platform.is_cpu() else "logical"]
        engine = self._kv_transfer_config.engine_id or "default"
        self.folder = Path(extra.get("feature_dir") or Path(tempfile.gettempdir()) / f"kvswitch-features-{engine}")
        self.folder.mkdir(parents=True, exist_ok=True)
        # scheduler side
        self._blocks: dict[str, list[int]] = {}
        self._prompt_len: dict[str, int] = {}
        self._kind: dict[str, str] = {}
        self._start: dict[str, tuple[int, int]] = {}
        self._done: set[str] = set()
        # worker side
        self._kv: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
        self._kv_kind: dict[str, str] = {}
        self._kv_start: dict[str, tuple[int, int]] = {}

    # ------------------------------------------------------------------------------ worker side
    def start_load_kv(self, forward_context, **kwargs: Any) -> None:
        return None

    def wait_for_layer_load(self, layer_name: str) -> None:
        return None

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata, **kwargs: Any) -> None:
        match = _LAYER.search(layer_name)
        if match is None or not self.has_connector_metadata():
            return
        layer = int(match.group(1))
        for p in self._get_connector_metadata().prefills:
            if p.kind != "trajectory" and layer not in self.layers:
                continue  # trajectories average every layer; features only the last few
            self._kv.setdefault(p.req_id, {})[layer] = self.gather(kv_layer, p.block_ids, p.num_tokens)
            self._kv_kind[p.req_id] = p.kind
            if p.start is not None:
                self._kv_start[p.req_id] = p.start

    def wait_for_save(self) -> None:
        """End of the forward: pool, then write each request's features for the scheduler."""
        for req_id, layers in self._kv.items():
            order = sorted(layers)
            keys = [layers[i][0] for i in order]
            values = [layers[i][1] for i in order]
            mask = torch.ones(1, keys[0].shape[2])
            kind = self._kv_kind.pop(req_id, "prompt")
            if kind == "trajectory":
                first, start = self._kv_start.pop(req_id, (0, 0))
                positions = torch.tensor([first, *range(start, keys[0].shape[2])])
                feats = {"trajectory": trajectory(keys, values, positions).tolist()}
                self._write(req_id, feats)
                continue
            pooling = self.decode_pooling if kind == "decode" else self.pooling
            feats = {"kv": pool_kv(keys, values, mask, pooling)[0].tolist()}
            if self.embedding and kind == "prompt":
                feats["embedding"] = kv_embedding(keys, values, mask)[0].tolist()
            self._write(req_id, feats)
        self._kv.clear()

    def _write(self, req_id: str, feats: dict) -> None:
        tmp = self._path(req_id).with_suffix(".tmp")
        torch.save(feats, tmp)
        os.replace(tmp, self._path(req_id))

    def _path(self, req_id: str) -> Path:
        return self.folder / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', req_id)}.pt"

    # --------------------------------------------------------------------------- scheduler side
    def get_num_new_matched_tokens(self, request, num_computed_tokens: int):
        return 0, False

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int) -> None:
        return None

    def build_connector_meta(self, scheduler_output) -> FeatureMeta:
        meta = FeatureMeta()
        for new in scheduler_output.scheduled_new_reqs:
            extra = (new.sampling_params.extra_args or {}) if new.sampling_params is not None else {}
            kind = (extra.get("kv_transfer_params") or {}).get("kvswitch")
            if kind not in ("prompt", "decode", "trajectory"):
                continue  # a plain generation request: nothing to pool
            self._kind[new.req_id] = kind
            self._start[new.req_id] = tuple((extra.get("kv_transfer_params") or {}).get("kvswitch_start") or (0, 0))
            self._blocks[new.req_id] = list(new.block_ids[0])
            self._prompt_len[new.req_id] = len(new.prompt_token_ids or [])
            self._maybe_emit(meta, new.req_id, new.num_computed_tokens, scheduler_output)
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            if req_id not in self._blocks:
                continue
            if cached.new_block_ids[i]:
                self._blocks[req_id].extend(cached.new_block_ids[i][0])
            self._maybe_emit(meta, req_id, cached.num_computed_tokens[i], scheduler_output)
        return meta

    def _maybe_emit(self, meta: FeatureMeta, req_id: str, computed: int, scheduler_output) -> None:
        prompt = self._prompt_len[req_id]
        if req_id in self._done or computed + scheduler_output.num_scheduled_tokens.get(req_id, 0) < prompt:
            return
        self._done.add(req_id)
        meta.prefills.append(_Prefill(req_id, list(self._blocks[req_id]), prompt, self._kind[req_id], self._start.get(req_id)))

    def request_finished(self, request, block_ids) -> tuple[bool, dict[str, Any] | None]:
        req_id = request.request_id
        if self._kind.pop(req_id, None) is None:
            return False, None  # a plain generation request
        self._blocks.pop(req_id, None)
        self._prompt_len.pop(req_id, None)
        self._start.pop(req_id, None)
        self._done.discard(req_id)
        path = self._path(req_id)
        if not path.exists():  # finished before its prefill completed (aborted)
            return False, None
        feats = torch.load(path)
        path.unlink(missing_ok=True)
        return False, {"kvswitch": feats}
