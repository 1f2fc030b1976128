"""PredictedTokensRouter's ranking, with stand-in replicas (the real router runs in test_service)."""

import asyncio
from types import SimpleNamespace

from ray.serve._private.common import DeploymentHandleSource, DeploymentID

from deployments.request_router import PredictedTokensRouter
from serve_app.serving.messages import Job


def _replica(name: str, predicted: float):
    return SimpleNamespace(replica_id=name, routing_stats={"predicted_tokens": predicted, "running": 1, "queued": 0})


def _pending(rid: str, predicted: float):
    return SimpleNamespace(args=[Job(prompt_ids=[1], max_tokens=8, predicted_tokens=predicted)], kwargs={}, metadata=SimpleNamespace(internal_request_id=rid))


def _router() -> PredictedTokensRouter:
    router = PredictedTokensRouter(DeploymentID(name="slow", app_name="t"), DeploymentHandleSource.UNKNOWN)
    router.initialize_state(stats_period_s=60.0)
    return router


def test_fewest_predicted_tokens_first():
    router = _router()
    a, b, c = _replica("a", 900.0), _replica("b", 100.0), _replica("c", 400.0)
    ranks = asyncio.run(router.choose_replicas([a, b, c], _pending("r0", 300)))
    assert [r[0].replica_id for r in ranks] == ["b", "c", "a"]


def test_requests_routed_since_the_last_report_count_until_they_complete():
    router = _router()
    a, b = _replica("a", 100.0), _replica("b", 200.0)
    router.on_request_routed(_pending("r1", 300.0), "a", None)  # a: 100 + 300 in flight > b: 200
    assert asyncio.run(router.choose_replicas([a, b]))[0][0].replica_id == "b"
    router.on_request_completed("a", "r1")
    assert asyncio.run(router.choose_replicas([a, b]))[0][0].replica_id == "a"


def test_missing_stats_count_as_idle():
    router = _router()
    fresh = SimpleNamespace(replica_id="new", routing_stats={})
    assert asyncio.run(router.choose_replicas([_replica("a", 50.0), fresh]))[0][0].replica_id == "new"


def test_ties_are_broken_at_random_not_by_candidate_order():
    router = _router()
    a, b = _replica("a", 0.0), _replica("b", 0.0)
    firsts = [asyncio.run(router.choose_replicas([a, b]))[0][0].replica_id for _ in range(200)]
    assert 60 <= firsts.count("a") <= 140
