"""A copy of the Flower app for ``flwr run`` to build its FAB from.

``flwr run <app>`` lists and resolves every file under ``<app>`` before it filters them (flwr
1.42, ``flwr.cli.utils.collect_files``): a virtual environment inside the checkout (``.venv``,
where ``scripts/setup.sh`` puts it: ~50,000 files) costs every run 8-15 s of CPU on two cores
before anything starts. :func:`stage_app` copies what ``.gitignore`` leaves, skipping ignored
folders without entering them, so ``flwr run`` builds the same FAB from a folder of a few hundred
files (its own include/exclude rules still apply there).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pathspec

from collm_fl.errors import ConfigError

ALWAYS_SKIPPED = (".git/",)  # never in a FAB, and not in .gitignore


def _ignored(app: Path) -> pathspec.GitIgnoreSpec:
    gitignore = app / ".gitignore"
    lines = gitignore.read_text(errors="replace").splitlines() if gitignore.is_file() else []
    return pathspec.GitIgnoreSpec.from_lines([*lines, *ALWAYS_SKIPPED])


def app_files(app: Path) -> list[str]:
    """The app's files (POSIX paths relative to ``app``, sorted) that ``.gitignore`` leaves;
    ignored folders and symlinks (which Flower skips too) are never entered."""
    spec = _ignored(app)
    found = []
    for dirpath, dirnames, filenames in os.walk(app, followlinks=False):
        rel_dir = Path(dirpath).relative_to(app)
        kept = []
        for d in sorted(dirnames):
            rel = (rel_dir / d).as_posix()
            if not (Path(dirpath) / d).is_symlink() and not spec.match_file(rel + "/"):
                kept.append(d)
        dirnames[:] = kept
        for f in filenames:
            rel = (rel_dir / f).as_posix()
            if not (Path(dirpath) / f).is_symlink() and not spec.match_file(rel):
                found.append(rel)
    return sorted(found)


def stage_app(app: Path, dest: Path) -> Path:
    """Copy the Flower app at ``app`` (its :func:`app_files`) into ``dest``, replacing what was
    there; returns ``dest``, for ``flwr run``."""
    app = app.expanduser().resolve()
    if not (app / "pyproject.toml").is_file():
        raise ConfigError(f"{app} is not a Flower app (no pyproject.toml)")
    if dest.exists():
        shutil.rmtree(dest)
    for rel in app_files(app):
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(app / rel, target)
    return dest
