"""What a replica answers when generation fails, a chat template refuses, or a request leaves a
parameter to its default: a real replica server (uvicorn, in a thread) on the tiny model, with a
hook in the model's forward that fails the forwards a test asks it to."""

from __future__ import annotations

import json

import httpx
import pytest

from collm_fl.api.schemas import DEFAULT_MAX_TOKENS_COMPLETIONS
from collm_fl.replica.runtime import Replica, ReplicaConfig
from tests.collm_fl.replica.in_thread import served

# A Gemma-style template: no system turn.
NO_SYSTEM_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}<assistant>"
)


class Failer:
    """Raises in the model's forward number ``fail_at`` (counted from ``arm()``)."""

    def __init__(self) -> None:
        self.fail_at: int | None = None
        self.calls = 0

    def arm(self, fail_at: int) -> None:
        self.calls, self.fail_at = 0, fail_at

    def __call__(self, _module: object, _args: object) -> None:
        self.calls += 1
        if self.fail_at is not None and self.calls == self.fail_at:
            raise RuntimeError("injected forward failure")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    cfg = ReplicaConfig(model="tiny", data=None, store_dir=str(tmp_path_factory.mktemp("store")))
    replica = Replica(cfg)
    failer = Failer()
    replica.model.register_forward_pre_hook(failer)
    with served(replica) as url:
        yield replica, failer, url


@pytest.fixture()
def failer(server):
    yield server[1]
    server[1].fail_at = None


def _events(r: httpx.Response) -> list[str]:
    return [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_a_stream_that_fails_before_its_first_token_is_a_500_not_a_200(server, failer, path):
    _, _, url = server
    body = {"model": "tiny", "max_tokens": 4, "stream": True}
    body |= (
        {"prompt": "hi"}
        if "chat" not in path
        else {"messages": [{"role": "user", "content": "hi"}]}
    )
    failer.arm(1)  # the prefill
    r = httpx.post(url + path, json=body, timeout=60)
    assert r.status_code == 500, r.text
    assert r.json()["error"]["code"] == "generation_error"


def test_a_stream_that_fails_midway_ends_with_an_openai_error_object(server, failer):
    _, _, url = server
    body = {"model": "tiny", "prompt": "hi", "max_tokens": 8, "temperature": 0, "stream": True}
    failer.arm(3)  # the prefill and one decode step go through
    r = httpx.post(url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200
    events = _events(r)
    assert events[-1] == "[DONE]"
    last = json.loads(events[-2])
    assert last["choices"][0]["finish_reason"] == "error"
    assert last["error"]["code"] == "generation_error" and last["error"]["type"] == "server_error"


def test_a_message_the_chat_template_refuses_is_a_400_naming_messages(server):
    replica, _, url = server
    original = replica.tokenizer.chat_template
    replica.tokenizer.chat_template = NO_SYSTEM_TEMPLATE
    try:
        system = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
        body = {"model": "tiny", "messages": system, "max_tokens": 2}
        r = httpx.post(url + "/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == "messages" and "System role not supported" in err["message"]
        body["messages"] = system[1:]
        assert httpx.post(url + "/v1/chat/completions", json=body, timeout=60).status_code == 200
    finally:
        replica.tokenizer.chat_template = original


def test_a_temperature_too_small_for_float32_samples_greedily(server):
    _, _, url = server
    body = {"model": "tiny", "prompt": "ROMEO:", "max_tokens": 6, "seed": 1}

    def text(temperature: float) -> str:
        r = httpx.post(url + "/v1/completions", json={**body, "temperature": temperature})
        assert r.status_code == 200, r.text
        return str(r.json()["choices"][0]["text"])

    assert text(1e-300) == text(1e-40) == text(0.0)


def test_without_max_tokens_a_chat_whose_prompt_fits_is_answered_in_the_room_left(server):
    """The chat default (256 tokens) would not fit beside this prompt: before, a 400 the client
    never asked for; now the answer takes the room the context has left."""
    from collm_fl.data.files import chat_prompt

    replica, _, url = server
    limit = replica.engine.max_model_len

    def tokens(words: int) -> int:
        prompt = chat_prompt([("user", "word " * words)], replica.tokenizer)
        return len(replica.tokenizer(prompt, add_special_tokens=False).input_ids)

    words = limit
    while tokens(words) > limit - 8:
        words -= 1
    assert tokens(words) > limit - 256  # the default would not fit
    body = {"model": "tiny", "messages": [{"role": "user", "content": "word " * words}]}
    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] <= limit - tokens(words)
    # A completions request that says null gets the endpoint's default, as OpenAI's does.
    body = {"model": "tiny", "prompt": "hi", "max_tokens": None, "temperature": 0}
    r = httpx.post(url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] <= DEFAULT_MAX_TOKENS_COMPLETIONS
    # ... and one that leaves it out, with a prompt 8 tokens short of the context: the room left
    # (before, the schema's own default of 16 made it a 400 for a length never asked for).
    words = limit
    while len(replica.tokenizer("word " * words, add_special_tokens=True).input_ids) > limit - 8:
        words -= 1
    body = {"model": "tiny", "prompt": "word " * words, "temperature": 0}
    r = httpx.post(url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] <= 8
