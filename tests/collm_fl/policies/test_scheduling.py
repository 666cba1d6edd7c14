"""The replica's admission order (collm_fl.policies.scheduling.admission_order)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from collm_fl.policies.scheduling import (
    DEFAULT_MARGIN,
    Running,
    Waiting,
    admission_order,
    is_late,
    only_late,
)

SLO = 1.0  # TTFT SLO, seconds
P = 0.002  # prefill seconds per prompt token: a 100-token prompt takes 0.2 s
LIMIT = 30.0


def order(waiting: list[Waiting], free: int = 8, p: float = P) -> list[int]:
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
    assert 4 * 100 * P <= DEFAULT_MARGIN * SLO < 5 * 100 * P


def test_the_oldest_deadline_binds_the_batch() -> None:
    # The oldest has 0.9 − 0.6 = 0.3 s of budget left: room for its own prompt and one more.
    waiting = [Waiting(0.6, 100), Waiting(0.0, 50), Waiting(0.0, 100)]
    assert order(waiting) == [0, 1]


def test_a_shorter_prompt_further_back_still_fits_the_budget() -> None:
    waiting = [Waiting(0.5, 100), Waiting(0.4, 150), Waiting(0.3, 40)]
    # 0.5 s waited + (100 + 40) tokens · 2 ms = 0.78 ≤ 0.9; adding the 150-token one would not fit.
    assert order(waiting) == [0, 2]


def test_a_request_waiting_past_the_defer_limit_goes_first_whatever_its_cost() -> None:
    waiting = [Waiting(LIMIT + 1, 100), Waiting(LIMIT - 1, 100), Waiting(0.0, 100)]
    assert order(waiting) == [0, 2]  # the overdue one, then the fresh one; the late one waits


def test_nothing_timed_yet_means_first_come_first_served() -> None:
    waiting = [Waiting(5.0, 100), Waiting(0.1, 100), Waiting(0.0, 100)]
    assert order(waiting, free=2, p=0.0) == [0, 1]
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


@given(waitings, st.integers(0, 10), st.floats(0.0, 0.01, allow_nan=False))
def test_admission_properties(waiting: list[Waiting], free: int, p: float) -> None:
    picked = admission_order(waiting, free, p, SLO, LIMIT)
    assert len(picked) == len(set(picked)) <= free
    assert all(0 <= i < len(waiting) for i in picked)
    if free > 0 and waiting:
        assert picked, "someone is always admitted when a row is free"
    overdue = [i for i, w in enumerate(waiting) if w.age_s >= LIMIT]
    if p > 0:
        # Overdue requests come first (all of them when rows allow).
        if len(overdue) <= free:
            assert set(picked[: len(overdue)]) == set(overdue)
        else:
            assert set(picked) <= set(overdue)
        # Every admitted request that could meet its SLO still does after the batch's prefill.
        cost = sum(waiting[i].prompt_tokens for i in picked) * p
        feasible = [
            i
            for i in picked
            if i not in overdue
            and waiting[i].age_s + waiting[i].prompt_tokens * p <= DEFAULT_MARGIN * SLO
        ]
        for i in feasible:
            assert waiting[i].age_s + cost <= DEFAULT_MARGIN * SLO + 1e-9


def late_only(waiting: list[Waiting], running: list[Running]) -> bool:
    return only_late(waiting, running, SLO, LIMIT)


def test_a_request_is_late_once_its_wait_and_prefill_exceed_the_budget() -> None:
    # 100 tokens prefill in 0.2 s; the budget is 0.9 × 1 s.
    assert not is_late(Waiting(0.7, 100), P, SLO)
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
    assert admission_order([w], 1, 1.2e-112, SLO, LIMIT) == [0]
