"""Replicas serving different models: a request goes only to one serving its model, a model none
serves is the gateway's own 404, and /v1/models lists every healthy replica's model."""

from __future__ import annotations

import httpx
import pytest
from gateway_harness import GATEWAY_KEY

from collm_fl.api.errors import APIError
from collm_fl.gateway.proxy import replicas_of_other_models

AUTH = {"Authorization": f"Bearer {GATEWAY_KEY}"}


@pytest.fixture()
def two_models(scripted, start_gateway):
    a, b = scripted("m-a"), scripted("m-b")
    return a, b, start_gateway([a.url, b.url])


def complete(gw, model: str) -> httpx.Response:
    body = {"model": model, "prompt": "x", "max_tokens": 4}
    return httpx.post(gw.url + "/v1/completions", json=body, headers=AUTH, timeout=30)


def test_a_request_goes_only_to_a_replica_serving_its_model(two_models):
    a, b, gw = two_models
    for replica in (a, b, a, b, b, b):
        r = complete(gw, replica.model)
        assert r.status_code == 200, r.text
        assert r.headers["X-Routed-To"] == replica.name
    assert gw.metric("collm_gateway_failovers_total") == 0


def test_a_model_no_replica_serves_is_the_gateways_404_naming_the_models_served(two_models):
    _, _, gw = two_models
    r = complete(gw, "m-c")
    assert r.status_code == 404, r.text
    err = r.json()["error"]
    assert err["code"] == "model_not_found" and err["param"] == "model"
    assert "'m-c'" in err["message"] and "'m-a', 'm-b'" in err["message"]
    assert "X-Routed-To" not in r.headers
    assert sum(rep["routed"] for rep in gw.health()["replicas"]) == 0  # never forwarded


def test_models_lists_the_model_of_every_healthy_replica(two_models):
    _, _, gw = two_models
    r = httpx.get(gw.url + "/v1/models", headers=AUTH, timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["object"] == "list"
    assert [m["id"] for m in r.json()["data"]] == ["m-a", "m-b"]


def test_a_replica_whose_model_is_not_known_yet_may_serve_any_model():
    served = {"a": "m-a", "b": None}
    assert replicas_of_other_models(served, ["a", "b"], "m-c") == {"a"}


def test_a_model_served_only_by_a_replica_that_is_down_is_not_a_404():
    served = {"a": "m-a", "b": "m-b"}
    assert replicas_of_other_models(served, ["a"], "m-b") == {"a"}  # routing then finds none: 503
    with pytest.raises(APIError) as e:
        replicas_of_other_models(served, ["a"], "m-c")
    assert e.value.status == 404 and "'m-a'" in e.value.message and "m-b" not in e.value.message


def test_a_model_perhaps_served_by_a_replica_that_never_reported_is_not_a_404():
    # b is still loading (never answered /health): it may serve m-b, so no 404 a client
    # would not retry; routing finds no replica for it now, a 503.
    served = {"a": "m-a", "b": None}
    assert replicas_of_other_models(served, ["a"], "m-b") == {"a"}
