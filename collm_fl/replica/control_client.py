"""Client of a replica's control API (used by the Flower ClientApp on the replica's SuperNode)."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import httpx
import numpy as np

from collm_fl.adapters import AdapterState
from collm_fl.errors import WorkFailed
from collm_fl.replica.wire import decode_adapter, encode_adapter

log = logging.getLogger(__name__)


class ReplicaUnavailable(WorkFailed):
    """The replica could not be reached or refused the call; the message says which."""


class ReplicaClient:
    def __init__(self, address: str, token: str, timeout: float = 3600.0) -> None:
        base = address if address.startswith(("http://", "https://")) else f"http://{address}"
        self._http = httpx.Client(
            base_url=base.rstrip("/"),
            headers={"Authorization": f"Bearer {token}"},
            timeout=httpx.Timeout(timeout, connect=10.0),
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> ReplicaClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def push_version(
        self,
        state: Mapping[str, np.ndarray],
        peft_config: Mapping[str, object],
        version: int,
        run: str = "default",
        mode: str = "shadow",
    ) -> dict[str, object]:
        """Push ``version``; ``mode`` "reload"/"merge" stop the world (baselines only)."""
        blob = encode_adapter(state, peft_config, version)
        path = f"/control/adapters/{version}"
        params = {"run": run} if mode == "shadow" else {"run": run, "mode": mode}
        return self._call("PUT", path, content=blob, params=params).json()  # type: ignore[no-any-return]

    def train(
        self,
        round_number: int,
        steps: int,
        learning_rate: float,
        deadline_s: float,
        base_version: int | None,
        share: float | None = None,
        exclusive: bool = False,
        backfill_steps: int = 0,
        start_after_s: float = 0.0,
        base_run: str | None = None,
    ) -> tuple[AdapterState, dict[str, float]]:
        """Train a round's budget; ``exclusive`` pauses the replica's serving (baselines only).

        ``backfill_steps`` more steps run only while the replica has no request queued or running;
        ``start_after_s``: the job's first step waits this long (the allocation's turns);
        ``base_run``: the run ``base_version`` is a version of (checked with it, if given).
        """
        body: dict[str, object] = {
            "round": round_number,
            "steps": steps,
            "learning_rate": learning_rate,
            "deadline_s": deadline_s,
            "base_version": base_version,
        }
        if share is not None:
            body["share"] = share
        if exclusive:
            body["exclusive"] = True
        if backfill_steps:
            body["backfill_steps"] = backfill_steps
        if start_after_s:
            body["start_after_s"] = start_after_s
        if base_run is not None:
            body["base_run"] = base_run
        r = self._call("POST", "/control/train", json=body)
        state, _, _, metrics = decode_adapter(r.content)
        return state, metrics

    def load_report(self, reset: bool = False) -> dict[str, float]:
        """The load since the window began; ``reset`` ends the window (a POST: it changes state)."""
        if reset:
            return self._call("POST", "/control/load/reset").json()  # type: ignore[no-any-return]
        return self._call("GET", "/control/load").json()  # type: ignore[no-any-return]

    def set_share(self, share: float) -> None:
        self._call("PUT", "/control/share", json={"share": share})

    def rollback(self, version: int) -> dict[str, object]:
        return self._call("POST", "/control/rollback", json={"version": version}).json()  # type: ignore[no-any-return]

    def status(self) -> dict[str, object]:
        return self._call("GET", "/control/status").json()  # type: ignore[no-any-return]

    def _call(self, method: str, path: str, **kwargs: object) -> httpx.Response:
        try:
            r = self._http.request(method, path, **kwargs)  # type: ignore[arg-type]
        except httpx.HTTPError as e:
            raise ReplicaUnavailable(f"replica at {self._http.base_url} unreachable: {e}") from e
        if r.status_code >= 400:
            try:
                msg = r.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                msg = r.text[:500]
            raise ReplicaUnavailable(f"replica {method} {path} -> {r.status_code}: {msg}")
        return r
