"""Replica CPU placement: core lists, pinning, and the trainer's lower priority."""

import os
import threading

import pytest

from collm_fl.errors import ConfigError
from collm_fl.replica.affinity import (
    available_cpus,
    lower_thread_priority,
    parse_cpu_list,
    pin_process,
)


@pytest.mark.parametrize(
    ("text", "cpus"),
    [("0", (0,)), ("2,0", (0, 2)), ("0-3", (0, 1, 2, 3)), ("0-1,4", (0, 1, 4)), (" 1 ", (1,))],
)
def test_cpu_lists_parse_to_sorted_core_ids(text, cpus):
    assert parse_cpu_list(text) == cpus


@pytest.mark.parametrize("text", ["", "a", "1-", "3-1", "-1", "0,,1", "1.5"])
def test_malformed_cpu_lists_are_a_config_error(text):
    with pytest.raises(ConfigError, match="--cpus"):
        parse_cpu_list(text)


def test_pinning_to_a_core_that_is_not_available_is_refused_and_changes_nothing():
    before = available_cpus()
    with pytest.raises(ConfigError, match="not available"):
        pin_process((max(before) + 64,))
    assert available_cpus() == before


def test_lowering_a_thread_priority_leaves_the_other_threads_alone():
    mine = os.getpriority(os.PRIO_PROCESS, 0)
    seen: list[int] = []

    def worker() -> None:
        lower_thread_priority(15)
        seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert seen == [max(15, mine)]
    assert os.getpriority(os.PRIO_PROCESS, 0) == mine


def test_a_nice_value_outside_0_to_19_is_refused():
    with pytest.raises(ConfigError, match="nice"):
        lower_thread_priority(25)
