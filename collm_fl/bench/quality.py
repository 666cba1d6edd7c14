"""Served-model quality: central held-out perplexity of the base model and of every stored version.

Each version is loaded from its PEFT directory with ``PeftModel.from_pretrained`` (the same way a
user or vLLM would load it), so the benchmark also proves the stored versions are loadable.
"""

from __future__ import annotations

import json
import logging
import platform
import time
from pathlib import Path

import torch

from collm_fl.central_eval import central_heldout_blocks
from collm_fl.config import RunConfig
from collm_fl.models import load_base_model
from collm_fl.reports import save_figure, write_text_atomic
from collm_fl.store import VersionStore
from collm_fl.training import evaluate_loss

log = logging.getLogger(__name__)


def run_quality_benchmark(
    output_dir: Path,
    run_name: str,
    store_url: str | None,
    out_dir: Path,
    command: str,
) -> tuple[dict[str, object], Path]:
    """Evaluate base + all versions of ``run_name``; write quality.json/.md/.png to ``out_dir``."""
    from peft import PeftModel

    store = VersionStore(output_dir.resolve(), store_url)
    run = store.find_run(run_name)
    cfg = RunConfig.from_flower(run.config)
    versions = store.list_versions(run.id)
    loaded = load_base_model(cfg.model, quantization=cfg.quantization)
    blocks = central_heldout_blocks(cfg, loaded.tokenizer)

    started = time.perf_counter()
    base = evaluate_loss(loaded.model, blocks, batch_size=cfg.batch_size)
    log.info("base model: loss %.4f ppl %.2f", base.loss, base.perplexity)
    rows: list[dict[str, object]] = []
    model: PeftModel | None = None
    previous = ""
    for v in versions:
        vdir, name = store.version_dir(v), f"v{v.number}"
        if model is None:
            model = PeftModel.from_pretrained(loaded.model, vdir, adapter_name=name)
        else:  # one adapter resident at a time: load the next, switch, drop the last
            model.load_adapter(vdir, adapter_name=name)
            model.set_adapter(name)
            model.delete_adapter(previous)
        previous = name
        ev = evaluate_loss(model, blocks, batch_size=cfg.batch_size)
        log.info(
            "v%d (round %d): loss %.4f ppl %.2f", v.number, v.round_number, ev.loss, ev.perplexity
        )
        rows.append(
            {
                "version": v.number,
                "round": v.round_number,
                "loss": ev.loss,
                "perplexity": ev.perplexity,
                "path": str(vdir),
            }
        )
    final = rows[-1] if rows else {"loss": base.loss, "perplexity": base.perplexity}
    result: dict[str, object] = {
        "command": command,
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
        },
        "run": run_name,
        "run_config": run.config,  # how the evaluated versions were trained
        "rounds": [
            {"round": r.number, "status": r.status, "clients_ok": r.num_ok, "seconds": r.seconds}
            for r in store.list_rounds(run.id)
        ],
        "model": cfg.model,
        "data": cfg.data,
        "partitioning": cfg.partitioning,
        "central_heldout_rows": int(blocks.input_ids.shape[0]),
        "seq_len": cfg.seq_len,
        "base": {"loss": base.loss, "perplexity": base.perplexity},
        "versions": rows,
        "final": final,
        "perplexity_reduction": 1.0 - float(final["perplexity"]) / base.perplexity,  # type: ignore[arg-type]
        "seconds": time.perf_counter() - started,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out_dir / "quality.json", json.dumps(result, indent=2))
    md_path = out_dir / "quality.md"
    write_text_atomic(md_path, _markdown(result))
    _plot(result, out_dir / "quality.png")
    return result, md_path


def _markdown(r: dict[str, object]) -> str:
    base = r["base"]
    assert isinstance(base, dict)
    lines = [
        f"# Central held-out quality — run `{r['run']}`",
        "",
        f"Model `{r['model']}`, data `{r['data']}` ({r['partitioning']} partitioning), "
        f"{r['central_heldout_rows']} held-out rows of {r['seq_len']} tokens "
        "from plays no client trains on.",
        "",
        "| adapter | round | loss | perplexity |",
        "|---|---:|---:|---:|",
        f"| base (no adapter) | – | {base['loss']:.4f} | {base['perplexity']:.2f} |",
    ]
    for row in r["versions"]:  # type: ignore[attr-defined]
        lines.append(
            f"| v{row['version']} | {row['round']} | {row['loss']:.4f} | {row['perplexity']:.2f} |"
        )
    lines += [
        "",
        f"Perplexity change base → final: {-100 * float(r['perplexity_reduction']):+.1f}%",  # type: ignore[arg-type]
        "",
        _training_line(r),
        "",
        f"Command: `{r['command']}`  ",
        f"Machine: {r['machine']}",
        "",
    ]
    return "\n".join(lines)


def _plot(r: dict[str, object], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = r["versions"]
    assert isinstance(rows, list)
    base = r["base"]
    assert isinstance(base, dict)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(
        [row["round"] for row in rows],
        [row["perplexity"] for row in rows],
        marker="o",
        label="served version",
    )
    ax.axhline(base["perplexity"], color="grey", linestyle="--", label="base model")
    ax.set_xlabel("round")
    ax.set_ylabel("central held-out perplexity")
    ax.set_title(f"{r['model']} on {r['data']}")
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)


def _training_line(r: dict[str, object]) -> str:
    cfg = r.get("run_config")
    rounds = r.get("rounds")
    if not isinstance(cfg, dict) or not isinstance(rounds, list):
        return ""
    clients = max((int(x["clients_ok"]) for x in rounds), default=0)
    return (
        f"Versions trained by the federation run `{r['run']}`: {len(rounds)} rounds, up to "
        f"{clients} clients per round, {cfg.get('local-steps')} local steps of batch "
        f"{cfg.get('batch-size')} × {cfg.get('seq-len')} tokens, learning rate "
        f"{cfg.get('learning-rate')}, LoRA r={cfg.get('lora-rank')} "
        f"alpha={cfg.get('lora-alpha')} on {cfg.get('lora-targets')}, "
        f"{cfg.get('aggregation')} aggregation, "
        f"{cfg.get('partitioning')} partitioning."
    )
