"""A copy of the Flower app for ``flwr run`` to build its FAB from.

``flwr run <app>`` lists and resolves every file under ``<app>`` before it filters them (flwr
1.42, ``flwr.cli.utils.collect_files``): a virtual environment inside the checkout (``.venv``,
where ``scripts/setup.sh`` puts it: ~50,000 files) costs every run 6-15 s of CPU on two cores
before anything starts. :func:`stage_app` copies what the app's ``.gitignore`` leaves (matched as
Flower matches it), skipping ignored folders without entering them, so ``flwr run`` builds the
same FAB from a folder of a few hundred files (its own include/exclude rules still apply there).
"""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

from flwr.cli.utils import build_pathspec, load_gitignore_patterns

from collm_fl.errors import ConfigError

ALWAYS_SKIPPED = (".git/",)  # never in a FAB, and not in .gitignore
STAGED_MARK = ".collm-staged-app"  # in a copy this module made: only such a folder is replaced


def app_files(app: Path, leave_out: Path | None = None) -> list[str]:
    """The app's regular files (POSIX paths relative to ``app``, sorted) that its ``.gitignore``
    leaves, read and matched as Flower does. An ignored folder is not entered unless a ``!``
    pattern could bring back a file in it; symlinks (which Flower skips too) are left out, and
    so is the folder ``leave_out`` (the copy's own, when it lies inside the app)."""
    patterns = load_gitignore_patterns(app / ".gitignore")
    spec = build_pathspec([*patterns, *ALWAYS_SKIPPED])
    prune = not any(p.startswith("!") for p in patterns)
    never = [*ALWAYS_SKIPPED]
    if leave_out is not None and leave_out.is_relative_to(app) and leave_out != app:
        never.append("/" + leave_out.relative_to(app).as_posix() + "/")
    skipped = build_pathspec(never)
    found = []
    for dirpath, dirnames, filenames in os.walk(app, followlinks=False):
        rel_dir = Path(dirpath).relative_to(app)
        kept = []
        for d in sorted(dirnames):
            rel = (rel_dir / d).as_posix() + "/"
            if (Path(dirpath) / d).is_symlink() or skipped.match_file(rel):
                continue
            if not (prune and spec.match_file(rel)):
                kept.append(d)
        dirnames[:] = kept
        for f in filenames:
            rel = (rel_dir / f).as_posix()
            try:
                mode = (Path(dirpath) / f).lstat().st_mode
            except FileNotFoundError:  # gone since the listing (a log, a journal)
                continue
            if stat.S_ISREG(mode) and not spec.match_file(rel):
                found.append(rel)
    return sorted(found)


def check_stage_dest(dest: Path) -> None:
    """ConfigError unless :func:`stage_app` may replace ``dest`` (absent, or a copy it made):
    a launcher checks before it starts anything."""
    if dest.exists() and not (dest / STAGED_MARK).is_file():
        raise ConfigError(f"{dest} exists and is not a copy of the app collm made: kept")


def stage_app(app: Path, dest: Path) -> Path:
    """Copy the Flower app at ``app`` (its :func:`app_files`) into ``dest``, which must not
    exist or be a copy this function made (it is replaced); returns ``dest``, for ``flwr run``.
    ConfigError when ``app`` is no Flower app, or ``dest`` is another folder or holds the app.
    (A ``dest`` inside the app is left out of the copy.)"""
    app, dest = app.expanduser().resolve(), dest.expanduser().resolve()
    if not (app / "pyproject.toml").is_file():
        raise ConfigError(f"{app} is not a Flower app (no pyproject.toml)")
    if app.is_relative_to(dest):
        raise ConfigError(f"cannot copy the app {app} into {dest}, a folder that holds it")
    check_stage_dest(dest)
    if dest.exists():
        shutil.rmtree(dest)
    files = app_files(app, leave_out=dest)
    dest.mkdir(parents=True)
    (dest / STAGED_MARK).write_text(f"a copy of {app} for `flwr run`; replaced on each run\n")
    for rel in files:
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            shutil.copy2(app / rel, target)
        except FileNotFoundError:  # gone since the listing
            continue
    return dest
