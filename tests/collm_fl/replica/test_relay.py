"""The ClientApp's relay to a co-executing replica (no replica: a fake control client)."""

from __future__ import annotations

import pytest

from collm_fl.config import RunConfig, TrainBudget
from collm_fl.replica import relay


class FakeClient:
    """Records the training job's deadline; the push takes ``push_s`` on the fake clock."""

    def __init__(self, clock: list[float], push_s: float) -> None:
        self.clock, self.push_s = clock, push_s
        self.deadline_s: float | None = None
        self.start_after_s: float | None = None

    def push_version(self, *args: object) -> dict[str, object]:
        self.clock[0] += self.push_s
        return {}

    def train(self, rnd: int, steps: int, lr: float, deadline_s: float, **kw: object):
        self.deadline_s = deadline_s
        self.start_after_s = kw.get("start_after_s")
        return {}, {"local-steps": 0.0}

    def load_report(self, reset: bool) -> dict[str, float]:
        return {"request-rate": 0.0}


@pytest.mark.parametrize(
    ("push_s", "left", "start"), [(12.0, 48.0, 8.0), (75.0, relay.MIN_DEADLINE_S, 0.0)]
)
def test_the_round_deadline_counts_the_push_before_the_training_job(
    monkeypatch, push_s, left, start
):
    # The server's deadline is for the whole reply: a slow push (a large adapter, a busy
    # replica) comes out of the training job's time, not on top of it.
    clock = [100.0]
    monkeypatch.setattr(relay, "monotonic", lambda: clock[0])
    client = FakeClient(clock, push_s)
    cfg = RunConfig(model="tiny")
    budget = TrainBudget(local_steps=3, learning_rate=1e-3, batch_size=2)
    relay.train_on_replica(
        cfg,
        client,
        {},
        1,
        budget,
        1,
        deadline_s=60.0,
        training_share=None,  # type: ignore[arg-type]
        start_after_s=20.0,
    )
    assert client.deadline_s == pytest.approx(left)
    assert client.start_after_s == pytest.approx(start)  # so does the start of its turn
