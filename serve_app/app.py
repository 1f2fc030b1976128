"""``build_app``: the whole Ray Serve graph from one validated ``AppConfig``.

``serve run serve_config.yaml`` calls ``serve_app.app:build_app`` with the YAML's ``args``."""

from __future__ import annotations

from typing import Any

from ray.serve import Application
from ray.serve.config import RequestRouterConfig
from transformers import AutoConfig, AutoTokenizer

from serve_app.config import AppConfig
from serve_app.core.grading import get_grader
from serve_app.core.policy import PolicyConfig
from serve_app.core.probe import Probe
from serve_app.core.prompts import resolve_prompts
from serve_app.engines.load import routing_limits


def _with_probe(cfg: AppConfig) -> tuple[AppConfig, float, int]:
    """The config with its grader settled (the probe's recorded one unless given), the routing
    threshold and the context length. Refuses, before any replica starts, a probe calibrated on
    another model and a chat template that cannot give both modes with ``think_tags``."""
    model_config = AutoConfig.from_pretrained(cfg.model, local_files_only=True)
    probe = Probe.load(cfg.probe, model_config)
    try:
        resolve_prompts(AutoTokenizer.from_pretrained(cfg.model, local_files_only=True), cfg.think_tags)
    except ValueError as e:
        raise ValueError(f"{cfg.model}: {e}") from None
    if cfg.grader is None:
        cfg = cfg.model_copy(update={"grader": get_grader(probe.grader).name})  # an unknown name is refused here
    return with_token_map(cfg, probe), *routing_limits(cfg, probe, model_config)


def with_token_map(cfg: AppConfig, probe: Probe) -> AppConfig:
    """The config with the probe's fitted difficulty-to-tokens map (``Probe.token_map``) in every
    ``policy`` field of it the config does not set; the result is validated again (a set
    ``slow_tokens_min`` above the probe's ``slow_tokens_max`` is refused by name)."""
    fitted = probe.token_map
    unset = {k: v for k, v in (fitted or {}).items() if k not in cfg.policy.model_fields_set}
    if not unset:
        return cfg
    policy = PolicyConfig.model_validate({**cfg.policy.model_dump(), **unset})
    return cfg.model_copy(update={"policy": policy})


def build_app(args: dict[str, Any] | AppConfig | None = None) -> Application:
    from deployments.generator import Generator
    from deployments.load_board import LoadBoard
    from deployments.prefill import PrefillPool
    from deployments.request_router import PredictedTokensRouter
    from deployments.router import Router

    cfg = args if isinstance(args, AppConfig) else AppConfig.model_validate(args or {})
    cfg, tau, context = _with_probe(cfg)
    # the board sits where the routers are pinned (their resources / labels), reserving no CPU
    pin = {k: v for k, v in cfg.router.options()["ray_actor_options"].items() if k not in ("num_cpus", "num_gpus")}
    board = LoadBoard.options(name="load_board", ray_actor_options={"num_cpus": 0, **pin}).bind(cfg.load_view_stale_s)
    prefill = PrefillPool.options(name="prefill", **cfg.prefill.options()).bind(cfg, board)
    pools = {}
    for name in ("fast", "slow"):
        opts = cfg.pool(name).options()
        if cfg.request_router:
            opts["request_router_config"] = RequestRouterConfig(
                request_router_class=PredictedTokensRouter,
                request_router_kwargs={"stats_period_s": cfg.routing_stats_period_s},
                request_routing_stats_period_s=cfg.routing_stats_period_s,
            )
        pools[name] = Generator.options(name=name, **opts).bind(cfg, name, board)
    return Router.options(name="router", **cfg.router.options()).bind(cfg, prefill, pools["fast"], pools["slow"], tau, context, board)
