"""The `collm` CLI: exit code 2 with a one-line reason for bad input."""

import pytest

from collm_fl.cli import main


def run(capsys, *argv: str) -> tuple[int, str]:
    code, _, err = run_out(capsys, *argv)
    return code, err


def run_out(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        code = main(list(argv))
    except SystemExit as e:  # argparse exits on its own errors
        code = int(e.code or 0)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_unknown_command_exits_2(capsys):
    code, err = run(capsys, "serve-everything")
    assert code == 2 and "invalid choice" in err


def test_bad_flag_value_exits_2(capsys):
    code, err = run(capsys, "bench", "aggregation", "--clients", "ten")
    assert code == 2 and "comma-separated integers" in err


def test_bad_port_exits_2_with_the_reason(capsys):
    code, err = run(capsys, "replica", "--port", "70000", "--control-token", "t")
    assert code == 2 and "--port must be a TCP port" in err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--cpus", "zero"], "--cpus"),
        (["--trainer-nice", "30"], "--trainer-nice"),
        (["--max-lend-share", "1.0"], "--max-lend-share"),
        (["--lend-early"], "--lend-early lends nothing"),
        (["--keep-versions", "-1"], "--keep-versions"),
        (["--defer-limit", "0"], "--defer-limit"),
        (["--schedule", "lifo"], "--schedule"),
        (["--body-timeout", "0"], "--body-timeout must be a finite number of seconds > 0"),
        (["--body-timeout", "nan"], "--body-timeout"),
    ],
)
def test_bad_replica_flags_exit_2_naming_the_flag(capsys, flags, message):
    code, err = run(capsys, "replica", "--control-token", "t", *flags)
    assert code == 2 and message in err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--train-batch-size", "0"], "--train-batch-size must be >= 1, got 0"),
        (["--max-batch-size", "0"], "--max-batch-size must be >= 1, got 0"),
        (["--max-queue", "0"], "--max-queue must be >= 1, got 0"),
        (["--seq-len", "1"], "--seq-len must be >= 2, got 1"),
        (["--num-partitions", "0"], "--num-partitions must be >= 1, got 0"),
        (
            ["--partition-id", "2", "--num-partitions", "2"],
            "--partition-id must be >= 0 and < --num-partitions (2), got 2",
        ),
        (["--partition-id", "-1"], "--partition-id must be >= 0"),
    ],
)
def test_bad_replica_sizes_exit_2_naming_the_flag_before_the_model_loads(
    capsys, monkeypatch, tmp_path, flags, message
):
    # A zero training batch failed only at the first training job; the others once the model
    # had loaded, some under internal names (max_batch_size, seq_len).
    import collm_fl.replica.serve as serve

    def built(*args, **kwargs):
        raise AssertionError("the replica was built")

    monkeypatch.setattr(serve, "Replica", built)
    store = ["--store-dir", str(tmp_path / "store")]
    code, err = run(capsys, "replica", "--control-token", "t", *store, *flags)
    assert code == 2 and message in err


def test_goodput_bench_with_an_unknown_system_exits_2(capsys):
    code, err = run(capsys, "bench", "goodput", "--systems", "merged,fastest")
    assert code == 2 and "unknown 'fastest'" in err


@pytest.mark.parametrize("factors", ["", "1,x", "1,-2", "0", "nan"])
def test_soak_with_bad_load_factors_exits_2(capsys, factors):
    code, err = run(capsys, "bench", "soak", "--load-factors", factors)
    assert code == 2 and "--load-factors" in err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--device", "gpu0"], "device must be"),
        (["--device", "cuda"], "CUDA is not available"),
        (["--quantization", "4bit"], "need a CUDA GPU"),
    ],
)
def test_replica_device_flags_exit_2_naming_the_problem(capsys, flags, message):
    import torch

    if torch.cuda.is_available() and "gpu0" not in flags:
        pytest.skip("CUDA present")
    code, err = run(capsys, "replica", "--control-token", "t", *flags)
    assert code == 2 and message in err


def test_replica_without_a_control_token_exits_2(capsys, monkeypatch):
    monkeypatch.delenv("COLLM_CONTROL_TOKEN", raising=False)
    code, err = run(capsys, "replica")
    assert code == 2 and "control token" in err


def test_versions_of_an_unknown_run_exits_2(capsys, tmp_path):
    from collm_fl.store import VersionStore

    VersionStore(tmp_path).close()  # a store where no run of that name ran
    code, err = run(capsys, "versions", "--output-dir", str(tmp_path), "--run-name", "nope")
    assert code == 2 and "no run named 'nope'" in err


def test_versions_where_nothing_ran_exits_2_and_creates_nothing(capsys, tmp_path):
    where = tmp_path / "nothing"
    code, err = run(capsys, "versions", "--output-dir", str(where), "--run-name", "x")
    assert code == 2 and f"no run store in {where}" in err
    assert not where.exists()


def test_load_with_a_bad_trace_exits_2_naming_the_line(capsys, tmp_path):
    trace = tmp_path / "trace.csv"
    trace.write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.6805900,10,5\nbad,row\n"
    )
    code, err = run(
        capsys,
        "load",
        "--target",
        "http://127.0.0.1:9",
        "--model",
        "m",
        "--trace",
        str(trace),
        "--out",
        str(tmp_path / "out"),
    )
    assert code == 2 and "trace.csv:3" in err


@pytest.mark.parametrize("target", ["http://127.0.0.1:99999", "http://", "ftp://host:1"])
def test_load_against_a_malformed_target_exits_2(capsys, tmp_path, target):
    out = str(tmp_path / "out")
    code, err = run(capsys, "load", "--target", target, "--model", "m", "--out", out)
    assert code == 2 and "target must look like http://host:port" in err


def test_load_with_an_unknown_arrival_process_names_the_flag(capsys, tmp_path):
    out = str(tmp_path / "out")
    args = ["--target", "http://127.0.0.1:1", "--model", "m", "--out", out]
    code, err = run(capsys, "load", *args, "--arrivals", "burst")
    assert code == 2 and "--arrivals: unknown arrival process 'burst'" in err


def test_load_where_nothing_answers_says_why(capsys, tmp_path, monkeypatch):
    import collm_fl.loadgen as loadgen
    from collm_fl.launch import free_port

    said: list[str] = []
    monkeypatch.setattr(loadgen.log, "error", lambda msg, *args: said.append(msg % args))
    target = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    args = ["--target", target, "--model", "m", "--duration", "2", "--rate", "5"]
    code, _ = run(capsys, "load", *args, "--out", str(tmp_path / "out"))
    assert code == 1 and len(said) == 1
    assert "the first error: error: ConnectError" in said[0]


@pytest.mark.parametrize("flag", ["--trace", "--tokenizer"])
@pytest.mark.parametrize("value", ["", "  "], ids=["empty", "blank"])
def test_load_with_an_empty_trace_or_tokenizer_exits_2_naming_the_flag(
    capsys, tmp_path, flag, value
):
    # Empty is not "not given": it replayed Poisson arrivals, or counted words, instead.
    out = tmp_path / "out"
    args = ["--target", "http://127.0.0.1:9", "--model", "m", "--rate", "5", "--duration", "1"]
    code, err = run(capsys, "load", *args, flag, value, "--out", str(out))
    assert code == 2 and f"{flag} must name" in err and "empty" in err
    assert not out.exists()


def test_load_into_an_existing_file_exits_2(capsys, tmp_path):
    taken = tmp_path / "taken"
    taken.write_text("")
    target = "http://127.0.0.1:9"
    code, err = run(capsys, "load", "--target", target, "--model", "m", "--out", str(taken))
    assert code == 2 and "is not a directory" in err


def test_live_with_a_bad_rate_exits_2(capsys):
    code, err = run(capsys, "live", "--rate", "0")
    assert code == 2 and "--rate" in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--rate", "nan"], "--rate must be a finite number > 0"),
        (["--rate", "inf"], "--rate must be a finite number > 0"),
        (["--local-steps", "0"], "--local-steps must be >= 1"),
        (["--output-tokens", "-3"], "--output-tokens must be >= 1"),
        (["--arrivals", "bogus"], "bogus"),
    ],
)
def test_live_with_bad_load_or_training_settings_exits_2_before_starting(capsys, args, message):
    code, err = run(capsys, "live", *args)
    assert code == 2 and message in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["bench", "aggregation", "--layers", "0"], "--layers must be >= 1"),
        (["bench", "aggregation", "--rank", "0"], "--rank must be >= 1"),
        (["bench", "aggregation", "--dim", "4", "--rank", "8"], "must not exceed --dim"),
        (["bench", "soak", "--duration", "nan"], "--duration > 0"),
        (["bench", "goodput", "--rates", "1,1"], "each rate once"),
    ],
)
def test_benchmarks_with_bad_settings_exit_2_before_running(capsys, args, message):
    code, err = run(capsys, *args)
    assert code == 2 and message in err


def test_live_into_an_existing_file_exits_2(capsys, tmp_path):
    taken = tmp_path / "taken"
    taken.write_text("")
    code, err = run(capsys, "live", "--out", str(taken))
    assert code == 2 and "is not a directory" in err


def test_live_with_a_lend_share_out_of_range_exits_2(capsys):
    code, err = run(capsys, "live", "--max-lend-share", "0.95")
    assert code == 2 and "--max-lend-share must be in [0, 0.9], got 0.95" in err
    code, err = run(capsys, "live", "--lend-early")
    assert code == 2 and "--lend-early lends nothing with --max-lend-share 0" in err


@pytest.mark.parametrize("value", ["0", "-5", "nan"])
def test_gateway_with_a_stall_timeout_not_above_zero_exits_2(capsys, value):
    code, err = run(
        capsys, "gateway", "--replica", "http://127.0.0.1:1", "--stream-stall-timeout", value
    )
    assert code == 2 and "--stream-stall-timeout must be > 0" in err


@pytest.mark.parametrize("value", ["0", "-1", "inf"])
def test_gateway_with_a_body_timeout_not_a_positive_number_exits_2(capsys, value):
    code, err = run(capsys, "gateway", "--replica", "http://127.0.0.1:1", "--body-timeout", value)
    assert code == 2
    assert f"--body-timeout must be a finite number of seconds > 0, got {value}" in err


@pytest.mark.parametrize("value", ["0.5", "-1", "nan", "inf"])
@pytest.mark.parametrize("command", ["gateway", "live"])
def test_a_shed_factor_neither_0_nor_at_least_1_exits_2(capsys, tmp_path, value, command):
    where = ["--replica", "http://127.0.0.1:1"] if command == "gateway" else []
    if command == "live":
        where = ["--model", "tiny", "--out", str(tmp_path / "live")]
    code, err = run(capsys, command, *where, "--shed-factor", value)
    assert code == 2 and "--shed-factor must be 0 (off) or a finite number >= 1" in err


@pytest.mark.parametrize(
    "sub", ["prepare", "federate", "site", "live", "gateway", "load", "replica"]
)
def test_every_command_has_help(sub, capsys):
    code, out, _ = run_out(capsys, sub, "--help")
    assert code == 0
    assert out.startswith("usage: collm " + sub)


def test_server_lr_benchmark_refuses_bad_values_with_exit_2(capsys, tmp_path):
    code, err = run(capsys, "bench", "server-lr", "--server-lrs", "1,x", "--out", str(tmp_path))
    assert code == 2 and "--server-lrs must be comma-separated numbers" in err
    code, err = run(capsys, "bench", "server-lr", "--server-lrs", "0", "--out", str(tmp_path))
    assert code == 2 and "server lrs must be in (0, 16]" in err
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("sub", ["gateway", "replica"])
def test_a_nan_slo_exits_2(capsys, sub):
    extra = ["--replica", "http://127.0.0.1:1"] if sub == "gateway" else ["--control-token", "t"]
    code, err = run(capsys, sub, *extra, "--ttft-slo", "nan")
    assert code == 2 and "--ttft-slo and --tpot-slo must be finite numbers > 0" in err


@pytest.mark.parametrize("command", ["site", "live", "federate"])
def test_a_bad_run_config_exits_2_before_anything_starts(
    capsys, tmp_path, tmp_path_factory, monkeypatch, command
):
    # (federate reads Flower's configuration first: its own, never the user's ~/.flwr)
    monkeypatch.setenv("FLWR_HOME", str(tmp_path_factory.mktemp("flwr-home")))
    out = ["--out", str(tmp_path / "live")] if command == "live" else []
    workdir = ["--workdir", str(tmp_path / "site")] if command == "site" else []
    code, err = run(capsys, command, *out, *workdir, "-c", "lora-rank=0")
    assert code == 2 and "lora-rank must be >= 1" in err
    code, err = run(capsys, command, *out, *workdir, "-c", "local-steps=2 rounds 5")
    assert code == 2 and "not key=value: 'rounds 5'" in err
    code, err = run(capsys, command, *out, *workdir, "-c", "num-server-round=2")
    assert code == 2
    assert "unknown key 'num-server-round' (did you mean 'num-server-rounds'?)" in err
    assert "Traceback" not in err
    assert list(tmp_path.iterdir()) == []  # nothing was started or written


def test_collm_site_keeps_its_run_under_its_workdir_unless_told(capsys, tmp_path, monkeypatch):
    # Not in the app's `outputs`, where `flwr run .` keeps a run of the same name: following
    # the docs' examples in order, `collm site` resumed that finished run and trained nothing.
    import collm_fl.federate
    import collm_fl.launch

    asked: list[str] = []

    class Site:  # (the processes are not what is tested here)
        def __init__(self, workdir, *args, **kwargs):
            self.replicas = []

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def flwr_run(self, run_config, app, min_nodes=1):
            asked.append(run_config)
            return 0

    monkeypatch.setattr(collm_fl.launch, "LocalFederation", Site)
    monkeypatch.setattr(collm_fl.federate, "run_outcome", lambda *args: 0)
    workdir = tmp_path / "site"
    code, err = run(capsys, "site", "--workdir", str(workdir), "-c", "num-server-rounds=1")
    assert code == 0, err
    assert f"output-dir='{workdir / 'federation'}'" in asked[-1]
    elsewhere = tmp_path / "mine"
    code, err = run(capsys, "site", "--workdir", str(workdir), "-c", f"output-dir='{elsewhere}'")
    assert code == 0, err
    assert f"output-dir='{elsewhere}'" in asked[-1]


def test_collm_site_refuses_a_foreign_flower_app_folder_before_starting_anything(
    capsys, tmp_path, monkeypatch
):
    import collm_fl.launch

    started = []
    monkeypatch.setattr(
        collm_fl.launch.LocalFederation, "_start_superlink", lambda *a: started.append(1)
    )
    mine = tmp_path / "site" / "flower-app"
    mine.mkdir(parents=True)
    (mine / "notes.txt").write_text("mine")
    code, err = run(capsys, "site", "--workdir", str(tmp_path / "site"), "--replicas", "1")
    assert code == 2 and "exists and is not a copy of the app collm made: kept" in err
    assert started == [] and sorted(p.name for p in (tmp_path / "site").iterdir()) == ["flower-app"]
    assert (mine / "notes.txt").read_text() == "mine"


@pytest.fixture()
def taken_port():
    """A loopback port something is listening on."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def test_a_replica_on_a_port_in_use_exits_2_before_loading_anything(capsys, taken_port, tmp_path):
    from collm_fl.launch import free_port

    store = ["--store-dir", str(tmp_path / "store")]
    code, err = run(capsys, "replica", "--control-token", "t", "--port", str(taken_port), *store)
    assert code == 2 and f"--port: cannot listen on 127.0.0.1:{taken_port}" in err
    assert "Traceback" not in err and not (tmp_path / "store").exists()
    same = str(free_port())
    code, err = run(
        capsys, "replica", "--control-token", "t", "--port", same, "--control-port", same, *store
    )
    assert code == 2 and f"--control-port and --port are both 127.0.0.1:{same}" in err


def test_a_gateway_on_a_port_in_use_exits_2(capsys, taken_port):
    code, err = run(capsys, "gateway", "--replica", "http://127.0.0.1:1", "--port", str(taken_port))
    assert code == 2 and f"--port: cannot listen on 127.0.0.1:{taken_port}" in err


def test_a_replica_store_that_cannot_be_created_exits_2(capsys, tmp_path):
    from collm_fl.launch import free_port

    (tmp_path / "file").write_text("")
    ports = ["--port", str(free_port()), "--control-port", str(free_port())]
    bad = str(tmp_path / "file" / "store")
    code, err = run(capsys, "replica", "--control-token", "t", *ports, "--store-dir", bad)
    assert code == 2 and f"--store-dir: cannot create {bad}" in err


def test_help_shows_each_options_default(capsys):
    code, out, _ = run_out(capsys, "gateway", "--help")
    assert code == 0
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith("  --")}
    assert "default: 8000" in lines["--port"] and "default: 2.0" in lines["--ttft-slo"]
    code, out, _ = run_out(capsys, "bench", "forecast", "--help")
    assert "the first series' seed (default: 0)" in out  # a default of 0 is still shown


def test_a_replica_whose_two_ports_overlap_through_a_wildcard_host_exits_2(capsys, tmp_path):
    from collm_fl.launch import free_port

    port = str(free_port())
    code, err = run(
        capsys,
        "replica",
        "--control-token",
        "t",
        "--host",
        "0.0.0.0",
        "--port",
        port,
        "--control-port",
        port,
        "--store-dir",
        str(tmp_path / "store"),
    )
    assert code == 2
    assert f"--control-port (127.0.0.1:{port}) and --port (0.0.0.0:{port}) overlap" in err
    assert not (tmp_path / "store").exists()


def test_load_that_schedules_no_request_exits_2(capsys, tmp_path):
    args = ["--target", "http://127.0.0.1:9", "--model", "m", "--out", str(tmp_path / "out")]
    code, err = run(capsys, "load", *args, "--rate", "0.001", "--duration", "1")
    assert code == 2 and "no request to send" in err and "--rate" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--rate", "nan"], "--rate must be a finite number"),
        (["--prompt-tokens", "0"], "--prompt-tokens must be >= 1"),
        (["--rate", "2"], "--rate 0 replays it as recorded"),  # one request: no rate to rescale
    ],
)
def test_load_with_a_trace_names_the_flag_at_fault(capsys, tmp_path, flags, message):
    trace = tmp_path / "one.csv"
    trace.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.68,10,5\n")
    args = ["--target", "http://127.0.0.1:9", "--model", "m", "--trace", str(trace)]
    code, err = run(capsys, "load", *args, *flags, "--out", str(tmp_path / "out"))
    assert code == 2 and message in err


def test_port_overlap_knows_which_wildcard_covers_which_family():
    from collm_fl.errors import ConfigError
    from collm_fl.launch import check_ports_free, free_port

    port = free_port()
    with pytest.raises(ConfigError, match="'::' listens on every address"):
        check_ports_free(("--a", "::", port), ("--b", "127.0.0.1", port))
    with pytest.raises(ConfigError, match=r"--c and --b are both 127\.0\.0\.2"):
        check_ports_free(
            ("--a", "127.0.0.1", port), ("--b", "127.0.0.2", port), ("--c", "127.0.0.2", port)
        )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["gateway", "--port", "70000", "--replica", "http://127.0.0.1:1"], "port must be in"),
        (["live", "--model", "tiny", "--seed", "-1"], "--seed must be >= 0"),
        (["live", "--model", "tiny", "--arrivals", "foo"], "--arrivals must be one of"),
        (["live", "--model", "tiny", "--ttft-slo", "nan"], "--ttft-slo must be a finite"),
        (["load", "--target", "http://x:1", "--model", "m", "--seed", "-1"], "--seed must be >="),
        (["load", "--target", "http://x:1", "--model", "m", "--rate", "-1"], "--rate must be a"),
        (["load", "--target", "http://x:1", "--model", "m", "--rate", "nan"], "--rate must be a"),
        (
            ["load", "--target", "http://x:1", "--model", "m", "--duration", "0"],
            "--duration must be a finite number > 0",
        ),
        (
            ["load", "--target", "http://x:1", "--model", "m", "--rate", "1e6", "--duration", "10"],
            "--rate × --duration = 10000000 requests exceeds 5000000",
        ),
    ],
)
def test_bad_values_are_named_by_their_flag_without_a_traceback(capsys, tmp_path, argv, message):
    code, err = run(
        capsys, *argv, *(["--out", str(tmp_path / "o")] if argv[0] != "gateway" else [])
    )
    assert code == 2 and message in err and "Traceback" not in err


def test_live_outside_a_flower_app_says_so(capsys, tmp_path):
    code, err = run(
        capsys, "live", "--model", "tiny", "--app", str(tmp_path), "--out", str(tmp_path / "o")
    )
    assert code == 2 and "not a Flower app" in err and "Traceback" not in err


def test_live_with_an_out_that_cannot_be_created_names_out(capsys, tmp_path):
    (tmp_path / "file").write_text("x")
    code, err = run(capsys, "live", "--model", "tiny", "--out", str(tmp_path / "file" / "sub"))
    assert code == 2 and "--out: cannot make the folder" in err and "is not a directory" in err


def test_live_refuses_a_store_url_its_report_would_not_read(capsys, tmp_path):
    code, err = run(
        capsys,
        "live",
        "--model",
        "tiny",
        "--out",
        str(tmp_path),
        "-c",
        "store-url='sqlite:///x.db'",
    )
    assert code == 2 and "store-url" in err


def test_bench_quality_on_a_folder_where_nothing_ran_creates_no_store(capsys, tmp_path):
    code, err = run(capsys, "bench", "quality", "--output-dir", str(tmp_path / "typo"))
    assert code == 2 and "nothing ran there" in err
    assert not (tmp_path / "typo").exists()


def test_the_local_stack_gets_one_api_key_or_none(tmp_path, monkeypatch):
    from collm_fl.launch import LocalFederation

    monkeypatch.setenv("COLLM_API_KEY", "stray")
    monkeypatch.setenv("COLLM_REPLICA_API_KEY", "stray-too")
    env = LocalFederation(tmp_path, 1, 0, model="tiny").env()
    assert "COLLM_API_KEY" not in env and "COLLM_REPLICA_API_KEY" not in env
    env = LocalFederation(tmp_path, 1, 0, model="tiny", api_key="k").env()
    assert env["COLLM_API_KEY"] == env["COLLM_REPLICA_API_KEY"] == "k"


def test_live_refuses_a_flag_and_run_config_that_disagree_naming_the_flag(capsys, tmp_path):
    code, err = run(
        capsys, "live", "--model", "tiny", "--out", str(tmp_path), "--local-steps", "3",
        "-c", "local-steps=5",
    )  # fmt: skip
    assert code == 2 and "local-steps (use --local-steps): set by this command" in err


@pytest.mark.parametrize(
    ("error", "code"),
    [("ConfigError", 2), ("DataFormatError", 2), ("LaunchError", 1), ("ReplicaUnavailable", 1)],
)
def test_bad_input_exits_2_and_a_failure_of_the_work_exits_1(capsys, monkeypatch, error, code):
    import collm_fl.cli as cli
    from collm_fl import errors
    from collm_fl.launch import LaunchError
    from collm_fl.replica.control_client import ReplicaUnavailable

    kinds = {"LaunchError": LaunchError, "ReplicaUnavailable": ReplicaUnavailable}
    kind = kinds.get(error) or getattr(errors, error)
    made = kind("site.jsonl", "bad") if error == "DataFormatError" else kind("what went wrong")

    def fail(_args: object) -> int:
        raise made

    monkeypatch.setattr(cli, "dispatch", fail)
    got, err = run(capsys, "prepare")
    assert got == code and err.startswith("collm: error: ") and str(made) in err


def test_a_hang_up_stops_a_launcher_as_sigterm_does_unless_it_is_ignored(capsys, monkeypatch):
    """SIGHUP (the terminal or SSH session gone) unwinds a command that starts processes like
    Ctrl-C, so it stops what it started; under nohup (ignored) it stays ignored."""
    import signal

    from collm_fl import cli

    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGHUP, signal.SIGTERM)}
    try:
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        run(capsys, "bench", "goodput-runs", "/nonexistent")
        assert signal.getsignal(signal.SIGHUP) is cli._hung_up
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # nohup
        run(capsys, "bench", "goodput-runs", "/nonexistent")
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def test_an_output_folder_that_cannot_be_made_exits_2_before_any_work(capsys, tmp_path):
    # Found when the report was written, at the end: an hour's benchmark lost to a traceback.
    from pathlib import Path

    taken = tmp_path / "report.md"
    taken.write_text("not a folder")
    saved = Path(__file__).parents[2] / "docs" / "bench" / "goodput.json"
    code, err = run(capsys, "bench", "goodput", "--from-json", str(saved), "--out", str(taken))
    assert code == 2 and f"--out: {taken} is not a directory" in err, err
    code, err = run(capsys, "site", "--workdir", str(taken / "site"))
    assert code == 2 and f"--workdir: cannot make the folder {taken / 'site'}" in err, err
    code, err = run(capsys, "live", "--out", str(taken / "live"))
    assert code == 2 and f"--out: cannot make the folder {taken / 'live'}" in err, err
    load = ("load", "--target", "http://127.0.0.1:9", "--model", "m")
    code, err = run(capsys, *load, "--out", str(taken))
    assert code == 2 and f"--out: {taken} is not a directory" in err, err
    assert taken.read_text() == "not a folder"
    # Nothing made by the check: a folder to be is left for the command to make.
    fresh = tmp_path / "new" / "report"
    assert run(capsys, "bench", "goodput-runs", "--out", str(fresh))[0] == 2  # (no run given)
    assert not (tmp_path / "new").exists()


def test_after_a_hang_up_the_command_can_still_write_its_report_lines():
    """A terminal that hung up is no longer a tty (``isatty()`` fails with EIO) and every write to
    it fails: kept as it was, the first line of "interrupted: writing the report" raised, and
    the report was never written. Here in a child process whose stdout is a pty that hangs up."""
    import subprocess
    import sys

    code = """
import os, signal, sys
from collm_fl import cli
master, slave = os.openpty()
os.dup2(slave, 1)
os.close(slave)
os.close(master)  # the terminal hangs up
hung = not os.isatty(1)
try:
    os.write(1, b"x")
    sys.exit(4)  # (not hung up after all: the test would prove nothing)
except OSError:
    pass
try:
    cli._hung_up(signal.SIGHUP, None)
except KeyboardInterrupt:
    pass
print("interrupted: writing the report of the rounds so far", flush=True)
sys.exit(0 if hung else 3)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr.decode()


def test_federate_on_a_remote_default_connection_exits_2_and_starts_no_superlink(
    capsys, tmp_path, monkeypatch
):
    from collm_fl.federate import find_local_superlinks

    home = tmp_path / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(
        '[superlink]\ndefault = "site"\n\n[superlink.site]\naddress = "10.0.0.7:9093"\n'
    )
    monkeypatch.setenv("FLWR_HOME", str(home))
    code, err = run(capsys, "federate", "--supernodes", "2")
    assert code == 2 and "'site' (the default) is 10.0.0.7:9093, not the local" in err
    assert "Traceback" not in err
    code, err = run(capsys, "federate", "--connection", "local")
    assert code == 2 and "SuperLink connection 'local' not found" in err
    assert find_local_superlinks(home) == [] and not (home / "local-superlink").exists()
