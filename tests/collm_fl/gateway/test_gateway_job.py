"""What the gateway expects of a request before it routes it (its queueing model's inputs)."""

from collm_fl.api.schemas import ChatCompletionRequest, CompletionRequest
from collm_fl.gateway.proxy import Job


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
