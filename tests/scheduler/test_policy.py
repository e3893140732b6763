"""The pure placement policy: which node a job lands on, and when none may take it."""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

from market.wire import Heartbeat, Job, ProfileInfo
from scheduler.policy import FleetView, PolicyConfig, place

TIMEOUT = 5.0


def heartbeat(node_id: str, **overrides: Any) -> Heartbeat:
    fields: dict[str, Any] = {
        "node_id": node_id,
        "provider_id": "prov_a",
        "status": "healthy",
        "models": ["llama-8b"],
        "slots": 8,
    }
    fields.update(overrides)
    return Heartbeat(**fields)


def job(**overrides: Any) -> Job:
    fields: dict[str, Any] = {
        "id": "req_1",
        "tenant_id": "ten_1",
        "key_id": "key_1",
        "model": "llama-8b",
        "kind": "chat",
        "body": {},
        "prompt_tokens": 100,
        "max_tokens": 100,
        "reply": "_INBOX.api.req_1",
        "deadline": 0.0,
    }
    fields.update(overrides)
    return Job(**fields)


def fleet_of(*beats: Heartbeat, now: float = 100.0, config: PolicyConfig | None = None) -> FleetView:
    fleet = FleetView(TIMEOUT, config or PolicyConfig(), rng=random.Random(7))
    for hb in beats:
        fleet.observe(hb, now)
    return fleet


def placed_on(fleet: FleetView, j: Job, now: float = 100.0) -> str | None:
    node = place(j, fleet, now)
    return None if node is None else node.node_id


def test_only_nodes_serving_the_model_are_considered() -> None:
    fleet = fleet_of(heartbeat("node_a", models=["mistral-7b"]), heartbeat("node_b", models=["llama-8b", "qwen"]))
    assert placed_on(fleet, job(model="llama-8b")) == "node_b"
    assert placed_on(fleet, job(model="mistral-7b")) == "node_a"
    assert placed_on(fleet, job(model="gpt-9")) is None
    assert not fleet.serves("gpt-9")
    assert fleet.serves("qwen")


def test_excluded_nodes_are_skipped_for_a_retry() -> None:
    fleet = fleet_of(heartbeat("node_a", running=6, slots=2), heartbeat("node_b"))
    assert placed_on(fleet, job()) == "node_b"
    assert placed_on(fleet, job(exclude_nodes=["node_b"], attempt=2)) == "node_a"
    assert placed_on(fleet, job(exclude_nodes=["node_a", "node_b"])) is None


def test_silent_draining_and_starting_nodes_get_nothing() -> None:
    fleet = fleet_of(
        heartbeat("node_old"),
        heartbeat("node_draining", status="draining"),
        heartbeat("node_starting", status="starting"),
    )
    fleet.observe(heartbeat("node_fresh", running=7, slots=1), 104.0)
    # node_old's last heartbeat is 5 s old at 105: past the timeout, even though it is idle.
    assert placed_on(fleet, job(), now=105.0) == "node_fresh"
    assert placed_on(fleet, job(), now=104.9) == "node_old"
    assert [n.node_id for n in fleet.expire(105.0)] == ["node_old", "node_draining", "node_starting"]
    assert fleet.expire(105.5) == []  # each silence is reported once
    fleet.observe(heartbeat("node_old"), 106.0)
    assert not fleet.get("node_old").lost  # type: ignore[union-attr]
    assert placed_on(fleet, job(admission_class="reserved"), now=106.0) == "node_old"


def test_forgotten_nodes_make_their_model_unknown() -> None:
    fleet = fleet_of(heartbeat("node_a"), config=PolicyConfig(forget_after_s=60.0))
    fleet.expire(130.0)
    assert fleet.serves("llama-8b")  # lost, maybe back soon: no_capacity, not unknown_model
    fleet.expire(161.0)
    assert not fleet.serves("llama-8b")
    assert len(fleet) == 0


def test_burst_leaves_headroom_that_reserved_traffic_may_use() -> None:
    # capacity 20 (running + slots); 20% headroom keeps 4 slots for reserved jobs.
    fleet = fleet_of(heartbeat("node_a", running=16, slots=4), config=PolicyConfig(reserved_headroom_share=0.2))
    for admission in ("burst", "on_demand"):
        assert placed_on(fleet, job(admission_class=admission)) is None
    node = place(job(admission_class="reserved"), fleet, 100.0)
    assert node is not None
    for _ in range(4):
        fleet.commit(node, 100.0)
    assert placed_on(fleet, job(admission_class="reserved")) is None  # full means full for everyone


def test_headroom_lets_burst_in_while_it_lasts() -> None:
    fleet = fleet_of(heartbeat("node_a", running=0, slots=10), config=PolicyConfig(reserved_headroom_share=0.2))
    placed = 0
    while (node := place(job(admission_class="burst"), fleet, 100.0)) is not None:
        fleet.commit(node, 100.0)
        placed += 1
    assert placed == 8


def test_long_prompts_prefer_prefill_share_and_long_generations_decode_share() -> None:
    fleet = fleet_of(
        heartbeat("node_prefill", profile=ProfileInfo(mode="semi-pd", prefill_share=100, decode_share=60)),
        heartbeat("node_decode", profile=ProfileInfo(mode="semi-pd", prefill_share=60, decode_share=100)),
    )
    assert placed_on(fleet, job(prompt_tokens=3000, max_tokens=64)) == "node_prefill"
    assert placed_on(fleet, job(prompt_tokens=40, max_tokens=2000)) == "node_decode"


def test_semi_pd_fit_does_not_override_a_crowded_node() -> None:
    fleet = fleet_of(
        heartbeat(
            "node_prefill", running=30, waiting=10, slots=2, profile=ProfileInfo(prefill_share=100, decode_share=80)
        ),
        heartbeat("node_decode", profile=ProfileInfo(prefill_share=80, decode_share=100)),
    )
    assert placed_on(fleet, job(prompt_tokens=3000, max_tokens=64)) == "node_decode"


def test_prompt_longer_than_the_node_context_goes_elsewhere() -> None:
    fleet = fleet_of(
        heartbeat("node_small", profile=ProfileInfo(max_model_len=1024)),
        heartbeat("node_big", running=6, slots=2, profile=ProfileInfo(max_model_len=32768)),
    )
    assert placed_on(fleet, job(prompt_tokens=100)) == "node_small"
    assert placed_on(fleet, job(prompt_tokens=2000)) == "node_big"


def test_a_node_that_holds_the_whole_answer_wins_over_a_less_loaded_one_that_would_cut_it() -> None:
    fleet = fleet_of(
        heartbeat("node_small", profile=ProfileInfo(max_model_len=1024)),
        heartbeat("node_big", running=6, slots=2, profile=ProfileInfo(max_model_len=32768)),
    )
    assert placed_on(fleet, job(prompt_tokens=100, max_tokens=900)) == "node_small"  # it fits: less load wins
    assert placed_on(fleet, job(prompt_tokens=100, max_tokens=2000)) == "node_big"  # it would end at 1024
    full = fleet_of(
        heartbeat("node_small", profile=ProfileInfo(max_model_len=1024)),
        heartbeat("node_big", running=8, slots=0, profile=ProfileInfo(max_model_len=32768)),
    )
    # No node that holds it all is free: the short one serves rather than leave the request waiting.
    assert placed_on(full, job(prompt_tokens=100, max_tokens=2000)) == "node_small"


def test_a_request_with_tools_goes_only_to_a_node_that_parses_tool_calls() -> None:
    fleet = fleet_of(
        heartbeat("node_plain"),
        heartbeat("node_tools", running=6, slots=2, profile=ProfileInfo(tools=True)),
    )
    assert placed_on(fleet, job()) == "node_plain"  # the emptier node, for a plain request
    assert placed_on(fleet, job(tools=True)) == "node_tools"
    assert placed_on(fleet_of(heartbeat("node_plain")), job(tools=True)) is None


def test_tenant_price_limit_and_allowed_providers() -> None:
    fleet = fleet_of(
        heartbeat("node_cheap", provider_id="prov_cheap", running=4),
        heartbeat("node_dear", provider_id="prov_dear"),
        heartbeat("node_plain", provider_id="prov_plain", running=6, slots=2),
    )
    fleet.set_offer("node_cheap", 200)
    fleet.set_offer("node_dear", 900)
    fleet.set_offer("node_dear", 150, model="qwen")  # a model-specific offer does not apply to llama
    assert placed_on(fleet, job()) == "node_dear"  # idle wins without a limit
    assert placed_on(fleet, job(max_price_minor_per_million=500)) == "node_cheap"
    assert placed_on(fleet, job(max_price_minor_per_million=100)) == "node_plain"  # no offer: not dearer
    assert placed_on(fleet, job(allowed_providers=["prov_plain", "prov_cheap"])) == "node_cheap"
    assert placed_on(fleet, job(allowed_providers=["prov_dear"], max_price_minor_per_million=500)) is None
    assert placed_on(fleet, job(allowed_providers=[])) is None


def test_cheaper_offer_wins_a_tie() -> None:
    fleet = fleet_of(*(heartbeat(f"node_{i}", provider_id=f"prov_{i}") for i in range(5)))
    for i in range(5):
        fleet.set_offer(f"node_{i}", 500 - i * 10)
    assert placed_on(fleet, job()) == "node_4"


def test_a_burst_within_one_heartbeat_spreads_over_the_fleet() -> None:
    fleet = fleet_of(*(heartbeat(f"node_{i}", slots=16) for i in range(4)))
    counts: Counter[str] = Counter()
    for _ in range(40):
        node = place(job(), fleet, 100.0)
        assert node is not None
        fleet.commit(node, 100.0)
        counts[node.node_id] += 1
    assert counts == {f"node_{i}": 10 for i in range(4)}
    # The next heartbeat reports those jobs itself, so local accounting starts over.
    fleet.observe(heartbeat("node_0", running=10, slots=6), 100.5)
    assert fleet.get("node_0").in_flight == 0  # type: ignore[union-attr]


def test_in_flight_placements_use_up_reported_slots() -> None:
    fleet = fleet_of(heartbeat("node_a", slots=3))
    for _ in range(3):
        node = place(job(admission_class="reserved"), fleet, 100.0)
        assert node is not None
        fleet.commit(node, 100.0)
    assert place(job(admission_class="reserved"), fleet, 100.0) is None


def test_kv_cache_pressure_and_queue_steer_away() -> None:
    fleet = fleet_of(heartbeat("node_kv", kv_cache_usage=0.95), heartbeat("node_queue", waiting=3, running=2))
    fleet.observe(heartbeat("node_ok", running=2, kv_cache_usage=0.3), 100.0)
    assert placed_on(fleet, job()) == "node_ok"


def test_large_fleets_are_sampled_but_never_refused_while_a_node_fits() -> None:
    config = PolicyConfig(scan_limit=16)
    fleet = fleet_of(
        *(heartbeat(f"node_{i:03d}", provider_id=f"prov_{i:03d}", running=60, slots=20) for i in range(300)),
        config=config,
    )
    # Only one provider allowed: far outside any 16-node sample, still found.
    assert placed_on(fleet, job(allowed_providers=["prov_250"])) == "node_250"
    # Samples start at random nodes, so a burst spreads instead of hammering one corner of the fleet.
    chosen: Counter[str] = Counter()
    for _ in range(100):
        node = place(job(), fleet, 100.0)
        assert node is not None
        fleet.commit(node, 100.0)
        chosen[node.node_id] += 1
    assert max(chosen.values()) <= 3


def test_a_node_reporting_nonsense_load_neither_blocks_placement_nor_wins_it() -> None:
    """NaN or infinite KV use (a broken engine gauge) made every placement of the model fail; it
    now counts as a full cache. Negative figures count as zero, not as better than empty."""
    for kv in (float("nan"), float("inf")):
        fleet = fleet_of(heartbeat("broken", kv_cache_usage=kv), heartbeat("sane", running=1, kv_cache_usage=0.1))
        spread = Counter(placed_on(fleet, job(id=f"req_{i}")) for i in range(8))
        assert None not in spread, (kv, spread)
        assert spread["sane"] > spread["broken"], (kv, spread)
    fleet = fleet_of(heartbeat("negative", running=-50, waiting=-50, slots=-8, kv_cache_usage=-3.0))
    node = fleet.nodes["negative"]
    assert (node.running, node.waiting, node.slots, node.kv_cache_usage) == (0, 0, 0, 0.0)


def test_a_report_counted_before_a_placement_arrived_does_not_free_its_slot() -> None:
    """A one-slot node's report, counted before the job placed on it arrived, reaches the replica
    after the placement: the slot stays taken until a report acknowledges the job, then the
    report's own count rules."""
    fleet = FleetView(TIMEOUT, PolicyConfig(reserved_headroom_share=0.0), replica="sched-a")
    fleet.observe(heartbeat("node_a", slots=1, placements={}), 100.0)
    node = place(job(), fleet, 100.0)
    assert node is not None
    seq = fleet.sent(fleet.commit(node, 100.0))
    fleet.observe(heartbeat("node_a", slots=1, placements={"sched-b": 99}), 100.1)  # not ours
    assert placed_on(fleet, job(), 100.1) is None
    fleet.observe(heartbeat("node_a", slots=0, placements={"sched-a": seq}), 100.2)
    assert placed_on(fleet, job(), 100.2) is None
    fleet.observe(heartbeat("node_a", slots=1, placements={"sched-a": seq}), 100.3)  # the job ended
    assert placed_on(fleet, job(), 100.3) == "node_a"


def test_a_placement_never_acknowledged_stops_counting_after_the_heartbeat_timeout() -> None:
    """Lost on the way, or with the node's restart: it holds the slot no longer than a lost node."""
    fleet = FleetView(TIMEOUT, PolicyConfig(reserved_headroom_share=0.0), replica="sched-a")
    fleet.observe(heartbeat("node_a", slots=1, placements={}), 100.0)
    node = place(job(), fleet, 100.0)
    assert node is not None
    fleet.sent(fleet.commit(node, 100.0))
    fleet.observe(heartbeat("node_a", slots=1, placements={}), 100.0 + TIMEOUT - 0.1)
    assert placed_on(fleet, job(), 100.0 + TIMEOUT - 0.1) is None
    fleet.observe(heartbeat("node_a", slots=1, placements={}), 100.0 + TIMEOUT + 0.1)
    assert placed_on(fleet, job(), 100.0 + TIMEOUT + 0.1) == "node_a"


def test_an_agent_that_acknowledges_nothing_is_taken_to_count_all_placed_before_its_report() -> None:
    """Agents from before ``Heartbeat.placements``: the old rule, so they still get work."""
    fleet = FleetView(TIMEOUT, PolicyConfig(reserved_headroom_share=0.0), replica="sched-a")
    fleet.observe(heartbeat("node_a", slots=1), 100.0)
    node = place(job(), fleet, 100.0)
    assert node is not None
    fleet.commit(node, 100.0)
    assert placed_on(fleet, job(), 100.0) is None
    fleet.observe(heartbeat("node_a", slots=1), 100.1)
    assert placed_on(fleet, job(), 100.1) == "node_a"


def test_a_placement_not_yet_sent_stays_counted_when_a_later_one_is_acknowledged() -> None:
    """Placements are numbered as they are sent: one placed earlier but still waiting to be sent
    when a later one went out is not in a report that acknowledges the later one."""
    fleet = FleetView(TIMEOUT, PolicyConfig(reserved_headroom_share=0.0), replica="sched-a")
    fleet.observe(heartbeat("node_a", slots=2, placements={}), 100.0)
    node = fleet.get("node_a")
    assert node is not None
    waiting_to_be_sent = fleet.commit(node, 100.0)
    later = fleet.sent(fleet.commit(node, 100.0))
    fleet.observe(heartbeat("node_a", slots=1, placements={"sched-a": later}), 100.1)
    assert node.in_flight == 1
    assert placed_on(fleet, job(), 100.1) is None
    assert fleet.sent(waiting_to_be_sent) > later


def test_a_placement_that_could_not_be_sent_frees_its_slot_at_once() -> None:
    fleet = FleetView(TIMEOUT, PolicyConfig(reserved_headroom_share=0.0), replica="sched-a")
    fleet.observe(heartbeat("node_a", slots=1, placements={}), 100.0)
    node = fleet.get("node_a")
    assert node is not None
    placed = fleet.commit(node, 100.0)
    fleet.sent(placed)
    assert placed_on(fleet, job(), 100.0) is None
    fleet.release(node, placed)
    assert placed_on(fleet, job(), 100.0) == "node_a"
