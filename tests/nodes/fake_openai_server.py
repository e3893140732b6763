"""A stand-in for an engine's HTTP surface, for tests of the agent's supervision only (the real
vLLM path has its own tests): ``/health`` (slow once each time ``<dir>/slow_health`` is made), ``/metrics``
(the text of ``<dir>/metrics`` if present) and a streamed completion whose body ends 0.2 s after
its ``[DONE]`` (each end adds a byte to ``<dir>/ended``).

    python tests/nodes/fake_openai_server.py PORT DIR
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

from aiohttp import web

PORT, DIR = int(sys.argv[1]), Path(sys.argv[2])


async def health(_: web.Request) -> web.Response:
    slow = DIR / "slow_health"
    if slow.exists():
        # One slow answer per file: the check after it (0.2 s later) must not also be slow, or
        # two timed-out checks back to back decide the test by where the loop's phase fell.
        slow.unlink(missing_ok=True)
        await asyncio.sleep(6)  # longer than the engine's health-check timeout
    return web.Response(text="")


async def metrics(_: web.Request) -> web.Response:
    path = DIR / "metrics"
    return web.Response(text=path.read_text() if path.exists() else "vllm:num_requests_running 0\n")


async def completions(request: web.Request) -> web.StreamResponse:
    body = await request.json()
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    n = int(body.get("max_tokens") or 1)
    for i in range(n):
        event = {
            "choices": [{"index": 0, "text": f" t{i}", "finish_reason": "length" if i == n - 1 else None}],
            "usage": {"prompt_tokens": 1, "completion_tokens": i + 1},
        }
        await response.write(b"data: " + json.dumps(event).encode() + b"\n\n")
    await response.write(b"data: [DONE]\n\n")
    await asyncio.sleep(0.2)  # the body's end comes apart from [DONE], as vLLM's may under load
    await response.write_eof()
    with (DIR / "ended").open("a") as ended:
        ended.write("1")
    return response


app = web.Application()
app.router.add_get("/health", health)
app.router.add_get("/metrics", metrics)
app.router.add_post("/v1/completions", completions)
app.router.add_post("/v1/chat/completions", completions)
web.run_app(app, host="127.0.0.1", port=PORT, print=None)
