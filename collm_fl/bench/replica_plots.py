"""Plots of the replica benchmarks (PNG, matplotlib's Agg backend: no display needed)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from collm_fl.reports import save_figure

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from collm_fl.bench.replica_interference import InterferenceBenchmark
    from collm_fl.bench.replica_memory import MemoryBenchmark
    from collm_fl.bench.replica_swap import SwapBenchmark

log = logging.getLogger(__name__)


def _figure(
    rows: int, cols: int, size: tuple[float, float], sharey: bool = False
) -> tuple[Figure, list[Axes]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(rows, cols, figsize=size, squeeze=False, sharey=sharey)
    return fig, [ax for row in axes for ax in row]


def _save(fig: Figure, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)
    log.info("wrote %s", path)


def plot_swap(result: SwapBenchmark, path: Path) -> None:
    """Inter-token gaps over time per method, swap windows shaded, the decode step dashed."""
    methods = result["methods"]
    fig, axes = _figure(len(methods), 1, (8, 2.2 * len(methods)), sharey=True)
    for ax, m in zip(axes, methods, strict=True):
        for start, end in m["timeline"]["windows"]:
            ax.axvspan(start, end, color="tab:orange", alpha=0.25, lw=0)
        gaps = m["timeline"]["gaps"]
        ax.plot([g[0] for g in gaps], [g[1] for g in gaps], ".", ms=2, color="tab:blue")
        ax.axhline(m["decode_step_ms"], color="gray", ls="--", lw=1)
        ax.set_title(
            f"{m['method']}: max gap in swaps {m['in_swap']['max_ms']:.0f} ms, "
            f"step {m['decode_step_ms']:.0f} ms",
            fontsize=9,
        )
        ax.set_ylabel("gap (ms)")
    axes[-1].set_xlabel("seconds since the measured window began (orange: swap windows)")
    _save(fig, path)


def plot_memory(result: MemoryBenchmark, path: Path) -> None:
    """Co-executing replica vs separate serving + training processes (stacked), in MiB."""
    mib = 2.0**20
    fig, axes = _figure(1, 1, (5, 3.2))
    ax = axes[0]
    ax.bar(["co-execution"], [result["coexec_rss_bytes"] / mib], color="tab:green")
    ax.bar(["separate"], [result["serving_rss_bytes"] / mib], color="tab:blue", label="serving")
    ax.bar(
        ["separate"],
        [result["training_rss_bytes"] / mib],
        bottom=[result["serving_rss_bytes"] / mib],
        color="tab:red",
        label="training",
    )
    ax.axhline(result["param_bytes"] / mib, color="gray", ls="--", lw=1, label="one base copy")
    ax.set_ylabel("peak RSS (MiB)")
    ax.legend(fontsize=8)
    _save(fig, path)


def plot_interference(result: InterferenceBenchmark, path: Path) -> None:
    """Serving tokens/s and training steps/s, and p99 TTFT/TPOT, per training setting."""
    rows = result["rows"]
    labels = [r["setting"].replace(", ", "\n") for r in rows]  # (a setting's two parts)
    x = list(range(len(rows)))
    fig, axes = _figure(1, 2, (12, 3.8))
    left, right = axes
    left.bar(x, [r["tokens_per_s"] for r in rows], color="tab:blue", label="serving tok/s")
    left.set_ylabel("serving tokens/s")
    twin = left.twinx()
    twin.plot(x, [r["train_steps_per_s"] for r in rows], "o-", color="tab:red")
    twin.set_ylabel("training steps/s", color="tab:red")
    left.set_xticks(x, labels, fontsize=7)
    left.set_title("throughput", fontsize=9)
    width = 0.4
    right.bar([i - width / 2 for i in x], [r["ttft_p99_ms"] for r in rows], width, label="TTFT p99")
    right.bar([i + width / 2 for i in x], [r["tpot_p99_ms"] for r in rows], width, label="TPOT p99")
    right.axhline(1e3 * result["tpot_slo_s"], color="gray", ls="--", lw=1, label="TPOT SLO")
    right.set_xticks(x, labels, fontsize=7)
    right.set_ylabel("ms")
    right.set_title("latency", fontsize=9)
    right.legend(fontsize=7)
    _save(fig, path)
