"""The admin endpoints of the Router (``/admin/v1/...``): what ``kvswitch calibrate --url`` and
``eval --url`` (``serve_app.offline.remote``) need from the pools. Off unless the config sets
``admin: {enabled: true}`` (then a JSON 404 ``admin_disabled``); behind the API keys like every path
but ``/health`` (the Guard of ``serve_app.serving.api``).

``AdminRoutes`` is a base class of ``deployments.router.Router``: its methods are routes of the same
FastAPI ``app`` (Serve's ingress serves inherited route methods) and use the Router's ``cfg``,
``tokenizer``, ``context``, ``grader``, ``prefill`` and ``pools``."""

import asyncio

from ray.exceptions import NodeDiedError, RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
from transformers import AutoConfig

from serve_app.core.probe import Probe, model_fingerprint
from serve_app.engines.base import GenerationError, GenRequest, checkpoint_dtype
from serve_app.serving.api import create_app
from serve_app.serving.errors import APIError, generation_failed, overloaded, replica_failed, timed_out
from serve_app.serving.schemas import AdminFeaturesRequest, AdminGenerateRequest, completion_id

app = create_app()
"""The Router's FastAPI app (``@serve.ingress(app)``): its own routes and these register on it."""

REPLICA_FAILURES = (RayActorError, ReplicaUnavailableError, NodeDiedError)
"""What a call raises when the replica (or its node) serving it died."""


class AdminRoutes:
    _info: dict | None = None
    """``/admin/v1/info``'s body, read once per replica."""

    def _admin(self) -> None:
        if not self.cfg.admin.enabled:
            raise APIError(404, "the admin endpoints are off: set `admin: {enabled: true}` in the service config (they serve "
                                "`kvswitch calibrate --url` and `eval --url`)", "not_found_error", code="admin_disabled")

    def _check_ids(self, prompts: list[list[int]], new_tokens: int, param: str) -> None:
        """Token ids inside the vocabulary; prompt + new tokens inside the context (else a 400)."""
        vocab = len(self.tokenizer)
        for p in prompts:
            if min(p) < 0 or max(p) >= vocab:
                raise APIError(400, f"token ids must lie in [0, {vocab}) (the model's vocabulary)", param=param, code="invalid_token_id")
            if len(p) + new_tokens > self.context:
                raise APIError(400, f"prompt ({len(p)} tokens) + {new_tokens} new tokens exceed the context of {self.context}",
                               param=param, code="context_length_exceeded")

    async def _admin_call(self, what: str, call):
        """``call()`` on a pool through the Router's retrying ``_call``; failures as the API's errors."""
        limits = self.cfg.limits
        try:
            return await self._call(what, call, limits.request_timeout_s)
        except (BackPressureError, DeploymentUnavailableError) as exc:
            raise overloaded(exc) from exc
        except TimeoutError as exc:
            raise timed_out(limits.request_timeout_s) from exc
        except REPLICA_FAILURES as exc:
            raise replica_failed(what, exc, retried=self.cfg.retry_on_replica_failure) from exc
        except GenerationError as exc:
            raise generation_failed(exc.request_id) from exc

    @app.get("/admin/v1/info")
    async def admin_info(self):
        """What a remote calibration must match: the model's fingerprint, the served probe's poolings,
        each pool's engine and dtype."""
        self._admin()
        if self._info is None:
            def read() -> dict:
                config, probe = AutoConfig.from_pretrained(self.cfg.model, local_files_only=True), Probe.load(self.cfg.probe)
                return {"model_name": self.cfg.model_name, "model": self.cfg.model, "model_fingerprint": model_fingerprint(config),
                        "pooling": probe.pooling.model_dump(), "decode_pooling": probe.decode_pooling.model_dump(),
                        "context_length": self.context, "max_prompts": self.cfg.admin.max_prompts, "grader": self.grader.name,
                        "think_tags": self.cfg.think_tags.model_dump(),
                        "engines": {p: {"engine": self.cfg.engine_settings(p).engine,
                                        "dtype": self.cfg.engine_settings(p).vllm.get("dtype", checkpoint_dtype(config, self.cfg.dtype))}
                                    for p in ("prefill", "fast", "slow")}}

            self._info = await asyncio.to_thread(read)
        return self._info

    @app.post("/admin/v1/features")
    async def admin_features(self, body: AdminFeaturesRequest):
        """The prefill pool's probe feature of each token-level prompt (float32, base64)."""
        self._admin()
        if len(body.prompt_ids) > self.cfg.admin.max_prompts:
            raise APIError(400, f"at most {self.cfg.admin.max_prompts} prompts per call (admin.max_prompts)", param="prompt_ids")
        self._check_ids(body.prompt_ids, 0, "prompt_ids")
        kv = await self._admin_call("prefill", lambda: self.prefill.features.remote(body.prompt_ids))
        return {"object": "list", "data": [{"index": i, "kv": f} for i, f in enumerate(kv)], "encoding": "base64-float32-le"}

    @app.post("/admin/v1/generate")
    async def admin_generate(self, body: AdminGenerateRequest):
        """One reply of a token-level request, generated by the pool of its forced mode."""
        self._admin()
        limit = self.cfg.pool(body.mode).max_tokens
        if body.max_new_tokens > limit:
            raise APIError(400, f"max_new_tokens {body.max_new_tokens} exceeds the {body.mode} pool's max_tokens {limit}",
                           param="max_new_tokens")
        self._check_ids([body.prompt_ids], body.max_new_tokens, "prompt_ids")
        req = GenRequest(prompt_ids=body.prompt_ids, mode=body.mode, add_prefix=body.add_prefix, max_new_tokens=body.max_new_tokens,
                         max_thinking_tokens=body.max_thinking_tokens, record_every=body.record_every, temperature=body.temperature,
                         top_p=body.top_p, seed=body.seed, request_id=completion_id("admin"))
        out = await self._admin_call(body.mode, lambda: self.pools[body.mode].admin_generate.remote(req))
        return {"id": req.request_id, **out}
