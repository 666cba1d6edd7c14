"""`collm bench server-lr` on the tiny model: every curve, the files, and the comparison column."""

from __future__ import annotations

import json
from pathlib import Path

from collm_fl.bench.server_lr import SEQUENTIAL, run_server_lr_benchmark


def test_server_lr_benchmark_writes_every_curve_and_compares_with_sequential(
    tmp_path: Path,
) -> None:
    result = run_server_lr_benchmark("tiny", 2, 2, 1, [1.0, 2.0], tmp_path, "collm bench server-lr")
    losses = result["losses"]
    assert isinstance(losses, dict) and list(losses) == [SEQUENTIAL, "1", "2"]
    assert all(len(curve) == 3 for curve in losses.values())  # round 0 + 2 rounds
    assert len({curve[0] for curve in losses.values()}) == 1  # one start for every curve
    assert losses["1"] != losses["2"]  # the server step changed the trajectory
    saved = json.loads((tmp_path / "server_lr.json").read_text())
    assert saved["losses"] == losses
    md = (tmp_path / "server_lr.md").read_text()
    seq = losses[SEQUENTIAL]
    for name in ("1", "2"):
        never_worse = all(a <= b + 1e-9 for a, b in zip(losses[name][1:], seq[1:], strict=True))
        row = next(line for line in md.splitlines() if line.startswith(f"| η = {name} |"))
        assert row.endswith("| yes |" if never_worse else "| no |")
    assert "Command: `collm bench server-lr`" in md
