"""Pure placement policy: which node should take a job, given what the heartbeats said.

No I/O and no clock of its own (callers pass ``now``, a monotonic time), so the same code runs in
the scheduler service, in unit tests and in fleet-scale simulations (``bench/placement.py``).
Anything that does not change between heartbeats is computed once per heartbeat in
``FleetView.observe``, which keeps the per-job loop in ``place`` down to a few comparisons a node.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from dataclasses import dataclass, field

from market.wire import MAX_REPORTED_COUNT, Hardware, Heartbeat, Job, NodeStatus, ProfileInfo

ANY_MODEL = "*"
"""Key of a node's offer price that applies to every model it has no specific offer for."""


@dataclass(frozen=True, slots=True)
class PolicyConfig:
    """Knobs of the scoring; the defaults are what the service uses."""

    reserved_headroom_share: float = 0.1
    """Share of a node's sequence capacity that burst/on_demand jobs must leave free, so reserved
    traffic (which tenants pay for whether they use it or not) always finds room."""
    waiting_weight: float = 2.0
    """A queued request hurts more than a running one: it adds to someone's time to first token."""
    kv_weight: float = 0.5
    """A nearly full KV cache means preemption soon, whatever the sequence count says."""
    fit_weight: float = 1.0
    """How much the semi-PD slowdown estimate counts against load (both are fractions)."""
    short_context_penalty: float = 100.0
    """Added to the score of a node whose ``max_model_len`` holds the prompt but not the prompt plus
    ``max_tokens``: vLLM would end the answer early (``length``) there, so any node with a free slot
    that holds the whole request wins (load and fit add up to a few units at most), and a short one
    is taken only when there is none, rather than leave the request waiting."""
    tie_quantum: float = 0.02
    """Scores within the same quantum are a tie; among tied nodes the cheaper offer wins."""
    forget_after_s: float = 300.0
    """A node silent this long is forgotten (a model only it served becomes ``unknown_model``)."""
    scan_limit: int = 256
    """With more candidates than this, scoring starts at a random node and stops after this many
    eligible ones (a random sample, as in power-of-d-choices schedulers), which bounds decision
    time on large fleets; if none of them is eligible the scan goes on through the rest, so a job is
    never refused while some node could take it. 0 scans everything."""


DEFAULT_POLICY = PolicyConfig()


def _prefill_slowdown(share: int) -> float:
    """semi-PD prefill time with ``share``% of SMs, relative to 100% (SIMULATOR.md: x(0.7324r+0.3185))."""
    r = 100.0 / min(max(share, 1), 100)
    return (0.7324 * r + 0.3185) / (0.7324 + 0.3185)


def _decode_slowdown(share: int) -> float:
    """semi-PD time per output token with ``share``% of SMs, relative to 100% (x(0.6099r+0.4153))."""
    r = 100.0 / min(max(share, 1), 100)
    return (0.6099 * r + 0.4153) / (0.6099 + 0.4153)


@dataclass(slots=True, eq=False)
class Placed:
    """One of this replica's placements on a node, counted against it until a heartbeat
    acknowledges it (``FleetView.observe``)."""

    at: float
    """Monotonic time of the placement."""
    seq: int = 0
    """Its sequence number, given as it is sent (``FleetView.sent``): so one replica's jobs reach a
    node in the order of their numbers, and acknowledging one acknowledges all before it. 0 until
    then: no report can have counted it."""


@dataclass(slots=True, eq=False)
class NodeState:
    """What one scheduler replica knows about one node: its last heartbeat plus local accounting."""

    node_id: str
    provider_id: str
    status: NodeStatus = "starting"
    models: tuple[str, ...] = ()
    engine: str = "vllm"
    profile: ProfileInfo = field(default_factory=ProfileInfo)
    hardware: Hardware = field(default_factory=Hardware)
    slots: int = 0
    running: int = 0
    waiting: int = 0
    kv_cache_usage: float = 0.0
    last_seen: float = 0.0
    """Monotonic time the last heartbeat arrived here (the node's own clock is not trusted)."""
    seen_at: float = 0.0
    """Wall-clock time of the same arrival, for ``nodes.last_seen_at``."""
    in_flight: int = 0
    """Jobs this replica placed here that the node's last heartbeat did not count yet."""
    unacked: list[Placed] = field(default_factory=list)
    """Those jobs, oldest first."""
    offers: dict[str, int] = field(default_factory=dict)
    """Offer price in minor units per million tokens, by model (``ANY_MODEL`` for the default)."""
    lost: bool = False
    """Set once the node went silent for the heartbeat timeout, so ``node_lost`` is sent once."""
    announced: NodeStatus | None = None
    """The last status a fleet event was published for (``draining`` or ``revoked``)."""
    # Derived once per heartbeat (see ``_derive``):
    capacity: int = 1
    headroom: int = 0
    inv_capacity: float = 1.0
    base_load: float = 0.0
    prefill_slowdown: float = 1.0
    decode_slowdown: float = 1.0

    def healthy(self, now: float, timeout_s: float) -> bool:
        """Healthy for placement: says so itself, and said so recently."""
        return self.status == "healthy" and now - self.last_seen < timeout_s

    def price_for(self, model: str) -> int | None:
        offers = self.offers
        if not offers:
            return None
        price = offers.get(model)
        return offers.get(ANY_MODEL) if price is None else price

    @property
    def free_slots(self) -> int:
        return self.slots - self.in_flight


class FleetView:
    """The fleet as one scheduler replica sees it, indexed by model for fast candidate lookup."""

    def __init__(
        self,
        heartbeat_timeout_s: float,
        config: PolicyConfig = DEFAULT_POLICY,
        rng: random.Random | None = None,
        replica: str = "",
    ) -> None:
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.config = config
        self.replica = replica
        """The replica's name in ``Heartbeat.placements``."""
        self.placement_seq = 0
        """The sequence number of this replica's last placement sent (``sent``)."""
        self.rng = rng or random.Random()  # noqa: S311 - tie-breaking, not security
        self.nodes: dict[str, NodeState] = {}
        self._by_model: dict[str, dict[str, NodeState]] = {}
        self._lists: dict[str, list[NodeState]] = {}
        """``_by_model`` as lists (for a random starting point), rebuilt when membership changes."""
        self._offers: dict[str, dict[str, int]] = {}

    def __len__(self) -> int:
        return len(self.nodes)

    def __iter__(self) -> Iterator[NodeState]:
        return iter(self.nodes.values())

    def get(self, node_id: str) -> NodeState | None:
        return self.nodes.get(node_id)

    def candidates(self, model: str) -> list[NodeState]:
        """Nodes listing ``model``, in no particular order."""
        listed = self._lists.get(model)
        if listed is None:
            by_node = self._by_model.get(model)
            if not by_node:
                return []
            listed = self._lists[model] = list(by_node.values())
        return listed

    def serves(self, model: str) -> bool:
        """Whether any known node (healthy or not) lists ``model``: else the model is unknown."""
        return bool(self._by_model.get(model))

    def longest_context(self, model: str) -> int:
        """The longest ``max_model_len`` among known nodes of ``model`` (healthy or not)."""
        return max((node.profile.max_model_len for node in self.candidates(model)), default=0)

    def serves_tools(self, model: str) -> bool:
        """Whether any known node of ``model`` (healthy or not) parses tool calls."""
        return any(node.profile.tools for node in self.candidates(model))

    def observe(self, hb: Heartbeat, now: float, wall: float = 0.0) -> NodeState:
        """Take in a heartbeat; a node that comes back after being lost can be lost (and announced)
        again.

        Its counts include the placements it acknowledges (``Heartbeat.placements``), not those
        sent after it was counted: a report in flight while a job was on its way must not free the
        job's slot, or a full node gets a second job (an engine queue bypassing the scheduler's
        order, reserved first). A placement never acknowledged within the heartbeat timeout was
        lost with the message or the node's restart. An agent that acknowledges nothing (older
        than the field) is taken to count all placed before its report arrived."""
        node = self.nodes.get(hb.node_id)
        if node is None:
            node = NodeState(hb.node_id, hb.provider_id, offers=self._offers.setdefault(hb.node_id, {}))
            self.nodes[hb.node_id] = node
        models = tuple(hb.models)
        if models != node.models:
            for model in node.models:
                self._by_model.get(model, {}).pop(node.node_id, None)
                self._lists.pop(model, None)
            for model in models:
                self._by_model.setdefault(model, {})[node.node_id] = node
                self._lists.pop(model, None)
            node.models = models
        node.provider_id = hb.provider_id
        node.status = hb.status
        node.engine = hb.engine
        node.profile = hb.profile
        node.hardware = hb.hardware
        # A node's word, bounded: a NaN, infinite or negative figure would poison every placement
        # for its models (an unorderable score), or make the node win them all.
        node.slots = _count(hb.slots)
        node.running = _count(hb.running)
        node.waiting = _count(hb.waiting)
        kv = hb.kv_cache_usage
        node.kv_cache_usage = min(max(kv, 0.0), 1.0) if math.isfinite(kv) else 1.0
        node.last_seen = now
        node.seen_at = wall
        if hb.placements is None:
            node.unacked.clear()
        elif node.unacked:
            last = hb.placements.get(self.replica, 0)
            stale = now - self.heartbeat_timeout_s
            node.unacked = [p for p in node.unacked if (p.seq == 0 or p.seq > last) and p.at >= stale]
        node.in_flight = len(node.unacked)
        node.lost = False
        if hb.status not in ("draining", "revoked"):
            node.announced = None
        self._derive(node)
        return node

    def _derive(self, node: NodeState) -> None:
        config = self.config
        capacity = max(node.running + node.slots, 1)
        node.capacity = capacity
        node.inv_capacity = 1.0 / capacity
        node.headroom = int(config.reserved_headroom_share * capacity)
        node.base_load = (
            node.running + config.waiting_weight * node.waiting
        ) * node.inv_capacity + config.kv_weight * node.kv_cache_usage
        node.prefill_slowdown = _prefill_slowdown(node.profile.prefill_share)
        node.decode_slowdown = _decode_slowdown(node.profile.decode_share)

    def set_offer(self, node_id: str, price_minor_per_million: int | None, model: str = ANY_MODEL) -> None:
        """Record (or with ``None`` clear) a node's offer price; may come before its first heartbeat."""
        offers = self._offers.setdefault(node_id, {})
        if price_minor_per_million is None:
            offers.pop(model, None)
        else:
            offers[model] = price_minor_per_million

    def has_free_slot(self, model: str, now: float, reserved: bool) -> bool:
        """Whether some healthy node serving ``model`` has a slot left that a job of this kind may
        take (a reserved job the headroom too, see ``place``), whatever the job's own limits."""
        timeout = self.heartbeat_timeout_s
        for node in self.candidates(model):
            if node.free_slots > (0 if reserved else node.headroom) and node.healthy(now, timeout):
                return True
        return False

    def commit(self, node: NodeState, now: float) -> Placed:
        """Count a placement against the node until a heartbeat acknowledges it."""
        placed = Placed(now)
        node.unacked.append(placed)
        node.in_flight += 1
        return placed

    def sent(self, placed: Placed) -> int:
        """Number a placement as its job is sent (what it carries in ``PLACEMENT_HEADER``); the
        caller sends it before anything else is numbered."""
        self.placement_seq += 1
        placed.seq = self.placement_seq
        return placed.seq

    def release(self, node: NodeState, placed: Placed) -> None:
        """A placement whose job could not be sent no longer counts against its node."""
        if placed in node.unacked:
            node.unacked.remove(placed)
            node.in_flight = len(node.unacked)

    def expire(self, now: float) -> list[NodeState]:
        """Nodes that just went silent past the timeout (each returned once per silence), and
        forget nodes silent for ``forget_after_s``."""
        lost: list[NodeState] = []
        forget: list[NodeState] = []
        timeout = self.heartbeat_timeout_s
        for node in self.nodes.values():
            silent = now - node.last_seen
            if silent >= timeout and not node.lost:
                node.lost = True
                lost.append(node)
            if silent >= self.config.forget_after_s:
                forget.append(node)
        for node in forget:
            self.forget(node.node_id)
        return lost

    def forget(self, node_id: str) -> None:
        node = self.nodes.pop(node_id, None)
        if node is not None:
            for model in node.models:
                self._lists.pop(model, None)
                by_node = self._by_model.get(model)
                if by_node is not None:
                    by_node.pop(node_id, None)
                    if not by_node:
                        del self._by_model[model]

    def healthy_count(self, now: float) -> int:
        timeout = self.heartbeat_timeout_s
        return sum(1 for node in self.nodes.values() if node.healthy(now, timeout))


def place(job: Job, fleet: FleetView, now: float) -> NodeState | None:
    """The best node for ``job`` right now, or ``None`` if no node may take it.

    Filters (a node failing any is never chosen): serves ``job.model``; status ``healthy`` and a
    heartbeat younger than the timeout (so neither draining, starting nor lost); not in
    ``job.exclude_nodes`` (failed before); its provider in ``job.allowed_providers`` when set; its
    offer price for the model at most ``job.max_price_minor_per_million`` when both are known (a
    node without an offer is paid the price book rate, which the api already checked); the prompt
    fits its ``max_model_len``; a job with ``tools`` needs a node whose engine parses tool calls; and
    a free slot (reported slots minus our in-flight placements). A node that holds the prompt but not
    the whole ``max_tokens`` after it is taken only when none that holds both may take the job.
    burst/on_demand jobs must also leave ``reserved_headroom_share`` of the node's capacity free.

    Score (lower wins), each term a fraction of the node so they add up sensibly:

    - load: ``(running + in_flight + waiting_weight * waiting) / capacity + kv_weight * kv_cache``,
      where capacity = running + slots. In-flight counts make a burst within one heartbeat spread.
    - semi-PD fit: the job's expected slowdown on this node's compute split, weighting the
      published prefill and decode slowdown curves (SIMULATOR.md) by prompt tokens and max_tokens,
      minus 1. A long prompt pays for a small prefill share, a long generation for a small decode
      share; a unified node (100/100) costs nothing here.
    - short context: ``short_context_penalty`` for a node that cannot hold prompt plus ``max_tokens``.
    - price: scores in the same ``tie_quantum`` bucket tie, and the cheaper offer wins the tie;
      a node without an offer counts as 0 there. Then the lower exact score; exact ties are broken
      at random so that replicas with the same view do not all pick the same node.

    On fleets larger than ``scan_limit`` nodes per model the best of a random sample of that many
    eligible nodes is taken (see ``PolicyConfig.scan_limit``).
    """
    candidates = fleet.candidates(job.model)
    if not candidates:
        return None
    config = fleet.config
    timeout = fleet.heartbeat_timeout_s
    exclude = set(job.exclude_nodes) if job.exclude_nodes else None
    allowed = set(job.allowed_providers) if job.allowed_providers is not None else None
    max_price = job.max_price_minor_per_million
    reserved = job.admission_class == "reserved"
    tools = job.tools
    model = job.model
    prompt = max(job.prompt_tokens, 0)
    decode = max(job.max_tokens, 0)
    total = prompt + decode
    prefill_weight = prompt / total if total else 0.5
    decode_weight = 1.0 - prefill_weight
    fit_weight = config.fit_weight
    short_penalty = config.short_context_penalty
    quantum = config.tie_quantum

    count = len(candidates)
    limit = config.scan_limit
    if limit and count > limit:
        start = fleet.rng.randrange(count)
        order = candidates[start:] + candidates[:start]
    else:
        limit = count
        order = candidates

    best: NodeState | None = None
    best_bucket = 0
    best_price = 0
    best_score = 0.0
    ties = 0
    eligible = 0
    for node in order:
        if eligible >= limit:
            break
        if node.status != "healthy" or now - node.last_seen >= timeout:
            continue
        free = node.slots - node.in_flight
        if free <= 0 or (not reserved and free <= node.headroom):
            continue
        if exclude is not None and node.node_id in exclude:
            continue
        if allowed is not None and node.provider_id not in allowed:
            continue
        price = node.price_for(model) if node.offers else None
        if max_price is not None and price is not None and price > max_price:
            continue
        if prompt >= node.profile.max_model_len:
            continue
        if tools and not node.profile.tools:
            continue
        eligible += 1
        score = node.base_load + node.in_flight * node.inv_capacity
        score += fit_weight * (prefill_weight * node.prefill_slowdown + decode_weight * node.decode_slowdown - 1.0)
        if total > node.profile.max_model_len:
            score += short_penalty
        bucket = int(score / quantum)
        cost = price or 0
        if best is not None:
            if bucket != best_bucket:
                if bucket > best_bucket:
                    continue
            elif cost != best_price:
                if cost > best_price:
                    continue
            elif score != best_score:
                if score > best_score:
                    continue
            else:
                ties += 1
                if fleet.rng.random() * ties >= 1.0:
                    continue
        if best is None or score != best_score or bucket != best_bucket or cost != best_price:
            ties = 1
        best, best_bucket, best_price, best_score = node, bucket, cost, score
    return best


def _count(value: int) -> int:
    return min(max(value, 0), MAX_REPORTED_COUNT)
