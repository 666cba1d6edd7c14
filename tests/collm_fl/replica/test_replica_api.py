"""The replica's OpenAI-compatible API, against a real `collm replica` process."""

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

API_KEY = "sk-test-key"


@pytest.fixture(scope="module")
def replica(start_module_replica):
    return start_module_replica(api_key=API_KEY)


def client(replica) -> openai.OpenAI:
    return openai.OpenAI(base_url=replica.url + "/v1", api_key=API_KEY, max_retries=0)


def post(replica, path, body, key=API_KEY, **kw):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if isinstance(body, (dict, list)):
        return httpx.post(replica.url + path, json=body, headers=headers, timeout=60, **kw)
    return httpx.post(
        replica.url + path,
        content=body,
        headers={**headers, "Content-Type": "application/json"},
        timeout=60,
        **kw,
    )


def assert_openai_error(r: httpx.Response, status: int, code: str | None = None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if code:
        assert err["code"] == code


def test_openai_client_completion_and_models(replica):
    c = client(replica)
    models = c.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    out = c.completions.create(model="tiny", prompt="ROMEO:", max_tokens=8, temperature=0)
    assert out.choices[0].finish_reason in ("length", "stop")
    assert out.usage.completion_tokens <= 8
    # Every response names the adapter version (base model before any push).
    assert out.model_extra["adapter_version"] is None


def test_openai_client_chat_streaming(replica):
    c = client(replica)
    stream = c.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "Speak, friend."}],
        max_tokens=6,
        temperature=0,
        stream=True,
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks)
    full = c.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "Speak, friend."}],
        max_tokens=6,
        temperature=0,
    )
    assert text == full.choices[0].message.content


def test_openai_client_streaming_usage_content_parts_and_max_completion_tokens(replica):
    c = client(replica)
    parts = [{"type": "text", "text": "Speak,"}, {"type": "text", "text": "friend."}]
    stream = c.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": parts}],
        max_completion_tokens=6,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    *tokens, last = chunks
    assert last.choices == [] and last.usage is not None  # OpenAI's usage chunk, at the end
    generated = "".join(ch.choices[0].delta.content or "" for ch in tokens)
    assert 0 < last.usage.completion_tokens <= 6
    assert last.usage.total_tokens == last.usage.prompt_tokens + last.usage.completion_tokens
    full = c.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "Speak,\nfriend."}],  # the parts, joined
        max_tokens=6,
        temperature=0,
    )
    assert generated == full.choices[0].message.content
    assert full.usage.prompt_tokens == last.usage.prompt_tokens


@pytest.mark.parametrize(
    "extra",
    [
        {"stream_options": {"include_usage": True}},  # without stream
        {"max_tokens": 4, "max_completion_tokens": 5},
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
    ],
)
def test_openai_parameters_it_cannot_honour_are_a_400(replica, extra):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "x"}], **extra}
    assert_openai_error(post(replica, "/v1/chat/completions", body), 400)


def test_seeded_sampling_is_reproducible(replica):
    c = client(replica)
    kw = dict(model="tiny", prompt="JULIET:", max_tokens=10, temperature=1.0, top_p=0.9, seed=7)
    assert c.completions.create(**kw).choices[0].text == c.completions.create(**kw).choices[0].text


def test_stop_sequence_ends_generation_without_the_stop_text(replica):
    c = client(replica)
    ref = c.completions.create(model="tiny", prompt="KING:", max_tokens=20, temperature=0)
    text = ref.choices[0].text
    if len(text) < 4:
        pytest.skip("reference too short to pick a stop string")
    stop = text[2:4]
    out = c.completions.create(
        model="tiny", prompt="KING:", max_tokens=20, temperature=0, stop=[stop]
    )
    assert out.choices[0].finish_reason == "stop"
    assert out.choices[0].text == text[: text.index(stop)]


def test_missing_or_wrong_api_key_is_401(replica):
    assert_openai_error(post(replica, "/v1/models", {}, key=None), 405)  # GET-only route
    r = httpx.get(replica.url + "/v1/models")
    assert_openai_error(r, 401, "invalid_api_key")
    r = httpx.get(replica.url + "/v1/models", headers={"Authorization": "Bearer nope"})
    assert_openai_error(r, 401, "invalid_api_key")


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ("{not json", "invalid_json"),
        (b"\xff\xfe{}", "invalid_json"),
        ({"model": "tiny", "prompt": "x", "max_tokens": -1}, "invalid_parameter"),
        ({"model": "tiny", "prompt": "x", "max_tokens": "many"}, "invalid_parameter"),
        ({"model": "tiny", "prompt": "x", "max_tokens": "3"}, "invalid_parameter"),  # no coercion
        ({"model": "tiny", "prompt": "x", "stream": "yes"}, "invalid_parameter"),
        ({"model": "tiny", "prompt": "x", "ignore_eos": "yes"}, "invalid_parameter"),
        ({"model": "tiny", "prompt": "x", "temperature": "0.5"}, "invalid_parameter"),
        ({"model": "tiny", "prompt": "x", "temperature": 9}, "invalid_parameter"),
        ({"model": "tiny", "prompt": "x", "top_p": 0}, "invalid_parameter"),
        ({"model": "tiny", "prompt": "x", "n": 3}, "invalid_parameter"),
        ({"model": "tiny", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "invalid_parameter"),
        ({"model": "tiny", "prompt": "x", "frequency_penalty": 1}, "unsupported_parameter"),
        ({"model": "tiny", "prompt": "x", "logprobs": 2}, "unsupported_parameter"),
        ({"model": "tiny", "prompt": "x", "best_of": 2}, "unknown_parameter"),
        ({"model": "tiny"}, "invalid_parameter"),
        ({"model": "tiny", "prompt": ""}, "invalid_prompt"),
        ([1, 2, 3], "invalid_parameter"),
    ],
)
def test_bad_requests_get_a_400_with_an_openai_error(replica, body, code):
    assert_openai_error(post(replica, "/v1/completions", body), 400, code)


def test_a_json_body_sent_as_a_form_is_told_the_content_type(replica):
    r = httpx.post(
        replica.url + "/v1/completions",
        content=b'{"model": "tiny", "prompt": "x"}',
        headers={
            "Authorization": f"Bearer {API_KEY}",
            "Content-Type": "application/x-www-form-urlencoded",
        },
        timeout=60,
    )
    assert_openai_error(r, 400, "invalid_json")
    assert "Content-Type: application/json" in r.json()["error"]["message"]


def test_what_openai_clients_send_at_its_neutral_value_is_taken(replica):
    """LangChain and others send penalties of 0, logprobs false, nulls for defaults, the
    "developer" role and negative seeds: all valid OpenAI requests this server can answer."""
    neutral = {
        "presence_penalty": 0,
        "frequency_penalty": 0.0,
        "logit_bias": {},
        "logprobs": False,
        "temperature": None,
        "top_p": None,
        "n": None,
        "stream": None,
        "seed": -7,
        "max_tokens": 2,
    }
    r = post(replica, "/v1/completions", {"model": "tiny", "prompt": "x", "echo": False, **neutral})
    assert r.status_code == 200, r.text
    # vLLM's ignore_eos (load tests replaying output lengths) is taken too
    r = post(replica, "/v1/completions", {"model": "tiny", "prompt": "x", "ignore_eos": True})
    assert r.status_code == 200, r.text
    messages = [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    r = post(replica, "/v1/chat/completions", {"model": "tiny", "messages": messages, **neutral})
    assert r.status_code == 200, r.text
    body = {"model": "tiny", "messages": messages, "top_logprobs": 3}
    r = post(replica, "/v1/chat/completions", body)
    assert_openai_error(r, 400, "unsupported_parameter")
    assert r.json()["error"]["param"] == "top_logprobs"


def test_unknown_model_is_404(replica):
    r = post(
        replica,
        "/v1/chat/completions",
        {"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]},
    )
    assert_openai_error(r, 404, "model_not_found")
    assert r.json()["error"]["type"] == "invalid_request_error"  # as OpenAI answers it


def test_prompt_over_the_context_is_400(replica):
    r = post(
        replica, "/v1/completions", {"model": "tiny", "prompt": "word " * 2000, "max_tokens": 4}
    )
    assert_openai_error(r, 400, "context_length_exceeded")


def test_huge_max_tokens_is_refused_not_run(replica):
    r = post(replica, "/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 999_999})
    assert_openai_error(r, 400, "context_length_exceeded")


def test_oversized_body_is_413(replica):
    r = post(replica, "/v1/completions", json.dumps({"model": "tiny", "prompt": "x" * 2_000_000}))
    assert_openai_error(r, 413, "body_too_large")


def test_unknown_route_is_404_in_openai_shape(replica):
    assert_openai_error(httpx.get(replica.url + "/v2/nothing"), 404)


def test_health_and_prometheus_metrics(replica):
    client(replica).completions.create(model="tiny", prompt="A", max_tokens=3, temperature=0)
    health = httpx.get(replica.url + "/health").json()
    assert health["status"] == "ok" and health["model"] == "tiny"
    text = httpx.get(replica.url + "/metrics").text
    for series in (
        "collm_queue_depth",
        "collm_ttft_seconds_bucket",
        "collm_tpot_seconds_bucket",
        "collm_tokens_per_second",
        "collm_prefill_fixed_seconds",
        "collm_prefill_seconds_per_token",
        "collm_served_adapter_version",
        "collm_training_share",
        "collm_training_steps_total",
        'collm_requests_total{status="ok"}',
    ):
        assert series in text, series


def test_overload_gets_503_with_retry_after_and_the_server_keeps_serving(start_replica):
    replica = start_replica("--max-queue", "1", "--max-batch-size", "1")
    body = {"model": "tiny", "prompt": "ROMEO:", "max_tokens": 200, "temperature": 0}
    with ThreadPoolExecutor(12) as pool:
        results = list(
            pool.map(lambda _: post(replica, "/v1/completions", body, key=None), range(12))
        )
    codes = sorted(r.status_code for r in results)
    assert 200 in codes and 503 in codes, codes
    assert set(codes) <= {200, 503}
    for r in results:
        if r.status_code == 503:
            assert r.headers["Retry-After"].isdigit()
            assert r.json()["error"]["code"] == "overloaded"
    assert post(replica, "/v1/completions", {**body, "max_tokens": 2}, key=None).status_code == 200
