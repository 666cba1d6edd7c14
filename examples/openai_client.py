"""Call a CoLLM-FL replica or gateway over its OpenAI-compatible API with plain httpx.

Sends one chat completion and one streaming chat completion (with
``stream_options.include_usage``) and prints, for each, the text, the token usage and the adapter
version that produced it: every response names its version (``adapter_version`` in the body and
in every stream chunk, ``X-Adapter-Version`` in the headers; ``null`` / ``base`` before the
federation has published one).

    python examples/openai_client.py --base-url http://127.0.0.1:8100/v1 --api-key KEY \
        --model smollm2-135m

Exit status: 0 on success; 2 when the URL is malformed, nothing listens there or the server
refuses the request (wrong key, unknown model: a 4xx); 1 when the server fails (a 5xx, a stream
that ends with an error, a timeout).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx

from collm_fl.api.urls import normalize_url
from collm_fl.errors import ConfigError

VERSION_HEADER = "X-Adapter-Version"


class ClientError(Exception):
    """A problem with what was asked (bad URL, unreachable server, a 4xx): exit status 2."""


class ServerError(Exception):
    """The server failed to answer a valid request (a 5xx, an error in a stream): exit status 1."""


@dataclass
class Reply:
    """What one completion produced: the text, the versions named, the token counts."""

    text: str = ""
    versions: list[int | None] = field(default_factory=list)  # in the order first named
    header_version: str | None = None  # X-Adapter-Version ("base" before any version)
    usage: dict[str, int] | None = None
    finish_reason: str | None = None  # "stop", "length", or "error" (a failed generation)

    def name_version(self, version: int | None) -> None:
        if version not in self.versions:
            self.versions.append(version)


def api_base(url: str) -> str:
    """``http(s)://host[:port]/v1`` from a base URL written with or without ``/v1``."""
    try:
        return normalize_url(url, "--base-url") + "/v1"
    except ConfigError as e:
        raise ClientError(str(e)) from None


def raise_for_status(response: httpx.Response) -> None:
    """Turn an OpenAI-style error reply into ClientError (4xx) or ServerError (5xx)."""
    if response.is_success:
        return
    response.read()
    try:
        message = response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = response.text[:300] or response.reason_phrase
    what = f"{response.request.method} {response.request.url} -> {response.status_code}: {message}"
    raise (ClientError if response.is_client_error else ServerError)(what)


def chat(client: httpx.Client, model: str, prompt: str, max_tokens: int) -> Reply:
    """One chat completion, answered as a whole."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
    }
    response = client.post("/chat/completions", json=body)
    raise_for_status(response)
    try:
        payload = response.json()
        reply = Reply(
            text=payload["choices"][0]["message"]["content"],
            header_version=response.headers.get(VERSION_HEADER),
            usage=payload.get("usage"),
        )
        reply.name_version(payload.get("adapter_version"))
    except (ValueError, LookupError, TypeError, AttributeError) as e:
        raise ServerError(f"not a chat completion: {response.text[:200]!r}") from e
    return reply


def stream_chat(
    client: httpx.Client, model: str, prompt: str, max_tokens: int, echo: bool = True
) -> Reply:
    """One streaming chat completion; the last chunk before ``[DONE]`` carries the usage."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    reply = Reply()
    with client.stream("POST", "/chat/completions", json=body) as response:
        raise_for_status(response)
        reply.header_version = response.headers.get(VERSION_HEADER)
        for chunk in sse_events(response.iter_lines()):
            if "error" in chunk:  # a stream that failed after it started
                raise ServerError(f"the stream ended with an error: {chunk['error']}")
            text = absorb_chunk(reply, chunk)
            if echo:
                print(text, end="", flush=True)
    if echo:
        print()
    if reply.finish_reason == "error":
        raise ServerError("the generation failed on the server (finish_reason 'error')")
    return reply


def absorb_chunk(reply: Reply, chunk: dict[str, object]) -> str:
    """Take one stream chunk's version, text and usage into ``reply``; returns its text."""
    if "adapter_version" in chunk:
        version = chunk["adapter_version"]
        reply.name_version(version if isinstance(version, int) else None)
    text = ""
    choices = chunk.get("choices")
    for choice in choices if isinstance(choices, list) else []:
        delta = choice.get("delta") if isinstance(choice, dict) else None
        content = delta.get("content") if isinstance(delta, dict) else None
        text += content if isinstance(content, str) else ""
        finish = choice.get("finish_reason") if isinstance(choice, dict) else None
        reply.finish_reason = finish if isinstance(finish, str) else reply.finish_reason
    reply.text += text
    usage = chunk.get("usage")
    if isinstance(usage, dict):  # the include_usage chunk (no choices)
        reply.usage = usage
    return text


def sse_events(lines: Iterator[str]) -> Iterator[dict[str, object]]:
    """The JSON objects of a server-sent event stream, up to ``data: [DONE]``."""
    for line in lines:
        if not line.startswith("data:"):
            continue  # blank separators, comments
        data = line[len("data:") :].strip()
        if data == "[DONE]":
            return
        try:
            payload = json.loads(data)
        except json.JSONDecodeError as e:
            raise ServerError(f"a stream event is not JSON: {data[:200]!r}") from e
        if not isinstance(payload, dict):
            raise ServerError(f"a stream event is not a JSON object: {data[:200]!r}")
        yield payload


def describe_version(reply: Reply) -> str:
    named = ", ".join("null (base model)" if v is None else str(v) for v in reply.versions)
    return f"adapter_version: {named or '-'}  ({VERSION_HEADER}: {reply.header_version})"


def describe_usage(reply: Reply) -> str:
    if not reply.usage:
        return "usage: -"
    u = reply.usage
    return f"usage: {u['prompt_tokens']} prompt + {u['completion_tokens']} completion tokens"


def run(args: argparse.Namespace) -> None:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    base = api_base(args.base_url)
    timeout = httpx.Timeout(args.timeout, connect=5.0)
    with httpx.Client(base_url=base, headers=headers, timeout=timeout) as client:
        try:
            print(f"== chat completion: POST {base}/chat/completions")
            reply = chat(client, args.model, args.prompt, args.max_tokens)
            print(f"text: {reply.text}")
            print(describe_version(reply))
            print(describe_usage(reply))
            print("== streaming chat completion, stream_options.include_usage")
            print("text: ", end="", flush=True)
            streamed = stream_chat(client, args.model, args.prompt, args.max_tokens)
            print(describe_version(streamed))
            print(describe_usage(streamed))
        except httpx.ConnectError as e:
            raise ClientError(f"cannot connect to {base}: {e}") from e
        except httpx.TimeoutException as e:
            raise ServerError(f"no answer from {base} within {args.timeout:g}s") from e
        except httpx.HTTPError as e:  # protocol errors, a connection dropped mid-stream
            raise ServerError(f"{base}: {type(e).__name__}: {e}") from e


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--base-url",
        default="http://127.0.0.1:8100/v1",
        help="the replica's or the gateway's base URL, with or without /v1",
    )
    p.add_argument(
        "--api-key",
        default=os.environ.get("COLLM_API_KEY"),
        help="Bearer key (default: $COLLM_API_KEY; none if unset)",
    )
    p.add_argument("--model", default="smollm2-135m", help="the served model id, e.g. tiny")
    p.add_argument("--prompt", default="Say something about the sea.")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except ClientError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ServerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
