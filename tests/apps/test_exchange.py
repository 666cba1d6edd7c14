"""The ServerApp's send-and-receive: every reply collected, polled sooner than Flower's 3 s."""

from __future__ import annotations

import time
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


class TurnGrid:
    """Node n's reply is ready ``took[n]`` seconds after its message was pushed (None: never)."""

    def __init__(self, took: dict[int, float | None], clock: list[float]) -> None:
        self.took, self.clock = took, clock
        self.pushed_at: dict[int, float] = {}
        self.life: dict[int, tuple[float, float]] = {}  # node -> (created_at, ttl) when pushed
        self.refuse: set[int] = set()

    def push_messages(self, messages):
        ids = []
        for m in messages:
            node = int(m.metadata.dst_node_id)
            if node in self.refuse:
                ids.append("")
                continue
            self.pushed_at[node] = self.clock[0]
            self.life[node] = (m.metadata.created_at, m.metadata.ttl)
            ids.append(f"n{node}")
        return ids

    def pull_messages(self, ids):
        out = []
        for node, at in self.pushed_at.items():
            took = self.took[node]
            if f"n{node}" in ids and took is not None and at + took <= self.clock[0]:
                out.append(
                    SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=f"n{node}"))
                )
        return out


def turns(
    took: dict[int, float | None], due: dict[int, float], timeout: float, refuse=()
) -> tuple[TurnGrid, dict[int, float], list[float]]:
    """Node 1 goes at once; node 2 after node 1, node 3 after node 2 (or at their due times)."""
    from server_app.federation import Later

    clock = [0.0]
    grid = TurnGrid(took, clock)
    grid.refuse = set(refuse)
    prepared: dict[int, float] = {}

    def sleep(s: float) -> None:
        assert s >= 0
        clock[0] += s

    def msg(node: int) -> SimpleNamespace:
        return SimpleNamespace(metadata=SimpleNamespace(ttl=0.0, dst_node_id=node, created_at=0.0))

    later = [
        Later(msg(n), n - 1, due[n], lambda elapsed, n=n: prepared.__setitem__(n, elapsed))
        for n in (2, 3)
    ]
    replies = exchange(grid, [msg(1)], timeout, lambda: clock[0], sleep, later=later)  # type: ignore[arg-type]
    return grid, prepared, [float(r.metadata.reply_to_message_id[1:]) for r in replies]


def test_a_turn_starts_when_the_turn_before_it_replies():
    started = time.time()
    grid, prepared, replied = turns({1: 10.0, 2: 12.0, 3: 5.0}, {2: 30.0, 3: 60.0}, 120.0)
    assert sorted(replied) == [1, 2, 3]
    # Each pushed within one poll interval of the reply before it, long before its due time.
    assert 10.0 <= grid.pushed_at[2] <= 10.0 + POLL_MAX_S
    assert 22.0 <= grid.pushed_at[3] <= 22.0 + 2 * POLL_MAX_S
    assert prepared[2] == grid.pushed_at[2] and prepared[3] == grid.pushed_at[3]
    # Flower counts a message's life from its creation: a held one is created anew when it
    # goes, and lives for what is left of the wait (+ the slack), not the whole round's.
    created, ttl = grid.life[3]
    assert created >= started and ttl == pytest.approx(120.0 - grid.pushed_at[3] + TTL_SLACK_S)


def test_a_turn_whose_predecessor_runs_over_starts_at_its_due_time():
    grid, _, replied = turns({1: 50.0, 2: 5.0, 3: 5.0}, {2: 30.0, 3: 60.0}, 120.0)
    assert grid.pushed_at[2] == pytest.approx(30.0)  # not the 50 s node 1 took
    assert 35.0 <= grid.pushed_at[3] <= 35.0 + POLL_MAX_S
    assert sorted(replied) == [1, 2, 3]


def test_a_turn_after_a_node_that_got_no_message_goes_at_once():
    grid, _, replied = turns({1: 10.0, 2: 5.0, 3: 5.0}, {2: 30.0, 3: 60.0}, 120.0, refuse=[1])
    assert grid.pushed_at[2] == 0.0 and sorted(replied) == [2, 3]


def test_a_turn_not_released_before_the_timeout_is_never_sent():
    grid, prepared, replied = turns({1: None, 2: None, 3: 5.0}, {2: 30.0, 3: 200.0}, 100.0)
    assert grid.pushed_at == {1: 0.0, 2: 30.0} and 3 not in prepared
    assert replied == []


@pytest.mark.usefixtures("flower_task_identity")
def test_the_turns_after_the_first_are_held_and_go_with_what_is_left_of_the_deadline():
    from flwr.app import ConfigRecord, Message, RecordDict

    from collm_fl.flower_records import CONFIG_KEY
    from server_app.federation import held_for_turns
    from strategies.allocation import NodeBudget

    def train(node: int, start: float) -> Message:
        config = ConfigRecord({"deadline-s": 60.0, "start-after-s": start, "local-steps": 4})
        return Message(RecordDict({CONFIG_KEY: config}), dst_node_id=node, message_type="train")

    budgets = {
        1: NodeBudget(1, 4, 1.0, 60.0, "turn 1", start_after_s=0.0, turn=1),
        2: NodeBudget(2, 4, 1.0, 60.0, "turn 2", start_after_s=20.0, turn=2),
        9: NodeBudget(9, 4, 1.0, 60.0, "a device", reports_load=False),
    }
    messages = [train(1, 0.0), train(2, 20.0), train(9, 0.0)]
    now, held = held_for_turns(messages, budgets)
    assert [int(m.metadata.dst_node_id) for m in now] == [1, 9]
    assert [(h.after, h.due_s) for h in held] == [(1, 20.0)]
    assert held[0].prepare is not None
    held[0].prepare(12.5)  # node 1 replied 12.5 s into the round
    config = held[0].message.content.config_records[CONFIG_KEY]
    assert (config["start-after-s"], config["deadline-s"], config["local-steps"]) == (0.0, 47.5, 4)
    held[0].prepare(75.0)  # (released past the deadline: it may train no step)
    assert 0 < config["deadline-s"] < 0.01
    # A strategy that sampled node 2 out of turns 1-2-3: turn 3 follows turn 1.
    budgets[3] = NodeBudget(3, 4, 1.0, 60.0, "turn 3", start_after_s=40.0, turn=3)
    now, held = held_for_turns([train(1, 0.0), train(3, 40.0)], budgets)
    assert [int(m.metadata.dst_node_id) for m in now] == [1]
    assert [(h.after, h.due_s) for h in held] == [(1, 40.0)]
    # Turn 1 left out: turn 2 is the first asked, and goes now without waiting for its planned
    # start (nothing runs before it); turn 3 follows it.
    now, held = held_for_turns([train(2, 20.0), train(3, 40.0)], budgets)
    assert [int(m.metadata.dst_node_id) for m in now] == [2]
    assert now[0].content.config_records[CONFIG_KEY]["start-after-s"] == 0.0
    assert [(h.after, h.due_s) for h in held] == [(2, 40.0)]
    # Without turns every message goes at once, untouched.
    plain = {n: NodeBudget(n, 4, 0.5, 60.0, "busy") for n in (1, 2)}
    assert held_for_turns(messages, plain) == (messages, [])
