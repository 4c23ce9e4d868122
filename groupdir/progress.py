"""Progress of the long steps outside training (writing images, encoding shards, predicting, benchmarks).

Three modes: "bar", a tqdm bar on stderr (for a terminal); "lines", plain lines on stderr with no
carriage returns (for CI and log files): one at the start, one at each further tenth of the work or
after 30 s without one, and one at the end with the rate; "off", nothing (`--quiet`). The CLI picks
the mode once with `progress_mode` and passes it down; every library function takes it as its
`progress` parameter, "off" by default, so that code calling them (training workers, tests) stays quiet.
"""

from __future__ import annotations

import sys
import time
from typing import Literal, TextIO, get_args

Mode = Literal["bar", "lines", "off"]
LINE_SECONDS = 30.0  # lines mode: the longest silence while work is still being reported


def progress_mode(quiet: bool, terminal: bool) -> Mode:
    """Nothing when quiet; a bar when stderr is a terminal, else plain lines."""
    if quiet:
        return "off"
    return "bar" if terminal else "lines"


class Progress:
    """`total` units of work named by `description` ("images written"), shown as `mode` says on `file`
    (stderr by default). A context manager: call `update(n)` as units are done. `write(line)` prints a
    result line on stdout, in every mode, without tearing a bar."""

    def __init__(self, total: int, description: str, mode: Mode = "off", file: TextIO | None = None):
        if mode not in get_args(Mode):
            raise ValueError(f"progress mode {mode!r} is not one of {', '.join(get_args(Mode))}")
        self.total, self.description, self.mode = total, description, mode
        self.file = file or sys.stderr  # looked up now, so that a redirected stderr (pytest's) is used
        self.done, self.bar = 0, None

    def __enter__(self) -> Progress:
        self.started = time.monotonic()
        if self.mode == "bar":
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, desc=self.description, unit="", file=self.file, dynamic_ncols=True)
        elif self.mode == "lines":
            self._line(f"{self.done}/{self.total}")
        return self

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.mode == "lines" and self.done < self.total and self._line_due():  # the end has its own line
            self._line(f"{self.done}/{self.total} ({100 * self.done / self.total:.0f}%) after "
                       f"{time.monotonic() - self.started:.0f} s")

    def write(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line, file=sys.stdout)  # clears the bar, prints, draws the bar again below
        else:
            print(line, flush=True)

    def __exit__(self, error_type, *_) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.mode == "lines" and error_type is None:  # after an error, its message is the last word
            seconds = time.monotonic() - self.started
            self._line(f"{self.done}/{self.total} in {seconds:.1f} s ({rate(self.done, seconds)})")

    def _line_due(self) -> bool:
        return self.done >= self.next_tenth or time.monotonic() - self.last_line >= LINE_SECONDS

    def _line(self, text: str) -> None:
        print(f"{self.description}: {text}", file=self.file, flush=True)
        self.last_line = time.monotonic()
        tenth = self.total / 10
        self.next_tenth = (self.done // tenth + 1) * tenth if tenth else 0


def rate(done: int, seconds: float) -> str:
    """Units per second, or seconds per unit for slow work (a benchmark's runs)."""
    if done == 0:
        return "none done"
    per_second = done / max(seconds, 1e-6)
    return f"{per_second:.1f}/s" if per_second >= 1 else f"{seconds / done:.1f} s each"
