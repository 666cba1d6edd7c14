"""The routing policy: a pure function of what the gateway measures."""

from dataclasses import replace

import pytest

from collm_fl.policies.routing import (
    LatencyModel,
    ReplicaView,
    admitted_ttft,
    choose_replica,
    load_of,
    predict_latency,
    queue_wait_steps,
    typical_remaining_tokens,
    unloaded_tpot,
    unloaded_ttft,
)
from collm_fl.replica.metrics import SLO

SLO_ = SLO(ttft_s=1.0, tpot_s=0.1)
IDLE = ReplicaView(name="a", healthy=True, ewma_ttft_s=0.05, ewma_tpot_s=0.01, max_batch=4)


def view(name: str, **kw: object) -> ReplicaView:
    return replace(IDLE, name=name, **kw)


def test_idle_replica_is_predicted_at_its_learned_latencies():
    p = predict_latency(IDLE, prompt_tokens=0, max_tokens=16)
    assert p.ttft_s == pytest.approx(0.05)
    assert p.tpot_s == pytest.approx(0.01)


def test_priors_stand_in_until_a_replica_is_measured():
    model = LatencyModel(prior_ttft_s=0.3, prior_tpot_s=0.04)
    p = predict_latency(ReplicaView("x", True), 0, 16, model)
    assert p.ttft_s == pytest.approx(0.3) and p.tpot_s == pytest.approx(0.04)


def test_predictions_grow_with_every_kind_of_load():
    base = predict_latency(IDLE, 10, 32)
    for loaded in (
        view("a", in_flight=2, in_flight_tokens=40),
        view("a", queue_depth=1, running=1),
        view("a", in_flight=6, in_flight_tokens=600),  # beyond the 4 batch slots: queueing
    ):
        p = predict_latency(loaded, 10, 32)
        assert p.ttft_s > base.ttft_s and p.tpot_s > base.tpot_s


def test_queueing_beyond_the_batch_costs_slot_releases():
    full = view("a", in_flight=4, in_flight_tokens=400)  # 4 slots, 100 tokens left each
    over = view("a", in_flight=6, in_flight_tokens=600)
    gap = predict_latency(over, 0, 16).ttft_s - predict_latency(full, 0, 16).ttft_s
    # Two more queued ahead → two more slot releases of ~100 tokens · step / 4 slots each.
    step = 0.01 * (1 + 0.1 * 3)
    assert gap == pytest.approx(2 * 100 * step / 4, rel=0.01)


def test_gateway_and_replica_counts_of_the_same_requests_are_not_added():
    both = view("a", in_flight=3, in_flight_tokens=30, queue_depth=1, running=2)
    gateway_only = view("a", in_flight=3, in_flight_tokens=30)
    assert predict_latency(both, 0, 16) == predict_latency(gateway_only, 0, 16)


def test_a_drained_burst_no_longer_counts_once_the_gateway_saw_it_end():
    # The last poll saw 12 queued + 8 running, all 20 sent by the gateway; 8 have ended since.
    drained = view("a", in_flight=12, queue_depth=12, running=8, in_flight_at_poll=20)
    assert load_of(drained) == 12
    # What the replica reported beyond the gateway's count (other clients) still counts.
    bypassed = view("a", in_flight=12, queue_depth=17, running=8, in_flight_at_poll=20)
    assert load_of(bypassed) == 17
    # Without a poll's count, the larger of the two (never both).
    assert load_of(replace(drained, in_flight_at_poll=None)) == 20


@pytest.mark.parametrize(
    "remaining, load, cap, expected",
    [
        ((5, 9), 2, 4, 0),  # a slot is free
        ((64,) * 8, 8, 8, 64),  # a burst started together: its slots free together
        ((64,) * 9, 9, 8, 64),  # one queued ahead takes the first, the new one the next
        (tuple(range(1, 9)), 8, 8, 1),  # staggered: the first to finish
        ((*range(1, 9), 8, 8), 10, 8, 3),  # two ahead take the slots freeing at 1 and 2
        ((5,) * 4, 8, 4, 15),  # 4 the gateway did not send: external_tokens (10) each, in turn
    ],
)
def test_a_new_request_waits_for_the_slot_that_frees_after_those_ahead(
    remaining, load, cap, expected
):
    assert queue_wait_steps(remaining, load, cap, external_tokens=10) == expected


@pytest.mark.parametrize(
    "external",
    [
        {"queue_depth": 8, "running": 4},  # no request of the gateway's own: the default length
        {
            "in_flight": 4,
            "remaining_tokens": (30,) * 4,
            "queue_depth": 8,
            "running": 4,
            "in_flight_at_poll": 4,
        },  # the mean of its own
        {
            "in_flight": 4,
            "in_flight_tokens": 120,
            "queue_depth": 8,
            "running": 4,
            "in_flight_at_poll": 4,
        },  # (no per-request counts)
    ],
)
def test_a_requests_own_length_does_not_lengthen_its_wait_behind_requests_of_other_clients(
    external,
):
    # 8 requests the gateway did not send wait on a full replica: they were counted at the new
    # request's max_tokens, so one asking for 4096 tokens was predicted ~250x the wait of one
    # asking for 16 behind the same work (and shed).
    busy = view("a", **external)
    assert load_of(busy) > 4  # beyond the 4 slots: the external requests are queued
    short, long = predict_latency(busy, 0, 16), predict_latency(busy, 0, 4096)
    assert long.ttft_s == pytest.approx(short.ttft_s)
    assert short.ttft_s > predict_latency(IDLE, 0, 16).ttft_s


def test_requests_of_other_clients_count_at_the_mean_left_of_the_gateways_own():
    model = LatencyModel()
    assert typical_remaining_tokens(view("a", remaining_tokens=(10, 30)), model) == 20
    assert typical_remaining_tokens(view("a", in_flight=4, in_flight_tokens=120), model) == 30
    assert typical_remaining_tokens(view("a"), model) == model.default_remaining_tokens


def test_a_slot_freeing_after_the_running_step_costs_that_step_once():
    # A full batch whose rows each have one token left: the slot frees when the running step
    # ends, so the new request waits out that one step, as on a batch with a free slot.
    ending = view("a", in_flight=4, remaining_tokens=(1, 1, 1, 1))
    expected = admitted_ttft(0.05, 0.01, 0, 4, 4, 0.0)
    assert predict_latency(ending, 0, 16).ttft_s == pytest.approx(expected)
    # Two tokens left each: one more step at the full batch's pace.
    later = view("a", in_flight=4, remaining_tokens=(2, 2, 2, 2))
    step = 0.01 * (1 + 0.1 * 3)
    assert predict_latency(later, 0, 16).ttft_s == pytest.approx(expected + step)


def test_training_share_slows_a_replica():
    training = view("a", training_share=0.5)
    assert predict_latency(training, 0, 16).tpot_s > predict_latency(IDLE, 0, 16).tpot_s
    assert predict_latency(training, 0, 16).ttft_s > predict_latency(IDLE, 0, 16).ttft_s


def test_prefers_the_replica_predicted_to_meet_the_slo():
    fast_but_loaded = view("a", in_flight=40, in_flight_tokens=8000)  # TTFT way over 1 s
    slower_idle = view("b", ewma_ttft_s=0.4, ewma_tpot_s=0.05)
    assert predict_latency(fast_but_loaded, 0, 64).ttft_s > SLO_.ttft_s
    assert choose_replica([fast_but_loaded, slower_idle], 0, 64, SLO_) == "b"


def test_meeting_the_tpot_slo_matters_too():
    low_ttft_slow_decode = view("a", ewma_ttft_s=0.01, ewma_tpot_s=0.5)
    meets_both = view("b", ewma_ttft_s=0.3, ewma_tpot_s=0.02)
    assert choose_replica([low_ttft_slow_decode, meets_both], 0, 64, SLO_) == "b"


def test_when_none_meets_the_slo_the_lowest_ttft_wins():
    a = view("a", ewma_ttft_s=5.0)
    b = view("b", ewma_ttft_s=3.0)
    assert choose_replica([a, b], 0, 16, SLO_) == "b"


def test_avoids_unhealthy_and_excluded_replicas():
    views = [view("a"), view("b", healthy=False), view("c", in_flight=3, in_flight_tokens=300)]
    assert choose_replica(views, 0, 16, SLO_) == "a"
    assert choose_replica(views, 0, 16, SLO_, exclude={"a"}) == "c"
    assert choose_replica(views, 0, 16, SLO_, exclude={"a", "c"}) is None


def test_no_healthy_replica_gives_none():
    assert choose_replica([view("a", healthy=False)], 0, 16, SLO_) is None
    assert choose_replica([], 0, 16, SLO_) is None


def test_more_load_means_less_preference():
    for n in range(1, 8):
        light = view("a", in_flight=n - 1, in_flight_tokens=(n - 1) * 20)
        heavy = view("b", in_flight=n, in_flight_tokens=n * 20)
        assert choose_replica([heavy, light], 0, 16, SLO_) == "a"
        assert (
            choose_replica([replace(light, name="b"), replace(heavy, name="a")], 0, 16, SLO_) == "b"
        )


def test_near_equal_ttfts_tie_and_the_fewest_in_flight_wins():
    # 2 ms apart (measurement noise): spread the load instead of pinning it to the "faster" one.
    a = view("a", ewma_ttft_s=0.050, in_flight=1, in_flight_tokens=16)
    b = view("b", ewma_ttft_s=0.040, in_flight=2, in_flight_tokens=32)
    c = view("c", ewma_ttft_s=0.048, in_flight=0)
    assert choose_replica([a, b, c], 0, 16, SLO_) == "c"


def test_training_share_makes_a_replica_less_attractive_under_equal_load():
    for load in (0, 2, 5):
        kw = {"in_flight": load, "in_flight_tokens": load * 30}
        plain, training = view("a", **kw), view("b", training_share=0.6, **kw)
        assert choose_replica([training, plain], 0, 16, SLO_) == "a"
        assert (
            choose_replica([replace(training, name="a"), replace(plain, name="b")], 0, 16, SLO_)
            == "b"
        )


def test_a_training_replica_loses_a_tie_to_a_busier_one_that_is_not_training():
    """(The allocation's turns: requests go around the replica taking its turn, also where the
    two predictions are within the tie tolerance and it has fewer requests in flight.)"""
    model = LatencyModel(tie_tolerance_frac=0.5)  # the idle training one within the busy's band
    training = view("a", training_share=1.0)
    busy = view("b", in_flight=2, in_flight_tokens=20)
    ttfts = [predict_latency(v, 0, 16, model).ttft_s for v in (training, busy)]
    assert ttfts[1] < ttfts[0] <= ttfts[1] * 1.5  # tied (the band), with fewer in flight
    assert choose_replica([training, busy], 0, 16, SLO_, model=model) == "b"
    assert (
        choose_replica([replace(training, training_share=0.0), busy], 0, 16, SLO_, model=model)
        == "a"
    )


def test_a_recent_failure_weighs_against_a_replica_then_fades():
    failed = view("a", consecutive_failures=2, last_error_age_s=0.5)
    assert choose_replica([failed, view("b", in_flight=1, in_flight_tokens=16)], 0, 16, SLO_) == "b"
    forgotten = replace(failed, last_error_age_s=60.0)
    assert (
        choose_replica([forgotten, view("b", in_flight=1, in_flight_tokens=16)], 0, 16, SLO_) == "a"
    )


def test_a_penalized_replica_that_meets_the_slo_still_beats_one_predicted_to_miss_it():
    # The penalty ranks replicas, it is no time a request waits: counted as TTFT, an idle replica
    # that refused a burst's requests a second ago (penalty 1.35 s) fell out of the tier that
    # meets the 1-s SLO and lost to a replica predicted to miss it.
    idle_but_failed = view("a", consecutive_failures=3, last_error_age_s=1.0)
    busy = view("b", in_flight=24, in_flight_tokens=24 * 16)
    assert predict_latency(busy, 0, 16).ttft_s > SLO_.ttft_s  # misses it
    assert predict_latency(idle_but_failed, 0, 16).ttft_s < SLO_.ttft_s  # meets it
    assert choose_replica([idle_but_failed, busy], 0, 16, SLO_) == "a"


def test_a_replica_failing_every_request_does_not_count_as_meeting_the_slo():
    # It answers /health but fails whatever it is sent (a wrong replica key, a broken model):
    # in the tier that meets the SLO it won every request, each paying a failed attempt first.
    failing = view("a", consecutive_failures=20, last_error_age_s=0.1)
    busy = view("b", in_flight=24, in_flight_tokens=24 * 16)
    assert (
        predict_latency(failing, 0, 16).ttft_s < SLO_.ttft_s < predict_latency(busy, 0, 16).ttft_s
    )
    assert choose_replica([failing, busy], 0, 16, SLO_) == "b"
    # ... still chosen when it is all there is, and once its penalty has faded
    assert choose_replica([failing], 0, 16, SLO_) == "a"
    assert choose_replica([replace(failing, last_error_age_s=60.0), busy], 0, 16, SLO_) == "a"


def test_normalising_an_observation_inverts_the_prediction():
    loaded = view("a", in_flight=2, in_flight_tokens=40, training_share=0.4)
    p = predict_latency(loaded, 100, 16)
    assert unloaded_tpot(p.tpot_s, batch=3, training_share=0.4) == pytest.approx(0.01)
    base = unloaded_ttft(
        p.ttft_s, 100, load_at_send=2, capacity=4, base_tpot_s=0.01, training_share=0.4
    )
    assert base == pytest.approx(0.05)


def test_a_request_that_queued_teaches_nothing_about_ttft():
    assert (
        unloaded_ttft(3.0, 0, load_at_send=4, capacity=4, base_tpot_s=0.01, training_share=0)
        is None
    )


def test_an_unmeasured_replica_is_assumed_to_be_like_its_peers():
    # A pessimistic prior would flood the measured replica; an optimistic one the fresh replica.
    measured = view("a", ewma_ttft_s=0.01, ewma_tpot_s=0.004, in_flight=1, in_flight_tokens=16)
    fresh = ReplicaView("b", True, max_batch=4)
    model = LatencyModel(prior_ttft_s=0.5, prior_tpot_s=0.05)
    assert choose_replica([measured, fresh], 0, 16, SLO_, model=model) == "b"
    busy_fresh = replace(fresh, in_flight=2, in_flight_tokens=32)
    assert choose_replica([measured, busy_fresh], 0, 16, SLO_, model=model) == "a"


def test_idle_equal_replicas_take_turns():
    # Sequential requests at light load: both idle and equally fast; the least recently routed
    # goes.
    a, b = view("a", last_routed=5), view("b", last_routed=4)
    assert choose_replica([a, b], 0, 16, SLO_) == "b"
    assert choose_replica([a, replace(b, last_routed=6)], 0, 16, SLO_) == "a"


def test_a_replica_back_from_downtime_takes_turns_instead_of_every_tied_request():
    # Ties went to the fewest requests routed ever: a replica back after 1,000 requests went to
    # its peer took the next 1,000 in a row. By the least recently routed, they alternate.
    views = {"a": view("a", last_routed=1000), "b": view("b", last_routed=0)}
    sent, chosen = 1000, []
    for _ in range(6):
        name = choose_replica(list(views.values()), 0, 16, SLO_)
        assert name is not None
        sent += 1
        views[name] = replace(views[name], last_routed=sent)
        chosen.append(name)
    assert chosen == ["b", "a", "b", "a", "b", "a"]


def test_prompts_still_to_prefill_on_a_replica_count_against_it():
    # A burst: four requests just sent to a (none has its first token yet) wait for their
    # prefills there, which the decode batch alone would not show; b is slower but idle.
    fast_busy = view("a", ewma_ttft_s=0.26, ewma_tpot_s=0.07, max_batch=8, in_flight=4)
    slow_idle = view("b", ewma_ttft_s=0.45, ewma_tpot_s=0.07, max_batch=8)
    assert choose_replica([replace(fast_busy, prefills_ahead=0), slow_idle], 64, 24, SLO_) == "a"
    busy = replace(fast_busy, prefills_ahead=4)
    assert choose_replica([busy, slow_idle], 64, 24, SLO_) == "b"
    model = LatencyModel()
    extra = predict_latency(busy, 64, 24).ttft_s - predict_latency(fast_busy, 64, 24).ttft_s
    assert extra == pytest.approx(4 * model.queued_prefill_factor * 0.26)
    # ... slowed by training like the replica's own prefill
    training = replace(busy, training_share=0.5)
    slowed = (
        predict_latency(training, 64, 24).ttft_s
        - predict_latency(replace(training, prefills_ahead=0), 64, 24).ttft_s
    )
    assert slowed == pytest.approx(extra * (1 + model.training_interference * 0.5))


def test_the_prompts_of_prefills_ahead_count_by_their_length():
    # Two replicas each with one prefill ahead: a's is a 4000-token prompt, b's a short one.
    model = LatencyModel()
    a = view("a", ewma_ttft_s=0.26, ewma_tpot_s=0.07, max_batch=8, in_flight=1, prefills_ahead=1)
    b = replace(a, name="b")
    long_ahead, short_ahead = (
        replace(a, prompt_tokens_ahead=4000),
        replace(b, prompt_tokens_ahead=40),
    )
    extra = predict_latency(long_ahead, 64, 24).ttft_s - predict_latency(short_ahead, 64, 24).ttft_s
    assert extra == pytest.approx(model.queued_prefill_factor * 3960 * model.prefill_s_per_token)
    assert choose_replica([long_ahead, short_ahead], 64, 24, SLO_) == "b"


def test_a_ttft_observed_behind_prefills_is_normalised_back_to_an_idle_replica():
    loaded = view(
        "a",
        in_flight=2,
        in_flight_tokens=40,
        training_share=0.4,
        prefills_ahead=2,
        prompt_tokens_ahead=900,
    )
    p = predict_latency(loaded, 100, 16)
    base = unloaded_ttft(
        p.ttft_s,
        100,
        load_at_send=2,
        capacity=4,
        base_tpot_s=0.01,
        training_share=0.4,
        prefills_ahead=2,
        prompt_tokens_ahead=900,
    )
    assert base == pytest.approx(0.05)
    admitted = admitted_ttft(0.05, 0.01, 100, 2, 4, 0.4, prefills_ahead=2, prompt_tokens_ahead=900)
    assert admitted == pytest.approx(p.ttft_s)
