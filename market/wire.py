"""Wire messages between api, scheduler, nodes and billing (msgspec Structs, MessagePack on NATS).

These types are the only thing the domain packages share besides the database schema, so every
field is documented and changes must stay backward compatible (add fields with defaults).

Data path of one request::

    api --request jobs.submit (Job)--> scheduler --reply Placement--> api   (at once, or when a slot frees)
    scheduler --publish schedulers.alive (SchedulerAlive)--> api   (its jobs' waits end when the beats do)
    api --publish jobs.withdraw (Cancel)--> schedulers          (gave up while the job waited for a slot)
    scheduler --publish node.<id>.jobs (Job, reply=Job.reply)--> node agent
    node --publish Job.reply (Chunk: [accepted], data..., end | error)--> api
    api --publish node.<id>.cancel (Cancel)--> node          (client went away)
    node --publish fleet.heartbeat.<id> (Heartbeat)--> schedulers, api
    scheduler --publish fleet.events (FleetEvent)--> api     (node lost: fail its jobs over)
    api --JetStream usage.<tenant> (UsageEvent, Nats-Msg-Id=request id)--> billing
"""

from __future__ import annotations

from typing import Any, Literal, TypeVar

import msgspec

JobKind = Literal["chat", "completion"]
AdmissionClass = Literal["reserved", "burst", "on_demand"]
ServingMode = Literal["unified", "semi-pd", "disaggregated"]
NodeStatus = Literal["starting", "healthy", "unhealthy", "draining", "revoked"]
ChunkKind = Literal["accepted", "data", "end", "error"]
Outcome = Literal["completed", "cancelled", "failed", "refused"]
"""``refused``: the admission that ran beside placement refused the request after its node had
started on it; billing pays the provider for that work and charges the tenant nothing (a billing
worker that predates it rejects such events: deploy billing first)."""


class Job(msgspec.Struct, kw_only=True):
    """One inference request, as the api hands it to a scheduler and the scheduler to a node."""

    id: str
    """Request id (``req_...``); also the usage event's Nats-Msg-Id and the ledger's key."""
    tenant_id: str
    key_id: str
    model: str
    """The marketplace model name the tenant asked for."""
    kind: JobKind
    body: dict[str, Any]
    """The OpenAI request body to send to the engine, validated and normalised by the api
    (``model`` is replaced by the node with the engine's served name; streaming is forced on)."""
    prompt_tokens: int
    """The api's estimate of prompt tokens, for placement and the quota hold."""
    max_tokens: int
    admission_class: AdmissionClass = "on_demand"
    reply: str
    """Subject the node publishes Chunks to (the api's inbox for this job)."""
    deadline: float
    """Unix time after which nobody waits for this job any more."""
    exclude_nodes: list[str] = msgspec.field(default_factory=list)
    allowed_providers: list[str] | None = None
    max_price_minor_per_million: int | None = None
    attempt: int = 1
    wait_s: float = 0.0
    """How long the job may wait at the scheduler for a free slot when every node serving its
    model is busy (reserved before burst before on_demand, first come first served within a class);
    0 asks for ``no_capacity`` at once. The scheduler answers when it places the job."""
    relay_to: str | None = None
    """The api replica's relay id. When set, the node may send this job's chunks together with other
    jobs' for the same replica, as ``ChunkBatch`` messages on ``subjects.node_relay``, instead of
    one message per chunk to ``reply``."""
    hold_notice: bool = False
    """Ask a scheduler that keeps the job waiting for a slot to say so at once (``Placement``
    ``queued``), so the api can watch that replica's ``SchedulerAlive`` beats and submit the job
    again should it die (its waiting jobs' answers die with it)."""
    tools: bool = False
    """The request offers tools the model may call: only a node whose profile says ``tools`` can
    serve it (another engine refuses the request)."""
    keepalive_s: float = 0.0
    """How often the api says it still wants the job (``Keepalive`` on ``subjects.node_keepalive``);
    a node aborts a job not confirmed for ``KEEPALIVE_MISSES`` times this (its api process died:
    nobody reads the output). 0: the api never says (the job runs to its end or deadline)."""


class Placement(msgspec.Struct, kw_only=True):
    """A scheduler's reply to ``jobs.submit``: the node a job went to, or why none."""

    job_id: str
    node_id: str | None = None
    provider_id: str | None = None
    error: str | None = None
    """Set when no node could take the job: ``no_capacity``, ``unknown_model``,
    ``context_too_long`` (a prompt, by the api's estimate, no node of the model has the context for)
    or ``tools_unsupported`` (a job with ``tools`` for a model no node serves with them); or ``queued``:
    the job waits at replica ``scheduler`` (for a ``Job.hold_notice`` job), which answers again
    on the same subject when it places the job or gives up on it."""
    retry_after_s: float = 1.0
    scheduler: str | None = None
    """The replica that answered (its ``SchedulerAlive.replica``)."""


class TopLogprob(msgspec.Struct, array_like=True):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(msgspec.Struct, array_like=True):
    """One generated token's log probability, and the most likely alternatives when asked for.

    One shape for both APIs: the api renders it as chat's ``logprobs.content`` or as the
    completions API's parallel lists."""

    token: str
    logprob: float
    bytes: list[int] | None = None
    top: list[TopLogprob] = msgspec.field(default_factory=list)


class ToolCallDelta(msgspec.Struct, array_like=True):
    """A piece of a tool call, as OpenAI streams them: the call's ``id`` and function ``name`` come
    once, in its first delta; ``arguments`` (JSON text) arrives in parts, joined by ``index``."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


class Piece(msgspec.Struct, array_like=True):
    """Generated text for one choice; ``tokens`` is how many engine tokens it carries."""

    index: int
    text: str
    tokens: int = 1
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] | None = None
    """The text's tokens' log probabilities, for a job that asked for them (``logprobs`` in its
    body); absent otherwise, so older peers read the piece as before."""
    tool_calls: list[ToolCallDelta] | None = None
    """Tool-call deltas generated with (or instead of) the text, for a chat job with ``tools``."""


class Usage(msgspec.Struct):
    """Token counts as the engine reported them."""

    prompt_tokens: int
    completion_tokens: int


class Chunk(msgspec.Struct, kw_only=True):
    """A node's message to the api about one job.

    ``accepted`` comes first when the engine's first output is slow (any chunk says the node took
    the job); ``data`` carries pieces (several tokens batched when they come faster than they can
    be sent); the job ends with ``end`` (the engine's usage, and the last pieces if they came with
    it) or ``error``. ``seq`` counts from 0 so the api can detect loss.
    """

    job_id: str
    node_id: str
    seq: int
    kind: ChunkKind
    pieces: list[Piece] = msgspec.field(default_factory=list)
    usage: Usage | None = None
    error: str | None = None
    error_code: str | None = None
    """``engine_unavailable`` or ``draining`` (safe to retry before the first token),
    ``invalid_request`` (the engine refused the body), ``engine_error``."""
    status: int | None = None
    """HTTP status the engine answered with, when it refused the request."""
    engine_ttft_ms: float | None = None
    """On the job's first output (``data``, or ``end`` if that comes first): the engine's own time
    from the agent's request to its first output, so the api can tell its share of the TTFT
    (admission, placement, both NATS hops, the agent) from the engine's."""


class RelayedChunk(msgspec.Struct, array_like=True):
    """One job's chunk inside a ChunkBatch, with the job attempt's reply subject."""

    reply: str
    chunk: Chunk


class ChunkBatch(msgspec.Struct):
    """Chunks of several jobs for one api replica, sent by one node in one message.

    vLLM steps every running sequence at once, so a node relaying 50 streams gets 50 tokens in the
    same instant: one NATS message for them, not 50, is a fraction of the publishing, parsing and
    waking on both sides. Each job's chunks keep their order (one sender, one subject).
    """

    items: list[RelayedChunk]


KEEPALIVE_MISSES = 5
"""Keepalives a node waits for in vain before it aborts a job (see ``Job.keepalive_s``)."""


class Keepalive(msgspec.Struct, kw_only=True):
    """Api replica -> node on ``node.<id>.keepalive``, every ``Job.keepalive_s``: the node's jobs
    it still relays (placed and not finished)."""

    job_ids: list[str]


class SchedulerAlive(msgspec.Struct, kw_only=True):
    """A scheduler replica's beat on ``schedulers.alive``, every heartbeat interval."""

    replica: str


class Cancel(msgspec.Struct, kw_only=True):
    """The api no longer wants a job (client disconnect, deadline): to its node on
    ``node.<id>.cancel``, or to every scheduler on ``jobs.withdraw`` while it waits for a slot."""

    job_id: str
    reason: str = "client_disconnected"


class Hardware(msgspec.Struct, kw_only=True):
    accelerator: str = "cpu"
    memory_gib: float = 0.0
    count: int = 1


class ProfileInfo(msgspec.Struct, kw_only=True):
    """What a node's serving profile means for placement (see ``nodes`` serving profiles)."""

    mode: ServingMode = "unified"
    prefill_share: int = 100
    """Percent of the accelerator's compute given to prefill (semi-PD); 100 for unified."""
    decode_share: int = 100
    max_num_seqs: int = 256
    max_model_len: int = 4096
    tools: bool = False
    """The engine parses tool calls (vLLM started with a ``--tool-call-parser``): jobs with
    ``Job.tools`` go only to such nodes."""


MAX_REPORTED_COUNT = 1_000_000
"""More requests than any node runs or queues: a heartbeat count beyond it is a broken report
(nodes bound what they send by it, schedulers what they take in)."""


class Heartbeat(msgspec.Struct, kw_only=True):
    """A node's periodic report; missing ones make the node unhealthy for placement."""

    node_id: str
    provider_id: str
    status: NodeStatus
    models: list[str]
    engine: str = "vllm"
    """``vllm`` or ``sim`` (the simulated engine, never billed as real capacity in production)."""
    profile: ProfileInfo = msgspec.field(default_factory=ProfileInfo)
    hardware: Hardware = msgspec.field(default_factory=Hardware)
    slots: int = 0
    """How many more sequences the node would take now."""
    running: int = 0
    waiting: int = 0
    kv_cache_usage: float = 0.0
    agent_version: str = ""
    sent_at: float = 0.0
    seq: int = 0
    placements: dict[str, int] | None = None
    """Per scheduler replica, the ``PLACEMENT_HEADER`` sequence number of the last job from it this
    node had received when it counted ``slots``: a replica still counts its later placements
    against the node. ``None`` from agents before this field (a replica then takes the report to
    cover all it placed before it arrived, and may overcommit a node for one report)."""


PLACEMENT_HEADER = "Market-Placement"
"""NATS header on a job a scheduler forwards to a node: ``"<replica> <sequence number>"``, the
number rising with each of the replica's placements (on any node); echoed in ``Heartbeat.placements``."""


class FleetEvent(msgspec.Struct, kw_only=True):
    """A change in the fleet the api must act on (fail over jobs of a lost node)."""

    kind: Literal["node_lost", "node_draining", "node_revoked"]
    node_id: str
    at: float


class UsageEvent(msgspec.Struct, kw_only=True):
    """What one request consumed; published once per request, billed exactly once.

    Outcome ``refused``: the work a node did on a job whose admission (run beside its placement)
    refused it; ``relayed_completion_tokens`` are then the tokens the api received from the node
    (none reached the client), and there is no event if neither a count nor tokens came within
    ``api.token.service.REFUSED_COUNT_WAIT_S`` of the cancel."""

    request_id: str
    tenant_id: str
    key_id: str
    model: str
    admission_class: AdmissionClass
    node_id: str | None
    provider_id: str | None
    prompt_tokens: int
    """As the engine reported them (0 if the engine never reported)."""
    completion_tokens: int
    relayed_completion_tokens: int
    """Tokens the api itself relayed to the client: the cross-check on the engine's count."""
    outcome: Outcome
    started_at: float
    ended_at: float
    ttft_ms: float | None = None
    """From the request's arrival at the api to its first token leaving for the client (for a
    non-streamed request, to the first token reaching the api)."""
    engine_ttft_ms: float | None = None
    """The part of ``ttft_ms`` the engine spent (as its node measured it); the rest is the marketplace's."""
    duration_ms: float = 0.0
    reservation_id: str | None = None


_ENCODER = msgspec.msgpack.Encoder()


def encode(message: msgspec.Struct) -> bytes:
    return _ENCODER.encode(message)


T = TypeVar("T")


def decoder(kind: type[T]) -> msgspec.msgpack.Decoder[T]:
    """A reusable decoder for one message type (build once per subscriber; decoding is hot)."""
    return msgspec.msgpack.Decoder(kind)
