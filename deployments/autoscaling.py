"""Autoscaling a generation pool on the work kvswitch predicts, not on request counts.

A slow request costs tens of times the tokens of a fast one, so "ongoing requests per replica" (Ray
Serve's default policy) scales the slow pool late under an easy-heavy mix: few requests, much work.
``PredictedTokensPolicy`` is a Ray Serve 2.60 custom autoscaling policy
(``autoscaling_config.policy``): each ``Generator`` replica reports its predicted outstanding
tokens (``record_autoscaling_stats``), and the pool asks for ``outstanding / target`` replicas.
Requests still queued at the callers' handles (not yet on a replica) count at the pool's mean
predicted cost per request. Ray applies ``min_replicas``/``max_replicas``, the up/down-scale
delays and factors around it as for its own policy.

Select it per pool in the service config: ``slow: {autoscale_on: predicted_tokens,
target_predicted_tokens: 2000, autoscaling_config: {min_replicas: 1, max_replicas: 4}}``."""

from __future__ import annotations

import math
from typing import Any

from ray.serve.autoscaling_policy import replica_queue_length_autoscaling_policy
from ray.serve.config import AutoscalingContext

POLICY_PATH = "deployments.autoscaling:PredictedTokensPolicy"


def desired_replicas(outstanding_tokens: float, queued_requests: float, requests_on_replicas: float, target_tokens_per_replica: float,
                     default_tokens_per_request: float) -> float:
    """Replicas for ``outstanding_tokens`` on the replicas plus ``queued_requests`` not yet on one
    (at the replicas' mean tokens per request, or ``default_tokens_per_request`` when they are idle)."""
    per_request = outstanding_tokens / requests_on_replicas if requests_on_replicas > 0 else default_tokens_per_request
    return (outstanding_tokens + max(queued_requests, 0.0) * per_request) / target_tokens_per_replica


class PredictedTokensPolicy:
    """``autoscaling_config.policy.policy_function`` for a generation pool; ``policy_kwargs``:
    ``target_tokens_per_replica`` and ``default_tokens_per_request``."""

    def __init__(self, target_tokens_per_replica: float = 2000.0, default_tokens_per_request: float = 300.0):
        if target_tokens_per_replica <= 0 or default_tokens_per_request < 0:
            raise ValueError("target_tokens_per_replica must be > 0 and default_tokens_per_request >= 0")
        self.target, self.default = float(target_tokens_per_replica), float(default_tokens_per_request)

    def __call__(self, ctx: AutoscalingContext) -> tuple[float, dict[str, Any]]:
        metrics = ctx.aggregated_metrics or {}
        tokens = metrics.get("predicted_tokens") or {}
        if ctx.current_num_replicas == 0 or not tokens:  # cold start, or no report yet: Ray's own rule
            return replica_queue_length_autoscaling_policy(ctx)
        outstanding = sum(tokens.values())
        on_replicas = sum((metrics.get("running") or {}).values()) + sum((metrics.get("queued") or {}).values())
        queued = ctx.total_queued_requests or 0.0
        desired = desired_replicas(outstanding, queued, on_replicas, self.target, self.default)
        if not math.isfinite(desired):
            return ctx.current_num_replicas, {}
        return desired, {"predicted_tokens": outstanding, "queued_at_handles": queued}
