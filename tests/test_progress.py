"""The three progress modes, as a terminal, a log file and --quiet see them."""

import io
import time

import pytest

from groupdir import progress
from groupdir.progress import Progress, progress_mode


def run(total: int, mode: str, file=None) -> None:
    with Progress(total, "images written", mode, file=file) as shown:
        for _ in range(total):
            shown.update()


def test_the_mode_is_off_when_quiet_a_bar_on_a_terminal_and_lines_elsewhere():
    assert progress_mode(quiet=True, terminal=True) == "off"
    assert progress_mode(quiet=True, terminal=False) == "off"
    assert progress_mode(quiet=False, terminal=True) == "bar"
    assert progress_mode(quiet=False, terminal=False) == "lines"


def test_lines_are_plain_and_start_and_end_with_the_totals(capsys):
    run(20, "lines")
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = err.splitlines()
    assert lines[0] == "images written: 0/20"
    assert lines[1].startswith("images written: 2/20 (10%) after ")
    assert lines[-1].startswith("images written: 20/20 in ") and lines[-1].endswith("/s)")
    assert len(lines) == 11  # start, 10% .. 90%, end: no separate 100% line


def test_a_big_total_prints_a_line_per_tenth_not_per_unit(capsys):
    run(100_000, "lines")
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 11
    assert [line.split()[2] for line in lines[1:-1]] == [f"{k * 10_000}/100000" for k in range(1, 10)]


def test_slow_work_prints_a_line_after_the_longest_silence(capsys, monkeypatch):
    monkeypatch.setattr(progress, "LINE_SECONDS", 0.05)
    with Progress(1000, "runs done", "lines") as shown:
        time.sleep(0.1)
        shown.update()  # 0.1% of the work, but the silence was long enough
    assert capsys.readouterr().err.splitlines()[1].startswith("runs done: 1/1000 (0%) after ")


def test_the_closing_line_gives_seconds_each_for_slow_work():
    assert progress.rate(3, 600.0) == "200.0 s each"
    assert progress.rate(300, 2.0) == "150.0/s"
    assert progress.rate(0, 2.0) == "none done"


def test_off_prints_nothing_but_results(capsys):
    with Progress(50, "cases measured", "off") as shown:
        for _ in range(50):
            shown.update()
        shown.write("| 112 | 2000 |")
    out, err = capsys.readouterr()
    assert (out, err) == ("| 112 | 2000 |\n", "")


def test_an_error_leaves_no_closing_line(capsys):
    with pytest.raises(RuntimeError):
        with Progress(10, "images encoded", "lines") as shown:
            shown.update(3)
            raise RuntimeError("disk full")
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2 and lines[-1].startswith("images encoded: 3/10 (30%) after ")


def test_the_bar_redraws_in_place_and_results_go_to_stdout_whole(capsys):
    drawn = io.StringIO()
    with Progress(5, "batches predicted", "bar", file=drawn) as shown:
        for _ in range(5):
            shown.update()
        shown.write("result row")
    assert drawn.getvalue().count("\r") >= 2  # tqdm redraws the one line
    assert "batches predicted: 100%" in drawn.getvalue() and "5/5" in drawn.getvalue()
    assert capsys.readouterr().out == "result row\n"


def test_an_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="'verbose' is not one of bar, lines, off"):
        Progress(1, "x", "verbose")
