"""What the gateway expects of a request before it routes it (its queueing model's inputs)."""

import asyncio

import pytest

from collm_fl.api.schemas import ChatCompletionRequest, CompletionRequest
from collm_fl.gateway.pool import Ticket
from collm_fl.gateway.proxy import Job, _Abandoned, _unless_abandoned


def test_a_request_without_max_tokens_is_expected_to_be_as_long_as_the_replica_makes_it():
    # openai-python's completions.create leaves max_tokens out: the replica then writes at most
    # 16 tokens (OpenAI's default), not chat's 256; a 16x guess would inflate the predicted
    # queue wait and shed requests that would meet the SLO.
    completion = CompletionRequest(model="m", prompt="hello there")
    assert Job.of(completion, b"{}", 11, chat=False).max_tokens == 16
    chat = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}])
    assert Job.of(chat, b"{}", 2, chat=True).max_tokens == 256
    given = CompletionRequest(model="m", prompt="hello", max_tokens=7)
    assert Job.of(given, b"{}", 5, chat=False).max_tokens == 7


def test_a_replica_given_up_on_as_its_stall_timeout_fires_is_a_failover_not_a_crash():
    # A hung replica makes a stream's stall timeout fire and the health poller give up on it
    # together; the pool's abandon then landed on an expiring timeout, whose reschedule raised
    # RuntimeError instead of failing over.
    ticket = Ticket("r1", 4, 0.0, 0, 8, 0.0, 16)

    async def read() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:  # the stall timeout fired: the pool gives up right now
            ticket.abandon("replica r1 stopped answering /health")
            raise

    async def scenario() -> None:
        with pytest.raises(_Abandoned, match="stopped answering"):
            await _unless_abandoned(ticket, read(), timeout_s=0.01)

    asyncio.run(scenario())
