"""The router's SSE merge (``Router._sse``) against a pool stream that never stops producing: a
client that stops reading holds the pool back (a bounded buffer, not a queue that grows without
end), and a client that goes away ends the merge."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

pytest.importorskip("ray")

from deployments import router as router_module  # noqa: E402
from serve_app.core.policy import Decision  # noqa: E402
from serve_app.serving.messages import Delta  # noqa: E402
from serve_app.serving.plan import Plan  # noqa: E402

ROUTER = next(c for c in router_module.Router.func_or_class.__mro__ if "_sse" in c.__dict__)  # the class under Serve's ingress wrapper


class Endless:
    """A pool stream that always has the next token ready."""

    def __init__(self):
        self.pulled = 0

    def __aiter__(self):
        return self

    async def __anext__(self):
        self.pulled += 1
        await asyncio.sleep(0)
        return Delta(reasoning="", content="x", token_ids=(7,))


def test_a_stalled_client_holds_the_pool_stream_back_and_leaving_ends_it():
    async def run():
        router = object.__new__(ROUTER)
        router.cfg = SimpleNamespace(model_name="m", resume_streams=True)
        loop = asyncio.get_running_loop()
        plan = Plan(prompt_ids=[1], decision=Decision(pool="fast", reason="easy", predicted_tokens=4.0), difficulty=None,
                    online=False, max_tokens=10, deadline=loop.time() + 60, request_id="chatcmpl-test")
        gen, tasks, closed = Endless(), [], []
        sse = ROUTER._sse(router, plan, SimpleNamespace(stream_options=None), "chat", [None], [gen],
                          [Delta(reasoning="", content="x", token_ids=(7,))], [False], {}, tasks, lambda: closed.append(True))
        events = [await sse.__anext__() for _ in range(4)]  # the role chunk, then text
        assert all(e.startswith("data: ") for e in events) and '"content": "x"' in events[-1]
        await asyncio.sleep(0.3)  # the client stops reading
        held = gen.pulled
        assert held <= router_module.STREAM_BUFFER + 4, held  # the buffer filled, then the pump waited
        await asyncio.sleep(0.3)
        assert gen.pulled == held
        more = [await sse.__anext__() for _ in range(10)]  # reading again lets it go on
        await asyncio.sleep(0.05)
        assert len(more) == 10 and gen.pulled > held
        await sse.aclose()  # the client goes away
        assert closed == [True]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(asyncio.wait_for(run(), 30))
