"""The replica's admission order (collm_fl.policies.scheduling.admission_order)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from collm_fl.policies.scheduling import (
    DEFAULT_MARGIN,
    FIT_DECAY,
    PrefillCost,
    PrefillFit,
    Running,
    Waiting,
    admission_order,
    is_late,
    only_late,
)

SLO = 1.0  # TTFT SLO, seconds
P = PrefillCost(0.0, 0.002)  # prefill seconds: 2 ms per token, a 100-token prompt in 0.2 s
LIMIT = 30.0


def order(waiting: list[Waiting], free: int = 8, p: PrefillCost = P) -> list[int]:
    return admission_order(waiting, free, p, SLO, LIMIT)


def test_a_fresh_request_goes_before_one_that_already_missed_its_ttft() -> None:
    waiting = [Waiting(age_s=3.0, prompt_tokens=100), Waiting(age_s=0.1, prompt_tokens=100)]
    assert order(waiting) == [1]  # the late one waits while someone who can make it waits


def test_late_requests_take_spare_rows_when_nobody_who_can_make_it_waits() -> None:
    waiting = [Waiting(3.0, 100), Waiting(2.0, 100), Waiting(1.5, 100)]
    assert order(waiting, free=2) == [0, 1]  # oldest first, as many as the rows allow


def test_a_burst_is_prefilled_only_as_far_as_the_oldest_member_still_makes_it() -> None:
    # Eight fresh 100-token requests: one batch of all eight would take 1.6 s and every one of
    # them would miss a 1-s SLO; the budget (0.9 s) admits four (0.8 s), the rest wait a step.
    burst = [Waiting(0.0, 100) for _ in range(8)]
    picked = order(burst)
    assert len(picked) == 4
    assert P.batch_s(4, 100) <= DEFAULT_MARGIN * SLO < P.batch_s(5, 100)


def test_a_fixed_part_per_forward_lets_more_of_a_burst_share_one_prefill() -> None:
    # 1 s SLO, 0.9 s budget. Per forward 0.1 s, per token 1.5 ms: one 100-token prompt alone is
    # 0.25 s, the same as 2.5 ms a token through the origin; that rate fits three in the budget
    # (0.75 s), the affine cost five (0.1 + 5 · 0.15 = 0.85 s), which is what they take.
    burst = [Waiting(0.0, 100) for _ in range(8)]
    affine = PrefillCost(0.1, 0.0015)
    assert affine.batch_s(1, 100) == pytest.approx(PrefillCost(0.0, 0.0025).batch_s(1, 100))
    assert len(order(burst, p=PrefillCost(0.0, 0.0025))) == 3
    assert len(order(burst, p=affine)) == 5


def test_a_batch_is_costed_padded_to_its_longest_prompt() -> None:
    # Two 100-token prompts and a 300-token one cost 3 · 300 tokens together (1.8 s), not 500.
    waiting = [Waiting(0.0, 300), Waiting(0.0, 100), Waiting(0.0, 100)]
    assert order(waiting) == [0]  # 0.6 s; with either short one 2 · 300 tokens = 1.2 s > 0.9 s
    assert order(waiting[1:]) == [0, 1]


def test_the_oldest_deadline_binds_the_batch() -> None:
    # The oldest has 0.9 − 0.5 = 0.4 s of budget left: room for its own prompt and one more
    # (two rows padded to 100 tokens, 0.4 s), not for a third (0.6 s).
    waiting = [Waiting(0.5, 100), Waiting(0.0, 50), Waiting(0.0, 100)]
    assert order(waiting) == [0, 1]


def test_a_shorter_prompt_further_back_still_fits_the_budget() -> None:
    waiting = [Waiting(0.45, 100), Waiting(0.4, 150), Waiting(0.3, 40)]
    # 0.45 s waited + 2 rows · 100 tokens · 2 ms = 0.85 ≤ 0.9; with the 150-token one the batch
    # pads to 2 · 150 tokens (0.6 s), which would not fit.
    assert order(waiting) == [0, 2]


def test_a_request_waiting_past_the_defer_limit_goes_first_whatever_its_cost() -> None:
    waiting = [Waiting(LIMIT + 1, 100), Waiting(LIMIT - 1, 100), Waiting(0.0, 100)]
    assert order(waiting) == [0, 2]  # the overdue one, then the fresh one; the late one waits


def test_nothing_timed_yet_means_first_come_first_served() -> None:
    waiting = [Waiting(5.0, 100), Waiting(0.1, 100), Waiting(0.0, 100)]
    assert order(waiting, free=2, p=PrefillCost()) == [0, 1]
    assert order(waiting, free=0) == []
    assert order([], free=4) == []


waitings = st.lists(
    st.builds(
        Waiting,
        age_s=st.floats(0.0, 2 * LIMIT, allow_nan=False),
        prompt_tokens=st.integers(1, 600),
    ),
    max_size=20,
)


costs = st.builds(
    PrefillCost,
    st.floats(0.0, 0.5, allow_nan=False),
    st.floats(0.0, 0.01, allow_nan=False),
    st.floats(0.0, 0.01, allow_nan=False),  # the floor too
)


@given(waitings, st.integers(0, 10), costs)
def test_admission_properties(waiting: list[Waiting], free: int, p: PrefillCost) -> None:
    picked = admission_order(waiting, free, p, SLO, LIMIT)
    assert len(picked) == len(set(picked)) <= free
    assert all(0 <= i < len(waiting) for i in picked)
    if free > 0 and waiting:
        assert picked, "someone is always admitted when a row is free"
    overdue = [i for i, w in enumerate(waiting) if w.age_s >= LIMIT]
    if p.known:
        # Overdue requests come first (all of them when rows allow).
        if len(overdue) <= free:
            assert set(picked[: len(overdue)]) == set(overdue)
        else:
            assert set(picked) <= set(overdue)
        # Every admitted request that could meet its SLO still does after the batch's prefill.
        cost = p.batch_s(len(picked), max((waiting[i].prompt_tokens for i in picked), default=0))
        feasible = [
            i
            for i in picked
            if i not in overdue
            and waiting[i].age_s + p.batch_s(1, waiting[i].prompt_tokens) <= DEFAULT_MARGIN * SLO
        ]
        for i in feasible:
            assert waiting[i].age_s + cost <= DEFAULT_MARGIN * SLO + 1e-9


def late_only(waiting: list[Waiting], running: list[Running]) -> bool:
    return only_late(waiting, running, SLO, LIMIT)


def test_a_request_is_late_once_its_wait_and_prefill_exceed_the_budget() -> None:
    # 100 tokens prefill in 0.2 s; the budget is 0.9 × 1 s.
    assert not is_late(Waiting(0.7, 100), P, SLO)
    assert is_late(Waiting(0.7, 100), PrefillCost(0.01, 0.002), SLO)  # + 10 ms per forward
    assert is_late(Waiting(0.71, 100), P, SLO)
    assert is_late(Waiting(0.0, 500), P, SLO)  # a long prompt cannot make it even now


def test_serving_earns_no_goodput_only_when_every_request_is_late_and_none_overdue() -> None:
    late_wait, late_run = Waiting(2.0, 100), Running(age_s=5.0, ttft_s=3.0)
    assert late_only([late_wait], [late_run])
    assert late_only([], [late_run]) and late_only([late_wait], [])
    assert not late_only([], [])  # idle is not "late work" (training has the replica anyway)
    # One request that can still meet its TTFT SLO, waiting or running on time: not late.
    assert not late_only([late_wait, Waiting(0.1, 100)], [late_run])
    assert not late_only([late_wait], [late_run, Running(age_s=5.0, ttft_s=0.4)])
    # Overdue (waited the defer limit): never put off, waiting or running.
    assert not late_only([Waiting(LIMIT, 100)], [])
    assert not late_only([], [Running(age_s=LIMIT, ttft_s=3.0)])


def test_a_waiting_request_ends_a_rest_until_it_has_waited_its_budget_whatever_its_prefill():
    # Predicted by its prefill to miss (is_late), but it has not waited: resting now would hold
    # it back until the prediction came true, so serving does not rest for it.
    fresh_long = Waiting(0.0, 500)
    assert is_late(fresh_long, P, SLO)
    late_run = Running(age_s=5.0, ttft_s=3.0)
    assert not late_only([fresh_long], [late_run])
    assert not late_only([Waiting(0.9, 500)], [late_run])  # the budget: 0.9 × 1 s
    assert late_only([Waiting(0.91, 500)], [late_run])


def test_a_request_at_the_edge_of_its_budget_is_still_admitted():
    # age + prefill rounds to exactly the budget (0.9 s): not late, so it must be admitted (the
    # budget left, 0.9 - 0.9 = 0.0, is below its prefill: the check in that form refused it).
    w = Waiting(age_s=0.9, prompt_tokens=1)
    assert admission_order([w], 1, PrefillCost(0.0, 1.2e-112), SLO, LIMIT) == [0]
    # With a fixed part: 0.7 + (0.02 + 10 · 0.018…) is exactly 0.9 in floating point, while the
    # prefill alone (0.2000000000000001) is above 0.9 − 0.7 (0.20000000000000007).
    w, cost = Waiting(age_s=0.7, prompt_tokens=10), PrefillCost(0.02, 0.01800000000000001)
    assert w.age_s + cost.batch_s(1, 10) == 0.9 and cost.batch_s(1, 10) > 0.9 - w.age_s
    assert admission_order([w], 1, cost, SLO, LIMIT) == [0]


# ---- the fit of the prefill cost ---------------------------------------------------------------


def fit(samples: list[tuple[int, float]]) -> PrefillCost:
    f = PrefillFit()
    for tokens, seconds in samples:
        f = f.add(tokens, seconds)
    return f.cost()


def test_the_fit_recovers_a_fixed_part_and_a_part_per_token() -> None:
    true = PrefillCost(0.04, 0.002)
    sizes = [64, 128, 64, 448, 192, 64, 768, 128]  # single prompts and batches, padded tokens
    got = fit([(x, true.batch_s(1, x)) for x in sizes])
    assert got.fixed_s == pytest.approx(0.04) and got.per_token_s == pytest.approx(0.002)


def test_sizes_all_alike_give_a_cost_per_token_through_the_origin() -> None:
    got = fit([(64, 0.17)] * 5)  # nothing tells the fixed part from the part per token
    assert got.fixed_s == 0.0 and got.per_token_s == pytest.approx(0.17 / 64)
    assert got.floor_s_per_token == pytest.approx(0.17 / 64)
    assert fit([]) == PrefillCost() and not fit([]).known


def test_a_fit_that_would_go_negative_falls_back_to_the_cost_per_token() -> None:
    # Longer prefills timed faster (noise, a training step beside the short ones): the line
    # would have a negative slope; the cost per token through the origin is used instead.
    got = fit([(64, 0.4), (512, 0.3)])
    older = FIT_DECAY  # the first prefill's weight once the second is in
    assert got.fixed_s == 0.0
    assert got.per_token_s == pytest.approx((older * 0.4 + 0.3) / (older * 64 + 512))
    got = fit([(64, 0.01), (512, 1.9)])  # a negative fixed part
    assert got.fixed_s == 0.0 and got.per_token_s > 0


def test_a_batch_larger_than_any_timed_costs_at_least_the_largest_ones_rate_per_token() -> None:
    # Prompts of 32, 64 and 128 tokens timed one at a time on one core (prefill_fit.txt): their
    # line (81 ms + 1.67 ms a token) puts a batch of 8 × 64 tokens at 0.94 s, where it took
    # 1.18 s. The 128-token prompt's 2.30 ms a token is the floor: 1.18 s.
    got = fit([(32, 0.1329), (64, 0.1912), (128, 0.2939)])
    assert got.fixed_s == pytest.approx(0.0815, abs=0.002)
    assert got.fixed_s + got.per_token_s * 512 == pytest.approx(0.935, abs=0.005)
    assert got.batch_s(8, 64) == pytest.approx(512 * 0.2939 / 128)
    assert got.batch_s(1, 64) == pytest.approx(got.fixed_s + 64 * got.per_token_s)  # the line


def test_the_largest_prefill_gives_way_to_newer_ones_as_it_ages() -> None:
    f = PrefillFit().add(1024, 2.0)  # one large batch, then single prompts of 128 tokens
    for k in range(1, 12):
        f = f.add(128, 0.4)
        expected = (1024, 2.0 / 1024) if FIT_DECAY**k * 1024 > 128 else (128, 0.4 / 128)
        assert f.largest_rate == pytest.approx(expected[1]), k
    assert f.cost().floor_s_per_token == pytest.approx(0.4 / 128)


def test_recent_prefills_outweigh_old_ones() -> None:
    slow = [(x, PrefillCost(0.1, 0.004).batch_s(1, x)) for x in (64, 256) * 4]
    fast = [(x, PrefillCost(0.04, 0.002).batch_s(1, x)) for x in (64, 256) * 20]
    got = fit(slow + fast)
    assert got.fixed_s == pytest.approx(0.04, rel=0.01)
    assert got.per_token_s == pytest.approx(0.002, rel=0.01)
