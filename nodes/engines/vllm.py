"""vLLM as the node's engine: launched from a profile's launch plan and supervised, or attached to.

Readiness is stricter than vLLM's ``/health``: that can answer 200 on an engine that dies at its
first request (SIMULATOR.md), so the engine is only ``healthy`` after a real one-token completion
has succeeded since it last (re)started. Load comes from its Prometheus ``/metrics``. Cancelling a
job closes the HTTP stream, and vLLM aborts a request whose client disconnected: its
``vllm:num_requests_running`` drops at once and ``vllm:generation_tokens_total`` stops growing
(vLLM 0.32 does not count such aborts in ``request_success_total``; see tests/nodes/test_vllm.py).

A launched vLLM runs in its own process group, tied to the agent with ``PR_SET_PDEATHSIG`` so it
never outlives the agent; if it exits the engine reports ``unhealthy`` and restarts it with
exponential backoff.

The agent talks to vLLM with aiohttp and decodes the stream with typed msgspec structs: with
vLLM streaming a token per event, this parsing is most of a node agent's CPU (httpx and the json
module cost about twice as much per token).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import math
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import IO, Any

import aiohttp
import msgspec
from aiohttp.http_exceptions import HttpProcessingError

from market.wire import MAX_REPORTED_COUNT, Job, Piece, TokenLogprob, ToolCallDelta, TopLogprob, Usage
from nodes.engines.base import Emission, EngineError, EngineLoad, EngineStatus, ErrorCode
from nodes.engines.base import busy_streams as default_busy_streams
from nodes.profiles import LaunchPlan, ProcessSpec

log = logging.getLogger(__name__)

PROBE_PROMPT = "hello"
_NO_REMOTE = {
    "do_remote_decode": True,
    "do_remote_prefill": False,
    "remote_engine_id": None,
    "remote_block_ids": None,
    "remote_host": None,
    "remote_port": None,
}
"""What vLLM's disaggregated proxy sends the prefill instance (NixlConnector)."""


class _Function(msgspec.Struct):
    name: str | None = None
    arguments: str | None = None


class _ToolCall(msgspec.Struct):
    index: int = 0
    id: str | None = None
    function: _Function | None = None


class _Delta(msgspec.Struct):
    content: str | None = None
    tool_calls: list[_ToolCall] | None = None


class _Top(msgspec.Struct):
    token: str
    logprob: float
    bytes: list[int] | None = None


class _Entry(msgspec.Struct):
    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[_Top] | None = None


class _Logprobs(msgspec.Struct):
    """A choice's ``logprobs``: chat's ``content`` entries, or the completions API's parallel lists."""

    content: list[_Entry] | None = None
    tokens: list[str] | None = None
    token_logprobs: list[float | None] | None = None
    top_logprobs: list[dict[str, float] | None] | None = None


class _Choice(msgspec.Struct):
    index: int = 0
    text: str | None = None
    delta: _Delta | None = None
    finish_reason: str | None = None
    logprobs: _Logprobs | None = None


def _tool_calls(raw: list[_ToolCall] | None) -> list[ToolCallDelta] | None:
    if not raw:
        return None
    out = []
    for call in raw:
        function = call.function or _Function()
        out.append(ToolCallDelta(call.index, call.id, function.name, function.arguments or ""))
    return out


def _token_logprobs(raw: _Logprobs) -> list[TokenLogprob]:
    """vLLM's logprobs of either API in the wire's one shape (``-inf`` as vLLM writes it, -9999)."""
    if raw.content is not None:
        alternatives = [[TopLogprob(t.token, t.logprob, t.bytes) for t in e.top_logprobs or ()] for e in raw.content]
        return [TokenLogprob(e.token, e.logprob, e.bytes, a) for e, a in zip(raw.content, alternatives, strict=True)]
    values = raw.token_logprobs or []
    tops = raw.top_logprobs or []
    out = []
    for i, token in enumerate(raw.tokens or ()):
        value = values[i] if i < len(values) else None
        top = (tops[i] if i < len(tops) else None) or {}
        others = [TopLogprob(t, v) for t, v in top.items()]
        out.append(TokenLogprob(token, -9999.0 if value is None else value, None, others))
    return out


class _EventUsage(msgspec.Struct):
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


class _Event(msgspec.Struct):
    """One ``data:`` event of vLLM's OpenAI stream (completion or chat); other fields are ignored."""

    choices: list[_Choice] | None = None
    usage: _EventUsage | None = None
    error: Any = None


_decode_event = msgspec.json.Decoder(_Event).decode
_JSON = {"Content-Type": "application/json"}
_KEEPALIVE_S = 4.0
_END_TIMEOUT_S = 5.0
"""How long a stream's body may take to end after its ``[DONE]`` before its connection is closed."""
_NO_TIMEOUT = aiohttp.ClientTimeout(total=None, connect=10.0, sock_connect=10.0)
_HEALTH_TIMEOUT = aiohttp.ClientTimeout(total=5.0)
_METRICS_TIMEOUT = aiohttp.ClientTimeout(total=2.0)


def die_with_parent() -> Callable[[], None]:
    def setup() -> None:
        os.setsid()  # own process group: stopping vLLM stops its engine-core children too
        with contextlib.suppress(OSError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG

    return setup


def parse_metrics(text: str) -> EngineLoad:
    """Sum vLLM's placement gauges over label sets (one per engine core)."""
    running = waiting = 0.0
    kv = 0.0
    for line in text.splitlines():
        if not line.startswith("vllm:"):
            continue
        name, _, rest = line.partition("{")
        if not rest:
            name, _, value_text = line.partition(" ")
        else:
            value_text = rest.rpartition("}")[2]
        try:
            value = float(value_text.split()[0])
        except (ValueError, IndexError):
            continue
        if not math.isfinite(value) or value < 0:  # NaN, +Inf: no load to report from it
            continue
        if name == "vllm:num_requests_running":
            running += value
        elif name == "vllm:num_requests_waiting":
            waiting += value
        elif name == "vllm:kv_cache_usage_perc":
            kv = max(kv, value)
    return EngineLoad(
        running=min(int(running), MAX_REPORTED_COUNT),
        waiting=min(int(waiting), MAX_REPORTED_COUNT),
        kv_cache_usage=min(kv, 1.0),
    )


def _error_message(status: int, raw: bytes) -> str:
    try:
        data = json.loads(raw)
        err = data.get("error", data)
        message = err.get("message") if isinstance(err, dict) else str(err)
        return str(message or data)
    except (ValueError, AttributeError):
        return raw.decode(errors="replace")[:500] or f"engine answered {status}"


def _stream_error(error: Any, raw: bytes, yielded: bool) -> EngineError:
    """An error event in a stream vLLM answered 200: one that refuses the request (its ``code`` a
    4xx, as for a logit bias outside the vocabulary or a schema it cannot compile) comes before
    any output and is the client's to fix, as the same refusal would be with a 400 status."""
    code = error.get("code") if isinstance(error, dict) else None
    if not yielded and isinstance(code, int) and 400 <= code < 500:
        return EngineError("invalid_request", _error_message(code, raw), status=code)
    return EngineError("engine_error", _error_message(500, raw))


def _raise_for_status(status: int, raw: bytes) -> None:
    if status < 400:
        return
    message = _error_message(status, raw)
    if status < 500:
        raise EngineError("invalid_request", message, status=status)
    raise EngineError("engine_error", message, status=status)


class _Process:
    """One supervised vLLM server process."""

    def __init__(self, spec: ProcessSpec, log_dir: Path) -> None:
        self.spec = spec
        self.log_path = log_dir / f"{spec.name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0

    def start(self) -> None:
        env = {**os.environ, **self.spec.env}
        out: IO[bytes]
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(
                self.spec.argv,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=die_with_parent(),
            )
        self.started_at = time.monotonic()
        log.info("started %s (pid %s): %s", self.spec.name, self.proc.pid, " ".join(self.spec.argv))

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def exited(self) -> int | None:
        """The exit code if the process has ended (or was never started: -1)."""
        if self.proc is None:
            return -1
        return self.proc.poll()

    def tail(self, lines: int = 3) -> str:
        try:
            return " | ".join(self.log_path.read_text(errors="replace").strip().splitlines()[-lines:])
        except OSError:
            return ""

    def kill_group(self, sig: int) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)

    async def stop(self, timeout: float = 15.0) -> None:
        if self.proc is None:
            return
        self.kill_group(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            await asyncio.to_thread(self.proc.wait, timeout)
        self.kill_group(signal.SIGKILL)  # leftovers of the group (engine core) even after a clean exit
        with contextlib.suppress(subprocess.TimeoutExpired):
            await asyncio.to_thread(self.proc.wait, 5)
        self.proc = None


class VllmEngine:
    """A vLLM engine for the node agent.

    Give either ``plan`` (launch and supervise its processes; ``unified`` runs one instance,
    ``semi-pd``/``disaggregated`` a prefill and a decode instance that this engine proxies, GPU
    only) or ``url`` (attach to an OpenAI-compatible vLLM already running; never restarted).
    """

    kind = "vllm"

    def __init__(
        self,
        plan: LaunchPlan | None = None,
        *,
        url: str | None = None,
        served_model_name: str | None = None,
        max_num_seqs: int = 256,
        busy_stream_interval: int = 4,
        busy_streams: int | None = None,
        log_dir: Path | None = None,
        check_interval_s: float = 1.0,
        restart_backoff_s: tuple[float, float] = (1.0, 30.0),
        startup_timeout_s: float = 600.0,
        probe_timeout_s: float = 60.0,
    ) -> None:
        if (plan is None) == (url is None):
            raise ValueError("give exactly one of plan (launch vLLM) or url (attach to a running one)")
        name = served_model_name or (plan.served_model_name if plan else None)
        if not name:
            raise ValueError("served_model_name is required when attaching to a url")
        self.served_model_name = name
        self.max_num_seqs = max_num_seqs
        self.busy_stream_interval = busy_stream_interval
        """Tokens vLLM gathers per streamed chunk (its per-request ``stream_interval``) for a job
        that starts while the node is busy; 1 streams every token alone, whatever the load."""
        self.busy_streams = default_busy_streams(max_num_seqs) if busy_streams is None else busy_streams
        """Streams open on this engine from which the node counts as busy (default: a quarter of
        its batch, at least 8)."""
        self._open_streams = 0
        self.plan = plan
        self.check_interval_s = check_interval_s
        self.restart_backoff_s = restart_backoff_s
        self.startup_timeout_s = startup_timeout_s
        self.probe_timeout_s = probe_timeout_s
        self.log_dir = log_dir or Path(tempfile.mkdtemp(prefix="vllm-logs-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        if plan is not None:
            self.prefill_url = plan.prefill_url
            self.decode_url = plan.decode_url
            self.url = plan.engine_url or plan.decode_url or ""
            self._processes = [_Process(spec, self.log_dir) for spec in plan.servers]
            self._daemons = [spec for spec in plan.processes if spec.daemon]
        else:
            assert url is not None
            self.url = url.rstrip("/")
            self.prefill_url = self.decode_url = None
            self._processes = []
            self._daemons = []
        self._status: EngineStatus = "starting"
        self._client: aiohttp.ClientSession | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._check_now = asyncio.Event()
        self._ending: set[asyncio.Task[None]] = set()
        """Streams past their ``[DONE]`` whose body's end is still being read (``_read_end``)."""
        self._last_load = EngineLoad()
        self.restarts = 0
        """How many times a crashed vLLM was restarted (tests and logs)."""

    # --- lifecycle -----------------------------------------------------------------------------

    @property
    def status(self) -> EngineStatus:
        return self._status

    @property
    def pids(self) -> list[int]:
        """Pids of the running vLLM servers (tests kill them to simulate a crash)."""
        return [p.pid for p in self._processes if p.pid is not None and p.exited() is None]

    async def start(self) -> None:
        """Launch (or attach) and return at once; ``status`` turns healthy when a probe succeeds."""
        if self._supervisor is not None:
            return
        # Idle connections are dropped before vLLM's server does (uvicorn: after 5 s), so a job's
        # POST, which aiohttp does not retry, never goes out on one the server is closing.
        self._client = aiohttp.ClientSession(
            timeout=_NO_TIMEOUT,
            connector=aiohttp.TCPConnector(limit=0, force_close=False, keepalive_timeout=_KEEPALIVE_S),
        )
        for spec in self._daemons:
            await asyncio.to_thread(self._run_daemon, spec)
        for proc in self._processes:
            proc.start()
        self._supervisor = asyncio.create_task(self._supervise(), name="vllm-supervisor")

    async def wait_ready(self, timeout: float) -> None:
        """Tests and the CLI: block until healthy or raise ``TimeoutError``."""
        deadline = time.monotonic() + timeout
        while self._status != "healthy":
            if time.monotonic() > deadline:
                tails = "; ".join(f"{p.spec.name}: {p.tail()}" for p in self._processes)
                raise TimeoutError(f"vLLM not ready within {timeout:.0f}s ({tails})")
            await asyncio.sleep(0.2)

    async def stop(self) -> None:
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
            self._supervisor = None
        await asyncio.gather(*(p.stop() for p in self._processes))
        for spec in self._daemons:
            await asyncio.to_thread(self._stop_daemon, spec)
        for task in list(self._ending):
            task.cancel()
        if self._ending:
            await asyncio.gather(*self._ending, return_exceptions=True)
        if self._client is not None:
            await self._client.close()
            self._client = None
        self._status = "unhealthy"

    def _run_daemon(self, spec: ProcessSpec) -> None:
        """Start a forking daemon (the MPS control daemon) and wait for it to detach."""
        result = subprocess.run(
            spec.argv, env={**os.environ, **spec.env}, capture_output=True, text=True, check=False, timeout=30
        )
        if result.returncode != 0:
            raise RuntimeError(f"{spec.name} failed: {(result.stderr or result.stdout).strip()[:200]}")

    def _stop_daemon(self, spec: ProcessSpec) -> None:
        if spec.stop_argv:
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                subprocess.run(
                    spec.stop_argv,
                    input=spec.stop_input,
                    env={**os.environ, **spec.env},
                    capture_output=True,
                    text=True,
                    check=False,
                    timeout=30,
                )

    # --- supervision ---------------------------------------------------------------------------

    async def _supervise(self) -> None:
        """Restart a process that exited, or that has not been ready for ``startup_timeout_s``:
        counted from its start, or from the check that first failed after it was ready (one slow
        ``/health`` of an engine up for longer than that must not kill its streams)."""
        verified = False
        crashes = 0
        ever_healthy = False
        unready_since = time.monotonic()
        while True:
            for proc in self._processes:
                code = proc.exited()
                since = max(proc.started_at, unready_since)
                stuck = code is None and not verified and time.monotonic() - since > self.startup_timeout_s
                if code is None and not stuck:
                    continue
                crashes += 1
                verified = False
                self._status = "unhealthy"
                delay = min(self.restart_backoff_s[1], self.restart_backoff_s[0] * 2 ** (crashes - 1))
                why = "did not become ready" if stuck else f"exited with {code}"
                log.warning("%s %s (%s); restarting in %.1fs", proc.spec.name, why, proc.tail(), delay)
                await proc.stop(timeout=5)
                await asyncio.sleep(delay)
                proc.start()
                self.restarts += 1
            healthy = await self._all_health_ok()
            if healthy and not verified:
                verified = await self._probe()
            elif not healthy:
                if verified:
                    unready_since = time.monotonic()
                verified = False
            if verified:
                crashes = 0
                ever_healthy = True
                self._status = "healthy"
            elif ever_healthy or crashes:
                self._status = "unhealthy"
            else:
                self._status = "starting"
            self._check_now.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._check_now.wait(), self.check_interval_s)

    def _urls(self) -> list[str]:
        return [u for u in (self.prefill_url, self.decode_url) if u] or [self.url]

    async def _all_health_ok(self) -> bool:
        assert self._client is not None
        for url in self._urls():
            try:
                async with self._client.get(url + "/health", timeout=_HEALTH_TIMEOUT) as resp:
                    if resp.status != 200:
                        return False
            except (aiohttp.ClientError, TimeoutError):
                return False
        return True

    async def _probe(self) -> bool:
        """A real one-token completion through the same path jobs take."""
        job = Job(
            id="probe",
            tenant_id="",
            key_id="",
            model=self.served_model_name,
            kind="completion",
            body={"prompt": PROBE_PROMPT, "max_tokens": 1, "temperature": 0},
            prompt_tokens=1,
            max_tokens=1,
            reply="",
            deadline=time.time() + self.probe_timeout_s,
        )
        try:
            async with asyncio.timeout(self.probe_timeout_s):
                got = False
                async for emission in self._generate(job):
                    got = got or any(p.tokens for p in emission.pieces) or emission.usage is not None
                return got
        except (EngineError, TimeoutError) as exc:
            log.info("vLLM readiness probe failed: %s", exc)
            return False

    # --- load ----------------------------------------------------------------------------------

    async def load(self) -> EngineLoad:
        """Scraped from ``/metrics``; the last known values if a scrape fails."""
        if self._client is None:
            return self._last_load
        total = EngineLoad()
        try:
            for url in self._urls():
                async with self._client.get(url + "/metrics", timeout=_METRICS_TIMEOUT) as resp:
                    part = parse_metrics(await resp.text())
                total = EngineLoad(
                    running=total.running + part.running,
                    waiting=total.waiting + part.waiting,
                    kv_cache_usage=max(total.kv_cache_usage, part.kv_cache_usage),
                )
        except (aiohttp.ClientError, TimeoutError):
            return self._last_load
        self._last_load = total
        return total

    # --- generation ----------------------------------------------------------------------------

    async def generate(self, job: Job) -> AsyncIterator[Emission]:
        if self._status != "healthy":
            raise EngineError("engine_unavailable", f"vLLM is {self._status}")
        async for emission in self._generate(job):
            yield emission

    def _request_body(self, job: Job) -> dict[str, Any]:
        body = dict(job.body)
        body["model"] = self.served_model_name
        body["stream"] = True
        # Continuous usage gives prompt tokens with the first chunk and an exact token count per
        # chunk, so a cancelled job's usage is the engine's own count, not an estimate.
        body["stream_options"] = {"include_usage": True, "continuous_usage_stats": True}
        if (
            self.busy_stream_interval > 1
            and self._open_streams >= self.busy_streams
            and int(body.get("n") or 1) == 1  # several choices share one usage count: one token a piece
        ):
            # Every streamed chunk costs vLLM's server, this agent, the api and the client a
            # message each; a busy node streams a few tokens a chunk (the first still at once),
            # which vLLM offers for this (``--stream-interval``) and the marketplace measured
            # (bench/gateway_overhead.py, README): a quiet node still streams every token alone.
            body["stream_interval"] = self.busy_stream_interval
        return body

    async def _generate(self, job: Job) -> AsyncIterator[Emission]:
        if self._client is None:
            raise EngineError("engine_unavailable", "engine not started")
        path = "/v1/chat/completions" if job.kind == "chat" else "/v1/completions"
        body = self._request_body(job)
        url = self.url
        if self.prefill_url and self.decode_url:
            body["kv_transfer_params"] = await self._remote_prefill(self.prefill_url + path, body)
            url = self.decode_url
        async for emission in self._stream(url + path, body, chat=job.kind == "chat"):
            yield emission

    def _read_end(self, resp: aiohttp.ClientResponse) -> bool:
        """Keep the connection of a stream read to its ``[DONE]`` for the next job.

        aiohttp closes a connection released with its body unread, and under load vLLM's chunked
        body ends a moment after its ``[DONE]``: a connection per job would cost the agent and
        vLLM a connect each on the way to the first token. The job must not wait for that moment
        (its end would reach the client later), so the rest is read in the background, which
        then releases the response. False when there is nothing left to read.
        """
        if resp.content.is_eof():
            return False

        async def read_end() -> None:
            try:
                async with asyncio.timeout(_END_TIMEOUT_S):
                    await resp.content.read()
            except (Exception, asyncio.CancelledError):
                resp.close()
            finally:
                resp.release()  # back to the pool if the body ended, else closed

        task = asyncio.create_task(read_end(), name="vllm read end")
        self._ending.add(task)
        task.add_done_callback(self._ending.discard)
        return True

    async def _remote_prefill(self, url: str, body: dict[str, Any]) -> Any:
        """Disaggregated proxy step: prefill with max_tokens=1; its kv_transfer_params go to decode."""
        assert self._client is not None
        pre = {k: v for k, v in body.items() if k != "stream_options"}
        pre.update(stream=False, max_tokens=1, kv_transfer_params=dict(_NO_REMOTE))
        if "max_completion_tokens" in pre:
            pre["max_completion_tokens"] = 1
        try:
            async with self._client.post(url, json=pre) as resp:
                raw = await resp.read()
                status = resp.status
        except aiohttp.ClientError as exc:
            self._check_now.set()
            raise EngineError("engine_unavailable", f"prefill instance unreachable: {exc!r}") from exc
        _raise_for_status(status, raw)
        try:
            return json.loads(raw).get("kv_transfer_params")
        except (ValueError, AttributeError) as exc:
            raise EngineError("engine_error", f"unreadable prefill answer: {exc}") from exc

    async def _stream(self, url: str, body: dict[str, Any], *, chat: bool) -> AsyncIterator[Emission]:
        assert self._client is not None
        exact = int(body.get("n") or 1) == 1  # usage deltas are per-request, so exact only for n=1
        counted = 0
        yielded = False
        self._open_streams += 1
        try:
            resp = await self._client.post(url, data=msgspec.json.encode(body), headers=_JSON)
            ending = False
            try:
                if resp.status >= 400:
                    _raise_for_status(resp.status, await resp.read())
                async for line in resp.content:
                    if not line.startswith(b"data:"):
                        continue
                    data = line[5:].strip()
                    if data == b"[DONE]":
                        ending = self._read_end(resp)
                        return
                    event = _decode_event(data)
                    if event.error is not None:
                        raise _stream_error(event.error, data, yielded)
                    usage = None
                    if event.usage is not None:
                        usage = Usage(event.usage.prompt_tokens or 0, event.usage.completion_tokens or 0)
                    delta: int | None = None
                    if exact and usage is not None:
                        delta, counted = usage.completion_tokens - counted, usage.completion_tokens
                    pieces = []
                    for choice in event.choices or ():
                        text = ((choice.delta.content if choice.delta else None) if chat else choice.text) or ""
                        finish = choice.finish_reason
                        if (
                            not text
                            and finish is None
                            and not delta
                            and choice.logprobs is None
                            and not (choice.delta and choice.delta.tool_calls)
                        ):
                            continue
                        calls = _tool_calls(choice.delta.tool_calls) if chat and choice.delta else None
                        tokens = delta if delta is not None else (1 if text or calls else 0)
                        delta = 0  # one choice carries the step's tokens
                        logprobs = _token_logprobs(choice.logprobs) if choice.logprobs is not None else None
                        pieces.append(Piece(choice.index, text, tokens, finish, logprobs, calls))
                    if pieces or usage is not None:
                        yielded = True
                        yield Emission(pieces, usage)
            finally:
                if not ending:
                    resp.release()  # with its body unread (a cancelled job): closed, which aborts it in vLLM
        except aiohttp.ClientError as exc:
            self._check_now.set()  # maybe the engine died: re-check health now, not in a second
            code: ErrorCode = "engine_error" if yielded else "engine_unavailable"
            raise EngineError(code, f"engine connection failed: {exc!r}") from exc
        except (msgspec.DecodeError, ValueError, HttpProcessingError) as exc:  # e.g. aiohttp's LineTooLong
            raise EngineError("engine_error", f"unreadable engine stream: {exc}") from exc
        finally:
            self._open_streams -= 1
