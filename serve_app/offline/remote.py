"""The offline tools on a running kvswitch service (``kvswitch calibrate --url``, ``eval --url``).

A Ray cluster's pools do the generations: ``RemoteExperiment`` is the ``Experiment`` of
``serve_app.offline.common`` whose ``run`` posts each token-level ``GenRequest`` to the service's
``/admin/v1/generate`` (the pool of the request's forced mode generates it, recording decode
features and KV-CoE scores as the local engines do) and whose ``features`` asks the prefill pool
through ``/admin/v1/features``. The admin endpoints are off unless the service config sets
``admin: {enabled: true}``; with API keys set they need one (``--api-key`` or ``$KVSWITCH_API_KEY``).

The tokenizer and config come from a local copy of the served checkpoint (``--model``; its weights
are not loaded): prompts are built here and checked against the service's model fingerprint.
Prompt features and decode records use the served probe's poolings (the service reports them).

Requests that fail for load (429, 503) or a replica's death are retried with back-off; any other
error stops the run with the service's message. Nothing here imports Ray."""

from __future__ import annotations

import asyncio
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import torch

from serve_app.core.kv_features import PoolingConfig
from serve_app.core.policy import OnlineConfig
from serve_app.core.probe import Probe, model_fingerprint
from serve_app.core.prompts import ThinkTags
from serve_app.core.wire import none_to_nan, unpack_f32
from serve_app.engines.base import GenRequest, GenResult
from serve_app.offline.common import Experiment, gather_bounded, read_rows, tokenizer_only

API_KEY_ENV = "KVSWITCH_API_KEY"
RETRY_STATUS = (429, 502, 503, 504)
"""Load or a replica's death: worth retrying (the service loses nothing by it)."""
MAX_TRIES = 5
"""Attempts of one request through lost connections and replica failures (a full service is waited out instead)."""


class ServiceError(RuntimeError):
    """The service refused or failed a request; the message is the service's."""


def _code(resp: httpx.Response) -> str | None:
    try:
        return (resp.json().get("error") or {}).get("code")
    except (ValueError, AttributeError):
        return None


def _message(resp: httpx.Response) -> str:
    try:
        err = resp.json().get("error", {})
        return err.get("message") or resp.text
    except ValueError:
        return resp.text


@dataclass
class RemoteExperiment(Experiment):
    url: str = ""
    api_key: str | None = None
    timeout_s: float = 600.0
    """One request's HTTP timeout."""
    retry_for_s: float = 1800.0
    """How long one request waits out a full service (HTTP 429 / 503 overloaded) before the run stops."""
    transport: httpx.AsyncBaseTransport | None = None
    """httpx's transport (None: the network)."""
    info: dict[str, Any] = field(default_factory=dict)
    """The service's ``/admin/v1/info``: model fingerprint, poolings, engines and dtypes."""

    # ---------------------------------------------------------------------------------- HTTP
    def _client(self) -> httpx.AsyncClient:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        return httpx.AsyncClient(base_url=self.url.rstrip("/"), headers=headers, timeout=self.timeout_s, transport=self.transport)

    async def _request(self, client: httpx.AsyncClient, method: str, path: str, body: dict | None = None) -> dict:
        """One call; a full service (429, 503 ``overloaded``: its queues are full) is waited out for up
        to ``retry_for_s``, a lost connection or a replica's death retried ``MAX_TRIES`` times."""
        delay, failures = 0.25, 0
        deadline = asyncio.get_running_loop().time() + self.retry_for_s
        while True:
            try:
                resp = await client.request(method, path, json=body)
            except httpx.TransportError as exc:
                failures += 1
                if failures >= MAX_TRIES:
                    raise ServiceError(f"{self.url}{path}: {type(exc).__name__}: {exc}") from exc
            else:
                if resp.status_code < 400:
                    return resp.json()
                code = _code(resp)
                busy = resp.status_code == 429 or code == "overloaded"
                failures += not busy
                if resp.status_code not in RETRY_STATUS or failures >= MAX_TRIES or asyncio.get_running_loop().time() > deadline:
                    hint = " (the service config needs `admin: {enabled: true}`)" if code == "admin_disabled" else ""
                    hint = " (give --api-key or set $KVSWITCH_API_KEY)" if resp.status_code == 401 else hint
                    raise ServiceError(f"{self.url}{path}: HTTP {resp.status_code}: {_message(resp)}{hint}")
                if busy:
                    delay = max(delay, float(resp.headers.get("Retry-After", 0)))
            await asyncio.sleep(delay * (1 + random.random() * 0.5))
            delay = min(delay * 2, 5.0)

    def connect(self) -> None:
        """Read the service's info and refuse a service that serves another model."""
        async def get():
            async with self._client() as client:
                return await self._request(client, "GET", "/admin/v1/info")

        self.info = self._call(get())
        local = model_fingerprint(self.model_config)
        if self.info["model_fingerprint"] != local:
            raise ValueError(f"the service at {self.url} serves another model ({self.info['model']}) than {self.model_path}: "
                             "give --model the served checkpoint (its tokenizer and config)")
        tags = self.info.get("think_tags") or {}
        mine = {"open": self.tokens.prompts.open_think.strip(), "close": self.tokens.prompts.close_think.strip()}
        if tags and tags != mine:
            raise ValueError(f"the service's think tags are {tags['open']} {tags['close']}, not {mine['open']} {mine['close']}: "
                             "give the same --think-tags as its config's think_tags")

    def describe(self, engine: str, dtype: str) -> tuple[str, str]:
        """``service:<engine>`` and the dtype of the service's slow pool (its config sets both)."""
        slow = self.info["engines"]["slow"]
        return f"service:{slow['engine']}", slow["dtype"]

    @property
    def pooling(self) -> PoolingConfig:
        return PoolingConfig(**self.info["pooling"])

    @property
    def decode_pooling(self) -> PoolingConfig:
        return PoolingConfig(**self.info["decode_pooling"])

    # ----------------------------------------------------------------------- the Experiment
    def run(self, requests: list[GenRequest], batch_size: int, desc: str, probe: Probe | None = None, online: OnlineConfig | None = None,
            record: tuple[PoolingConfig, int] | None = None, kv_quant=None, prompt_feature: str = "kv", collect_hidden: bool = False,
            keep_features: bool = False) -> list[GenResult]:
        """Every request on the service's pools, ``batch_size`` in flight; results in request order.
        Forced modes only (the service's own routing is measured by ``kvswitch loadtest``); no hidden
        states or token probabilities (as on vLLM); ``record``'s pooling must be the served decode pooling."""
        if kv_quant is not None:
            raise ValueError("simulated KV quantization (--kv-quant) runs on the local HF engine only; drop --url or --kv-quant")
        if any(r.mode is None or r.online for r in requests):
            raise ValueError("--url runs forced fast and slow generations; the service's own routing (kv-oneshot, kv-online) "
                             "is measured through its API by `kvswitch loadtest`")
        if record is not None and record[0] != self.decode_pooling:
            raise ValueError(f"the service records with its probe's decode pooling {self.info['decode_pooling']}, not "
                             f"{record[0].model_dump()}: calibrate without pooling options (the served ones) or serve a probe with yours")
        every = record[1] if record else None

        context = int(self.info.get("context_length") or 0)

        async def one(client, req: GenRequest) -> GenResult:
            # a local engine stops a reply where the model's context ends; the service refuses a request
            # that asks past its context (a vLLM pool's max_model_len may be shorter than the model's), so
            # ask for no more than fits, as a local run gets
            cap = min(req.max_new_tokens, context - len(req.prompt_ids)) if context else req.max_new_tokens
            body = {"prompt_ids": list(req.prompt_ids), "mode": req.mode, "add_prefix": req.add_prefix, "max_new_tokens": max(cap, 1),
                    "max_thinking_tokens": req.max_thinking_tokens, "record_every": every or req.record_every,
                    "temperature": req.temperature, "top_p": req.top_p, "seed": req.seed}
            out = await self._request(client, "POST", "/admin/v1/generate", body)
            return GenResult(text=out["text"], reply=out["reply"], tokens=out["tokens"], finished=out["finished"],
                             start_mode=out["start_mode"], end_mode=out["end_mode"], switched_at=out["switched_at"],
                             thinking_capped=out["thinking_capped"], token_ids=out["token_ids"],
                             recorded=[(int(t), unpack_f32(f)) for t, f in out["recorded"]], coe_scores=none_to_nan(out["coe_scores"]))

        async def all_():
            async with self._client() as client:
                return await gather_bounded([one(client, r) for r in requests], batch_size, desc)

        results = self._call(all_())
        if keep_features:  # the prompt's probe feature, from the prefill pool (a local engine keeps its own prefill's)
            pooling = probe.pooling if probe is not None else self.pooling
            feats = self._features([r.prompt_ids for r in requests], pooling, batch_size, f"{desc} prompt features")
            for res, f in zip(results, feats):
                res.prompt_feature = f
        return results

    def features(self, pooling: PoolingConfig, batch_size: int, hidden: bool = False, kv_quant=None,
                 desc: str = "prefill features") -> dict[str, torch.Tensor]:
        """The prefill pool's probe feature of every prompt (the served probe's pooling)."""
        if hidden:
            raise ValueError("the service returns no hidden-state features; drop 'hidden' from --features or calibrate locally")
        if kv_quant is not None:
            raise ValueError("simulated KV quantization (--kv-quant) runs on the local HF engine only; drop --url or --kv-quant")
        return {"kv": torch.stack(self._features(self.prompt_ids, pooling, batch_size, desc)).float()}

    def _features(self, prompts: list[list[int]], pooling: PoolingConfig, batch_size: int, desc: str) -> list[torch.Tensor]:
        if pooling != self.pooling:
            raise ValueError(f"the service's prefill pool pools with {self.info['pooling']}, not {pooling.model_dump()}: use "
                             "the served probe's pooling (calibrate: no pooling options; eval: the served probe) or serve yours")
        size = min(batch_size, self.info.get("max_prompts", batch_size))
        chunks = [prompts[i : i + size] for i in range(0, len(prompts), size)]

        async def one(client, chunk):
            out = await self._request(client, "POST", "/admin/v1/features", {"prompt_ids": chunk})
            return [unpack_f32(d["kv"]) for d in out["data"]]

        async def all_():
            async with self._client() as client:
                return await gather_bounded([one(client, c) for c in chunks], 4, desc)

        return [f for part in self._call(all_()) for f in part]



def api_key(given: str | None) -> str | None:
    """The key to send: the one given, else ``$KVSWITCH_API_KEY``."""
    return given or os.environ.get(API_KEY_ENV) or None


def setup_remote(url: str, model: str | Path, dataset: str | Path, limit: int | None = None, min_rows: int = 1, grader: str | None = None,
                 question_field: str | None = None, answer_field: str | None = None, think_tags: ThinkTags | None = None,
                 api_key_: str | None = None) -> RemoteExperiment:
    """``common.setup`` for a running service at ``url``: the rows and prompts built here from the
    local checkpoint's tokenizer (its weights are not loaded), checked against the served model."""
    rows = read_rows(dataset, limit, min_rows, grader, question_field, answer_field)
    tokenizer, config, tokens, prompts = tokenizer_only(model, rows, think_tags)
    exp = RemoteExperiment(None, tokenizer, None, rows, prompts, engine_kind="url", model_config=config, model_path=str(model),
                           _tokens=tokens, url=url, api_key=api_key(api_key_))
    exp.connect()
    return exp


def refuse_local_options(kv_quant, engine: str, dtype: str, vllm_args: dict) -> None:
    """``--url`` runs on the service's engines, in the dtype its config sets: the local engine's
    options cannot apply."""
    given = [flag for flag, on in (("--kv-quant", kv_quant is not None), ("--engine", engine != "hf"), ("--dtype", dtype != "auto"),
                                   ("--max-model-len / vLLM arguments", bool(vllm_args))) if on]
    if given:
        raise ValueError(f"--url runs on the service's engines in the dtype its config sets: drop {', '.join(given)}")
