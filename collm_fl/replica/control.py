"""The replica's control API: what the Flower ClientApp (and an operator) call, token-protected.

- ``PUT  /control/adapters/{version}``  safetensors body → persist, shadow, validate, promote
  (``?mode=reload|merge``: stop-the-world swaps, for baselines only)
- ``POST /control/train``              JSON budget → trained adapter (safetensors, with metrics)
  (``"exclusive": true``: serving pauses for the job, for baselines only)
- ``GET  /control/load``               load report since the last reset (only looks)
- ``POST /control/load/reset``         the same report; a new window starts (the allocation reads)
- ``PUT  /control/share``              ``{"share": 0..1}``: training share, changeable at run time
- ``POST /control/rollback``           ``{"version": N}``: serve a stored older version again
- ``GET  /control/status``             versions, slots, trainer state

Every call needs ``Authorization: Bearer <control token>`` (constant-time check), checked before
any of its body is read: a caller without the token cannot make the replica buffer an adapter's
worth of body (up to ``MAX_ADAPTER_BYTES``). The calls' blocking work (decoding and swapping an
adapter, an exclusive training job) runs on the control API's own threads: the OpenAI API's
server shares the event loop, and its tokenization the loop's default thread pool, which such
work would otherwise fill. A co-executing training job, which lasts until its deadline, is queued
on the trainer and awaited, holding no thread: however many are queued, pushes and rollbacks
still find one. A job of a later round of its run supersedes it (``CoTrainer.submit``): one not
started yet is answered 409 ``superseded``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import asdict
from typing import TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from collm_fl.api.disconnect import ClientGone, unless_client_leaves
from collm_fl.api.errors import (
    APIError,
    BearerAuth,
    BodySizeLimit,
    install_error_handlers,
    overloaded,
)
from collm_fl.api.limits import DEFAULT_BODY_TIMEOUT_S
from collm_fl.errors import (
    AdapterValidationError,
    ConfigError,
    StoreError,
    VersionConflictError,
    VersionNotStoredError,
)
from collm_fl.replica.coexec import JobSuperseded, TrainerStopped
from collm_fl.replica.runtime import DEFAULT_RUN, SWAP_MODES, Replica
from collm_fl.replica.slots import NoFreeSlotError, ShadowStateError
from collm_fl.replica.wire import decode_adapter, encode_adapter

log = logging.getLogger(__name__)

MAX_ADAPTER_BYTES = 512 * 1024 * 1024
CONTROL_THREADS = 8  # concurrent blocking control calls (an exclusive training job holds one)

T = TypeVar("T")


class TrainBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    round: int = Field(ge=0)
    steps: int = Field(ge=0, le=1_000_000)
    backfill_steps: int = Field(default=0, ge=0, le=1_000_000)  # only while no request is served
    start_after_s: float = Field(default=0.0, ge=0, le=7 * 24 * 3600)  # its first step waits
    learning_rate: float = Field(gt=0, lt=1)
    deadline_s: float = Field(gt=0, le=7 * 24 * 3600)
    base_version: int | None = Field(default=None, ge=0)  # must be the served version if given
    # the run whose version base_version is (a replica serves one run's versions at a time: two
    # runs' v3 are different adapters); must be the served run if given
    base_run: str | None = Field(default=None, min_length=1, max_length=200)
    share: float | None = Field(default=None, ge=0, le=1)
    exclusive: bool = False  # baselines: pause serving for the job (see Replica.train)


class ShareBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    share: float = Field(ge=0, le=1)


class RollbackBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: int = Field(ge=0)


def create_control_app(
    replica: Replica, token: str, body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S
) -> FastAPI:
    if not token:
        raise ConfigError("the control API needs a token (--control-token or COLLM_CONTROL_TOKEN)")
    threads = ThreadPoolExecutor(CONTROL_THREADS, thread_name_prefix="collm-control")

    async def off_loop(fn: Callable[..., T], *args: object, **kwargs: object) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(threads, functools.partial(fn, *args, **kwargs))

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:  # (a training job still running ends with the trainer; nothing waits for it)
            threads.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="CoLLM-FL replica control", version="1", lifespan=lifespan)
    install_error_handlers(app)
    app.add_middleware(  # type: ignore[arg-type]
        BodySizeLimit, max_bytes=MAX_ADAPTER_BYTES, read_timeout_s=body_timeout_s
    )
    # Added last, so it runs first: the token is checked before the body is read.
    app.add_middleware(  # type: ignore[arg-type]
        BearerAuth,
        token=token,
        what="control token (the replica's --control-token or $COLLM_CONTROL_TOKEN)",
        code="invalid_control_token",
    )

    @app.put("/control/adapters/{version}")
    async def push(
        version: int, request: Request, run: str = DEFAULT_RUN, mode: str = "shadow"
    ) -> dict[str, object]:
        if mode not in SWAP_MODES:
            raise APIError(400, f"mode must be one of {SWAP_MODES}, got {mode!r}", param="mode")
        blob = await request.body()
        try:
            # (off the event loop the OpenAI API shares: a large adapter takes a while)
            state, config, blob_version, _ = await off_loop(decode_adapter, blob)
            if blob_version is not None and blob_version != version:
                raise ConfigError(f"payload says version {blob_version}, URL says {version}")
            result = await off_loop(replica.push_version, state, config, version, run, mode)
        except (AdapterValidationError, ConfigError) as e:
            raise APIError(400, f"version {version} rejected: {e}", code="invalid_adapter") from e
        except Exception as e:
            if (error := _swap_error(version, e)) is None:
                raise
            raise error from e
        return {"status": "served", **asdict(result)}

    @app.post("/control/train")
    async def train(body: TrainBody, request: Request) -> Response:
        served = replica.served_version
        if body.base_version is not None and served != body.base_version:
            raise APIError(
                409,
                f"replica serves version {served}, not base_version {body.base_version}",
                code="version_mismatch",
            )
        if body.base_run is not None and replica.run != body.base_run:
            raise APIError(
                409,
                f"replica serves run {replica.run!r}, not base_run {body.base_run!r}",
                code="version_mismatch",
            )
        if body.exclusive and body.start_after_s:  # (before the share: a refusal changes nothing)
            raise APIError(
                400,
                "start_after_s is for co-executing jobs (exclusive pauses serving)",
                param="start_after_s",
                code="cannot_train",
            )
        before = replica.training_share
        try:
            if body.share is not None:
                replica.set_training_share(body.share)
            if body.exclusive:  # (holds a control thread: serving is paused under its locks)
                outcome = await off_loop(
                    replica.train,
                    body.steps,
                    body.learning_rate,
                    body.deadline_s,
                    body.round,
                    exclusive=True,
                    base_version=body.base_version,
                    base_run=body.base_run,
                )
            else:  # queued on the trainer and awaited: no thread waits out the job
                job = await off_loop(
                    replica.submit_training,
                    body.steps,
                    body.learning_rate,
                    body.deadline_s,
                    body.round,
                    backfill_steps=body.backfill_steps,
                    base_version=body.base_version,
                    start_after_s=body.start_after_s,
                    base_run=body.base_run,
                )
                # A caller that leaves (its round ended, its node stopped) takes its job along:
                # one not started never runs, a running one stops at its step's next layer.
                outcome = await unless_client_leaves(request, asyncio.wrap_future(job))
        except ClientGone:
            log.info("the caller of a training job left: job dropped")
            return Response(status_code=499)  # (nginx's "client closed request"; unread)
        except VersionConflictError as e:  # a version landed after the check above
            _restore_share(body.share, before)
            raise APIError(409, str(e), code="version_mismatch") from e
        except ConfigError as e:
            _restore_share(body.share, before)
            raise APIError(400, str(e), code="cannot_train") from e
        except JobSuperseded as e:  # a later round's job came before this one started
            raise APIError(409, str(e), code="superseded") from e
        except TrainerStopped as e:  # SIGTERM: the job ends with the replica
            raise APIError(503, str(e), "server_error", code="shutting_down") from e
        except FloatingPointError as e:  # a non-finite loss or gradient: no state to send
            _restore_share(body.share, before)
            raise APIError(
                500, f"training diverged: {e}", "server_error", code="training_diverged"
            ) from e
        metrics = {
            "num-examples": float(replica.num_train_rows),
            "train-loss": outcome.loss,
            "train-tokens": float(outcome.tokens),
            "train-seconds": outcome.train_seconds,
            "step-cost-seconds": outcome.step_cost_seconds,
            "total-seconds": outcome.seconds,
            "local-steps": float(outcome.steps),
            "backfill-steps": float(outcome.backfilled),
            "yielded-seconds": outcome.yielded_seconds,
            "yields": float(outcome.yields),
            "deadline-hit": float(outcome.deadline_hit),
            "lent-seconds": outcome.lent_seconds,
            "late-rest-seconds": outcome.late_seconds,
        }
        blob = await off_loop(
            encode_adapter,
            outcome.state,
            replica.cfg.lora.to_peft_config_dict(replica.cfg.model),
            None,
            metrics,
        )
        return Response(blob, media_type="application/octet-stream")

    def _restore_share(asked: float | None, before: float) -> None:
        """A refused job changes nothing: the share it set goes back (unless another call has
        set one since)."""
        if asked is not None and replica.trainer is not None and replica.training_share == asked:
            replica.set_training_share(before)

    @app.get("/control/load")
    async def load(reset: bool = False) -> dict[str, float]:
        if reset:  # a GET must not change state: a retried one would split the window
            raise APIError(
                400,
                "GET /control/load only looks; POST /control/load/reset ends the window",
                param="reset",
                code="use_post",
            )
        return replica.load_report(reset=False).to_metrics(prefix="")

    @app.post("/control/load/reset")
    async def load_reset() -> dict[str, float]:
        return replica.load_report(reset=True).to_metrics(prefix="")

    @app.put("/control/share")
    async def share(body: ShareBody) -> dict[str, float]:
        try:
            replica.set_training_share(body.share)
        except ConfigError as e:
            raise APIError(400, str(e), code="cannot_train") from e
        return {"share": replica.training_share}

    @app.post("/control/rollback")
    async def rollback(body: RollbackBody) -> dict[str, object]:
        try:
            result = await off_loop(replica.rollback, body.version)
        except VersionNotStoredError as e:
            raise APIError(404, str(e), code="version_not_found") from e
        except StoreError as e:  # stored, but its files cannot be read: not the caller's error
            raise APIError(500, str(e), "server_error", code="store_error") from e
        except AdapterValidationError as e:
            raise APIError(400, str(e), code="invalid_adapter") from e
        except Exception as e:
            if (error := _swap_error(body.version, e)) is None:
                raise
            raise error from e
        return {"status": "served", **asdict(result)}

    @app.get("/control/status")
    async def status() -> dict[str, object]:
        return {
            "model": replica.cfg.model,
            "run": replica.run,
            "served_version": replica.served_version,
            "stored_versions": replica.stored_versions(),
            "slots": [asdict(s) for s in replica.slots.snapshot()],
            "history": replica.slots.history,
            "training_share": replica.training_share,
            "can_train": replica.trainer is not None,
            "adapter_shapes": {k: list(v) for k, v in replica.modules.expected_shapes().items()},
            "training": bool(replica.trainer and replica.trainer.running_job),
        }

    return app


def _swap_error(version: int, e: Exception) -> APIError | None:
    """The HTTP error for a push or rollback that failed for a reason other than the adapter
    (None: an internal error, left to the 500 handler)."""
    if isinstance(e, VersionConflictError | ShadowStateError):
        return APIError(409, f"version {version}: {e}", code="version_conflict")
    if isinstance(e, NoFreeSlotError):  # every slot pinned by requests in flight: try later
        return overloaded(retry_after_s=5, message=f"version {version} not loaded: {e}")
    if isinstance(e, StoreError):
        return APIError(500, f"version {version}: {e}", "server_error", code="store_error")
    return None
