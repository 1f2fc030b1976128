"""``serve_app.offline.remote`` against a scripted HTTP transport: what the client does with each
answer of the service (the real service is tested in tests/test_service.py::
test_calibrate_through_the_service_gives_the_local_labels_and_probe)."""

import asyncio
import json

import httpx
import pytest
import torch

from serve_app.core.wire import finite_or_none, none_to_nan, pack_f32, unpack_f32
from serve_app.engines.base import GenRequest
from serve_app.offline import remote
from serve_app.offline.remote import RemoteExperiment, ServiceError

OPEN: list[RemoteExperiment] = []


@pytest.fixture(autouse=True)
def _close():
    yield
    while OPEN:
        OPEN.pop().close()


def _exp(handler, **kw) -> RemoteExperiment:
    exp = RemoteExperiment(None, None, None, [], [], engine_kind="url", model_config={}, url="http://svc", api_key="sk-test",
                           transport=httpx.MockTransport(handler), **kw)
    exp.info = {"pooling": {}, "decode_pooling": {}, "max_prompts": 2}
    OPEN.append(exp)
    return exp


def _reply(**extra) -> dict:
    return {"text": "5<|im_end|>", "reply": "<think>\n\n</think>\n\n5<|im_end|>", "tokens": 2, "finished": True, "start_mode": "fast",
            "end_mode": "fast", "switched_at": None, "thinking_capped": False, "token_ids": [7, 8],
            "recorded": [[0, pack_f32(torch.tensor([1.5, -2.0]))]], "coe_scores": {"kv_token_kv_all_r": 0.25, "kv_layer_v_all_c": None},
            **extra}


def test_tensors_and_scores_survive_the_wire():
    t = torch.randn(17)
    assert torch.equal(unpack_f32(pack_f32(t)), t)
    assert none_to_nan(finite_or_none({"a": float("nan"), "b": 1.0})) == pytest.approx({"a": float("nan"), "b": 1.0}, nan_ok=True)
    assert json.dumps(finite_or_none({"a": float("nan")})) == '{"a": null}'


def test_a_full_service_is_waited_out_and_the_reply_decoded(monkeypatch):
    real = asyncio.sleep
    monkeypatch.setattr(remote.asyncio, "sleep", lambda s: real(0))
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(json.loads(request.content))
        assert request.headers["authorization"] == "Bearer sk-test"
        if len(calls) <= 6:  # more than MAX_TRIES: a full service is not a failure
            return httpx.Response(503, json={"error": {"message": "at capacity", "code": "overloaded"}}, headers={"Retry-After": "1"})
        return httpx.Response(200, json=_reply())

    [res] = _exp(handler).run([GenRequest([1, 2, 3], mode="fast", max_new_tokens=4)], batch_size=1, desc="t")
    assert len(calls) == 7 and calls[-1]["prompt_ids"] == [1, 2, 3] and calls[-1]["mode"] == "fast"
    assert res.reply.endswith("5<|im_end|>") and res.token_ids == [7, 8] and res.tokens == 2
    assert res.recorded[0][0] == 0 and torch.equal(res.recorded[0][1], torch.tensor([1.5, -2.0]))
    assert res.coe_scores["kv_token_kv_all_r"] == 0.25 and res.coe_scores["kv_layer_v_all_c"] != res.coe_scores["kv_layer_v_all_c"]


def test_replica_failures_are_retried_a_few_times_then_stop_the_run(monkeypatch):
    real = asyncio.sleep
    monkeypatch.setattr(remote.asyncio, "sleep", lambda s: real(0))
    n = []

    def handler(request):
        n.append(1)
        return httpx.Response(503, json={"error": {"message": "the fast replica failed", "code": "replica_failed"}})

    with pytest.raises(ServiceError, match="replica failed"):
        _exp(handler).run([GenRequest([1], mode="slow", max_new_tokens=4)], batch_size=1, desc="t")
    assert len(n) == remote.MAX_TRIES


@pytest.mark.parametrize("status,code,hint", [(404, "admin_disabled", "admin: {enabled: true}"), (401, "invalid_api_key", "--api-key"),
                                              (400, "invalid_token_id", "token ids")])
def test_a_refusal_stops_at_once_with_the_services_message(status, code, hint):
    n = []

    def handler(request):
        n.append(1)
        return httpx.Response(status, json={"error": {"message": "token ids must lie in [0, 10)", "code": code}})

    with pytest.raises(ServiceError, match=f"HTTP {status}") as err:
        _exp(handler).run([GenRequest([1], mode="fast", max_new_tokens=4)], batch_size=1, desc="t")
    assert hint in str(err.value) and len(n) == 1


def test_features_come_in_chunks_of_the_services_limit():
    sizes = []

    def handler(request):
        prompts = json.loads(request.content)["prompt_ids"]
        sizes.append(len(prompts))
        return httpx.Response(200, json={"data": [{"index": i, "kv": pack_f32(torch.full((3,), float(p[0])))} for i, p in enumerate(prompts)]})

    exp = _exp(handler)
    exp.prompt_ids = [[i] for i in range(5)]
    from serve_app.core.kv_features import PoolingConfig

    exp.info["pooling"] = PoolingConfig().model_dump()
    kv = exp.features(PoolingConfig(), batch_size=64)["kv"]
    assert sorted(sizes) == [1, 2, 2] and kv[:, 0].tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="pools with"):
        exp.features(PoolingConfig(last_tokens=7), batch_size=64)
    with pytest.raises(ValueError, match="hidden"):
        exp.features(PoolingConfig(), batch_size=64, hidden=True)


def test_routed_requests_and_kv_quant_are_refused():
    exp = _exp(lambda r: httpx.Response(500))
    with pytest.raises(ValueError, match="forced fast and slow"):
        exp.run([GenRequest([1], mode=None)], 1, "t")
    with pytest.raises(ValueError, match="kv-quant"):
        exp.run([GenRequest([1], mode="fast")], 1, "t", kv_quant=object())
