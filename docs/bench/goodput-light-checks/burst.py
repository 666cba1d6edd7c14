"""Bursts of N streamed requests sent at once through `collm gateway` to two fresh SmolLM2
replicas (one core each): how many meet the SLOs under each admission order.

    python docs/bench/goodput-light-checks/burst.py slo 12 4
    python docs/bench/goodput-light-checks/burst.py fcfs 12 4

Prints one JSON line per burst: the gateway's split, how many met both SLOs, the TTFTs (s). The
SLOs are the main goodput run's (1523 / 392 ms). Ports 8710-8722 must be free; the replicas'
logs and stores go to a temporary folder, and every process started is stopped at the end.
"""

import asyncio
import contextlib
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

SCHEDULE, N, BURSTS = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
TTFT_SLO, TPOT_SLO = 1.523, 0.392
GATEWAY = "http://127.0.0.1:8710"
COLLM = shutil.which("collm") or sys.exit("collm is not on PATH (activate the venv)")
TEXT = (
    "the quick brown fox jumps over a lazy dog while kings and queens of old england "
    "speak in verse of love and war and fortune"
)
WORDS = TEXT.split()


def prompt(i: int) -> str:  # ~48 words, like the benchmark's prompts
    return " ".join(WORDS[(i + k) % len(WORDS)] for k in range(48))


async def one(c: httpx.AsyncClient, i: int) -> tuple[int, float | None, float | None]:
    t0, ttft, n = time.perf_counter(), None, 0
    body = {"model": "smollm2-135m", "prompt": prompt(i), "max_tokens": 24, "stream": True}
    async with c.stream("POST", f"{GATEWAY}/v1/completions", json=body) as r:
        if r.status_code != 200:
            await r.aread()
            return r.status_code, None, None
        async for line in r.aiter_lines():
            if line.startswith("data:") and "[DONE]" not in line:
                n += 1
                ttft = ttft if ttft is not None else time.perf_counter() - t0
    if ttft is None:
        return 200, None, None
    return 200, ttft, (time.perf_counter() - t0 - ttft) / max(n - 1, 1)


async def bursts(procs: list[subprocess.Popen], work: Path) -> None:
    async with httpx.AsyncClient(timeout=120) as c:
        while True:  # until both replicas are up behind the gateway
            if any(p.poll() is not None for p in procs):
                sys.exit(f"a replica or the gateway exited at start: its log is in {work}")
            try:
                health = (await c.get(f"{GATEWAY}/health")).json()
                if health["replicas"] and all(r["healthy"] for r in health["replicas"]):
                    break
            except (httpx.HTTPError, KeyError, ValueError):
                pass
            await asyncio.sleep(0.5)
        for i in range(6):  # one at a time: the gateway and the replicas learn their timings
            await one(c, 100 + i)
        for k in range(BURSTS):
            before = {
                r["name"]: r["routed"]
                for r in (await c.get(f"{GATEWAY}/health")).json()["replicas"]
            }
            res = await asyncio.gather(*[one(c, k * 50 + i) for i in range(N)])
            after = {
                r["name"]: r["routed"]
                for r in (await c.get(f"{GATEWAY}/health")).json()["replicas"]
            }
            met = sum(t is not None and t <= TTFT_SLO and p <= TPOT_SLO for _, t, p in res)
            print(
                json.dumps(
                    {
                        "schedule": SCHEDULE,
                        "burst": k,
                        "split": [after[name] - before[name] for name in after],
                        "met": met,
                        "ttfts": sorted(round(t, 2) for _, t, _ in res if t is not None),
                        "not_ok": [code for code, _, _ in res if code != 200],
                    }
                ),
                flush=True,
            )
            for i in range(3):  # the replicas drain between bursts
                await one(c, 900 + i)


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="collm-burst-"))
    slo = ["--ttft-slo", str(TTFT_SLO), "--tpot-slo", str(TPOT_SLO)]
    procs: list[subprocess.Popen] = []
    with contextlib.ExitStack() as logs:
        try:
            start(work, slo, procs, logs)
            asyncio.run(bursts(procs, work))
        finally:
            for p in procs:
                p.send_signal(signal.SIGTERM)
            for p in procs:
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    p.kill()
    shutil.rmtree(work, ignore_errors=True)  # (kept when a process failed to start)


def start(
    work: Path, slo: list[str], procs: list[subprocess.Popen], logs: contextlib.ExitStack
) -> None:
    """Two replicas (one core each) and the gateway in front of them."""
    for i in range(2):
        cmd = [COLLM, "replica", "--model", "smollm2-135m", "--port", str(8711 + i)]
        cmd += ["--control-port", str(8721 + i), "--control-token", "t", "--cpus", str(i)]
        cmd += ["--schedule", SCHEDULE, "--data", "none", "--store-dir", str(work / f"s{i}")]
        log = logs.enter_context(open(work / f"replica{i}.log", "w"))  # noqa: SIM115
        procs.append(subprocess.Popen(cmd + slo, stdout=log, stderr=subprocess.STDOUT))
    cmd = [COLLM, "gateway", "--port", "8710", "--shed-factor", "2", *slo]
    cmd += ["--replica", "http://127.0.0.1:8711", "--replica", "http://127.0.0.1:8712"]
    log = logs.enter_context(open(work / "gateway.log", "w"))  # noqa: SIM115
    procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT))


if __name__ == "__main__":
    main()
