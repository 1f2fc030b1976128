"""The predicted-tokens autoscaling policy (``deployments.autoscaling``) on Ray's own
``AutoscalingContext``, and its selection from the service config."""

import pytest

pytest.importorskip("ray")
from ray.serve._private.common import DeploymentID, ReplicaID  # noqa: E402
from ray.serve.config import AutoscalingConfig, AutoscalingContext  # noqa: E402

from deployments.autoscaling import POLICY_PATH, PredictedTokensPolicy, desired_replicas  # noqa: E402
from serve_app.config import AppConfig  # noqa: E402

DEP = DeploymentID(name="slow", app_name="kvswitch")


def context(tokens: list[float], running: list[float], total_requests: float, queued_at_handles: float = 0.0) -> AutoscalingContext:
    replicas = [ReplicaID(unique_id=f"r{i}", deployment_id=DEP) for i in range(len(tokens))]
    metrics = {"predicted_tokens": dict(zip(replicas, tokens)), "running": dict(zip(replicas, running)),
               "queued": {r: 0.0 for r in replicas}} if tokens else {}
    return AutoscalingContext(
        deployment_id=DEP, deployment_name="slow", app_name="kvswitch", current_num_replicas=len(tokens), target_num_replicas=len(tokens),
        running_replicas=replicas, total_num_requests=total_requests, total_queued_requests=queued_at_handles, aggregated_metrics=metrics,
        raw_metrics={}, capacity_adjusted_min_replicas=1, capacity_adjusted_max_replicas=4, policy_state={}, last_scale_up_time=None,
        last_scale_down_time=None, current_time=0.0, config=AutoscalingConfig(min_replicas=1, max_replicas=4, target_ongoing_requests=12))


def test_few_expensive_requests_scale_up_where_request_counts_would_not():
    """8 hard questions (~350 predicted tokens each) on one replica: 2800 tokens against a target of
    2000 ask for 1.4 replicas; Ray's rule with target_ongoing_requests 12 asks for 8/12."""
    ctx = context([2800.0], [8.0], total_requests=8)
    desired, state = PredictedTokensPolicy(target_tokens_per_replica=2000)(ctx)
    assert desired == pytest.approx(1.4) and state["predicted_tokens"] == 2800.0
    from ray.serve.autoscaling_policy import replica_queue_length_autoscaling_policy

    assert replica_queue_length_autoscaling_policy(ctx)[0] == pytest.approx(8 / 12)


def test_many_cheap_requests_do_not_scale_up():
    ctx = context([64 * 4.0], [64.0], total_requests=64)
    assert PredictedTokensPolicy(target_tokens_per_replica=2000)(ctx)[0] == pytest.approx(0.128)


def test_requests_queued_at_handles_count_at_the_pools_mean_cost():
    ctx = context([1000.0, 1000.0], [4.0, 4.0], total_requests=16, queued_at_handles=8)
    assert PredictedTokensPolicy(target_tokens_per_replica=1000)(ctx)[0] == pytest.approx((2000 + 8 * 250) / 1000)
    assert desired_replicas(0.0, 4, 0, 1000, 300) == pytest.approx(1.2)  # idle replicas: the default cost per request


def test_without_reports_it_falls_back_to_rays_rule():
    ctx = context([], [], total_requests=0)
    ctx.current_num_replicas = 1
    assert PredictedTokensPolicy()(ctx)[0] == pytest.approx(0.0)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="target_tokens_per_replica"):
        PredictedTokensPolicy(target_tokens_per_replica=0)


def test_the_config_selects_the_policy_per_pool():
    cfg = AppConfig(slow={"autoscale_on": "predicted_tokens", "target_predicted_tokens": 1500,
                          "autoscaling_config": {"min_replicas": 1, "max_replicas": 3}})
    policy = cfg.slow.options()["autoscaling_config"]["policy"]
    assert policy == {"policy_function": POLICY_PATH, "policy_kwargs": {"target_tokens_per_replica": 1500.0, "default_tokens_per_request": 300.0}}
    assert "policy" not in (AppConfig(slow={"autoscaling_config": {"min_replicas": 1, "max_replicas": 3}}).slow.options()["autoscaling_config"])
    AutoscalingConfig(**cfg.slow.options()["autoscaling_config"])  # Ray accepts it and imports the policy
    with pytest.raises(ValueError, match="needs an autoscaling_config"):
        AppConfig(slow={"autoscale_on": "predicted_tokens"})


def test_the_benchmarks_defaults_exist_and_differ_only_in_the_slow_pools_policy():
    """`kvswitch bench-autoscale` with no options: its dev data set and both serve configs are in the repo."""
    import argparse

    import yaml

    from loadtests.autoscale import DEFAULT_CONFIGS, add_parser, load_questions

    root = __import__("pathlib").Path(__file__).resolve().parents[1]
    sub = argparse.ArgumentParser().add_subparsers()
    add_parser(sub)
    args = sub.choices["bench-autoscale"].parse_args([])
    assert len(load_questions(root / args.dataset, args.requests)) == args.requests
    apps = [yaml.safe_load((root / c).read_text())["applications"][0]["args"] for c in DEFAULT_CONFIGS]
    slow = [a.pop("slow") for a in apps]
    assert apps[0] == apps[1]
    assert [s.get("autoscale_on", "requests") for s in slow] == ["requests", "predicted_tokens"]
    assert [AppConfig.model_validate({**a, "slow": s}).slow.autoscale_on for a, s in zip(apps, slow)] == ["requests", "predicted_tokens"]
