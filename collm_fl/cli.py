"""The ``collm`` command line: prepare models, run the federation, benchmarks, inspect versions.

Exit codes: 0 success, 2 bad input (arguments, config, data, missing packages) with a one-line
reason on stderr, 1 for a failure of the work itself.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from collm_fl.errors import CollmError, ConfigError
from collm_fl.logs import setup_logging

log = logging.getLogger(__name__)


def _positive_int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from e
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="collm",
        description="CoLLM-FL: federated LoRA fine-tuning and serving on the same edge replicas.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare", help="build/convert a built-in model into the cache (once)")
    p.add_argument("--model", default="smollm2-135m", help="tiny, smollm2-135m, HF id or path")

    p = sub.add_parser(
        "federate",
        help="run the Flower federation locally (flwr run) and stop the local SuperLink afterwards",
    )
    p.add_argument("--app", default=".", help="path of the Flower app (default: .)")
    p.add_argument("--supernodes", type=int, default=4, help="simulated SuperNodes (clients)")
    p.add_argument(
        "-c",
        "--run-config",
        default="",
        help="run-config overrides, e.g. \"num-server-rounds=2 model='tiny'\"",
    )

    p = sub.add_parser(
        "replica",
        help="run an edge replica: OpenAI API + control API, serving while training",
        description="One copy of the base weights serves (unmerged LoRA, shadow swaps) and trains. "
        "Secrets can come from COLLM_API_KEY / COLLM_CONTROL_TOKEN instead of flags.",
    )
    p.add_argument("--model", default="tiny", help="tiny, smollm2-135m, HF id or path")
    p.add_argument("--quantization", default="none", choices=["none", "4bit", "8bit"])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8100, help="OpenAI-compatible API port")
    p.add_argument("--control-host", default="127.0.0.1")
    p.add_argument("--control-port", type=int, default=8101, help="control API port")
    p.add_argument("--api-key", default=None, help="Bearer key for /v1 (default: $COLLM_API_KEY)")
    p.add_argument(
        "--control-token", default=None, help="token for /control ($COLLM_CONTROL_TOKEN)"
    )
    p.add_argument("--store-dir", default="replica-store", help="where received versions are kept")
    p.add_argument(
        "--served-model-name", default="", help="model id clients send (default --model)"
    )
    p.add_argument(
        "--data", default="shakespeare", help="private data: shakespeare, a path, or none"
    )
    p.add_argument("--partitioning", default="play")
    p.add_argument("--partition-id", type=int, default=0)
    p.add_argument("--num-partitions", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--train-batch-size", type=int, default=4)
    p.add_argument("--ttft-slo", type=float, default=2.0, help="seconds")
    p.add_argument("--tpot-slo", type=float, default=0.2, help="seconds per output token")
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--max-queue", type=int, default=64)
    p.add_argument("--training-share", type=float, default=0.5)
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--lora-alpha", type=float, default=16.0)
    p.add_argument("--lora-targets", default="q_proj,v_proj")
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser(
        "site",
        help="a whole site on Flower's deployment engine: SuperLink, replicas beside SuperNodes, "
        "devices; runs the federation, then stops everything",
    )
    p.add_argument("--app", default=".", help="path of the Flower app (default: .)")
    p.add_argument("--replicas", type=int, default=2, help="replica nodes (serve + train)")
    p.add_argument("--devices", type=int, default=0, help="device nodes (train in-process)")
    p.add_argument("--model", default="tiny", help="base model of the replicas (and the run)")
    p.add_argument("--workdir", default="outputs/site", help="logs, stores and Flower home")
    p.add_argument("-c", "--run-config", default="", help="run-config overrides for flwr run")

    p = sub.add_parser(
        "load",
        help="replay an open-loop workload against an OpenAI-compatible endpoint",
        description="Arrivals (poisson, bursty, onoff, diurnal) or an Azure LLM trace CSV "
        "(TIMESTAMP,ContextTokens,GeneratedTokens); records TTFT, TPOT, latency, status and "
        "adapter version per request; prints goodput and SLO attainment.",
    )
    p.add_argument("--target", required=True, help="base URL, e.g. http://127.0.0.1:8000")
    p.add_argument("--model", required=True, help="model id to request")
    p.add_argument("--arrivals", default="poisson", help="poisson, bursty, onoff or diurnal")
    p.add_argument("--rate", type=float, default=1.0, help="requests/s (trace: rescale to this)")
    p.add_argument("--duration", type=float, default=60.0, help="seconds of schedule")
    p.add_argument("--trace", default=None, help="Azure-format CSV trace to replay instead")
    p.add_argument("--prompt-tokens", type=int, default=64, help="prompt length (trace: cap)")
    p.add_argument("--output-tokens", type=int, default=32, help="output length (trace: cap)")
    p.add_argument("--ttft-slo", type=float, default=2.0)
    p.add_argument("--tpot-slo", type=float, default=0.2)
    p.add_argument("--chat", action="store_true", help="use /v1/chat/completions")
    p.add_argument("--api-key", default=None, help="Bearer key (default: $COLLM_API_KEY)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="outputs/load", help="where requests.jsonl/summary.json go")

    p = sub.add_parser(
        "gateway",
        help="OpenAI-compatible gateway: routes each request to the replica predicted to meet "
        "the SLO, fails over when one dies or refuses",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--replica", action="append", required=True, help="replica base URL (repeat)")
    p.add_argument("--api-key", default=None, help="key clients send (default: $COLLM_API_KEY)")
    p.add_argument("--replica-api-key", default=None, help="key for the replicas' /v1 API")
    p.add_argument("--ttft-slo", type=float, default=2.0)
    p.add_argument("--tpot-slo", type=float, default=0.2)

    p = sub.add_parser(
        "live",
        help="the main job: replicas + gateway + live load while the federation trains; "
        "progress per round and a report; stops everything it started",
    )
    p.add_argument("--app", default=".", help="path of the Flower app (default: .)")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--devices", type=int, default=0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--local-steps", type=int, default=10)
    p.add_argument("--rate", type=float, default=0.5, help="requests/s offered to the gateway")
    p.add_argument("--arrivals", default="bursty", help="poisson, bursty, onoff or diurnal")
    p.add_argument("--prompt-tokens", type=int, default=48)
    p.add_argument("--output-tokens", type=int, default=24)
    p.add_argument("--ttft-slo", type=float, default=5.0)
    p.add_argument("--tpot-slo", type=float, default=0.5)
    p.add_argument("--out", default="outputs/live")
    p.add_argument("-c", "--run-config", default="", help="extra run-config overrides")
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("versions", help="list the stored adapter versions of a run")
    p.add_argument("--output-dir", default="outputs")
    p.add_argument("--store-url", default="")
    p.add_argument("--run-name", default="default")

    bench = sub.add_parser("bench", help="benchmarks (write JSON + markdown)")
    bsub = bench.add_subparsers(dest="bench", required=True)
    b = bsub.add_parser("aggregation", help="seconds and error of FedAvg vs exact aggregation")
    b.add_argument("--clients", type=_positive_int_list, default=[10, 100])
    b.add_argument("--layers", type=int, default=32)
    b.add_argument("--dim", type=int, default=4096)
    b.add_argument("--rank", type=int, default=16)
    b.add_argument("--out", default="docs/bench")

    b = bsub.add_parser("quality", help="central held-out perplexity: base vs stored versions")
    b.add_argument("--output-dir", default="outputs", help="the run's output-dir")
    b.add_argument("--store-url", default="")
    b.add_argument("--run-name", default="default")
    b.add_argument("--out", default="", help="report dir (default: <output-dir>/reports)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(logging.DEBUG if args.verbose else logging.INFO)
    try:
        return _dispatch(args)
    except CollmError as e:
        print(f"collm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("collm: interrupted", file=sys.stderr)
        return 130


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "prepare":
        from collm_fl.models import load_base_model

        loaded = load_base_model(args.model)
        print(f"{args.model}: {loaded.num_parameters / 1e6:.1f}M parameters at {loaded.path}")
        return 0
    if args.command == "federate":
        from collm_fl.federate import run_local_federation

        return run_local_federation(Path(args.app), args.supernodes, args.run_config)
    if args.command == "replica":
        return _run_replica(args)
    if args.command == "site":
        from collm_fl.launch import LocalFederation

        if args.replicas < 0 or args.devices < 0 or args.replicas + args.devices < 1:
            raise ConfigError("--replicas and --devices must be >= 0 and add up to at least 1")
        workdir = Path(args.workdir).resolve()
        run_config = f"model='{args.model}' {args.run_config}".strip()
        with LocalFederation(workdir, args.replicas, args.devices, model=args.model) as fed:
            for node in fed.replicas:
                print(f"replica {node.index}: {node.api_url}/v1 (logs in {workdir})", flush=True)
            return fed.flwr_run(run_config, Path(args.app).resolve())
    if args.command == "live":
        from collm_fl.live import LiveConfig, run_live

        if args.replicas < 1 or args.devices < 0 or args.rounds < 1 or args.rate <= 0:
            raise ConfigError(
                "--replicas >= 1, --devices >= 0, --rounds >= 1 and --rate > 0 needed"
            )
        cfg = LiveConfig(
            model=args.model,
            replicas=args.replicas,
            devices=args.devices,
            rounds=args.rounds,
            local_steps=args.local_steps,
            rate=args.rate,
            arrivals=args.arrivals,
            prompt_tokens=args.prompt_tokens,
            output_tokens=args.output_tokens,
            ttft_slo_s=args.ttft_slo,
            tpot_slo_s=args.tpot_slo,
            out=Path(args.out),
            run_config=args.run_config,
            seed=args.seed,
        )
        return run_live(cfg, Path(args.app).resolve())
    if args.command == "gateway":
        import os

        from collm_fl.gateway.serve import run_gateway
        from collm_fl.replica.metrics import SLO

        if args.ttft_slo <= 0 or args.tpot_slo <= 0:
            raise ConfigError("--ttft-slo and --tpot-slo must be > 0")
        api_key = args.api_key or os.environ.get("COLLM_API_KEY") or None
        replica_key = args.replica_api_key or os.environ.get("COLLM_REPLICA_API_KEY") or api_key
        run_gateway(
            args.replica,
            args.host,
            args.port,
            api_key,
            replica_key,
            SLO(args.ttft_slo, args.tpot_slo),
        )
        return 0
    if args.command == "load":
        import os

        from collm_fl.loadgen import run_load_cli

        return run_load_cli(
            target=args.target,
            model=args.model,
            kind=args.arrivals,
            rate=args.rate,
            duration_s=args.duration,
            trace=args.trace,
            out=Path(args.out),
            ttft_slo=args.ttft_slo,
            tpot_slo=args.tpot_slo,
            prompt_tokens=args.prompt_tokens,
            output_tokens=args.output_tokens,
            api_key=args.api_key or os.environ.get("COLLM_API_KEY"),
            seed=args.seed,
            chat=args.chat,
        )
    if args.command == "versions":
        from collm_fl.store import VersionStore

        out = Path(args.output_dir).resolve()
        store = VersionStore(out, args.store_url or None)
        run = store.find_run(args.run_name)
        for v in store.list_versions(run.id):
            loss = "-" if v.eval_loss is None else f"{v.eval_loss:.4f}"
            where = store.version_dir(v)
            print(f"v{v.number:<4d} round {v.round_number:<4d} eval-loss {loss:>8s}  {where}")
        return 0
    if args.command == "bench" and args.bench == "aggregation":
        from collm_fl.bench.aggregation import run_aggregation_benchmark, write_benchmark_report

        result = run_aggregation_benchmark(
            client_counts=args.clients,
            layers=args.layers,
            d=args.dim,
            rank=args.rank,
            progress=lambda line: print(line, flush=True),
        )
        json_path, md_path = write_benchmark_report(result, Path(args.out), _command_line())
        print(md_path.read_text())
        print(f"wrote {json_path} and {md_path}")
        return 0
    if args.command == "bench" and args.bench == "quality":
        from collm_fl.bench.quality import run_quality_benchmark

        out_dir = Path(args.out) if args.out else Path(args.output_dir) / "reports"
        quality, md_path = run_quality_benchmark(
            Path(args.output_dir), args.run_name, args.store_url or None, out_dir, _command_line()
        )
        print(md_path.read_text())
        print(
            json.dumps(
                {
                    "base_perplexity": quality["base"]["perplexity"],  # type: ignore[index]
                    "final_perplexity": quality["final"]["perplexity"],  # type: ignore[index]
                }
            )
        )
        return 0
    raise AssertionError(f"unhandled command {args}")  # argparse guarantees a known command


def _run_replica(args: argparse.Namespace) -> int:
    import os

    from collm_fl.adapters import LoraSpec
    from collm_fl.data import DataSpec
    from collm_fl.replica.metrics import SLO
    from collm_fl.replica.runtime import ReplicaConfig
    from collm_fl.replica.serve import run_replica

    token = args.control_token or os.environ.get("COLLM_CONTROL_TOKEN", "")
    if not token:
        raise ConfigError("a control token is required: --control-token or $COLLM_CONTROL_TOKEN")
    for name in ("port", "control_port"):
        if not 0 < getattr(args, name) < 65536:
            raise ConfigError(
                f"--{name.replace('_', '-')} must be a TCP port, got {getattr(args, name)}"
            )
    if args.ttft_slo <= 0 or args.tpot_slo <= 0:
        raise ConfigError("--ttft-slo and --tpot-slo must be > 0")
    if not 0 <= args.training_share <= 1:
        raise ConfigError(f"--training-share must be in [0, 1], got {args.training_share}")
    data = None
    if args.data != "none":
        data = DataSpec(source=args.data, partitioning=args.partitioning, seed=args.seed)
    cfg = ReplicaConfig(
        model=args.model,
        quantization=args.quantization,
        lora=LoraSpec(
            rank=args.lora_rank,
            alpha=args.lora_alpha,
            target_modules=tuple(t.strip() for t in args.lora_targets.split(",") if t.strip()),
        ),
        store_dir=args.store_dir,
        served_model_name=args.served_model_name,
        data=data,
        partition_id=args.partition_id,
        num_partitions=args.num_partitions,
        seq_len=args.seq_len,
        train_batch_size=args.train_batch_size,
        slo=SLO(ttft_s=args.ttft_slo, tpot_s=args.tpot_slo),
        max_batch_size=args.max_batch_size,
        max_queue=args.max_queue,
        training_share=args.training_share,
        seed=args.seed,
    )
    api_key = args.api_key or os.environ.get("COLLM_API_KEY") or None
    run_replica(cfg, args.host, args.port, args.control_host, args.control_port, api_key, token)
    return 0


def _command_line() -> str:
    return " ".join(["collm", *sys.argv[1:]])


if __name__ == "__main__":
    raise SystemExit(main())
