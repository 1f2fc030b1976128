"""The HTTP surface without Ray: every error response is counted by status (``GuardSettings.on_error``,
which the router wires to the ``kvswitch_errors`` metric) and answered as an OpenAI JSON error."""

from fastapi.testclient import TestClient

from serve_app.serving.api import create_app
from serve_app.serving.errors import APIError, generation_failed


def test_every_error_response_is_counted_by_status():
    app = create_app()
    seen = []
    app.state.guard.on_error = seen.append
    app.state.guard.max_body_bytes = 100
    app.state.guard.set_keys(["sk-test"])

    @app.post("/x")
    async def x(body: dict):
        raise generation_failed("chatcmpl-1")

    @app.post("/boom")
    async def boom(body: dict):
        raise RuntimeError("secret detail")

    @app.post("/busy")
    async def busy(body: dict):
        raise APIError(503, "busy", code="overloaded")

    client = TestClient(app, raise_server_exceptions=False)
    auth = {"Authorization": "Bearer sk-test"}
    assert client.post("/x", json={}).status_code == 401
    assert client.post("/x", content=b"{" * 200, headers=auth).status_code == 413
    assert client.post("/x", content=b"{nope", headers={**auth, "content-type": "application/json"}).status_code == 400
    r = client.post("/x", json={}, headers=auth)
    assert r.status_code == 500 and "chatcmpl-1" in r.json()["error"]["message"] and r.json()["error"]["code"] == "generation_failed"
    r = client.post("/boom", json={}, headers=auth)
    assert r.status_code == 500 and "secret" not in r.text
    assert client.post("/busy", json={}, headers=auth).status_code == 503
    assert client.get("/nowhere", headers=auth).status_code == 404
    assert seen == [401, 413, 400, 500, 500, 503, 404]


def test_a_failing_error_counter_never_fails_the_response():
    app = create_app()
    app.state.guard.on_error = lambda status: 1 / 0
    assert TestClient(app).get("/nowhere").status_code == 404
