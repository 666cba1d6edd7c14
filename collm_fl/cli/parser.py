"""The ``collm`` argument parser: every command, its flags and their help."""

from __future__ import annotations

import argparse

from collm_fl.api.limits import DEFAULT_BODY_TIMEOUT_S
from collm_fl.policies.scheduling import DEFAULT_DEFER_LIMIT_S, SCHEDULES


def _positive_int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from e
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


class _DefaultsFormatter(argparse.HelpFormatter):
    """Help that shows each option's default (unless it says it itself, or there is none)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if not action.option_strings or "default" in text.lower() or not _shows(action.default):
            return text
        return f"{text} (default: %(default)s)"


def _shows(default: object) -> bool:
    """Whether a default says something in help (not None, False, '' or suppressed)."""
    return not (
        default is None or default is False or default is argparse.SUPPRESS or default == ""
    )


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose sub-command parsers (of its own type) show defaults too."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        kwargs.setdefault("formatter_class", _DefaultsFormatter)
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]

    def add_argument(self, *args: object, **kwargs: object) -> argparse.Action:  # type: ignore[override]
        action = super().add_argument(*args, **kwargs)  # type: ignore[arg-type]
        if action.help is None and action.option_strings and _shows(action.default):
            action.help = "default: %(default)s"  # (argparse prints nothing for an option
        return action  # without help, not even its default)


def _body_timeout_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--body-timeout",
        type=float,
        default=DEFAULT_BODY_TIMEOUT_S,
        help="seconds a client may stop sending its request body before the request is answered "
        "with a 408 and the connection closed (a slow client cannot hold a server task)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
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
        "--connection",
        default=None,
        help="a local SuperLink connection of the Flower configuration ($FLWR_HOME/config.toml; "
        "address :local: or :local-in-memory:); default: its default connection",
    )
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
    p.add_argument(
        "--device",
        default="cpu",
        help="where the model runs: cpu, cuda, cuda:N or auto (cuda when available, else cpu)",
    )
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
    p.add_argument(
        "--partitioning",
        default="play",
        help="how --data is split into --num-partitions parts: play, character, iid, dirichlet",
    )
    p.add_argument("--partition-id", type=int, default=0)
    p.add_argument("--num-partitions", type=int, default=1)
    p.add_argument("--dirichlet-alpha", type=float, default=0.5, help="with dirichlet")
    p.add_argument(
        "--central-heldout",
        type=int,
        default=None,
        help="the server's held-out part, never trained on: plays of shakespeare (default 2, as "
        "the run config's), or for a path > 0 = 10 %% of its distinct records (default 0: a "
        "site's own file is not the server's held-out set)",
    )
    p.add_argument(
        "--max-samples-per-client", type=int, default=0, help="cap on the partition (0 = all)"
    )
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--train-batch-size", type=int, default=4)
    p.add_argument("--ttft-slo", type=float, default=2.0, help="seconds")
    p.add_argument("--tpot-slo", type=float, default=0.2, help="seconds per output token")
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--max-queue", type=int, default=64)
    p.add_argument(
        "--schedule",
        choices=SCHEDULES,
        default="slo",
        help="admission order: slo = requests that can still meet --ttft-slo first (late ones "
        "fill spare rows, none waits past --defer-limit); fcfs = first come, first served",
    )
    p.add_argument(
        "--defer-limit",
        type=float,
        default=DEFAULT_DEFER_LIMIT_S,
        help="seconds: with --schedule slo, a request waiting this long is admitted next",
    )
    p.add_argument("--training-share", type=float, default=0.5)
    p.add_argument(
        "--max-lend-share",
        type=float,
        default=0.0,
        help="share of serving's time (0..0.9) the engine may rest for a training job behind "
        "its round's plan, up to the training share; 0 (default) = training runs on idle "
        "moments alone",
    )
    p.add_argument(
        "--lend-early",
        action="store_true",
        help="with --max-lend-share: lend a round's plan its share from the round's start until "
        "it is done (its version comes sooner), not only as late as the deadline allows",
    )
    p.add_argument(
        "--trainer-nice",
        type=int,
        default=0,
        help="nice value of the thread running training steps (0..19; default 0: steps give way "
        "to serving at every layer themselves; higher also puts them behind other processes)",
    )
    p.add_argument(
        "--keep-versions",
        type=int,
        default=16,
        help="received versions kept on disk (the newest, and always the served one); 0 = all",
    )
    p.add_argument(
        "--cpus", default="", help="pin the replica to these cores, e.g. 0 or 0-1 (default: all)"
    )
    _body_timeout_arg(p)
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--lora-alpha", type=float, default=16.0)
    p.add_argument("--lora-targets", default="q_proj,v_proj")
    p.add_argument("--lora-dropout", type=float, default=0.0, help="LoRA dropout while training")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--canary-check",
        action="store_true",
        help="run a canary forward through each new version before promoting it",
    )

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
    p.add_argument(
        "--ignore-eos",
        action="store_true",
        help="ask for every request's whole output length (vLLM's ignore_eos, which collm "
        "replica and gateway take; OpenAI's API refuses it): a trace's lengths, not caps",
    )
    p.add_argument(
        "--tokenizer",
        default=None,
        help="count prompt lengths in this model's tokens (a model as collm replica --model "
        "takes it: smollm2-135m, an HF id or a local path); default: words (~1.3 tokens each)",
    )
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
    p.add_argument(
        "--replica-api-key",
        default=None,
        help="key for the replicas' /v1 API (default: $COLLM_REPLICA_API_KEY, else --api-key)",
    )
    p.add_argument("--ttft-slo", type=float, default=2.0)
    p.add_argument("--tpot-slo", type=float, default=0.2)
    p.add_argument(
        "--stream-stall-timeout",
        type=float,
        default=60.0,
        help="seconds a replica's stream may send nothing, once its response headers came, "
        "before it is treated as failed (failed over before its first token, ended with an "
        "error chunk after); a stream still queued for admission is not stalled",
    )
    p.add_argument(
        "--shed-factor",
        type=float,
        default=0.0,
        help="admission control: refuse a request at once (503 with Retry-After) when every "
        "replica's predicted TTFT exceeds this × --ttft-slo; 0 = off (default), else >= 1. "
        "Never sheds before the gateway has measured a replica, nor a failover retry",
    )
    _body_timeout_arg(p)

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
    p.add_argument(
        "--local-steps",
        type=int,
        default=None,
        help="micro-steps per node and round (default: the app's local-steps, or -c's)",
    )
    p.add_argument("--rate", type=float, default=0.5, help="requests/s offered to the gateway")
    p.add_argument("--arrivals", default="bursty", help="poisson, bursty, onoff or diurnal")
    p.add_argument("--prompt-tokens", type=int, default=48)
    p.add_argument("--output-tokens", type=int, default=24)
    p.add_argument("--ttft-slo", type=float, default=5.0)
    p.add_argument("--tpot-slo", type=float, default=0.5)
    p.add_argument(
        "--max-lend-share",
        type=float,
        default=0.0,
        help="the replicas' --max-lend-share (0..0.9): serving lends a round's plan that falls "
        "behind up to this share; with -c 'min-training-share=0.45', quality first",
    )
    p.add_argument(
        "--lend-early",
        action="store_true",
        help="the replicas' --lend-early: lend from the round's start until its plan is done",
    )
    p.add_argument(
        "--shed-factor",
        type=float,
        default=0.0,
        help="the gateway's --shed-factor: refuse (503) a request predicted to miss this x "
        "--ttft-slo on every replica; 0 = off (default), else >= 1",
    )
    p.add_argument("--out", default="outputs/live")
    p.add_argument("-c", "--run-config", default="", help="extra run-config overrides")
    p.add_argument(
        "--seed", type=int, default=0, help="the load schedule's (the run's own: -c seed=...)"
    )

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

    b = bsub.add_parser(
        "replica", help="replica: swap stall, memory, unmerged cost, training interference"
    )
    b.add_argument("--model", default="smollm2-135m")
    b.add_argument("--only", default="swap,memory,unmerged,interference", help="comma list")
    b.add_argument("--quick", action="store_true", help="smoke-size run (use with --model tiny)")
    b.add_argument("--out", default="docs/bench")

    b = bsub.add_parser(
        "goodput",
        help="CoLLM-FL vs separate / co-located / merged / rolling: same replicas, trace, budget",
    )
    b.add_argument(
        "--model", default="smollm2-135m", help="'tiny', 'smollm2-135m', an HF id or a local path"
    )
    b.add_argument("--replicas", type=int, default=2, help="replicas per system (each pinned)")
    b.add_argument(
        "--rates",
        default="",
        help="comma list of req/s (default: 10, 25, 50 %% of the replicas' calibrated capacity)",
    )
    b.add_argument("--rounds", type=int, default=3, help="federated rounds per system and rate")
    b.add_argument(
        "--duration-per-round", type=float, default=90.0, help="seconds of load per round"
    )
    b.add_argument(
        "--arrivals",
        default="bursty",
        help="poisson | bursty (gamma, CV 4) | onoff | diurnal",
    )
    b.add_argument("--trace", default=None, help="Azure-format CSV trace instead of arrivals")
    b.add_argument("--slo-factor", type=float, default=5.0, help="SLO = factor × unloaded latency")
    b.add_argument("--quick", action="store_true", help="smoke run: tiny model, 1 rate, 1 round")
    b.add_argument("--seed", type=int, default=0, help="arrivals, prompts and data order")
    b.add_argument(
        "--server-lr",
        type=float,
        default=1.0,
        help="server learning rate η wherever a round averages 2+ updates (any system): "
        "global + η·(aggregate − global); 1 = FedAvg. One update alone (the separate system's "
        "one trainer, or a round where one replica trained) is applied as it is",
    )
    b.add_argument(
        "--shed-factor",
        type=float,
        default=0.0,
        help="CoLLM-FL's gateway refuses (503) a request whose best predicted TTFT exceeds this "
        "x the TTFT SLO (collm gateway --shed-factor); 0 = off",
    )
    b.add_argument(
        "--systems",
        default="",
        help="comma list of the systems to run (default: separate, colocated, merged, rolling, "
        "collm-fl, collm-fl-fcfs, collm-fl-quality; also collm-fl-fresh, collm-fl-turns), "
        "rotated by one at each rate; at least one baseline and one CoLLM-FL",
    )
    b.add_argument("--out", default="docs/bench", help="where the report, JSON and plots go")
    b.add_argument(
        "--from-json",
        default=None,
        help="no run: write the report (markdown, plots) again from this goodput.json",
    )

    b = bsub.add_parser(
        "goodput-runs",
        help="several goodput runs (other --seed) side by side: the spread of the goodput ratio",
    )
    b.add_argument(
        "runs", nargs="+", help="goodput.json files, or directories holding one (same settings)"
    )
    b.add_argument(
        "--out", default="docs/bench", help="where goodput-runs.{md,json} and goodput_runs.png go"
    )

    b = bsub.add_parser(
        "soak", help="gateway + replicas at and above capacity with adapter swaps: errors, RSS"
    )
    b.add_argument("--model", default="tiny", help="the replicas' base model")
    b.add_argument("--replicas", type=int, default=2, help="replicas behind the gateway")
    b.add_argument(
        "--duration", type=float, default=240.0, help="seconds of load after calibration"
    )
    b.add_argument("--swap-every", type=float, default=0.5, help="seconds between adapter pushes")
    b.add_argument(
        "--load-factors",
        default="1,2",
        help="load phases as multiples of capacity, equal shares of --duration (e.g. 1,2,1)",
    )
    b.add_argument("--out", default="docs/bench", help="where soak.md, soak.json and the plot go")

    b = bsub.add_parser("quality", help="central held-out perplexity: base vs stored versions")
    b.add_argument("--output-dir", default="outputs", help="the run's output-dir")
    b.add_argument("--store-url", default="")
    b.add_argument("--run-name", default="default")
    b.add_argument("--out", default="", help="report dir (default: <output-dir>/reports)")

    b = bsub.add_parser(
        "server-lr",
        help="held-out loss per round: K clients x s steps averaged with server lr eta, "
        "against one client running K*s steps",
    )
    b.add_argument("--model", default="smollm2-135m")
    b.add_argument("--clients", type=int, default=2, help="clients averaged each round (K)")
    b.add_argument("--rounds", type=int, default=3)
    b.add_argument("--steps", type=int, default=5, help="steps per client and round (s)")
    b.add_argument("--server-lrs", default="1,2,3,4", help="comma list of eta to measure")
    b.add_argument("--out", default="docs/bench", help="where server_lr.{md,json} go")

    b = bsub.add_parser(
        "forecast",
        help="one-round-ahead error of the allocation's rate forecast over a grid of its "
        "smoothing weights, on the arrival processes (and a trace)",
    )
    b.add_argument("--rounds", type=int, default=240, help="rounds per series")
    b.add_argument("--round-s", type=float, default=60.0, help="seconds per round")
    b.add_argument("--rate", type=float, default=1.0, help="mean request rate (req/s)")
    b.add_argument("--seeds", type=int, default=5, help="series per process")
    b.add_argument("--seed", type=int, default=0, help="the first series' seed")
    b.add_argument("--alphas", default="", help="comma list of alpha (default 0.1..1.0)")
    b.add_argument("--betas", default="", help="comma list of beta (default 0..0.7)")
    b.add_argument("--trace", default="", help="also score an Azure-format CSV trace")
    b.add_argument("--out", default="docs/bench", help="where forecast.{md,json,png} go")
    return parser
