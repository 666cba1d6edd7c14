"""Run configuration: every run-time knob of a federated run, validated in one place.

The same keys appear in ``[tool.flwr.app.config]`` of pyproject.toml, in ``flwr run -c "..."``
overrides, and in the ``collm`` CLI. :func:`RunConfig.from_flower` turns Flower's flat
``context.run_config`` into a typed, validated object; a bad value raises ``ConfigError`` naming
the key, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from collm_fl.adapters import MAX_SERVER_LR, LoraSpec
from collm_fl.data.partition import DataSpec
from collm_fl.errors import ConfigError

Scalar = str | int | float | bool
AGGREGATION_MODES = ("exact", "fedavg")
ROBUST_AGGREGATIONS = ("none", "median", "trimmed-mean")
ALLOCATIONS = ("quality-aware", "static")
# One key=value pair of a run-config string, as Flower's parse_config_args reads it.
_CONFIG_PAIR = re.compile(r"(\S+?)=('[^']*'|\"[^\"]*\"|\S+)")


@dataclass(frozen=True)
class RunConfig:
    """All knobs of a federated LoRA run (kebab-case keys in Flower's run config)."""

    model: str = "smollm2-135m"  # "tiny", "smollm2-135m", an HF id or a local path
    quantization: str = "none"  # "none" | "4bit" | "8bit" (bitsandbytes, CUDA only)
    device: str = "cpu"  # where clients train and the server evaluates: cpu | cuda | cuda:N | auto
    data: str = "shakespeare"  # "shakespeare" or a path to JSON/JSONL/text data
    partitioning: str = "play"  # "play" | "character" | "iid" | "dirichlet"
    dirichlet_alpha: float = 0.5
    heldout_fraction: float = 0.0  # per-client tail kept from training for a local evaluate
    central_heldout: int = 2  # plays reserved for the server's central evaluation
    max_samples_per_client: int = 0  # 0 = all
    num_server_rounds: int = 3
    fraction_train: float = 1.0  # share of connected nodes sampled per round
    min_train_nodes: int = 2
    min_good_replies: int = 1  # fewer valid updates than this keeps the previous version
    local_steps: int = 10
    batch_size: int = 4
    seq_len: int = 128
    learning_rate: float = 5e-4
    lora: LoraSpec = field(default_factory=LoraSpec)
    aggregation: str = "exact"  # "exact" (SVD of the summed products) | "fedavg" (factors)
    max_update_norm: float = 50.0  # reject updates whose ||ΔBA||_F exceeds this; 0 = no bound
    robust_aggregation: str = "none"  # "median" | "trimmed-mean" of dense ΔBA instead of the mean
    trim_fraction: float = 0.2  # trimmed-mean: share of largest and of smallest values dropped
    max_weight_ratio: float = 0.0  # cap num-examples at this x the round median; 0 = no cap
    server_lr: float = 1.0  # η: new = ref + η·(aggregate − ref) over 2+ updates; 1 = FedAvg
    central_eval_samples: int = 48  # central held-out samples evaluated each round; 0 = all
    output_dir: str = "outputs"
    store_url: str = ""  # SQLAlchemy URL; "" = sqlite file in output-dir
    run_name: str = "default"  # resumes when a run of this name exists in the store
    seed: int = 0
    torch_threads: int = 0  # 0 = leave torch's default
    round_timeout: float = 3600.0  # seconds to wait for replies in a round
    publish_versions: bool = True  # push each new version to every node right after aggregation
    publish_timeout: float = 60.0  # seconds a publish waits for acknowledgements (<= round-timeout)
    allocation: str = "quality-aware"  # "quality-aware" (per-node budgets) | "static"
    backfill: bool = True  # replicas may train the rest of the round's target on idle cycles
    # (and while every request they hold has missed its TTFT SLO)
    train_in_turns: bool = False  # light load: replicas train one after another (allocation, 5.)
    # the least training share the allocation plans for a busy replica (AllocationInputs.min_share)
    min_training_share: float = 0.1
    round_deadline_s: float = 600.0  # training time a replica may take per round
    dp_noise_multiplier: float = 0.0  # > 0: Flower's client-side fixed-clipping DP (noise σ/C)
    dp_clipping_norm: float = 1.0  # L2 bound on each client's update (with DP on)
    dp_delta: float = 1e-5  # the δ at which the run's spent ε is reported (collm_fl.privacy)
    quality_gate_margin: float = 0.1  # nats a version may be worse than the best promoted; <0 = off
    ttft_slo_s: float = 2.0  # the replicas' TTFT objective, for the allocation policy
    tpot_slo_s: float = 0.2  # the replicas' TPOT objective

    def __post_init__(self) -> None:
        problems: list[str] = []

        def check(ok: bool, key: str, value: object, rule: str) -> None:
            if not ok:
                problems.append(f"{key}={value!r}: {rule}")

        for f in dataclasses.fields(self):  # NaN passes every comparison below: refuse it first
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                problems.append(f"{f.name.replace('_', '-')}={value!r}: must be a finite number")
        check(bool(self.model), "model", self.model, "must not be empty")
        check(
            self.quantization in ("none", "4bit", "8bit"),
            "quantization",
            self.quantization,
            "must be none, 4bit or 8bit",
        )
        check(
            re.fullmatch(r"cpu|auto|cuda(:\d+)?", self.device) is not None,
            "device",
            self.device,
            "must be cpu, cuda, cuda:N or auto",
        )
        check(
            self.num_server_rounds >= 1, "num-server-rounds", self.num_server_rounds, "must be >= 1"
        )
        check(
            0.0 < self.fraction_train <= 1.0,
            "fraction-train",
            self.fraction_train,
            "must be in (0, 1]",
        )
        check(self.min_train_nodes >= 1, "min-train-nodes", self.min_train_nodes, "must be >= 1")
        check(self.min_good_replies >= 1, "min-good-replies", self.min_good_replies, "must be >= 1")
        check(self.local_steps >= 1, "local-steps", self.local_steps, "must be >= 1")
        check(self.batch_size >= 1, "batch-size", self.batch_size, "must be >= 1")
        check(8 <= self.seq_len <= 8192, "seq-len", self.seq_len, "must be in [8, 8192]")
        check(
            0.0 < self.learning_rate < 1.0, "learning-rate", self.learning_rate, "must be in (0, 1)"
        )
        check(
            self.aggregation in AGGREGATION_MODES,
            "aggregation",
            self.aggregation,
            f"must be one of {', '.join(AGGREGATION_MODES)}",
        )
        check(self.max_update_norm >= 0, "max-update-norm", self.max_update_norm, "must be >= 0")
        check(
            self.robust_aggregation in ROBUST_AGGREGATIONS,
            "robust-aggregation",
            self.robust_aggregation,
            f"must be one of {', '.join(ROBUST_AGGREGATIONS)}",
        )
        check(
            0.0 <= self.trim_fraction < 0.5,
            "trim-fraction",
            self.trim_fraction,
            "must be in [0, 0.5)",
        )
        check(
            self.max_weight_ratio == 0 or 1 <= self.max_weight_ratio < math.inf,
            "max-weight-ratio",
            self.max_weight_ratio,
            "must be 0 (no cap) or >= 1",
        )
        check(
            0 < self.server_lr <= MAX_SERVER_LR,
            "server-lr",
            self.server_lr,
            f"must be in (0, {MAX_SERVER_LR:g}]",
        )
        check(
            self.central_eval_samples >= 0,
            "central-eval-samples",
            self.central_eval_samples,
            "must be >= 0",
        )
        check(
            self.central_heldout >= 1,
            "central-heldout",
            self.central_heldout,
            "must be >= 1: the server evaluates (and gates) every version on that held-out part",
        )
        check(self.torch_threads >= 0, "torch-threads", self.torch_threads, "must be >= 0")
        check(self.round_timeout > 0, "round-timeout", self.round_timeout, "must be > 0")
        check(self.publish_timeout > 0, "publish-timeout", self.publish_timeout, "must be > 0")
        check(
            self.allocation in ALLOCATIONS,
            "allocation",
            self.allocation,
            f"must be one of {', '.join(ALLOCATIONS)}",
        )
        check(
            self.dp_noise_multiplier >= 0,
            "dp-noise-multiplier",
            self.dp_noise_multiplier,
            "must be >= 0",
        )
        check(self.dp_clipping_norm > 0, "dp-clipping-norm", self.dp_clipping_norm, "must be > 0")
        check(0 < self.dp_delta < 1, "dp-delta", self.dp_delta, "must be in (0, 1)")
        if self.dp_noise_multiplier > 0:
            # Flower's DP noise (σ·C / nodes) is calibrated for the plain mean of the clipped
            # updates; any other aggregate changes one node's influence and voids the guarantee.
            dp = "with dp-noise-multiplier > 0 (Flower's noise is calibrated for a plain mean)"
            check(
                self.aggregation == "fedavg",
                "aggregation",
                self.aggregation,
                f"must be 'fedavg' {dp}: the exact aggregate's SVD factors are no mean",
            )
            check(
                self.robust_aggregation == "none",
                "robust-aggregation",
                self.robust_aggregation,
                f"must be 'none' {dp}",
            )
            check(
                self.server_lr == 1.0,
                "server-lr",
                self.server_lr,
                f"must be 1 {dp}: a server step η scales one node's influence by η",
            )
        check(
            0.0 <= self.min_training_share <= 1.0,
            "min-training-share",
            self.min_training_share,
            "must be in [0, 1]",
        )
        check(self.round_deadline_s > 0, "round-deadline-s", self.round_deadline_s, "must be > 0")
        check(
            self.round_deadline_s < self.round_timeout,
            "round-deadline-s",
            self.round_deadline_s,
            f"must be below round-timeout ({self.round_timeout:g}): the server stops waiting for"
            " replies at round-timeout, so a replica training until its deadline would always"
            " answer too late",
        )
        check(self.ttft_slo_s > 0, "ttft-slo-s", self.ttft_slo_s, "must be > 0")
        check(self.tpot_slo_s > 0, "tpot-slo-s", self.tpot_slo_s, "must be > 0")
        check(bool(self.run_name), "run-name", self.run_name, "must not be empty")
        check(0 <= self.seed < 2**32, "seed", self.seed, "must be in [0, 2**32)")
        try:
            self.data_spec  # noqa: B018 - validates the data fields now, not on first use
        except ConfigError as e:
            problems.append(str(e))
        if problems:
            raise ConfigError("invalid run config: " + "; ".join(problems))

    @property
    def data_spec(self) -> DataSpec:
        return DataSpec(
            source=self.data,
            partitioning=self.partitioning,
            dirichlet_alpha=self.dirichlet_alpha,
            heldout_fraction=self.heldout_fraction,
            central_heldout=self.central_heldout,
            max_samples_per_client=self.max_samples_per_client or None,
            seed=self.seed,
        )

    @property
    def output_path(self) -> Path:
        return Path(self.output_dir).expanduser().resolve()

    def ignored_settings(self) -> list[str]:
        """Settings changed from their defaults that this config leaves without effect (the
        ServerApp warns of them): the allocation's under ``allocation='static'``."""
        if self.allocation != "static":
            return []
        defaults = RunConfig()
        return [
            f"{name.replace('_', '-')}={getattr(self, name)!r}"
            for name in ("backfill", "train_in_turns", "min_training_share")
            if getattr(self, name) != getattr(defaults, name)
        ]

    def to_flat(self) -> dict[str, Scalar]:
        """The config as Flower-style flat kebab-case keys (what is stored with a run)."""
        out: dict[str, Scalar] = {}
        for f in dataclasses.fields(self):
            if f.name == "lora":
                continue
            out[f.name.replace("_", "-")] = getattr(self, f.name)
        out["lora-rank"] = self.lora.rank
        out["lora-alpha"] = self.lora.alpha
        out["lora-dropout"] = self.lora.dropout
        out["lora-targets"] = ",".join(self.lora.target_modules)
        return out

    @classmethod
    def from_flower(cls, run_config: Mapping[str, Scalar]) -> RunConfig:
        """Build from Flower's ``context.run_config``; unknown keys and bad types are errors."""
        fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "lora"}
        lora_keys = {"lora-rank", "lora-alpha", "lora-dropout", "lora-targets"}
        kwargs: dict[str, object] = {}
        problems: list[str] = []
        for key, value in run_config.items():
            if key in lora_keys:
                continue
            name = key.replace("-", "_")
            if name not in fields:
                problems.append(f"unknown key {key!r}")
                continue
            try:
                kwargs[name] = _coerce(value, fields[name].default)
            except (TypeError, ValueError):
                expected = type(fields[name].default).__name__
                problems.append(f"{key}={value!r}: expected {expected}")
        lora_defaults = LoraSpec()
        lora: dict[str, object] = {}
        for key, name, default in (
            ("lora-rank", "rank", lora_defaults.rank),
            ("lora-alpha", "alpha", lora_defaults.alpha),
            ("lora-dropout", "dropout", lora_defaults.dropout),
        ):
            value = run_config.get(key, default)
            try:
                lora[name] = _coerce(value, default)
            except (TypeError, ValueError):
                whole = "a whole number" if isinstance(default, int) else "a number"
                problems.append(f"{key}={value!r}: expected {whole}")
        targets = str(run_config.get("lora-targets", ",".join(lora_defaults.target_modules)))
        lora["target_modules"] = tuple(t.strip() for t in targets.split(",") if t.strip())
        if len(lora) == 4:
            try:  # (LoraSpec names the field at fault: "lora-rank must be >= 1, got 0")
                kwargs["lora"] = LoraSpec(**lora)  # type: ignore[arg-type]
            except ConfigError as e:
                problems.append(str(e))
        if problems:
            raise ConfigError("invalid run config: " + "; ".join(problems))
        return cls(**kwargs)  # type: ignore[arg-type]

    @classmethod
    def from_app(cls, app: Path, overrides: str | Mapping[str, Scalar] = "") -> RunConfig:
        """The run config ``flwr run <app> -c "<overrides>"`` gives the ServerApp: the app's
        ``[tool.flwr.app.config]`` with the overrides on top (so launchers check it early)."""
        from flwr.common.config import fuse_dicts, get_fused_config_from_dir

        if not (app / "pyproject.toml").is_file():  # (Flower's own error is a traceback)
            raise ConfigError(
                f"--app {app}: not a Flower app (no pyproject.toml there); run from the CoLLM-FL "
                "checkout or pass --app <its path>"
            )
        parsed = parse_overrides(overrides) if isinstance(overrides, str) else dict(overrides)
        known = get_fused_config_from_dir(app, {})  # the app's own config, flattened
        unknown = [k for k in parsed if k not in known]
        if unknown:  # (Flower's own error is a traceback naming a "main dictionary")
            hints = []
            for key in unknown:
                close = difflib.get_close_matches(key, list(known), n=1)
                hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            raise ConfigError(
                f"invalid run config: unknown key {', '.join(hints)}; the app's keys are listed "
                f"under [tool.flwr.app.config] in {app / 'pyproject.toml'}"
            )
        config = cls.from_flower(fuse_dicts(known, parsed))  # as Flower fuses them
        if config.store_url:
            _check_store_url(config.store_url)
        return config

    def replace(self, **changes: object) -> RunConfig:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


def parse_overrides(overrides: str) -> dict[str, Scalar]:
    """``-c`` overrides as Flower reads them (``k=v ...``, or one ``.toml`` file), refusing what
    Flower would drop without a word (a word that is not ``key=value``: "rounds 5")."""
    import click
    from flwr.common.config import parse_config_args

    text = overrides.strip()
    if not text:
        return {}
    if not text.endswith(".toml"):
        stray = _CONFIG_PAIR.sub(" ", text).split()
        if stray:
            raise ConfigError(f"invalid run config {text!r}: not key=value: {' '.join(stray)!r}")
        keys = [key for key, _ in _CONFIG_PAIR.findall(text)]
        repeated = sorted({k for k in keys if keys.count(k) > 1})
        if repeated:
            raise ConfigError(f"invalid run config {text!r}: {', '.join(repeated)} given twice")
    try:
        return dict(parse_config_args([text]))
    except (ValueError, OSError, click.ClickException) as e:
        detail = e.message if isinstance(e, click.ClickException) else str(e)
        raise ConfigError(f"invalid run config {text!r}: {detail}") from None


def format_overrides(values: Mapping[str, Scalar]) -> str:
    """``key=value ...`` that :func:`parse_overrides` (and ``flwr run -c``) read as ``values``."""
    parts = []
    for key, value in values.items():
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, int | float):
            text = repr(value)
        elif "'" not in value:
            text = f"'{value}'"
        elif '"' not in value:
            text = f'"{value}"'
        else:
            raise ConfigError(f"{key}={value!r}: a value cannot hold both kinds of quote")
        parts.append(f"{key}={text}")
    return " ".join(parts)


def _check_store_url(url: str) -> None:
    """A SQLAlchemy URL whose dialect and driver are installed, before a run starts."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    try:
        make_url(url).get_dialect().import_dbapi()
    except (ArgumentError, NoSuchModuleError, ImportError, ValueError) as e:
        raise ConfigError(
            f"invalid run config: store-url={url!r}: not a usable database URL ({e})"
        ) from None


def _coerce(value: Scalar, default: object) -> object:
    """Coerce a Flower config scalar to the type of the field's default."""
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
            return value.lower() in ("true", "1")
        raise TypeError(value)
    if isinstance(default, int):
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise TypeError(value)
        return int(value)
    if isinstance(default, float):
        if isinstance(value, bool):
            raise TypeError(value)
        return float(value)
    if isinstance(value, str):
        return value
    raise TypeError(value)


def config_number(config: Mapping[str, object], key: str, default: float) -> float:
    """A numeric value of a message's ConfigRecord or any mapping (``default`` when absent); a
    clear error when it is not a number (a bool, a string, a list)."""
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"config {key!r} must be a number, got {value!r}")
    return float(value)


def config_int(config: Mapping[str, object], key: str, default: int) -> int:
    """An integer value of a message's ConfigRecord (``default`` when absent)."""
    value = config_number(config, key, default)
    if not value.is_integer():
        raise ConfigError(f"config {key!r} must be an integer, got {value!r}")
    return int(value)


@dataclass(frozen=True)
class TrainBudget:
    """What the server asks of a client this round (the allocation policy may change it)."""

    local_steps: int
    learning_rate: float
    batch_size: int

    @classmethod
    def from_config(cls, cfg: RunConfig, overrides: Mapping[str, object]) -> TrainBudget:
        """The round's budget from a train message's config (``overrides``), checked as the run
        config's own values are (0 steps is a budget: a node asked for its load report only)."""
        budget = cls(
            local_steps=config_int(overrides, "local-steps", cfg.local_steps),
            learning_rate=config_number(overrides, "learning-rate", cfg.learning_rate),
            batch_size=config_int(overrides, "batch-size", cfg.batch_size),
        )
        if budget.local_steps < 0:
            raise ConfigError(f"config 'local-steps' must be >= 0, got {budget.local_steps}")
        if not 0.0 < budget.learning_rate < 1.0:  # (NaN fails this too)
            raise ConfigError(
                f"config 'learning-rate' must be in (0, 1), got {budget.learning_rate!r}"
            )
        if budget.batch_size < 1:
            raise ConfigError(f"config 'batch-size' must be >= 1, got {budget.batch_size}")
        return budget
