"""Report files are replaced whole: a failure while one is written leaves the previous one."""

import pytest

from collm_fl.reports import save_figure, write_text_atomic


def test_a_report_is_replaced_whole_and_a_failed_write_leaves_the_old_one(tmp_path):
    path = tmp_path / "report.md"
    write_text_atomic(path, "first\n")
    write_text_atomic(path, "second\n")
    assert path.read_text() == "second\n"

    class Boom:
        def savefig(self, target, **kw):
            target.write_bytes(b"half a pn")  # then the plotting fails
            raise RuntimeError("plotting failed")

    png = tmp_path / "live.png"
    png.write_bytes(b"old png")
    with pytest.raises(RuntimeError, match="plotting failed"):
        save_figure(Boom(), png)
    assert png.read_bytes() == b"old png"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["live.png", "report.md"]  # no temp left


def test_a_figure_is_saved_in_the_format_its_name_says(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    save_figure(fig, tmp_path / "plot.png")
    plt.close(fig)
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_report_is_as_readable_as_a_file_written_in_place(tmp_path):
    plain = tmp_path / "plain.md"
    plain.write_text("x")
    atomic = tmp_path / "atomic.md"
    write_text_atomic(atomic, "x")
    assert atomic.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777


def test_a_reports_bytes_are_on_disk_before_its_name_and_its_name_after(tmp_path, monkeypatch):
    # Renamed over a new name (the earlier run's report moved aside), unsynced bytes could be an
    # empty report after a power cut.
    import os
    import stat

    from collm_fl import reports

    events: list[str] = []
    fsync, replace = os.fsync, os.replace

    def recording_fsync(fd: int) -> None:
        events.append("fsync dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file")
        fsync(fd)

    def recording_replace(a, b) -> None:
        events.append("rename")
        replace(a, b)

    monkeypatch.setattr(reports.os, "fsync", recording_fsync)
    monkeypatch.setattr(reports.os, "replace", recording_replace)
    write_text_atomic(tmp_path / "report.md", "# report\n")
    assert events == ["fsync file", "rename", "fsync dir"]
    assert (tmp_path / "report.md").read_text() == "# report\n"
