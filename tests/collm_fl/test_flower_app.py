"""The copy of the Flower app `flwr run` builds its FAB from (collm_fl.flower_app)."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import pytest
from flwr.cli.build import build_fab_from_disk

from collm_fl.errors import ConfigError
from collm_fl.flower_app import app_files, stage_app

ROOT = Path(__file__).resolve().parents[2]


def test_ignored_folders_symlinks_and_git_are_left_out(tmp_path):
    app = tmp_path / "app"
    for rel in (
        "pyproject.toml",
        ".gitignore",
        "pkg/mod.py",
        "pkg/data.json",
        ".venv/lib/site.py",
        "pkg/__pycache__/mod.cpython-311.pyc",
        "outputs/store.db",
        ".git/HEAD",
    ):
        (app / rel).parent.mkdir(parents=True, exist_ok=True)
        (app / rel).write_text(rel)
    (app / ".gitignore").write_text(".venv/\n__pycache__/\noutputs/\n")
    (app / "pkg" / "link.py").symlink_to(app / "pkg" / "mod.py")
    assert app_files(app) == [".gitignore", "pkg/data.json", "pkg/mod.py", "pyproject.toml"]
    staged = stage_app(app, tmp_path / "staged")
    assert sorted(str(p.relative_to(staged)) for p in staged.rglob("*") if p.is_file()) == [
        ".collm-staged-app",
        ".gitignore",
        "pkg/data.json",
        "pkg/mod.py",
        "pyproject.toml",
    ]
    (app / "pkg" / "mod.py").write_text("changed")
    stage_app(app, staged)  # staged again: replaced, not merged
    assert (staged / "pkg" / "mod.py").read_text() == "changed"


def test_a_file_a_negation_brings_back_from_an_ignored_folder_is_copied_as_flower_keeps_it(
    tmp_path,
):
    app = tmp_path / "app"
    # (docs/: the app's pyproject leaves its docs out of the FAB, a pattern Flower wants matched)
    files = ("pyproject.toml", "pkg/mod.py", "data/schema.json", "data/big.json", "notes.md")
    for rel in (*files, "docs/report.md"):
        (app / rel).parent.mkdir(parents=True, exist_ok=True)
        (app / rel).write_text(rel)
    (app / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text())
    (app / ".gitignore").write_text("data/**\n!data/schema.json\n  notes.md  \n")
    staged = stage_app(app, tmp_path / "staged")
    assert (staged / "data" / "schema.json").is_file() and not (
        staged / "data" / "big.json"
    ).exists()
    assert not (staged / "notes.md").exists()  # (Flower strips the spaces around a pattern)
    assert build_fab_from_disk(staged) == build_fab_from_disk(app)


def test_a_copy_inside_the_app_leaves_itself_out_and_a_folder_it_did_not_make_is_kept(tmp_path):
    app = tmp_path / "app"
    (app / "pkg").mkdir(parents=True)
    (app / "pyproject.toml").write_text("[project]\n")
    (app / "pkg" / "mod.py").write_text("x = 1\n")
    inside = stage_app(app, app / "site" / "flower-app")  # a workdir in the app, not ignored
    again = stage_app(app, inside)  # replaced: not copied into itself
    assert sorted(str(p.relative_to(again)) for p in again.rglob("*.py")) == ["pkg/mod.py"]
    mine = tmp_path / "mine"
    (mine / "keep.txt").parent.mkdir()
    (mine / "keep.txt").write_text("the user's")
    with pytest.raises(ConfigError, match="not a copy of the app collm made: kept"):
        stage_app(app, mine)
    assert (mine / "keep.txt").read_text() == "the user's"
    with pytest.raises(ConfigError, match="a folder that holds it"):
        stage_app(app, tmp_path)


def test_a_folder_without_pyproject_is_not_a_flower_app(tmp_path):
    with pytest.raises(ConfigError, match="not a Flower app"):
        stage_app(tmp_path, tmp_path / "staged")


def test_flower_builds_the_same_fab_from_the_copy_as_from_the_checkout(tmp_path):
    staged = build_fab_from_disk(stage_app(ROOT, tmp_path / "app"))
    assert staged == build_fab_from_disk(ROOT)  # byte for byte
    names = zipfile.ZipFile(io.BytesIO(staged)).namelist()
    assert "server_app/app.py" in names and "client_app/app.py" in names
    assert not [n for n in names if n.startswith((".venv/", ".git/")) or "__pycache__" in n]


def test_the_fab_leaves_the_docs_out_and_fits_flowers_limit():
    # The benchmark reports under docs/ grew past the FAB's 10 MiB: `flwr run .` refused the app.
    import io
    import zipfile

    from flwr.cli.build import build_fab_from_disk

    fab = build_fab_from_disk(ROOT)
    names = zipfile.ZipFile(io.BytesIO(fab)).namelist()
    assert not [n for n in names if n.startswith("docs/")]
    assert "server_app/app.py" in names and "client_app/app.py" in names
    assert len(fab) < 10 * 1024 * 1024
