"""Flower ServerApp: federated LoRA rounds, validated, aggregated exactly, stored as versions."""

from __future__ import annotations

import logging

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping, Strategy

from collm_fl.config import RunConfig
from collm_fl.logs import setup_logging
from server_app.federation import Federation, open_store
from strategies.lora import LoraFedAvg

log = logging.getLogger(__name__)

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    setup_logging()
    cfg = RunConfig.from_flower(context.run_config)
    if cfg.torch_threads:
        import torch

        torch.set_num_threads(cfg.torch_threads)
    strategy, wrapped = build_strategies(cfg)
    store = open_store(cfg)
    log.info(
        "run %r: model=%s data=%s partitioning=%s rounds=%d aggregation=%s robust=%s -> %s",
        cfg.run_name,
        cfg.model,
        cfg.data,
        cfg.partitioning,
        cfg.num_server_rounds,
        cfg.aggregation,
        cfg.robust_aggregation,
        cfg.output_path,
    )
    if ignored := cfg.ignored_settings():
        log.warning(
            "allocation='static' sends every node the same budget: %s has no effect",
            ", ".join(ignored),
        )
    summary = Federation(grid, cfg, wrapped, strategy, store).run()
    ran = (
        f"rounds {summary.first_round}..{summary.last_round}"
        if summary.first_round <= summary.last_round
        else "no round (the run had completed them)"
    )
    log.info(
        "done: %s, latest version v%d, central eval loss %s -> %s",
        ran,
        summary.latest_version,
        summary.initial_eval_loss,
        summary.final_eval_loss,
    )
    if summary.dp_epsilon is not None:
        log.info(
            "privacy spent by the run: epsilon %.4g at delta %g (collm_fl.privacy)",
            summary.dp_epsilon,
            cfg.dp_delta,
        )
    log.info("versions (PEFT dirs): %s | store: %s", summary.versions_dir, summary.store_url)


def build_strategies(cfg: RunConfig) -> tuple[LoraFedAvg, Strategy]:
    """The run's LoRA strategy, and what the round loop calls (it, or Flower's DP wrapper of it)."""
    dp = cfg.dp_noise_multiplier > 0
    strategy = LoraFedAvg(
        mode=cfg.aggregation,
        max_update_norm=cfg.max_update_norm,
        min_good_replies=cfg.min_good_replies,
        robust=cfg.robust_aggregation,
        trim_fraction=cfg.trim_fraction,
        max_weight_ratio=cfg.max_weight_ratio,
        server_lr=cfg.server_lr,
        uniform_weights=dp,
        # Clients clip (dp_clipping_mod): a reply over the norm was not clipped, and would
        # weigh more than the noise is calibrated for.
        clipping_norm=cfg.dp_clipping_norm if dp else None,
        fraction_train=cfg.fraction_train,
        fraction_evaluate=0.0,
        min_train_nodes=cfg.min_train_nodes,
        min_available_nodes=cfg.min_train_nodes,
    )
    wrapped: Strategy = strategy
    if dp:
        # Clients clip their update (dp_clipping_mod); the server adds Gaussian noise.
        wrapped = DifferentialPrivacyClientSideFixedClipping(
            strategy,
            noise_multiplier=cfg.dp_noise_multiplier,
            clipping_norm=cfg.dp_clipping_norm,
            num_sampled_clients=cfg.min_train_nodes,
        )
    return strategy, wrapped
