"""What each ``collm`` command does; heavy imports stay inside the command that needs them."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from collm_fl.errors import ConfigError, WorkFailed

if TYPE_CHECKING:
    from collm_fl.data import DataSpec


def dispatch(args: argparse.Namespace) -> int:
    if args.command in ("bench", "site", "load", "live"):  # (a report after an hour's work)
        for flag in ("out", "workdir"):
            if where := getattr(args, flag, None):
                check_output_dir(Path(where), f"--{flag}")
    if args.command == "prepare":
        from collm_fl.models import load_base_model

        loaded = load_base_model(args.model)
        print(f"{args.model}: {loaded.num_parameters / 1e6:.1f}M parameters at {loaded.path}")
        return 0
    if args.command == "federate":
        from collm_fl.federate import run_local_federation

        return run_local_federation(
            Path(args.app), args.supernodes, args.run_config, args.connection
        )
    if args.command == "replica":
        return _run_replica(args)
    if args.command == "site":
        from collm_fl.federate import (
            check_node_counts,
            failed_if_interrupted,
            few_nodes_config,
            launch_config,
            mark_failed,
            run_outcome,
        )
        from collm_fl.launch import LocalFederation, replica_flags

        if args.replicas < 0 or args.devices < 0 or args.replicas + args.devices < 1:
            raise ConfigError("--replicas and --devices must be >= 0 and add up to at least 1")
        workdir = Path(args.workdir).resolve()
        nodes = args.replicas + args.devices
        # Checked before anything starts; the replicas train as it says (data, LoRA shape, ...).
        app = Path(args.app).resolve()
        fixed = {"model": args.model}  # the replicas are started on --model
        # The run's store under the workdir, as `collm live` keeps it under --out (not the app's
        # `outputs`, where `flwr run .` keeps its own run of the same name): -c output-dir=...
        # puts it elsewhere.
        defaults = {**few_nodes_config(nodes), "output-dir": str(workdir / "federation")}
        run_config, run_cfg = launch_config(app, args.run_config, defaults, fixed)
        check_node_counts(run_cfg, nodes, "--replicas + --devices is")
        flags = replica_flags(run_cfg)
        with (
            failed_if_interrupted(run_cfg),
            LocalFederation(
                workdir, args.replicas, args.devices, model=args.model, replica_args=flags
            ) as fed,
        ):
            for node in fed.replicas:
                print(f"replica {node.index}: {node.api_url}/v1 (logs in {workdir})", flush=True)
            launched = datetime.now(UTC)
            try:
                code = fed.flwr_run(run_config, app, min_nodes=run_cfg.min_train_nodes)
            except WorkFailed as e:  # a process of the site exited mid-run
                mark_failed(run_cfg, str(e))
                raise
            return run_outcome(run_cfg, code, launched)
    if args.command == "live":
        from collm_fl.live import LiveConfig, run_live

        if Path(args.out).exists() and not Path(args.out).is_dir():
            raise ConfigError(f"--out: {args.out} exists and is not a directory")
        _check_lend_share(args.max_lend_share, args.lend_early)
        cfg = LiveConfig(  # (checks its values, naming each flag)
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
            max_lend_share=args.max_lend_share,
            lend_early=args.lend_early,
            shed_factor=args.shed_factor,
        )
        return run_live(cfg, Path(args.app).resolve())
    if args.command == "gateway":
        from collm_fl.api.limits import check_body_timeout
        from collm_fl.gateway.serve import run_gateway
        from collm_fl.launch import check_ports_free
        from collm_fl.policies.routing import check_shed_factor
        from collm_fl.replica.metrics import SLO

        if not all(math.isfinite(v) and v > 0 for v in (args.ttft_slo, args.tpot_slo)):
            raise ConfigError("--ttft-slo and --tpot-slo must be finite numbers > 0")
        if not args.stream_stall_timeout > 0:  # NaN too
            raise ConfigError(
                f"--stream-stall-timeout must be > 0 seconds, got {args.stream_stall_timeout}"
            )
        check_shed_factor(args.shed_factor)
        check_body_timeout(args.body_timeout)
        check_ports_free(("--port", args.host, args.port))
        api_key = args.api_key or os.environ.get("COLLM_API_KEY") or None
        replica_key = args.replica_api_key or os.environ.get("COLLM_REPLICA_API_KEY") or api_key
        run_gateway(
            args.replica,
            args.host,
            args.port,
            api_key,
            replica_key,
            SLO(args.ttft_slo, args.tpot_slo),
            stream_stall_timeout_s=args.stream_stall_timeout,
            shed_factor=args.shed_factor,
            body_timeout_s=args.body_timeout,
        )
        return 0
    if args.command == "load":
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
            ignore_eos=args.ignore_eos,
            tokenizer=args.tokenizer,
        )
    if args.command == "versions":
        from collm_fl.store import VersionStore

        out = Path(args.output_dir).resolve()
        if not args.store_url and not (out / "store.db").is_file():  # (opening would create one)
            raise ConfigError(
                f"--output-dir: no run store in {out} (no store.db: nothing ran there)"
            )
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
    if args.command == "bench" and args.bench == "replica":
        from collm_fl.bench.replica import run_replica_benchmarks, write_replica_report

        which = [w.strip() for w in args.only.split(",") if w.strip()]
        bench = run_replica_benchmarks(
            args.model, which, quick=args.quick, progress=lambda line: print(line, flush=True)
        )
        _, md = write_replica_report(bench, Path(args.out), _command_line())
        print(md.read_text())
        return 0
    if args.command == "bench" and args.bench == "goodput-runs":
        from collm_fl.bench.goodput_runs import write_runs_report

        for path in write_runs_report(args.runs, Path(args.out), _command_line()):
            print(f"wrote {path}")
        return 0
    if args.command == "bench" and args.bench == "goodput" and args.from_json:
        from collm_fl.bench.goodput_report import write_goodput_report
        from collm_fl.bench.goodput_result import result_from_json

        # A field missing or of the wrong shape, found reading the file or rendering it: the
        # command's input is at fault (exit 2). The report is rendered before anything is
        # written, so the last one in --out stays whole.
        malformed = (ValueError, KeyError, TypeError, AttributeError, IndexError, ArithmeticError)
        try:
            data = json.loads(Path(args.from_json).read_text(encoding="utf-8"))
            report = result_from_json(data)
        except (OSError, *malformed) as e:
            raise ConfigError(
                f"--from-json: not a goodput report {args.from_json!r}: {type(e).__name__}: {e}"
            ) from e
        try:
            written = write_goodput_report(report, Path(args.out))
        except malformed as e:
            raise ConfigError(
                f"--from-json: the report in {args.from_json!r} cannot be rendered: "
                f"{type(e).__name__}: {e}"
            ) from e
        for path in written:
            print(f"wrote {path}")
        return 0
    if args.command == "bench" and args.bench == "goodput":
        from collm_fl.bench.goodput import run_goodput_benchmark

        try:
            rates = [float(r) for r in args.rates.split(",") if r.strip()] or None
        except ValueError as e:
            raise ConfigError(f"--rates must be comma-separated numbers, got {args.rates!r}") from e
        if rates is not None and len(set(rates)) != len(rates):
            raise ConfigError(f"--rates: each rate once, got {args.rates!r}")
        systems = [s.strip() for s in args.systems.split(",") if s.strip()] or None
        run_goodput_benchmark(
            args.model,
            args.replicas,
            rates,
            args.rounds,
            args.duration_per_round,
            args.out,
            args.quick,
            lambda line: print(line, flush=True),
            arrivals=args.arrivals,
            trace=args.trace,
            slo_factor=args.slo_factor,
            seed=args.seed,
            server_lr=args.server_lr,
            shed_factor=args.shed_factor,
            systems=systems,
            command=_command_line(),
        )
        print((Path(args.out) / "goodput.md").read_text())
        return 0
    if args.command == "bench" and args.bench == "soak":
        from collm_fl.bench.soak import run_soak, write_soak_report

        finite = all(math.isfinite(v) and v > 0 for v in (args.duration, args.swap_every))
        if args.replicas < 1 or not finite:
            raise ConfigError("--replicas >= 1, --duration > 0 and --swap-every > 0 needed")
        try:
            factors = tuple(float(f) for f in args.load_factors.split(","))
        except ValueError:
            factors = ()
        if not factors or not all(math.isfinite(f) and f > 0 for f in factors):
            raise ConfigError(
                f"--load-factors: expected positive numbers like 1,2,1, got {args.load_factors!r}"
            )
        soak = run_soak(
            args.model,
            args.replicas,
            args.duration,
            load_factors=factors,
            swap_every_s=args.swap_every,
            progress=lambda line: print(line, flush=True),
        )
        md = write_soak_report(soak, Path(args.out), _command_line())
        print(md.read_text())
        return 0
    if args.command == "bench" and args.bench == "quality":
        from collm_fl.bench.quality import run_quality_benchmark

        out_dir = Path(args.out) if args.out else Path(args.output_dir) / "reports"
        runs = Path(args.output_dir)
        if not args.store_url and not (runs / "store.db").is_file():  # (opening would create one)
            raise ConfigError(
                f"--output-dir: no run store in {runs} (no store.db: nothing ran there)"
            )
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
    if args.command == "bench" and args.bench == "server-lr":
        from collm_fl.bench.server_lr import run_server_lr_benchmark

        run_server_lr_benchmark(
            args.model,
            args.clients,
            args.rounds,
            args.steps,
            _float_list("--server-lrs", args.server_lrs),
            Path(args.out),
            _command_line(),
            progress=lambda line: print(line, flush=True),
        )
        print((Path(args.out) / "server_lr.md").read_text())
        return 0
    if args.command == "bench" and args.bench == "forecast":
        from collm_fl.bench.forecast import DEFAULT_ALPHAS, DEFAULT_BETAS, run_forecast_benchmark

        trace = Path(args.trace) if args.trace else None
        if trace is not None and not trace.is_file():
            raise ConfigError(f"--trace: no such file: {trace}")
        run_forecast_benchmark(
            Path(args.out),
            _command_line(),
            rate=args.rate,
            round_s=args.round_s,
            rounds=args.rounds,
            seeds=args.seeds,
            first_seed=args.seed,
            alphas=_float_list("--alphas", args.alphas) or DEFAULT_ALPHAS,
            betas=_float_list("--betas", args.betas) or DEFAULT_BETAS,
            trace=trace,
            progress=lambda line: print(line, flush=True),
        )
        print((Path(args.out) / "forecast.md").read_text())
        return 0
    raise AssertionError(f"unhandled command {args}")  # argparse guarantees a known command


def check_output_dir(path: Path, flag: str) -> None:
    """Make sure ``path`` is, or can be made, a folder this process writes in, before any work
    starts: a command finding out only when it writes its report (a file of that name, a folder
    not its own) would lose all the work before it. Nothing is made here: input found bad later
    leaves nothing behind."""
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent  # (a path under a file does not exist either)
    if not existing.is_dir():
        if existing == path:
            raise ConfigError(f"{flag}: {path} is not a directory")
        raise ConfigError(f"{flag}: cannot make the folder {path}: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag}: {existing} is not a folder this user can write in")


def _run_replica(args: argparse.Namespace) -> int:
    from collm_fl.adapters import LoraSpec
    from collm_fl.api.limits import check_body_timeout
    from collm_fl.launch import check_ports_free
    from collm_fl.models import check_load_target
    from collm_fl.replica.affinity import parse_cpu_list, pin_process
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
    _check_replica_sizes(args)
    check_ports_free(
        ("--port", args.host, args.port), ("--control-port", args.control_host, args.control_port)
    )
    try:  # the store is written on every push: refuse one that cannot be before loading a model
        Path(args.store_dir).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--store-dir: cannot create {args.store_dir}: {e.strerror or e}") from e
    if not os.access(args.store_dir, os.W_OK | os.X_OK):
        raise ConfigError(f"--store-dir: {args.store_dir} is not writable")
    if not all(math.isfinite(v) and v > 0 for v in (args.ttft_slo, args.tpot_slo)):
        raise ConfigError("--ttft-slo and --tpot-slo must be finite numbers > 0")
    check_body_timeout(args.body_timeout)
    if not (math.isfinite(args.defer_limit) and args.defer_limit > 0):
        raise ConfigError(f"--defer-limit must be > 0 seconds, got {args.defer_limit}")
    if not 0 <= args.training_share <= 1:
        raise ConfigError(f"--training-share must be in [0, 1], got {args.training_share}")
    _check_lend_share(args.max_lend_share, args.lend_early)
    if not 0 <= args.trainer_nice <= 19:
        raise ConfigError(f"--trainer-nice must be in [0, 19], got {args.trainer_nice}")
    if args.keep_versions < 0:
        raise ConfigError(f"--keep-versions must be >= 0 (0 = keep all), got {args.keep_versions}")
    # A bad device name, or a GPU asked for and missing, is exit 2 before anything starts.
    check_load_target(args.quantization, args.device)
    if args.cpus:
        pin_process(parse_cpu_list(args.cpus))  # before the model loads: every thread inherits it
    data = replica_data(args)
    cfg = ReplicaConfig(
        model=args.model,
        quantization=args.quantization,
        device=args.device,
        lora=LoraSpec(
            rank=args.lora_rank,
            alpha=args.lora_alpha,
            dropout=args.lora_dropout,
            target_modules=tuple(t.strip() for t in args.lora_targets.split(",") if t.strip()),
        ),
        store_dir=args.store_dir,
        keep_versions=args.keep_versions,
        served_model_name=args.served_model_name,
        data=data,
        partition_id=args.partition_id,
        num_partitions=args.num_partitions,
        seq_len=args.seq_len,
        train_batch_size=args.train_batch_size,
        slo=SLO(ttft_s=args.ttft_slo, tpot_s=args.tpot_slo),
        max_batch_size=args.max_batch_size,
        max_queue=args.max_queue,
        schedule=args.schedule,
        defer_limit_s=args.defer_limit,
        training_share=args.training_share,
        max_lend_share=args.max_lend_share,
        lend_early=args.lend_early,
        trainer_nice=args.trainer_nice,
        seed=args.seed,
        canary=args.canary_check,
    )
    api_key = args.api_key or os.environ.get("COLLM_API_KEY") or None
    run_replica(
        cfg,
        args.host,
        args.port,
        args.control_host,
        args.control_port,
        api_key,
        token,
        body_timeout_s=args.body_timeout,
    )
    return 0


def _check_replica_sizes(args: argparse.Namespace) -> None:
    """``collm replica``'s batch, queue, sequence and partition flags, each named when wrong:
    before the model loads (else a zero batch size failed only at the first training job, an
    unknown partition or a 1-token sequence once the model had loaded, under internal names)."""
    problems = [
        f"{flag} must be >= {least}, got {value}"
        for flag, value, least in (
            ("--max-batch-size", args.max_batch_size, 1),
            ("--max-queue", args.max_queue, 1),
            ("--train-batch-size", args.train_batch_size, 1),
            ("--seq-len", args.seq_len, 2),  # (a token to predict from, and one to predict)
            ("--num-partitions", args.num_partitions, 1),
        )
        if value < least
    ]
    if not 0 <= args.partition_id < max(args.num_partitions, 1):
        problems.append(
            f"--partition-id must be >= 0 and < --num-partitions ({args.num_partitions}), "
            f"got {args.partition_id}"
        )
    if problems:
        raise ConfigError("; ".join(problems))


def _command_line() -> str:
    return " ".join(["collm", *sys.argv[1:]])


def _float_list(flag: str, text: str) -> list[float]:
    """A comma-separated list of finite numbers ('' = an empty list)."""
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError as e:
        raise ConfigError(f"{flag} must be comma-separated numbers: {e}") from e
    bad = [v for v in values if not math.isfinite(v)]
    if bad:
        raise ConfigError(f"{flag} must be finite numbers, got {bad[0]}")
    return values


def _check_lend_share(value: float, early: bool = False) -> None:
    """``--max-lend-share`` (and ``--lend-early``) of ``collm replica`` and ``collm live``: exit 2
    when out of range, or when lending early with nothing to lend."""
    from collm_fl.replica.engine import LEND_SHARE_LIMIT

    if not 0 <= value <= LEND_SHARE_LIMIT:
        raise ConfigError(f"--max-lend-share must be in [0, {LEND_SHARE_LIMIT}], got {value}")
    if early and value == 0:
        raise ConfigError("--lend-early lends nothing with --max-lend-share 0: set both")


def replica_data(args: argparse.Namespace) -> DataSpec | None:
    """The private data a replica trains on (``--data none``: it only serves)."""
    from collm_fl.data import DataSpec

    if args.data == "none":
        return None
    central = args.central_heldout
    if central is None:  # as the server's default on the plays; a site's own file: none
        central = DataSpec().central_heldout if args.data == "shakespeare" else 0
    return DataSpec(
        source=args.data,
        partitioning=args.partitioning,
        dirichlet_alpha=args.dirichlet_alpha,
        heldout_fraction=0.0,  # nothing on a replica evaluates a local tail: all of it trains
        central_heldout=central,
        max_samples_per_client=args.max_samples_per_client or None,
        seed=args.seed,
    )
