"""Shadow swaps, the control API and restart recovery, against real `collm replica` processes."""

import threading

import httpx
import numpy as np
import pytest
import torch

from collm_fl.adapters import LoraSpec
from collm_fl.api.errors import APIError
from collm_fl.errors import AdapterValidationError, StoreError, VersionConflictError
from collm_fl.replica.control import _swap_error
from collm_fl.replica.control_client import ReplicaClient, ReplicaUnavailable
from collm_fl.replica.slots import NoFreeSlotError
from collm_fl.replica.wire import decode_adapter, encode_adapter
from collm_fl.training import attach_lora, get_adapter_state, set_adapter_state

SPEC = LoraSpec()  # the replica's defaults: r=8, alpha=16, q_proj/v_proj
PROMPTS = ["ROMEO:", "To be, or not", "KING LEAR: Blow, winds", "Good morrow"]
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def reference(request):
    """Greedy generations of the tiny model through PEFT, per adapter state (the oracle)."""
    from collm_fl.models import load_base_model

    loaded = load_base_model("tiny")
    model = attach_lora(loaded.model, SPEC)
    shapes = {k: v.shape for k, v in get_adapter_state(model).items()}

    def adapter(seed: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(seed)
        return {k: (rng.standard_normal(s) * 0.3).astype(np.float32) for k, s in shapes.items()}

    def generate(state, prompt: str) -> str:
        set_adapter_state(model, state)
        ids = loaded.tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=MAX_TOKENS, do_sample=False)
        return loaded.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)

    return adapter, generate


def control(replica) -> ReplicaClient:
    return ReplicaClient(replica.control_address, replica.token, timeout=120)


def stream_completion(replica, prompt: str) -> tuple[str, set, str]:
    """Stream one greedy completion; returns (text, versions named in chunks, header version)."""
    body = {
        "model": "tiny",
        "prompt": prompt,
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "stream": True,
    }
    text, versions = [], set()
    with httpx.stream("POST", replica.url + "/v1/completions", json=body, timeout=120) as r:
        assert r.status_code == 200
        header = r.headers["X-Adapter-Version"]
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            import json

            chunk = json.loads(line[6:])
            versions.add(chunk["adapter_version"])
            text.append(chunk["choices"][0]["text"])
    return "".join(text), versions, header


def test_control_api_refuses_calls_without_the_token(start_replica):
    replica = start_replica()
    r = httpx.get(f"http://{replica.control_address}/control/status")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_control_token"
    assert "control token" in r.json()["error"]["message"]  # not the API key: another secret
    with pytest.raises(ReplicaUnavailable, match="401"):
        ReplicaClient(replica.control_address, "wrong").status()


def test_control_round_trip_push_train_load_share_rollback(start_replica, reference):
    adapter, _ = reference
    replica = start_replica()
    with control(replica) as c:
        v0 = adapter(0)
        assert c.push_version(v0, SPEC.to_peft_config_dict("tiny"), 0)["version"] == 0
        state, metrics = c.train(1, steps=3, learning_rate=1e-3, deadline_s=60, base_version=0)
        assert state.keys() == v0.keys()
        assert any(not np.array_equal(state[k], v0[k]) for k in v0)
        assert metrics["local-steps"] == 3 and metrics["train-tokens"] > 0
        assert metrics["num-examples"] > 0 and metrics["backfill-steps"] == 0
        # The steps' own compute, what the server takes as the replica's speed: in their time
        assert 0 < metrics["step-cost-seconds"] <= metrics["train-seconds"] * 1.05
        # Backfill steps: the idle replica runs them after the planned one.
        _, more = c.train(1, 1, 1e-3, deadline_s=60, base_version=0, backfill_steps=2)
        assert more["local-steps"] == 3 and more["backfill-steps"] == 2
        r = httpx.post(
            f"http://{replica.control_address}/control/train",
            json={
                "round": 1,
                "steps": 1,
                "learning_rate": 1e-3,
                "deadline_s": 5,
                "backfill_steps": -1,
            },
            headers={"Authorization": f"Bearer {replica.token}"},
        )
        assert r.status_code in (400, 422) and "backfill_steps" in r.text
        load = c.load_report()
        keys = {"request-rate", "ttft-p99", "tpot-p99", "slo-attainment", "training-share"}
        assert keys | {"serving-utilization"} <= set(load)
        assert 0.0 <= load["serving-utilization"] <= 1.0
        c.set_share(0.25)
        assert c.status()["training_share"] == 0.25
        c.push_version(state, SPEC.to_peft_config_dict("tiny"), 1)
        assert httpx.get(replica.url + "/health").json()["adapter_version"] == 1
        c.rollback(0)
        assert httpx.get(replica.url + "/health").json()["adapter_version"] == 0
        # A wrong base version for training is a conflict, not silent training on another base.
        with pytest.raises(ReplicaUnavailable, match="409"):
            c.train(2, steps=1, learning_rate=1e-3, deadline_s=60, base_version=5)


def test_looking_at_the_load_report_does_not_reset_its_window(start_replica):
    replica = start_replica()
    stream_completion(replica, "one request")
    with control(replica) as c:
        assert c.load_report()["requests"] == 1
        assert c.load_report()["requests"] == 1  # a plain GET only looks
        assert c.load_report(reset=True)["requests"] == 1  # the allocation's read starts anew
        assert c.load_report()["requests"] == 0
    # A GET never changes state (a retried one would split the window): reset=true is refused.
    stream_completion(replica, "another request")
    url = f"http://{replica.control_address}/control/load"
    auth = {"Authorization": f"Bearer {replica.token}"}
    r = httpx.get(url, params={"reset": "true"}, headers=auth)
    assert r.status_code == 400 and r.json()["error"]["code"] == "use_post", r.text
    with control(replica) as c:
        assert c.load_report()["requests"] == 1


def test_invalid_versions_are_rejected_and_serving_keeps_the_old_one(start_replica, reference):
    adapter, _ = reference
    replica = start_replica()
    with control(replica) as c:
        c.push_version(adapter(0), SPEC.to_peft_config_dict("tiny"), 0)
        bad = adapter(1)
        first = next(iter(bad))
        bad[first][0, 0] = np.nan
        with pytest.raises(ReplicaUnavailable, match="400"):
            c.push_version(bad, SPEC.to_peft_config_dict("tiny"), 1)
        wrong_rank = SPEC.replace(rank=4).to_peft_config_dict("tiny")
        with pytest.raises(ReplicaUnavailable, match="rank"):
            c.push_version(adapter(2), wrong_rank, 2)
        r = httpx.put(
            f"http://{replica.control_address}/control/adapters/3",
            content=b"not safetensors",
            headers={"Authorization": f"Bearer {replica.token}"},
        )
        assert r.status_code == 400
        blob = encode_adapter(adapter(4), SPEC.to_peft_config_dict("tiny"), 4, {"loss": "n/a"})
        r = httpx.put(
            f"http://{replica.control_address}/control/adapters/4",
            content=blob,
            headers={"Authorization": f"Bearer {replica.token}"},
        )
        assert r.status_code == 400 and "malformed" in r.json()["error"]["message"]
        c.push_version(adapter(5), SPEC.to_peft_config_dict("tiny"), 5)
        with pytest.raises(ReplicaUnavailable, match="409"):  # a conflict, not a bad adapter
            c.push_version(adapter(6), SPEC.to_peft_config_dict("tiny"), 3)
        assert c.status()["served_version"] == 5
        assert c.status()["stored_versions"] == [0, 5]
    metrics = httpx.get(replica.url + "/metrics").text
    assert 'collm_adapter_swaps_total{result="rejected"} 2.0' in metrics  # the NaN and the rank


def test_swaps_under_concurrent_streaming_never_mix_versions(start_replica, reference):
    adapter, generate = reference
    replica = start_replica("--data", "none")
    states = {v: adapter(100 + v) for v in range(6)}
    expected = {(v, p): generate(states[v], p) for v in states for p in PROMPTS}
    assert len({expected[(v, PROMPTS[0])] for v in states}) > 1, "versions must differ"
    results, errors = [], []
    # Phase k's four streams start together after version k was promoted, and version k + 1 is
    # pushed while they run: every phase races a swap, and the versions seen must advance (0 or
    # 1 in the first phase, 3 or 4 in the last), however fast the machine.
    phases = threading.Barrier(5, timeout=300)
    with control(replica) as c:
        c.push_version(states[0], SPEC.to_peft_config_dict("tiny"), 0)

        def client_loop(i: int) -> None:
            try:
                for j in range(4):
                    phases.wait()
                    prompt = PROMPTS[(i + j) % len(PROMPTS)]
                    results.append((prompt, *stream_completion(replica, prompt)))
            except Exception as e:  # collected and asserted below
                errors.append(e)
                phases.abort()

        threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for v in range(1, 5):
            phases.wait()  # (the previous phase's streams have all finished)
            c.push_version(states[v], SPEC.to_peft_config_dict("tiny"), v)  # while streams run
        for t in threads:
            t.join(timeout=300)
    assert not errors, errors
    assert len(results) == 16
    seen = set()
    for prompt, text, versions, header in results:
        assert len(versions) == 1, versions  # one version per request, every chunk
        (version,) = versions
        assert header == str(version)
        assert text == expected[(version, prompt)]  # tokens equal that version's reference
        seen.add(version)
    assert min(seen) <= 1 and max(seen) >= 3, f"the versions advanced with the swaps: {seen}"


def test_restarted_replica_serves_the_latest_stored_version(start_replica, reference, tmp_path):
    adapter, generate = reference
    store = tmp_path / "persistent-store"
    first = start_replica("--data", "none", store_dir=store)
    with control(first) as c:
        for v in range(3):
            c.push_version(adapter(200 + v), SPEC.to_peft_config_dict("tiny"), v)
    first.stop()
    assert not list(store.rglob(".tmp-*"))
    second = start_replica("--data", "none", store_dir=store)
    assert httpx.get(second.url + "/health").json()["adapter_version"] == 2
    text, versions, _ = stream_completion(second, PROMPTS[0])
    assert versions == {2}
    assert text == generate(adapter(202), PROMPTS[0])


@pytest.mark.parametrize(
    ("error", "status", "code"),
    [
        (VersionConflictError("older"), 409, "version_conflict"),
        (NoFreeSlotError("all pinned"), 503, "overloaded"),
        (StoreError("disk full"), 500, "store_error"),
    ],
)
def test_a_swap_that_fails_beside_the_adapter_gets_its_own_status(error, status, code):
    mapped = _swap_error(7, error)
    assert isinstance(mapped, APIError)
    assert (mapped.status, mapped.code) == (status, code) and "version 7" in mapped.message
    assert status != 503 or "Retry-After" in mapped.headers


def test_an_internal_failure_of_a_swap_is_left_to_the_500_handler():
    assert _swap_error(7, RuntimeError("bug")) is None


def test_a_bare_adapter_file_is_refused_with_what_the_control_api_takes() -> None:
    from safetensors.numpy import save

    blob = save({"x.lora_A.weight": np.zeros((2, 2), np.float32)})  # no PEFT config in it
    with pytest.raises(AdapterValidationError, match="no 'peft_config' in the safetensors"):
        decode_adapter(blob)
