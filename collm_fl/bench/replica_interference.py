"""Interference: what co-located training costs serving, at several training shares.

One in-process replica (with training data) serves a closed-loop stream: ``clients`` threads each
issue a greedy ``max_tokens`` request, wait for it, and issue the next, for ``duration_s``. The
stream runs once with training off, once with training on and nothing lent (a replica's default:
a training step gives way to serving at every layer, so under this stream it runs only in
serving's gaps), and once per training share with serving lending up to that share to the job
(``collm replica --max-lend-share``: after each serving step the engine rests t·s/(1−s)). The job
asks for far more steps than fit, so it is always behind its plan and borrows all it may; its
deadline ends it with the window.

Thread budget (2 cores): the engine thread uses 1 torch thread; the trainer uses 1 while requests
are present and all cores when the replica is idle (``collm_fl/replica/coexec.py``); client
threads only wait on their requests.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from typing import TypedDict

from collm_fl.adapters import LoraSpec
from collm_fl.bench.replica_decode import (
    adapter_shapes,
    latency_stats,
    prompt_ids,
    random_adapter_state,
)
from collm_fl.data import DataSpec
from collm_fl.replica.coexec import TrainOutcome
from collm_fl.replica.engine import LEND_SHARE_LIMIT
from collm_fl.replica.requests import FINISH_LENGTH, GenerationRequest
from collm_fl.replica.runtime import Replica, ReplicaConfig
from collm_fl.replica.sampling import SamplingParams

log = logging.getLogger(__name__)

TRAIN_STEPS = 1_000_000  # "many": the job's deadline ends it with the window
LEARNING_RATE = 1e-4


class InterferenceRow(TypedDict):
    setting: str  # "training off", "share 0.5, nothing lent", "share 0.5, lent"
    share: float  # the training share (0 when training is off)
    lend_share: float  # the most serving lends to the job (0: it trains in serving's gaps only)
    tokens_per_s: float  # serving tokens generated in the window / window seconds
    requests: int  # requests completed in the window
    ttft_p50_ms: float
    ttft_p99_ms: float
    tpot_p50_ms: float
    tpot_p99_ms: float
    train_steps: int
    train_steps_per_s: float  # micro-steps / job seconds
    train_yields: int  # times the SLO guard made training wait
    train_yielded_s: float


class InterferenceBenchmark(TypedDict):
    clients: int
    max_tokens: int
    duration_s: float
    train_batch_size: int
    seq_len: int
    engine_threads: int
    trainer_threads_serving: int
    trainer_threads_idle: int
    ttft_slo_s: float
    tpot_slo_s: float
    rows: list[InterferenceRow]


def _client(
    replica: Replica,
    prompt: list[int],
    params: SamplingParams,
    end: float,
    name: str,
    ttfts: list[float],
    tpots: list[float],
) -> None:
    """Closed loop: one request at a time until ``end``; the one running at ``end`` is cancelled."""
    n = 0
    while time.monotonic() < end:
        handle = replica.engine.submit(GenerationRequest(prompt, params, f"{name}-{n}"))
        n += 1
        if not handle.wait(timeout=max(0.0, end - time.monotonic())):
            handle.cancel()
            handle.wait()
            return
        if handle.finish_reason == FINISH_LENGTH and handle.ttft is not None:
            ttfts.append(handle.ttft)
            if handle.tpot is not None:
                tpots.append(handle.tpot)


def _run_setting(
    replica: Replica,
    share: float | None,
    lend: float,
    prompts: list[list[int]],
    params: SamplingParams,
    duration_s: float,
    round_number: int,
) -> InterferenceRow:
    outcome: list[TrainOutcome] = []
    trainer: threading.Thread | None = None
    replica.engine.max_lend_share = lend
    if share is not None:
        replica.set_training_share(share)

        def train() -> None:
            outcome.append(replica.train(TRAIN_STEPS, LEARNING_RATE, duration_s, round_number))

        trainer = threading.Thread(target=train, name="bench-train-job", daemon=True)
        trainer.start()
    ttfts: list[float] = []
    tpots: list[float] = []
    tokens_before = replica.engine.stats().tokens_generated
    started = time.monotonic()
    end = started + duration_s
    clients = [
        threading.Thread(
            target=_client,
            args=(replica, p, params, end, f"client{i}", ttfts, tpots),
            name=f"bench-client-{i}",
            daemon=True,
        )
        for i, p in enumerate(prompts)
    ]
    for c in clients:
        c.start()
    for c in clients:
        c.join()
    seconds = time.monotonic() - started
    tokens = replica.engine.stats().tokens_generated - tokens_before
    if trainer is not None:
        trainer.join()
    ttft, tpot = latency_stats(ttfts), latency_stats(tpots)
    job = outcome[0] if outcome else None
    if share is None:
        setting = "training off"
    else:
        setting = f"share {share:g}, " + (f"lends ≤ {lend:g}" if lend else "nothing lent")
    return InterferenceRow(
        setting=setting,
        share=share or 0.0,
        lend_share=lend,
        tokens_per_s=tokens / seconds,
        requests=len(ttfts),
        ttft_p50_ms=ttft["p50_ms"],
        ttft_p99_ms=ttft["p99_ms"],
        tpot_p50_ms=tpot["p50_ms"],
        tpot_p99_ms=tpot["p99_ms"],
        train_steps=job.steps if job else 0,
        train_steps_per_s=job.steps / job.seconds if job and job.seconds > 0 else 0.0,
        train_yields=job.yields if job else 0,
        train_yielded_s=job.yielded_seconds if job else 0.0,
    )


def measure_interference(
    model: str = "smollm2-135m",
    shares: Sequence[float] = (0.25, 0.5, LEND_SHARE_LIMIT),
    clients: int = 4,
    max_tokens: int = 64,
    duration_s: float = 30.0,
    spec: LoraSpec | None = None,
    data: DataSpec | None = None,
    progress: Callable[[str], None] | None = None,
) -> InterferenceBenchmark:
    """Serving throughput and latency with training off, on without lending (at the largest
    share), then on at each share with serving lending up to it."""
    if clients < 1 or duration_s <= 0 or any(not 0 < s <= LEND_SHARE_LIMIT for s in shares):
        raise ValueError(f"clients {clients}, duration {duration_s}, shares {list(shares)}")
    say = progress or (lambda line: log.info("%s", line))
    spec = spec or LoraSpec()
    with tempfile.TemporaryDirectory(prefix="collm-bench-interference-") as tmp:
        cfg = ReplicaConfig(
            model=model, lora=spec, data=data or DataSpec(), store_dir=tmp, serve_threads=1
        )
        replica = Replica(cfg)
        replica.engine.eos_ids = frozenset()  # fixed-length requests (vLLM benchmarks: ignore_eos)
        replica.start()
        try:
            state = random_adapter_state(adapter_shapes(model, spec), seed=0)
            replica.push_version(state, spec.to_peft_config_dict(model), 1)
            prompts = prompt_ids(replica.tokenizer, clients)
            params = SamplingParams(max_tokens=max_tokens, temperature=0)
            warm = replica.engine.submit(GenerationRequest(prompts[0], params, "warm-up"))
            warm.wait()
            rows: list[InterferenceRow] = []
            settings = [(None, 0.0), (max(shares, default=0.5), 0.0), *((s, s) for s in shares)]
            for i, (share, lend) in enumerate(settings):
                rows.append(_run_setting(replica, share, lend, prompts, params, duration_s, i))
                r = rows[-1]
                say(
                    f"interference: {r['setting']}: {r['tokens_per_s']:.1f} tok/s, TTFT p99 "
                    f"{r['ttft_p99_ms']:.0f} ms, TPOT p99 {r['tpot_p99_ms']:.0f} ms, "
                    f"{r['train_steps_per_s']:.2f} train steps/s"
                )
        finally:
            replica.stop()
    trainer = replica.trainer
    return InterferenceBenchmark(
        clients=clients,
        max_tokens=max_tokens,
        duration_s=duration_s,
        train_batch_size=cfg.train_batch_size,
        seq_len=cfg.seq_len,
        engine_threads=cfg.serve_threads,
        trainer_threads_serving=max(1, (trainer.total_threads if trainer else 1) - 1),
        trainer_threads_idle=trainer.total_threads if trainer else os.cpu_count() or 1,
        ttft_slo_s=cfg.slo.ttft_s,
        tpot_slo_s=cfg.slo.tpot_s,
        rows=rows,
    )
