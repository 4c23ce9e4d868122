"""The demo's closing table of where its time went."""

from groupdir.demo import phase_table


def test_phase_table_puts_each_runs_phases_under_it_and_the_rest_in_ray_start_up():
    seconds = {"data": 12.0, "ray": 6.0, "groupdir": 100.0, "vanilla": 80.0, "eval": 10.0}
    timings = {"groupdir": {"setup": 5.0, "train_steps": 40.0, "after_training": 7.0},
               "vanilla": {"setup": 4.0, "train_steps": 30.0, "after_training": 0.0}}
    rows = {cells[0].strip(): [cell.strip() for cell in cells[1:]]
            for cells in (line.strip("|").split("|") for line in phase_table(seconds, timings).splitlines()
                          if line.startswith("| "))}
    assert rows["train groupdir"] == ["100", ""] and rows["train vanilla"] == ["80", ""]
    assert rows["train steps"] == ["", "30"]  # the last run's row of that name
    assert rows["Ray Train workers start / stop, final logging"] == ["", "46"]  # 80 - 34
    assert rows["total"] == ["208", ""]
    lines = phase_table(seconds, timings).splitlines()
    first_start = next(i for i, line in enumerate(lines) if "workers start" in line)
    assert lines[first_start].endswith("| 48 |")  # groupdir: 100 - (5 + 40 + 7)
