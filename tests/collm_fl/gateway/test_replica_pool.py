"""The pool's bookkeeping (requests begun and ended by hand, on a fake clock) and health polling."""

import asyncio
import math
import time

import httpx
import pytest

from collm_fl.errors import ConfigError
from collm_fl.gateway.pool import ESTIMATE_TTL_S, ReplicaPool
from collm_fl.policies.routing import (
    LatencyModel,
    choose_replica,
    failure_penalty_s,
    load_of,
)
from collm_fl.replica.metrics import SLO

MODEL = LatencyModel(default_max_batch=4)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make_pool() -> tuple[ReplicaPool, Clock]:
    clock = Clock()
    return ReplicaPool(
        ["http://127.0.0.1:8100/v1", "http://127.0.0.1:8101/"], model=MODEL, clock=clock
    ), clock


def view(pool: ReplicaPool, name: str):
    return next(v for v in pool.views() if v.name == name)


def test_replicas_are_named_by_host_and_port_and_urls_normalised():
    pool, _ = make_pool()
    assert pool.names() == ["127.0.0.1:8100", "127.0.0.1:8101"]
    assert pool.url_of("127.0.0.1:8100") == "http://127.0.0.1:8100"
    assert all(not v.healthy for v in pool.views())  # unknown until the first poll


@pytest.mark.parametrize(
    "urls", [[], ["127.0.0.1:8100"], ["ftp://h:1"], ["http://h:1", "http://h:1/v1"]]
)
def test_bad_replica_lists_are_config_errors(urls):
    with pytest.raises(ConfigError):
        ReplicaPool(urls)


def test_in_flight_counts_balance_however_a_request_ends():
    pool, _ = make_pool()
    a = "127.0.0.1:8100"
    tickets = [pool.begin(a, 10, 50) for _ in range(4)]
    assert view(pool, a).in_flight == 4 and view(pool, a).in_flight_tokens == 200
    for _ in range(5):
        pool.on_token(tickets[0])
    assert view(pool, a).in_flight_tokens == 195
    pool.succeed(tickets[0])
    pool.fail(tickets[1], "boom")
    pool.release(tickets[2])
    pool.release(tickets[2])  # ending twice changes nothing
    pool.succeed(tickets[1])
    assert view(pool, a).in_flight == 1 and view(pool, a).in_flight_tokens == 50
    pool.release(tickets[3])
    assert view(pool, a).in_flight == 0 and view(pool, a).in_flight_tokens == 0


def test_a_streamed_request_teaches_unloaded_ttft_and_tpot():
    pool, clock = make_pool()
    a = "127.0.0.1:8100"
    t = pool.begin(a, 0, 10)
    clock.now += 0.2
    pool.on_token(t)  # first token after 0.2 s
    for _ in range(4):
        clock.now += 0.05
        pool.on_token(t)
    pool.succeed(t)
    v = view(pool, a)
    assert v.ewma_ttft_s == pytest.approx(0.2) and v.ewma_tpot_s == pytest.approx(0.05)


def test_a_slow_readers_pauses_are_not_learned_as_the_replicas_decode_time():
    # The relay takes the next event only once the client took the last: a client that paused
    # 2 s mid-stream put 2 s between two tokens the replica sent 0.05 s apart.
    pool, clock = make_pool()
    a = "127.0.0.1:8100"
    t = pool.begin(a, 0, 10)
    clock.now += 0.2
    pool.on_token(t)
    for k in range(4):
        clock.now += 0.05
        if k == 2:
            clock.now += 2.0
            t.held_s += 2.0  # the client held the relay
        pool.on_token(t)
    t.held_s += 5.0  # held after the last token: not between the first and the last
    pool.succeed(t)
    assert view(pool, a).ewma_tpot_s == pytest.approx(0.05)


def test_a_stream_whose_usage_counts_more_tokens_than_events_divides_its_time_among_them():
    # A stop string held back text: 5 tokens came in 3 events (0.2 s from first to last).
    pool, clock = make_pool()
    a = "127.0.0.1:8100"
    t = pool.begin(a, 0, 10)
    clock.now += 0.2
    pool.on_token(t)
    for _ in range(2):
        clock.now += 0.1
        pool.on_token(t)
    pool.succeed(t, completion_tokens=5)
    assert view(pool, a).ewma_tpot_s == pytest.approx(0.05)  # not 0.1 per event


def test_a_json_request_teaches_tpot_from_its_duration():
    pool, clock = make_pool()
    a = "127.0.0.1:8100"
    t = pool.begin(a, 0, 11)
    clock.now += MODEL.prior_ttft_s + 10 * 0.03
    pool.succeed(t, completion_tokens=11)
    assert view(pool, a).ewma_tpot_s == pytest.approx(0.03)
    assert view(pool, a).ewma_ttft_s is None  # not visible in a JSON reply without its timing


def test_a_json_reply_with_the_replicas_timing_teaches_ttft_and_tpot():
    pool, clock = make_pool()
    a = "127.0.0.1:8100"
    t = pool.begin(a, 0, 11)
    clock.now += 0.02 + 0.3 + 10 * 0.05  # 20 ms on the wire, TTFT 0.3 s, then 10 tokens
    pool.succeed(t, completion_tokens=11, replica_timing=(0.3, 0.3 + 10 * 0.05))
    v = view(pool, a)
    assert v.ewma_ttft_s == pytest.approx(0.32)  # the wire counts to the client's TTFT
    assert v.ewma_tpot_s == pytest.approx(0.05)


@pytest.mark.parametrize(
    "tokens, timing",
    [
        (0, (0.1, 0.1)),  # no token: no first token to time
        (11, (0.3, 9.0)),  # decoding longer than the gateway waited: not this reply's timing
        (11, (0.5, 0.5)),  # 11 tokens in no time
    ],
)
def test_a_json_replys_timing_that_cannot_be_its_own_falls_back_to_its_duration(tokens, timing):
    pool, clock = make_pool()
    a = "127.0.0.1:8100"
    t = pool.begin(a, 0, 11)
    clock.now += MODEL.prior_ttft_s + 10 * 0.03
    pool.succeed(t, completion_tokens=tokens, replica_timing=timing)
    v = view(pool, a)
    assert v.ewma_ttft_s is None
    assert v.ewma_tpot_s == (None if tokens < 2 else pytest.approx(0.03))


def test_the_views_list_each_requests_remaining_tokens_oldest_first():
    pool, _ = make_pool()
    a = "127.0.0.1:8100"
    first, middle, last = (pool.begin(a, 0, n) for n in (50, 5, 20))
    pool.release(middle)
    assert view(pool, a).remaining_tokens == (50, 20)
    pool.release(first)
    pool.release(last)


def test_a_json_reply_that_queued_teaches_its_tpot_but_not_its_ttft():
    pool, clock = make_pool()
    a = "127.0.0.1:8100"
    running = [pool.begin(a, 0, 11) for _ in range(MODEL.default_max_batch)]  # the batch is full
    queued = pool.begin(a, 0, 11)
    clock.now += 5.0 + 10 * 0.05
    pool.succeed(queued, completion_tokens=11, replica_timing=(5.0, 5.0 + 10 * 0.05))
    v = view(pool, a)
    assert v.ewma_ttft_s is None  # it waited for a slot: says nothing of the replica's TTFT
    batch = 1 + MODEL.batch_slowdown * (MODEL.default_max_batch - 1)
    assert v.ewma_tpot_s == pytest.approx(0.05 / batch)  # its decoding ran on a full batch
    for t in running:
        pool.release(t)


def test_a_json_request_with_a_long_prompt_on_a_busy_replica_teaches_its_true_tpot():
    """Its prompt's prefill and the running step are not decode time (as a stream teaches)."""
    from collm_fl.policies.routing import batch_factor

    pool, clock = make_pool()
    a = "127.0.0.1:8100"
    true_tpot, prompt = 0.02, 4000
    busy = pool.begin(a, 0, 50)  # one request running (decoding) when it is sent ...
    pool.on_token(busy)
    t = pool.begin(a, prompt, 10, stream=False)
    prefill = MODEL.prior_ttft_s + prompt * MODEL.prefill_s_per_token
    running_step = MODEL.prior_tpot_s * batch_factor(1, MODEL)  # (the prior: nothing learned)
    clock.now += prefill + running_step + 9 * true_tpot * batch_factor(2, MODEL)
    pool.succeed(t, completion_tokens=10)
    assert view(pool, a).ewma_tpot_s == pytest.approx(true_tpot)
    pool.release(busy)
    # ... or one still waiting for its prefill, which came before this one's first token too
    pool, clock = make_pool()
    waiting = pool.begin(a, 0, 50)
    t = pool.begin(a, prompt, 10, stream=False)
    ahead = MODEL.queued_prefill_factor * MODEL.prior_ttft_s
    clock.now += prefill + ahead + running_step + 9 * true_tpot * batch_factor(2, MODEL)
    pool.succeed(t, completion_tokens=10)
    assert view(pool, a).ewma_tpot_s == pytest.approx(true_tpot)
    pool.release(waiting)


def test_a_json_request_that_found_the_batch_full_teaches_no_tpot():
    pool, clock = make_pool()
    a = "127.0.0.1:8100"
    running = [pool.begin(a, 0, 11) for _ in range(MODEL.default_max_batch)]  # the batch is full
    queued = pool.begin(a, 0, 11)
    clock.now += 5.0  # mostly spent waiting for a slot
    pool.succeed(queued, completion_tokens=11)
    assert view(pool, a).ewma_tpot_s is None
    for t in running:
        pool.release(t)


def test_failures_count_until_a_success_and_a_refused_connection_marks_unhealthy():
    pool, clock = make_pool()
    a = "127.0.0.1:8100"
    pool._replicas[a].healthy = True  # as after a good poll
    pool.fail(pool.begin(a, 1, 4), "HTTP 503")
    clock.now += 2.0
    v = view(pool, a)
    assert v.healthy and v.consecutive_failures == 1 and v.last_error_age_s == pytest.approx(2.0)
    pool.fail(pool.begin(a, 1, 4), "ConnectError", replica_down=True)
    assert not view(pool, a).healthy and view(pool, a).consecutive_failures == 2
    pool.succeed(pool.begin(a, 1, 4))
    assert view(pool, a).consecutive_failures == 0


def test_a_replica_that_comes_back_healthy_carries_no_penalty_for_its_downtime():
    pool, clock = make_pool()
    a = "127.0.0.1:8100"
    pool._replicas[a].healthy = True
    for _ in range(8):  # its streams failed as it crashed
        pool.fail(pool.begin(a, 1, 4), "ConnectError", replica_down=True)
    assert not view(pool, a).healthy and failure_penalty_s(view(pool, a), MODEL) > 3.0
    clock.now += 5.0
    pool._poll_succeeded(pool._replicas[a])  # restarted: /health answers again
    assert view(pool, a).healthy and failure_penalty_s(view(pool, a), MODEL) == 0.0
    # A replica that stays healthy and fails requests keeps its penalty until a success.
    pool.fail(pool.begin(a, 1, 4), "HTTP 500")
    pool._poll_succeeded(pool._replicas[a])
    assert view(pool, a).consecutive_failures == 1


def test_idle_replicas_take_turns_also_after_one_took_every_request_while_the_other_was_down():
    # Ties went to the fewest requests routed ever: a replica back after its peer had taken
    # 1,000 requests took the next 1,000 in a row. The least recently routed goes instead.
    pool, _ = make_pool()
    a, b = pool.names()
    for name in (a, b):
        pool._replicas[name].healthy = True
    for _ in range(1000):  # b is down meanwhile
        pool.succeed(pool.begin(a, 0, 4))
    chosen = []
    for _ in range(6):  # sequential requests, both idle again
        name = choose_replica(pool.views(), 0, 4, SLO(ttft_s=1.0, tpot_s=0.1), model=MODEL)
        assert name is not None
        pool.succeed(pool.begin(name, 0, 4))
        chosen.append(name)
    assert chosen == [b, a, b, a, b, a]


def test_a_failed_health_poll_does_not_renew_a_failed_requests_penalty():
    # The penalty fades from the last failed request; a /health poll that failed once (not
    # enough to mark the replica unhealthy) renewed it, so an occasional slow /health kept it.
    pool, clock = make_pool()
    a = "127.0.0.1:8100"
    pool._replicas[a].healthy = True
    pool.fail(pool.begin(a, 1, 4), "HTTP 500")
    for _ in range(4):
        clock.now += MODEL.failure_memory_s / 4
        pool._poll_failed(pool._replicas[a], TimeoutError("read timeout"))
        pool._poll_succeeded(pool._replicas[a])
    v = view(pool, a)
    assert v.healthy and v.consecutive_failures == 1
    assert failure_penalty_s(v, MODEL) == 0.0
    # The gateway's /health still says what failed last, and when.
    (snap,) = [s for s in pool.snapshot() if s["name"] == a]
    assert str(snap["last_error"]).startswith("/health") and snap["last_error_age_s"] == 0.0


def test_views_carry_each_request_left_and_the_count_the_last_poll_saw():
    pool, clock = make_pool()
    a = "127.0.0.1:8100"
    pool._replicas[a].healthy = True
    first = pool.begin(a, 1, 8)
    clock.now += 0.1
    second = pool.begin(a, 1, 4)
    pool._apply_health(pool._replicas[a], {"queue_depth": 0, "running": 2})
    pool.on_token(first)
    pool.succeed(second)
    v = view(pool, a)
    assert v.remaining_tokens == (7,) and v.in_flight == 1 and v.in_flight_at_poll == 2
    assert load_of(v) == 1  # the poll's two were the gateway's own; one has ended


def test_a_training_share_that_is_not_a_share_is_not_believed():
    pool, _ = make_pool()
    a, b = "127.0.0.1:8100", "127.0.0.1:8101"
    for name in (a, b):
        pool._replicas[name].healthy = True
    for share, taken in ((math.nan, 0.0), (math.inf, 0.0), (7.0, 1.0), (-1.0, 0.0), (0.4, 0.4)):
        pool._apply_health(pool._replicas[a], {"training": True, "training_share": share})
        assert view(pool, a).training_share == taken
    # Ranked against a sound replica (a NaN share broke the ranking: every request a 500).
    pool._apply_health(pool._replicas[a], {"training": True, "training_share": math.nan})
    assert choose_replica(pool.views(), 16, 8, SLO(2.0, 0.2)) in (a, b)


def test_a_request_that_ends_while_a_health_poll_is_on_its_way_is_not_another_clients():
    # The replica's report counts a request the gateway sees end before the report arrives:
    # taken for another client's, it would be counted until the next poll.
    pool, _ = make_pool()
    a = "127.0.0.1:8100"
    pool._replicas[a].healthy = True
    ticket = pool.begin(a, 1, 8)

    class Health:
        async def get(self, url: str) -> httpx.Response:
            pool.succeed(ticket)  # the stream ends while the report is on its way
            body = {"queue_depth": 0, "running": 1}
            return httpx.Response(200, json=body, request=httpx.Request("GET", url))

    pool._health = Health()  # type: ignore[assignment]
    asyncio.run(pool._poll(pool._replicas[a]))
    assert view(pool, a).running == 1 and load_of(view(pool, a)) == 0


def test_a_latency_not_refreshed_for_a_while_is_forgotten_and_relearned_from_scratch():
    pool, clock = make_pool()
    a = "127.0.0.1:8100"

    def stream(ttft: float) -> None:
        t = pool.begin(a, 0, 10)
        clock.now += ttft
        pool.on_token(t)
        clock.now += 0.05
        pool.on_token(t)
        pool.succeed(t)

    stream(2.0)  # one bad burst made the replica look slow ...
    assert view(pool, a).ewma_ttft_s == pytest.approx(2.0)
    clock.now += ESTIMATE_TTL_S + 1
    # ... but unrouted since, its estimate expires: the routing policy then assumes its peers'.
    assert view(pool, a).ewma_ttft_s is None and view(pool, a).ewma_tpot_s is None
    stream(0.2)  # the next sample starts a fresh estimate instead of averaging with the stale
    assert view(pool, a).ewma_ttft_s == pytest.approx(0.2)


def test_a_replica_that_never_answers_says_why_in_the_gateways_health(monkeypatch):
    import asyncio

    import collm_fl.gateway.pool as pool_module
    from collm_fl.launch import free_port

    warned: list[str] = []
    monkeypatch.setattr(pool_module.log, "warning", lambda msg, *a: warned.append(msg % a))

    async def polled() -> list[dict[str, object]]:
        pool = ReplicaPool([f"http://127.0.0.1:{free_port()}"], poll_interval_s=3600)
        await pool.start()  # polls once
        try:
            for _ in range(3):
                await pool.poll_once()
            return pool.snapshot()
        finally:
            await pool.close()

    (state,) = asyncio.run(polled())
    assert state["healthy"] is False
    assert str(state["last_error"]).startswith("/health: ConnectError")
    assert len(warned) == 1 and "does not answer /health" in warned[0]  # said once


def test_a_replica_hanging_on_health_does_not_delay_noticing_that_another_died(scripted):
    health_timeout_s = 10.0  # a hung replica's poll lasts this long
    hung, dying = scripted(), scripted()

    async def notice_the_death() -> None:
        pool = ReplicaPool(
            [hung.url, dying.url], poll_interval_s=0.05, health_timeout_s=health_timeout_s
        )
        await pool.start()
        try:
            assert view(pool, dying.name).healthy
            hung.health_hangs = True
            dying.stop_listening()
            started = time.monotonic()
            while view(pool, dying.name).healthy:
                assert time.monotonic() - started < health_timeout_s / 2, "death not noticed"
                await asyncio.sleep(0.02)  # polling the pool's state, as wait_for does
        finally:
            await pool.close()

    asyncio.run(notice_the_death())


def test_only_a_refused_connection_reads_as_a_replica_that_closed_its_listener():
    import asyncio

    import httpx

    from collm_fl.gateway.pool import connection_refused
    from collm_fl.launch import free_port

    async def connect(url: str) -> BaseException:
        async with httpx.AsyncClient(timeout=2.0) as client:
            try:
                await client.get(url)
            except httpx.HTTPError as e:
                return e
        raise AssertionError("nothing should answer there")

    refused = asyncio.run(connect(f"http://127.0.0.1:{free_port()}/health"))
    assert isinstance(refused, httpx.ConnectError) and connection_refused(refused)
    unreachable = httpx.ConnectError("All connection attempts failed")
    unreachable.__cause__ = OSError(113, "No route to host")
    assert not connection_refused(unreachable)
    assert not connection_refused(httpx.ReadTimeout("timed out"))


def test_a_replica_with_requests_in_flight_keeps_what_was_learned_past_the_ttl():
    """Under sustained overload every request is queued and teaches nothing; forgetting would
    make the saturated replica look idle to routing and to admission control."""
    pool, clock = make_pool()
    a = "127.0.0.1:8100"
    t = pool.begin(a, 0, 10)
    clock.now += 2.0
    pool.on_token(t)
    clock.now += 0.05
    pool.on_token(t)
    pool.succeed(t)
    queued = [pool.begin(a, 0, 10) for _ in range(2 * MODEL.default_max_batch)]
    clock.now += 10 * ESTIMATE_TTL_S
    assert view(pool, a).ewma_ttft_s == pytest.approx(2.0)
    for q in queued:
        pool.release(q)
    assert view(pool, a).ewma_ttft_s is None  # idle and stale: forgotten


@pytest.mark.parametrize(
    "header, expected",
    [
        ("replica-ttft;dur=120.5, replica-total;dur=900", (0.1205, 0.9)),
        # any order, other metrics; a proxy's own "total" is not the replica's
        ("replica-total;dur=900;desc=x, total;dur=3, replica-ttft;dur=120", (0.12, 0.9)),
        ("replica-ttft;dur=120, replica-total;dur=900, replica-total;dur=5", (0.12, 0.9)),
        ("replica-ttft;dur=120", None),  # no total
        ("ttft;dur=120, total;dur=900", None),  # not the replica's names
        ("replica-ttft;dur=abc, replica-total;dur=900", None),
        ("replica-ttft;dur=950, replica-total;dur=900", None),  # first token after the end
        ("replica-ttft;dur=-1, replica-total;dur=900", None),
        ("replica-ttft;dur=nan, replica-total;dur=900", None),
        ("replica-ttft;dur=1, replica-total;dur=inf", None),
        ("", None),
    ],
)
def test_a_replicas_server_timing_header_is_read_or_ignored(header, expected):
    from collm_fl.gateway.proxy import _replica_timing

    resp = httpx.Response(200, headers={"Server-Timing": header} if header else {})
    got = _replica_timing(resp)
    assert got == (pytest.approx(expected) if expected else None)


def test_streamed_requests_count_as_prefills_ahead_until_their_first_token():
    pool, clock = make_pool()
    a = "127.0.0.1:8100"
    first, second = pool.begin(a, 64, 10), pool.begin(a, 30, 10)
    json_reply = pool.begin(a, 64, 10, stream=False)  # shows no first token: not counted
    assert (view(pool, a).prefills_ahead, view(pool, a).prompt_tokens_ahead) == (2, 94)
    assert (first.prefills_ahead, second.prefills_ahead, json_reply.prefills_ahead) == (0, 1, 2)
    assert (second.prompt_tokens_ahead, json_reply.prompt_tokens_ahead) == (64, 94)
    clock.now += 0.3
    pool.on_token(first)
    assert (view(pool, a).prefills_ahead, view(pool, a).prompt_tokens_ahead) == (1, 30)
    # second waited for first's prefill: it teaches the idle TTFT with that taken out
    clock.now += 0.21  # its first token 0.51 s after it was sent, one prefill (0.7 of 0.3) ahead
    pool.on_token(second)
    assert view(pool, a).prefills_ahead == 0
    pool.succeed(first)
    taught = view(pool, a).ewma_ttft_s
    pool.succeed(second)
    assert view(pool, a).ewma_ttft_s == pytest.approx(taught, rel=0.1)
    pool.release(json_reply)
    assert view(pool, "127.0.0.1:8101").prefills_ahead == 0
