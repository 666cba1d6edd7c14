"""The ServerApp's send-and-receive: every reply collected, polled sooner than Flower's 3 s."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from server_app.federation import POLL_FIRST_S, POLL_MAX_S, TTL_SLACK_S, exchange


class FakeGrid:
    """Replies to message i become available at ``ready[i]`` seconds (None: never)."""

    def __init__(self, ready: list[float | None], clock: list[float]) -> None:
        self.ready, self.clock, self.pulls = ready, clock, 0

    def push_messages(self, messages):
        assert len(messages) == len(self.ready)
        return [f"m{i}" for i in range(len(messages))]

    def pull_messages(self, ids):
        self.pulls += 1
        now = self.clock[0]
        return [
            SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=f"m{i}"), i=i)
            for i, t in enumerate(self.ready)
            if f"m{i}" in ids and t is not None and t <= now
        ]


def run(ready: list[float | None], timeout: float) -> tuple[list[int], list[float], FakeGrid]:
    clock = [0.0]
    slept: list[float] = []
    grid = FakeGrid(ready, clock)

    def sleep(s: float) -> None:
        slept.append(s)
        clock[0] += s

    messages = [
        SimpleNamespace(metadata=SimpleNamespace(ttl=43200.0, dst_node_id=10 + i))
        for i in range(len(ready))
    ]
    replies = exchange(grid, messages, timeout, lambda: clock[0], sleep)  # type: ignore[arg-type]
    assert all(m.metadata.ttl == timeout + TTL_SLACK_S for m in messages)
    return sorted(r.i for r in replies), slept, grid


def test_every_reply_is_collected_once_and_soon_after_it_is_ready():
    got, slept, _ = run([0.2, 2.0, 0.0], timeout=60)
    assert got == [0, 1, 2]
    assert sum(slept) < 2.0 + POLL_MAX_S  # taken within one poll interval of the last one
    assert slept[0] == POLL_FIRST_S and max(slept) <= POLL_MAX_S


def test_a_node_that_never_replies_ends_the_wait_at_the_timeout():
    got, slept, _ = run([0.1, None], timeout=5.0)
    assert got == [0]
    assert sum(slept) == pytest.approx(5.0)  # the last sleep is cut to the deadline


def test_nothing_to_send_asks_nothing():
    got, slept, grid = run([], timeout=5.0)
    assert got == [] and slept == [] and grid.pulls == 0


def test_a_message_the_superlink_refused_ends_no_wait_and_is_named():
    class RefusingGrid(FakeGrid):
        def push_messages(self, messages):
            return ["m0", ""]  # Flower's id for a message it did not store

    clock = [0.0]
    grid = RefusingGrid([0.1, None], clock)

    def sleep(s: float) -> None:
        clock[0] += s

    nodes = [SimpleNamespace(metadata=SimpleNamespace(dst_node_id=n, ttl=0.0)) for n in (11, 12)]
    undelivered: list[int] = []
    replies = exchange(grid, nodes, 3600.0, lambda: clock[0], sleep, undelivered)  # type: ignore[arg-type]
    assert [r.i for r in replies] == [0]
    assert clock[0] < 1.0  # not the round timeout: node 12's message went nowhere
    assert undelivered == [12]


def test_a_batch_refused_whole_names_every_node_undelivered_and_maps_the_rest():
    class NothingTaken(FakeGrid):
        def push_messages(self, messages):
            return []  # Flower's grid on an HTTP 413 for the whole batch

    grid = NothingTaken([None, None], [0.0])
    nodes = [SimpleNamespace(metadata=SimpleNamespace(dst_node_id=n, ttl=0.0)) for n in (11, 12)]
    undelivered: list[int] = []
    assert exchange(grid, nodes, 3600.0, undelivered=undelivered) == []  # type: ignore[arg-type]
    assert undelivered == [11, 12]

    recipients: dict[str, int] = {}
    grid = FakeGrid([0.0, 0.0], [0.0])
    exchange(grid, nodes, 3600.0, lambda: 0.0, lambda s: None, recipients=recipients)  # type: ignore[arg-type]
    assert recipients == {"m0": 11, "m1": 12}


def test_a_grid_that_leaves_out_what_it_refused_is_waited_for_only_on_what_it_took():
    class ShortGrid(FakeGrid):
        def push_messages(self, messages):
            return ["m0"]  # two sent, one id back

    clock = [0.0]
    grid = ShortGrid([0.1, None], clock)

    def sleep(s: float) -> None:
        clock[0] += s

    nodes = [SimpleNamespace(metadata=SimpleNamespace(dst_node_id=n, ttl=0.0)) for n in (11, 12)]
    replies = exchange(grid, nodes, 3600.0, lambda: clock[0], sleep, [])  # type: ignore[arg-type]
    assert [r.i for r in replies] == [0] and clock[0] < 1.0


@pytest.mark.usefixtures("flower_task_identity")
def test_a_flower_message_expires_soon_after_the_wait_for_its_reply_ends():
    """Not Flower's 12 hours: a node back from a long outage is not handed a dead round."""
    from flwr.app import Message, RecordDict

    msg = Message(RecordDict(), dst_node_id=7, message_type="train")
    assert msg.metadata.ttl > 40000  # Flower's default

    class Grid(FakeGrid):
        def push_messages(self, messages):
            self.ttls = [m.metadata.ttl for m in messages]
            return ["m0"]

    clock = [0.0]
    grid = Grid([0.0], clock)
    exchange(grid, [msg], 90.0, lambda: clock[0], lambda s: None)
    assert grid.ttls == [90.0 + TTL_SLACK_S]
